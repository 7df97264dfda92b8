"""Several processes through ``torchrun``: the process group, who this process is, and the few collective
steps the run needs (summed counts, rank 0's decisions shared, per-rank states gathered).

``torchrun --nproc-per-node N -m tunesmith train ...`` starts N copies of the same command with ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK`` and the rendezvous (``MASTER_ADDR``/``MASTER_PORT``) in their environment; we
join the group with NCCL on CUDA and gloo on the CPU. One process (a plain ``tunesmith train``) is a world of
size 1 and never touches ``torch.distributed``: every function here is then a no-op, so single-process runs
are exactly what they were.

Errors: a user error found the same way on every rank (a bad config, data, a run dir in use) is decided by
rank 0 where it matters (``on_rank0``) and raised on every rank as a ``SharedError``, which only rank 0
prints. An error on one rank alone ends that process; torchrun then stops the others and the run ends with
that rank's message (PyTorch's elastic agent does this, we do not re-implement it).
"""

from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as tdist

from tunesmith.errors import TunesmithError


@dataclass(frozen=True)
class World:
    """This process's place among the run's processes."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Rank 0: the one process that logs, writes the run dir, checkpoints, evaluates and reports."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


SINGLE = World()
COLLECTIVE_TIMEOUT = datetime.timedelta(hours=2)


class SharedError(TunesmithError):
    """The same user error on every rank (raised after rank 0 decided it): printed once, by rank 0."""


def launched_by_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or ("RANK" in os.environ and "WORLD_SIZE" in os.environ)


def current() -> World:
    """The world this process runs in: the process group's once joined, else a single process."""
    if not (tdist.is_available() and tdist.is_initialized()):
        return SINGLE
    return World(rank=tdist.get_rank(), size=tdist.get_world_size(),
                 local_rank=int(os.environ.get("LOCAL_RANK", tdist.get_rank())))


@contextlib.contextmanager
def process_group(device: str | None):
    """Join torchrun's process group for the duration of the block (nothing under a plain process).

    ``device`` is the config's ``model.device``: NCCL and one GPU per process (``LOCAL_RANK``) when it is
    CUDA (or ``auto`` with CUDA present), gloo otherwise. A world of size 1 under torchrun stays a single
    process."""
    if not launched_by_torchrun() or int(os.environ.get("WORLD_SIZE", "1")) < 2:
        yield SINGLE
        return
    cuda = torch.cuda.is_available() and (device in (None, "auto") or str(device).startswith("cuda"))
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    # the other ranks wait in their next collective while rank 0 alone evaluates or checkpoints: allow that
    # longer than NCCL's default 10 minutes before a rank counts as hung
    tdist.init_process_group(backend="nccl" if cuda else "gloo", timeout=COLLECTIVE_TIMEOUT)
    try:
        yield current()
    finally:
        tdist.destroy_process_group()


def barrier() -> None:
    if current().distributed:
        tdist.barrier()


def on_rank0(decide, world: World | None = None):
    """``decide()`` on rank 0 only; its result (or its ``TunesmithError``) is handed to every rank, so every
    rank continues with rank 0's answer or stops with rank 0's message (``SharedError``)."""
    world = world or current()
    if not world.distributed:
        return decide()
    outcome = [None]
    if world.main:
        try:
            outcome = [("ok", decide())]
        except TunesmithError as exc:
            outcome = [("error", str(exc))]
    tdist.broadcast_object_list(outcome, src=0)
    kind, value = outcome[0]
    if kind == "error":
        raise SharedError(value)
    return value


def sum_counts(counts: dict[str, int], world: World) -> dict[str, int]:
    """``counts`` summed over every rank (each rank's share of one step's micro-batches): the denominators
    every rank divides its losses by. The keys are the same on every rank (one objective)."""
    if not world.distributed:
        return counts
    keys = sorted(counts)
    values = torch.tensor([float(counts[key]) for key in keys], dtype=torch.float64)
    tdist.all_reduce(values)
    return {key: int(round(value)) for key, value in zip(keys, values.tolist())}


def sum_floats(values: dict[str, float], world: World) -> dict[str, float]:
    """Logged values summed over ranks (each rank holds its micro-batches' shares of the step's means)."""
    if not world.distributed or not values:
        return values
    keys = sorted(values)
    tensor = torch.tensor([values[key] for key in keys], dtype=torch.float64)
    tdist.all_reduce(tensor)
    return dict(zip(keys, tensor.tolist()))


def gather_to_rank0(obj, world: World) -> list | None:
    """Every rank's ``obj`` (picklable) on rank 0, in rank order; None elsewhere."""
    if not world.distributed:
        return [obj]
    gathered = [None] * world.size if world.main else None
    tdist.gather_object(obj, gathered, dst=0)
    return gathered


def sum_gradients(_state, bucket):
    """DDP communication hook: SUM the ranks' gradients instead of averaging them. Each rank's loss is
    already divided by the step's count over all ranks, so the sum is the whole batch's gradient, exactly
    the single-process one."""
    future = tdist.all_reduce(bucket.buffer(), async_op=True).get_future()
    return future.then(lambda done: done.value()[0])
