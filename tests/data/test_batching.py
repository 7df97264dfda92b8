"""Batching: golden collated tensors and plans, and packed ≡ padded on a tiny Llama."""

from __future__ import annotations

import doctest

import pytest
import torch
import torch.nn.functional as F
from tinymodels import build_tiny_llama

from tunesmith.data import batching
from tunesmith.data.batching import (
    IGNORE_INDEX,
    bucket_batches,
    collate_for,
    gather_examples,
    pack_best_fit,
    pack_collate,
    pad_collate,
    plan_batches,
    sequential_batches,
)

A = {"input_ids": [11, 12, 13], "labels": [11, IGNORE_INDEX, 13]}
B = {"input_ids": [21, 22], "labels": [21, 22]}
C = {"input_ids": [31, 32, 33, 34], "labels": [IGNORE_INDEX, 32, 33, 34]}
X = IGNORE_INDEX


def test_docstring_examples_run():
    result = doctest.testmod(batching)
    assert result.attempted > 0 and result.failed == 0


def test_pad_collate_golden():
    batch = pad_collate([A, B, C], pad_id=0, pad_to_multiple_of=3)
    assert batch["input_ids"].tolist() == [[11, 12, 13, 0, 0, 0],
                                           [21, 22, 0, 0, 0, 0],
                                           [31, 32, 33, 34, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0, 0], [1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 0, 0]]
    assert batch["labels"].tolist() == [[11, X, 13, X, X, X], [21, 22, X, X, X, X], [X, 32, 33, 34, X, X]]


def test_pad_collate_rejects_misaligned_labels():
    with pytest.raises(ValueError, match="example 1: 2 input_ids but 1 labels"):
        pad_collate([A, {"input_ids": [1, 2], "labels": [2]}], pad_id=0)


def padding(lengths, batches):
    return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)


def test_bucketing_covers_every_index_once_and_cuts_padding():
    lengths = [8] * 4 + [2] * 12 + [40] * 2 + [3, 5, 9, 30, 12, 6, 7, 4, 25, 2, 2, 3]
    plain = sequential_batches(len(lengths), 4, seed=0)
    bucketed = bucket_batches(lengths, 4, seed=0, bucket_factor=2)
    for batches in (plain, bucketed):
        assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
        assert [len(b) for b in batches].count(4) == 7
    assert (padding(lengths, plain), padding(lengths, bucketed)) == (416, 256)
    assert bucket_batches(lengths, 4, seed=0, bucket_factor=2) == bucketed
    assert bucket_batches(lengths, 4, seed=1, bucket_factor=2) != bucketed


def test_bucketing_without_shuffle_sorts_each_chunk():
    by_length = bucket_batches([5, 1, 4, 2, 3, 0], 2, seed=0, shuffle=False, bucket_factor=2)
    assert by_length == [[1, 3], [2, 0], [5, 4]]  # chunks [0..3] and [4, 5], each sorted by length
    assert sequential_batches(5, 2, seed=0, shuffle=False) == [[0, 1], [2, 3], [4]]


def test_pack_best_fit_golden():
    # Longest first: 12 opens bin 0 (room 8), 9 opens bin 1 (room 11), 9 joins bin 1 (room 2).
    # Best fit puts 2 into bin 1, the tighter bin; first fit would have put it into bin 0.
    assert pack_best_fit([9, 2, 12, 1, 9], budget=20) == [[2, 3], [0, 4, 1]]
    assert pack_best_fit([7, 3, 5, 2, 8, 4, 1, 6], budget=10) == [[4, 3], [0, 1], [7, 5], [2, 6]]


def test_pack_best_fit_rejects_overlong_example():
    with pytest.raises(ValueError, match="example 2 has 11 tokens, more than the packing budget of 10"):
        pack_best_fit([3, 10, 11], budget=10)


def test_pack_collate_one_row_golden():
    batch = pack_collate([A, B, C], pad_id=0, budget=10)
    assert set(batch) == {"input_ids", "labels", "position_ids"}  # no attention_mask: see pack_collate
    assert batch["input_ids"].tolist() == [[11, 12, 13, 21, 22, 31, 32, 33, 34, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1, 2, 3, 4]]
    assert batch["labels"].tolist() == [[X, X, 13, X, 22, X, 32, 33, 34, X]]
    assert pack_collate([A, B], pad_id=0)["input_ids"].shape == (1, 5)


def test_pack_collate_rows_golden():
    batch = pack_collate([[A, B], [C]], pad_id=0, budget=6)
    assert batch["input_ids"].tolist() == [[11, 12, 13, 21, 22, 0], [31, 32, 33, 34, 0, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 2], [0, 1, 2, 3, 4, 5]]
    assert batch["labels"].tolist() == [[X, X, 13, X, 22, X], [X, 32, 33, 34, X, X]]
    with pytest.raises(ValueError, match="packed row 0 has 5 tokens, more than the budget of 4"):
        pack_collate([[A, B], [C]], pad_id=0, budget=4)


def test_plan_batches_contract():
    lengths = [7, 3, 5, 2, 8, 4, 1, 6]
    examples = [{"input_ids": list(range(1, n + 1)), "labels": list(range(1, n + 1))} for n in lengths]
    plan = plan_batches(lengths, strategy="pack", batch_size=2, token_budget=10, seed=0, epoch=0)
    assert plan == [[[7, 5], [4, 3]], [[0, 1], [2, 6]]]
    assert plan_batches(lengths, strategy="pack", batch_size=2, token_budget=10, seed=0, epoch=1) != plan
    tensors = collate_for("pack", pad_id=0, token_budget=10)(gather_examples(examples, plan[0]))
    assert tensors["input_ids"].tolist() == [[1, 2, 3, 4, 5, 6, 1, 2, 3, 4], [1, 2, 3, 4, 5, 6, 7, 8, 1, 2]]
    goldens = {"pad": ([[4, 1], [5, 2], [0, 3], [7, 6]], [[3, 6], [1, 5], [7, 0], [4, 2]]),
               # all eight fit one bucket chunk: the same length-sorted pairs, reordered each epoch
               "bucket": ([[6, 3], [2, 7], [1, 5], [0, 4]], [[6, 3], [1, 5], [2, 7], [0, 4]])}
    for strategy, by_epoch in goldens.items():
        for epoch, golden in enumerate(by_epoch):
            kwargs = dict(strategy=strategy, batch_size=2, token_budget=None, seed=0, epoch=epoch)
            assert plan_batches(lengths, **kwargs) == golden
        tensors = collate_for(strategy, pad_id=0)(gather_examples(examples, by_epoch[0][0]))
        assert tensors["input_ids"].shape == (2, max(lengths[i] for i in by_epoch[0][0]))
    with pytest.raises(ValueError, match="unknown batching strategy 'sorted'"):
        plan_batches(lengths, strategy="sorted", batch_size=3, token_budget=None, seed=0, epoch=0)
    with pytest.raises(ValueError, match="needs a token_budget"):
        plan_batches(lengths, strategy="pack", batch_size=3, token_budget=None, seed=0, epoch=0)


# --- packed ≡ padded on the tiny model ---------------------------------------------------------

LENGTHS = [5, 9, 3, 7, 4, 6]


def random_examples(lengths=LENGTHS, seed=0):
    """Random tokens; even examples train every token (the first included), odd ones a 2-token prompt."""
    g = torch.Generator().manual_seed(seed)
    examples = []
    for k, n in enumerate(lengths):
        ids = torch.randint(3, 49152, (n,), generator=g).tolist()
        labels = ids if k % 2 == 0 else [IGNORE_INDEX] * 2 + ids[2:]
        examples.append({"input_ids": ids, "labels": list(labels)})
    return examples


def summed_ce(logits, labels, spans):
    """Each example's summed cross-entropy; the shift is done here, within the example's own span."""
    return torch.stack([F.cross_entropy(logits[row, start:end - 1], labels[row, start + 1:end],
                                        ignore_index=IGNORE_INDEX, reduction="sum")
                        for row, start, end in spans])


def spans_of(bins, lengths):
    """(row, start, end) of every example of a packed batch, in the order of ``bins`` flattened."""
    spans = []
    for row, bin_ in enumerate(bins):
        start = 0
        for i in bin_:
            spans.append((row, start, start + lengths[i]))
            start += lengths[i]
    return spans


def padded_reference(model, examples):
    batch = pad_collate(examples, pad_id=2)
    with torch.no_grad():
        out = model(**batch, use_cache=False)
    spans = [(row, 0, len(e["input_ids"])) for row, e in enumerate(examples)]
    return summed_ce(out.logits, batch["labels"], spans), out.loss


@pytest.fixture(params=["sdpa", "eager"])
def model(request):
    model = build_tiny_llama(attn_implementation=request.param)
    assert model.config._attn_implementation == request.param
    return model


def test_packed_row_loss_equals_padded(model):
    examples = random_examples()
    padded_losses, padded_mean = padded_reference(model, examples)
    batch = pack_collate(examples, pad_id=2)
    with torch.no_grad():
        out = model(**batch, use_cache=False)
    losses = summed_ce(out.logits, batch["labels"], spans_of([range(len(examples))], LENGTHS))
    torch.testing.assert_close(losses, padded_losses, rtol=0, atol=1e-5)
    # The model's own loss shifts across example boundaries; it matches only because every
    # example's first label is IGNORE_INDEX.
    torch.testing.assert_close(out.loss, padded_mean, rtol=0, atol=1e-5)


def test_packed_rows_with_padding_equal_padded(model):
    examples = random_examples()
    bins = pack_best_fit(LENGTHS, budget=16)
    assert bins == [[1, 3], [5, 0, 4], [2]]
    order = [i for bin_ in bins for i in bin_]
    padded_losses, padded_mean = padded_reference(model, [examples[i] for i in order])
    rows = gather_examples(examples, bins)
    batch = pack_collate(rows, pad_id=2, budget=16)
    assert batch["input_ids"].shape == (3, 16)
    with torch.no_grad():
        out = model(**batch, use_cache=False)
        other_pad = model(**pack_collate(rows, pad_id=7, budget=16), use_cache=False)
    torch.testing.assert_close(summed_ce(out.logits, batch["labels"], spans_of(bins, LENGTHS)),
                               padded_losses, rtol=0, atol=1e-5)
    torch.testing.assert_close(out.loss, padded_mean, rtol=0, atol=1e-5)
    # Padding tokens are invisible to real tokens: other pad ids, identical real-token logits.
    real = batch["labels"] != IGNORE_INDEX
    real |= torch.arange(16) < torch.tensor([16, 15, 3])[:, None]  # all real tokens, trained or not
    torch.testing.assert_close(other_pad.logits[real], out.logits[real], rtol=0, atol=0)


def test_packed_example_cannot_see_its_neighbour(model):
    examples = random_examples()[:2]
    changed = [{"input_ids": [t + 1 for t in examples[0]["input_ids"]], "labels": examples[0]["labels"]},
               examples[1]]
    first = slice(0, LENGTHS[0])
    second = slice(LENGTHS[0], LENGTHS[0] + LENGTHS[1])
    with torch.no_grad():
        before = model(**pack_collate(examples, pad_id=2), use_cache=False).logits[0]
        after = model(**pack_collate(changed, pad_id=2), use_cache=False).logits[0]
        # Why plan/collate demand use_cache=False: with the config default (use_cache=True) the model
        # builds a cache, transformers then skips packed-sequence detection, and examples leak.
        leaked = model(**pack_collate(changed, pad_id=2)).logits[0]
    assert not torch.allclose(after[first], before[first])
    torch.testing.assert_close(after[second], before[second], rtol=0, atol=0)
    assert not torch.allclose(leaked[second], before[second])
