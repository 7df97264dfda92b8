"""Normalised examples → token ids and labels, with the over-length policy and the trained-token guard.

Labels are built here and only here: ``labels[i] == input_ids[i]`` where token ``i`` is trained and
``IGNORE_INDEX`` elsewhere. The shift by one (token ``i`` is predicted from position ``i - 1``)
happens in the loss, never in the data.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tunesmith.data.formats import Example
from tunesmith.data.validate import InvalidRow, row_error
from tunesmith.errors import TunesmithError
from tunesmith.templates import IGNORE_INDEX, TemplateFailed, render, renders_tool_calls

OVERLENGTH_POLICIES = ("truncate", "drop", "error")


@dataclass
class TokenizeOptions:
    max_length: int = 1024
    overlength: str = "truncate"
    train_on: str = "all"
    reasoning: str | None = None


@dataclass
class TokenizedData:
    """Training sequences plus what happened to every row on the way."""

    examples: list[dict]  # {"input_ids", "labels", "row"}; preference rows: {"chosen": {...}, "rejected": {...}, "row"}
    dropped: list[tuple[int, str]] = field(default_factory=list)
    truncated: int = 0

    @property
    def trained_tokens(self) -> int:
        return sum(_trained(ex) for ex in self.examples)


def _trained(example: dict) -> int:
    if "chosen" in example:
        return _trained(example["chosen"]) + _trained(example["rejected"])
    return sum(1 for label in example["labels"] if label != IGNORE_INDEX)


def _plain(tokenizer, prompt: str, answer: str, *, train_prompt: bool = False) -> dict:
    """A prompt/answer pair without a chat template: the answer and EOS are trained."""
    prompt_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"] if prompt else []
    answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    ids = prompt_ids + answer_ids
    labels = (list(prompt_ids) if train_prompt else [IGNORE_INDEX] * len(prompt_ids)) + answer_ids
    return {"input_ids": ids, "labels": labels}


def _refuse_tool_calls(tokenizer, messages: list[dict], what: str) -> None:
    if renders_tool_calls(tokenizer):
        return
    for index, message in enumerate(messages, start=1):
        if message.get("tool_calls"):
            raise InvalidRow(f"{what} message {index} calls tools (tool_calls) but this chat template cannot "
                             "render tool calls (choose one that does with --template or model.template)")


def _chat(tokenizer, messages, options: TokenizeOptions, first_trained: int = 0) -> list[dict]:
    try:
        rendered = render(tokenizer, messages, train_on=options.train_on, first_trained=first_trained,
                          reasoning=options.reasoning)
    except TemplateFailed as exc:
        raise InvalidRow(f"the chat template failed on this row ({exc.reason})") from None
    return [{"input_ids": r.input_ids, "labels": r.labels} for r in rendered]


def _as_messages(answer) -> list[dict]:
    return [{"role": "assistant", "content": answer}] if isinstance(answer, str) else list(answer)


def _preference_side(tokenizer, example: Example, answer, options: TokenizeOptions) -> dict:
    if example.messages is not None:
        (side,) = _chat(tokenizer, list(example.messages) + _as_messages(answer), options,
                        first_trained=len(example.messages))[-1:]
        return side
    if not isinstance(answer, str) and any(m.get("tool_calls") for m in answer):
        raise InvalidRow("an answer calls tools (tool_calls), which needs the prompt as a message list")
    text = answer if isinstance(answer, str) else "".join(m["content"] for m in answer)
    return _plain(tokenizer, example.prompt or "", text)


def sequences(tokenizer, example: Example, options: TokenizeOptions) -> list[dict]:
    """The training sequences of one example (a history-rewriting template can give several).

    A row the template cannot render raises ``InvalidRow``.
    """
    if example.kind == "chat":
        _refuse_tool_calls(tokenizer, example.messages, "conversation")
        return _chat(tokenizer, example.messages, options, example.first_trained)
    if example.kind == "completion":
        return [_plain(tokenizer, example.prompt, example.completion)]
    if example.kind == "text":
        return [_plain(tokenizer, "", example.text, train_prompt=True)]
    if example.kind == "preference":
        for what, messages in (("prompt", example.messages), ("chosen", example.chosen),
                               ("rejected", example.rejected)):
            if isinstance(messages, list):
                _refuse_tool_calls(tokenizer, messages, what)
        return [{"chosen": _preference_side(tokenizer, example, example.chosen, options),
                 "rejected": _preference_side(tokenizer, example, example.rejected, options)}]
    raise ValueError(f"unknown example kind {example.kind!r}")


def _fit(seq: dict, max_length: int) -> tuple[dict, bool]:
    if len(seq["input_ids"]) <= max_length:
        return seq, False
    return {"input_ids": seq["input_ids"][:max_length], "labels": seq["labels"][:max_length]}, True


def tokenize_examples(tokenizer, examples: list[Example], options: TokenizeOptions, *, name: str = "dataset",
                      invalid_rows: str = "error", unit: str = "row") -> TokenizedData:
    """Tokenize every example and apply the over-length policy after tokenization.

    ``truncate`` cuts from the right; ``drop`` drops the row; ``error`` stops with the row number.
    A sequence left with no trained token (all of its answer cut off) is never trained silently:
    it is dropped and counted, or is an error under ``error``. A row the template cannot render is
    handled by ``invalid_rows``, like a row that fails validation. Messages call a row ``{unit} N``.
    """
    if options.overlength not in OVERLENGTH_POLICIES:
        raise TunesmithError(f"overlength must be one of {', '.join(OVERLENGTH_POLICIES)}, not {options.overlength!r}")
    out = TokenizedData(examples=[])
    for example in examples:
        try:
            rendered = sequences(tokenizer, example, options)
        except InvalidRow as problem:
            if invalid_rows == "error":
                raise row_error(name, example.row, str(problem), unit) from None
            out.dropped.append((example.row, str(problem)))
            continue
        for seq in rendered:
            sides = ("chosen", "rejected") if "chosen" in seq else (None,)
            longest = max(len((seq[s] if s else seq)["input_ids"]) for s in sides)
            if longest > options.max_length and options.overlength != "truncate":
                reason = f"{longest} tokens is over max_length {options.max_length}"
                if options.overlength == "error":
                    raise TunesmithError(f"{name}: {unit} {example.row}: {reason}; raise max_length or set "
                                         "overlength=truncate or overlength=drop")
                out.dropped.append((example.row, reason))
                continue
            cut = False
            for s in sides:
                fitted, was_cut = _fit(seq[s] if s else seq, options.max_length)
                cut |= was_cut
                if s:
                    seq[s] = fitted
                else:
                    seq = fitted
            if any(_trained(seq[s] if s else seq) == 0 for s in sides):
                reason = ("no trained token left after truncation to max_length "
                          f"{options.max_length}" if cut else "no trained token")
                if options.overlength == "error":
                    raise TunesmithError(f"{name}: {unit} {example.row}: {reason}")
                out.dropped.append((example.row, reason))
                continue
            out.truncated += cut
            out.examples.append({**seq, "row": example.row})
    return out
