"""Issue 11 (data): every user-fixable data problem ends in one `error:` line naming the file, the line or
row and what to do — or, under `--invalid-rows drop`, in a dropped row counted with its number."""

import json

import pytest

from tunesmith.cli import main
from tunesmith.data.formats import normalise
from tunesmith.data.pipeline import prepare
from tunesmith.data.sources import load_rows
from tunesmith.data.tokenize import TokenizeOptions
from tunesmith.errors import TunesmithError
from tunesmith.templates import IGNORE_INDEX

USER = {"role": "user", "content": "Say hi"}
ASSISTANT = {"role": "assistant", "content": "hi there"}
CHAT = [USER, ASSISTANT]
TOOL_CALL = {"role": "assistant", "content": None,
             "tool_calls": [{"type": "function", "function": {"name": "get_time", "arguments": "{}"}}]}
TOOL_ROW = {"messages": [USER, TOOL_CALL, {"role": "tool", "content": "12:00"}, ASSISTANT]}
# A chatml template that renders tool calls, as tool-capable templates (Qwen, Llama 3.1) do.
TOOLS_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message.tool_calls %}{% for call in message.tool_calls %}"
    "{{ '<tool_call>' + call.function.name + '</tool_call>' }}{% endfor %}"
    "{% else %}{{ message['content'] }}{% endif %}{{ '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _inspect(capsys, model_dir, path, *flags):
    code = main(["data", "inspect", str(path), "--model", str(model_dir), "--json", *flags])
    out, err = capsys.readouterr()
    return code, (json.loads(out) if code == 0 else None), err


def _one_error_line(err: str) -> str:
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


# --- 1. a row the template cannot render is that row's problem, not the dataset's


def test_tool_call_rows_are_refused_by_line_when_the_template_cannot_render_them(tmp_path, tiny_model_dir, capsys):
    path = _jsonl(tmp_path / "tools.jsonl", [{"messages": CHAT}, TOOL_ROW, {"messages": CHAT}])
    code, _, err = _inspect(capsys, tiny_model_dir, path)
    assert code == 2
    assert _one_error_line(err) == (
        f"error: {path}: line 2: conversation message 2 calls tools (tool_calls) but this chat template cannot "
        "render tool calls (choose one that does with --template or model.template); fix the row, or skip bad "
        "rows with "
        "--invalid-rows drop (data.invalid_rows=drop in a training config)\n")
    code, report, _ = _inspect(capsys, tiny_model_dir, path, "--invalid-rows", "drop")
    assert code == 0 and report["valid_rows"] == 2 and report["sequences"] == 2
    assert report["dropped_unit"] == "line" and report["dropped_rows"] == [2]


def test_tool_call_rows_train_when_the_template_renders_them(tmp_path, tiny_model_dir, tokenizer, capsys):
    path = _jsonl(tmp_path / "tools.jsonl", [TOOL_ROW])
    code, report, _ = _inspect(capsys, tiny_model_dir, path, "--template", TOOLS_TEMPLATE)
    assert code == 0 and report["dropped"] == 0
    tokenizer = type(tokenizer).from_pretrained(tiny_model_dir)
    tokenizer.chat_template = TOOLS_TEMPLATE
    (example,) = prepare(str(path), tokenizer, TokenizeOptions()).examples
    trained = tokenizer.decode([t for t in example["labels"] if t != IGNORE_INDEX])
    assert trained == "<tool_call>get_time</tool_call><|im_end|>hi there<|im_end|>"


def test_a_template_error_on_one_row_names_that_row(tmp_path, tiny_model_dir, capsys):
    no_system = ("{% for message in messages %}{% if message['role'] == 'system' %}"
                 "{{ raise_exception('system messages are not supported') }}{% endif %}"
                 "{{ message['role'] + ': ' + message['content'] + '<|im_end|>' }}{% endfor %}"
                 "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}")
    rows = [{"messages": CHAT}, {"messages": [{"role": "system", "content": "Be brief"}, *CHAT]}]
    path = _jsonl(tmp_path / "d.jsonl", rows)
    code, _, err = _inspect(capsys, tiny_model_dir, path, "--template", no_system)
    assert code == 2
    assert _one_error_line(err).startswith(f"error: {path}: line 2: the chat template failed on this row "
                                           "(system messages are not supported)")
    code, report, _ = _inspect(capsys, tiny_model_dir, path, "--template", no_system, "--invalid-rows", "drop")
    assert code == 0 and report["dropped_rows"] == [2] and report["sequences"] == 1


# --- 2. JSONL lines end at "\n" only


def test_jsonl_keeps_unicode_line_separators_inside_strings(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"text": "a\u2028b\x85c"}, ensure_ascii=False) + "\r\n"
                    + json.dumps({"text": "second"}) + "\r\n", encoding="utf-8")
    rows, _ = load_rows(str(path))
    assert rows == [{"text": "a\u2028b\x85c"}, {"text": "second"}]


# --- 3. undecodable bytes, lone surrogates, deep nesting


@pytest.mark.parametrize("suffix, content", [
    ("jsonl", b'{"text": "fine"}\n{"text": "caf\xe9"}\n'),
    ("csv", b'text\ncaf\xe9\nfine\n'),
    ("json", b'[{"text": "fine"},\n{"text": "caf\xe9"}]\n'),
])
def test_non_utf8_files_name_the_line(tmp_path, tiny_model_dir, capsys, suffix, content):
    path = tmp_path / f"latin1.{suffix}"
    path.write_bytes(content)
    code, _, err = _inspect(capsys, tiny_model_dir, path)
    assert code == 2
    assert _one_error_line(err) == (f"error: {path}: line 2 is not UTF-8 text (invalid continuation byte at "
                                    "byte " + str(content.index(b"\xe9")) + "); re-save the file as UTF-8\n")


def test_lone_surrogate_escape_refuses_the_row(tmp_path, tiny_model_dir, capsys):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "fine"}\n{"text": "bad \\ud800 escape"}\n')
    code, _, err = _inspect(capsys, tiny_model_dir, path)
    assert code == 2
    assert _one_error_line(err).startswith(
        f"error: {path}: line 2: text holds a lone surrogate '\\ud800' (a \\u escape that is not valid "
        "Unicode text); fix the row")
    code, report, _ = _inspect(capsys, tiny_model_dir, path, "--invalid-rows", "drop")
    assert code == 0 and report["dropped_rows"] == [2] and report["sequences"] == 1


def test_deeply_nested_json_names_the_line(tmp_path, tiny_model_dir, capsys):
    path = tmp_path / "deep.jsonl"
    path.write_text('{"text": "fine"}\n{"text": "x", "meta": ' + "[" * 100_000 + "]" * 100_000 + "}\n")
    code, _, err = _inspect(capsys, tiny_model_dir, path)
    assert code == 2
    assert _one_error_line(err) == (f"error: {path}: line 2 nests too deeply to read; "
                                    "flatten the nested lists or objects\n")
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    code, _, err = _inspect(capsys, tiny_model_dir, deep)
    assert code == 2
    assert _one_error_line(err) == (f"error: {deep}: the JSON nests too deeply to read; "
                                    "flatten the nested lists or objects\n")


# --- 4. a packing budget shorter than an example


def test_token_budget_below_an_example_names_the_key_the_line_and_the_length(tmp_path, tokenizer):
    path = _jsonl(tmp_path / "d.jsonl", [{"messages": CHAT}, {"messages": [USER, {"role": "assistant",
                                                                                   "content": "hi " * 20}]}])
    prepared = prepare(str(path), tokenizer, TokenizeOptions())
    long = len(prepared.examples[1]["input_ids"])
    prepared.check_token_budget(long)
    with pytest.raises(TunesmithError) as info:
        prepared.check_token_budget(long - 1)
    assert str(info.value) == (f"{path}: line 2 is {long} tokens long, more than data.token_budget={long - 1} "
                               "(the tokens of one packed row); raise data.token_budget to at least "
                               f"{long}, or lower data.max_length to {long - 1} to truncate longer examples")


# --- 5. the bad-row hint names the flag and the config key


def test_row_error_hint_names_the_cli_flag_and_the_config_key(tmp_path, tiny_model_dir, capsys):
    path = _jsonl(tmp_path / "d.jsonl", [{"messages": CHAT}, {"messages": [USER]}])
    code, _, err = _inspect(capsys, tiny_model_dir, path)
    assert code == 2
    assert _one_error_line(err) == (f"error: {path}: line 2: no assistant message to train on; fix the row, or "
                                    "skip bad rows with --invalid-rows drop (data.invalid_rows=drop in a "
                                    "training config)\n")


# --- 6. rows that used to be accepted silently


@pytest.mark.parametrize("row, reason", [
    ({"messages": [{"role": "user", "content": "  \n"}, ASSISTANT]},
     "conversation message 1 is a user message with empty content"),
    ({"messages": [USER, {**ASSISTANT, "weight": 0.5}]},
     "conversation message 2 has weight 0.5; use 0 (not trained) or 1 (trained)"),
    ({"messages": [{**USER, "weight": 1}, ASSISTANT]},
     "conversation message 1 has weight 1 but only assistant messages are trained"),
    ({"messages": [USER, {**ASSISTANT, "weight": 0}]}, "no assistant message to train on (every one has weight 0)"),
    ({"messages": CHAT, "images": ["cat.png"]},
     "the row has images in column 'images', but a text-only model cannot see them"),
    ({"messages": CHAT, "image": "cat.png"},
     "the row has images in column 'image', but a text-only model cannot see them"),
    ({"messages": [{"role": "user", "content": [{"type": "image", "url": "cat.png"}, {"type": "text", "text": "?"}]},
                   ASSISTANT]},
     "messages message 1 content part 1 is of type 'image', but a text-only model can read only text parts"),
    ({"messages": [{"role": "user", "content": [{"type": "text"}]}, ASSISTANT]},
     "messages message 1 content part 1 has no text string"),
    ({"prompt": [{"role": "assistant", "content": "Hi"}], "chosen": [ASSISTANT],
      "rejected": [{"role": "assistant", "content": "no"}]},
     "the prompt's first non-system message is from the assistant; a prompt starts with the user"),
])
def test_silently_accepted_rows_are_now_invalid(row, reason):
    with pytest.raises(TunesmithError) as info:
        normalise([row], name="d.json")
    assert str(info.value).startswith(f"d.json: row 1: {reason}; fix the row")
    good = {"prompt": "Hi", "chosen": "yes", "rejected": "no"} if "chosen" in row else {"messages": CHAT}
    assert normalise([row, good], policy="drop").dropped == [(1, reason)]


def test_text_content_parts_are_joined_into_the_content_string():
    row = {"messages": [{"role": "user", "content": [{"type": "text", "text": "Look:"}, {"type": "text",
                                                                                       "text": "a cat"}]},
                        {"role": "assistant", "content": [{"type": "text", "text": "Nice cat"}]}]}
    (example,) = normalise([row]).examples
    assert example.messages == [{"role": "user", "content": "Look:\na cat"},
                                {"role": "assistant", "content": "Nice cat"}]


def test_weight_zero_turns_are_not_trained(tmp_path, tokenizer):
    second = {"role": "assistant", "content": "bye now"}
    rows = [{"messages": [USER, {**ASSISTANT, "weight": 0}, {"role": "user", "content": "Bye"}, {**second,
                                                                                                 "weight": 1}]}]
    path = _jsonl(tmp_path / "d.jsonl", rows)
    (example,) = prepare(str(path), tokenizer, TokenizeOptions()).examples
    trained = tokenizer.decode([t for t in example["labels"] if t != IGNORE_INDEX])
    assert trained == "bye now<|im_end|>"


# --- 7. empty, wrong-type and unknown inputs end in one error line


@pytest.mark.parametrize("name, content, flags, message", [
    ("empty.jsonl", "\n\n", [], "{path} holds no rows; point at a dataset with at least one example"),
    ("header.csv", "text\n", [], "{path} holds no rows; point at a dataset with at least one example"),
    ("notes.txt", "hello", [], "{path}: unknown file type '.txt'; use .jsonl, .json, .csv or .parquet"),
    ("scalar.json", "3", [], "{path}: top-level JSON must be a list of objects, not int"),
    ("d.jsonl", json.dumps({"messages": CHAT}), ["--format", "chatml"],
     "unknown dataset format 'chatml'; choose one of messages, prompt_completion, text, alpaca, sharegpt, "
     "preference"),
    ("share.jsonl", json.dumps({"conversations": [{"from": ["human"], "value": "hi"}]}), [],
     "{path}: line 1: conversations message 1 has unknown speaker ['human']; use one of human, user, gpt, "
     "assistant, model, system, tool, function; fix the row, or skip bad rows with --invalid-rows drop "
     "(data.invalid_rows=drop in a training config)"),
])
def test_bad_inputs_end_in_one_error_line(tmp_path, tiny_model_dir, capsys, name, content, flags, message):
    path = tmp_path / name
    path.write_text(content)
    code, _, err = _inspect(capsys, tiny_model_dir, path, *flags)
    assert code == 2
    assert _one_error_line(err) == f"error: {message.format(path=path)}\n"


# --- 8. one numbering: the line in a line-based file, the row elsewhere; a BOM is not part of a name


def test_jsonl_numbers_are_file_lines_even_after_blank_lines(tmp_path, tiny_model_dir, capsys):
    path = tmp_path / "gaps.jsonl"
    good = json.dumps({"messages": CHAT})
    path.write_text(f"{good}\n\n{good}\n\n\n" + json.dumps({"messages": [USER]}) + "\n")
    code, _, err = _inspect(capsys, tiny_model_dir, path)
    assert code == 2 and _one_error_line(err).startswith(f"error: {path}: line 6: no assistant message")
    code, report, _ = _inspect(capsys, tiny_model_dir, path, "--invalid-rows", "drop")
    assert code == 0 and report["dropped_rows"] == [6]


def test_csv_numbers_are_the_line_where_the_record_starts(tmp_path, tiny_model_dir, capsys):
    path = tmp_path / "d.csv"
    path.write_text('prompt,completion\nHi,"there\nfriend"\n\nHello,\n')
    code, _, err = _inspect(capsys, tiny_model_dir, path)
    assert code == 2 and _one_error_line(err).startswith(f"error: {path}: line 5: completion is empty")
    ragged = tmp_path / "ragged.csv"
    ragged.write_text("prompt,completion\nHi,there\n\"a\nb\",c,d\n")
    code, _, err = _inspect(capsys, tiny_model_dir, ragged)
    assert code == 2
    assert _one_error_line(err) == (f"error: {ragged}: line 3 has 3 cells but the header has 2; "
                                    "fix the quoting or the row\n")


def test_csv_cells_longer_than_the_csv_module_default_limit_are_read(tmp_path):
    path = tmp_path / "long.csv"
    path.write_text("text\n" + "word " * 40_000 + "\n")
    rows, _ = load_rows(str(path))
    assert rows == [{"text": "word " * 40_000}]


def test_json_list_items_are_rows(tmp_path, tiny_model_dir, capsys):
    path = tmp_path / "d.json"
    path.write_text(json.dumps([{"messages": CHAT}, {"messages": CHAT}, {"messages": [USER]}], indent=2))
    code, _, err = _inspect(capsys, tiny_model_dir, path)
    assert code == 2 and _one_error_line(err).startswith(f"error: {path}: row 3: no assistant message")


@pytest.mark.parametrize("suffix, body", [
    ("csv", "prompt,completion\nHi,there\n"),
    ("json", json.dumps([{"prompt": "Hi", "completion": "there"}])),
    ("jsonl", json.dumps({"prompt": "Hi", "completion": "there"}) + "\n"),
])
def test_a_utf8_bom_is_not_part_of_the_data(tmp_path, suffix, body):
    path = tmp_path / f"bom.{suffix}"
    path.write_text("\ufeff" + body, encoding="utf-8")
    rows, _ = load_rows(str(path))
    assert rows == [{"prompt": "Hi", "completion": "there"}]
