"""The sampling loop: exact greedy tokens against ``model.generate``, batch ≡ alone, stops, seeds, top-p, streaming."""

from __future__ import annotations

import pytest
import torch
from tinymodels import build_tiny_llama

from tunesmith.errors import TunesmithError
from tunesmith.engine import generate
from tunesmith.generate import SamplingConfig, StreamDecoder, next_tokens

EOS = 2
PROMPTS = [[1, 504, 3100, 28, 1654], [1, 9, 77], [1, 1000, 2000, 3000, 4000, 5000, 6000, 7000, 11], [42]]
GREEDY = SamplingConfig(max_new_tokens=12)
HOT = SamplingConfig(max_new_tokens=20, temperature=5.0, seed=7)


@pytest.fixture(scope="module")
def model():
    """The tiny Llama with a wider init: at the default init its greedy output just repeats the last prompt
    token, which would hide padding bugs; at this one every row's continuation depends on its whole prompt."""
    return build_tiny_llama(initializer_range=0.5)


def run(model, prompts, sampling, stop_ids=(), on_token=None):
    return generate(model, prompts, sampling=sampling, stop_ids=stop_ids, pad_id=EOS, on_token=on_token)


def count_forwards(model):
    calls = []
    handle = model.register_forward_hook(lambda module, args, output: calls.append(1))
    return calls, handle


def test_greedy_matches_hf_generate(model):
    for prompt in PROMPTS:
        reference = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                   do_sample=False, max_new_tokens=GREEDY.max_new_tokens, eos_token_id=EOS,
                                   pad_token_id=EOS)[0, len(prompt):].tolist()
        expected = reference[:reference.index(EOS)] if EOS in reference else reference
        assert run(model, [prompt], GREEDY, stop_ids={EOS}) == [expected]


def test_greedy_batch_equals_each_prompt_alone(model):
    alone = [run(model, [prompt], GREEDY)[0] for prompt in PROMPTS]
    assert all(len(set(tokens)) > 1 for tokens in alone)  # a non-trivial continuation, so padding bugs show
    assert run(model, PROMPTS, GREEDY) == alone
    assert run(model, PROMPTS[::-1], GREEDY) == alone[::-1]


def test_padding_is_really_masked(model):
    """A different pad id must not change anything: padded positions are never attended to."""
    batch = generate(model, PROMPTS, sampling=GREEDY, stop_ids=(), pad_id=EOS)
    assert generate(model, PROMPTS, sampling=GREEDY, stop_ids=(), pad_id=31337) == batch


def test_stop_id_ends_row_and_is_not_returned(model):
    full = run(model, PROMPTS, GREEDY)
    stop = full[0][3]
    streamed = [[] for _ in PROMPTS]
    out = run(model, PROMPTS, GREEDY, stop_ids=[stop], on_token=lambda row, token: streamed[row].append(token))
    expected = [tokens[:tokens.index(stop)] if stop in tokens else tokens for tokens in full]
    assert out == expected
    assert len(out[0]) == 3
    assert streamed == expected


def test_loop_ends_when_all_rows_are_done(model):
    full = run(model, [PROMPTS[0]], GREEDY)
    calls, handle = count_forwards(model)
    try:
        out = run(model, [PROMPTS[0]], GREEDY, stop_ids={full[0][3]})
    finally:
        handle.remove()
    assert out == [full[0][:3]]
    assert len(calls) == 4  # prefill + three decode steps; the fourth token is the stop


def test_max_new_tokens(model):
    calls, handle = count_forwards(model)
    try:
        assert run(model, PROMPTS, SamplingConfig(max_new_tokens=5)) == [t[:5] for t in run(model, PROMPTS, GREEDY)]
        calls.clear()
        assert run(model, PROMPTS, SamplingConfig(max_new_tokens=0)) == [[], [], [], []]
    finally:
        handle.remove()
    assert calls == []
    assert [len(t) for t in run(model, PROMPTS, HOT)] == [HOT.max_new_tokens] * len(PROMPTS)


def test_same_seed_same_samples_other_seed_other_samples(model):
    first = run(model, PROMPTS, HOT)
    assert run(model, PROMPTS, HOT) == first
    other = run(model, PROMPTS, SamplingConfig(max_new_tokens=20, temperature=5.0, seed=8))
    assert all(a != b for a, b in zip(first, other))
    assert first != run(model, PROMPTS, GREEDY)


def test_sampled_row_does_not_depend_on_its_neighbours(model):
    batch = run(model, PROMPTS, HOT)
    assert [run(model, [prompt], HOT)[0] for prompt in PROMPTS] == batch
    assert run(model, PROMPTS[1:3], HOT) == batch[1:3]


def test_tiny_top_p_is_greedy(model):
    nucleus_of_one = SamplingConfig(max_new_tokens=12, temperature=1.0, top_p=1e-6, seed=3)
    assert run(model, PROMPTS, nucleus_of_one) == run(model, PROMPTS, GREEDY)


@pytest.mark.parametrize(("top_p", "allowed"), [(0.45, {0}), (0.75, {0, 1}), (0.85, {0, 1, 2}), (1.0, {0, 1, 2, 3})])
def test_top_p_keeps_the_smallest_set_reaching_top_p(top_p, allowed):
    """p = [0.5, 0.3, 0.15, 0.05]: 0.45 → {0}; 0.75 → {0, 1} (0.8 ≥ 0.75); 0.85 → {0, 1, 2}; 1 → all."""
    rows = 400
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log().expand(rows, 4)
    generators = [torch.Generator().manual_seed(seed) for seed in range(rows)]
    drawn = next_tokens(logits, SamplingConfig(temperature=1.0, top_p=top_p), generators)
    assert set(drawn.tolist()) == allowed


def test_empty_prompt_and_bad_config_are_errors(model):
    with pytest.raises(TunesmithError, match="empty prompt"):
        run(model, [[1, 2], []], GREEDY)
    with pytest.raises(TunesmithError, match="top_p"):
        SamplingConfig(top_p=0.0)
    with pytest.raises(TunesmithError, match="temperature"):
        SamplingConfig(temperature=-1.0)
    assert run(model, [], GREEDY) == []


def test_stream_decoder_emits_whole_characters(tokenizer):
    text = "Café 👋 naïve — 日本語 résumé 🎉! <|im_end|>"
    ids = tokenizer.encode(text)
    assert any("\ufffd" in tokenizer.decode([i]) for i in ids)  # the text does split characters over tokens
    decoder = StreamDecoder(tokenizer)
    increments = [decoder.push(i) for i in ids]
    assert "".join(increments) + decoder.flush() == tokenizer.decode(ids) == text
    assert not any("\ufffd" in piece for piece in increments)
    assert " 👋" in increments and " 🎉" in increments and "語" in increments  # each emoji arrives whole


def test_stream_decoder_flushes_an_unfinished_character(tokenizer):
    emoji = tokenizer.encode("🎉")
    assert len(emoji) > 1
    decoder = StreamDecoder(tokenizer)
    assert [decoder.push(i) for i in emoji[:-1]] == [""] * (len(emoji) - 1)
    assert decoder.flush() == tokenizer.decode(emoji[:-1])


def test_stream_decoder_skips_special_tokens(tokenizer):
    ids = tokenizer.encode("Hi!<|im_end|>")
    decoder = StreamDecoder(tokenizer, skip_special_tokens=True)
    assert "".join(decoder.push(i) for i in ids) == "Hi!"


def test_generation_builds_no_autograd_graph():
    """Trainable weights (an adapter mid-run) must not make decoding record a graph step after step."""
    model = build_tiny_llama()
    for param in model.parameters():
        param.requires_grad_(True)
    outputs = []
    handle = model.register_forward_hook(lambda module, args, output: outputs.append(output.logits))
    run(model, PROMPTS[:2], SamplingConfig(max_new_tokens=3))
    handle.remove()
    assert len(outputs) == 3 and not any(logits.requires_grad for logits in outputs)
