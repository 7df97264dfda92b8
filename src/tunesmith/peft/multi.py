"""Many LoRA adapters over one base model, each row of a batch with its own (for generation; training uses
``LoRALinear``).

Each adapted layer holds its adapters stacked by slot: A as (S·R)×d_in and B transposed, (S·R)×d_out, slot s (1
to S) owning the block of R rows of each at (s−1)·R, where R is the largest rank among the adapters;
slot 0 means "no adapter" and has no block (its rows' mask is all zeros). B is stored already multiplied by the
adapter's scale. A lower-rank adapter is zero-padded to R, and a layer an adapter does not target keeps zeros in
its slot: padded rows contribute exact zeros. For a batch whose row i uses slot kᵢ:

    yᵢ = W xᵢ + b + B_kᵢ (A_kᵢ xᵢ)

computed segment by segment when a batch holds few adapters (the idea of Punica's SGMV kernel): the rows of one
adapter go through its own block of A and B (views, nothing gathered or copied) and their updates are added
into those rows; rows that sit together (the engine prefills joiners sorted by adapter) are a slice of the
batch, read and updated in place, others are gathered and scattered by index. With more adapters, every row
goes through the whole stack in two products, its own block kept by a 0/1 mask over the stack's columns (the
idea of BGMV, without gathering a matrix per row: each adapter's weights are read once per step, however many
rows use it), or over the columns of the slots from the first to the last present (``RowPlan.span``). Layers
that read the same input (q/k/v, gate/up) keep their stacks of A side by side in one tensor, so the whole-stack
path runs one A product (and one mask) for all of them: the first of them called with an input computes every
sibling's part, the siblings called with that same tensor take theirs (a sibling called with another input
computes its own: the grouping is a saving, never an assumption). Nothing is merged, unmerged or switched per
request: the rows' slots are an input of the forward, a ``RowPlan`` that every layer reads and
``AdapterSlots.rows`` fills for a batch (no layer is changed). A row of slot 0 gets the base layer's output
untouched. On the CPU (float32 stacks, a C compiler at hand), a batch of at most ``KERNEL_ROWS`` tokens per
adapter present (decode steps, a joiner's prefill) runs none of that: a kernel of our own
(``peft/row_kernel.py``) multiplies each row by its own block only, where PyTorch has no product that would (the
mask multiplies every row by every adapter, segments pay two calls per adapter per layer).
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
from tunesmith.peft import row_kernel
from tunesmith.peft.lora import LoRAConfig, linear_module_names, select_target_modules


# Up to this many adapters in a batch, each adapter's rows go through its own A and B (segments); beyond it the
# whole stack in two products costs less than a product per adapter (benchmarks/cpu_generate.py).
SEGMENTS_MAX = 2
# With the CPU row kernel, up to this many rows (tokens) per adapter present go through it (decode steps, a joiner's
# prefill); beyond, a product pair per adapter runs on both cores (a 12-joiner prefill over 8 adapters, 37 tokens
# each: the two ways within the run-to-run spread, 0.86-0.97 s; one joiner: 115 ms kernel, 120 ms segments).
KERNEL_ROWS = 32
# Layers of one module that read the same input in the model families served (a guess checked at every call).
SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


@dataclass
class RowPlan:
    """Which rows of the batch being run use which adapter: ``groups`` (slot, its rows: a slice of the batch when
    they sit side by side, else their indices) for the adapters present, or ``columns``, each row's 0/1 mask over the stacked
    adapters' columns, when the whole stack is used. Empty outside ``AdapterSlots.rows``."""

    groups: list[tuple[int, slice | torch.Tensor]] = field(default_factory=list)
    columns: torch.Tensor | None = None
    span: tuple[int, int] | None = None  # the slots (first, end) whose columns ``columns`` covers (None: all)
    slots: torch.Tensor | None = None  # each row's slot (int64), for the CPU row kernel (``row_kernel``)
    tiled: dict[int, torch.Tensor] = field(default_factory=dict)  # ``columns`` repeated for n layers side by side


class SharedInput:
    """Adapted layers that read one input tensor: their A stacks live side by side in ``storage`` (each
    layer's ``lora_A`` is a view of its rows), and the first of them called with an input computes the masked
    ``x Aᵀ`` of all of them; each sibling then takes its part once."""

    def __init__(self, layers: list["MultiLoRALinear"]):
        self.layers = layers
        self.storage = torch.cat([layer.lora_A for layer in layers])
        height = layers[0].lora_A.shape[0]
        for i, layer in enumerate(layers):
            layer.lora_A = self.storage[i * height:(i + 1) * height]
            layer.group = self
        self.input: torch.Tensor | None = None
        self.parts: list[torch.Tensor] = []
        self.pending: set[int] = set()

    def intact(self) -> bool:
        """Every layer's ``lora_A`` still a view of ``storage`` (a model moved or cast since has new tensors)."""
        height, start = self.layers[0].lora_A.shape[0], self.storage.data_ptr()
        step = height * self.storage.shape[1] * self.storage.element_size()
        return all(layer.lora_A.data_ptr() == start + i * step and layer.group is self
                   for i, layer in enumerate(self.layers))

    def hidden(self, layer: "MultiLoRALinear", rows: torch.Tensor, x: torch.Tensor, plan: RowPlan) -> torch.Tensor:
        index = self.layers.index(layer)
        if self.input is x and index in self.pending:  # a sibling computed it for this very input
            self.pending.discard(index)
            part = self.parts[index]
            if not self.pending:
                self.input, self.parts = None, []
            return part
        count = len(self.layers)
        if count not in plan.tiled:
            plan.tiled[count] = plan.columns.repeat(1, 1, count)
        hidden = (rows @ self.storage.T) * plan.tiled[count]
        self.parts = list(hidden.split(layer.lora_A.shape[0], dim=-1))
        self.input, self.pending = x, set(range(count)) - {index}
        return self.parts[index]


class MultiLoRALinear(nn.Module):
    """``base_layer`` plus, per row, the update of the adapter in that row's slot (see the module's maths)."""

    serves_as_linear = True  # adapters are read against it as against the linear layer it wraps

    def __init__(self, base_layer: nn.Module, slots: int, rank: int, batch: RowPlan, dtype: torch.dtype):
        super().__init__()
        self.base_layer = base_layer
        device = base_layer.weight.device
        self.rank = rank
        self.register_buffer("lora_A", torch.zeros(slots * rank, base_layer.in_features, dtype=dtype, device=device))
        self.register_buffer("lora_B", torch.zeros(slots * rank, base_layer.out_features, dtype=dtype, device=device))
        self.ranks: dict[int, int] = {}  # slot → the rank of its adapter here (absent: not adapted here)
        self.rank_of = torch.zeros(slots + 1, dtype=torch.long)  # the same, by slot, for the row kernel
        self.group: SharedInput | None = None  # siblings reading the same input (AdapterSlots groups them)
        self.batch = batch  # which rows use which slot: AdapterSlots' one plan, shared by every layer

    in_features = property(lambda self: self.base_layer.in_features)
    out_features = property(lambda self: self.base_layer.out_features)
    weight = property(lambda self: self.base_layer.weight)

    def resize(self, rank: int) -> None:
        """Room for adapters of rank up to ``rank`` (each slot's block grows; what it holds stays)."""
        slots = self.lora_A.shape[0] // self.rank
        grown_a = self.lora_A.new_zeros(slots * rank, self.lora_A.shape[1])
        grown_b = self.lora_B.new_zeros(slots * rank, self.lora_B.shape[1])
        grown_a.view(slots, rank, -1)[:, :self.rank] = self.lora_A.view(slots, self.rank, -1)
        grown_b.view(slots, rank, -1)[:, :self.rank] = self.lora_B.view(slots, self.rank, -1)
        self.lora_A, self.lora_B, self.rank, self.group = grown_a, grown_b, rank, None  # AdapterSlots regroups

    def block(self, first: int, end: int = 0) -> slice:
        """The stack's rows (of A and of Bᵀ) that slots ``first`` to ``end`` (exclusive; 0: ``first`` alone) own."""
        return slice((first - 1) * self.rank, ((end or first + 1) - 1) * self.rank)

    def clear_slot(self, slot: int) -> None:
        block = self.block(slot)
        self.lora_A[block].zero_()
        self.lora_B[block].zero_()
        self.ranks.pop(slot, None)
        self.rank_of[slot] = 0

    def set_slot(self, slot: int, a: torch.Tensor, b: torch.Tensor, scaling: float) -> None:
        r, block = a.shape[0], self.block(slot)
        start = block.start
        self.lora_A[block].zero_()
        self.lora_B[block].zero_()
        self.lora_A[start:start + r] = a
        self.lora_B[start:start + r] = (b.to(torch.float32) * scaling).T
        self.ranks[slot] = r
        self.rank_of[slot] = r

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        plan = self.batch
        flat = out.reshape(-1, out.shape[-1])
        if plan.slots is not None and len(flat) <= KERNEL_ROWS * len(plan.groups):  # CPU: each row its own block
            flat = flat.to(torch.float32).contiguous()  # in place when the output is float32
            slots = plan.slots if len(plan.slots) == len(flat) else plan.slots.repeat_interleave(len(flat) //
                                                                                                len(plan.slots))
            row_kernel.lora_rows(x.reshape(-1, x.shape[-1]).to(torch.float32).contiguous(), flat, slots,
                                 self.rank_of, self.lora_A, self.lora_B, self.rank)
            return flat.view(out.shape).to(out.dtype)
        if plan.columns is not None:  # the whole stack (or the span of the slots present), each row masked
            a, b = self.lora_A, self.lora_B
            if plan.span is not None:
                block = self.block(*plan.span)
                a, b = a[block], b[block]
            rows = x.reshape(x.shape[0], -1, x.shape[-1]).to(a.dtype)
            if self.group is not None and plan.span is None and self.group.intact():
                hidden = self.group.hidden(self, rows, x, plan)
            else:
                hidden = (rows @ a.T) * plan.columns
            flat = out.reshape(-1, out.shape[-1]).to(hidden.dtype)  # the base output is this call's own
            return flat.addmm_(hidden.reshape(-1, hidden.shape[-1]), b).reshape(out.shape).to(out.dtype)
        if not plan.groups:
            return out
        rows = x.reshape(x.shape[0], -1, x.shape[-1])  # (batch, tokens, d_in): each row its own adapter
        update = out.reshape(x.shape[0], -1, out.shape[-1])
        for slot, index in plan.groups:
            r = self.ranks.get(slot, 0)
            if r == 0:  # this adapter does not adapt this layer
                continue
            start = self.block(slot).start
            a, b = self.lora_A[start:start + r], self.lora_B[start:start + r]  # views: nothing is copied
            if isinstance(index, slice):  # rows side by side (every row, at most): views, in place
                update[index] += ((rows[index].to(a.dtype) @ a.T) @ b).to(out.dtype)
                continue
            delta = ((rows.index_select(0, index).to(a.dtype) @ a.T) @ b).to(out.dtype)
            update = update.index_add(0, index, delta)
        return update.reshape(out.shape)


class AdapterSlots:
    """Adapters loaded into ``model`` side by side, each in a slot (1 to ``capacity``); ``rows`` picks one per
    row of a batch.

    ``adapters`` (name → PEFT adapter dir) are loaded now; ``load`` and ``unload`` change them later (a server).
    Every adapter is read and checked against the base first (``read_adapter``: keys, shapes, the base it was
    trained on); the layers wrapped are those the first adapters target plus ``targets`` ("all-linear" for a
    server, whose later adapters may target any layer). Adapters of different ranks and target modules share
    the model: a later adapter of a higher rank grows every layer's stack (``version`` counts such changes,
    which recorded CUDA graphs depend on).
    """

    def __init__(self, model: nn.Module, adapters: dict[str, str | os.PathLike] | None = None, *,
                 capacity: int | None = None, targets: str | tuple[str, ...] | None = None):
        adapters = dict(adapters or {})
        self.model = model
        self.capacity = max(capacity or 0, len(adapters), 1)
        read = {name: read_adapter(model, path) for name, path in adapters.items()}
        wrapped = {layer for _, names, _ in read.values() for layer in names}
        if targets is not None:
            wrapped |= set(select_target_modules(model, targets, strict=False))
        self.rank = max((config.rank_for(layer) for config, names, _ in read.values() for layer in names),
                        default=1)
        self.plan = RowPlan()
        self.version = 0
        self.slots: dict[str, int] = {}
        self.layers: dict[str, MultiLoRALinear] = {}
        for layer in [name for name in linear_module_names(model) if name in wrapped]:
            parent_name, _, child = layer.rpartition(".")
            parent = model.get_submodule(parent_name)
            base = getattr(parent, child)
            weight = base.weight
            dtype = weight.dtype if weight.is_floating_point() else getattr(base, "compute_dtype", None) or \
                torch.float32  # a 4-bit base: its compute dtype
            self.layers[layer] = MultiLoRALinear(base, self.capacity, self.rank, self.plan, dtype)
            setattr(parent, child, self.layers[layer])
        self._group()
        for name, adapter in read.items():
            self.apply(name, adapter)

    def _group(self) -> None:
        """Put the layers that read one input (a block's q/k/v, its gate/up) into a ``SharedInput`` each."""
        for siblings in SIBLINGS:
            by_parent: dict[str, list[MultiLoRALinear]] = {}
            for name, layer in self.layers.items():
                parent, _, child = name.rpartition(".")
                if child in siblings:
                    by_parent.setdefault(parent, []).append(layer)
            for layers in by_parent.values():
                if len(layers) > 1 and len({layer.in_features for layer in layers}) == 1:
                    SharedInput(layers)

    def load(self, name: str, path: str | os.PathLike) -> None:
        """Read the adapter at ``path`` and put it in a free slot under ``name`` (replacing one of that name)."""
        self.apply(name, read_adapter(self.model, path))

    def apply(self, name: str, adapter: tuple[LoRAConfig, list[str], dict[str, torch.Tensor]]) -> None:
        """Put an adapter already read (``read_adapter``) in a slot under ``name``."""
        config, names, tensors = adapter
        outside = [layer for layer in names if layer not in self.layers]
        if outside:
            raise TunesmithError(f"adapter {name!r} adapts {', '.join(outside[:4])}, which this model's adapter "
                                 f"slots do not wrap (wrapped: {len(self.layers)} layers)")
        slot = self.slots.get(name) or next((s for s in range(1, self.capacity + 1)
                                             if s not in self.slots.values()), None)
        if slot is None:
            raise TunesmithError(f"all {self.capacity} adapter slots are in use; unload one first")
        rank = max((config.rank_for(layer) for layer in names), default=1)
        if rank > self.rank:
            for layer in self.layers.values():
                layer.resize(rank)
            self.rank = rank
            self._group()
            self.version += 1
        for layer in self.layers.values():
            layer.clear_slot(slot)
        for layer in names:
            r, alpha = config.rank_for(layer), config.alpha_for(layer)
            scaling = alpha / (r ** 0.5) if config.use_rslora else alpha / r
            self.layers[layer].set_slot(slot, tensors[f"{KEY_PREFIX}{layer}.lora_A.weight"],
                                        tensors[f"{KEY_PREFIX}{layer}.lora_B.weight"], scaling)
        self.slots[name] = slot

    def unload(self, name: str) -> None:
        slot = self.slots.pop(name)
        for layer in self.layers.values():
            layer.clear_slot(slot)

    def slot(self, name: str | None) -> int:
        """The slot of adapter ``name``; None is the base model (slot 0)."""
        if name is None:
            return 0
        if name not in self.slots:
            raise TunesmithError(f"no adapter named {name!r} is loaded; loaded: {', '.join(self.slots) or 'none'}")
        return self.slots[name]

    @contextmanager
    def rows(self, names: list[str | None], *, stacked: bool = True) -> Iterator[None]:
        """Within the block, row i of every batch the model runs uses adapter ``names[i]`` (None: the base).
        ``stacked=False`` never uses the whole stack, whatever the count (prefill: many tokens per row, where a
        product per adapter costs little and the whole stack's products much). With the CPU row kernel, the
        plan also carries each row's slot, and each layer runs the kernel when the batch has at most
        ``KERNEL_ROWS`` tokens per adapter present, segments otherwise."""
        slots = [self.slot(name) for name in names]
        present = sorted(set(slots) - {0})
        kernel = bool(present) and self.row_kernel()
        if stacked and len(present) > SEGMENTS_MAX and not kernel:  # the slots from the first to the last present
            span = (present[0], present[-1] + 1)
            with self.indexed(torch.tensor(slots, dtype=torch.long, device=self._device()),
                              span=None if span == (1, self.capacity + 1) else span):
                yield
            return
        self.plan.groups = [(slot, self._rows_of(slots, slot)) for slot in present]
        self.plan.slots = torch.tensor(slots, dtype=torch.long) if kernel else None
        try:
            yield
        finally:
            self.plan.groups, self.plan.slots = [], None

    @contextmanager
    def indexed(self, slots: torch.Tensor, span: tuple[int, int] | None = None) -> Iterator[None]:
        """Like ``rows``, with the rows' slots given as a device tensor and every row through the whole stack
        (what a recorded CUDA graph replays: no host value decides anything), or through the slots
        ``span`` = (first, end) only."""
        if not self.layers:
            yield
            return
        first, end = span or (1, self.capacity + 1)
        column_slots = torch.arange(first, end, device=slots.device).repeat_interleave(self.rank)
        dtype = next(iter(self.layers.values())).lora_A.dtype
        self.plan.columns = (slots[:, None] == column_slots[None, :]).to(dtype)[:, None, :]
        self.plan.span = span
        try:
            yield
        finally:
            self.plan.columns, self.plan.span, self.plan.tiled = None, None, {}

    def row_kernel(self) -> bool:
        """Whether decode steps run ``row_kernel`` (float32 stacks on the CPU, a compiler at hand)."""
        if not self.layers:
            return False
        layer = next(iter(self.layers.values()))
        return (layer.lora_A.device.type == "cpu" and layer.lora_A.dtype == torch.float32
                and self.rank <= row_kernel.MAX_RANK and row_kernel.available()[0])

    def _rows_of(self, slots: list[int], slot: int) -> slice | torch.Tensor:
        """The rows of ``slots`` that use ``slot``: a slice when they sit side by side (all of them, at most), else
        their indices."""
        rows = [i for i, s in enumerate(slots) if s == slot]
        if rows[-1] - rows[0] == len(rows) - 1:
            return slice(rows[0], rows[-1] + 1)
        return torch.tensor(rows, dtype=torch.long, device=self._device())

    def _device(self) -> torch.device | None:
        return next(iter(self.layers.values())).lora_A.device if self.layers else None
