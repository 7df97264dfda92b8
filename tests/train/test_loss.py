"""Loss at trained positions only equals the full-logits loss; the schedule's values are exact."""

import math

import pytest
import torch

from tinymodels import build_tiny_llama
from tunesmith.templates import IGNORE_INDEX
from tunesmith.train.flat import shared_prefix_length
from tunesmith.train.loss import supervised_loss_sum, trained_tokens
from tunesmith.train.schedule import lr_at, warmup_steps


def _batch():
    torch.manual_seed(0)
    input_ids = torch.randint(5, 200, (2, 12))
    labels = input_ids.clone()
    labels[0, :5] = IGNORE_INDEX          # a prompt
    labels[1, :3] = IGNORE_INDEX
    labels[1, 9:] = IGNORE_INDEX          # padding
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 9:] = 0
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def test_trained_positions_loss_equals_full_logits_loss():
    model = build_tiny_llama().eval()
    batch = _batch()
    ours = supervised_loss_sum(model, batch)
    n = trained_tokens(batch)
    assert n == 13
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    targets = batch["labels"][:, 1:]
    full = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                             ignore_index=IGNORE_INDEX, reduction="sum")
    torch.testing.assert_close(ours.detach(), full, atol=1e-5, rtol=1e-6)
    # and transformers' own mean loss over the same labels
    with torch.no_grad():
        hf = model(**batch).loss
    torch.testing.assert_close(ours.detach() / n, hf, atol=1e-6, rtol=1e-6)


def test_trained_token_count_is_after_the_shift():
    batch = _batch()
    # row 0: labels 5..11 trained, targets are positions 1..11 → 7; row 1: 3..8 → 6
    assert trained_tokens(batch) == 13


@pytest.mark.parametrize("total,steps,ratio,expected", [(100, None, 0.05, 5), (10, None, 0.05, 1), (10, 3, 0.5, 3),
                                                        (7, None, 0.0, 0)])
def test_warmup_steps(total, steps, ratio, expected):
    assert warmup_steps(total, steps, ratio) == expected


def test_cosine_schedule_golden_values():
    lrs = [lr_at(s, base_lr=1.0, total_steps=10, warmup=2) for s in range(10)]
    expected = [0.5, 1.0] + [0.5 * (1 + math.cos(math.pi * k / 7)) for k in range(8)]
    assert lrs == pytest.approx(expected, abs=1e-12)
    assert lrs[2] == 1.0 and lrs[-1] == pytest.approx(0.0, abs=1e-12)
    floor = [lr_at(s, base_lr=2.0, total_steps=10, warmup=2, min_lr_ratio=0.1) for s in (2, 9)]
    assert floor == pytest.approx([2.0, 0.2])


def test_constant_schedule_after_warmup():
    assert [lr_at(s, base_lr=0.1, total_steps=5, warmup=2, kind="constant") for s in range(5)] == \
        pytest.approx([0.05, 0.1, 0.1, 0.1, 0.1])


def _shared_batch():
    """Three rows with a common 12-token prefix, different suffixes, right padding, trained tails."""
    torch.manual_seed(1)
    prefix = torch.randint(5, 200, (12,))
    rows, lengths = [], [20, 17, 22]
    for n in lengths:
        rows.append(torch.cat([prefix, torch.randint(5, 200, (n - 12,))]))
    width = max(lengths)
    input_ids = torch.zeros(3, width, dtype=torch.long)
    labels = torch.full((3, width), IGNORE_INDEX)
    attention_mask = torch.zeros(3, width, dtype=torch.long)
    for i, (row, n) in enumerate(zip(rows, lengths)):
        input_ids[i, :n], attention_mask[i, :n] = row, 1
        labels[i, 15:n] = row[15:]
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def test_shared_prefix_length_rules():
    batch = _shared_batch()
    assert shared_prefix_length(batch) == 12
    batch["labels"][1, 10] = 7  # a trained target inside the common prefix cuts it before that target
    assert shared_prefix_length(batch) == 9
    assert shared_prefix_length({**batch, "position_ids": batch["input_ids"]}) == 0  # packed rows
    assert shared_prefix_length({k: v[:1] for k, v in batch.items()}) == 0  # one row: nothing to share
    short = _shared_batch()
    short["input_ids"][2, 5] = 3
    assert shared_prefix_length(short) == 0  # 5 shared tokens: below the minimum


@pytest.mark.parametrize("layout", ["flat", "cache"])
@pytest.mark.parametrize("common", [True, False])
def test_layouts_give_same_loss_and_gradients(tiny_model, layout, common):
    from tunesmith.peft import LoRAConfig, adapter_parameters, freeze_base, inject_lora

    torch.manual_seed(0)
    inject_lora(tiny_model, LoRAConfig(r=4, alpha=8, target_modules="all-linear"))
    freeze_base(tiny_model)
    params = adapter_parameters(tiny_model)
    for p in params.values():  # non-zero B so the prefix's gradient path matters
        torch.nn.init.normal_(p, std=0.05)
    batch = _shared_batch()
    batch["labels"][0, 17:] = IGNORE_INDEX  # an untrained tail: the flat layout leaves it out
    if not common:  # no shared prefix: the flat layout still drops the padding
        batch["input_ids"][1, 2] += 1
    results = []
    for name in (layout, "plain"):
        tiny_model.zero_grad(set_to_none=True)
        loss = supervised_loss_sum(tiny_model, batch, layout=name)
        loss.backward()
        results.append((loss.detach(), {k: p.grad.clone() for k, p in params.items()}))
    (shared_loss, shared_grads), (plain_loss, plain_grads) = results
    torch.testing.assert_close(shared_loss, plain_loss, atol=1e-5, rtol=1e-6)
    for key in plain_grads:
        torch.testing.assert_close(shared_grads[key], plain_grads[key], atol=1e-5, rtol=1e-4)


def testflat_layout_holds_prefix_once_and_no_padding():
    from tunesmith.train.flat import flat_layout

    batch = _shared_batch()
    batch["labels"][2, 18:] = IGNORE_INDEX  # row 2's last trained target is now label 17
    ids, positions, segment, index = flat_layout(batch, 12)
    # each row up to its last trained target (label t is predicted by token t - 1): 12 + 7 + 4 + 5 tokens
    assert ids.shape == (1, 12 + 7 + 4 + 5)
    assert positions[0, :14].tolist() == list(range(14)) and positions[0, 19:21].tolist() == [12, 13]
    assert segment.tolist() == [-1] * 12 + [0] * 7 + [1] * 4 + [2] * 5
    assert index[1, :17].tolist() == list(range(12)) + list(range(19, 23)) + [0]
    torch.testing.assert_close(ids[0][index[2, :17]], batch["input_ids"][2, :17])
    assert index[2, 17:].tolist() == [0] * 5
    left = {**batch, "attention_mask": batch["attention_mask"].flip(1)}
    assert flat_layout(left, 0) is None  # left padding: not flattened


def testflat_layout_with_eager_attention():
    model = build_tiny_llama()
    model.config._attn_implementation = "eager"
    batch = _shared_batch()
    with torch.no_grad():
        torch.testing.assert_close(supervised_loss_sum(model, batch, layout="flat"),
                                   supervised_loss_sum(model, batch, layout="plain"), atol=1e-5, rtol=1e-6)


@pytest.mark.parametrize("quantized", [False, True])
def test_gradient_checkpointing_recomputes_blocks_and_keeps_gradients(quantized):
    from tunesmith.peft import LoRAConfig, adapter_parameters, freeze_base, inject_lora
    from tunesmith.quant.bnb import QuantSpec, quantize_model
    from tunesmith.train.loss import enable_gradient_checkpointing

    grads = []
    for checkpointing in (False, True):
        model = build_tiny_llama()
        if quantized:
            quantize_model(model, QuantSpec())
        torch.manual_seed(0)
        inject_lora(model, LoRAConfig(r=4, alpha=8, target_modules="all-linear"))
        freeze_base(model)
        for p in adapter_parameters(model).values():
            torch.nn.init.normal_(p, std=0.05)
        if checkpointing:
            enable_gradient_checkpointing(model)
        model.train()
        calls = []
        act = model.model.layers[0].mlp.act_fn
        act.forward = lambda x, _f=act.forward: (calls.append(1), _f(x))[1]  # module hooks skip recomputation
        supervised_loss_sum(model, _shared_batch()).backward()
        assert len(calls) == (2 if checkpointing else 1)  # the backward pass ran the block again
        grads.append({k: p.grad for k, p in adapter_parameters(model).items()})
    for key in grads[0]:
        torch.testing.assert_close(grads[1][key], grads[0][key], atol=1e-5, rtol=1e-4)
