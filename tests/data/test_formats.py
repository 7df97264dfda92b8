"""Format detection and golden normalised Examples for every input format."""

from __future__ import annotations

import pandas as pd
import pytest

from tunesmith.data.formats import Example, detect_format, normalise
from tunesmith.data.sources import load_rows
from tunesmith.errors import TunesmithError

USER = {"role": "user", "content": "Hi"}
ASSISTANT = {"role": "assistant", "content": "Hello!"}


@pytest.mark.parametrize("columns, fmt", [
    ({"messages"}, "messages"),
    ({"conversations"}, "sharegpt"),
    ({"prompt", "completion"}, "prompt_completion"),
    ({"prompt", "chosen", "rejected"}, "preference"),
    ({"prompt", "completion", "chosen", "rejected"}, "preference"),
    ({"instruction", "input", "output"}, "alpaca"),
    ({"instruction", "output"}, "alpaca"),
    ({"text", "id"}, "text"),
])
def test_detect_format(columns, fmt):
    assert detect_format([{column: "x" for column in columns}]) == fmt


def test_detect_format_uses_columns_of_every_row_but_ignores_nulls():
    assert detect_format([{"text": None, "prompt": "a"}, {"completion": "b"}]) == "prompt_completion"


def test_detect_format_unknown_columns():
    with pytest.raises(TunesmithError) as info:
        detect_format([{"question": "q", "answer": "a"}], name="qa.jsonl")
    assert str(info.value).startswith("qa.jsonl: cannot tell the format from its columns (answer, question); "
                                      "expected columns for one of preference: chosen, rejected; messages: messages;")


def test_messages_keep_extra_keys():
    call = [{"type": "function", "function": {"name": "weather", "arguments": {"city": "Oslo"}}}]
    messages = [
        {"role": "system", "content": "Be brief."},
        USER,
        {"role": "assistant", "content": None, "tool_calls": call, "reasoning_content": "Need the weather."},
        {"role": "tool", "content": "4 C", "name": "weather"},
        {"role": "assistant", "content": "It is 4 C.", "thinking": "Report it."},
    ]
    data = normalise([{"messages": messages}])
    assert data.format == "messages" and data.dropped == []
    assert data.examples == [Example("chat", 1, messages=messages)]
    assert data.examples[0].messages is not messages  # a copy: normalising never edits the caller's rows


def test_sharegpt_maps_speakers():
    conversation = [{"from": "system", "value": "S"}, {"from": "human", "value": "a"}, {"from": "gpt", "value": "b"},
                    {"from": "user", "value": "c"}, {"from": "function", "value": "d", "name": "f"},
                    {"from": "model", "value": "e"}, {"from": "tool", "value": "g"}, {"from": "assistant", "value": "h"}]
    example = normalise([{"conversations": conversation}]).examples[0]
    assert example.messages == [
        {"role": "system", "content": "S"}, {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
        {"role": "user", "content": "c"}, {"role": "tool", "content": "d", "name": "f"},
        {"role": "assistant", "content": "e"}, {"role": "tool", "content": "g"}, {"role": "assistant", "content": "h"},
    ]


def test_alpaca_with_and_without_input():
    rows = [{"instruction": "Translate to French.", "input": "cat", "output": "chat"},
            {"instruction": "Say hi.", "input": "", "output": "hi"},
            {"instruction": "Say bye.", "output": "bye"}]
    assert normalise(rows).examples == [
        Example("chat", 1, messages=[{"role": "user", "content": "Translate to French.\n\ncat"},
                                     {"role": "assistant", "content": "chat"}]),
        Example("chat", 2, messages=[{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "hi"}]),
        Example("chat", 3, messages=[{"role": "user", "content": "Say bye."}, {"role": "assistant", "content": "bye"}]),
    ]


def test_prompt_completion_strings_and_messages():
    rows = [{"prompt": "2+2=", "completion": "4"},
            {"prompt": [{"role": "system", "content": "Maths."}, USER], "completion": [ASSISTANT]}]
    data = normalise(rows)
    assert data.format == "prompt_completion"
    assert data.examples == [
        Example("completion", 1, prompt="2+2=", completion="4"),
        Example("chat", 2, messages=[{"role": "system", "content": "Maths."}, USER, ASSISTANT], first_trained=2),
    ]


def test_prompt_completion_mixed_types_is_invalid():
    with pytest.raises(TunesmithError, match="row 1: prompt and completion must both be strings or both be message"):
        normalise([{"prompt": "Hi", "completion": [ASSISTANT]}])


def test_text():
    assert normalise([{"text": "Once upon a time."}]).examples == [Example("text", 1, text="Once upon a time.")]


def test_preference_strings_and_messages():
    rows = [{"prompt": "Best colour?", "chosen": "Blue.", "rejected": "I cannot say."},
            {"prompt": [USER], "chosen": [ASSISTANT], "rejected": [{"role": "assistant", "content": "Go away."}]}]
    assert normalise(rows).examples == [
        Example("preference", 1, prompt="Best colour?", chosen="Blue.", rejected="I cannot say."),
        Example("preference", 2, messages=[USER], chosen=[ASSISTANT],
                rejected=[{"role": "assistant", "content": "Go away."}]),
    ]


def test_format_override():
    row = {"text": "plain text", "messages": [USER, ASSISTANT]}
    assert normalise([row]).examples[0].kind == "chat"
    assert normalise([row], "text").examples == [Example("text", 1, text="plain text")]


def test_unknown_format_and_policy():
    with pytest.raises(TunesmithError, match="unknown dataset format 'chatml'; choose one of messages,"):
        normalise([{"text": "x"}], "chatml")
    with pytest.raises(TunesmithError, match="unknown bad-row policy 'skip'; choose one of error, drop"):
        normalise([{"text": "x"}], policy="skip")


def test_parquet_nulls_from_arrow_are_dropped_but_null_content_is_kept(tmp_path):
    """Arrow gives every message the union of keys; a message reads back as it was written."""
    call = [{"type": "function", "function": {"name": "clock", "arguments": "{}"}}]
    messages = [USER, {"role": "assistant", "content": None, "tool_calls": call},
                {"role": "tool", "content": "noon", "name": "clock"}, {"role": "assistant", "content": "Noon."}]
    path = tmp_path / "tools.parquet"
    pd.DataFrame({"messages": [messages]}).to_parquet(path)
    rows, name = load_rows(str(path))
    assert rows[0]["messages"][0] == {"role": "user", "content": "Hi", "tool_calls": None, "name": None}
    assert normalise(rows, name=name).examples[0].messages == messages
