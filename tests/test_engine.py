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


def test_a_settled_request_ends_where_its_check_says_and_the_others_go_on(model):
    prompts = [_prompt(4, 6), _prompt(5, 8)]
    engine = Engine(model, pad_id=0)
    seen = []

    def after_four(tokens):
        seen.append(list(tokens))
        return len(tokens) == 4

    settled = engine.submit(Request(prompts[0], sampling=GREEDY, settled=after_four))
    other = engine.submit(Request(prompts[1], sampling=GREEDY))
    engine.run()
    assert settled.finish_reason == "settled" and settled.tokens == _alone(model, prompts[0])[:4]
    assert seen == [settled.tokens[:n] for n in range(1, 5)]  # asked after each token, then never again
    assert other.tokens == _alone(model, prompts[1]) and other.finish_reason == "length"


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


# --- stop strings, streaming text, top_k, attention layouts

def test_stop_strings_cut_the_text_and_streaming_never_sends_a_part_of_one(tokenizer):
    model = build_tiny_llama(initializer_range=0.5)
    prompt = tokenizer("The weather today is", add_special_tokens=False)["input_ids"]
    engine = Engine(model, pad_id=0, tokenizer=tokenizer)
    free = engine.submit(Request(prompt, sampling=SamplingConfig(max_new_tokens=24), on_text=lambda piece: None))
    engine.run()
    text = free.text
    assert text == tokenizer.decode(free.tokens, clean_up_tokenization_spaces=False) and len(text) > 12
    stop = text[5:9]  # a stop string that may span tokens
    pieces = []
    engine = Engine(model, pad_id=0, tokenizer=tokenizer)
    cut = engine.submit(Request(prompt, sampling=SamplingConfig(max_new_tokens=24), stop=("never there", stop),
                                on_text=pieces.append))
    engine.run()
    assert cut.finish_reason == "stop" and cut.text == text[:text.index(stop)]
    assert "".join(pieces) == cut.text
    assert cut.tokens == free.tokens[:len(cut.tokens)] and len(cut.tokens) < len(free.tokens)


def test_text_stream_holds_back_what_may_start_a_stop_string(tokenizer):
    from tunesmith.generate import TextStream

    ids = tokenizer("abc</end> tail", add_special_tokens=False)["input_ids"]
    stream = TextStream(tokenizer, stops=("</end>",))
    pieces = [stream.push(i) for i in ids]
    assert stream.stopped and stream.emitted == "abc" and "".join(pieces) == "abc" and stream.flush() == ""
    stream = TextStream(tokenizer, stops=("</end>",))
    pieces = [stream.push(i) for i in tokenizer("ab</en", add_special_tokens=False)["input_ids"]]
    assert "".join(pieces) == "ab" and not stream.stopped  # "</en" may still become the stop string
    assert stream.flush() == "</en" and stream.emitted == "ab</en"


def test_stop_strings_need_a_tokenizer(model):
    with pytest.raises(TunesmithError, match="need an engine made with a tokenizer"):
        Engine(model, pad_id=0).submit(Request([5, 6], stop=("x",)))
    with pytest.raises(TunesmithError, match="a stop string cannot be empty"):
        Request([5], stop=("",))


def test_top_k_keeps_the_k_most_likely():
    from tunesmith.generate import next_tokens

    logits = torch.tensor([[0.0, 3.0, 2.9, 2.8, -1.0]])
    sampling = SamplingConfig(temperature=5.0, top_k=2)
    picks = {int(next_tokens(logits, sampling, [torch.Generator().manual_seed(s)])[0]) for s in range(200)}
    assert picks == {1, 2}
    one = SamplingConfig(max_new_tokens=10, temperature=2.0, top_k=1, seed=3)
    wide = build_tiny_llama(initializer_range=0.5)
    assert _alone(wide, _prompt(20, 5), one) == _alone(wide, _prompt(20, 5))
    with pytest.raises(TunesmithError, match="top_k must be >= 0"):
        SamplingConfig(top_k=-1)


def _hf_greedy(model, prompt, steps):
    ids = torch.tensor([prompt])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=steps,
                         pad_token_id=0, eos_token_id=None)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("family", ["mistral-sliding", "qwen2-mixed-layers"])
def test_sliding_window_layers_match_transformers_generate(family):
    """Windows shorter than the sequences: the engine's masks must drop old keys exactly as transformers does."""
    from transformers import MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

    shape = dict(vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, sliding_window=4, initializer_range=0.5)
    torch.manual_seed(0)
    if family == "mistral-sliding":
        model = MistralForCausalLM(MistralConfig(**shape)).eval()
    else:
        model = Qwen2ForCausalLM(Qwen2Config(**shape, use_sliding_window=True, max_window_layers=1)).eval()
        assert set(model.config.layer_types) == {"full_attention", "sliding_attention"}
    prompts = [_prompt(30 + i, 3 + 4 * i) for i in range(3)]
    engine = Engine(model, pad_id=0)
    requests = [engine.submit(Request(p, sampling=SamplingConfig(max_new_tokens=10))) for p in prompts]
    engine.run()
    for request, prompt in zip(requests, prompts):
        assert request.tokens == _hf_greedy(model, prompt, 10)


def test_a_model_with_other_layers_is_refused():
    from tunesmith.kv import attention_kinds

    config = build_tiny_llama().config
    config.layer_types = ["full_attention", "linear_attention"]
    with pytest.raises(TunesmithError, match="attention-only models; this model \\(llama\\) has linear_attention"):
        attention_kinds(config)


def test_joiners_of_very_different_widths_are_prefilled_apart(model):
    """One forward per group of similar widths, narrowest first: a group ends where the next joiner would make
    its padding outweigh its tokens (widths 2, 3, 6: one forward; with 30 added, that one runs on its own). Every
    answer equals the prompt alone."""
    prompts = [_prompt(60, 30), _prompt(61, 2), _prompt(62, 6), _prompt(63, 3)]
    for joining, forwards in ((prompts[1:], [(3, 6)]), (prompts, [(3, 6), (1, 30)])):
        seen = []
        hook = model.model.embed_tokens.register_forward_hook(
            lambda module, args, out: seen.append(tuple(args[0].shape)))
        engine = Engine(model, pad_id=0)
        requests = [engine.submit(Request(p, sampling=GREEDY)) for p in joining]
        engine.step()
        hook.remove()
        assert seen == forwards
        engine.run()
        assert [r.tokens for r in requests] == [_alone(model, p) for p in joining]


def test_rows_keep_their_cache_when_others_leave_out_of_order(model):
    """Rows that finish first free cache rows the last running rows move into: nobody's tokens change."""
    prompts = [_prompt(40 + i, 3 + i) for i in range(6)]
    budgets = [2, 9, 1, 9, 3, 9]
    engine = Engine(model, pad_id=0, max_batch=4)
    requests = [engine.submit(Request(p, sampling=SamplingConfig(max_new_tokens=b))) for p, b in zip(prompts, budgets)]
    engine.run()
    for request, prompt, budget in zip(requests, prompts, budgets):
        assert request.tokens == _alone(model, prompt, SamplingConfig(max_new_tokens=budget))


def test_a_shared_prompt_start_is_computed_once_and_changes_no_tokens():
    """Prompts sharing a long start (a system prompt): its keys are computed once and reused by the group and by
    a request joining later, which runs only the rest of its prompt; every answer equals the prompt alone."""
    wide = build_tiny_llama(initializer_range=0.5)
    common = _prompt(50, 40)
    prompts = [common + _prompt(51 + i, 2 + i) for i in range(4)]
    seen = []
    hook = wide.model.embed_tokens.register_forward_hook(lambda module, args, out: seen.append(tuple(args[0].shape)))
    engine = Engine(wide, pad_id=0)
    requests = [engine.submit(Request(p, sampling=GREEDY)) for p in prompts]
    engine.step()
    assert seen[:2] == [(1, 40), (4, 5)]  # the shared start once, then each prompt's own tokens
    late = engine.submit(Request(common + [7, 8, 9], sampling=GREEDY))
    other = engine.submit(Request(_prompt(70, 6), sampling=GREEDY))
    engine.step()
    assert (2, 6) in seen  # the late request's 3 own tokens, left-padded beside the other's 6
    engine.run()
    # one that shares only 35 of the stored 40 tokens runs the rest after their keys (the stored ones, cut)
    part = engine.submit(Request(common[:35] + _prompt(71, 4), sampling=GREEDY))
    assert len(engine._prefix_of(part)[0]) == 35 and engine._prefix_of(part)[1][0][0].shape[2] == 35
    engine.step()
    assert seen[-1] == (1, 4)
    engine.run()
    hook.remove()
    for request in [*requests, late, other, part]:
        assert request.tokens == _alone(wide, request.prompt), request.prompt[-3:]
    # fewer than PREFIX_MIN (32) shared tokens: no prefix
    assert engine._prefix_of(Request(common[:31] + [5], sampling=GREEDY)) is None
