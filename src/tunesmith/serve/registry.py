"""Which adapters a server may load, and from where: names resolve only to dirs under the adapter root (or to
the dirs given on the command line by name). A request never names a path."""

from __future__ import annotations

import re
from pathlib import Path

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
NAME_RULE = "1-64 characters: letters, digits, '.', '_', '-', starting with a letter or digit, no '..'"


class ServeError(Exception):
    """An error a client gets back in OpenAI's error shape, with its HTTP status."""

    def __init__(self, status: int, message: str, *, kind: str = "invalid_request_error", code: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.code, self.headers = status, message, kind, code, headers or {}


def check_name(name) -> str:
    if not isinstance(name, str) or not NAME.fullmatch(name) or ".." in name:
        raise ServeError(400, f"invalid model name: adapter names are {NAME_RULE}", code="invalid_model_name")
    return name


class AdapterRegistry:
    """``named``: name → adapter dir given on the command line; ``root``: a dir whose subdirs are adapters,
    each under its dir's name."""

    def __init__(self, root: str | Path | None = None, named: dict[str, Path] | None = None):
        self.root = None if root is None else Path(root).resolve()
        if self.root is not None and not self.root.is_dir():
            raise ServeError(400, f"--adapters {root}: no such directory")
        self.named = {check_name(name): Path(path).resolve() for name, path in (named or {}).items()}

    def available(self) -> list[str]:
        """Every adapter a request may name (whether loaded or not)."""
        names = set(self.named)
        if self.root is not None:
            for entry in self.root.iterdir():
                if NAME.fullmatch(entry.name) and ".." not in entry.name and self._inside(entry) and (
                        entry / "adapter_config.json").is_file():
                    names.add(entry.name)
        return sorted(names)

    def resolve(self, name: str) -> Path:
        """The adapter dir of ``name``; refused unless it is a dir under the root (or named at start)."""
        check_name(name)
        if name in self.named:
            return self.named[name]
        if self.root is None:
            raise ServeError(404, f"the model {name!r} does not exist", code="model_not_found")
        path = self.root / name
        if not self._inside(path):
            raise ServeError(400, f"adapter {name!r} resolves outside the adapter root", code="invalid_model_name")
        if not path.is_dir():
            raise ServeError(404, f"the model {name!r} does not exist", code="model_not_found")
        return path.resolve()

    def _inside(self, path: Path) -> bool:
        real = path.resolve()
        return real.parent == self.root and real.name == path.name
