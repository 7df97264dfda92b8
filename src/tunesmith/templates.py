"""Chat templates, reasoning-mode flags, and assistant-only loss masks that are right for any template.

How the mask is found, for any Jinja template and without ``{% generation %}`` markers or a list of
known markers: for each assistant turn ``i`` the template is rendered a few times,

    before  = render(messages[:i],   add_generation_prompt=True)    # what the model sees at inference
    through = render(messages[:i+1], add_generation_prompt=False)   # the same plus turn i, closed
    probe   = through, with turn i's content replaced by a sentinel  # what the template adds around content
    next    = probe followed by message i+1 (or a user probe)         # how the turn closes mid-conversation

*Start.* The trained span starts where the generation prompt ends (``<|im_start|>assistant\n`` stays
untrained). A generation prompt that ends with text the turn does not render (DeepSeek-R1's
``<think>\n``, a no-think prompt's empty ``<think></think>`` before reasoning data) starts the span
where prompt, turn and probe still agree, so no character of the answer is cut; if that point lies
inside a reasoning block the turn opens, the whole block is trained from its opening tag (counted
in ``Rendered.notes``, shown by ``data inspect``).

*End.* The content ends where the probe's text after the sentinel begins, measured from the end,
so a marker string inside the content (``</s>``, ``<|end|>``) can never end the span. What follows
the content is the template's closing: the trained part ends after its last marker (a special token
or a marker-shaped string such as ``<|im_end|>``, ``</s>``, ``[/INST]``), so a newline after
``<|im_end|>`` stays untrained. Mid-conversation the closing is what the template emits whatever
follows (the common part of ``probe`` and ``next``), so a conversation-final token (Phi-3's EOS)
belongs to the last turn only; a template that closes a turn only when another follows (Apriel 1.6's
``<|end|>``) closes it with what comes before the next turn's opener. A closing never reaches a turn
opener (``turn_markers.openers``: a marker the conversation starts with, the generation prompt's, or one
that names a role), so a template that appends its assistant header after every conversation
(Command-R7B) never trains that header. A closing with no marker teaches nothing about stopping: counted,
and ``append_eos`` appends the tokenizer's EOS, trained. Text spans become token masks through the
tokenizer's character offsets: a token is trained when it starts inside a span.

Some templates rewrite history (a reasoning template may drop earlier turns' ``<think>`` blocks),
so a turn is not rendered in the whole conversation as it is alone. That is detected, and each
assistant turn is then its own example whose context is exactly what the template renders at
inference time.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

from tunesmith.errors import TunesmithError
from tunesmith.turn_markers import (MARKER, REASONING_CLOSE, REASONING_OPEN, REASONING_TAG, before_opener,
                                    common_prefix_len, marker_spans, mid_closing, openers, special_tokens,
                                    through_last_marker)

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

# Strings that close an assistant turn in the templates in common use: stop tokens for generation (the trained
# mask reads each template's own closing instead, see the module docstring).
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
    notes: dict[str, int] = field(default_factory=dict)  # NOTE_* -> how many trained turns it applies to

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


# Private-use characters: no template, tokenizer vocabulary or sane dataset holds them.
_SENTINEL = "\ue000tunesmith-turn\ue001"
_NEXT_PROBE = "\ue000tunesmith-next\ue001"
NOTE_NO_END_MARKER = "no end-of-turn marker after the answer (nothing teaches the model to stop)"
NOTE_PROMPT_DIFFERS = "the generation prompt ends with text the turn does not render"
NOTE_REASONING_WHOLE = "reasoning block trained whole (the generation prompt opens or skips it)"


def _prompt_end(before: str, through: str) -> tuple[int, bool]:
    """Where the generation prompt ends inside ``through``, and whether it holds text the turn does not render.

    Whitespace is skipped on both sides: a template's own layout (an indented Jinja line) often puts a
    newline after the generation prompt that the rendered turn lacks, and that is no difference."""
    i = j = 0
    while True:
        while i < len(before) and before[i].isspace():
            i += 1
        while j < len(through) and through[j].isspace():
            j += 1
        if i == len(before) or j == len(through) or before[i] != through[j]:
            break
        i, j = i + 1, j + 1
    return j, i < len(before)


def _openers(tokenizer, kwargs: dict, specials: set[str]) -> frozenset[str]:
    """``turn_markers.openers`` of this template, cached: they depend on the template, kwargs and specials only."""
    key = (tokenizer.chat_template, tuple(sorted(kwargs.items())), frozenset(specials))
    if key not in _OPENER_CACHE:
        first = [{"role": "user", "content": _NEXT_PROBE}]
        try:
            plain = chat_text(tokenizer, first, add_generation_prompt=False, **kwargs)
            prompted = chat_text(tokenizer, first, add_generation_prompt=True, **kwargs)
        except TemplateFailed:
            plain = prompted = ""
        _OPENER_CACHE[key] = openers(plain, prompted, _NEXT_PROBE, specials)
    return _OPENER_CACHE[key]


@dataclass
class _Turn:
    """Where turn ``index`` sits in ``through``: the span start, the content's end and the two closings."""

    index: int
    through: str
    start: int
    content_end: int
    closing_mid: str
    closing_last: str
    notes: list[str]


def _locate(tokenizer, messages: list[dict], i: int, kwargs: dict, specials: set[str],
            opening: frozenset[str]) -> _Turn:
    """Turn ``i`` of ``messages``; ``opening``: the template's turn openers (``_openers``)."""
    before = chat_text(tokenizer, messages[:i], add_generation_prompt=True, **kwargs)
    through = chat_text(tokenizer, messages[: i + 1], add_generation_prompt=False, **kwargs)
    probe = messages[:i] + [{**messages[i], "content": _SENTINEL}]
    alone = chat_text(tokenizer, probe, add_generation_prompt=False, **kwargs)
    following = messages[i + 1] if i + 1 < len(messages) else {"role": "user", "content": _NEXT_PROBE}
    followed = chat_text(tokenizer, probe + [following], add_generation_prompt=False, **kwargs)
    notes = []
    start, differs = _prompt_end(before, through)
    # the probe shows where turn i's own content starts to matter: the span never starts after it
    start = min(start, common_prefix_len(alone, through))
    at = alone.rfind(_SENTINEL)
    if at >= 0:
        head = alone[: at + len(_SENTINEL)]
        tail = alone[len(head):]
        tail_next = followed[len(head):] if followed.startswith(head) else None
    else:
        # the template dropped the content (a tool-call turn rendered from its calls alone): its closing is the
        # last marker before the real conversation and the same one followed by the next message part
        after = chat_text(tokenizer, messages[: i + 2] if i + 1 < len(messages) else messages + [following],
                          add_generation_prompt=False, **kwargs)
        shared = common_prefix_len(through, after)
        found = marker_spans(through[start:shared], specials)
        cut = start + found[-1][0] if found else len(through)
        tail, tail_next = through[cut:], after[cut:]
    content_end = len(through) - len(tail) if through.endswith(tail) else len(through.rstrip())
    # where the template dropped the content or renders calls after it, the tail holds the turn's own
    # rendering (gpt-oss opens a call with <|start|>): no opener cut applies
    if at < 0 or messages[i].get("tool_calls"):
        opening = frozenset()
    closing_last = through_last_marker(before_opener(tail, opening, specials), specials)
    closing_mid = closing_last if tail_next is None else mid_closing(tail, tail_next, specials, opening)
    start = min(start, content_end)
    if differs:
        notes.append(NOTE_PROMPT_DIFFERS)
        opened = list(REASONING_OPEN.finditer(through, 0, start))
        if opened and not REASONING_CLOSE.search(through, opened[-1].start(), start):
            start = opened[-1].start()
            notes.append(NOTE_REASONING_WHOLE)
    if not closing_last:
        notes.append(NOTE_NO_END_MARKER)
    return _Turn(i, through, start, max(start, content_end), closing_mid, closing_last, notes)


def _append_eos(tokenizer, text: str, spans: list[tuple[int, int]]) -> tuple[str, list[tuple[int, int]]]:
    """Insert the EOS string after every trained span that does not already end with it; spans shift."""
    eos = tokenizer.eos_token
    if not eos:
        raise TunesmithError("append_eos is on but this tokenizer has no EOS token")
    out, shifted, cursor, added = [], [], 0, 0
    for start, end in spans:
        out.append(text[cursor:end])
        cursor = end
        extra = 0 if text[start:end].endswith(eos) else len(eos)
        if extra:
            out.append(eos)
        shifted.append((start + added, end + added + extra))
        added += extra
    out.append(text[cursor:])
    return "".join(out), shifted


def _tokenize(tokenizer, text: str, spans: list[tuple[int, int]], notes: list[str]) -> Rendered:
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    offsets = [tuple(o) for o in enc["offset_mapping"]]
    # a token is trained when any of its characters is: BPE may glue the answer's first character to the
    # prompt's last (": A"), and that token is the one the model must produce
    trained = [any(o[0] < e and (s < o[1] or s == o[0]) for s, e in spans) for o in offsets]
    counted: dict[str, int] = {}
    for note in notes:
        counted[note] = counted.get(note, 0) + 1
    return Rendered(input_ids=list(enc["input_ids"]), trained=trained, text=text, offsets=offsets, notes=counted)


def render(tokenizer, messages: list[dict], *, train_on: str = "all", first_trained: int = 0,
           reasoning: str | None = None, append_eos: bool = False) -> list[Rendered]:
    """Render a conversation into one or more examples with assistant-only trained masks.

    ``train_on``: ``"all"`` trains every assistant turn at index >= ``first_trained`` except those
    with ``weight`` 0; ``"last"`` only the final one of those. ``append_eos`` appends the tokenizer's
    EOS after each trained turn (trained). Returns one example, or one per trained turn when the
    template rewrites history (see the module docstring).
    """
    if train_on not in ("all", "last"):
        raise TunesmithError(f"train_on must be 'all' or 'last', not {train_on!r}")
    flagged, kwargs = apply_reasoning(tokenizer, messages, reasoning)
    shift = len(flagged) - len(messages)  # a system message inserted for the reasoning flag
    targets = [i for i, m in enumerate(flagged)
               if m.get("role") == "assistant" and m.get("weight") != 0 and i >= first_trained + shift]
    if train_on == "last":
        targets = targets[-1:]
    specials = special_tokens(tokenizer)
    full = chat_text(tokenizer, flagged, add_generation_prompt=False, **kwargs)
    opening = _openers(tokenizer, kwargs, specials)
    turns = [_locate(tokenizer, flagged, i, kwargs, specials, opening) for i in targets]
    final = len(flagged) - 1

    def in_full(turn: _Turn) -> str:
        return turn.through[: turn.content_end] + (turn.closing_last if turn.index == final else turn.closing_mid)

    examples = []
    if all(full.startswith(in_full(t)) for t in turns):
        examples.append((full, [(t.start, len(in_full(t))) for t in turns], [n for t in turns for n in t.notes]))
    else:
        examples += [(t.through, [(t.start, t.content_end + len(t.closing_last))], t.notes) for t in turns]
    out = []
    for text, spans, notes in examples:
        if append_eos:
            text, spans = _append_eos(tokenizer, text, spans)
            notes = [n for n in notes if n != NOTE_NO_END_MARKER]
        out.append(_tokenize(tokenizer, text, spans, notes))
    return out


def control_tokens(tokenizer, messages: list[dict] | None = None) -> set[str]:
    """Strings that a tokenizer reads as control tokens or the template uses to frame turns: the
    tokenizer's special tokens and the marker-shaped strings the template emits around a probe
    conversation. Reasoning tags are left out: reasoning data carries them in its content."""
    specials = special_tokens(tokenizer)
    template = getattr(tokenizer, "chat_template", None) or ""
    return {t for t in specials | set(_template_markers(tokenizer, template)) if not REASONING_TAG.fullmatch(t)}


def _template_markers(tokenizer, template: str) -> tuple[str, ...]:
    key = (id(tokenizer), template)
    if key not in _MARKER_CACHE:
        probes = [[{"role": "system", "content": _SENTINEL}], []]
        turns = [{"role": "user", "content": _SENTINEL}, {"role": "assistant", "content": _SENTINEL},
                 {"role": "user", "content": _SENTINEL}]
        found: set[str] = set()
        for head in probes if template else []:
            try:
                text = chat_text(tokenizer, head + turns, add_generation_prompt=True)
            except TemplateFailed:  # a template that refuses system messages: try without
                continue
            found = {m.group() for part in text.split(_SENTINEL) for m in MARKER.finditer(part)}
            break
        _MARKER_CACHE[key] = tuple(sorted(found))
    return _MARKER_CACHE[key]


_MARKER_CACHE: dict[tuple[int, str], tuple[str, ...]] = {}
_OPENER_CACHE: dict[tuple, frozenset[str]] = {}  # (template, kwargs, specials): the answer depends on these only
