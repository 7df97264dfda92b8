"""Score generated answers against expected ones, with no judge model: one scorer for every dataset.

An answer is compared after ``normalise_answer`` (surrounding whitespace and one code fence removed).
When the expected answer is JSON (an object or an array), the comparison is on values, not text: key
order and spacing do not matter, types do (``4`` is not ``"4"``, ``true`` is not ``1``), and two more
rates are reported: ``valid_json_rate`` (the answer parses as JSON of the expected kind) and, for objects,
``fields`` (per top-level key, how often the answer holds that key with the expected value). Any other
expected answer (plain text, or a bare JSON scalar such as ``42``) is matched as text.

Rows may belong to a named subset (a row's ``"subset"`` key); each subset gets its own rates, suffixed
with its name: ``exact_match_unseen``, ``valid_json_rate_unseen``.
"""

from __future__ import annotations

import json
import re

from tunesmith.errors import TunesmithError

# One fence around the whole answer, with an optional language tag: ```json\n{...}\n```
_CODE_FENCE = re.compile(r"^```[\w-]*\s*|\s*```$")
# Rates that get a per-subset copy; ``fields`` stays overall only.
SUBSET_RATES = ("exact_match", "valid_json_rate")


def normalise_answer(text: str) -> str:
    return _CODE_FENCE.sub("", text.strip())


def expected_json(expected: str):
    """The expected answer as a JSON object or array, or None when it is to be matched as text."""
    value = _parse_json(normalise_answer(expected))
    return value if isinstance(value, (dict, list)) else None


def score_answer(prediction: str, expected: str) -> dict:
    """``exact_match`` for any answer; ``valid_json`` and ``fields`` (None / {} for a text answer)."""
    wanted = expected_json(expected)
    if wanted is None:
        return {"exact_match": normalise_answer(prediction) == normalise_answer(expected), "valid_json": None,
                "fields": {}}
    answer = _parse_json(normalise_answer(prediction))
    valid = type(answer) is type(wanted)
    fields = ({key: valid and key in answer and same_value(answer[key], value) for key, value in wanted.items()}
              if isinstance(wanted, dict) else {})
    return {"exact_match": valid and same_value(answer, wanted), "valid_json": valid, "fields": fields}


# While an answer's start is one of these, it may still become the opening code fence
_FENCE_START = re.compile(r"`{1,2}|```[\w-]*\s*")


def score_settled(start: str, expected: str) -> bool:
    """Whether every answer that begins with ``start`` scores the same under ``score_answer``: no token
    generated after it can change the verdict, so generation may stop there.

    Only a verdict of wrong can be settled early: a JSON answer can still be extended into any value while it
    is valid so far. After the surrounding whitespace and an opening code fence:

    * a JSON answer is settled when it begins with anything but the expected kind's opening ``{`` / ``[``, or
      when its value is complete (the matching ``}`` / ``]``) and any character but whitespace and a closing
      fence's backticks follows (``score_answer`` parses the whole normalised answer, and normalising only
      removes whitespace and one fence at either end);
    * a text answer is settled once it leaves the expected one, or adds to it anything but whitespace and a
      closing fence.

    ``start`` is decoded text of the tokens so far; a trailing U+FFFD (the bytes of a character not yet
    complete) is ignored. Anything that can still go either way is not settled."""
    start = start.rstrip("\ufffd").lstrip()
    if not start or _FENCE_START.fullmatch(start):
        return False
    body = _CODE_FENCE.sub("", start, count=1) if start.startswith("```") else start
    wanted = expected_json(expected)
    if wanted is None:
        answer = normalise_answer(expected)
        if not body.startswith(answer):
            return not answer.startswith(body)
        return _beyond_fence(body[len(answer):])
    opener = "{" if isinstance(wanted, dict) else "["
    if body[0] != opener:
        return True
    try:
        _, end = json.JSONDecoder().raw_decode(body)
    except json.JSONDecodeError:  # not complete yet (or wrong, which the rules above do not try to tell)
        return False
    return _beyond_fence(body[end:])


def _beyond_fence(tail: str) -> bool:
    """Whether ``tail``, text after the whole expected answer, holds a character that normalising cannot remove."""
    return any(not (c.isspace() or c == "`") for c in tail)


def answers_match(prediction: str, expected: str) -> bool:
    return score_answer(prediction, expected)["exact_match"]


def score_answers(predictions: list[str], expecteds: list[str], subsets: list[str | None] | None = None) -> dict:
    """Rates over a set of answers.

    ``n`` and ``exact_match`` always; ``valid_json_rate`` (over the rows whose expected answer is JSON) and
    ``fields`` (each key's accuracy over the rows whose expected object has it) when any row is JSON; for each
    subset named in ``subsets`` (one name or None per row), ``n_<subset>`` and the ``SUBSET_RATES`` over its rows.
    """
    if len(predictions) != len(expecteds) or (subsets is not None and len(subsets) != len(expecteds)):
        raise TunesmithError(f"{len(predictions)} predictions but {len(expecteds)} expected answers; "
                             "score one prediction per expected answer")
    if not predictions:
        raise TunesmithError("no predictions to score")
    scores = [score_answer(p, e) for p, e in zip(predictions, expecteds)]
    metrics = {"n": len(scores), **_rates(scores)}
    field_hits: dict[str, list[bool]] = {}
    for score in scores:
        for key, hit in score["fields"].items():
            field_hits.setdefault(key, []).append(hit)
    if field_hits:
        metrics["fields"] = {key: sum(hits) / len(hits) for key, hits in field_hits.items()}
    for name in sorted({s for s in subsets or () if s is not None}):
        members = [score for score, subset in zip(scores, subsets) if subset == name]
        metrics[f"n_{name}"] = len(members)
        metrics.update({f"{key}_{name}": value for key, value in _rates(members).items()})
    return metrics


def _rates(scores: list[dict]) -> dict:
    rates = {"exact_match": sum(s["exact_match"] for s in scores) / len(scores)}
    json_rows = [s for s in scores if s["valid_json"] is not None]
    if json_rows:
        rates["valid_json_rate"] = sum(s["valid_json"] for s in json_rows) / len(json_rows)
    return rates


def same_value(got, want) -> bool:
    """JSON values equal with their types: Python's ``1 == 1.0 == True`` would call a wrong type right."""
    if type(got) is not type(want):
        return False
    if isinstance(want, dict):
        return got.keys() == want.keys() and all(same_value(got[k], want[k]) for k in want)
    if isinstance(want, list):
        return len(got) == len(want) and all(same_value(g, w) for g, w in zip(got, want))
    return got == want


def _parse_json(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return None
