"""Declared dependencies and the lock.

Every package a verb imports at run time must be reachable from pyproject's ``dependencies`` without any
extra: a package that only the test extras bring (``peft`` pulls in ``accelerate``) would let the suite
pass while ``make demo`` fails on a fresh machine. ``requirements.lock`` must pin every such package at a
version pyproject allows, and the project's own ``.venv`` must hold exactly what it pins.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
PROBE = Path(__file__).with_name("dependency_probe.py")
# ``make lock`` tests a candidate lock before it replaces the real one
LOCK = Path(os.environ.get("TUNESMITH_LOCK_FILE") or ROOT / "requirements.lock")


def declared() -> list[Requirement]:
    """pyproject's run-time requirements (the extras are not run time)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return [Requirement(text) for text in project["dependencies"]]


def runtime_closure(requirements: list[Requirement]) -> set[str]:
    """The installed distributions that ``requirements`` bring, followed through each one's own requirements
    (markers evaluated for this interpreter, with no extra)."""
    seen: set[str] = set()
    todo = list(requirements)
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        if name in seen or (req.marker is not None and not req.marker.evaluate({"extra": ""})):
            continue
        try:
            needs = importlib.metadata.requires(name) or []
        except importlib.metadata.PackageNotFoundError:
            continue  # not installed here, so nothing here can import it
        seen.add(name)
        todo.extend(Requirement(text) for text in needs)
    return seen


def undeclared(modules: list[str], closure: set[str]) -> dict[str, list[str]]:
    """Top-level module → the distributions providing it, for modules that only undeclared distributions
    provide. Modules of no distribution (the standard library, tunesmith itself, generated modules) pass."""
    providers = importlib.metadata.packages_distributions()
    found = {}
    for module in modules:
        dists = {canonicalize_name(d) for d in providers.get(module, [])} - {"tunesmith"}
        if dists and not dists & closure:
            found[module] = sorted(dists)
    return found


def test_the_check_catches_a_test_only_package():
    """peft (a test extra) and pytest are not run-time packages; torch and accelerate are."""
    closure = runtime_closure(declared())
    assert {"torch", "transformers", "accelerate", "gguf", "bitsandbytes", "datasets"} <= closure
    assert undeclared(["peft", "pytest", "torch", "json"], closure) == {"peft": ["peft"], "pytest": ["pytest"]}
    without_accelerate = [r for r in declared() if r.name != "accelerate"]
    assert undeclared(["accelerate"], runtime_closure(without_accelerate)) == {"accelerate": ["accelerate"]}


def test_every_package_a_verb_imports_is_declared(tmp_path, tiny_model_dir):
    """Each verb runs in one fresh process with an empty model cache (so the embedded GGUF file is converted
    there); every module it imported must come from a declared distribution or one they need."""
    import datasets

    sys.path.insert(0, str(PROBE.parent))
    from dependency_probe import ROWS

    datasets.Dataset.from_list(ROWS).to_parquet(str(tmp_path / "rows.parquet"))
    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "saved"))
    env = {**os.environ, "TUNESMITH_CACHE": str(tmp_path / "cache")}
    done = subprocess.run([sys.executable, str(PROBE), str(tiny_model_dir), str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    modules = json.loads((tmp_path / "modules.json").read_text())
    assert {"accelerate", "gguf", "transformers", "datasets", "bitsandbytes", "tensorboard"} <= set(modules)
    assert undeclared(modules, runtime_closure(declared())) == {}, "declare these in pyproject's dependencies"


def _lock() -> dict[str, str]:
    pins = {}
    for line in LOCK.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"{LOCK.name}: {line!r} is not an exact pin"
            pins[canonicalize_name(name)] = version
    return pins


def test_the_lock_pins_every_runtime_package_within_pyproject_ranges():
    pins = _lock()
    closure = runtime_closure(declared())
    assert sorted(closure - set(pins)) == [], f"run `make lock`: {LOCK.name} misses run-time packages"
    for req in declared():
        assert Version(pins[canonicalize_name(req.name)]) in req.specifier, (req, pins[canonicalize_name(req.name)])
    assert pins["torch"] == "2.13.0"  # the CPU build on this machine's disk; a local label would not resolve


@pytest.mark.skipif(Path(sys.prefix).resolve() != (ROOT / ".venv").resolve(),
                    reason="only the project's own .venv is installed from the lock")
def test_the_venv_holds_what_the_lock_pins():
    pins = _lock()
    installed = {canonicalize_name(d.metadata["Name"]): d.version for d in importlib.metadata.distributions()}
    wrong = {name: (installed[name], pin) for name, pin in pins.items()
             if name in installed and installed[name].split("+")[0] != pin}
    assert wrong == {}, "installed ≠ locked: `make clean` then `make test` reinstalls from the lock"
