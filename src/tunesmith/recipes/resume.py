"""Run checkpoints: what a checkpoint of a run holds (trainable weights, optimizer, RNG, ``TrainState``, the
data and model fingerprints, the PEFT adapter), and the checks before a run continues from one."""

from __future__ import annotations

from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file, save_file

from tunesmith.config import identity_keys
from tunesmith.errors import TunesmithError
from tunesmith.peft import adapter_parameters, save_adapter
from tunesmith.recipes.setup import RunSetup
from tunesmith.train.checkpoint import (STATE_FILE, capture_rng, latest_checkpoint, load_checkpoint, restore_rng,
                                        save_checkpoint)
from tunesmith.train.dist import SINGLE, World, gather_to_rank0
from tunesmith.train.metrics import truncate_metrics
from tunesmith.train.state import TrainState

# Config keys that define what a checkpoint's weights and data positions mean (the fields marked IDENTITY in
# tunesmith.config): changing any of them between a checkpoint and its resume would silently train something else.
IDENTITY_KEYS = identity_keys()


def _lookup(tree: dict, dotted: str):
    for key in dotted.split("."):
        tree = tree.get(key) if isinstance(tree, dict) else None
    return tree


def check_resumable(saved_yaml: str, saved_fingerprints: dict, setup: RunSetup) -> None:
    """Refuse to resume when the model, adapter shape or data differ from the checkpoint's."""
    saved, current = yaml.safe_load(saved_yaml), setup.config.model_dump(mode="json")
    changes = [f"{key} changed from {_lookup(saved, key)!r} to {_lookup(current, key)!r}"
               for key in IDENTITY_KEYS if _lookup(saved, key) != _lookup(current, key)]
    for what, fingerprint in setup.fingerprints.items():
        if saved_fingerprints.get(what) != fingerprint:
            name = setup.config.data.train if what == "data" else setup.config.model.source
            changes.append(f"the {what} ({name}) changed on disk since the checkpoint")
    if changes:
        raise TunesmithError(f"cannot resume {setup.run_dir}: " + "; ".join(changes)
                             + ". Start a new run for different settings")


def _rank_rng_file(rank: int) -> str:
    """Where a checkpoint keeps rank ``rank``'s RNG states (rank 0's are the checkpoint's own ``rng.safetensors``)."""
    return f"rng-rank{rank}.safetensors"


def load_resume_state(setup: RunSetup, model, optimizer, world: World = SINGLE) -> TrainState:
    """Check the newest checkpoint against the run (``check_resumable``, its state, its weights' names), then
    put its weights, optimizer state and RNG states back and cut ``metrics.jsonl`` to its step.

    Every rank reads the same checkpoint (weights and optimizer state are the same on every rank: DDP keeps
    them so), each its own RNG states; a rank the checkpoint has none for (it was written by fewer processes)
    starts from rank 0's, reseeded by its rank."""
    path = latest_checkpoint(setup.run_dir)
    if path is None:
        raise TunesmithError(f"{setup.run_dir} has no complete checkpoint to resume from")
    ckpt = load_checkpoint(path)
    check_resumable(ckpt.config_yaml, ckpt.state.get("fingerprints", {}), setup)
    state = TrainState.from_json({k: v for k, v in ckpt.state.items() if k != "fingerprints"},
                                 source=str(path / STATE_FILE))
    expected = set(_trainable_weights(setup, model))
    if set(ckpt.weights) != expected:
        missing, unexpected = sorted(expected - set(ckpt.weights)), sorted(set(ckpt.weights) - expected)
        raise TunesmithError(f"checkpoint {path} does not match the model: missing {missing[:4]}, "
                             f"unexpected {unexpected[:4]}")
    with torch.no_grad():
        params = dict(model.named_parameters())
        for name, value in ckpt.weights.items():
            params[name].copy_(value)
    optimizer.load_state_dict(ckpt.optimizer)
    restore_rng(ckpt.rng)
    if world.rank:
        own = path / _rank_rng_file(world.rank)
        if own.is_file():
            restore_rng(load_file(own))
        else:
            torch.manual_seed(setup.config.seed + world.rank)
    if world.main:
        truncate_metrics(setup.run_dir, ckpt.step)
        print(f"resuming {setup.run_dir} from {path.name}")
    return state


def _trainable_weights(setup: RunSetup, model) -> dict[str, torch.Tensor]:
    if setup.config.method.uses_adapter:
        return {name: p.detach() for name, p in adapter_parameters(model).items()}
    return {name: p.detach() for name, p in model.named_parameters()}


def save_training_checkpoint(setup: RunSetup, model, optimizer, state: TrainState,
                             world: World = SINGLE) -> Path | None:
    """Checkpoint ``state.step``: its ``state.json`` is the ``TrainState`` plus the data and model fingerprints
    (what ``check_resumable`` compares); LoRA runs also get a PEFT ``adapter/`` dir beside the weights.

    With several processes every rank calls it; rank 0 writes (its weights and optimizer state are every
    rank's: DDP keeps the replicas equal), with each other rank's RNG states beside its own
    (``rng-rankN.safetensors``); the others return None."""
    rngs = gather_to_rank0(capture_rng(), world)
    if not world.main:
        return None

    def write_adapter(tmp: Path) -> None:
        if setup.config.method.uses_adapter:
            save_adapter(model, setup.lora_config, tmp / "adapter",
                         base_model_name_or_path=setup.config.model.source)
        for rank, rng in enumerate(rngs[1:], start=1):
            save_file(rng, str(tmp / _rank_rng_file(rank)))

    saved = {**state.to_json(), "fingerprints": setup.fingerprints}
    return save_checkpoint(setup.run_dir, state.step, weights=_trainable_weights(setup, model),
                           optimizer=optimizer.state_dict(), state=saved, rng=rngs[0],
                           config_yaml=setup.config.to_yaml(),
                           keep=setup.config.train.keep_checkpoints, write_extra=write_adapter)
