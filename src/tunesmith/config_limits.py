"""The largest value any numeric config option takes, and how an option's annotation is read for it.

Every numeric option is range-checked where it enters, so 1e23 or 2**64 is one error naming the key, not a crash
deep inside (an allocation of r = 1e23, a seed torch cannot take).
"""

from __future__ import annotations

import math
from typing import Annotated, Literal, get_args, get_origin

INT_MAX = 2**31 - 1
"""Whole-number options, seed excepted."""
SEED_MAX = 2**63 - 1
"""``seed`` and ``chat --seed``: torch takes it with a rank added."""
FLOAT_MAX = 1e9
"""Real-number options."""
MAX_NAME_BYTES = 255
"""The longest file name Linux, macOS and Windows file systems take."""
GIB, MIB = 2 ** 30, 2 ** 20


def leaf_types(annotation) -> set:
    """The plain types an annotation admits (``int | None`` → {int, NoneType}; Annotated and Literal unwrapped)."""
    origin = get_origin(annotation)
    if origin is Annotated:
        return leaf_types(get_args(annotation)[0])
    if origin is Literal:
        return {type(arg) for arg in get_args(annotation)}
    args = get_args(annotation)
    return set().union(*(leaf_types(arg) for arg in args)) if args else {annotation}


def parse_memory(text: str) -> int:
    """``"80GiB"``, ``"80GB"``, ``"512MiB"``, ``"1.5TiB"`` or a byte count → bytes."""
    units = {"": 1, "b": 1, "kib": 2 ** 10, "mib": MIB, "gib": GIB, "tib": 2 ** 40, "kb": 10 ** 3, "mb": 10 ** 6,
             "gb": 10 ** 9, "tb": 10 ** 12}
    number = text.strip().rstrip("BbIiKkMmGgTt")
    unit = text.strip()[len(number):].lower()
    try:
        value = float(number)
    except ValueError:
        value = -1.0
    if unit not in units or not value > 0 or not math.isfinite(value):
        raise ValueError(f"{text!r} is not a memory size; write it like 80GiB, 24GB or 512MiB")
    return int(value * units[unit])
