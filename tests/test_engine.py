"""The generation engine's continuous batching: requests that join or leave mid-flight change nobody else's
tokens, finished rows leave the batch, seeded sampling repeats (issue 26)."""

from __future__ import annotations

import pytest
import torch
from tinymodels import build_tiny_llama

from tunesmith.engine import Engine, Request
from tunesmith.errors import TunesmithError
from tunesmith.generate import SamplingConfig

GREEDY = SamplingConfig(max_new_tokens=10)


@pytest.fixture(scope="module")
def model():
    return build_tiny_llama().eval()


def _prompt(seed: int, length: int) -> list[int]:
    return torch.randint(3, 1000, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def _alone(model, prompt, sampling=GREEDY, stop_ids=()):
    engine = Engine(model, pad_id=0)
    request = engine.submit(Request(prompt, sampling=sampling, stop_ids=frozenset(stop_ids)))
    engine.run()
    return request.tokens


def test_a_request_joining_mid_flight_changes_nobody_s_tokens(model):
    first, late = _prompt(0, 9), _prompt(1, 4)
    engine = Engine(model, pad_id=0)
    a = engine.submit(Request(first, sampling=GREEDY))
    for _ in range(4):
        engine.step()
    assert len(a.tokens) == 4
    b = engine.submit(Request(late, sampling=GREEDY))  # shorter than a's cache: padded on the left to join
    engine.run()
    assert a.tokens == _alone(model, first) and b.tokens == _alone(model, late)
    assert (a.finish_reason, b.finish_reason) == ("length", "length")


def test_a_longer_request_joining_pads_the_running_batch(model):
    short, long = _prompt(2, 3), _prompt(3, 20)
    engine = Engine(model, pad_id=0)
    a = engine.submit(Request(short, sampling=GREEDY))
    engine.step()
    b = engine.submit(Request(long, sampling=GREEDY))
    engine.run()
    assert a.tokens == _alone(model, short) and b.tokens == _alone(model, long)


def test_a_cancelled_request_leaves_and_the_others_go_on(model):
    prompts = [_prompt(4, 6), _prompt(5, 8), _prompt(6, 5)]
    engine = Engine(model, pad_id=0)
    requests = [engine.submit(Request(p, sampling=GREEDY)) for p in prompts]
    for _ in range(3):
        engine.step()
    engine.cancel(requests[1])
    engine.step()
    assert len(engine.running) == 2 and requests[1].finish_reason == "cancelled"
    assert len(requests[1].tokens) == 3  # the prefill step gave one token, two decode steps two more
    engine.run()
    assert requests[0].tokens == _alone(model, prompts[0]) and requests[2].tokens == _alone(model, prompts[2])


def test_finished_rows_leave_the_batch(model):
    prompts = [_prompt(7, 5), _prompt(8, 5)]
    engine = Engine(model, pad_id=0)
    short = engine.submit(Request(prompts[0], sampling=SamplingConfig(max_new_tokens=2)))
    longer = engine.submit(Request(prompts[1], sampling=SamplingConfig(max_new_tokens=6)))
    engine.step()
    engine.step()
    engine.step()
    assert engine.running == [longer] and short.tokens == _alone(model, prompts[0])[:2]
    engine.run()
    assert longer.tokens == _alone(model, prompts[1])[:6] and engine.running == []


def test_each_request_has_its_own_sampling_and_seed(model):
    prompt = _prompt(9, 6)
    hot = SamplingConfig(max_new_tokens=8, temperature=1.5, seed=7)
    engine = Engine(model, pad_id=0)
    greedy = engine.submit(Request(prompt, sampling=GREEDY))
    sampled = engine.submit(Request(prompt, sampling=hot))
    other_seed = engine.submit(Request(prompt, sampling=SamplingConfig(max_new_tokens=8, temperature=1.5, seed=8)))
    engine.run()
    assert greedy.tokens == _alone(model, prompt)
    assert sampled.tokens == _alone(model, prompt, hot)  # the same seed repeats, whatever the batch
    assert sampled.tokens != other_seed.tokens


def test_stop_ids_and_streaming(model):
    prompt = _prompt(10, 5)
    free = _alone(model, prompt)
    seen = []
    engine = Engine(model, pad_id=0)
    request = engine.submit(Request(prompt, sampling=GREEDY, stop_ids=frozenset({free[3]}), on_token=seen.append))
    engine.run()
    cut = free.index(free[3])
    assert request.tokens == free[:cut] == seen and request.finish_reason == "stop"


def test_bad_requests_are_refused(model):
    engine = Engine(model, pad_id=0)
    with pytest.raises(TunesmithError, match="a request needs a prompt of at least one token"):
        engine.submit(Request([]))
    with pytest.raises(TunesmithError, match="this engine serves no adapters"):
        engine.submit(Request([5], adapter="x"))
