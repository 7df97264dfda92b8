"""Attention for the flat layout, row by row: each row's queries see the shared prefix and its own tokens.

The flat layout (``train.flat``, run by ``train.loss``) lays a batch out as one sequence — the shared prefix
once, then every row's remaining tokens — and a block mask keeps rows apart. Attention over that one sequence
with a mask does N² work for N flat tokens, most of it masked out. Here instead:

* the prefix's queries attend causally to the prefix;
* each row's queries attend to [prefix keys ; own keys], all of the prefix and causally on the row
  (rows · L · (P + L) for rows of length up to L),

all as one batch of small matrix products in ``_RowAttention``.

For the built-in task (P = 39, 8 rows of ~56) that is ~5× less attention work than the masked N² form. The
result is the same attention, so the loss and gradients match the plain forward (tested). It is used through
transformers' attention interface, installed once (``install_row_attention``); a call without a row plan
(generation, evaluation) falls back to SDPA.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from tunesmith.train.decoder import install_attention

NAME = "tunesmith_rows"


@dataclass
class Rows:
    """Where attention reads and writes in a flat sequence of ``prefix`` (P) shared tokens followed by each row's
    ``lengths[i]`` tokens in order (``from_lengths``).

    Attention runs over "query rows": the prefix's own tokens first (when P > 0), then each row's. Every query
    row has Q = max(P, longest row) query slots and K = P + longest row key slots:

        query row     query slots                   key slots                       may see
        prefix        0 .. P−1                      0 .. P−1, then padding           causal on the prefix
        row i         its own tokens                0 .. P−1, then its own tokens    the whole prefix; causal on
                                                                                     its own tokens

    Index tensors, built once per batch and used by every layer: ``queries`` and ``keys`` (flat positions per
    slot, 0 on padding), ``outputs`` (where the real query slots sit, in flat order) and ``allowed``
    (query rows × Q × K). A padded key slot is never allowed to a real query, and every query slot sees at
    least one key, so padding needs no special case.
    """

    queries: torch.Tensor
    keys: torch.Tensor
    outputs: torch.Tensor
    allowed: torch.Tensor
    biases: dict = field(default_factory=dict)  # additive masks by dtype, made on first use

    @classmethod
    def from_lengths(cls, prefix: int, lengths: list[int], device) -> Rows:
        width = max(lengths)
        query_width = max(prefix, width)
        own = torch.tensor(([prefix] if prefix else []) + list(lengths), device=device)
        starts = torch.cumsum(torch.cat([own.new_zeros(1), own[:-1]]), 0)
        slot = torch.arange(query_width, device=device)
        real = slot[None] < own[:, None]
        queries = torch.where(real, starts[:, None] + slot[None], 0)
        padded_own = queries[:, :width] if prefix == 0 else torch.cat([torch.zeros_like(queries[:1, :width]),
                                                                        queries[1:, :width]])
        keys = torch.cat([torch.arange(prefix, device=device).expand(len(own), prefix), padded_own], dim=1)
        key_slot = torch.arange(prefix + width, device=device)
        causal_own = (key_slot[None] - prefix) <= slot[:, None]  # (Q, K): own key j - P at or before query i
        allowed = ((key_slot[None] < prefix) | causal_own)[None].repeat(len(own), 1, 1)
        if prefix:  # the prefix's query row: causal over the prefix keys only
            allowed[0] = (key_slot[None] < prefix) & (key_slot[None] <= slot[:, None].clamp(max=prefix - 1))
        return cls(queries.reshape(-1), keys.reshape(-1), real.reshape(-1).nonzero().squeeze(1), allowed)

    def to(self, device) -> Rows:
        """The same plan on ``device`` (built on the host, where its sizes are read without a device wait)."""
        return Rows(*(t.to(device, non_blocking=True) for t in (self.queries, self.keys, self.outputs, self.allowed)))

    def bias(self, dtype: torch.dtype) -> torch.Tensor:
        if dtype not in self.biases:
            self.biases[dtype] = torch.zeros(self.allowed.shape, dtype=dtype, device=self.allowed.device
                                             ).masked_fill_(~self.allowed, float("-inf"))
        return self.biases[dtype]


class _RowAttention(torch.autograd.Function):
    """Softmax attention of every query row over its key slots (``Rows``), all rows in one batched product.

    Inputs q (H, N, D), k and v (K, N, D) over the flat sequence, with H = K·G (G query heads per key/value
    head, grouped as in grouped-query attention). Each key/value head's G query heads are stacked along the
    query axis, so a (query row, key/value head) pair is one matrix product and no key or value is repeated.
    With Q̃ = s·Q (the scale folded into the gathered queries):

        S = Q̃ Kᵀ + bias,   P = softmax(S),   O = P V
        ∂V = Pᵀ ∂O,   ∂P = ∂O Vᵀ,   ∂S = P ⊙ (∂P − rowsum(∂P ⊙ P)),   ∂Q = s · ∂S K,   ∂K = ∂Sᵀ Q̃

    Gathered keys are scattered back with ``index_add_``, which sums the shared prefix's gradient over rows.
    Returns O (H, N, D) in flat order. SDPA's CPU kernel, fed the same padded rows with a mask, spends ~1.5× as
    long on these short rows (measured); tests compare against SDPA over the block-masked sequence.
    """

    @staticmethod
    def forward(ctx, q, k, v, rows: Rows, scale: float):
        heads, n, dim = q.shape
        kv_heads = k.shape[0]
        group, count, width, span = heads // kv_heads, *rows.allowed.shape
        qs = (q.view(kv_heads, group, n, dim).index_select(2, rows.queries).view(kv_heads, group, count, width, dim)
              .transpose(1, 2).reshape(kv_heads * count, group * width, dim).mul_(scale))
        kr = k.index_select(1, rows.keys).view(kv_heads * count, span, dim)
        vr = v.index_select(1, rows.keys).view(kv_heads * count, span, dim)
        scores = torch.bmm(qs, kr.transpose(1, 2))
        scores.view(kv_heads, count, group, width, span).add_(rows.bias(scores.dtype)[None, :, None])
        probs = torch.softmax(scores, dim=-1)
        out = torch.bmm(probs, vr)
        ctx.save_for_backward(qs, kr, vr, probs)
        ctx.rows, ctx.scale, ctx.shape = rows, scale, (heads, n, dim, kv_heads, group)
        return (out.view(kv_heads, count, group, width, dim).transpose(1, 2).reshape(heads, count * width, dim)
                .index_select(1, rows.outputs))

    @staticmethod
    def backward(ctx, grad_out):
        qs, kr, vr, probs = ctx.saved_tensors
        rows, scale = ctx.rows, ctx.scale
        heads, n, dim, kv_heads, group = ctx.shape
        count, width, span = rows.allowed.shape
        padded = grad_out.new_zeros(heads, count * width, dim).index_copy_(1, rows.outputs, grad_out)
        go = (padded.view(kv_heads, group, count, width, dim).transpose(1, 2)
              .reshape(kv_heads * count, group * width, dim))
        grad_scores = torch.ops.aten._softmax_backward_data(torch.bmm(go, vr.transpose(1, 2)), probs, -1,
                                                             probs.dtype)
        grad_qs = torch.bmm(grad_scores, kr).mul_(scale).view(kv_heads, count, group, width, dim).transpose(1, 2)
        grad_q = grad_out.new_zeros(kv_heads, group, n, dim).index_add_(
            2, rows.queries, grad_qs.reshape(kv_heads, group, count * width, dim))
        grad_k = grad_out.new_zeros(kv_heads, n, dim).index_add_(
            1, rows.keys, torch.bmm(grad_scores.transpose(1, 2), qs).view(kv_heads, -1, dim))
        grad_v = grad_out.new_zeros(kv_heads, n, dim).index_add_(
            1, rows.keys, torch.bmm(probs.transpose(1, 2), go).view(kv_heads, -1, dim))
        return grad_q.view(heads, n, dim), grad_k, grad_v, None, None


def row_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The attention-interface function: (1, H, N, D) inputs, (1, N, H, D) output."""
    rows: Rows | None = kwargs.get(NAME)
    if rows is None or dropout:  # the flat layout's block mask is the attention_mask: SDPA applies it
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    return _RowAttention.apply(query[0], key[0], value[0], rows, scale).transpose(0, 1)[None], None


def _row_attention(module, query, key, value, attention_mask, **kwargs):
    return row_attention_forward(module, query, key, value, attention_mask, **kwargs)


def install_row_attention(model) -> None:
    """Run the model's attention through ``row_attention_forward`` from now on (``train.layout``'s ``rows``,
    installed once): calls that carry a row plan get row attention, every other call SDPA, with SDPA's masks."""
    install_attention(model, NAME, _row_attention)
