"""What generation is made of: sampling settings and the sampler, the left-padded batch layout, streaming
detokenisation. The one generation loop is ``engine.py``'s ``Engine`` (``generate`` there for a fixed list).

Left padding. A batch of prompts of different lengths is padded on the left so every row's next token sits
in the last column::

    prompts        input_ids              attention_mask   position_ids
    [a b c d]      a b c d                1 1 1 1          0 1 2 3
    [e f]          P P e f                0 0 1 1          0 0 0 1

Pad columns are masked out as keys, and position ids count only real tokens, so a padded row sees exactly
what it would see alone (same RoPE angles, same attended keys). Each decode step appends a column of ones to
the mask and feeds position ``prompt_length + step`` per row.
"""

from __future__ import annotations

import inspect

from dataclasses import dataclass

import torch

from tunesmith.errors import TunesmithError

REPLACEMENT_CHAR = "\ufffd"


@dataclass
class SamplingConfig:
    max_new_tokens: int = 256
    """Most tokens generated per prompt, not counting the stop token."""
    temperature: float = 0.0
    """Softmax temperature; 0 means greedy (argmax, ties go to the lowest token id)."""
    top_p: float = 1.0
    """Nucleus sampling: sample from the smallest set of most likely tokens whose mass reaches ``top_p``."""
    top_k: int = 0
    """Sample only among the ``top_k`` most likely tokens (0: no limit); applied before ``top_p``."""
    seed: int = 0
    """Seed of the request's random stream (see ``engine.py`` for what is reproducible)."""

    def __post_init__(self):
        if self.max_new_tokens < 0:
            raise TunesmithError(f"sampling.max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise TunesmithError(f"sampling.temperature must be >= 0 (0 is greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise TunesmithError(f"sampling.top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise TunesmithError(f"sampling.top_k must be >= 0 (0: no limit), got {self.top_k}")


def cache_argument(model) -> str:
    """transformers renamed ``past_key_values`` to ``cache``; use whichever this version's forward takes."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def left_pad(prompts: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)``, both ``(batch, longest)``, pads on the left.

    >>> left_pad([[5, 6, 7], [8]], pad_id=0, device=torch.device("cpu"))
    (tensor([[5, 6, 7],
            [0, 0, 8]]), tensor([[1, 1, 1],
            [0, 0, 1]]))
    """
    longest = max(len(prompt) for prompt in prompts)
    input_ids = torch.full((len(prompts), longest), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), longest), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        input_ids[row, longest - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
        attention_mask[row, longest - len(prompt):] = 1
    return input_ids.to(device), attention_mask.to(device)


def next_tokens(logits: torch.Tensor, sampling: SamplingConfig, generators: list[torch.Generator]) -> torch.Tensor:
    """One token per row from ``(batch, vocab)`` logits: greedy, or temperature + top-k + nucleus sampling.

    With p = softmax(logits / T) sorted descending (stable, so ties keep the lower id first) and
    c_i = p_1 + ... + p_i, token i is kept while i <= top_k (when top_k > 0) and c_i - p_i < top_p: the
    smallest prefix whose mass reaches top_p, never empty since c_1 - p_1 = 0. Sampling is by inverse CDF over the kept tokens: with u ~ U[0, 1)
    from the row's generator, pick the first kept i with c_i > u · c_k (c_k the kept mass), so no
    renormalisation is needed.
    """
    if sampling.temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits / sampling.temperature, dim=-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True, stable=True)
    kept = torch.ones_like(sorted_probs, dtype=torch.bool)
    if sampling.top_p < 1:  # at top_p = 1 rounding in the cumsum could otherwise drop the far tail
        kept = (sorted_probs.cumsum(dim=-1) - sorted_probs) < sampling.top_p
    if sampling.top_k:
        kept[..., sampling.top_k:] = False
    cumulative = (sorted_probs * kept).cumsum(dim=-1)
    uniforms = torch.cat([torch.rand(1, generator=g, device=logits.device) for g in generators])
    thresholds = uniforms[:, None] * cumulative[:, -1:]
    # u · c_k can round up to c_k itself; the clamp then keeps the pick inside the kept set
    picks = torch.searchsorted(cumulative, thresholds, right=True)
    picks = torch.minimum(picks, kept.sum(dim=-1, keepdim=True) - 1)
    return order.gather(-1, picks).squeeze(-1)


class StreamDecoder:
    """Turn a stream of token ids into text increments, for one sequence.

    Byte-level BPE splits a multi-byte character (an emoji, ``é``) over several tokens, and decoding a
    token alone gives ``"\\ufffd"`` halves. So ``push`` decodes the whole running sequence and returns the
    part not yet emitted, holding back while the text ends in a replacement character (an unfinished
    character). ``flush`` returns whatever is still held, e.g. bytes that never formed a valid character.
    The concatenation of every ``push`` and the final ``flush`` equals ``decoder.text``, which is
    ``tokenizer.decode(all_ids, skip_special_tokens=..., clean_up_tokenization_spaces=False)``; clean-up is
    off because it rewrites earlier text (``" ."`` → ``"."``) that a stream has already sent. Each push
    re-decodes everything, O(n) per token, which is fine at chat lengths.

    Streaming a batch, one decoder per row::

        decoders = [StreamDecoder(tokenizer) for _ in prompts]
        generate(model, prompts, ..., on_token=lambda row, t: print(row, decoders[row].push(t)))  # engine.py
    """

    def __init__(self, tokenizer, *, skip_special_tokens: bool = False):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.token_ids: list[int] = []
        self.emitted = ""

    @property
    def text(self) -> str:
        return self.tokenizer.decode(self.token_ids, skip_special_tokens=self.skip_special_tokens,
                                     clean_up_tokenization_spaces=False)

    def push(self, token_id: int) -> str:
        self.token_ids.append(token_id)
        text = self.text
        if text.endswith(REPLACEMENT_CHAR):
            return ""
        return self._emit(text)

    def flush(self) -> str:
        return self._emit(self.text)

    def _emit(self, text: str) -> str:
        increment = text[len(self.emitted):]
        self.emitted = text
        return increment


class TextStream(StreamDecoder):
    """A ``StreamDecoder`` that ends at the first of ``stops`` (strings): ``push`` never returns a piece of text
    that might be the start of a stop string (it is held until the text shows it is not), and once a stop
    string appears, ``stopped`` is set and the text ends just before it. ``emitted`` is the answer's text."""

    def __init__(self, tokenizer, *, stops: tuple[str, ...] = (), skip_special_tokens: bool = False):
        super().__init__(tokenizer, skip_special_tokens=skip_special_tokens)
        self.stops = tuple(stops)
        self.stopped = False

    def push(self, token_id: int) -> str:
        if self.stopped:
            return ""
        self.token_ids.append(token_id)
        text = self.text
        hits = [i for i in (text.find(stop, max(0, len(self.emitted) - len(stop) + 1)) for stop in self.stops)
                if i >= 0]
        if hits:
            self.stopped = True
            return self._emit(text[:min(hits)])
        if text.endswith(REPLACEMENT_CHAR):
            return ""
        return self._emit(text[:len(text) - self._held(text)])

    def flush(self) -> str:
        return "" if self.stopped else self._emit(self.text)

    def _held(self, text: str) -> int:
        """The length of the longest end of ``text`` that begins a stop string (not yet a whole one)."""
        longest = 0
        for stop in self.stops:
            for size in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:size]):
                    longest = size
                    break
        return longest
