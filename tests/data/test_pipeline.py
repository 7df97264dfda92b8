"""Tokenization policies, the trained-token guard, and `data inspect` numbers."""

import json

import pytest

from tunesmith.data.formats import Example
from tunesmith.data.pipeline import format_inspection, inspection, prepare
from tunesmith.data.tokenize import TokenizeOptions, tokenize_examples
from tunesmith.errors import TunesmithError

CHAT = [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "hi there friend"}]


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_completion_and_text_labels(tokenizer):
    examples = [Example(kind="completion", row=1, prompt="2+2=", completion=" 4"),
                Example(kind="text", row=2, text="hello world")]
    (completion, text) = tokenize_examples(tokenizer, examples, TokenizeOptions()).examples
    prompt_len = len(tokenizer("2+2=")["input_ids"])
    assert completion["labels"][:prompt_len] == [-100] * prompt_len
    assert completion["labels"][prompt_len:] == completion["input_ids"][prompt_len:]
    assert completion["input_ids"][-1] == tokenizer.eos_token_id
    assert text["labels"] == text["input_ids"]
    assert text["input_ids"][-1] == tokenizer.eos_token_id


def test_overlength_policies(tokenizer):
    (full,) = tokenize_examples(tokenizer, [Example(kind="chat", row=7, messages=CHAT)], TokenizeOptions()).examples
    n = len(full["input_ids"])
    trained_from = next(i for i, label in enumerate(full["labels"]) if label != -100)
    example = [Example(kind="chat", row=7, messages=CHAT)]

    cut = tokenize_examples(tokenizer, example, TokenizeOptions(max_length=n - 1))
    assert cut.truncated == 1 and len(cut.examples[0]["input_ids"]) == n - 1

    dropped = tokenize_examples(tokenizer, example, TokenizeOptions(max_length=n - 1, overlength="drop"))
    assert dropped.examples == [] and dropped.dropped == [(7, f"{n} tokens is over max_length {n - 1}")]

    with pytest.raises(TunesmithError, match=f"row 7: {n} tokens is over max_length {n - 1}; raise max_length"):
        tokenize_examples(tokenizer, example, TokenizeOptions(max_length=n - 1, overlength="error"))

    # Truncated before the answer starts: never trained silently, dropped with the reason.
    nothing = tokenize_examples(tokenizer, example, TokenizeOptions(max_length=trained_from))
    assert nothing.examples == []
    assert nothing.dropped == [(7, f"no trained token left after truncation to max_length {trained_from}")]


def test_dataset_without_trained_tokens_is_refused(tmp_path, tokenizer):
    path = _write_jsonl(tmp_path / "d.jsonl", [{"messages": CHAT}] * 3)
    with pytest.raises(TunesmithError, match="d.jsonl: no row has a trained token .*3 rows dropped"):
        prepare(path, tokenizer, TokenizeOptions(max_length=8))


def test_inspection_report(tmp_path, tokenizer):
    rows = [{"messages": CHAT}, {"messages": [{"role": "user", "content": "x"}]}, {"messages": CHAT}]
    path = _write_jsonl(tmp_path / "d.jsonl", rows)
    report = inspection(prepare(path, tokenizer, TokenizeOptions(), invalid_rows="drop"))
    (seq,) = tokenize_examples(tokenizer, [Example(kind="chat", row=1, messages=CHAT)], TokenizeOptions()).examples
    n = len(seq["input_ids"])
    assert report["format"] == "messages"
    assert (report["rows"], report["valid_rows"], report["dropped"], report["sequences"]) == (3, 2, 1, 2)
    assert report["dropped_rows"] == [2]
    assert report["dropped_by_reason"] == {"no assistant message to train on": {"count": 1, "first": [2]}}
    assert report["tokens"] == 2 * n
    assert report["trained_tokens"] == 2 * 4  # "hi there friend" is 3 tokens, plus <|im_end|>
    assert report["length"] == {"min": n, "max": n, "mean": float(n)}
    assert report["length_histogram"] == [{"from": n, "to": n, "count": 2}]


def test_drops_joins_validation_and_tokenization_drops_by_reason(tmp_path, tokenizer):
    short = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "ok"}]
    rows = ([{"messages": [{"role": "user", "content": "x"}]}] * 6 + [{"messages": CHAT}] * 2
            + [{"messages": short}])
    path = _write_jsonl(tmp_path / "d.jsonl", rows)
    prepared = prepare(path, tokenizer, TokenizeOptions(max_length=35, overlength="drop"), invalid_rows="drop")
    (kept,) = prepared.examples
    n = len(tokenize_examples(tokenizer, [Example(kind="chat", row=1, messages=CHAT)], TokenizeOptions())
            .examples[0]["input_ids"])
    assert prepared.drops() == {"count": 8, "unit": "line", "by_reason": {
        "no assistant message to train on": {"count": 6, "first": [1, 2, 3, 4, 5]},
        f"{n} tokens is over max_length 35": {"count": 2, "first": [7, 8]}}}
    assert "  dropped     6 × no assistant message to train on (lines 1, 2, 3, 4, 5, …)" in format_inspection(
        inspection(prepared))
