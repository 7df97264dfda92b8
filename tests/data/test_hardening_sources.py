"""Issue 25 (data sources): unreadable, malformed or special inputs end in one `error:` line, exit 2, that
names the file and the line — never a traceback, and never silently accepted."""

from __future__ import annotations

import json
import os

import pytest

from tunesmith.cli import main

ROW = {"messages": [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "hi"}]}


def _error(capsys, model_dir, source) -> str:
    code = main(["data", "inspect", str(source), "--model", str(model_dir), "--json"])
    out, err = capsys.readouterr()
    assert code == 2 and out == "" and err.startswith("error: ") and err.count("\n") == 1, (code, out, err)
    return err.removeprefix("error: ").removesuffix("\n")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv"])
def test_an_unreadable_file_is_named(tmp_path, tiny_model_dir, capsys, suffix):
    path = tmp_path / f"rows{suffix}"
    path.write_text("x")
    path.chmod(0)
    assert _error(capsys, tiny_model_dir, path) == f"{path}: cannot read the file (Permission denied); check its permissions"


def test_a_directory_passed_as_a_file_is_refused_by_reading(tmp_path, tiny_model_dir, capsys, monkeypatch):
    """The same read error path, reachable as root: reading a path that turns out unreadable (EISDIR)."""
    from tunesmith.data import sources

    with pytest.raises(sources.TunesmithError, match=r"rows.jsonl: cannot read the file \(Is a directory\)"):
        (tmp_path / "rows.jsonl").mkdir()
        sources._read_text(tmp_path / "rows.jsonl", str(tmp_path / "rows.jsonl"))


def test_a_5000_digit_integer_is_named_by_line(tmp_path, tiny_model_dir, capsys):
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps(ROW) + "\n" + '{"messages": [], "n": ' + "7" * 5000 + "}\n")
    assert _error(capsys, tiny_model_dir, path) == (
        f"{path}: line 2 holds a number too long to read (Exceeds the limit (4300 digits) for integer string "
        "conversion); write it as a string or fix the row")


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_a_duplicate_key_is_refused(tmp_path, tiny_model_dir, capsys, suffix):
    bad = '{"messages": "not a list", "messages": ' + json.dumps(ROW["messages"]) + "}"
    path = tmp_path / f"rows{suffix}"
    path.write_text(json.dumps(ROW) + "\n" + bad + "\n" if suffix == ".jsonl" else "[" + json.dumps(ROW) + "," + bad + "]")
    where = "line 2" if suffix == ".jsonl" else "the JSON"
    assert _error(capsys, tiny_model_dir, path) == (
        f"{path}: {where} has the key 'messages' twice in one object (JSON keeps only the last); remove one of them")


def test_a_csv_quote_never_closed_is_refused_with_its_line(tmp_path, tiny_model_dir, capsys):
    path = tmp_path / "rows.csv"
    path.write_text('text\nfirst row\n"second row\nthird row\nfourth row\nfifth row\n')
    assert _error(capsys, tiny_model_dir, path) == (
        f"{path}: line 3: a quoted cell is never closed (the quote runs to the end of the file); close the quote "
        'or escape it as ""')


def test_a_csv_duplicate_header_is_refused(tmp_path, tiny_model_dir, capsys):
    path = tmp_path / "rows.csv"
    path.write_text("prompt,completion,prompt\na,b,c\n")
    assert _error(capsys, tiny_model_dir, path) == (
        f"{path}: line 1: the header names the column 'prompt' twice (one would hide the other); rename one of them")


def test_a_fifo_and_a_symlink_loop_are_named_as_such(tmp_path, tiny_model_dir, capsys):
    fifo = tmp_path / "rows.jsonl"
    os.mkfifo(fifo)
    assert _error(capsys, tiny_model_dir, fifo) == (
        f"dataset path {fifo} is not a regular file (a FIFO, socket or device); save the data to a file and pass that")
    loop = tmp_path / "loop.jsonl"
    loop.symlink_to(loop)
    assert _error(capsys, tiny_model_dir, loop) == (
        f"dataset path {loop} is a symbolic link loop; point it at a real file")


def test_an_empty_path_and_a_nul_byte(tiny_model_dir, capsys):
    assert _error(capsys, tiny_model_dir, "") == (
        "no dataset given (an empty path); pass a data file, a saved dataset dir or builtin")
    from tunesmith.data.sources import load_rows
    from tunesmith.errors import TunesmithError

    with pytest.raises(TunesmithError, match=r"^dataset path 'a\\x00b.jsonl' holds a NUL byte; pass the path as it is on disk$"):
        load_rows("a\x00b.jsonl")  # a YAML config can spell one ("\0"); a command line cannot


def test_a_zero_row_parquet_says_it_holds_no_rows_and_writes_no_cache(tmp_path, tiny_model_dir, capsys, monkeypatch):
    import pyarrow
    import pyarrow.parquet

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf" / "datasets"))
    path = tmp_path / "rows.parquet"
    pyarrow.parquet.write_table(pyarrow.table({"text": pyarrow.array([], pyarrow.string())}), path)
    assert _error(capsys, tiny_model_dir, path) == (
        f"{path} holds no rows; point at a dataset with at least one example")
    pyarrow.parquet.write_table(pyarrow.Table.from_pylist([ROW]), path)
    assert main(["data", "inspect", str(path), "--model", str(tiny_model_dir), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["rows"] == 1
    assert not (tmp_path / "hf").exists()


def test_a_saved_dataset_dir_with_garbage_metadata(tmp_path, tiny_model_dir, capsys):
    import datasets

    saved = tmp_path / "saved"
    datasets.Dataset.from_list([ROW]).save_to_disk(str(saved))
    (saved / "dataset_info.json").write_text("{garbage")
    capsys.readouterr()  # save_to_disk's progress bar
    message = _error(capsys, tiny_model_dir, saved)
    assert message.startswith(f"{saved}: cannot read the saved dataset (") and message.endswith(
        "); save it again with save_to_disk")


def test_a_dataset_dict_dir_missing_a_split_dir_is_not_told_it_lacks_the_marker(tmp_path, tiny_model_dir, capsys):
    import shutil

    import datasets

    saved = tmp_path / "saved"
    datasets.DatasetDict({"train": datasets.Dataset.from_list([ROW])}).save_to_disk(str(saved))
    shutil.rmtree(saved / "train")
    capsys.readouterr()
    message = _error(capsys, tiny_model_dir, saved)
    assert message.startswith(f"{saved}: cannot read the saved dataset (") and "dataset_dict.json)" not in message
