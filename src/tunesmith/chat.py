"""Talking to a model: one-shot or interactive chat with streaming, and side-by-side comparison."""

from __future__ import annotations

import shutil
import sys
import textwrap
from dataclasses import dataclass

from tunesmith.engine import generate
from tunesmith.errors import TunesmithError
from tunesmith.generate import SamplingConfig, StreamDecoder
from tunesmith.models.build import BuiltModel, build_model, model_from_flags
from tunesmith.templates import render_prompt, stop_token_ids


@dataclass
class ChatOptions:
    system: str | None = None
    reasoning: str | None = None
    sampling: SamplingConfig = None  # type: ignore[assignment]


def load_for_chat(model: str, *, adapter: str | None = None, template: str | None = None,
                  dtype: str = "auto", device: str = "auto", trust_remote_code: bool = False) -> BuiltModel:
    """Load a model (plus an optional LoRA adapter) and make sure it has a chat template to use."""
    return build_model(model_from_flags(model, template=template, dtype=dtype, device=device,
                                        trust_remote_code=trust_remote_code), adapter=adapter)


def _conversation(options: ChatOptions, history: list[dict], prompt: str) -> list[dict]:
    system = [{"role": "system", "content": options.system}] if options.system else []
    return system + history + [{"role": "user", "content": prompt}]


def check_fits(model, prompt_ids: list[int], max_new_tokens: int) -> None:
    """Refuse a prompt that, with the tokens to generate, does not fit the model's context.

    Past ``max_position_embeddings`` the model has no trained positions: the reply would be garbage or
    fail deep inside attention, so the user hears it here, in tokens, with what to change.
    """
    context = getattr(model.config, "max_position_embeddings", None)
    length = len(prompt_ids)
    if context is None or length + max_new_tokens <= context:
        return
    if length >= context:
        raise TunesmithError(f"the prompt is {length} tokens, which leaves no room in the model's context of "
                             f"{context} tokens; shorten the prompt")
    raise TunesmithError(f"the prompt is {length} tokens and --max-tokens is {max_new_tokens}: together more than "
                         f"the model's context of {context} tokens; shorten the prompt or lower --max-tokens to "
                         f"{context - length} or less")


def reply(loaded: BuiltModel, messages: list[dict], options: ChatOptions, *, stream=None) -> str:
    """Generate one assistant reply; with ``stream`` (a text file) its text is written as it is made."""
    tokenizer = loaded.tokenizer
    prompt_ids = render_prompt(tokenizer, messages, reasoning=options.reasoning)
    check_fits(loaded.model, prompt_ids, options.sampling.max_new_tokens)
    decoder = StreamDecoder(tokenizer)

    def on_token(row: int, token: int) -> None:
        piece = decoder.push(token)
        if stream is not None and piece:
            stream.write(piece)
            stream.flush()

    (new_ids,) = generate(loaded.model, [prompt_ids], sampling=options.sampling,
                          stop_ids=stop_token_ids(tokenizer), pad_id=tokenizer.pad_token_id, on_token=on_token)
    return tokenizer.decode(new_ids, skip_special_tokens=True)


def chat(loaded: BuiltModel, options: ChatOptions, *, prompt: str | None, stdin=None, stdout=None,
         stderr=None) -> None:
    """One-shot with ``prompt``; otherwise a loop over stdin lines (``/exit`` or end of input stops it).

    In the loop, a turn that fails with a user error (a prompt too long for the context) is reported on
    ``stderr`` and dropped from the history; the session goes on.
    """
    stdin, stdout, stderr = stdin or sys.stdin, stdout or sys.stdout, stderr or sys.stderr
    if prompt is not None:
        reply(loaded, _conversation(options, [], prompt), options, stream=stdout)
        stdout.write("\n")
        return
    history: list[dict] = []
    stdout.write("chat with the model; /reset clears the history, /exit quits\n")
    while True:
        stdout.write("> ")
        stdout.flush()
        line = stdin.readline()
        if not line or line.strip() == "/exit":
            break
        if line.strip() == "/reset":
            history = []
            continue
        if not line.strip():
            continue
        try:
            answer = reply(loaded, _conversation(options, history, line.strip()), options, stream=stdout)
        except TunesmithError as exc:
            stderr.write(f"error: {exc} (/reset clears the history)\n")
            continue
        stdout.write("\n")
        history += [{"role": "user", "content": line.strip()}, {"role": "assistant", "content": answer}]


def side_by_side(left_title: str, left: str, right_title: str, right: str, width: int | None = None) -> str:
    """Two texts in two columns, each wrapped to half the terminal width."""
    width = width or shutil.get_terminal_size((120, 20)).columns
    column = max(20, (width - 3) // 2)

    def lines(text: str) -> list[str]:
        out = []
        for paragraph in text.splitlines() or [""]:
            out += textwrap.wrap(paragraph, column) or [""]
        return out

    a, b = [left_title, "-" * column] + lines(left), [right_title, "-" * column] + lines(right)
    a += [""] * (len(b) - len(a))
    b += [""] * (len(a) - len(b))
    return "\n".join(f"{x:<{column}} | {y}".rstrip() for x, y in zip(a, b))


def _prompt_ids(loaded: BuiltModel, prompt: str, options: ChatOptions) -> list[int]:
    """With a chat template: the templated conversation. Without (a base model): the raw text."""
    tokenizer = loaded.tokenizer
    if getattr(tokenizer, "chat_template", None):
        return render_prompt(tokenizer, _conversation(options, [], prompt), reasoning=options.reasoning)
    return tokenizer(prompt)["input_ids"]


def compare(models: list[str], prompt: str, options: ChatOptions, *, template: str | None = None,
            dtype: str = "auto", device: str = "auto", width: int | None = None,
            trust_remote_code: bool = False) -> str:
    """Generate from each model with the same sampling seed; return the two answers side by side.

    A model without a chat template gets the raw prompt (the base-versus-instruct comparison);
    ``template`` gives such models a built-in template instead.
    """
    answers = []
    for source in models:
        loaded = build_model(model_from_flags(source, template=template, dtype=dtype, device=device,
                                              trust_remote_code=trust_remote_code), allow_no_template=True)
        tokenizer = loaded.tokenizer
        stops = stop_token_ids(tokenizer) if tokenizer.chat_template else [tokenizer.eos_token_id]
        prompt_ids = _prompt_ids(loaded, prompt, options)
        check_fits(loaded.model, prompt_ids, options.sampling.max_new_tokens)
        (new_ids,) = generate(loaded.model, [prompt_ids], sampling=options.sampling,
                              stop_ids=stops, pad_id=tokenizer.pad_token_id)
        answers.append(tokenizer.decode(new_ids, skip_special_tokens=True))
        del loaded
    return side_by_side(models[0], answers[0], models[1], answers[1], width)
