"""Per-row checks that catch what would otherwise train silently wrong.

A bad row either stops the run (policy ``error``: the message names the dataset, the row's line in a
JSONL or CSV file or its 1-based row elsewhere, and the reason) or is dropped and counted (policy
``drop``). Checks raise ``InvalidRow`` with the reason, so conversion in ``formats`` and the semantic
checks here report problems the same way.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tunesmith.errors import TunesmithError

if TYPE_CHECKING:
    from tunesmith.data.formats import Example

POLICIES = ("error", "drop")
ROLES = ("system", "user", "assistant", "tool")
REQUIRED_COLUMNS = {
    "messages": ("messages",),
    "prompt_completion": ("prompt", "completion"),
    "text": ("text",),
    "alpaca": ("instruction", "output"),
    "sharegpt": ("conversations",),
    "preference": ("prompt", "chosen", "rejected"),
}
IMAGE_COLUMNS = ("image", "images")


class InvalidRow(Exception):
    """One row's problem; the message is the reason, worded to stand after ``line N:`` or ``row N:``."""


def row_error(name: str, number: int, reason: str, unit: str = "row") -> TunesmithError:
    return TunesmithError(f"{name}: {unit} {number}: {reason}; fix the row, or skip bad rows with "
                          "--invalid-rows drop (data.invalid_rows=drop in a training config)")


def check_policy(policy: str) -> None:
    if policy not in POLICIES:
        raise TunesmithError(f"unknown bad-row policy {policy!r}; choose one of {', '.join(POLICIES)}")


def check_row(row: dict, fmt: str) -> None:
    """A column that is absent or null is missing: Arrow files fill absent values with null. Images are
    refused rather than ignored: the answer may be about an image the model would never see."""
    for column in REQUIRED_COLUMNS[fmt]:
        if row.get(column) is None:
            raise InvalidRow(f"missing column {column!r} ({fmt} format)")
    for column in IMAGE_COLUMNS:
        if row.get(column) not in (None, "", []):
            raise InvalidRow(f"the row has images in column {column!r}, but a text-only model cannot see them")


def check_example(example: Example) -> None:
    _check_unicode(example.messages, "conversation" if example.kind == "chat" else "prompt")
    for what in ("prompt", "completion", "text", "chosen", "rejected"):
        _check_unicode(getattr(example, what), what)
    if example.kind == "chat":
        _check_chat(example.messages, example.first_trained)
    elif example.kind == "completion":
        check_string(example.prompt, "prompt", allow_empty=True)
        check_string(example.completion, "completion")
    elif example.kind == "text":
        check_string(example.text, "text")
    else:
        _check_preference(example)


def check_control_tokens(value, controls: set[str], what: str) -> None:
    """Refuse text holding a control token (a special token or a marker of the chat template), which the
    tokenizer would read as structure: in an answer it trains a fake end of turn or a fake next turn."""
    if isinstance(value, str):
        found = [(value.find(token), -len(token), token) for token in controls if token in value]
        if found:  # name the first one in the text, whole (the longer of two starting there)
            token = min(found)[2]
            raise InvalidRow(f"{what} holds the control token {token!r}, which would be read as chat structure, "
                             "not text; remove it, or keep such rows with --control-tokens allow "
                             "(data.control_tokens=allow)")
    elif isinstance(value, list):
        for index, item in enumerate(value, start=1):
            if isinstance(item, dict):
                check_control_tokens(item.get("content"), controls, f"{what} message {index} ({item.get('role')})")


def type_name(value) -> str:
    """JSON's word for a missing value, Python's for the rest, as users see them in their data."""
    return "null" if value is None else type(value).__name__


def _check_unicode(value, what: str) -> None:
    """A lone surrogate (JSON's "\\ud800" escape) decodes into a str that no tokenizer can encode."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise InvalidRow(f"{what} holds a lone surrogate {value[exc.start]!r} (a \\u escape that is not "
                             "valid Unicode text)") from None
    elif isinstance(value, list):
        for index, item in enumerate(value, start=1):
            _check_unicode(item, f"{what} message {index}")
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_unicode(item, f"{what} {key}")


def check_string(value, what: str, *, allow_empty: bool = False) -> None:
    if not isinstance(value, str):
        raise InvalidRow(f"{what} must be a string, not {type_name(value)}")
    if not allow_empty and not value.strip():
        raise InvalidRow(f"{what} is empty")


def _check_messages(messages: list[dict], what: str) -> None:
    """Keys, roles and content of each message; ``what`` names the list in the reason."""
    if not messages:
        raise InvalidRow(f"{what} holds no messages")
    for index, message in enumerate(messages, start=1):
        where = f"{what} message {index}"
        for key in ("role", "content"):
            if key not in message:
                raise InvalidRow(f"{where} has no {key!r} key")
        role, content = message["role"], message["content"]
        if role not in ROLES:
            raise InvalidRow(f"{where} has unknown role {role!r}; use one of {', '.join(ROLES)}")
        if role == "system" and index != 1:
            raise InvalidRow(f"{where} is a system message but only the first message may be one")
        _check_weight(message, where)
        calls_tools = role == "assistant" and bool(message.get("tool_calls"))
        if content is None and calls_tools:
            continue
        if not isinstance(content, str):
            raise InvalidRow(f"{where} content must be a string, not {type_name(content)}")
        if role in ("user", "assistant") and not calls_tools and not content.strip():
            raise InvalidRow(f"{where} is {'an' if role == 'assistant' else 'a'} {role} message with empty content")


def _check_weight(message: dict, where: str) -> None:
    """``weight`` (0 or 1) says whether an assistant turn is trained, as in axolotl's and others' data."""
    if "weight" not in message:
        return
    weight = message["weight"]
    if isinstance(weight, bool) or not isinstance(weight, int | float) or weight not in (0, 1):
        raise InvalidRow(f"{where} has weight {weight!r}; use 0 (not trained) or 1 (trained)")
    if weight == 1 and message["role"] != "assistant":
        raise InvalidRow(f"{where} has weight 1 but only assistant messages are trained")


def _check_chat(messages: list[dict], first_trained: int) -> None:
    _check_messages(messages, "conversation")
    first_turn = next((m["role"] for m in messages if m["role"] != "system"), None)
    if first_turn == "assistant":
        raise InvalidRow("the first non-system message is from the assistant; a conversation starts with the user")
    answers = [m for m in messages[first_trained:] if m["role"] == "assistant"]
    if not answers:
        raise InvalidRow("no assistant message to train on")
    if all(m.get("weight") == 0 for m in answers):
        raise InvalidRow("no assistant message to train on (every one has weight 0)")


def _check_preference(example: Example) -> None:
    if example.messages is not None:
        _check_messages(example.messages, "prompt")
        if next((m["role"] for m in example.messages if m["role"] != "system"), None) == "assistant":
            raise InvalidRow("the prompt's first non-system message is from the assistant; "
                             "a prompt starts with the user")
    else:
        check_string(example.prompt, "prompt")
    for what in ("chosen", "rejected"):
        answer = getattr(example, what)
        if isinstance(answer, list):
            _check_messages(answer, what)
            roles = {m["role"] for m in answer} - {"assistant"}
            if roles:
                raise InvalidRow(f"{what} holds {', '.join(sorted(roles))} messages; it may hold only assistant ones")
        else:
            check_string(answer, what)
    if isinstance(example.chosen, list) != isinstance(example.rejected, list):
        raise InvalidRow("chosen and rejected must both be strings or both be message lists")
    if example.chosen == example.rejected:
        raise InvalidRow("chosen and rejected are identical, so there is no preference to learn")
