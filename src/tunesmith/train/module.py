"""The training module: the model and its objective's loss as one ``nn.Module`` whose ``forward`` is the loss
of a micro-batch. It is the one object DDP wraps, or FSDP2 makes its root unit (``wrap_for``), so the wrapper's
forward — which decides whether this backward all-reduces, or gathers the sharded weights — sees every training
call.

The loss keeps its own fast paths (trained positions only, the layout chosen and installed once at setup,
``train/layout.py``); wrapping changes nothing single-process: ``wrap_for`` returns the module itself in a world of one.
"""

from __future__ import annotations

import contextlib

import torch

from tunesmith.train.dist import World, sum_gradients
from tunesmith.train.fsdp import shard
from tunesmith.train.decoder import decoder_layers
from tunesmith.train.objectives import MicroBatch


class TrainingModule(torch.nn.Module):
    """``forward(batch, micro, totals) -> (loss, stats)``: ``loss`` is this micro-batch's share of the step's
    loss (divided by ``totals``, the step's counts over every micro-batch and rank), ``stats`` its share of the
    logged metrics. ``loss`` is an objective loss of ``train/objectives.py``."""

    def __init__(self, model: torch.nn.Module, loss, layout: str = "auto"):
        super().__init__()
        self.model = model
        self.loss = loss
        self.layout = layout  # the layout installed at setup (``train/layout.py``); "auto": as the model is

    def forward(self, batch: dict, micro: MicroBatch, totals: dict[str, int]) -> tuple[torch.Tensor, dict]:
        return self.loss.loss(self.model, batch, micro, totals, layout=self.layout)

    def no_sync(self):
        """The engine's "accumulate without reducing" for a micro-batch that is not a step's last; reached only
        under FSDP2 (DDP has its own). FSDP2 reduce-scatters every micro-batch's gradients into the shards
        instead: skipping it would keep whole unsharded gradients on every process until the step's end."""
        return contextlib.nullcontext()


def wrap_for(module: TrainingModule, world: World, device: torch.device, *, parallel: str = "ddp",
             dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """``module`` as the loop calls it: itself in one process; under several, sharded with FSDP2
    (``parallel="fsdp"``, see ``train/fsdp.py``) or under DDP with summed gradients.

    DDP reduces only parameters that require gradients (LoRA: the adapters; full: every weight) and, at
    construction, copies rank 0's weights to every rank. Buffers (rotary tables) are equal on every rank by
    construction and are not re-broadcast each forward. FSDP2 shards each process's own copy of the weights,
    which every process loaded from the same source (or a resume overwrites with rank 0's)."""
    if not world.distributed:
        return module
    print(f"parallel: {parallel}, {world.size} processes")
    if parallel == "fsdp":
        return shard(module, decoder_layers(module.model), device, dtype)
    ids = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else None
    wrapped = torch.nn.parallel.DistributedDataParallel(module, device_ids=ids, broadcast_buffers=False)
    wrapped.register_comm_hook(None, sum_gradients)
    return wrapped
