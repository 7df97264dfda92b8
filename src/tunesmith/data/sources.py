"""Read a dataset source into plain rows: a local file, a saved HF dataset dir, a hub id, or ``builtin``.

Every reader returns ``list[dict]`` and a display name, so formats and validation never see where rows
came from. JSON, JSONL and CSV are parsed with the standard library rather than ``datasets``: it keeps
every row exactly as written (no column types guessed from other rows, no ``None`` filled into keys a
row never had) and lets an error name the file and the line; a key repeated in one object is refused
(JSON would keep the last silently). Parquet files are read by pyarrow directly, so nothing lands in the
user's ``datasets`` cache; saved dataset dirs by ``datasets``.
"""

from __future__ import annotations

import csv
import errno
import io
import json
import stat
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
    if not source.strip():
        raise TunesmithError("no dataset given (an empty path); pass a data file, a saved dataset dir or builtin")
    if "\0" in source:
        raise TunesmithError(f"dataset path {source!r} holds a NUL byte; pass the path as it is on disk")
    if source.split(":")[0] in (BUILTIN_NAME, f"{BUILTIN_NAME}-preference"):
        rows, name = _builtin_rows(source, split)
    else:
        path = Path(source).expanduser()
        _check_special(path, source)
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


def _check_special(path: Path, source: str) -> None:
    """A path that exists but is neither a file nor a dir (a FIFO, a socket, a device) or that is a symbolic
    link loop is named as what it is, not as missing (reading a FIFO would wait forever)."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise TunesmithError(f"dataset path {source} is a symbolic link loop; point it at a real file") from None
        raise TunesmithError(f"cannot read dataset path {source} ({exc.strerror})") from None
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        raise TunesmithError(f"dataset path {source} is not a regular file (a FIFO, socket or device); "
                             "save the data to a file and pass that")


def _builtin_rows(source: str, split: str | None) -> tuple[list[dict], str]:
    kind, _, suffix = source.partition(":")
    split = suffix or split or "train"
    make = builtin_preference if kind.endswith("-preference") else builtin_task
    return make(split), f"{kind}:{split}"


class Rows(list):
    """A source's rows (a plain ``list[dict]``) and where each came from, for messages to point at.

    ``numbers[i]`` is row ``i``'s number in the source and ``unit`` what it counts: ``"line"``, the
    1-based line where the row starts in a line-based file (JSONL, CSV, where blank lines and quoted
    line breaks make it differ from the position), else ``"row"``, its 1-based position.
    """

    def __init__(self, rows: list[dict], numbers: list[int] | None = None, unit: str = "row"):
        super().__init__(rows)
        self.numbers = numbers if numbers is not None else list(range(1, len(rows) + 1))
        self.unit = unit


def _file_rows(path: Path, name: str) -> list[dict]:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return _jsonl_rows(_read_text(path, name), name)
    if suffix == ".json":
        return _json_rows(_read_text(path, name), name)
    if suffix == ".csv":
        return _csv_rows(_read_text(path, name), name)
    if suffix == ".parquet":
        return _parquet_rows(path, name)
    raise TunesmithError(f"{name}: unknown file type {suffix!r}; use .jsonl, .json, .csv or .parquet")


def _read_text(path: Path, name: str) -> str:
    """The file as UTF-8 text without a leading BOM (else it would start the first key or column name)."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise TunesmithError(f"{name}: cannot read the file ({exc.strerror}); check its permissions") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise TunesmithError(f"{name}: line {line} is not UTF-8 text ({exc.reason} at byte {exc.start}); "
                             "re-save the file as UTF-8") from None


class _DuplicateKey(Exception):
    pass


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    """JSON objects without repeated keys: json keeps the last of them silently, so a bad value followed
    by a good one under the same key would pass unseen."""
    seen = {}
    for key, value in pairs:
        if key in seen:
            raise _DuplicateKey(key)
        seen[key] = value
    return seen


def _parse_json(text: str, name: str, where: str):
    try:
        return json.loads(text, object_pairs_hook=_unique_keys)
    except RecursionError:
        raise TunesmithError(f"{name}: {where} nests too deeply to read; "
                             "flatten the nested lists or objects") from None
    except _DuplicateKey as exc:
        raise TunesmithError(f"{name}: {where} has the key {exc.args[0]!r} twice in one object (JSON keeps only "
                             "the last); remove one of them") from None
    except ValueError as exc:
        if isinstance(exc, json.JSONDecodeError):
            raise
        # Python refuses integers of more than 4300 digits
        raise TunesmithError(f"{name}: {where} holds a number too long to read ({str(exc).split(':')[0]}); "
                             "write it as a string or fix the row") from None


def _jsonl_rows(text: str, name: str) -> Rows:
    # Lines end at "\n" only: str.splitlines() would also split at U+2028 or U+0085 inside a string.
    rows, numbers = [], []
    for number, line in enumerate(text.split("\n"), start=1):
        line = line.removesuffix("\r")
        if not line.strip():
            continue
        try:
            row = _parse_json(line, name, f"line {number}")
        except json.JSONDecodeError as exc:
            raise TunesmithError(
                f"{name}: line {number} is not valid JSON ({exc.msg} at column {exc.colno}); fix or remove the line"
            ) from None
        if not isinstance(row, dict):
            raise TunesmithError(f"{name}: line {number} must be a JSON object such as {{\"text\": ...}}, "
                                 f"not {type(row).__name__}")
        rows.append(row)
        numbers.append(number)
    return Rows(rows, numbers, unit="line")


def _json_rows(text: str, name: str) -> list[dict]:
    """A list of objects, or an object with exactly one list-valued key (``{"data": [...]}``)."""
    try:
        data = _parse_json(text, name, "the JSON")
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


def _csv_rows(text: str, name: str) -> Rows:
    """Every cell stays a string, as written; an empty cell is ``""``; blank lines are skipped."""
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    rows, numbers = [], []
    # csv refuses cells over 128 KiB by default (a long document is a normal cell here); the limit is
    # process-wide, so it is raised to the file's size only while this file is read.
    limit = csv.field_size_limit(max(len(text), csv.field_size_limit()))
    try:
        header = next(reader, [])
        repeated = sorted({column for column in header if header.count(column) > 1})
        if repeated:
            raise TunesmithError(f"{name}: line 1: the header names the column {repeated[0]!r} twice (one would "
                                 "hide the other); rename one of them")
        start = reader.line_num + 1  # a record's number is the line it starts on (a quoted cell may span lines)
        for cells in reader:
            if cells:
                if len(cells) != len(header):
                    raise TunesmithError(f"{name}: line {start} has {len(cells)} cells but the header has "
                                         f"{len(header)}; fix the quoting or the row")
                rows.append(dict(zip(header, cells)))
                numbers.append(start)
            start = reader.line_num + 1
    except csv.Error as exc:
        if "unexpected end of data" in str(exc):  # a quote opened and never closed swallows the lines after it
            raise TunesmithError(f"{name}: line {start}: a quoted cell is never closed (the quote runs to the end "
                                 "of the file); close the quote or escape it as \"\"") from None
        raise TunesmithError(f"{name}: line {reader.line_num} is not valid CSV ({exc}); fix the row") from None
    finally:
        csv.field_size_limit(limit)
    return Rows(rows, numbers, unit="line")


def _parquet_rows(path: Path, name: str) -> list[dict]:
    """Read straight through pyarrow: nothing is written to the user's datasets cache."""
    import pyarrow.parquet

    try:
        return pyarrow.parquet.read_table(path).to_pylist()
    except Exception as exc:  # pyarrow raises several unrelated types for a damaged file
        raise TunesmithError(f"{name}: cannot read as Parquet ({exc})") from None


def _saved_dataset_rows(path: Path, source: str, split: str | None) -> tuple[list[dict], str]:
    import datasets

    if not any((path / marker).is_file() for marker in ("dataset_info.json", "dataset_dict.json")):
        raise TunesmithError(f"{source} is a directory but not a saved dataset (no dataset_info.json or "
                             "dataset_dict.json); save it with Dataset.save_to_disk or pass a data file")
    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as exc:  # a damaged dir: bad JSON, missing or truncated Arrow files, a split dir missing
        raise TunesmithError(f"{source}: cannot read the saved dataset ({type(exc).__name__}: "
                             f"{str(exc)[:200]}); save it again with save_to_disk") from None
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
