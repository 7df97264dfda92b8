"""A run's training checkpoints: what one holds (trainable weights, optimizer, every rank's RNG, ``TrainState``,
the data and model fingerprints, the resolved config, a PEFT adapter for LoRA runs), written through
``train/checkpoint.py``'s atomic publish; and the checks before a run continues from one, then putting it back.

The functions take the run as ``RunRecord``: its typed config, its dir and its fingerprints (the engine's
``TrainInput`` is one).
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import torch
from safetensors.torch import load_file, save_file

from tunesmith.config import RunConfig, identity_keys
from tunesmith.config_run import parse_saved_config
from tunesmith.errors import TunesmithError
from tunesmith.peft import LoRAConfig, adapter_parameters, save_adapter
from tunesmith.train.checkpoint import (CONFIG_FILE, RNG_FILE, STATE_FILE, WEIGHTS_FILE, capture_rng,
                                        latest_checkpoint, load_checkpoint, restore_rng, save_checkpoint)
from tunesmith.train.dist import SINGLE, World, gather_to_rank0
from tunesmith.train.fsdp import gather_optimizer, gather_weights, load_optimizer, load_weights, sharded
from tunesmith.train.metrics import truncate_metrics
from tunesmith.train.state import TrainState

# Config keys that define what a checkpoint's weights and data positions mean (the fields marked IDENTITY in
# tunesmith.config): changing any of them between a checkpoint and its resume would silently train something else.
IDENTITY_KEYS = identity_keys()


class RunRecord(Protocol):
    """The run a checkpoint belongs to: what every checkpoint records of it, and what a resume compares."""

    config: RunConfig
    run_dir: Path
    fingerprints: dict
    """``{"data": ..., "model": ...}``: digests of the training examples and of the model's files."""


def _lookup(tree: dict, dotted: str):
    for key in dotted.split("."):
        tree = tree.get(key) if isinstance(tree, dict) else None
    return tree


def check_resumable(saved_yaml: str, saved_fingerprints: dict, run: RunRecord, *,
                    source: str = "the checkpoint's config", saved_processes: int = 1, processes: int = 1) -> None:
    """Refuse to resume when the model, adapter shape, data or global batch differ from the checkpoint's.

    ``saved_yaml`` (read from ``source``) is read by the config's own strict loader and validated, so a damaged
    file is named; a key it predates reads as its default. The global batch is micro_batch_size × grad_accum ×
    processes (``saved_processes`` wrote the checkpoint, ``processes`` resume it): the same batch split over
    another number of processes trains the same steps."""
    saved = parse_saved_config(saved_yaml, source).model_dump(mode="json")
    current = run.config.model_dump(mode="json")
    changes = [f"{key} changed from {_lookup(saved, key)!r} to {_lookup(current, key)!r}"
               for key in IDENTITY_KEYS if _lookup(saved, key) != _lookup(current, key)]
    batch = _global_batch_change(_lookup(saved, "train.grad_accum"), saved_processes,
                                 run.config.train.grad_accum, processes)
    if batch:
        changes.append(batch)
    for what, fingerprint in run.fingerprints.items():
        if saved_fingerprints.get(what) != fingerprint:
            name = run.config.data.train if what == "data" else run.config.model.source
            changes.append(f"the {what} ({name}) changed on disk since the checkpoint")
    if changes:
        raise TunesmithError(f"cannot resume {run.run_dir}: " + "; ".join(changes)
                             + ". Start a new run for different settings")


def _processes(n: int) -> str:
    return f"{n} process" + ("es" if n != 1 else "")


def _global_batch_change(saved_accum: int, saved_processes: int, accum: int, processes: int) -> str | None:
    """What changed in the micro-batches per step (grad_accum × processes), with the grad_accum that keeps
    them on this run's processes; None when they are the same."""
    before, now = saved_accum * saved_processes, accum * processes
    if before == now:
        return None
    keep = (f"on {_processes(processes)} set train.grad_accum={before // processes}" if before % processes == 0
            else f"no train.grad_accum gives {before} on {_processes(processes)}")
    return (f"the global batch changed: the checkpoint took {_processes(saved_processes)} × grad_accum "
            f"{saved_accum} = {before} micro-batches per step, this run {_processes(processes)} × grad_accum "
            f"{accum} = {now}; {keep}")


def _rank_rng_file(rank: int) -> str:
    """Where a checkpoint keeps rank ``rank``'s RNG states (rank 0's are the checkpoint's own ``rng.safetensors``)."""
    return f"rng-rank{rank}.safetensors"


def load_resume_state(run: RunRecord, model, optimizer, world: World = SINGLE) -> TrainState:
    """Check the newest checkpoint against the run (``check_resumable``, its state, its weights' names), then
    put its weights, optimizer state and RNG states back and cut ``metrics.jsonl`` to its step.

    Every rank reads the same checkpoint (weights and optimizer state are the same on every rank: DDP keeps
    them so; under FSDP2 rank 0's full tensors are handed to every rank's shards), each its own RNG states; a
    rank the checkpoint has none for (it was written by fewer processes) starts from rank 0's, reseeded by its
    rank. The checkpoint's number of processes (1 when it records none) enters the global-batch check."""
    path = latest_checkpoint(run.run_dir)
    if path is None:
        raise TunesmithError(f"{run.run_dir} has no complete checkpoint to resume from")
    ckpt = load_checkpoint(path)
    check_resumable(ckpt.config_yaml, ckpt.state.get("fingerprints", {}), run, source=str(path / CONFIG_FILE),
                    saved_processes=ckpt.state.get("processes", 1), processes=world.size)
    state = TrainState.from_json({k: v for k, v in ckpt.state.items() if k not in ("fingerprints", "processes")},
                                 source=str(path / STATE_FILE))
    _check_position(state, ckpt, run.config.train.grad_accum * world.size, path / STATE_FILE)
    expected = set(_trainable_names(run.config, model))
    if set(ckpt.weights) != expected:
        missing, unexpected = sorted(expected - set(ckpt.weights)), sorted(set(ckpt.weights) - expected)
        raise TunesmithError(f"checkpoint {path} does not match the model: missing {missing[:4]}, "
                             f"unexpected {unexpected[:4]}")
    if not sharded(model):
        shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
        wrong = [f"{name} {tuple(value.shape)} (the model's: {shapes[name]})" for name, value in ckpt.weights.items()
                 if tuple(value.shape) != shapes[name]]
        if wrong:
            raise TunesmithError(f"checkpoint file {path / WEIGHTS_FILE} holds weights of the wrong shape: "
                                 f"{'; '.join(wrong[:3])}; delete {path} to resume from the previous checkpoint")
    try:
        if sharded(model):
            load_weights(model, ckpt.weights, world)
            load_optimizer(model, optimizer, ckpt.optimizer, world)
        else:
            with torch.no_grad():
                params = dict(model.named_parameters())
                for name, value in ckpt.weights.items():
                    params[name].copy_(value)
            optimizer.load_state_dict(ckpt.optimizer)
    except (ValueError, KeyError, RuntimeError) as exc:  # torch's own checks of a state that does not fit
        raise TunesmithError(f"checkpoint {path}: its optimizer state does not fit this run's parameters "
                             f"({str(exc).splitlines()[0][:200]}); delete {path} to resume from the previous "
                             "checkpoint") from None
    try:
        restore_rng(ckpt.rng)
    except TunesmithError as exc:
        raise TunesmithError(f"checkpoint file {path / RNG_FILE}: {exc}") from None
    if world.rank:
        own = path / _rank_rng_file(world.rank)
        if own.is_file():
            restore_rng(load_file(own))
        else:
            torch.manual_seed(run.config.seed + world.rank)
    if world.main:
        truncate_metrics(run.run_dir, ckpt.step)
        print(f"resuming {run.run_dir} from {path.name}")
    return state


def _check_position(state: TrainState, ckpt, per_step: int, source: Path) -> None:
    """The saved position must be one this checkpoint can hold: its own step (the dir's name and marker), no
    more epochs than steps, and no more micro-batches into the epoch than the steps so far took (``per_step``:
    micro-batches a step takes over all processes, which ``check_resumable`` keeps from the checkpoint's run)."""
    problems = []
    if state.step != ckpt.step:
        problems.append(f"step {state.step}, but the checkpoint is of step {ckpt.step}")
    if state.epoch > state.step:
        problems.append(f"epoch {state.epoch} after {state.step} steps")
    if state.micro > state.step * per_step:
        problems.append(f"{state.micro} micro-batches into the epoch after {state.step} steps of {per_step}")
    if state.skipped > state.step or state.bad_streak > state.skipped:
        problems.append(f"{state.skipped} skipped steps ({state.bad_streak} in a row) of {state.step}")
    if problems:
        raise TunesmithError(f"{source} records an impossible position ({'; '.join(problems)}): the file was "
                             f"changed; delete {ckpt.path} to resume from the previous checkpoint")


def _trainable_weights(config: RunConfig, model) -> dict[str, torch.Tensor]:
    if config.method.uses_adapter:
        return {name: p.detach() for name, p in adapter_parameters(model).items()}
    return {name: p.detach() for name, p in model.named_parameters()}


def _trainable_names(config: RunConfig, model) -> list[str]:
    """The names of what a checkpoint's weights hold (tied weights once), without touching a sharded tensor."""
    if config.method.uses_adapter:
        return list(adapter_parameters(model))
    return [name for name, _ in model.named_parameters()]


def save_training_checkpoint(run: RunRecord, model, optimizer, state: TrainState,
                             world: World = SINGLE) -> Path | None:
    """Checkpoint ``state.step``: its ``state.json`` is the ``TrainState`` plus the data and model fingerprints
    (what ``check_resumable`` compares); LoRA runs also get a PEFT ``adapter/`` dir beside the weights.

    With several processes every rank calls it; rank 0 writes (its weights and optimizer state are every
    rank's: DDP keeps the replicas equal; FSDP2's shards are first gathered to rank 0 as full tensors, so the
    checkpoint has one process's format), with each other rank's RNG states beside its own
    (``rng-rankN.safetensors``) and the number of processes in ``state.json``; the others return None."""
    config = run.config
    if sharded(model):
        weights = gather_weights(model, _trainable_names(config, model))
        optimizer_state = gather_optimizer(model, optimizer)
    else:
        weights, optimizer_state = _trainable_weights(config, model), optimizer.state_dict()
    rngs = gather_to_rank0(capture_rng(), world)
    if not world.main:
        return None

    def write_adapter(tmp: Path) -> None:
        if config.method.uses_adapter:
            save_adapter(model, LoRAConfig.from_config(config.lora), tmp / "adapter",
                         base_model_name_or_path=config.model.source)
        for rank, rng in enumerate(rngs[1:], start=1):
            save_file(rng, str(tmp / _rank_rng_file(rank)))

    saved = {**state.to_json(), "fingerprints": run.fingerprints, "processes": world.size}
    return save_checkpoint(run.run_dir, state.step, weights=weights, optimizer=optimizer_state, state=saved,
                           rng=rngs[0], config_yaml=config.to_yaml(), keep=config.train.keep_checkpoints,
                           write_extra=write_adapter)
