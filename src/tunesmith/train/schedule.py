"""Learning-rate schedule as a pure function of the optimizer step, so resuming needs no scheduler object."""

from __future__ import annotations

import math


def warmup_steps(total_steps: int, warmup_steps: int | None, warmup_ratio: float) -> int:
    return warmup_steps if warmup_steps is not None else int(math.ceil(warmup_ratio * total_steps))


def lr_at(step: int, *, base_lr: float, total_steps: int, warmup: int, kind: str = "cosine",
          min_lr_ratio: float = 0.0) -> float:
    """Learning rate for optimizer step ``step`` (0-based).

    Linear warmup from ``base_lr / warmup`` up to ``base_lr`` over ``warmup`` steps, then either
    constant or a cosine decay to ``min_lr_ratio * base_lr`` at the last step.
    """
    if step < warmup:
        return base_lr * (step + 1) / warmup
    if kind == "constant":
        return base_lr
    span = max(1, total_steps - warmup - 1)
    progress = min(1.0, (step - warmup) / span)
    floor = min_lr_ratio * base_lr
    return floor + (base_lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
