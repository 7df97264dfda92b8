"""The built-in extraction task: determinism, split hygiene, held-out entities, answers that match their
sentences, scoring."""

from __future__ import annotations

import json
import re

import pytest

from tunesmith.data.builtin import (
    DAYS, GUEST_WORDS, KEYS, POOLS, SYSTEM_PROMPT, builtin_preference, builtin_task,
)
from tunesmith.data.builtin_pools import (CITIES, FIRST_NAMES, LAST_NAMES, PRACTICE_FIRST_NAMES, PRACTICE_PLACES,
                                          TEMPLATES)
from tunesmith.data.formats import normalise
from tunesmith.errors import TunesmithError


def sentences(rows):
    return [row["messages"][1]["content"] for row in rows]


def whole_words(entity: str) -> re.Pattern:
    """``entity`` as whole words: "Lee" is not found in "Leeds", "Lucía" is found in "Ana Lucía"."""
    return re.compile(rf"(?<!\w){re.escape(entity)}(?!\w)")


def test_golden_first_rows():
    assert builtin_task("train", 1) == [{"messages": [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": "I'd like to book for 6 on Wednesday. Location: Winnipeg. Name: Hao Trần."},
        {"role": "assistant",
         "content": '{"name": "Hao Trần", "city": "Winnipeg", "day": "Wednesday", "guests": 6}'},
    ]}]
    first, second = builtin_task("test", 2)
    assert (first["subset"], first["messages"][1]["content"]) == (
        "unseen", "Book a table for 11 in Hangzhou on Wednesday, name Nattapong Xu.")
    assert (second["subset"], second["messages"][2]["content"]) == (
        "seen", '{"name": "Sunita Hughes", "city": "Perth", "day": "Tuesday", "guests": 3}')


def test_pools_are_large_varied_and_never_overlap():
    for pool in (FIRST_NAMES, LAST_NAMES, CITIES):
        assert len(pool) >= 200 and len(set(pool)) == len(pool)
        assert sum(not entity.isascii() for entity in pool) >= 30
    assert sum(" " in city for city in CITIES) >= 30 and sum(" " in name for name in LAST_NAMES) >= 5
    assert {"María José", "Jean-Luc"} <= set(FIRST_NAMES) and {"Nguyễn", "O'Brien", "dos Santos"} <= set(LAST_NAMES)
    assert {"São Paulo", "Kraków", "Los Angeles", "Ōsaka", "Xi'an"} <= set(CITIES)
    # An entity found as whole words inside another entry or a sentence shape would appear in rows that do
    # not use it, and a held-out entity could then leak into training.
    entities = [*FIRST_NAMES, *LAST_NAMES, *CITIES, *PRACTICE_FIRST_NAMES, *PRACTICE_PLACES]
    assert len(set(entities)) == len(entities)
    texts = [*entities, *TEMPLATES, *DAYS, *GUEST_WORDS.values()]
    for entity in entities:
        pattern = whole_words(entity)
        assert [text for text in texts if text != entity and pattern.search(text)] == [], entity


def test_held_out_pools_split_every_pool():
    for slot, pool in (("first", FIRST_NAMES), ("last", LAST_NAMES), ("city", CITIES)):
        seen, unseen = POOLS["seen"][slot], POOLS["unseen"][slot]
        assert set(seen) | set(unseen) == set(pool) and not set(seen) & set(unseen)
        assert 0.15 < len(unseen) / len(pool) < 0.35


def test_training_rows_hold_every_training_entity_and_practice_stays_out_of_tests():
    """The pools are dealt like decks, practice entities with the training ones: the default 400 training rows
    name every training first name and city, so a "seen" test row names entities the model was trained on."""
    answers = [json.loads(row["messages"][2]["content"]) for row in builtin_task("train")]
    firsts = {first for first in POOLS["seen"]["first"] + PRACTICE_FIRST_NAMES
              if any(answer["name"].startswith(first + " ") for answer in answers)}
    assert firsts == set(POOLS["seen"]["first"] + PRACTICE_FIRST_NAMES)
    assert {answer["city"] for answer in answers} == set(POOLS["seen"]["city"] + PRACTICE_PLACES)
    test_text = "\n".join(json.dumps(row, ensure_ascii=False) for seed in range(3)
                          for row in builtin_task("test", 500, seed=seed) + builtin_preference("test", 500, seed=seed))
    assert [entity for entity in PRACTICE_FIRST_NAMES + PRACTICE_PLACES
            if entity in test_text and whole_words(entity).search(test_text)] == []
    # the "other city" mistake moves a practice place, too, to a training city
    pairs = [[json.loads(row[side][0]["content"]) for side in ("chosen", "rejected")]
             for row in builtin_preference("train")]
    moved = [(chosen["city"], rejected["city"]) for chosen, rejected in pairs
             if rejected.get("city", chosen["city"]) != chosen["city"]]
    assert any(chosen in PRACTICE_PLACES for chosen, _ in moved)
    assert {rejected for _, rejected in moved} <= set(POOLS["seen"]["city"])


def test_every_held_out_initial_is_trained():
    """An answer's value starts right after a quote, where the byte-level tokenizer spells an initial outside
    ASCII ("Ž", two bytes) unlike the one token it is after a space in the sentence. A held-out first name or
    city must test copying an unseen name, not writing a letter no training answer ever started with: each
    initial outside ASCII of a held-out one starts at least two training first names or cities."""
    trained = [entity[0] for slot in ("first", "city") for entity in POOLS["seen"][slot]]
    held_out = {entity[0] for slot in ("first", "city") for entity in POOLS["unseen"][slot]}
    assert {initial: trained.count(initial) for initial in held_out
            if not initial.isascii() and trained.count(initial) < 2} == {}
    assert {"Ž", "Ł", "Ú", "Í"} <= held_out  # the rule is exercised


def test_unseen_rows_name_nothing_any_training_row_holds():
    test = builtin_task("test", 300)
    assert [row["subset"] for row in test[:6]] == ["unseen", "seen"] * 3
    unseen = set()
    for row in test:
        booking = json.loads(row["messages"][2]["content"])
        first = next(name for name in FIRST_NAMES if booking["name"].startswith(name + " "))
        entities = {"first": first, "last": booking["name"][len(first) + 1:], "city": booking["city"]}
        # all three held out, or none
        held_out = {entity in POOLS["unseen"][slot] for slot, entity in entities.items()}
        assert held_out == {row["subset"] == "unseen"}
        if row["subset"] == "unseen":
            unseen |= set(entities.values())
    assert len(unseen) > 120
    training_text = "\n".join(json.dumps(row, ensure_ascii=False) for seed in range(3)
                               for row in builtin_task("train", 1000, seed=seed) + builtin_preference(
                                   "train", 1000, seed=seed))
    training_words = set(re.findall(r"\w+", training_text))
    for entity in unseen:
        # an entity with a word no training row holds is absent; the rest are searched for as whole words
        if set(re.findall(r"\w+", entity)) <= training_words:
            assert not whole_words(entity).search(training_text), entity


def test_unseen_rows_go_through_the_held_out_pools_before_repeating():
    unseen = [json.loads(row["messages"][2]["content"]) for row in builtin_task("test") if row["subset"] == "unseen"]
    assert len(unseen) == 50
    assert len({booking["city"] for booking in unseen}) == 50 and len({booking["name"] for booking in unseen}) == 50


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
    rows = builtin_task("train", 200) + builtin_task("test", 50)
    for row in rows:
        sentence, answer = row["messages"][1]["content"], row["messages"][2]["content"]
        booking = json.loads(answer)
        assert tuple(booking) == KEYS
        assert booking["name"] in sentence and booking["city"] in sentence and booking["day"] in sentence
        assert str(booking["guests"]) in sentence or GUEST_WORDS[booking["guests"]] in sentence
        # names are copied letter for letter, not as \u escapes
        assert f'"name": "{booking["name"]}"' in answer and f'"city": "{booking["city"]}"' in answer
    shapes = {template: re.compile(re.sub(r"\\\{\w+\\\}", ".+", re.escape(template)), re.DOTALL)
              for template in TEMPLATES}
    used = {template for row in rows for template, shape in shapes.items()
            if shape.fullmatch(row["messages"][1]["content"])}
    assert len(TEMPLATES) >= 40 and len(used) >= 35  # 250 rows use most of the sentence shapes


def test_rows_pass_validation():
    assert normalise(builtin_task("train", 100)).dropped == []
    assert normalise(builtin_preference("train", 100)).dropped == []
    assert normalise(builtin_task("test", 100)).dropped == []  # the extra "subset" key is allowed
    assert normalise(builtin_preference("test", 100)).dropped == []


def test_preference_rows_cycle_through_mistakes():
    rows = builtin_preference("train", 10)
    prompts = [row["prompt"] for row in rows]
    assert prompts == [row["messages"][:2] for row in builtin_task("train", 10)]
    test = builtin_preference("test", 10)
    assert [(row["prompt"], row["subset"]) for row in test] == [
        (row["messages"][:2], row["subset"]) for row in builtin_task("test", 10)]
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

