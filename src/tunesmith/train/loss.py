"""The supervised loss at trained positions only, and the forward it runs on: the final hidden states of a
batch in the layout installed at setup (``train/layout.py``), autocast and gradient checkpointing. The loop that
calls it, with accumulation, clipping and the non-finite policy, is ``train/engine.py``;
``train/objectives.py`` turns a micro-batch into this loss, and the preference losses read the same states.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from tunesmith.generate import cache_argument
from tunesmith.templates import IGNORE_INDEX
from tunesmith.train.products import BACKWARD_WEIGHT
from tunesmith.train.decoder import attention_implementation, plain_causal_attention
from tunesmith.train.flat import FLAT_MAX_TOKENS, flat_layout, flat_mask, shared_prefix_length
from tunesmith.train.head import linear_cross_entropy
from tunesmith.train.layout import resolve
from tunesmith.train.rows import NAME as ROWS, Rows
from tunesmith.train.trim import READ
from tunesmith.train.varlen import varlen_plan, varlen_states


def trained_tokens(batch: dict) -> int:
    """Tokens that carry a loss: labels are shifted by one, so the first position never does."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def autocast_for(device: torch.device, dtype: torch.dtype, *, cache: bool = True):
    """bf16/fp16 autocast on CUDA; nothing on CPU, where training runs in fp32. ``cache=False``: no cast-weight
    cache (a CUDA graph cannot keep it between replays)."""
    if device.type == "cuda" and dtype in (torch.bfloat16, torch.float16):
        return torch.autocast("cuda", dtype=dtype, cache_enabled=cache)
    return contextlib.nullcontext()


def _plain_dynamic_cache(cache) -> bool:
    from transformers.cache_utils import DynamicCache, DynamicLayer

    return isinstance(cache, DynamicCache) and all(type(layer) is DynamicLayer for layer in cache.layers)


def _decoder_states(model, batch: dict, layout: str, host: dict | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor | None, int]:
    """Final hidden states of a padded batch in ``layout`` (``train.layout``: see its module): ``(states, read, p)``.

    * ``rows`` / ``flat`` — the shared prefix (see ``train.flat``) once, then each row's remaining
      real tokens up to its last trained target, as one row with a block mask (causal within a row, every row
      also sees the prefix) and positions continuing the prefix. No padding, no repeated prefix and no trailing
      untrained token is computed. The call carries the trained positions (``train.trim.READ``: an installed
      last block computes its position-wise parts there only, so elsewhere the final states are not
      meaningful) and, for ``rows``, the row plan (``train.rows``: installed row attention runs row by row
      instead of over the masked sequence). Up to ``FLAT_MAX_TOKENS`` tokens.
    * ``cache`` — the prefix runs once, its key/value cache is repeated across the batch and the suffixes
      run at full batch size (flash attention, long batches).
    * ``plain`` — the batch as given (packed rows, sliding-window or hybrid caches).

    Gradients reach the shared prefix from every row (gather / repeat backward sums them). For ``rows`` and
    ``flat``, ``states`` is the flat sequence's (N × d) and ``read`` holds where the trained positions' states
    sit in it (in row order); otherwise ``read`` is None and ``states`` (rows × width − p × d) covers positions
    ``p:`` of the batch (``p`` > 0 only for ``cache``). ``host``: the same batch on the CPU (the engine's
    micro-batch before it was moved), from which the layout is planned without waiting on the device.
    """
    decoder = model.get_decoder()
    layout = resolve(model, layout)
    host = batch if host is None else host
    inputs = {key: batch[key] for key in ("attention_mask", "position_ids") if key in batch}
    if layout == "varlen" and plain_causal_attention(model.config, host["input_ids"].shape[1]):
        plan = varlen_plan(host)
        if plan is not None:
            device = batch["input_ids"].device
            ids, positions, index, cu, longest = plan
            read = index[:, :-1][host["labels"][:, 1:] != IGNORE_INDEX].to(device, non_blocking=True)
            ids, positions = (t.to(device, non_blocking=True) for t in (ids, positions))
            extra = {READ: read} if not _checkpointing(decoder) else {}
            hidden = varlen_states(decoder, ids, positions, cu.to(device, torch.int32, non_blocking=True), longest,
                                   **extra)
            return hidden, read, 0
    if layout == "plain" or "position_ids" in batch:
        return decoder(input_ids=batch["input_ids"], use_cache=False, **inputs).last_hidden_state, None, 0
    # Everything that decides the layout is read from the host copy: on a GPU, reading the device batch would
    # wait for the previous micro-batch's kernels and leave the GPU idle while this one is planned.
    shared = shared_prefix_length(host)
    tokens = int(host.get("attention_mask", host["input_ids"]).bool().sum()) - shared * (len(host["input_ids"]) - 1)
    if (layout in ("rows", "flat") and tokens <= FLAT_MAX_TOKENS
            and plain_causal_attention(model.config, host["input_ids"].shape[1])):
        flat = flat_layout(host, shared)
        if flat is not None:
            device = batch["input_ids"].device
            ids, positions, segment, index = flat
            read = index[:, :-1][host["labels"][:, 1:] != IGNORE_INDEX]  # where the trained states sit
            extra = {}
            # checkpointed blocks recompute after this call: no per-call plans; the row plan is made from the host
            # copy of the segments, before they move
            if layout == "rows" and not _checkpointing(decoder):
                counts = torch.bincount(segment[segment >= 0], minlength=len(host["input_ids"])).tolist()
                extra[ROWS] = Rows.from_lengths(shared, counts, segment.device).to(device)
            ids, positions, segment, read = (t.to(device, non_blocking=True) for t in (ids, positions, segment, read))
            if not _checkpointing(decoder):
                extra[READ] = read
            implementation = "eager" if attention_implementation(model) == "eager" else "sdpa"
            mask = flat_mask(segment, implementation, model.dtype)
            hidden = decoder(input_ids=ids, position_ids=positions, attention_mask=mask, use_cache=False, **extra)
            return hidden.last_hidden_state[0], read, 0
    if shared and not _checkpointing(decoder):  # checkpointed blocks run without a cache
        prefix = decoder(input_ids=batch["input_ids"][:1, :shared], use_cache=True)
        cache = prefix["cache"] if "cache" in prefix else prefix.past_key_values
        if _plain_dynamic_cache(cache):  # sliding-window or hybrid caches: no sharing
            size, length = batch["input_ids"].shape
            cache.batch_repeat_interleave(size)
            positions = torch.arange(shared, length, device=batch["input_ids"].device).expand(size, -1)
            out = decoder(input_ids=batch["input_ids"][:, shared:], use_cache=True, position_ids=positions,
                          **{cache_argument(decoder): cache}, **inputs)
            return out.last_hidden_state, None, shared
    return decoder(input_ids=batch["input_ids"], use_cache=False, **inputs).last_hidden_state, None, 0


def trained_hidden(model, batch: dict, *, layout: str = "auto", host: dict | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(hidden, targets, keep)``: the final hidden state of every trained position (T × d, rows in order),
    the token each one predicts (T), and where they are (``keep``, rows × positions ``p + 1:``, on the host).

    The shift happens here: hidden state ``t`` predicts ``labels[t + 1]``. See ``_decoder_states`` for how
    the batch is laid out (and ``host``); the trained positions are picked straight from it in one gather, by
    indices computed on the host (a boolean mask on the device would wait for it).
    """
    host = batch if host is None else host
    states, read, start = _decoder_states(model, batch, layout, host)
    labels = host["labels"][:, start + 1:]
    keep = labels != IGNORE_INDEX
    targets = labels[keep].to(states.device, non_blocking=True)
    if read is None:
        width = states.shape[1] - 1
        read = (keep.nonzero() * torch.tensor([width, 1], device=keep.device)).sum(dim=1).to(states.device, non_blocking=True)
        states = states[:, :-1].reshape(-1, states.shape[-1])
    return states.index_select(0, read), targets, keep


def supervised_loss_sum(model, batch: dict, *, layout: str = "auto", host: dict | None = None) -> torch.Tensor:
    """Summed next-token cross-entropy over trained positions.

    Only the positions whose target is trained go through the output head, so prompt tokens never produce
    full-vocabulary logits (the head is a large share of a small model's compute and memory). Padding is not
    computed, and a prefix shared by every row (a common system prompt) is computed once (``trained_hidden``).
    """
    hidden, targets, _ = trained_hidden(model, batch, layout=layout, host=host)
    return head_loss(model, hidden, targets)


def head_loss(model, hidden: torch.Tensor, targets: torch.Tensor, scales: torch.Tensor | None = None, *,
              picks: torch.Tensor | None = None) -> torch.Tensor:
    """Summed cross-entropy of the model's output head over ``hidden`` (n × d) against ``targets`` (n), each
    position's term times its ``scales`` entry when given (``train/graphs.py``: 0 where nothing trains).
    ``picks`` (n, long), when given, receives each position's greedy token."""
    head = model.get_output_embeddings()
    cap = getattr(model.config, "final_logit_softcapping", None)
    if type(head) is torch.nn.Linear and head.bias is None:  # a plain head: fused, chunked
        return linear_cross_entropy(hidden, head.weight, targets, softcap=cap, scales=scales, picks=picks,
                                    backward_weight=getattr(head, BACKWARD_WEIGHT, None))
    logits = head(hidden).float()  # a wrapped or quantized head
    if cap:
        logits = cap * torch.tanh(logits / cap)
    if picks is not None:
        picks.copy_(logits.argmax(dim=-1))
    if scales is None:
        return F.cross_entropy(logits, targets, reduction="sum")
    return (F.cross_entropy(logits, targets, reduction="none") * scales).sum()


def enable_gradient_checkpointing(model, **options) -> None:
    """Recompute each decoder block in the backward pass (non-reentrant checkpointing), through transformers'
    own switch; ``options`` go to PyTorch's ``checkpoint`` (``train/graphs.py``'s ``BlockDraws`` hands its
    random-state handling there).

    The non-reentrant form tracks gradients through the recomputation itself, so a frozen (or 4-bit)
    base whose inputs carry no gradient still passes gradients to the adapters inside the blocks — the
    reentrant form needs ``requires_grad`` inputs for that, which QLoRA recipes patch in by hand.
    """
    options = {"use_reentrant": False, **options}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers ≥ 5.x name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=options)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=options)
    model.config.use_cache = False


def _checkpointing(decoder) -> bool:
    return bool(getattr(decoder, "gradient_checkpointing", False)) and decoder.training
