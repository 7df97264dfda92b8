"""Every issue-2 command through the CLI on tiny deterministic models, and its errors."""

import json
import subprocess
import sys

import pytest

from tunesmith.cli import main
from tunesmith.engine import generate
from tunesmith.generate import SamplingConfig
from tunesmith.models import load
from tunesmith.templates import render_prompt

MESSAGES = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]


def _write(path, obj):
    path.write_text(json.dumps(obj))
    return str(path)


def test_template_plain_view(tmp_path, tiny_model_dir, capsys):
    path = _write(tmp_path / "m.json", {"messages": MESSAGES})
    assert main(["template", "--model", str(tiny_model_dir), "--messages", path, "--no-color"]) == 0
    out = capsys.readouterr().out
    assert out == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
                   "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n[[Hello<|im_end|>]]\n\n"
                   "-- 2 of 34 tokens trained in 1 span(s)\n")


def test_template_builtin_and_colour(tmp_path, tiny_model_dir, capsys):
    path = _write(tmp_path / "m.json", MESSAGES)
    assert main(["template", "--model", str(tiny_model_dir), "--messages", path, "--template", "zephyr"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("\x1b[2m<|user|>\nHi</s>\n<|assistant|>\n\x1b[0m\x1b[30;42mHello</s>")


def test_template_errors_name_the_file(tmp_path, tiny_model_dir, capsys):
    bad = _write(tmp_path / "bad.json", [{"role": "assistant", "content": "x"}, {"role": "user", "content": "y"}])
    assert main(["template", "--model", str(tiny_model_dir), "--messages", bad]) == 2
    err = capsys.readouterr().err
    assert err == (f"error: {bad}: the first non-system message is from the assistant; a conversation starts "
                   "with the user; fix the conversation\n")
    assert main(["template", "--messages", str(tmp_path / "none.json")]) == 2
    assert "none.json: no such file" in capsys.readouterr().err


def test_data_inspect_json_and_row_errors(tmp_path, tiny_model_dir, capsys):
    rows = [{"messages": MESSAGES}, {"messages": [{"role": "wizard", "content": "x"}]}]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["data", "inspect", str(path), "--model", str(tiny_model_dir)]) == 2
    err = capsys.readouterr().err
    assert "d.jsonl: line 2:" in err and "wizard" in err
    assert main(["data", "inspect", str(path), "--model", str(tiny_model_dir), "--invalid-rows", "drop",
                 "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["rows"], report["dropped"], report["dropped_rows"], report["trained_tokens"]) == (2, 1, [2], 2)


def test_data_inspect_builtin_text(tiny_model_dir, capsys):
    assert main(["data", "inspect", "builtin:test", "--model", str(tiny_model_dir)]) == 0
    out = capsys.readouterr().out
    assert "format        messages  (chat: 100)" in out
    assert "rows          100  valid 100  dropped 0" in out


def _reference_reply(model_dir, prompt):
    loaded = load(str(model_dir))
    ids = render_prompt(loaded.tokenizer, [{"role": "user", "content": prompt}])
    (new,) = generate(loaded.model, [ids], sampling=SamplingConfig(max_new_tokens=12), stop_ids=[2], pad_id=2)
    return loaded.tokenizer.decode(new, skip_special_tokens=True)


def test_chat_one_shot_streams_greedy_reply(tiny_model_dir, capsys):
    assert main(["chat", "--model", str(tiny_model_dir), "--prompt", "Hi", "--max-tokens", "12"]) == 0
    out = capsys.readouterr().out
    assert out == _reference_reply(tiny_model_dir, "Hi") + "\n"


def test_chat_interactive_keeps_history(tiny_model_dir, capsys, monkeypatch):
    import io

    monkeypatch.setattr(sys, "stdin", io.StringIO("Hi\nMore\n/exit\n"))
    from tunesmith import chat as chat_module

    seen = []
    real = chat_module.render_prompt
    monkeypatch.setattr(chat_module, "render_prompt", lambda tok, msgs, **kw: seen.append(msgs) or real(tok, msgs, **kw))
    assert main(["chat", "--model", str(tiny_model_dir), "--max-tokens", "4", "--system", "S"]) == 0
    assert [m["role"] for m in seen[1]] == ["system", "user", "assistant", "user"]
    assert seen[1][2]["content"] == _reference_reply(tiny_model_dir, "Hi")[:len(seen[1][2]["content"])]
    assert capsys.readouterr().out.count("> ") == 3


def test_compare_side_by_side(tiny_model_dir, tmp_path, capsys):
    from tinymodels import build_tiny_llama

    other = tmp_path / "other"
    build_tiny_llama(seed=1).save_pretrained(other)
    load(str(tiny_model_dir)).tokenizer.save_pretrained(other)
    assert main(["compare", "--model", str(tiny_model_dir), "--model", str(other), "--prompt", "Hi",
                 "--max-tokens", "6", "--width", "100"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(str(tiny_model_dir)[:48]) and " | " in lines[0]
    assert lines[1] == "-" * 48 + " | " + "-" * 48


def test_console_script_error_exit_code(tmp_path):
    result = subprocess.run([sys.executable, "-m", "tunesmith.cli", "chat", "--model", str(tmp_path / "nope")],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().startswith("error: model ") and "not found" in result.stderr
