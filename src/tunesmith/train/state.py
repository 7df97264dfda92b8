"""The training run's state: where the loop is and what it has counted. It IS the checkpoint's ``state.json``."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from tunesmith.errors import TunesmithError


@dataclass
class TrainState:
    """Everything the loop needs, besides weights, optimizer and RNG, to continue exactly where it stopped."""

    total_steps: int
    """Optimizer steps the run takes (the schedule's length), from the config; a resume may extend it."""
    step: int = 0
    """Optimizer steps taken."""
    epoch: int = 0
    """The epoch whose batch plan ``micro`` indexes (each epoch's plan is drawn from the seed and the epoch)."""
    micro: int = 0
    """Micro-batches of this epoch's plan already trained on."""
    bad_streak: int = 0
    """Non-finite steps in a row (``train.max_bad_steps`` stops the run)."""
    skipped: int = 0
    """Non-finite steps skipped in the whole run."""
    tokens: int = 0
    """Tokens of the training examples seen (prompt and answer, no padding), for every objective alike."""
    train_seconds: float = 0.0
    """Seconds spent in optimizer steps (not evaluation or checkpoints), summed over resumes."""

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict, *, source: str) -> TrainState:
        """Read a saved state back; ``source`` (the file) is named when a key is missing, unknown or mistyped."""
        names = {f.name: f for f in fields(cls)}
        unknown, missing = sorted(set(data) - set(names)), sorted(set(names) - set(data))
        if unknown or missing:
            raise TunesmithError(f"{source} is not a tunesmith train state (missing {missing}, unknown {unknown}); "
                                 "resume from a checkpoint written by this version, or start a new run")
        for name, value in data.items():
            # int counters: a bool or a float there means the file was edited or written by something else
            wanted = (int, float) if names[name].type == "float" else (int,)
            if isinstance(value, bool) or not isinstance(value, wanted) or value < 0:
                raise TunesmithError(f"{source}: {name} is {value!r}, not a non-negative "
                                     f"{'number' if wanted != (int,) else 'integer'}; the checkpoint is damaged")
        return cls(**data)
