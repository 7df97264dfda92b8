"""Each bad row gives one exact reason; policy error stops at the first, policy drop counts them all."""

from __future__ import annotations

import json

import pytest

from tunesmith.data.formats import normalise
from tunesmith.data.sources import load_rows
from tunesmith.errors import TunesmithError

SYSTEM = {"role": "system", "content": "Be brief."}
USER = {"role": "user", "content": "Hi"}
ASSISTANT = {"role": "assistant", "content": "Hello!"}
CALL = [{"type": "function", "function": {"name": "clock", "arguments": "{}"}}]

BAD_ROWS = [
    ("messages", {"text": "no messages column"}, "missing column 'messages' (messages format)"),
    ("messages", {"messages": "Hi"}, "messages must be a list of messages, not str"),
    ("messages", {"messages": [USER, "Hello!"]}, "messages message 2 must be an object, not str"),
    ("messages", {"messages": []}, "conversation holds no messages"),
    ("messages", {"messages": [{"content": "Hi"}, ASSISTANT]}, "conversation message 1 has no 'role' key"),
    ("messages", {"messages": [USER, {"role": "assistant"}]}, "conversation message 2 has no 'content' key"),
    ("messages", {"messages": [{"role": "human", "content": "Hi"}, ASSISTANT]},
     "conversation message 1 has unknown role 'human'; use one of system, user, assistant, tool"),
    ("messages", {"messages": [USER, SYSTEM, ASSISTANT]},
     "conversation message 2 is a system message but only the first message may be one"),
    ("messages", {"messages": [{"role": "user", "content": ["Hi"]}, ASSISTANT]},
     'messages message 1 content part 1 must be an object such as {"type": "text", "text": ...}, not str'),
    ("messages", {"messages": [{"role": "user", "content": {"text": "Hi"}}, ASSISTANT]},
     "conversation message 1 content must be a string, not dict"),
    ("messages", {"messages": [{"role": "user", "content": None}, ASSISTANT]},
     "conversation message 1 content must be a string, not null"),
    ("messages", {"messages": [USER, {"role": "assistant", "content": None}]},
     "conversation message 2 content must be a string, not null"),
    ("messages", {"messages": [USER, {"role": "assistant", "content": " \n"}]},
     "conversation message 2 is an assistant message with empty content"),
    ("messages", {"messages": [SYSTEM, ASSISTANT, USER, ASSISTANT]},
     "the first non-system message is from the assistant; a conversation starts with the user"),
    ("messages", {"messages": [SYSTEM, USER]}, "no assistant message to train on"),
    ("prompt_completion", {"prompt": [USER, ASSISTANT], "completion": [{"role": "user", "content": "More?"}]},
     "no assistant message to train on"),
    ("sharegpt", {"conversations": [{"from": "human"}]}, "conversations message 1 has no 'value' key"),
    ("sharegpt", {"conversations": [{"from": "bot", "value": "x"}]},
     "conversations message 1 has unknown speaker 'bot'; "
     "use one of human, user, gpt, assistant, model, system, tool, function"),
    ("alpaca", {"instruction": "Do it.", "output": ""}, "conversation message 2 is an assistant message with empty content"),
    ("alpaca", {"instruction": "Do it.", "input": 3, "output": "Done."}, "input must be a string, not int"),
    ("text", {"text": "  "}, "text is empty"),
    ("text", {"text": 5}, "text must be a string, not int"),
    ("prompt_completion", {"prompt": "Q", "completion": ""}, "completion is empty"),
    ("prompt_completion", {"prompt": "Q"}, "missing column 'completion' (prompt_completion format)"),
    ("preference", {"prompt": "Q", "chosen": "", "rejected": "b"}, "chosen is empty"),
    ("preference", {"prompt": "Q", "chosen": "a", "rejected": " "}, "rejected is empty"),
    ("preference", {"prompt": "", "chosen": "a", "rejected": "b"}, "prompt is empty"),
    ("preference", {"prompt": [], "chosen": "a", "rejected": "b"}, "prompt holds no messages"),
    ("preference", {"prompt": "Q", "chosen": "same", "rejected": "same"},
     "chosen and rejected are identical, so there is no preference to learn"),
    ("preference", {"prompt": [USER], "chosen": [ASSISTANT], "rejected": [ASSISTANT]},
     "chosen and rejected are identical, so there is no preference to learn"),
    ("preference", {"prompt": [USER], "chosen": [USER, ASSISTANT], "rejected": [ASSISTANT]},
     "chosen holds user messages; it may hold only assistant ones"),
    ("preference", {"prompt": "Q", "chosen": [ASSISTANT], "rejected": "No."},
     "chosen and rejected must both be strings or both be message lists"),
    ("preference", {"prompt": "Q", "chosen": "a", "rejected": None}, "missing column 'rejected' (preference format)"),
]


@pytest.mark.parametrize("fmt, row, reason", BAD_ROWS)
def test_bad_row_reason(fmt, row, reason):
    with pytest.raises(TunesmithError) as info:
        normalise([row], fmt, name="data.jsonl")
    assert str(info.value) == (f"data.jsonl: row 1: {reason}; fix the row, or skip bad rows with "
                               "--invalid-rows drop (data.invalid_rows=drop in a training config)")


@pytest.mark.parametrize("messages", [
    [USER, {"role": "assistant", "content": None, "tool_calls": CALL},
     {"role": "tool", "content": "noon"}, {"role": "assistant", "content": "Noon."}],
    [USER, {"role": "assistant", "content": "", "tool_calls": CALL}],
    [SYSTEM, {"role": "tool", "content": "context"}, USER, ASSISTANT],
])
def test_valid_conversations(messages):
    assert normalise([{"messages": messages}]).dropped == []


def test_error_policy_names_file_and_first_bad_row(tmp_path):
    path = tmp_path / "chat.jsonl"
    rows = [{"messages": [USER, ASSISTANT]}, {"messages": [USER]}, {"messages": [ASSISTANT]}]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    rows, name = load_rows(str(path))
    with pytest.raises(TunesmithError) as info:
        normalise(rows, name=name)
    assert str(info.value) == (f"{path}: line 2: no assistant message to train on; fix the row, or skip bad "
                               "rows with --invalid-rows drop (data.invalid_rows=drop in a training config)")


def test_drop_policy_counts_reasons():
    rows = [{"text": "good"}, {"text": ""}, {"text": "also good"}, {"text": None}, {"text": 7}]
    data = normalise(rows, policy="drop")
    assert [e.row for e in data.examples] == [1, 3]
    assert data.dropped == [(2, "text is empty"), (4, "missing column 'text' (text format)"),
                            (5, "text must be a string, not int")]


def test_drop_policy_with_nothing_left():
    with pytest.raises(TunesmithError) as info:
        normalise([{"text": ""}, {"text": " "}], policy="drop", name="empty.csv")
    assert str(info.value) == ("empty.csv: all 2 rows are invalid and were dropped (row 1: text is empty); "
                               "check the format and the data")
