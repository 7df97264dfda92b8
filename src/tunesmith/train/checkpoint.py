"""Checkpoints of a training run, published atomically so a crash never leaves a half-written one behind.

Layout (ARCHITECTURE.md section 4)::

    RUN/checkpoints/
      step-40/                 one dir per optimizer step N, ordered by N as a number (not zero-padded)
        weights.safetensors    trainable weights: the LoRA adapter or the full model
        optimizer.pt           optimizer.state_dict(), read back with torch.load(weights_only=True)
        state.json             the run's TrainState (train/state.py) and whatever the caller adds
        rng.safetensors        RNG states: torch CPU, every CUDA device, Python ``random``, NumPy
        config.yaml            the resolved config of the run
        ...                    whatever ``write_extra`` adds (e.g. a PEFT adapter dir)
        COMPLETE               written last: JSON list of every other file with its size and sha256
      step-60/
      .tmp-step-80-1a2b3c4d/   a save in progress, or one that crashed: never read, removed by the next save

A save writes everything into a ``.tmp-*`` dir, fsyncs it, writes ``COMPLETE``, then renames the dir to
``step-N``. A rename within one directory is atomic, so ``step-N`` is either absent or whole. Re-saving a step
that exists moves the old dir aside to ``.old-step-N`` first; if the process dies before the new one lands,
``.old-step-N`` still counts as step N (``latest_checkpoint`` returns it and the next save moves it back).
Loading checks every file against the marker, so a checkpoint damaged after the fact (disk full, a copy cut
short) fails with the file's name instead of a deserialisation traceback.

One process (rank 0) saves into a run dir at a time: a save removes every ``.tmp-*`` dir it finds.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from tunesmith.errors import TunesmithError

COMPLETE = "COMPLETE"
WEIGHTS_FILE = "weights.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
STATE_FILE = "state.json"
RNG_FILE = "rng.safetensors"
CONFIG_FILE = "config.yaml"
REQUIRED_FILES = (WEIGHTS_FILE, OPTIMIZER_FILE, STATE_FILE, RNG_FILE, CONFIG_FILE)
RNG_KEYS = ("torch_cpu", "python", "python_gauss", "numpy", "numpy_pos", "numpy_gauss")

_STEP_DIR = re.compile(r"step-(\d+)")
_RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)")
_TMP_PREFIX = ".tmp-"
_OLD_PREFIX = ".old-"
_CHUNK_BYTES = 1 << 20


@dataclass
class Checkpoint:
    """One checkpoint read back from disk, every file already checked against the ``COMPLETE`` marker."""

    path: Path
    """The checkpoint dir, normally ``RUN/checkpoints/step-N``."""
    step: int
    """The optimizer step the checkpoint was taken after."""
    weights: dict[str, torch.Tensor]
    """Trainable weights (LoRA adapter or full model), on the CPU."""
    optimizer: dict
    """``optimizer.state_dict()``, tensors on the CPU; ``Optimizer.load_state_dict`` moves them to the params."""
    state: dict
    """Trainer state as saved: a run's ``TrainState.to_json()`` plus its fingerprints (``TrainState.from_json``
    checks it)."""
    rng: dict[str, torch.Tensor]
    """RNG states as returned by ``capture_rng``; hand them to ``restore_rng``."""
    config_yaml: str
    """The resolved config of the run, as YAML text."""


def save_checkpoint(run_dir: str | os.PathLike, step: int, *, weights: Mapping[str, torch.Tensor],
                    optimizer: dict, state: dict, rng: Mapping[str, torch.Tensor], config_yaml: str,
                    keep: int = 2, write_extra: Callable[[Path], None] | None = None) -> Path:
    """Publish checkpoint ``step`` of the run in ``run_dir`` atomically, keep the newest ``keep``; return its dir.

    ``write_extra(tmp_dir)`` may add files or dirs (e.g. a PEFT adapter) before the marker is written; they are
    checksummed like the rest. Older checkpoints are deleted only after the new one is in place: the newest
    ``keep - 1`` by step number survive beside it.
    """
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be a non-negative int, got {step!r}")
    if keep < 1:
        raise TunesmithError(f"keep must be at least 1 checkpoint (got {keep}); the newest is needed to resume")
    state_text = json.dumps(state, indent=2)  # fails on a value JSON can't hold, before anything touches the disk
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    _clean_interrupted_saves(root)

    tmp = root / f"{_TMP_PREFIX}step-{step}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        save_file(_for_safetensors(weights), tmp / WEIGHTS_FILE, metadata={"format": "pt"})
        with open(tmp / OPTIMIZER_FILE, "wb") as f:  # through Python, so a failed write keeps its OSError
            torch.save(optimizer, f)
        (tmp / STATE_FILE).write_text(state_text + "\n", encoding="utf-8")
        save_file(_for_safetensors(rng), tmp / RNG_FILE, metadata={"format": "pt"})
        (tmp / CONFIG_FILE).write_text(config_yaml, encoding="utf-8")
        if write_extra is not None:
            write_extra(tmp)
        _write_marker(tmp, step)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

    final = root / f"step-{step}"
    aside = root / f"{_OLD_PREFIX}{final.name}"
    replacing = final.exists()
    if replacing:
        os.rename(final, aside)
    os.rename(tmp, final)
    _fsync_dir(root)
    if replacing:
        shutil.rmtree(aside)

    others = sorted((s, path) for s, path in _complete_checkpoints(root).items() if path != final)
    for _, path in others[:max(len(others) - (keep - 1), 0)]:
        shutil.rmtree(path)
    return final


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The dir of the highest-step checkpoint with a ``COMPLETE`` marker, or None; ``.tmp-*`` dirs never count."""
    found = _complete_checkpoints(Path(run_dir) / "checkpoints")
    return found[max(found)] if found else None


def load_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Read the checkpoint in ``path`` after checking every file's size and sha256 against the marker."""
    path = Path(path)
    if not path.is_dir():
        raise TunesmithError(f"checkpoint {path} does not exist")
    step = _verify(path)
    hint = f"delete {path} to resume from the previous checkpoint"
    weights, rng = (_read(path / name, load_file, hint) for name in (WEIGHTS_FILE, RNG_FILE))
    state = _read(path / STATE_FILE, lambda file: json.loads(file.read_text(encoding="utf-8")), hint)
    if not isinstance(state, dict):
        raise TunesmithError(f"checkpoint file {path / STATE_FILE} holds a {type(state).__name__}, not a train "
                             f"state (a JSON object); {hint}")
    bad = sorted(name for name, tensor in weights.items() if tensor.is_floating_point() and
                 not bool(torch.isfinite(tensor).all()))
    if bad:
        raise TunesmithError(f"checkpoint file {path / WEIGHTS_FILE} holds non-finite values (NaN or infinity) in "
                             f"{', '.join(bad[:3])}{' …' if len(bad) > 3 else ''}; training from it would train "
                             f"garbage: {hint}")
    return Checkpoint(path=path, step=step, weights=weights, optimizer=_read_optimizer(path / OPTIMIZER_FILE, hint),
                      state=state, rng=rng,
                      config_yaml=_read(path / CONFIG_FILE, lambda file: file.read_text(encoding="utf-8"), hint))


def _read(file: Path, read, hint: str):
    """``read(file)``, any failure one line naming the file (the marker can be rewritten by hand with the rest)."""
    try:
        return read(file)
    except Exception as exc:  # safetensors, json and decoding raise unrelated types for a damaged file
        raise TunesmithError(f"checkpoint file {file} cannot be read ({type(exc).__name__}: "
                             f"{str(exc).splitlines()[0][:200] if str(exc) else 'damaged'}); {hint}") from None


def _read_optimizer(file: Path, hint: str) -> dict:
    """The optimizer state, read as tensors and plain containers only (``weights_only``): a file holding any
    other object is a pickle that could run code, and tunesmith never loads one."""
    import pickle

    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise TunesmithError(f"checkpoint file {file} holds Python objects beyond tensors (a pickle, which could run "
                             "code when loaded); tunesmith never loads pickles, so it cannot resume from this file: "
                             f"{hint}") from None
    except Exception as exc:
        raise TunesmithError(f"checkpoint file {file} cannot be read ({type(exc).__name__}: "
                             f"{str(exc).splitlines()[0][:200] if str(exc) else 'damaged'}); {hint}") from None
    return state  # whether it fits the optimizer is the loader's check (load_state_dict)


def os_error_of(exc: BaseException) -> OSError | None:
    """The operating system's error behind ``exc``, or None.

    A failed write (disk full) reaches us as an OSError from Python's own file I/O, but safetensors (Rust)
    reports it as an error whose message ends in ``(os error N)``, and ``torch.save`` raises a RuntimeError with
    the OSError of the Python file it was writing to as its context.
    """
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError):
            return exc
        code = _RUST_OS_ERROR.search(str(exc))
        if code:
            return OSError(int(code.group(1)), os.strerror(int(code.group(1))))
        exc = exc.__cause__ or exc.__context__
    return None


def capture_rng() -> dict[str, torch.Tensor]:
    """The state of every RNG a training step may draw from, as tensors, so it saves to safetensors.

    Keys: ``torch_cpu``; ``torch_cuda_<i>`` for each CUDA device when CUDA is available; ``python`` (``random``'s
    version and its 625 Mersenne Twister words) with ``python_gauss`` ([has a cached value, value]); ``numpy``
    (the legacy global generator's 624 words) with ``numpy_pos`` ([position, has a cached value]) and
    ``numpy_gauss``.
    """
    version, words, gauss = random.getstate()
    _, np_words, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    rng = {
        "torch_cpu": torch.get_rng_state(),
        "python": torch.tensor([version, *words], dtype=torch.int64),
        "python_gauss": torch.tensor([gauss is not None, gauss or 0.0], dtype=torch.float64),
        "numpy": torch.from_numpy(np_words.astype(np.int64)),
        "numpy_pos": torch.tensor([np_pos, np_has_gauss], dtype=torch.int64),
        "numpy_gauss": torch.tensor([np_gauss], dtype=torch.float64),
    }
    if torch.cuda.is_available():
        for index, cuda_state in enumerate(torch.cuda.get_rng_state_all()):
            rng[f"torch_cuda_{index}"] = cuda_state
    return rng


def restore_rng(rng: Mapping[str, torch.Tensor]) -> None:
    """Put back the RNG states from ``capture_rng``.

    CUDA states are restored for the devices present both now and in ``rng``; resuming on other hardware
    cannot replay the same CUDA draws anyway.
    """
    missing = [key for key in RNG_KEYS if key not in rng]
    if missing:
        raise TunesmithError(f"the saved RNG state lacks {', '.join(missing)}; it was not written by capture_rng")
    try:
        torch.set_rng_state(rng["torch_cpu"])
        version, *words = rng["python"].tolist()
        has_gauss, gauss = rng["python_gauss"].tolist()
        random.setstate((version, tuple(words), gauss if has_gauss else None))
        np_pos, np_has_gauss = rng["numpy_pos"].tolist()
        np.random.set_state(("MT19937", rng["numpy"].numpy().astype(np.uint32), np_pos, np_has_gauss,
                             rng["numpy_gauss"].item()))
    except (RuntimeError, ValueError, TypeError) as exc:  # a state of the wrong size or type
        raise TunesmithError(f"the saved RNG state is damaged ({str(exc).splitlines()[0][:200]}); it was not "
                             "written by capture_rng") from None
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            if f"torch_cuda_{index}" in rng:
                torch.cuda.set_rng_state(rng[f"torch_cuda_{index}"], index)


def _for_safetensors(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous CPU tensors; one sharing storage with an earlier one (tied weights) is cloned, since
    safetensors refuses to write shared storage."""
    seen: set[int] = set()
    out = {}
    for name, tensor in tensors.items():
        tensor = tensor.detach().to("cpu").contiguous()
        storage = tensor.untyped_storage().data_ptr()
        if storage in seen:
            tensor = tensor.clone()
        seen.add(storage)
        out[name] = tensor
    return out


def _digest(path: Path, *, sync: bool = False) -> tuple[int, str]:
    """Size and sha256 of a file; with ``sync``, also fsync it (one read serves both)."""
    sha = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK_BYTES):
            sha.update(chunk)
            size += len(chunk)
        if sync:
            os.fsync(f.fileno())
    return size, sha.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_marker(ckpt_dir: Path, step: int) -> None:
    """fsync every file and dir under ``ckpt_dir``, then write the marker listing them, then fsync that."""
    files = []
    for path in sorted(ckpt_dir.rglob("*")):
        if path.is_dir():
            _fsync_dir(path)
            continue
        size, sha256 = _digest(path, sync=True)
        files.append({"path": path.relative_to(ckpt_dir).as_posix(), "bytes": size, "sha256": sha256})
    with open(ckpt_dir / COMPLETE, "w", encoding="utf-8") as f:
        json.dump({"step": step, "files": files}, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(ckpt_dir)


def _verify(path: Path) -> int:
    """Check the marker and every file it lists; return the step it records."""
    hint = f"delete {path} to resume from the previous checkpoint"
    marker = path / COMPLETE
    if not marker.is_file():
        raise TunesmithError(f"checkpoint {path} is incomplete (no {COMPLETE} marker): it was still being written "
                             f"when the run stopped; {hint}")
    try:
        content = json.loads(marker.read_text(encoding="utf-8"))
        step = int(content["step"])
        files = {entry["path"]: (entry["bytes"], entry["sha256"]) for entry in content["files"]}
    except (ValueError, KeyError, TypeError) as exc:
        raise TunesmithError(f"checkpoint marker {marker} is corrupt ({exc!r}); {hint}") from exc
    unlisted = [name for name in REQUIRED_FILES if name not in files]
    if unlisted:
        raise TunesmithError(f"checkpoint marker {marker} does not list {', '.join(unlisted)}; {hint}")
    for name, (expected_bytes, expected_sha256) in files.items():
        file = path / name
        if not file.is_file():
            raise TunesmithError(f"checkpoint file {file} is missing; {hint}")
        found_bytes = file.stat().st_size
        if found_bytes != expected_bytes:
            raise TunesmithError(f"checkpoint file {file} is truncated or corrupt (expected {expected_bytes} "
                                 f"bytes, found {found_bytes}); {hint}")
        if _digest(file)[1] != expected_sha256:
            raise TunesmithError(f"checkpoint file {file} is corrupt (its sha256 differs from the one in "
                                 f"{COMPLETE}); {hint}")
    return step


def _complete_checkpoints(root: Path) -> dict[int, Path]:
    """Step → dir of every checkpoint with a marker, counting an ``.old-step-N`` whose replacement never landed."""
    found: dict[int, Path] = {}
    if not root.is_dir():
        return found
    for entry in root.iterdir():
        name = entry.name.removeprefix(_OLD_PREFIX)
        match = _STEP_DIR.fullmatch(name)
        if not match or not (entry / COMPLETE).is_file():
            continue
        if entry.name != name and (root / name).exists():
            continue  # left over from a replace that finished; the next save deletes it
        found[int(match.group(1))] = entry
    return found


def _clean_interrupted_saves(root: Path) -> None:
    """Remove ``.tmp-*`` dirs of crashed saves; move back an ``.old-step-N`` whose replacement never landed."""
    for entry in list(root.iterdir()):
        if not entry.is_dir():
            continue
        if entry.name.startswith(_TMP_PREFIX):
            shutil.rmtree(entry)
        elif entry.name.startswith(_OLD_PREFIX):
            final = root / entry.name.removeprefix(_OLD_PREFIX)
            if not final.exists() and (entry / COMPLETE).is_file():
                os.rename(entry, final)
            else:
                shutil.rmtree(entry)
