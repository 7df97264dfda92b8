"""Detect a dataset's format from its columns and normalise every row into one ``Example`` shape.

Six input formats map onto four kinds, so everything downstream (templating, label masks, DPO pairs)
handles kinds, not formats:

    messages, sharegpt, alpaca, prompt/completion as message lists -> chat
    prompt/completion as plain strings                              -> completion
    text                                                            -> text
    prompt/chosen/rejected                                          -> preference
"""

from __future__ import annotations

from dataclasses import dataclass

from tunesmith.data.validate import (
    InvalidRow, check_example, check_policy, check_row, check_string, row_error, type_name,
)
from tunesmith.errors import TunesmithError

FORMATS = ("messages", "prompt_completion", "text", "alpaca", "sharegpt", "preference")
# First match wins: preference before prompt_completion, since a preference row also has a prompt.
_DETECTION_ORDER = (
    ("preference", {"chosen", "rejected"}),
    ("messages", {"messages"}),
    ("sharegpt", {"conversations"}),
    ("prompt_completion", {"prompt", "completion"}),
    ("alpaca", {"instruction", "output"}),
    ("text", {"text"}),
)
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "model": "assistant", "system": "system", "tool": "tool", "function": "tool"}


@dataclass
class Example:
    kind: str  # "chat" | "completion" | "text" | "preference"
    row: int  # 1-based row number in the source
    messages: list[dict] | None = None  # chat: full conversation; preference: the prompt as messages (or None)
    first_trained: int = 0  # chat: only assistant messages at index >= first_trained are trainable
    prompt: str | None = None  # completion/preference with a plain-string prompt
    completion: str | None = None  # completion kind
    text: str | None = None  # text kind
    chosen: list[dict] | str | None = None  # preference: string, or assistant message list
    rejected: list[dict] | str | None = None


@dataclass
class NormalisedData:
    format: str
    examples: list[Example]
    dropped: list[tuple[int, str]]  # (number, reason) for each row dropped under policy "drop"
    unit: str = "row"  # what the numbers count: "line" in a line-based file (JSONL, CSV), else "row"


def detect_format(rows: list[dict], *, name: str = "dataset") -> str:
    """Pick the format from the columns that hold a value in any row."""
    columns = {key for row in rows for key, value in row.items() if value is not None}
    for fmt, needed in _DETECTION_ORDER:
        if needed <= columns:
            return fmt
    expected = "; ".join(f"{fmt}: {', '.join(sorted(needed))}" for fmt, needed in _DETECTION_ORDER)
    raise TunesmithError(f"{name}: cannot tell the format from its columns ({', '.join(sorted(columns))}); "
                         f"expected columns for one of {expected}; or pass the format explicitly")


def normalise(rows: list[dict], fmt: str | None = None, *, policy: str = "error",
              name: str = "dataset") -> NormalisedData:
    """Convert and validate every row; ``policy`` says whether a bad row stops the run or is dropped.

    Rows are numbered as ``load_rows`` numbered them (``Rows.numbers`` and ``Rows.unit``: lines of a
    JSONL or CSV file); a plain list's rows are numbered 1, 2, ...
    """
    check_policy(policy)
    fmt = fmt or detect_format(rows, name=name)
    if fmt not in FORMATS:
        raise TunesmithError(f"unknown dataset format {fmt!r}; choose one of {', '.join(FORMATS)}")
    numbers = getattr(rows, "numbers", range(1, len(rows) + 1))
    unit = getattr(rows, "unit", "row")
    examples, dropped = [], []
    for number, row in zip(numbers, rows):
        try:
            check_row(row, fmt)
            example = _CONVERTERS[fmt](row, number)
            check_example(example)
        except InvalidRow as problem:
            if policy == "error":
                raise row_error(name, number, str(problem), unit) from None
            dropped.append((number, str(problem)))
        else:
            examples.append(example)
    if not examples:
        first_row, first_reason = dropped[0]
        raise TunesmithError(f"{name}: all {len(rows)} rows are invalid and were dropped "
                             f"({unit} {first_row}: {first_reason}); check the format and the data")
    return NormalisedData(format=fmt, examples=examples, dropped=dropped, unit=unit)


def checked_conversation(messages) -> list[dict]:
    """One conversation through the same conversion and checks as a dataset row (raises ``InvalidRow``)."""
    row = {"messages": messages}
    check_row(row, "messages")
    example = _CONVERTERS["messages"](row, 1)
    check_example(example)
    return example.messages


def _message_list(value, what: str) -> list[dict]:
    """Copy the messages, dropping null-valued keys (Arrow fills keys absent from a message with null)
    but keeping a null ``content``, which an assistant message with ``tool_calls`` may carry.

    Content given as a list of parts (OpenAI's format) becomes one string when every part is text.
    """
    if not isinstance(value, list):
        raise InvalidRow(f"{what} must be a list of messages, not {type_name(value)}")
    messages = []
    for index, message in enumerate(value, start=1):
        if not isinstance(message, dict):
            raise InvalidRow(f"{what} message {index} must be an object, not {type_name(message)}")
        message = {key: item for key, item in message.items() if item is not None or key == "content"}
        if isinstance(message.get("content"), list):
            message["content"] = _join_text_parts(message["content"], f"{what} message {index}")
        messages.append(message)
    return messages


def _join_text_parts(parts: list, where: str) -> str:
    """Text parts joined by newlines, as vLLM joins them for a text-only model; any other part is refused."""
    texts = []
    for index, part in enumerate(parts, start=1):
        if not isinstance(part, dict):
            raise InvalidRow(f"{where} content part {index} must be an object such as "
                             f"{{\"type\": \"text\", \"text\": ...}}, not {type_name(part)}")
        if part.get("type") != "text":
            raise InvalidRow(f"{where} content part {index} is of type {part.get('type')!r}, but a text-only model "
                             "can read only text parts")
        if not isinstance(part.get("text"), str):
            raise InvalidRow(f"{where} content part {index} has no text string")
        texts.append(part["text"])
    return "\n".join(texts)


def _from_messages(row: dict, number: int) -> Example:
    return Example("chat", number, messages=_message_list(row["messages"], "messages"))


def _from_sharegpt(row: dict, number: int) -> Example:
    messages = []
    for index, turn in enumerate(_message_list(row["conversations"], "conversations"), start=1):
        for key in ("from", "value"):
            if key not in turn:
                raise InvalidRow(f"conversations message {index} has no {key!r} key")
        speaker = turn.pop("from")
        if not isinstance(speaker, str) or speaker not in SHAREGPT_ROLES:
            raise InvalidRow(f"conversations message {index} has unknown speaker {speaker!r}; "
                             f"use one of {', '.join(SHAREGPT_ROLES)}")
        messages.append({"role": SHAREGPT_ROLES[speaker], "content": turn.pop("value"), **turn})
    return Example("chat", number, messages=messages)


def _from_alpaca(row: dict, number: int) -> Example:
    instruction, extra = row["instruction"], row.get("input") or ""
    check_string(instruction, "instruction", allow_empty=True)
    check_string(extra, "input", allow_empty=True)
    user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    messages = [{"role": "user", "content": user}, {"role": "assistant", "content": row["output"]}]
    return Example("chat", number, messages=messages)


def _from_prompt_completion(row: dict, number: int) -> Example:
    prompt, completion = row["prompt"], row["completion"]
    if isinstance(prompt, list) and isinstance(completion, list):
        prompt = _message_list(prompt, "prompt")
        messages = prompt + _message_list(completion, "completion")
        return Example("chat", number, messages=messages, first_trained=len(prompt))
    if isinstance(prompt, list) or isinstance(completion, list):
        raise InvalidRow("prompt and completion must both be strings or both be message lists")
    return Example("completion", number, prompt=prompt, completion=completion)


def _from_preference(row: dict, number: int) -> Example:
    prompt = row["prompt"]
    answers = {what: _message_list(row[what], what) if isinstance(row[what], list) else row[what]
               for what in ("chosen", "rejected")}
    if isinstance(prompt, list):
        return Example("preference", number, messages=_message_list(prompt, "prompt"), **answers)
    return Example("preference", number, prompt=prompt, **answers)


def _from_text(row: dict, number: int) -> Example:
    return Example("text", number, text=row["text"])


_CONVERTERS = {
    "messages": _from_messages,
    "sharegpt": _from_sharegpt,
    "alpaca": _from_alpaca,
    "prompt_completion": _from_prompt_completion,
    "preference": _from_preference,
    "text": _from_text,
}
