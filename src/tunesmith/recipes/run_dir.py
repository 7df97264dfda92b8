"""A run's dir: claimed (locked, marked, its config written) only once setup succeeded, held while the run
lives, cleared when a failed start left it, and written to whole-or-not-at-all.

Only a dir that tunesmith marked as a run (``MARKER``, written when it claimed the dir, holding the run's
identity) is ever cleared, and clearing removes only what a run writes (``RUN_FILES``): a dir that merely holds
a ``config.yaml`` is somebody else's.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import IO

from tunesmith.config import RunConfig
from tunesmith.errors import TunesmithError
from tunesmith.files import check_links, write_atomic
from tunesmith.train.checkpoint import latest_checkpoint, os_error_of
from tunesmith.train.dist import current, on_rank0

LOCK_FILE = ".tunesmith.lock"
MARKER = ".tunesmith-run"
# What a run writes at the top of its dir; their temporary forms start with "." and one of these names.
RUN_FILES = ("config.yaml", "metrics.jsonl", "tb", "checkpoints", "eval_before.json", "eval_after.json",
             "summary.json", "report.html", "adapter", "model", "reference_logps.safetensors")
# Files only a run that got far enough writes: a dir holding none of them (and no checkpoint) is a failed start.
RESULT_FILES = ("adapter", "model", "summary.json")
# Write failures that are the disk's, not the program's: the run stops with one line, its checkpoints intact.
DISK_ERRNOS = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EROFS}


def _lock_run_dir(run_dir: Path) -> IO:
    """An exclusive, non-blocking lock on ``run_dir``, held while the returned file stays open; the kernel drops
    it when the process dies, so a killed run never leaves the dir locked."""
    handle = open(run_dir / LOCK_FILE, "a")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise TunesmithError(f"run dir {run_dir} is in use by another tunesmith process (a run or a resume of it); "
                             "wait for that one to finish or stop it, then try again") from None
    return handle


def _failed_start(run_dir: Path) -> bool:
    """A run dir that tunesmith marked and whose run stopped before its first checkpoint: nothing in it can be
    resumed or is a result."""
    return ((run_dir / MARKER).is_file() and latest_checkpoint(run_dir) is None
            and not any((run_dir / name).exists() for name in RESULT_FILES))


def _written_by_a_run(name: str) -> bool:
    return name in RUN_FILES or any(name.startswith(f".{ours}") for ours in RUN_FILES)


def _clear_run_dir(run_dir: Path) -> None:
    """Remove what a run wrote; anything else in the dir (the user's own files) stays."""
    for entry in run_dir.iterdir():
        if _written_by_a_run(entry.name):
            shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()


def _mark(run_dir: Path, config: RunConfig) -> None:
    write_atomic(run_dir / MARKER, json.dumps({"run_id": uuid.uuid4().hex, "name": run_dir.name,
                                               "claimed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                               "method": config.method.name}) + "\n")


def claim_run_dir(config: RunConfig, resume: bool) -> tuple[Path, IO, bool]:
    """Lock the run dir and write its config.yaml; returns (dir, lock, whether to resume from a checkpoint).

    With several processes rank 0 claims the dir and holds the lock; the others take its answer (or stop with
    its error) and hold a lock on nothing."""
    world = current()
    if not world.distributed:
        return _claim(config, resume)
    claimed = []
    resumes = on_rank0(lambda: claimed.append(_claim(config, resume)) or claimed[0][2], world)
    return claimed[0] if world.main else (config.run_dir, open(os.devnull), resumes)


def _claim(config: RunConfig, resume: bool) -> tuple[Path, IO, bool]:
    """``claim_run_dir`` in one process.

    A dir left by a run that stopped before its first checkpoint is cleared and the run starts over, both on
    ``--resume`` and when a new run takes the same name: there is nothing in it to keep."""
    run_dir = config.run_dir
    exists_hint = f"continue it with --resume {run_dir}, or choose another name with name=NEW_NAME"
    if resume and not (run_dir / "config.yaml").is_file():
        raise TunesmithError(f"{run_dir} is not a run dir (no config.yaml); nothing to resume")
    if run_dir.exists() and not run_dir.is_dir():
        raise TunesmithError(f"run dir {run_dir} is a file; choose another name with name=NEW_NAME")
    others = run_dir.is_dir() and any(p.name != LOCK_FILE for p in run_dir.iterdir())
    if others and not (run_dir / MARKER).is_file() and not (resume and latest_checkpoint(run_dir) is not None):
        # not ours (no marker), and no complete checkpoint says otherwise: leave it as it is, no lock file either
        raise TunesmithError(f"run dir {run_dir} already exists and was not made by a tunesmith run (no {MARKER}); "
                             + ("nothing to resume" if resume else "choose another name with name=NEW_NAME"))
    if run_dir.is_dir():
        check_links(run_dir)
    created = not run_dir.exists()
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        lock = _lock_run_dir(run_dir)
    except OSError as exc:
        fix = "make it writable" if resume else "set output_dir to a writable directory"
        raise TunesmithError(f"cannot write in run dir {run_dir}: {exc.strerror}; {fix}") from None
    try:
        if resume and latest_checkpoint(run_dir) is not None:
            return run_dir, lock, True
        if any(p.name != LOCK_FILE for p in run_dir.iterdir()):
            if not _failed_start(run_dir):
                raise TunesmithError(f"{run_dir} holds a finished run without checkpoints (train.checkpoint_every "
                                     "was null); nothing to resume. Start a new run with name=NEW_NAME" if resume
                                     else f"run dir {run_dir} already exists; {exists_hint}")
            print(f"{run_dir} holds a run that stopped before its first checkpoint: starting it over from step 0"
                  + (" with its saved config" if resume else ""))
            _clear_run_dir(run_dir)
        _mark(run_dir, config)
        write_text(run_dir / "config.yaml", config.to_yaml())
    except BaseException:
        lock.close()
        if created:
            shutil.rmtree(run_dir, ignore_errors=True)
        raise
    return run_dir, lock, False


@contextlib.contextmanager
def hold_run_dir(setup):
    """The life of a run in its dir: the lock is released at the end, however the run ends, and a full or
    read-only disk stops it with one line that says its checkpoints are intact (a failed save removes its own
    partial files)."""
    try:
        yield
    except TunesmithError:
        raise
    except Exception as exc:
        error = os_error_of(exc)
        if error is None or error.errno not in DISK_ERRNOS:
            raise
        last = latest_checkpoint(setup.run_dir)
        intact = (f"the last checkpoint ({last.name}) is intact: free some space, then continue with "
                  f"tunesmith train --resume {setup.run_dir}" if last is not None else
                  f"no checkpoint was written yet: free some space, then start it over with tunesmith train "
                  f"--resume {setup.run_dir}")
        where = f" {error.filename}" if error.filename else f" into {setup.run_dir}"
        raise TunesmithError(f"cannot write{where}: {error.strerror} (the disk is full or read-only); "
                             f"{intact}") from None
    finally:
        setup.lock.close()


def write_text(path: Path, text: str) -> None:
    """Write ``path`` whole or not at all (``files.write_atomic``)."""
    write_atomic(path, text)


def write_json(path: Path, obj) -> None:
    write_text(path, json.dumps(obj, indent=1))
