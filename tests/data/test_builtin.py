"""The built-in extraction task: determinism, split hygiene, answers that match their sentences, scoring."""

from __future__ import annotations

import json

import pytest

from tunesmith.data.builtin import (
    GUEST_WORDS, KEYS, SYSTEM_PROMPT, builtin_preference, builtin_task, score_prediction, score_predictions,
)
from tunesmith.data.formats import normalise
from tunesmith.errors import TunesmithError

EXPECTED = '{"name": "Ada Park", "city": "Lyon", "day": "Friday", "guests": 4}'


def sentences(rows):
    return [row["messages"][1]["content"] for row in rows]


def test_golden_first_row():
    assert builtin_task("train", 1) == [{"messages": [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": "Hello! Tom Khan booking a table, Sunday in Oslo, 11 seats."},
        {"role": "assistant", "content": '{"name": "Tom Khan", "city": "Oslo", "day": "Sunday", "guests": 11}'},
    ]}]


def test_same_seed_same_rows_and_other_seed_other_rows():
    assert builtin_task("train", 50) == builtin_task("train", 50)
    assert builtin_task("train", 50) != builtin_task("train", 50, seed=1)
    assert builtin_task("train", 400)[:50] == builtin_task("train", 50)  # a larger n extends, never reshuffles


def test_default_sizes_and_unique_sentences():
    train, test = builtin_task("train"), builtin_task("test")
    assert (len(train), len(test)) == (400, 100)
    assert len(set(sentences(train))) == 400 and len(set(sentences(test))) == 100


def test_train_and_test_never_share_a_sentence():
    test = set(sentences(builtin_task("test", 300)))
    for seed in range(3):
        assert not test & set(sentences(builtin_task("train", 1000, seed=seed)))


def test_answer_matches_sentence_and_keys_are_fixed():
    for row in builtin_task("train", 200) + builtin_task("test", 50):
        sentence, answer = row["messages"][1]["content"], row["messages"][2]["content"]
        booking = json.loads(answer)
        assert tuple(booking) == KEYS
        assert booking["name"] in sentence and booking["city"] in sentence and booking["day"] in sentence
        assert str(booking["guests"]) in sentence or GUEST_WORDS[booking["guests"]] in sentence


def test_rows_pass_validation():
    assert normalise(builtin_task("train", 100)).dropped == []
    assert normalise(builtin_preference("train", 100)).dropped == []


def test_preference_rows_cycle_through_mistakes():
    rows = builtin_preference("train", 10)
    prompts = [row["prompt"] for row in rows]
    assert prompts == [row["messages"][:2] for row in builtin_task("train", 10)]
    chosen = [json.loads(row["chosen"][0]["content"]) for row in rows]
    rejected = [json.loads(row["rejected"][0]["content"]) for row in rows]
    wrong_keys = [sorted(k for k in KEYS if c.get(k) != r.get(k)) for c, r in zip(chosen, rejected)]
    assert wrong_keys == [["day"], ["guests"], ["name"], ["city"], ["name"],
                          ["day"], ["guests"], ["city"], ["city"], ["name"]]
    assert "name" not in rejected[2] and "city" not in rejected[7]  # missing key, a different key each cycle
    assert rejected[4]["name"] == chosen[4]["name"].split()[0]
    assert rejected[1]["guests"] == chosen[1]["guests"] - 1 and rejected[6]["guests"] == chosen[6]["guests"] + 1


def test_unknown_split():
    with pytest.raises(TunesmithError, match="no split 'validation'"):
        builtin_task("validation")


@pytest.mark.parametrize("prediction, valid, exact, fields", [
    (EXPECTED, True, True, [True] * 4),
    ("  \n" + EXPECTED + "\n", True, True, [True] * 4),
    ("```json\n" + EXPECTED + "\n```", True, True, [True] * 4),
    (EXPECTED + "\n```", True, True, [True] * 4),
    ('{"guests": 4, "day": "Friday", "city": "Lyon", "name": "Ada Park"}', True, True, [True] * 4),
    ('{"name": "Ada Park", "city": "Lyon", "day": "Friday", "guests": "4"}', True, False, [True, True, True, False]),
    ('{"name": "Ada", "city": "Lyon", "day": "Friday", "guests": 4}', True, False, [False, True, True, True]),
    ('{"name": "Ada Park", "city": "Lyon", "day": "Friday"}', True, False, [True, True, True, False]),
    ('{"name": "Ada Park", "city": "Lyon", "day": "Friday", "guests": 4, "time": "8pm"}', True, False, [True] * 4),
    ('["Ada Park", "Lyon"]', False, False, [False] * 4),
    ('Sure! {"name": "Ada Park"}', False, False, [False] * 4),
    ('{"name": "Ada Park", "city": "Lyon",', False, False, [False] * 4),
])
def test_score_prediction(prediction, valid, exact, fields):
    assert score_prediction(prediction, EXPECTED) == {
        "valid_json": valid, "exact_match": exact, "fields": dict(zip(KEYS, fields))}


def test_score_predictions():
    predictions = [EXPECTED, EXPECTED.replace("Friday", "Monday"), "no idea", EXPECTED.replace("4}", "5}")]
    assert score_predictions(predictions, [EXPECTED] * 4) == {
        "n": 4, "valid_json_rate": 0.75, "exact_match": 0.25,
        "fields": {"name": 0.75, "city": 0.75, "day": 0.5, "guests": 0.5}}


def test_score_predictions_needs_matching_lengths():
    with pytest.raises(TunesmithError, match="2 predictions but 1 expected answers"):
        score_predictions([EXPECTED, EXPECTED], [EXPECTED])
