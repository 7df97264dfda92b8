"""Normalised examples → token ids and labels, with the over-length policy and the trained-token guard.

Labels are built here and only here: ``labels[i] == input_ids[i]`` where token ``i`` is trained and
``IGNORE_INDEX`` elsewhere. The shift by one (token ``i`` is predicted from position ``i - 1``)
happens in the loss, never in the data.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

from tunesmith.config import DataConfig
from tunesmith.data.formats import Example
from tunesmith.data.validate import InvalidRow, check_control_tokens, row_error
from tunesmith.errors import TunesmithError
from tunesmith.templates import (
    IGNORE_INDEX, NOTE_NO_END_MARKER, NOTE_PROMPT_DIFFERS, NOTE_REASONING_WHOLE, TemplateFailed, control_tokens, render,
    renders_tool_calls,
)

OVERLENGTH_POLICIES = ("truncate", "drop", "error")
CONTROL_TOKEN_POLICIES = ("refuse", "allow")


_DEFAULTS = DataConfig()  # the typed config's defaults, where each field is documented for users


@dataclass
class TokenizeOptions:
    """How examples become tokens; ``DataConfig`` documents each field and gives the defaults (build a run's
    with ``from_config``)."""

    max_length: int = _DEFAULTS.max_length
    overlength: str = _DEFAULTS.overlength
    train_on: str = _DEFAULTS.train_on
    reasoning: str | None = _DEFAULTS.reasoning
    append_eos: bool = _DEFAULTS.append_eos
    control_tokens: str = _DEFAULTS.control_tokens

    @classmethod
    def from_config(cls, data) -> TokenizeOptions:
        """The options a typed ``DataConfig`` asks for: training, eval and merge build them this one way."""
        return cls(max_length=data.max_length, overlength=data.overlength, train_on=data.train_on,
                   reasoning=data.reasoning, append_eos=data.append_eos, control_tokens=data.control_tokens)


@dataclass
class TokenizedData:
    """Training sequences plus what happened to every row on the way."""

    examples: list[dict]  # {"input_ids", "labels", "row"}; preference rows: {"chosen": {...}, "rejected": {...}, "row"}
    dropped: list[tuple[int, str]] = field(default_factory=list)
    truncated: int = 0
    mask_notes: dict[str, int] = field(default_factory=dict)  # templates.NOTE_* -> trained turns it applies to

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
                          reasoning=options.reasoning, append_eos=options.append_eos)
    except TemplateFailed as exc:
        raise InvalidRow(f"the chat template failed on this row ({exc.reason})") from None
    return [{"input_ids": r.input_ids, "labels": r.labels, "notes": r.notes} for r in rendered]


def _refuse_control_tokens(tokenizer, example: Example, options: TokenizeOptions) -> None:
    """A control token written in a message (``<|im_end|>\\n<|im_start|>user``) is read as a real one and would
    train a fake turn; such rows are refused unless the policy allows them."""
    if options.control_tokens == "allow":
        return
    controls = control_tokens(tokenizer)
    for what, value in (("conversation" if example.kind == "chat" else "prompt", example.messages),
                        ("prompt", example.prompt), ("completion", example.completion), ("text", example.text),
                        ("chosen", example.chosen), ("rejected", example.rejected)):
        check_control_tokens(value, controls, what)


def _as_messages(answer) -> list[dict]:
    return [{"role": "assistant", "content": answer}] if isinstance(answer, str) else list(answer)


def _preference_side(tokenizer, example: Example, answer, options: TokenizeOptions) -> dict:
    if example.messages is not None:
        (side,) = _chat(tokenizer, list(example.messages) + _as_messages(answer), options,
                        first_trained=len(example.messages))[-1:]
        side.pop("notes")
        return side
    if not isinstance(answer, str) and any(m.get("tool_calls") for m in answer):
        raise InvalidRow("an answer calls tools (tool_calls), which needs the prompt as a message list")
    text = answer if isinstance(answer, str) else "".join(m["content"] for m in answer)
    return _plain(tokenizer, example.prompt or "", text)


def sequences(tokenizer, example: Example, options: TokenizeOptions) -> list[dict]:
    """The training sequences of one example (a history-rewriting template can give several).

    A row the template cannot render, or one holding a control token under the ``refuse`` policy, raises
    ``InvalidRow``.
    """
    _refuse_control_tokens(tokenizer, example, options)
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
    if options.control_tokens not in CONTROL_TOKEN_POLICIES:
        raise TunesmithError(f"control_tokens must be one of {', '.join(CONTROL_TOKEN_POLICIES)}, "
                             f"not {options.control_tokens!r}")
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
            for note, count in seq.pop("notes", {}).items():
                out.mask_notes[note] = out.mask_notes.get(note, 0) + count
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
    if out.mask_notes.get(NOTE_NO_END_MARKER):
        warnings.warn(f"{name}: {mask_note_line(NOTE_NO_END_MARKER, out.mask_notes[NOTE_NO_END_MARKER])}",
                      stacklevel=2)
    return out


_NOTE_ADVICE = {
    NOTE_NO_END_MARKER: "the model may not learn to stop; add --append-eos (data.append_eos=true) to train the "
                        "tokenizer's EOS after each answer",
    NOTE_REASONING_WHOLE: "their reasoning is trained from its opening tag; set --reasoning on (data.reasoning=on) "
                          "to train them as the model will be prompted, or remove the reasoning from the data",
    NOTE_PROMPT_DIFFERS: "training starts where prompt and turn agree",
}


def mask_note_line(note: str, count: int) -> str:
    """One line for ``data inspect`` and warnings: how many trained turns a mask note applies to, and the fix."""
    return f"{count} trained turn{'s' if count != 1 else ''}: {note}; {_NOTE_ADVICE[note]}"
