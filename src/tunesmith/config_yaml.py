"""Config YAML as text: strict parsing (a key written twice is an error) whose errors name the file or the
override and the line, config files read as one mapping, and ``key.sub=value`` overrides set into the tree."""

from __future__ import annotations

from collections.abc import Hashable
from pathlib import Path

import yaml

from tunesmith.errors import TunesmithError


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, except that a key written twice in one mapping is an error (YAML keeps the last)."""

    def construct_mapping(self, node, deep=False):
        lines = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if not isinstance(key, Hashable):
                raise _DuplicateKey(f"line {line}: a key must be a plain value, not a {type(key).__name__}")
            if isinstance(key, (str, int, float, bool)) and key in lines:
                raise _DuplicateKey(f"key {key!r} is written twice (lines {lines[key]} and {line}); keep one")
            lines[key] = line
        return super().construct_mapping(node, deep)


class _DuplicateKey(yaml.YAMLError):
    pass


# A config is a few dozen values: these limits refuse a file that only a mistake or an attack makes, before it
# costs minutes or gigabytes (aliases can make a few lines expand to billions of values).
MAX_CONFIG_BYTES = 1 << 20
MAX_DEPTH = 32
MAX_VALUES = 100_000


def _check_shape(tree, what: str) -> None:
    """Refuse a tree nested deeper than MAX_DEPTH or holding more than MAX_VALUES values once aliases are
    expanded; shared nodes (what an alias builds) are measured once each, so this costs what the text does."""
    sizes: dict[int, tuple[int, int]] = {}

    def measure(node, depth: int) -> tuple[int, int]:
        if depth > MAX_DEPTH:
            raise TunesmithError(f"{what} nests more than {MAX_DEPTH} levels deep; a config is a few flat sections")
        if not isinstance(node, (dict, list)):
            return 1, 0
        if id(node) not in sizes:
            children = node.values() if isinstance(node, dict) else node
            count, deepest = 1, 0
            for child in children:
                size, below = measure(child, depth + 1)
                count, deepest = count + size, max(deepest, below + 1)
                if count > MAX_VALUES:
                    raise TunesmithError(f"{what} expands to more than {MAX_VALUES:,} values (through YAML aliases "
                                         "or sheer size); a config is a few dozen values")
            sizes[id(node)] = count, deepest
        count, deepest = sizes[id(node)]
        if depth + deepest > MAX_DEPTH:
            raise TunesmithError(f"{what} nests more than {MAX_DEPTH} levels deep; a config is a few flat sections")
        return count, deepest

    measure(tree, 0)


def parse_yaml(text: str, what: str):
    """Parse YAML text; any problem becomes one line naming ``what`` (a file or an override) and the line."""
    try:
        tree = yaml.load(text, Loader=_UniqueKeyLoader)
    except RecursionError:
        raise TunesmithError(f"{what} nests more than {MAX_DEPTH} levels deep; a config is a few flat sections") \
            from None
    except _DuplicateKey as exc:
        raise TunesmithError(f"{what}: {exc}") from None
    except yaml.MarkedYAMLError as exc:
        where = f" at line {exc.problem_mark.line + 1}" if exc.problem_mark else ""
        raise TunesmithError(f"{what} is not valid YAML{where}: {exc.problem or exc.context}") from None
    except yaml.YAMLError as exc:
        raise TunesmithError(f"{what} is not valid YAML: {exc}") from None
    _check_shape(tree, what)
    return tree


def read_config_file(path: str | Path) -> dict:
    try:
        size = Path(path).stat().st_size
        if size > MAX_CONFIG_BYTES:
            raise TunesmithError(f"config file {path} is {size / 2**20:.1f} MiB; a config file is at most "
                                 f"{MAX_CONFIG_BYTES >> 20} MiB (a few dozen values): check that this is the config")
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise TunesmithError(f"config file {path} does not exist") from None
    except IsADirectoryError:
        raise TunesmithError(f"config file {path} is a directory; pass a YAML file") from None
    except UnicodeDecodeError as exc:
        raise TunesmithError(f"config file {path} is not UTF-8 text (byte {exc.object[exc.start]:#04x} at offset "
                             f"{exc.start}); save it as UTF-8") from None
    except OSError as exc:
        raise TunesmithError(f"cannot read config file {path}: {exc.strerror}") from None
    tree = parse_yaml(text, f"config file {path}") or {}
    if not isinstance(tree, dict):
        raise TunesmithError(f"config file {path} must hold a mapping of sections")
    return tree


SHORT_FORMS = {"plan": "mode"}
"""Sections a plain value may stand for: ``plan: auto`` is ``plan: {mode: auto}`` (a later ``plan.memory=…``
override adds to it)."""


def set_dotted(tree: dict, dotted: str, raw: str) -> None:
    keys = dotted.split(".")
    node = tree
    for depth, key in enumerate(keys[:-1]):
        if depth == 0 and key in SHORT_FORMS and node.get(key) is not None and not isinstance(node[key], dict):
            node[key] = {SHORT_FORMS[key]: node[key]}
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise TunesmithError(f"override {dotted}={raw}: {key} is not a section")
    node[keys[-1]] = parse_yaml(raw, f"override {dotted}={raw}") if raw != "" else None


def explain_validation(exc, origin: str) -> TunesmithError:
    """A pydantic ``ValidationError`` as one message naming each key and what is wrong with it."""
    problems = []
    for error in exc.errors():
        key = ".".join(str(part) for part in error["loc"])
        if error["type"] == "extra_forbidden":
            problems.append(f"unknown key {key!r}")
        elif not key:  # a rule across sections
            problems.append(error["msg"].removeprefix("Value error, "))
        else:
            problems.append(f"{key}: {error['msg'].removeprefix('Value error, ')} (got {error.get('input')!r})")
    return TunesmithError(f"{origin}: " + "; ".join(problems))
