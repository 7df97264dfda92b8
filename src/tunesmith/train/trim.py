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

Installed once as hooks (``install_last_block_trim``), so no module is ever swapped: the decoder call's
keyword argument ``READ`` (the flat positions to keep), which transformers hands to every block, switches the
trimming on for that call; without it the block runs whole.
"""

from __future__ import annotations

import torch
from torch import nn

READ = "tunesmith_read"


def _position_wise_parts(layer: nn.Module) -> list[nn.Module]:
    """The parts of ``layer`` that act on each position separately: the attention's query and output
    projections, and a dense MLP (``down_proj``; routed expert blocks are left alone)."""
    attention = getattr(layer, "self_attn", None)
    parts = [getattr(attention, name) for name in ("q_proj", "o_proj")
             if attention is not None and isinstance(getattr(attention, name, None), nn.Module)]
    if len(parts) < 2:
        parts = []
    mlp = getattr(layer, "mlp", None)
    if isinstance(mlp, nn.Module) and hasattr(mlp, "down_proj") and not hasattr(mlp, "experts"):
        parts.append(mlp)
    return parts


def install_last_block_trim(layer: nn.Module) -> bool:
    """Hooks on ``layer`` (the last decoder block) and its position-wise parts: inside a call of ``layer`` with
    ``READ=positions`` (flat positions along dim 1), each part computes at those positions only and is zero
    elsewhere (see the module docstring). Returns whether the block has such parts."""
    parts = _position_wise_parts(layer)
    if not parts:
        return False
    active: dict = {}  # the current call's positions and sequence length

    def enter(module, args, kwargs):
        positions = kwargs.get(READ)
        active.clear()
        if positions is not None and len(positions):
            active["positions"] = positions

    def leave(module, args, kwargs, output):
        active.clear()

    def pick(module, args):
        if "positions" in active:
            active["length"] = args[0].shape[1]
            return (args[0].index_select(1, active["positions"]), *args[1:])
        return None

    def place(module, args, output):
        if "positions" in active:
            return output.new_zeros(output.shape[0], active["length"], *output.shape[2:]).index_copy(
                1, active["positions"], output)
        return None

    layer.register_forward_pre_hook(enter, with_kwargs=True)
    layer.register_forward_hook(leave, with_kwargs=True, always_call=True)
    for part in parts:
        part.register_forward_pre_hook(pick)
        part.register_forward_hook(place)
    return True
