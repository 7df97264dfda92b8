"""Read a dataset source into plain rows: a local file, a saved HF dataset dir, a hub id, or ``builtin``.

Every reader returns ``list[dict]`` and a display name, so formats and validation never see where rows
came from. JSON, JSONL and CSV are parsed with the standard library rather than ``datasets``: it keeps
every row exactly as written (no column types guessed from other rows, no ``None`` filled into keys a
row never had) and lets an error name the file and the line. Parquet and saved datasets are Arrow
already, so ``datasets`` reads them.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from tunesmith.data.builtin import BUILTIN_NAME, builtin_preference, builtin_task
from tunesmith.errors import TunesmithError
from tunesmith.hub import HUB_ID, hub_reachable

_FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")


def load_rows(source: str, *, split: str | None = None) -> tuple[list[dict], str]:
    """Return ``(rows, name)`` for ``source``; ``name`` is what error messages call the dataset.

    ``split`` picks a split of a saved ``DatasetDict``, a hub dataset or the built-in task (default
    ``train``); a single file holds one split, so it is ignored there. ``builtin:test`` style suffixes
    name the split of a built-in source directly.
    """
    if source.split(":")[0] in (BUILTIN_NAME, f"{BUILTIN_NAME}-preference"):
        rows, name = _builtin_rows(source, split)
    else:
        path = Path(source).expanduser()
        if path.is_dir():
            rows, name = _saved_dataset_rows(path, source, split)
        elif path.is_file():
            rows, name = _file_rows(path, source), source
        elif path.suffix.lower() in _FILE_SUFFIXES or not HUB_ID.match(source):
            raise TunesmithError(f"dataset file {source} does not exist; check the path")
        else:
            rows, name = _hub_rows(source, split)
    if not rows:
        raise TunesmithError(f"{name} holds no rows; point at a dataset with at least one example")
    return rows, name


def _builtin_rows(source: str, split: str | None) -> tuple[list[dict], str]:
    kind, _, suffix = source.partition(":")
    split = suffix or split or "train"
    make = builtin_preference if kind.endswith("-preference") else builtin_task
    return make(split), f"{kind}:{split}"


def _file_rows(path: Path, name: str) -> list[dict]:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return _jsonl_rows(path.read_text(encoding="utf-8"), name)
    if suffix == ".json":
        return _json_rows(path.read_text(encoding="utf-8"), name)
    if suffix == ".csv":
        return _csv_rows(path, name)
    if suffix == ".parquet":
        return _parquet_rows(path, name)
    raise TunesmithError(f"{name}: unknown file type {suffix!r}; use .jsonl, .json, .csv or .parquet")


def _jsonl_rows(text: str, name: str) -> list[dict]:
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise TunesmithError(
                f"{name}: line {number} is not valid JSON ({exc.msg} at column {exc.colno}); fix or remove the line"
            ) from None
        if not isinstance(row, dict):
            raise TunesmithError(f"{name}: line {number} must be a JSON object such as {{\"text\": ...}}, "
                                 f"not {type(row).__name__}")
        rows.append(row)
    return rows


def _json_rows(text: str, name: str) -> list[dict]:
    """A list of objects, or an object with exactly one list-valued key (``{"data": [...]}``)."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data":  # one object per line, saved as .json
            return _jsonl_rows(text, name)
        raise TunesmithError(f"{name}: not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})") from None
    if isinstance(data, dict):
        lists = [key for key, value in data.items() if isinstance(value, list)]
        if len(lists) != 1:
            raise TunesmithError(f"{name}: a JSON object must hold exactly one list of rows (found {len(lists)} "
                                 "list-valued keys); use a top-level list or JSONL")
        data = data[lists[0]]
    if not isinstance(data, list):
        raise TunesmithError(f"{name}: top-level JSON must be a list of objects, not {type(data).__name__}")
    for number, row in enumerate(data, start=1):
        if not isinstance(row, dict):
            raise TunesmithError(f"{name}: item {number} must be a JSON object, not {type(row).__name__}")
    return data


def _csv_rows(path: Path, name: str) -> list[dict]:
    """Every cell stays a string, as written; an empty cell is ``""``."""
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        rows = []
        for row in reader:
            if None in row or None in row.values():
                raise TunesmithError(f"{name}: line {reader.line_num} has a different number of cells "
                                     f"than the header ({len(reader.fieldnames)}); fix the quoting or the row")
            rows.append(row)
    return rows


def _parquet_rows(path: Path, name: str) -> list[dict]:
    import datasets

    try:
        return datasets.load_dataset("parquet", data_files=str(path), split="train").to_list()
    except Exception as exc:  # pyarrow raises several unrelated types for a damaged file
        raise TunesmithError(f"{name}: cannot read as Parquet ({exc})") from exc


def _saved_dataset_rows(path: Path, source: str, split: str | None) -> tuple[list[dict], str]:
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except FileNotFoundError:
        raise TunesmithError(f"{source} is a directory but not a saved dataset (no dataset_info.json or "
                             "dataset_dict.json); save it with Dataset.save_to_disk or pass a data file") from None
    if isinstance(loaded, datasets.DatasetDict):
        split = split or "train"
        if split not in loaded:
            raise TunesmithError(f"{source} has no split {split!r}; it has {', '.join(loaded)}")
        return loaded[split].to_list(), f"{source}[{split}]"
    return loaded.to_list(), source


def _hub_rows(source: str, split: str | None) -> tuple[list[dict], str]:
    split = split or "train"
    name = f"{source}[{split}]"
    if not hub_reachable():
        raise TunesmithError(f"dataset {source!r} is not a local file, so it was taken as a hub id, but the "
                             "Hugging Face hub cannot be reached (offline); download it elsewhere and pass a "
                             "local file (.jsonl, .json, .csv, .parquet) or a saved dataset directory")
    import datasets

    try:
        return datasets.load_dataset(source, split=split).to_list(), name
    except Exception as exc:  # the hub client raises many types: missing repo, gated, bad split
        raise TunesmithError(f"cannot load hub dataset {name}: {exc}") from exc
