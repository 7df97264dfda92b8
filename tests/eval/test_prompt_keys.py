"""Keys and values kept from the held-out loss pass (``eval/prompt_keys.py``) against transformers' own cache of
the same tokens, and the engine continuing from them against the engine prefilling the whole prompt."""

import pytest
import torch
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from tinymodels import build_tiny_llama
from tunesmith.engine import Engine, Request
from tunesmith.errors import TunesmithError
from tunesmith.eval.evaluate import _batches, _flat_tokens, heldout_loss
from tunesmith.eval.prompt_keys import KeptKeys, recording
from tunesmith.generate import SamplingConfig
from tunesmith.train import rows as row_attention
from tunesmith.train.decoder import attention_implementation

SYSTEM = list(range(300, 312))  # a 12-token start every example shares (more than MIN_SHARED_PREFIX)


def example(own: list[int], answer: list[int]) -> dict:
    ids = SYSTEM + own + answer
    return {"input_ids": ids, "labels": [-100] * (len(ids) - len(answer)) + answer}


EXAMPLES = [example([500, 501, 502], [600, 601, 602, 2]), example([510, 511], [610, 611, 2]),
            example([520, 521, 522, 523, 524], [620, 621, 2]), example([530], [630, 631, 632, 633, 2])]


@pytest.fixture(scope="module")
def model():
    model = build_tiny_llama(initializer_range=0.3)
    model.set_attn_implementation("sdpa")
    return model


def own_keys(model, ids: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """transformers' cache of ``ids`` run alone: per layer (keys, values), (1, kv_heads, n, head_dim)."""
    with torch.no_grad():
        cache = model(torch.tensor([ids], device=model.device), use_cache=True).past_key_values
    return [(layer.keys, layer.values) for layer in cache.layers]


@pytest.mark.parametrize("lengths", [
    {0: 14, 1: 15, 2: 19, 3: 13},  # the prompts' tokens and answer starts
    {0: 5, 1: 12, 2: 1, 3: 0},  # inside the shared start; row 3 wants nothing
])
def test_kept_keys_are_transformers_cache_of_the_same_tokens(model, lengths):
    kept = KeptKeys(lambda index, picked: lengths[index])
    picks = {}
    loss = heldout_loss(model, EXAMPLES, pad_id=2, batch_size=8, picks=picks, keys=kept)
    assert loss == heldout_loss(model, EXAMPLES, pad_id=2, batch_size=8)  # keeping keys changes nothing
    assert sorted(kept.kept) == sorted(i for i, n in lengths.items() if n)
    for index, layers in kept.kept.items():
        n = lengths[index]
        reference = own_keys(model, EXAMPLES[index]["input_ids"][:n])
        assert len(layers) == len(reference) == 2
        for (keys, values), (ref_keys, ref_values) in zip(layers, reference):
            assert keys.shape == ref_keys.shape == (1, 2, n, 8)
            torch.testing.assert_close(keys, ref_keys, rtol=0, atol=1e-5)
            torch.testing.assert_close(values, ref_values, rtol=0, atol=1e-5)
    assert kept.used == sum(lengths.values()) * 2 * 2 * 2 * 8 * 4  # layers × (keys, values) × heads × dim × fp32
    assert attention_implementation(model) == "sdpa"  # row attention was for the pass only


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_kept_keys_on_cuda_are_transformers_cache_too():
    """On a GPU the pass runs flat under SDPA with a block mask (no row attention): the same keys are kept."""
    torch.backends.cuda.matmul.allow_tf32 = False
    model = build_tiny_llama(initializer_range=0.3).cuda()
    model.set_attn_implementation("sdpa")
    lengths = {0: 14, 1: 15, 2: 19, 3: 13}
    kept = KeptKeys(lambda index, picked: lengths[index])
    heldout_loss(model, EXAMPLES, pad_id=2, batch_size=8, picks={}, keys=kept)
    assert sorted(kept.kept) == [0, 1, 2, 3]
    for index, layers in kept.kept.items():
        for (keys, values), (ref_keys, ref_values) in zip(layers, own_keys(model, EXAMPLES[index]["input_ids"][
                :lengths[index]])):
            assert keys.device.type == "cuda"
            torch.testing.assert_close(keys, ref_keys, rtol=0, atol=1e-5)
            torch.testing.assert_close(values, ref_values, rtol=0, atol=1e-5)


def test_keys_past_what_the_pass_computed_or_the_budget_are_not_kept(model):
    # example 0 has 19 tokens; the pass stops at its last trained target (18 tokens): 19 cannot be kept
    kept = KeptKeys(lambda index, picked: {0: 19, 1: 15}.get(index, 0))
    heldout_loss(model, EXAMPLES, pad_id=2, picks={}, keys=kept)
    assert sorted(kept.kept) == [1]
    one_row = 15 * 2 * 2 * 2 * 8 * 4
    kept = KeptKeys(lambda index, picked: 15, budget=one_row)
    heldout_loss(model, EXAMPLES, pad_id=2, picks={}, keys=kept)
    assert sorted(kept.kept) == [1] and kept.used == one_row  # the shortest example runs first


def test_keys_are_kept_only_where_the_pass_runs_flat(model):
    """Eager attention: no registered function to read keys from. A batch too long to run as one flat row runs
    padded: its record is not the flat row, and nothing is kept."""
    eager = build_tiny_llama(initializer_range=0.3)
    eager.set_attn_implementation("eager")
    kept = KeptKeys(lambda index, picked: 13)
    heldout_loss(eager, EXAMPLES, pad_id=2, picks={}, keys=kept)
    assert kept.kept == {}
    with recording(eager) as record:
        assert record is None
    record = {0: (torch.zeros(4, 2, 18, 8), torch.zeros(4, 2, 18, 8))}
    kept = KeptKeys(lambda index, picked: 13)
    kept.take(record, {"input_ids": torch.tensor([e["input_ids"][:18] for e in EXAMPLES[:1]] * 4),
                       "labels": torch.tensor([e["labels"][:18] for e in EXAMPLES[:1]] * 4)},
              [0, 1, 2, 3], {i: [] for i in range(4)})
    assert kept.kept == {}


def test_recording_wraps_the_attention_function_for_the_block_only(model):
    row_attention.install_row_attention(model)
    try:
        name = attention_implementation(model)
        original = ALL_ATTENTION_FUNCTIONS[name]
        with recording(model) as record:
            assert ALL_ATTENTION_FUNCTIONS[name] is not original
            with torch.no_grad():
                model(torch.tensor([SYSTEM]))
            assert sorted(record) == [0, 1] and record[0][0].shape == (1, 2, 12, 8)
        assert ALL_ATTENTION_FUNCTIONS[name] is original and name not in ALL_ATTENTION_FUNCTIONS._local_mapping
    finally:
        model.set_attn_implementation("sdpa")


def test_engine_continues_from_given_keys_as_from_its_own_prefill(model):
    prompts = [e["input_ids"][:len(e["input_ids"]) - 3] for e in EXAMPLES]
    greedy = SamplingConfig(max_new_tokens=8, temperature=0.0)
    engine = Engine(model, pad_id=2)
    alone = [engine.submit(Request(p, sampling=greedy)) for p in prompts]
    engine.run()
    engine = Engine(model, pad_id=2)
    # keys of all but the last token, of all but the last three, and none (one row prefilled as usual)
    given = [engine.submit(Request(p, sampling=greedy, prefix_keys=own_keys(model, p[:len(p) - back])))
             for p, back in zip(prompts[:3], (1, 3, 1))]
    given.append(engine.submit(Request(prompts[3], sampling=greedy)))
    engine.run()
    assert [r.tokens for r in given] == [r.tokens for r in alone]
    assert all(len(r.tokens) == 8 for r in alone) and len({tuple(r.tokens) for r in alone}) == 4
    assert all(r.prefix_keys is None for r in given)  # dropped once copied into the cache


def test_engine_refuses_keys_that_cover_no_token_or_the_whole_prompt_or_other_layers(model):
    prompt = EXAMPLES[0]["input_ids"][:15]
    with pytest.raises(TunesmithError, match="15 tokens of a 15-token prompt"):
        Request(prompt, prefix_keys=own_keys(model, prompt))
    with pytest.raises(TunesmithError, match="for 1 layers, but the model has 2"):
        Engine(model, pad_id=2).submit(Request(prompt, prefix_keys=own_keys(model, prompt[:4])[:1]))


def test_loss_batches_count_the_shared_start_once():
    examples = [example([500 + i] * (i + 1), [600, 2]) for i in range(6)]  # 15 to 20 tokens, 12 shared
    lengths = [len(e["input_ids"]) for e in examples]
    assert list(_batches(list(range(6)), examples, 16, None, shared=True)) == [[0, 1, 2, 3, 4, 5]]
    # 15 + 16 + 17 − 2 × 12 = 24 tokens flat: three rows fit in 25, a fourth would make 30; then 18 + 19 − 12 = 25
    assert _flat_tokens(lengths[:3], 12) == 24 and _flat_tokens(lengths[:4], 12) == 30
    assert list(_batches(list(range(6)), examples, 16, 25, shared=True)) == [[0, 1, 2], [3, 4], [5]]
    # without sharing, each row's every token counts
    assert list(_batches(list(range(6)), examples, 16, 40, shared=False)) == [[0, 1], [2, 3], [4, 5]]
    # a start shorter than MIN_SHARED_PREFIX is not taken out
    short = [{"input_ids": [1, 2, 3, 4 + i], "labels": [-100, -100, -100, 4 + i]} for i in range(3)]
    assert list(_batches([0, 1, 2], short, 16, 8, shared=True)) == [[0, 1], [2]]
