"""TrainState is the checkpoint's state.json: it round-trips through JSON and a damaged one is refused by name."""

import json

import pytest

from tunesmith.errors import TunesmithError
from tunesmith.train.state import TrainState


def test_round_trip_through_json():
    state = TrainState(total_steps=6, step=4, epoch=1, micro=3, bad_streak=1, skipped=2, tokens=812,
                       train_seconds=1.25)
    assert TrainState.from_json(json.loads(json.dumps(state.to_json())), source="s.json") == state
    assert list(state.to_json()) == ["total_steps", "step", "epoch", "micro", "bad_streak", "skipped", "tokens",
                                     "train_seconds"]


def test_train_seconds_may_be_a_whole_number():
    saved = {**TrainState(total_steps=2).to_json(), "train_seconds": 3}  # JSON writes 3.0 back as 3 elsewhere
    assert TrainState.from_json(saved, source="s.json").train_seconds == 3


@pytest.mark.parametrize("change, message", [
    ({"step": None}, r"s\.json: step is None, not a non-negative integer"),
    ({"micro": -1}, r"s\.json: micro is -1, not a non-negative integer"),
    ({"tokens": 2.5}, r"s\.json: tokens is 2\.5, not a non-negative integer"),
    ({"skipped": True}, r"s\.json: skipped is True, not a non-negative integer"),
    ({"train_seconds": "1"}, r"s\.json: train_seconds is '1', not a non-negative number"),
    ({"lr": 0.1}, r"s\.json is not a tunesmith train state \(missing \[\], unknown \['lr'\]\)"),
])
def test_damaged_state_is_refused_naming_the_file_and_key(change, message):
    saved = {**TrainState(total_steps=2).to_json(), **change}
    with pytest.raises(TunesmithError, match=message):
        TrainState.from_json(saved, source="s.json")


def test_missing_key_is_refused():
    saved = TrainState(total_steps=2).to_json()
    del saved["epoch"]
    with pytest.raises(TunesmithError, match=r"missing \['epoch'\], unknown \[\]"):
        TrainState.from_json(saved, source="s.json")
