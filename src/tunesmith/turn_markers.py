"""Marker strings in rendered chat templates: where a turn's closing ends and the next turn's opener begins.

A marker is a special token of the tokenizer or a marker-shaped string (``<|im_end|>``, ``<｜end▁of▁sentence｜>``,
``</s>``, ``<end_of_turn>``, ``[/INST]``). Only text the template itself emits is searched, never a message's
content. ``templates.render`` uses these to find the trained closing of each assistant turn.
"""

from __future__ import annotations

import re

# Marker-shaped strings a template wraps turns in: <|im_end|>, <｜end▁of▁sentence｜>, </s>, <end_of_turn>,
# [/INST], <</SYS>>.
MARKER = re.compile(r"<\|[^<>|\s]{1,48}\|>|<｜[^<>｜\s]{1,48}｜>|</?[A-Za-z][\w.:-]{0,48}>|\[/?[A-Z][A-Z_]{1,24}\]"
                     r"|<</?[A-Z]{1,12}>>")
# Reasoning tags are content, not control: datasets carry <think>…</think> and templates parse it.
REASONING_TAG = re.compile(r"</?(?:\w+:)?think>")
REASONING_OPEN = re.compile(r"<(?:\w+:)?think>")
REASONING_CLOSE = re.compile(r"</(?:\w+:)?think>")
# a marker that names a role (<|begin_user|>, <|USER_TOKEN|>) or precedes one (<|im_start|>user) opens a turn
ROLE_IN_MARKER = re.compile(r"user|assistant|system|chatbot", re.I)
ROLE_AFTER = re.compile(r"\s*(?:user|assistant|system|model|chatbot)\b")


def common_prefix_len(a: str, b: str) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def special_tokens(tokenizer) -> set[str]:
    specials = set(getattr(tokenizer, "all_special_tokens", ()) or ())
    for added in (getattr(tokenizer, "added_tokens_decoder", None) or {}).values():
        if getattr(added, "special", False):
            specials.add(added.content)
    return {token for token in specials if token}


def marker_spans(text: str, specials: set[str]) -> list[tuple[int, int]]:
    spans = [m.span() for m in MARKER.finditer(text)]
    for token in specials:
        at = text.find(token)
        while at >= 0:
            spans.append((at, at + len(token)))
            at = text.find(token, at + 1)
    return sorted(set(spans))


def through_last_marker(tail: str, specials: set[str]) -> str:
    """``tail`` cut after its last marker ('' when it has none): what of a closing is trained."""
    spans = marker_spans(tail, specials)
    return tail[: max(end for _, end in spans)] if spans else ""


def before_opener(tail: str, opening: frozenset[str], specials: set[str]) -> str:
    """``tail`` cut where a turn opener (one of ``opening``) begins, the first marker excepted: a template
    whose EOS string is also its BOS closes with it."""
    for begin, end in marker_spans(tail, specials)[1:]:
        if tail[begin:end] in opening:
            return tail[:begin]
    return tail


def mid_closing(alone: str, followed: str, specials: set[str], opening: frozenset[str]) -> str:
    """The trained closing of a turn that something follows: what the template emits after the content
    whatever comes next, through its last marker. When the two renderings part inside a marker both open
    at the same place (gpt-oss closes a final turn with <|return|>, a mid one with <|end|>), the marker
    of the mid-conversation rendering is that closing. A template that closes a turn only when another
    follows (Apriel writes ``<|end|>`` for ``not loop.last``) closes it with the markers before the next
    turn's opener."""
    seen_next = followed
    alone, followed = before_opener(alone, opening, specials), before_opener(followed, opening, specials)
    shared = common_prefix_len(alone, followed)
    closing = through_last_marker(alone[:shared], specials)
    if closing:
        return closing
    first_alone, first_followed = marker_spans(alone, specials)[:1], marker_spans(followed, specials)[:1]
    if first_alone and first_followed and first_alone[0][0] == first_followed[0][0] <= shared \
            and not alone[: first_alone[0][0]].strip():
        return followed[: first_followed[0][1]]
    if not marker_spans(alone, specials) and len(followed) < len(seen_next):  # the next opener is known
        return through_last_marker(followed, specials)
    return ""


def openers(plain: str, prompted: str, probe: str, specials: set[str]) -> frozenset[str]:
    """Markers that open a turn, read off a template's rendering of one user message whose content is
    ``probe`` (``plain``; ``prompted`` with the generation prompt): those the text starts with (before any
    text but role names), those of the generation prompt, and those that name a role or precede one
    (``<|begin_user|>``, ``<|im_start|>user``). A closing never reaches one: a template that appends its
    assistant header whatever ``add_generation_prompt`` says (Command-R7B) would otherwise train the next
    turn's header as part of the answer's closing."""
    leading, cursor = set(), 0
    for begin, end in marker_spans(plain, specials):
        if not re.fullmatch(r"\s*[A-Za-z_]{0,16}\s*", plain[cursor:begin]):
            break
        leading.add(plain[begin:end])
        cursor = max(cursor, end)
    # an empty system block ahead of the user turn puts its closer in the leading run: not an opener
    after = plain[plain.find(probe) + len(probe):]
    leading -= {after[b:e] for b, e in marker_spans(after, specials)[:1]}
    prompt = prompted[common_prefix_len(plain, prompted):]
    found = leading | {prompt[b:e] for b, e in marker_spans(prompt, specials)}
    for text in (plain, prompted):
        for begin, end in marker_spans(text, specials):
            marker = text[begin:end]
            if not marker.startswith("</") and "end" not in marker.lower() and (
                    ROLE_IN_MARKER.search(marker) or ROLE_AFTER.match(text, end)):
                found.add(marker)
    return frozenset(m for m in found if not REASONING_TAG.fullmatch(m))


