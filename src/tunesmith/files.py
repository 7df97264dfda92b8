"""Files in a run dir, written whole or not at all and never through a link someone else planted.

A run dir is the user's, and anything in it may have been changed between runs. A temporary file is created
exclusively and without following a symbolic link (``O_EXCL | O_NOFOLLOW``), then renamed over its target (a
rename replaces a link, it does not write through it). ``check_links`` refuses a run dir holding a symbolic link
that leads outside it, before anything is written there.
"""

from __future__ import annotations

import os
from pathlib import Path

from tunesmith.errors import TunesmithError


def write_atomic(path: Path, data: str | bytes) -> None:
    """Write ``path`` whole or not at all: a fresh temp file beside it, then a rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)  # a leftover, or a planted link: unlink removes the link, not its target
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def check_links(run_dir: Path) -> None:
    """Refuse ``run_dir`` when a symbolic link inside it (at any depth) points outside it."""
    root = Path(run_dir).resolve()
    for folder, dirs, files in os.walk(run_dir):
        for name in dirs + files:
            entry = Path(folder) / name
            if not entry.is_symlink():
                continue
            target = Path(os.path.realpath(entry))
            if target != root and root not in target.parents:
                raise TunesmithError(f"run dir {run_dir} holds {entry}, a symbolic link to {target} outside it; "
                                     "tunesmith writes only inside a run dir: remove the link, then try again")
