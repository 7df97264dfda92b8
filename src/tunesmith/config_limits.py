"""The largest value any numeric config option takes, and how an option's annotation is read for it.

Every numeric option is range-checked where it enters, so 1e23 or 2**64 is one error naming the key, not a crash
deep inside (an allocation of r = 1e23, a seed torch cannot take).
"""

from __future__ import annotations

from typing import Annotated, Literal, get_args, get_origin

INT_MAX = 2**31 - 1
"""Whole-number options, seed excepted."""
SEED_MAX = 2**63 - 1
"""``seed`` and ``chat --seed``: torch takes it with a rank added."""
FLOAT_MAX = 1e9
"""Real-number options."""
MAX_NAME_BYTES = 255
"""The longest file name Linux, macOS and Windows file systems take."""


def leaf_types(annotation) -> set:
    """The plain types an annotation admits (``int | None`` → {int, NoneType}; Annotated and Literal unwrapped)."""
    origin = get_origin(annotation)
    if origin is Annotated:
        return leaf_types(get_args(annotation)[0])
    if origin is Literal:
        return {type(arg) for arg in get_args(annotation)}
    args = get_args(annotation)
    return set().union(*(leaf_types(arg) for arg in args)) if args else {annotation}
