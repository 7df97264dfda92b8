"""Attention for the flat layout, row by row: each row's queries see the shared prefix and its own tokens.

The flat layout (``train.loop.decoder_hidden``) lays a batch out as one sequence — the shared prefix once,
then every row's remaining tokens — and a block mask keeps rows apart. Attention over that one sequence
with a mask does N² work for N flat tokens, most of it masked out. Here instead:

* the prefix's queries attend causally to the prefix (P² / 2);
* the rows' queries, gathered into a (rows × longest-row) batch, attend to [prefix keys ; own keys] with a
  mask that is all-true on the prefix and causal on the row (rows · L · (P + L)).

For the built-in task (P = 39, 8 rows of ~56) that is ~5× less attention work than the masked N² form. The
result is the same attention, so the loss and gradients match the plain forward (tested). It is used through
transformers' attention interface: ``row_attention(model, rows)`` switches the model's attention to this
function for one forward; any call without ``rows`` (or another model) falls back to SDPA.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F

NAME = "tunesmith_rows"


@dataclass
class Rows:
    """The flat sequence's layout: ``prefix`` shared tokens, then each row's ``lengths[i]`` tokens in order."""

    prefix: int
    lengths: list[int]
    mask: torch.Tensor  # (rows, 1, L, prefix + L) bool: what each row's query may see (L = longest row)

    @classmethod
    def from_lengths(cls, prefix: int, lengths: list[int], device) -> Rows:
        width = max(lengths)
        own = torch.ones(width, width, dtype=torch.bool, device=device).tril()
        mask = torch.cat([torch.ones(width, prefix, dtype=torch.bool, device=device), own], dim=1)
        return cls(prefix, lengths, mask.expand(len(lengths), 1, width, prefix + width))

    def batch(self, states: torch.Tensor) -> torch.Tensor:
        """(heads, N, D) flat states -> (rows, heads, L, D), each row's tokens padded at the end."""
        width = max(self.lengths)
        pieces = states[:, self.prefix:].split(self.lengths, dim=1)
        return torch.stack([F.pad(piece, (0, 0, 0, width - piece.shape[1])) for piece in pieces])

    def unbatch(self, rows: torch.Tensor) -> torch.Tensor:
        """(rows, heads, L, D) -> (heads, tokens of all rows in order, D)."""
        return torch.cat([row[:, :length] for row, length in zip(rows, self.lengths)], dim=1)


def _attend(query, key, value, mask, scaling, causal):
    if key.shape[1] != query.shape[1]:  # grouped-query attention: share each key/value head
        repeat = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(repeat, dim=1), value.repeat_interleave(repeat, dim=1)
    return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, is_causal=causal, scale=scaling)


def row_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The attention-interface function: (1, H, N, D) inputs, (1, N, H, D) output."""
    rows: Rows | None = kwargs.get(NAME)
    if rows is None or dropout:  # the flat layout's block mask is the attention_mask: SDPA applies it
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)
    p = rows.prefix
    parts = []
    if p:
        parts.append(_attend(query[:, :, :p], key[:, :, :p], value[:, :, :p], None, scaling, True)[0])
    # (rows, H, L, D): each row's queries; keys = the prefix's (shared) then the row's own
    count = len(rows.lengths)
    k = torch.cat([key[0][None, :, :p].expand(count, -1, -1, -1), rows.batch(key[0])], dim=2)
    v = torch.cat([value[0][None, :, :p].expand(count, -1, -1, -1), rows.batch(value[0])], dim=2)
    parts.append(rows.unbatch(_attend(rows.batch(query[0]), k, v, rows.mask, scaling, False)))
    return torch.cat(parts, dim=1).transpose(0, 1)[None], None


@contextlib.contextmanager
def row_attention(model):
    """Compute the model's attention with ``row_attention_forward`` inside the block (SDPA models only)."""
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, row_attention_forward)
    configs = [c for c in {id(m.config): m.config for m in model.modules() if hasattr(m, "config")}.values()
               if getattr(c, "_attn_implementation_internal", None) == "sdpa"]
    for config in configs:
        config._attn_implementation_internal = NAME
    try:
        yield
    finally:
        for config in configs:
            config._attn_implementation_internal = "sdpa"
