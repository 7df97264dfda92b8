"""The one answer scorer: the built-in task's numbers unchanged, text answers, JSON per field, subsets."""

import random

import pytest

from tunesmith.errors import TunesmithError
from tunesmith.eval.score import expected_json, normalise_answer, score_answer, score_answers, score_settled

BOOKING = '{"name": "Ada Park", "city": "Lyon", "day": "Friday", "guests": 4}'
KEYS = ("name", "city", "day", "guests")


# The built-in task's scoring cases as its own scorer scored them before this one replaced it (the
# parametrisation of tests/data/test_builtin.py at f9f39f7): the same verdicts, field by field.
@pytest.mark.parametrize("prediction, valid, exact, fields", [
    (BOOKING, True, True, [True] * 4),
    ("  \n" + BOOKING + "\n", True, True, [True] * 4),
    ("```json\n" + BOOKING + "\n```", True, True, [True] * 4),
    (BOOKING + "\n```", True, True, [True] * 4),
    ('{"guests": 4, "day": "Friday", "city": "Lyon", "name": "Ada Park"}', True, True, [True] * 4),
    ('{"name": "Ada Park", "city": "Lyon", "day": "Friday", "guests": "4"}', True, False, [True, True, True, False]),
    ('{"name": "Ada", "city": "Lyon", "day": "Friday", "guests": 4}', True, False, [False, True, True, True]),
    ('{"name": "Ada Park", "city": "Lyon", "day": "Friday"}', True, False, [True, True, True, False]),
    ('{"name": "Ada Park", "city": "Lyon", "day": "Friday", "guests": 4, "time": "8pm"}', True, False, [True] * 4),
    ('["Ada Park", "Lyon"]', False, False, [False] * 4),
    ('Sure! {"name": "Ada Park"}', False, False, [False] * 4),
    ('{"name": "Ada Park", "city": "Lyon",', False, False, [False] * 4),
])
def test_builtin_task_verdicts_unchanged(prediction, valid, exact, fields):
    assert score_answer(prediction, BOOKING) == {"exact_match": exact, "valid_json": valid,
                                                 "fields": dict(zip(KEYS, fields))}


def test_builtin_task_rates_unchanged():
    predictions = [BOOKING, BOOKING.replace("Friday", "Monday"), "no idea", BOOKING.replace("4}", "5}")]
    assert score_answers(predictions, [BOOKING] * 4) == {
        "n": 4, "exact_match": 0.25, "valid_json_rate": 0.75,
        "fields": {"name": 0.75, "city": 0.75, "day": 0.5, "guests": 0.5}}


def test_text_answers_match_after_whitespace_and_a_code_fence():
    assert normalise_answer("  ```python\nprint(1)\n```\n") == "print(1)"
    assert score_answer("  Paris\n", "Paris") == {"exact_match": True, "valid_json": None, "fields": {}}
    assert score_answer("```\nParis\n```", "Paris")["exact_match"]
    assert not score_answer("paris", "Paris")["exact_match"]  # case matters: exact means exact
    assert not score_answer("Paris.", "Paris")["exact_match"]
    # a bare JSON scalar is a text answer: "42.0" is not "42"
    assert expected_json("42") is None and expected_json("[1]") == [1]
    assert not score_answer("42.0", "42")["exact_match"] and score_answer(" 42 ", "42")["exact_match"]


def test_json_values_compare_with_their_types_at_every_depth():
    expected = '{"id": 7, "tags": ["a", "b"], "meta": {"ok": true, "score": 0.5}}'
    cases = {
        '{"meta": {"score": 0.5, "ok": true}, "tags": ["a", "b"], "id": 7}': (True, [True, True, True]),
        '{"id": 7.0, "tags": ["a", "b"], "meta": {"ok": true, "score": 0.5}}': (False, [False, True, True]),
        '{"id": 7, "tags": ["b", "a"], "meta": {"ok": 1, "score": 0.5}}': (False, [True, False, False]),
        '{"id": 7, "tags": ["a", "b", "c"], "meta": {"ok": true, "score": 0.5, "x": 1}}': (False, [True, False,
                                                                                               False]),
        '[7]': (False, [False, False, False]),
    }
    for prediction, (exact, fields) in cases.items():
        score = score_answer(prediction, expected)
        assert (score["exact_match"], list(score["fields"].values())) == (exact, fields), prediction
        assert score["valid_json"] == (prediction != "[7]")
    # an expected array: valid means an array; no fields
    assert score_answer("[1, 2]", "[1, 2]") == {"exact_match": True, "valid_json": True, "fields": {}}
    assert score_answer('{"a": 1}', "[1, 2]") == {"exact_match": False, "valid_json": False, "fields": {}}


def test_mixed_rows_per_field_over_the_rows_that_have_the_key_and_per_subset():
    expecteds = ['{"a": 1, "b": "x"}', '{"a": 2}', "Paris", '{"b": "y"}', "Rome"]
    predictions = ['{"a": 1, "b": "z"}', "nope", "Paris", '```json\n{"b": "y"}\n```', "Paris"]
    subsets = ["seen", "unseen", "unseen", None, "seen"]
    assert score_answers(predictions, expecteds, subsets) == {
        "n": 5,
        "exact_match": 2 / 5,  # rows 3 and 4
        "valid_json_rate": 2 / 3,  # of the three JSON rows, "nope" is not JSON
        "fields": {"a": 1 / 2, "b": 1 / 2},  # a: rows 1 (hit) and 2 (miss); b: rows 1 (miss) and 4 (hit)
        "n_seen": 2, "exact_match_seen": 0.0, "valid_json_rate_seen": 1.0,
        "n_unseen": 2, "exact_match_unseen": 0.5, "valid_json_rate_unseen": 0.0,
    }
    # text-only rows have no JSON rates at all
    assert score_answers(["a", "b"], ["a", "c"]) == {"n": 2, "exact_match": 0.5}


def test_scoring_needs_one_prediction_per_answer():
    with pytest.raises(TunesmithError, match="2 predictions but 1 expected answers"):
        score_answers(["a", "b"], ["a"])
    with pytest.raises(TunesmithError, match="no predictions"):
        score_answers([], [])


@pytest.mark.parametrize("start, expected, settled", [
    # JSON: open while the value is valid so far, or complete with at most whitespace and backticks after it
    ("", BOOKING, False), ("  \n", BOOKING, False), ("{", BOOKING, False), ('{"name": "Bob"', BOOKING, False),
    (BOOKING, BOOKING, False), (BOOKING.replace("Friday", "Monday"), BOOKING, False),
    (BOOKING + "\n``", BOOKING, False), (BOOKING + " \n```\n", BOOKING, False),
    # ... a partial or whole opening fence, whatever comes next
    ("`", BOOKING, False), ("``", BOOKING, False), ("```", BOOKING, False), ("```json", BOOKING, False),
    ("```json\n ", BOOKING, False), ("```json\n{", BOOKING, False),
    # ... a character being decoded: not yet known
    (BOOKING + "\ufffd", BOOKING, False),
    # settled: anything but the expected kind's opening first, or text after the complete value
    ("Sure", BOOKING, True), ("[", BOOKING, True), ("```json\n[", BOOKING, True), ("`x", BOOKING, True),
    ("{", '["a"]', True), (BOOKING + "\n```\n\nThis", BOOKING, True), (BOOKING + " x", BOOKING, True),
    ("{}\n{", BOOKING, True), ('["a"] .', '["a"]', True),
    # text: open while it is the start of the expected answer, or the answer and whitespace or a fence after it
    ("The cap", "The capital", False), ("The capital \n```", "The capital", False),
    ("```\nThe cap", "```\nThe capital\n```", False),
    ("The cop", "The capital", True), ("The capital!", "The capital", True), ("42.", "42", True),
])
def test_settled_verdicts(start, expected, settled):
    assert score_settled(start, expected) is settled


@pytest.mark.parametrize("expected", [BOOKING, '["Ada", 4]', "The capital is Lyon", "42"])
def test_a_settled_start_scores_the_same_whatever_follows(expected):
    """Random answers grown character by character: wherever the start is called settled, every continuation
    tried scores as the start itself does (so stopping there changes no metric). Not vacuous: some starts of
    every kind of answer are settled, some are not."""
    rng = random.Random(0)
    pieces = [expected[:n] for n in range(0, len(expected), 7)] + [
        "{", "}", "[", "]", '"', ":", ",", " ", "\n", "`", "```", "```json\n", "a", "4", "Lyon", "name", "é"]
    verdicts = []
    for _ in range(400):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(1, 6)))
        settled = score_settled(text, expected)
        verdicts.append(settled)
        if settled:
            score = score_answer(text, expected)
            assert not score["exact_match"], text
            for _ in range(20):
                more = text + "".join(rng.choice(pieces + [expected]) for _ in range(rng.randint(1, 4)))
                assert score_answer(more, expected) == score, (text, more)
    assert 0 < sum(verdicts) < len(verdicts)
