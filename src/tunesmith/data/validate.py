"""Per-row checks that catch what would otherwise train silently wrong.

A bad row either stops the run (policy ``error``: the message names the dataset, the 1-based row and
the reason) or is dropped and counted (policy ``drop``). Checks raise ``InvalidRow`` with the reason, so
conversion in ``formats`` and the semantic checks here report problems the same way.
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


class InvalidRow(Exception):
    """One row's problem; the message is the reason, worded to stand after ``row N:``."""


def row_error(name: str, row: int, reason: str) -> TunesmithError:
    return TunesmithError(f"{name}: row {row}: {reason}; fix the row, or pass policy=drop to skip bad rows")


def check_policy(policy: str) -> None:
    if policy not in POLICIES:
        raise TunesmithError(f"unknown bad-row policy {policy!r}; choose one of {', '.join(POLICIES)}")


def check_columns(row: dict, fmt: str) -> None:
    """A column that is absent or null is missing: Arrow files fill absent values with null."""
    for column in REQUIRED_COLUMNS[fmt]:
        if row.get(column) is None:
            raise InvalidRow(f"missing column {column!r} ({fmt} format)")


def check_example(example: Example) -> None:
    if example.kind == "chat":
        _check_chat(example.messages, example.first_trained)
    elif example.kind == "completion":
        check_string(example.prompt, "prompt", allow_empty=True)
        check_string(example.completion, "completion")
    elif example.kind == "text":
        check_string(example.text, "text")
    else:
        _check_preference(example)


def type_name(value) -> str:
    """JSON's word for a missing value, Python's for the rest, as users see them in their data."""
    return "null" if value is None else type(value).__name__


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
        calls_tools = role == "assistant" and bool(message.get("tool_calls"))
        if content is None and calls_tools:
            continue
        if not isinstance(content, str):
            raise InvalidRow(f"{where} content must be a string, not {type_name(content)}")
        if role == "assistant" and not calls_tools and not content.strip():
            raise InvalidRow(f"{where} is an assistant message with empty content")


def _check_chat(messages: list[dict], first_trained: int) -> None:
    _check_messages(messages, "conversation")
    first_turn = next((m["role"] for m in messages if m["role"] != "system"), None)
    if first_turn == "assistant":
        raise InvalidRow("the first non-system message is from the assistant; a conversation starts with the user")
    if not any(m["role"] == "assistant" for m in messages[first_trained:]):
        raise InvalidRow("no assistant message to train on")


def _check_preference(example: Example) -> None:
    if example.messages is not None:
        _check_messages(example.messages, "prompt")
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
