"""The last decoder block, computed only at the positions whose output is read.

After the last block only the trained positions' hidden states are used: they alone go through the output
head. Inside a block, positions mix in one place only — attention, through keys and values. The query
projection, the attention output projection and the MLP each act on every position separately, so in the
last block they can skip all other positions:

    last block        keys, values       queries, output projection, MLP
    trained position  computed           computed
    other position    computed           skipped (zero)

Keys and values stay everywhere because the kept queries attend to every earlier position. A skipped
position's query is zero (its attention output is an average of values that nothing reads) and its
projection and MLP outputs are zero, so the block's output there is meaningless and never read; the kept
positions' outputs and all gradients are those of the full block (tested). For the built-in task about
half the positions are skipped: ~1% of a LoRA step's work on the embedded model.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn


class _AtPositions(nn.Module):
    """``inner`` applied at ``positions`` (along dim 1) only; zero elsewhere."""

    def __init__(self, inner: nn.Module, positions: torch.Tensor):
        super().__init__()
        self.inner = inner
        self.positions = positions

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        picked = self.inner(x.index_select(1, self.positions))
        return picked.new_zeros(*x.shape[:-1], picked.shape[-1]).index_copy(1, self.positions, picked)


def _position_wise_parts(layer: nn.Module) -> list[tuple[nn.Module, str]]:
    """(parent, attribute) of the parts of ``layer`` that act on each position separately: the attention's
    query and output projections, and a dense MLP (``down_proj``; routed expert blocks are left alone)."""
    attention = getattr(layer, "self_attn", None)
    parts = [(attention, name) for name in ("q_proj", "o_proj")
             if attention is not None and isinstance(getattr(attention, name, None), nn.Module)]
    if len(parts) < 2:
        parts = []
    mlp = getattr(layer, "mlp", None)
    if isinstance(mlp, nn.Module) and hasattr(mlp, "down_proj") and not hasattr(mlp, "experts"):
        parts.append((layer, "mlp"))
    return parts


@contextlib.contextmanager
def last_block_at(layer: nn.Module, positions: torch.Tensor):
    """Inside the block, ``layer`` (the last decoder block) computes its position-wise parts at the flat
    ``positions`` only (see the module docstring)."""
    parts = _position_wise_parts(layer) if len(positions) else []
    originals = [getattr(parent, name) for parent, name in parts]
    for (parent, name), module in zip(parts, originals):
        setattr(parent, name, _AtPositions(module, positions))
    try:
        yield
    finally:
        for (parent, name), module in zip(parts, originals):
            setattr(parent, name, module)
