"""Prompts' keys and values, kept from the held-out loss pass for the engine.

Where an evaluation example is a prompt followed by its expected answer, the loss pass computes every layer's
keys and values of the prompt, and of the answer's first tokens, on its way to the loss. The engine's prefill of
the same prompt would compute them once more: on a CPU that is a third of answering short questions (the demo's
base model: 7-8 of 21-22 s, ``benchmarks/cpu_demo_probes.py answer-phases``). The pass keeps them instead
(``KeptKeys``), and each answer still to be generated starts from them (``engine.Request.prefix_keys``), only
its last prompt token run.

Keys are read where attention receives them (after rotary embeddings, before any repeat for grouped queries),
and mapped back to rows through the flat layout (``train.flat``) the pass ran in. A pass laid out otherwise
(flash attention's cached layout, varlen, padded batches, eager attention) keeps nothing, and the engine
prefills as before. Evaluation keeps keys on the CPU only (``eval.evaluate.keeps_keys``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from tunesmith.train.decoder import attention_implementation
from tunesmith.train.flat import flat_layout, shared_prefix_length

KEYS_BUDGET = 1 << 30  # bytes of kept keys and values; rows past it are prefilled by the engine


@dataclass
class KeptKeys:
    """What the loss pass keeps. ``length(example, picks)``: how many leading tokens' keys example ``example``
    (an index into the pass's examples) is wanted for, given its greedy tokens at its trained positions (0:
    none). ``kept``: per example, per layer, (keys, values) of shape (1, kv_heads, n, head_dim)."""

    length: Callable[[int, list[int]], int]
    budget: int = KEYS_BUDGET
    kept: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = field(default_factory=dict)
    used: int = 0

    def take(self, record: dict[int, tuple[torch.Tensor, torch.Tensor]], batch: dict, examples: list[int],
             picks: dict[int, list[int]]) -> None:
        """Keep what is wanted of ``batch`` (its rows are ``examples``, in order) from ``record``: one forward's
        keys and values by layer (``recording``). Nothing is kept where the record is not the batch laid out as
        one flat row."""
        wanted = {row: self.length(i, picks[i]) for row, i in enumerate(examples)}
        if not any(wanted.values()) or len(record) == 0:
            return
        flat = flat_layout(batch, shared_prefix_length(batch))
        layers = [record[layer] for layer in sorted(record)]
        if flat is None or sorted(record) != list(range(len(record))):
            return
        ids, _, segment, index = flat
        keys = layers[0][0]
        if keys.dim() != 4 or keys.shape[0] != 1 or keys.shape[2] != ids.shape[1]:
            return
        shared = int((segment < 0).sum())
        covered = (shared + torch.bincount(segment[segment >= 0], minlength=len(examples))).tolist()
        size = 2 * len(layers) * keys.shape[1] * keys.shape[3] * keys.element_size()  # bytes a token
        for row, n in wanted.items():
            if not 0 < n <= covered[row] or self.used + n * size > self.budget:
                continue
            where = index[row, :n].to(keys.device)
            self.kept[examples[row]] = [(k.index_select(2, where), v.index_select(2, where)) for k, v in layers]
            self.used += n * size


@contextlib.contextmanager
def recording(model) -> Iterator[dict[int, tuple[torch.Tensor, torch.Tensor]] | None]:
    """Inside the block, each attention call of ``model`` leaves its (keys, values) in the yielded dict, by layer
    (the last call's per layer). None, and nothing recorded, under eager attention (not a registered function)
    or where transformers keeps no local overrides. The model's attention function is wrapped for the block
    only (a local override of its name), and restored after."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    name = attention_implementation(model)
    local = getattr(ALL_ATTENTION_FUNCTIONS, "_local_mapping", None)  # where an override lives (transformers 5)
    if name == "eager" or name not in ALL_ATTENTION_FUNCTIONS or not isinstance(local, dict):
        yield None
        return
    had_local = name in local
    previous = local.get(name)
    original = ALL_ATTENTION_FUNCTIONS[name]
    record: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def recorded(module, query, key, value, attention_mask, **kwargs):
        record[module.layer_idx] = (key, value)
        return original(module, query, key, value, attention_mask, **kwargs)

    ALL_ATTENTION_FUNCTIONS[name] = recorded
    try:
        yield record
    finally:
        if had_local:
            ALL_ATTENTION_FUNCTIONS[name] = previous
        else:
            del ALL_ATTENTION_FUNCTIONS[name]
