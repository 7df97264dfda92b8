"""Chat templates, reasoning-mode flags, and assistant-only loss masks that are right for any template.

How the mask is found, for any Jinja template and without ``{% generation %}`` markers: for each
assistant turn ``i`` the template is rendered twice,

    before  = render(messages[:i],   add_generation_prompt=True)    # what the model sees at inference
    through = render(messages[:i+1], add_generation_prompt=False)   # the same plus turn i, closed

The trained span of turn ``i`` starts where ``before`` and ``through`` first differ (so the
generation prompt, e.g. ``<|im_start|>assistant\\n``, stays untrained) and ends after the last
end-of-turn marker inside the turn (``<|im_end|>``, ``<|eot_id|>``, ``</s>``...), so the token the
model must emit to stop is trained while trailing boilerplate such as a newline is not. Text spans
become token masks through the tokenizer's character offsets: a token is trained when it starts
inside a span.

Some templates rewrite history (a reasoning template may drop earlier turns' ``<think>`` blocks),
so ``through`` is not a prefix of the whole conversation. That is detected, and each assistant turn
is then its own example whose context is exactly what the template renders at inference time.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

from tunesmith.errors import TunesmithError

IGNORE_INDEX = -100

BUILTIN_TEMPLATES: dict[str, str] = {
    "chatml": (
        "{% for message in messages %}"
        "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    ),
    # TinyLlama-chat / Zephyr style: a role tag line, the content, then the EOS string.
    "zephyr": (
        "{% for message in messages %}"
        "{{ '<|' + message['role'] + '|>\n' + message['content'] + '</s>' + '\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
    ),
    "llama3": (
        "{{ '<|begin_of_text|>' }}"
        "{% for message in messages %}"
        "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
    ),
}

# Strings that close an assistant turn in the templates in common use; the last one inside a turn is trained.
END_OF_TURN_MARKERS = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "</s>", "<|end|>", "<end_of_turn>",
                       "<|endoftext|>", "<|end_of_text|>")
REASONING_MODES = ("on", "off")


class TemplateFailed(TunesmithError):
    """The chat template raised on one conversation (a Jinja error, the template's ``raise_exception``, a
    ``TypeError`` joining a value it did not expect); data preparation makes it that row's problem."""

    def __init__(self, reason: str):
        super().__init__(f"the chat template failed on this conversation ({reason})")
        self.reason = reason


@dataclass
class Rendered:
    """One training example: token ids, which of them are trained, and the text they came from."""

    input_ids: list[int]
    trained: list[bool]
    text: str
    offsets: list[tuple[int, int]] = field(repr=False)

    @property
    def labels(self) -> list[int]:
        """Labels aligned with ``input_ids``; the model shifts them by one inside its loss."""
        return [tok if keep else IGNORE_INDEX for tok, keep in zip(self.input_ids, self.trained)]

    @property
    def num_trained(self) -> int:
        return sum(self.trained)


def use_template(tokenizer, name: str | None) -> None:
    """Give ``tokenizer`` the template to render with: a built-in by name, else its own.

    ``name`` may be ``None`` (the tokenizer's own template is required), a built-in name, or a Jinja
    string. A tokenizer without a template and no name is an error that lists the built-ins.
    """
    if name is None:
        if not getattr(tokenizer, "chat_template", None):
            raise TunesmithError(
                "this model's tokenizer has no chat template (a base model?); choose a built-in one with "
                f"template=<name>, one of: {', '.join(BUILTIN_TEMPLATES)}"
            )
        return
    if name in BUILTIN_TEMPLATES:
        tokenizer.chat_template = BUILTIN_TEMPLATES[name]
    elif "{%" in name or "{{" in name:
        tokenizer.chat_template = name
    else:
        raise TunesmithError(f"unknown template {name!r}; choose one of: {', '.join(BUILTIN_TEMPLATES)}")


def stop_token_ids(tokenizer) -> list[int]:
    """Token ids that end an assistant turn: EOS plus every end-of-turn marker that is one token here."""
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    template = getattr(tokenizer, "chat_template", None) or ""
    for marker in END_OF_TURN_MARKERS:
        if marker in template:
            pieces = tokenizer.encode(marker, add_special_tokens=False)
            if len(pieces) == 1:
                ids.add(pieces[0])
    return sorted(ids)


def renders_tool_calls(tokenizer) -> bool:
    """Whether the template reads ``tool_calls``; one that does not would drop the calls from the text."""
    return "tool_calls" in (getattr(tokenizer, "chat_template", None) or "")


def supports_reasoning(tokenizer) -> str | None:
    """How the template takes a reasoning mode: ``"kwarg"`` (enable_thinking), ``"flag"`` (/think), or None."""
    template = getattr(tokenizer, "chat_template", None) or ""
    if "enable_thinking" in template:
        return "kwarg"
    if "/no_think" in template or "/think" in template:
        return "flag"
    return None


def apply_reasoning(tokenizer, messages: list[dict], reasoning: str | None) -> tuple[list[dict], dict]:
    """Return messages and template kwargs that ask for ``reasoning`` ("on"/"off"; None leaves the default).

    Templates with an ``enable_thinking`` switch get it; templates that read ``/think`` and
    ``/no_think`` from the system prompt (SmolLM3) get the flag appended to the system message. A
    template with neither cannot honour the request, which is said with a warning, never silently.
    """
    if reasoning is None:
        return messages, {}
    if reasoning not in REASONING_MODES:
        raise TunesmithError(f"reasoning must be one of {REASONING_MODES} or unset, not {reasoning!r}")
    style = supports_reasoning(tokenizer)
    if style == "kwarg":
        return messages, {"enable_thinking": reasoning == "on"}
    if style == "flag":
        flag = "/think" if reasoning == "on" else "/no_think"
        messages = [dict(m) for m in messages]
        if messages and messages[0].get("role") == "system":
            messages[0]["content"] = f"{messages[0]['content']} {flag}".strip()
        else:
            messages.insert(0, {"role": "system", "content": flag})
        return messages, {}
    warnings.warn(f"this chat template has no reasoning mode; reasoning={reasoning!r} has no effect",
                  stacklevel=2)
    return messages, {}


def chat_text(tokenizer, messages: list[dict], *, add_generation_prompt: bool, **kwargs) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False,
                                             add_generation_prompt=add_generation_prompt, **kwargs)
    except Exception as exc:  # Jinja raises its own types, including the template's raise_exception
        raise TemplateFailed(str(exc)) from exc


def render_prompt(tokenizer, messages: list[dict], *, reasoning: str | None = None) -> list[int]:
    """Token ids of a conversation followed by the generation prompt, for inference."""
    messages, kwargs = apply_reasoning(tokenizer, messages, reasoning)
    text = chat_text(tokenizer, messages, add_generation_prompt=True, **kwargs)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _common_prefix_len(a: str, b: str) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _turn_end(text: str, start: int) -> int:
    """End of the trained span: just after the last end-of-turn marker in ``text[start:]``."""
    ends = [text.rfind(m, start) + len(m) for m in END_OF_TURN_MARKERS if text.rfind(m, start) >= 0]
    return max(ends) if ends else len(text.rstrip())


def _tokenize(tokenizer, text: str, spans: list[tuple[int, int]]) -> Rendered:
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    offsets = [tuple(o) for o in enc["offset_mapping"]]
    trained = [any(s <= o[0] < e for s, e in spans) for o in offsets]
    return Rendered(input_ids=list(enc["input_ids"]), trained=trained, text=text, offsets=offsets)


def render(tokenizer, messages: list[dict], *, train_on: str = "all", first_trained: int = 0,
           reasoning: str | None = None) -> list[Rendered]:
    """Render a conversation into one or more examples with assistant-only trained masks.

    ``train_on``: ``"all"`` trains every assistant turn at index >= ``first_trained`` except those
    with ``weight`` 0; ``"last"`` only the final one of those. Returns one example, or one per
    trained turn when the template rewrites history (see the module docstring).
    """
    if train_on not in ("all", "last"):
        raise TunesmithError(f"train_on must be 'all' or 'last', not {train_on!r}")
    flagged, kwargs = apply_reasoning(tokenizer, messages, reasoning)
    shift = len(flagged) - len(messages)  # a system message inserted for the reasoning flag
    targets = [i for i, m in enumerate(flagged)
               if m.get("role") == "assistant" and m.get("weight") != 0 and i >= first_trained + shift]
    if train_on == "last":
        targets = targets[-1:]
    full = chat_text(tokenizer, flagged, add_generation_prompt=False, **kwargs)
    turns = []
    for i in targets:
        before = chat_text(tokenizer, flagged[:i], add_generation_prompt=True, **kwargs)
        through = chat_text(tokenizer, flagged[: i + 1], add_generation_prompt=False, **kwargs)
        start = _common_prefix_len(before, through)
        turns.append((through, (start, _turn_end(through, start))))
    if all(full.startswith(through) for through, _ in turns):
        return [_tokenize(tokenizer, full, [span for _, span in turns])]
    return [_tokenize(tokenizer, through, [span]) for through, span in turns]


def mask_view(rendered: Rendered, *, color: bool = True) -> str:
    """The rendered text with trained tokens highlighted: green in a terminal, ``[[...]]`` in plain text.

    Consecutive tokens with the same flag form one run, so the output reads like a diff of the loss.
    """
    runs: list[tuple[bool, str]] = []
    cursor = 0
    for (start, end), keep in zip(rendered.offsets, rendered.trained):
        piece = rendered.text[cursor:end] if start >= cursor else rendered.text[start:end]
        cursor = max(cursor, end)
        if runs and runs[-1][0] == keep:
            runs[-1] = (keep, runs[-1][1] + piece)
        else:
            runs.append((keep, piece))
    if color:
        on, off = "\x1b[30;42m", "\x1b[0m"
        body = "".join(f"{on}{text}{off}" if keep else f"\x1b[2m{text}{off}" for keep, text in runs)
    else:
        body = "".join(f"[[{text}]]" if keep else text for keep, text in runs)
    spans = sum(1 for keep, _ in runs if keep)
    summary = f"{rendered.num_trained} of {len(rendered.input_ids)} tokens trained in {spans} span(s)"
    return f"{body}\n-- {summary}"
