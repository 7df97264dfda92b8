"""Attention for the ``varlen`` layout: every example's real tokens back to back in one row, no padding, each
example attending causally to itself only, through PyTorch's variable-length flash kernel.

The padded layout computes every row to the batch's longest example, and a block mask over one long row
(``flat``) makes attention quadratic in the whole batch; here a batch of 8 chats is one sequence of their real
tokens, and the kernel reads where each example starts (``cu_seqlens``) instead of a mask:

    tokens      a0 a1 a2 b0 b1 c0 c1 c2 c3
    cu_seqlens  0        3     5           9      (query i of an example sees its keys 0..i)

Packed batches (``data.batching=pack``: several examples per row, positions restarting at 0) are laid out the
same way, one boundary wherever a position is 0. On an H200 it measured slower than the padded batch for the
tutorial's short chats (BENCHMARKS.md), so ``auto`` never picks it; ``train.layout=varlen`` does. Installed once (``install_varlen_attention``) like the row
layout: a call that carries ``PLAN`` (cumulative lengths, longest example) gets the kernel; any other call
(generation, evaluation) runs SDPA. ``torch.nn.attention.varlen`` is CUDA-only; on the CPU the same plan runs
one SDPA call per example, so the layout's plumbing is tested against the plain forward there.
"""

from __future__ import annotations

import functools
import inspect

import torch
import torch.nn.functional as F

from tunesmith.train.decoder import install_attention
from tunesmith.train.flat import flat_layout

NAME = "tunesmith_varlen"
PLAN = "tunesmith_cu_seqlens"


def available() -> bool:
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


def _kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, longest: int,
            scale: float) -> torch.Tensor:
    """Causal attention within each [cu[i], cu[i+1]) span of (N, H, D) queries over (N, H_kv, D) keys."""
    if q.device.type != "cuda":  # the reference path: one causal SDPA per example
        out = torch.empty_like(q)
        group = q.shape[1] // k.shape[1]
        bounds = cu.tolist()
        for start, end in zip(bounds[:-1], bounds[1:]):
            if start == end:  # an empty sequence (``train.graphs`` pads the plan with them)
                continue
            keys, values = (t[start:end].repeat_interleave(group, dim=1).transpose(0, 1) for t in (k, v))
            out[start:end] = F.scaled_dot_product_attention(q[start:end].transpose(0, 1), keys, values,
                                                            is_causal=True, scale=scale).transpose(0, 1)
        return out
    from torch.nn.attention.varlen import varlen_attn

    options = _options()
    extra = {"scale": scale}
    if "window_size" in options:
        extra["window_size"] = (-1, 0)  # causal
    else:
        extra["is_causal"] = True
    if q.shape[1] != k.shape[1]:
        if "enable_gqa" in options:
            extra["enable_gqa"] = True
        else:
            group = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    return varlen_attn(q, k, v, cu, cu, longest, longest, **extra)


@functools.cache
def _options() -> frozenset[str]:
    """The kernel's keyword arguments in this torch (2.11 has no ``enable_gqa``; later ones do)."""
    from torch.nn.attention.varlen import varlen_attn

    return frozenset(inspect.signature(varlen_attn).parameters)


def varlen_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The attention-interface function: (1, H, N, D) inputs, (1, N, H, D) output."""
    plan = kwargs.get(PLAN)
    if plan is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)
    if dropout:
        raise ValueError("the varlen layout has no attention dropout; train with train.layout=plain")
    cu, longest = plan
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    q, k, v = (t[0].transpose(0, 1).contiguous() for t in (query, key, value))
    return _kernel(q, k, v, cu, longest, scale)[None], None


def _varlen(module, query, key, value, attention_mask, **kwargs):
    return varlen_attention_forward(module, query, key, value, attention_mask, **kwargs)


def install_varlen_attention(model) -> None:
    """Run the model's attention through ``varlen_attention_forward`` from now on (installed once)."""
    install_attention(model, NAME, _varlen)


def varlen_states(decoder, input_ids: torch.Tensor, position_ids: torch.Tensor, cu_seqlens: torch.Tensor,
                  longest: int, **extra) -> torch.Tensor:
    """The decoder's final states (N × d) over one varlen row ((1, N) ids and positions), attention reading
    ``cu_seqlens`` (int32, on the device) through the installed kernel."""
    # the kernel reads the plan, not a mask: a prepared (here empty) 4-D mask stops transformers from building
    # an N × N one for the long row
    empty = torch.ones(1, 1, 1, 1, dtype=torch.bool, device=input_ids.device)
    return decoder(input_ids=input_ids, position_ids=position_ids, attention_mask=empty, use_cache=False,
                   **{PLAN: (cu_seqlens, longest)}, **extra).last_hidden_state[0]


def varlen_plan(host: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int] | None:
    """``(input_ids, position_ids, index, cu_seqlens, longest)`` for one row of every example's tokens, planned on
    the host: ``index[i, t]`` is where row ``i``'s token ``t`` sits in it. Padded batches keep each row's real
    tokens up to its last trained target; packed rows (``position_ids``) are laid end to end, a new example
    wherever a position is 0. None for left padding."""
    if "position_ids" in host:
        ids, positions = host["input_ids"], host["position_ids"]
        size, width = ids.shape
        starts = (positions.reshape(-1) == 0).nonzero().squeeze(1)
        if not len(starts) or starts[0] != 0:
            return None
        cu = torch.cat([starts, starts.new_tensor([size * width])])
        index = torch.arange(size * width, device=ids.device).view(size, width)
        return ids.reshape(1, -1), positions.reshape(1, -1), index, cu, int((cu[1:] - cu[:-1]).max())
    flat = flat_layout(host, 0)
    if flat is None:
        return None
    ids, positions, segment, index = flat
    counts = torch.bincount(segment, minlength=len(host["input_ids"]))
    cu = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
    return ids, positions, index, cu, int(counts.max())
