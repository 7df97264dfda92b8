"""Attention for the flat layout, row by row: each row's queries see the shared prefix and its own tokens.

The flat layout (``train.loop.decoder_hidden``) lays a batch out as one sequence — the shared prefix once,
then every row's remaining tokens — and a block mask keeps rows apart. Attention over that one sequence
with a mask does N² work for N flat tokens, most of it masked out. Here instead:

* the prefix's queries attend causally to the prefix (P² / 2);
* the rows' queries, gathered into a (rows × longest-row) batch, attend to [prefix keys ; own keys] with a
  mask that is all-true on the prefix and causal on the row (rows · L · (P + L)), in ``_RowAttention``.

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
    """The flat sequence's layout: ``prefix`` shared tokens, then each row's ``lengths[i]`` tokens in order.

    Index tensors (built once per batch, used by every layer), with R rows and L = the longest row:

    * ``queries`` (R·L): the flat position of row i's token t at i·L + t (0 where the row is shorter);
    * ``keys`` (R·(P + L)): per row, the prefix positions 0..P−1 then the row's own ``queries``;
    * ``outputs``: where the real (non-padding) query slots sit in R·L, in flat order;
    * ``bias`` (L × (P + L)): 0 where a query may look (all of the prefix; causal on its own row), −inf
      elsewhere. Padded key slots come after every real query of their row, so causality masks them too.
    """

    prefix: int
    lengths: list[int]
    queries: torch.Tensor
    keys: torch.Tensor
    outputs: torch.Tensor
    allowed: torch.Tensor

    @classmethod
    def from_lengths(cls, prefix: int, lengths: list[int], device) -> Rows:
        width = max(lengths)
        starts = torch.tensor([prefix + sum(lengths[:i]) for i in range(len(lengths))], device=device)
        slot = torch.arange(width, device=device)
        real = slot[None] < torch.tensor(lengths, device=device)[:, None]
        queries = torch.where(real, starts[:, None] + slot[None], 0)
        keys = torch.cat([torch.arange(prefix, device=device).expand(len(lengths), prefix), queries], dim=1)
        own = torch.ones(width, width, dtype=torch.bool, device=device).tril()
        allowed = torch.cat([torch.ones(width, prefix, dtype=torch.bool, device=device), own], dim=1)
        return cls(prefix, lengths, queries.reshape(-1), keys.reshape(-1), real.reshape(-1).nonzero().squeeze(1),
                   allowed)


class _RowAttention(torch.autograd.Function):
    """Softmax attention of every row's queries over [shared prefix ; own tokens], for all rows at once.

    Inputs q (H, N, D), k and v (K, N, D) over the flat sequence, with H = K·G (G query heads per key/value
    head, grouped as in grouped-query attention). Each key/value head's G query heads are stacked along the
    query axis, so a (row, key/value head) pair is one matrix product and no key or value is repeated:

        S = s · Q Kᵀ + bias,   P = softmax(S),   O = P V
        ∂V = Pᵀ ∂O,   ∂P = ∂O Vᵀ,   ∂S = P ⊙ (∂P − rowsum(∂P ⊙ P)),   ∂Q = s · ∂S K,   ∂K = s · ∂Sᵀ Q

    Gathered keys are scattered back with ``index_add_``, which sums the shared prefix's gradient over rows.
    Returns O (H, tokens of all rows in flat order, D). SDPA's CPU kernel, fed the same padded batch with
    a mask, spends about twice as long on these short rows (measured); tests compare against it.
    """

    @staticmethod
    def forward(ctx, q, k, v, rows: Rows, scale: float):
        heads, n, dim = q.shape
        kv_heads = k.shape[0]
        group, count, width = heads // kv_heads, len(rows.lengths), max(rows.lengths)
        span = rows.prefix + width
        qg = (q.view(kv_heads, group, n, dim).index_select(2, rows.queries).view(kv_heads, group, count, width, dim)
              .transpose(1, 2).reshape(kv_heads * count, group * width, dim))
        kr = k.index_select(1, rows.keys).view(kv_heads * count, span, dim)
        vr = v.index_select(1, rows.keys).view(kv_heads * count, span, dim)
        bias = torch.zeros(rows.allowed.shape, dtype=q.dtype, device=q.device).masked_fill_(~rows.allowed,
                                                                                               float("-inf"))
        scores = torch.baddbmm(bias.repeat(group, 1)[None], qg, kr.transpose(1, 2), alpha=scale)
        probs = torch.softmax(scores, dim=-1)
        out = torch.bmm(probs, vr)
        ctx.save_for_backward(qg, kr, vr, probs)
        ctx.rows, ctx.scale, ctx.shape = rows, scale, (heads, n, dim, kv_heads, group)
        return (out.view(kv_heads, count, group, width, dim).transpose(1, 2).reshape(heads, count * width, dim)
                .index_select(1, rows.outputs))

    @staticmethod
    def backward(ctx, grad_out):
        qg, kr, vr, probs = ctx.saved_tensors
        rows, scale = ctx.rows, ctx.scale
        heads, n, dim, kv_heads, group = ctx.shape
        count, width = len(rows.lengths), max(rows.lengths)
        padded = grad_out.new_zeros(heads, count * width, dim).index_copy_(1, rows.outputs, grad_out)
        go = (padded.view(kv_heads, group, count, width, dim).transpose(1, 2)
              .reshape(kv_heads * count, group * width, dim))
        grad_v = torch.bmm(probs.transpose(1, 2), go)
        grad_scores = torch.ops.aten._softmax_backward_data(torch.bmm(go, vr.transpose(1, 2)), probs, -1,
                                                             probs.dtype).mul_(scale)
        grad_qg = torch.bmm(grad_scores, kr).view(kv_heads, count, group, width, dim).transpose(1, 2)
        grad_q = grad_out.new_zeros(kv_heads, group, n, dim).index_add_(
            2, rows.queries, grad_qg.reshape(kv_heads, group, count * width, dim))
        grad_k = grad_out.new_zeros(kv_heads, n, dim).index_add_(
            1, rows.keys, torch.bmm(grad_scores.transpose(1, 2), qg).view(kv_heads, -1, dim))
        grad_v = grad_out.new_zeros(kv_heads, n, dim).index_add_(1, rows.keys, grad_v.view(kv_heads, -1, dim))
        return grad_q.view(heads, n, dim), grad_k, grad_v, None, None


def row_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The attention-interface function: (1, H, N, D) inputs, (1, N, H, D) output."""
    rows: Rows | None = kwargs.get(NAME)
    if rows is None or dropout:  # the flat layout's block mask is the attention_mask: SDPA applies it
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    p = rows.prefix
    parts = []
    if p:  # the prefix's own causal attention
        parts.append(F.scaled_dot_product_attention(query[:, :, :p], key[:, :, :p], value[:, :, :p], is_causal=True,
                                                    scale=scale, enable_gqa=True)[0])
    parts.append(_RowAttention.apply(query[0], key[0], value[0], rows, scale))
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
