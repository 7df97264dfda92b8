"""load_rows on real files written to tmp_path: each file type, each error, the hub offline, builtin names."""

from __future__ import annotations

import json
import time

import pandas as pd
import pytest
from datasets import Dataset, DatasetDict

from tunesmith.data.sources import load_rows
from tunesmith.errors import TunesmithError

ROWS = [{"prompt": "2+2=", "completion": "4"}, {"prompt": "Capital of France?", "completion": "Paris"}]


def write_jsonl(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_jsonl_rows_and_name(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [json.dumps(r) for r in ROWS])
    assert load_rows(str(path)) == (ROWS, str(path))


def test_jsonl_skips_blank_lines(tmp_path):
    path = write_jsonl(tmp_path / "gaps.jsonl", ["", json.dumps(ROWS[0]), "   ", json.dumps(ROWS[1])])
    assert load_rows(str(path))[0] == ROWS


def test_jsonl_malformed_line_names_file_and_line(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [json.dumps(ROWS[0]), "", '{"prompt": "x" "completion": "y"}'])
    with pytest.raises(TunesmithError) as info:
        load_rows(str(path))
    assert str(info.value) == (f"{path}: line 3 is not valid JSON (Expecting ',' delimiter at column 16); "
                               "fix or remove the line")


def test_jsonl_line_that_is_not_an_object(tmp_path):
    path = write_jsonl(tmp_path / "list.jsonl", [json.dumps(ROWS[0]), "[1, 2]"])
    with pytest.raises(TunesmithError, match=r"list\.jsonl: line 2 must be a JSON object .*not list"):
        load_rows(str(path))


def test_json_list(tmp_path):
    path = tmp_path / "rows.json"
    path.write_text(json.dumps(ROWS))
    assert load_rows(str(path)) == (ROWS, str(path))


def test_json_single_list_key(tmp_path):
    path = tmp_path / "wrapped.json"
    path.write_text(json.dumps({"version": "1.0", "data": ROWS}))
    assert load_rows(str(path))[0] == ROWS


def test_json_with_two_lists_is_ambiguous(tmp_path):
    path = tmp_path / "two.json"
    path.write_text(json.dumps({"train": ROWS, "test": ROWS}))
    with pytest.raises(TunesmithError, match=r"two\.json: a JSON object must hold exactly one list of rows \(found 2"):
        load_rows(str(path))


def test_json_lines_saved_as_json(tmp_path):
    path = write_jsonl(tmp_path / "lines.json", [json.dumps(r) for r in ROWS])
    assert load_rows(str(path))[0] == ROWS


def test_json_item_not_an_object(tmp_path):
    path = tmp_path / "mixed.json"
    path.write_text(json.dumps([ROWS[0], "text"]))
    with pytest.raises(TunesmithError, match=r"mixed\.json: item 2 must be a JSON object, not str"):
        load_rows(str(path))


def test_csv_keeps_cells_as_written(tmp_path):
    path = tmp_path / "rows.csv"
    path.write_text('prompt,completion\n42,"a, b"\nhi,\n', encoding="utf-8")
    assert load_rows(str(path)) == ([{"prompt": "42", "completion": "a, b"}, {"prompt": "hi", "completion": ""}],
                                    str(path))


def test_csv_ragged_row_names_line(tmp_path):
    path = tmp_path / "ragged.csv"
    path.write_text("prompt,completion\na,b\nc,d,e\n", encoding="utf-8")
    with pytest.raises(TunesmithError, match=r"ragged\.csv: line 3 has 3 cells but the header has 2"):
        load_rows(str(path))


def test_parquet_with_nested_messages(tmp_path):
    path = tmp_path / "chat.parquet"
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    pd.DataFrame({"messages": [messages]}).to_parquet(path)
    assert load_rows(str(path)) == ([{"messages": messages}], str(path))


def test_saved_dataset_dir(tmp_path):
    Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "saved"))
    assert load_rows(str(tmp_path / "saved")) == (ROWS, str(tmp_path / "saved"))


def test_saved_dataset_dict_picks_split(tmp_path):
    path = tmp_path / "dict"
    DatasetDict({"train": Dataset.from_list(ROWS), "test": Dataset.from_list(ROWS[:1])}).save_to_disk(str(path))
    assert load_rows(str(path)) == (ROWS, f"{path}[train]")
    assert load_rows(str(path), split="test") == (ROWS[:1], f"{path}[test]")
    with pytest.raises(TunesmithError, match=r"has no split 'validation'; it has train, test"):
        load_rows(str(path), split="validation")


def test_directory_that_is_not_a_dataset(tmp_path):
    with pytest.raises(TunesmithError, match="is a directory but not a saved dataset"):
        load_rows(str(tmp_path))


def test_missing_file_names_path(tmp_path):
    path = tmp_path / "nowhere" / "train.jsonl"
    with pytest.raises(TunesmithError) as info:
        load_rows(str(path))
    assert str(info.value) == f"dataset file {path} does not exist; check the path"


def test_empty_file(tmp_path):
    path = write_jsonl(tmp_path / "empty.jsonl", [""])
    with pytest.raises(TunesmithError, match=r"empty\.jsonl holds no rows"):
        load_rows(str(path))


def test_hub_id_offline_fails_fast(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    with pytest.raises(TunesmithError) as info:
        load_rows("some-org/some-dataset")
    assert time.monotonic() - start < 1.0
    message = str(info.value)
    assert message.startswith("dataset 'some-org/some-dataset' is not a local file, so it was taken as a hub id")
    assert "hub cannot be reached (offline)" in message and "pass a local file" in message


@pytest.mark.parametrize("source, split, name, n, first_key", [
    ("builtin", None, "builtin:train", 400, "messages"),
    ("builtin:test", None, "builtin:test", 100, "messages"),
    ("builtin", "test", "builtin:test", 100, "messages"),
    ("builtin-preference", None, "builtin-preference:train", 400, "prompt"),
    ("builtin-preference:test", None, "builtin-preference:test", 100, "prompt"),
])
def test_builtin_sources(source, split, name, n, first_key):
    rows, got_name = load_rows(source, split=split)
    assert (got_name, len(rows), next(iter(rows[0]))) == (name, n, first_key)


def test_builtin_unknown_split():
    with pytest.raises(TunesmithError, match="the built-in task has no split 'dev'; choose one of train, test"):
        load_rows("builtin:dev")
