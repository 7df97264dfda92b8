"""Many LoRA adapters over one base model, each row of a batch with its own (for generation; training uses
``LoRALinear``).

Each adapted layer holds its adapters stacked by slot: A as (S+1)×R×d_in, B as (S+1)×d_out×R and a scale per
slot, where R is the largest rank among the adapters and slot 0 means "no adapter" (zeros). A lower-rank
adapter is zero-padded to R, and a layer an adapter does not target keeps zeros in its slot: padded rows of A
and columns of B contribute exact zeros. For a batch whose row i uses slot kᵢ:

    yᵢ = W xᵢ + b + s_kᵢ · B_kᵢ (A_kᵢ xᵢ)

computed segment by segment when a batch holds few adapters (the idea of Punica's SGMV kernel): the rows of one
adapter go through its own A and B (views of the stack at the adapter's rank, nothing gathered or copied) and
their updates are added into those rows; with more adapters, as two batched products over every row's gathered
A and B (the idea of BGMV), one product instead of one per adapter. Nothing is merged, unmerged or switched per request: the rows' slots are an input of the
forward, a ``RowPlan`` that every layer reads and ``AdapterSlots.rows`` fills for a batch (no layer is changed). A row of slot 0 gets the base layer's output untouched.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from tunesmith.errors import TunesmithError
from tunesmith.peft.io import KEY_PREFIX, read_adapter
from tunesmith.peft.lora import LoRAConfig


# Up to this many adapters in a batch, each adapter's rows go through its own A and B (segments); beyond it one
# gathered product over every row costs less than a product per adapter (benchmarks/cpu_generate.py).
SEGMENTS_MAX = 2


@dataclass
class RowPlan:
    """Which rows of the batch being run use which adapter: ``groups`` (slot, row indices or None for every row)
    for the adapters present, ``slot_of_row`` the same row by row. Empty outside ``AdapterSlots.rows``."""

    groups: list[tuple[int, torch.Tensor | None]] = field(default_factory=list)
    slot_of_row: torch.Tensor | None = None


class MultiLoRALinear(nn.Module):
    """``base_layer`` plus, per row, the update of the adapter in that row's slot (see the module's maths)."""

    def __init__(self, base_layer: nn.Module, slots: int, rank: int, batch: RowPlan):
        super().__init__()
        self.base_layer = base_layer
        weight = base_layer.weight
        self.register_buffer("lora_A", torch.zeros(slots + 1, rank, base_layer.in_features, dtype=weight.dtype,
                                                   device=weight.device))
        self.register_buffer("lora_B", torch.zeros(slots + 1, base_layer.out_features, rank, dtype=weight.dtype,
                                                   device=weight.device))
        self.register_buffer("scaling", torch.zeros(slots + 1, dtype=weight.dtype, device=weight.device))
        self.ranks: dict[int, int] = {}  # slot → the rank of its adapter here (absent: not adapted here)
        self.batch = batch  # which rows use which slot: AdapterSlots' one plan, shared by every layer

    def set_slot(self, slot: int, a: torch.Tensor, b: torch.Tensor, scaling: float) -> None:
        r = a.shape[0]
        self.lora_A[slot].zero_()
        self.lora_B[slot].zero_()
        self.lora_A[slot, :r] = a
        self.lora_B[slot, :, :r] = b
        self.scaling[slot] = scaling
        self.ranks[slot] = r

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        groups, slot_of_row = self.batch.groups, self.batch.slot_of_row
        if not groups:
            return out
        rows = x.reshape(x.shape[0], -1, x.shape[-1])  # (batch, tokens, d_in): each row its own adapter
        if len(groups) > SEGMENTS_MAX:  # many adapters in the batch: one gathered product for all rows
            a, b = self.lora_A[slot_of_row], self.lora_B[slot_of_row]
            delta = torch.bmm(torch.bmm(rows.to(a.dtype), a.transpose(1, 2)), b.transpose(1, 2))
            delta = delta * self.scaling[slot_of_row][:, None, None]
            return out + delta.reshape(out.shape).to(out.dtype)
        update = out.reshape(x.shape[0], -1, out.shape[-1])
        for slot, index in groups:
            r = self.ranks.get(slot, 0)
            if r == 0:  # this adapter does not adapt this layer
                continue
            a, b = self.lora_A[slot, :r], self.lora_B[slot, :, :r]  # views: nothing is copied per step
            part = rows if index is None else rows.index_select(0, index)
            delta = ((part.to(a.dtype) @ a.T) @ b.T) * self.scaling[slot]
            update = update + delta.to(out.dtype) if index is None else update.index_add(0, index,
                                                                                         delta.to(out.dtype))
        return update.reshape(out.shape)


class AdapterSlots:
    """``adapters`` (name → PEFT adapter dir) loaded into ``model`` side by side, slot i+1 for the i-th.

    Every adapter is read and checked against the unwrapped base first (``read_adapter``: keys, shapes, the
    base it was trained on), then the union of their target layers is wrapped once. Adapters of different
    ranks and target modules share the model; ``rows`` picks one per row of a batch.
    """

    def __init__(self, model: nn.Module, adapters: dict[str, str | os.PathLike]):
        self.model = model
        self.slots = {name: slot for slot, name in enumerate(adapters, start=1)}
        loaded: dict[str, tuple[LoRAConfig, list[str], dict[str, torch.Tensor]]] = {
            name: read_adapter(model, path) for name, path in adapters.items()}
        targets = sorted({layer for _, names, _ in loaded.values() for layer in names})
        rank = max((config.rank_for(layer) for config, names, _ in loaded.values() for layer in names), default=1)
        self.plan = RowPlan()
        self.layers: dict[str, MultiLoRALinear] = {}
        for layer in targets:
            parent_name, _, child = layer.rpartition(".")
            parent = model.get_submodule(parent_name)
            self.layers[layer] = MultiLoRALinear(getattr(parent, child), len(adapters), rank, self.plan)
            setattr(parent, child, self.layers[layer])
        for name, (config, names, tensors) in loaded.items():
            for layer in names:
                r, alpha = config.rank_for(layer), config.alpha_for(layer)
                scaling = alpha / (r ** 0.5) if config.use_rslora else alpha / r
                self.layers[layer].set_slot(self.slots[name], tensors[f"{KEY_PREFIX}{layer}.lora_A.weight"],
                                            tensors[f"{KEY_PREFIX}{layer}.lora_B.weight"], scaling)

    def slot(self, name: str | None) -> int:
        """The slot of adapter ``name``; None is the base model (slot 0)."""
        if name is None:
            return 0
        if name not in self.slots:
            raise TunesmithError(f"no adapter named {name!r} is loaded; loaded: {', '.join(self.slots) or 'none'}")
        return self.slots[name]

    @contextmanager
    def rows(self, names: list[str | None]) -> Iterator[None]:
        """Within the block, row i of every batch the model runs uses adapter ``names[i]`` (None: the base)."""
        device = next(iter(self.layers.values())).lora_A.device if self.layers else None
        slots = [self.slot(name) for name in names]
        groups = [(slot, None if len(set(slots)) == 1 else
                   torch.tensor([i for i, s in enumerate(slots) if s == slot], dtype=torch.long, device=device))
                  for slot in sorted(set(slots) - {0})]
        self.plan.groups, self.plan.slot_of_row = groups, torch.tensor(slots, dtype=torch.long, device=device)
        try:
            yield
        finally:
            self.plan.groups, self.plan.slot_of_row = [], None
