"""The loss mask made visible: a rendered example's text with the trained tokens highlighted."""

from __future__ import annotations

from tunesmith.templates import Rendered


def mask_view(rendered: Rendered, *, color: bool = True) -> str:
    """The rendered text with trained tokens highlighted: green in a terminal, ``[[...]]`` in plain text.

    Consecutive tokens with the same flag form one run, so the output reads like a diff of the loss.
    """
    runs: list[tuple[bool, str]] = []
    cursor = 0
    for (start, end), keep in zip(rendered.offsets, rendered.trained):
        # byte-level tokens can split one character: they share its offsets, and it is shown once
        piece = rendered.text[cursor:end]
        cursor = max(cursor, end)
        if runs and runs[-1][0] == keep:
            runs[-1] = (keep, runs[-1][1] + piece)
        else:
            runs.append((keep, piece))
    if color:
        on, off = "\x1b[30;42m", "\x1b[0m"
        body = "".join(f"{on}{text}{off}" if keep else f"\x1b[2m{text}{off}" for keep, text in runs)
    else:
        body = "".join(f"[[{text}]]" if keep else text for keep, text in runs)
    spans = sum(1 for keep, _ in runs if keep)
    summary = f"{rendered.num_trained} of {len(rendered.input_ids)} tokens trained in {spans} span(s)"
    return f"{body}\n-- {summary}"
