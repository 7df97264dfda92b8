"""Preference losses against hand-computed values; completion log-probs against the plain full-logits forward;
the adapters-off reference against a fresh base model; one DPO step against a plain re-implementation."""

import math

import pytest
import torch
import torch.nn.functional as F

from tinymodels import build_tiny_llama
from tunesmith.config import DPOSection
from tunesmith.data.formats import normalise
from tunesmith.data.tokenize import TokenizeOptions, tokenize_examples
from tunesmith.errors import TunesmithError
from tunesmith.peft import LoRAConfig, adapter_parameters, adapters_disabled, inject_lora
from tunesmith.templates import IGNORE_INDEX
from tunesmith.train.preference import (collate_pairs, completion_logps, load_reference, pair_logps,
                                        preference_losses, preference_metrics, save_reference)
from tunesmith.train.engine import train_step
from tunesmith.train.module import TrainingModule
from tunesmith.train.objectives import MicroBatch, PreferenceLoss

# One pair: log π(c) = −3, log π(r) = −5, log π_ref(c) = −4, log π_ref(r) = −4.5, |c| = 2, |r| = 4; β = 0.5, γ = 0.3.
#   sigmoid: h = 1 − (−0.5) = 1.5;  L = log(1 + e^−0.75);  ∂L/∂log π(c) = −0.5·σ(−0.75) = −∂L/∂log π(r)
#   ipo:     h̄ = 1/2 + 0.5/4 = 0.625;  L = (0.625 − 1)² = 0.140625;  ∂c = 2·(−0.375)/2,  ∂r = 2·0.375/4
#   simpo:   x = 0.5·(−3)/2 − 0.5·(−5)/4 − 0.3 = −0.425;  L = log(1 + e^0.425);
#            ∂c = −σ(0.425)·0.5/2,  ∂r = σ(0.425)·0.5/4
HAND = {
    "sigmoid": (0.3868710061149, -0.1604106504123035, 0.1604106504123035),
    "ipo": (0.140625, -0.375, 0.1875),
    "simpo": (0.9280574001728004, -0.15116977117850233, 0.07558488558925117),
}


@pytest.mark.parametrize("loss", ["sigmoid", "ipo", "simpo"])
def test_loss_and_gradient_match_hand_computed_values(loss):
    chosen = torch.tensor([-3.0], dtype=torch.float64, requires_grad=True)
    rejected = torch.tensor([-5.0], dtype=torch.float64, requires_grad=True)
    losses, chosen_reward, rejected_reward = preference_losses(
        chosen, rejected, torch.tensor([-4.0], dtype=torch.float64), torch.tensor([-4.5], dtype=torch.float64),
        torch.tensor([2]), torch.tensor([4]), loss=loss, beta=0.5, gamma=0.3)
    losses.sum().backward()
    value, d_chosen, d_rejected = HAND[loss]
    assert float(losses) == pytest.approx(value, abs=1e-12)
    assert float(chosen.grad) == pytest.approx(d_chosen, abs=1e-12)
    assert float(rejected.grad) == pytest.approx(d_rejected, abs=1e-12)
    expected_rewards = {"sigmoid": (0.5, -0.25), "ipo": (0.25, -0.0625), "simpo": (-0.75, -0.625)}[loss]
    assert (float(chosen_reward), float(rejected_reward)) == pytest.approx(expected_rewards, abs=1e-12)


def test_metrics_count_ties_as_half_and_rank_by_implicit_reward():
    policy = {"chosen": torch.tensor([-3.0, -2.0, -6.0]), "rejected": torch.tensor([-5.0, -2.0, -1.0]),
              "chosen_len": torch.tensor([2, 2, 3]), "rejected_len": torch.tensor([4, 2, 1])}
    reference = {"chosen": torch.tensor([-4.0, -2.0, -9.0]), "rejected": torch.tensor([-4.5, -2.0, -1.0])}
    metrics = preference_metrics(policy, reference, DPOSection(beta=0.5))
    # rewards: (0.5, −0.25) ranked right; (0, 0) a tie; (1.5, 0) right although log π(c) < log π(r)
    assert metrics["preference_accuracy"] == pytest.approx(2.5 / 3)
    assert metrics["likelihood_accuracy"] == pytest.approx(1.5 / 3)
    assert metrics["margin"] == pytest.approx((0.75 + 0 + 1.5) / 3)
    assert metrics["chosen_loss"] == pytest.approx(11 / 7)
    assert metrics["eval_loss"] == pytest.approx((math.log1p(math.exp(-0.75)) + math.log(2)
                                                  + math.log1p(math.exp(-1.5))) / 3)


def _pairs(tokenizer, n=3):
    rows = []
    for i in range(n):
        rows.append({"prompt": [{"role": "user", "content": f"Repeat word {i} twice"}],
                     "chosen": [{"role": "assistant", "content": f"word {i} word {i}"}],
                     "rejected": [{"role": "assistant", "content": "no" + " no" * i}]})
    rows.append({"prompt": "Say yes", "chosen": "yes", "rejected": "maybe not"})
    examples = normalise(rows, "preference").examples
    return tokenize_examples(tokenizer, examples, TokenizeOptions(max_length=128)).examples


def _plain_logps(model, batch):
    """Every position through the head, log-softmax, then the trained targets summed per row."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    targets = batch["labels"][:, 1:]
    keep = targets != IGNORE_INDEX
    token = torch.log_softmax(logits[:, :-1], dim=-1).gather(2, targets.clamp(min=0)[..., None]).squeeze(2)
    return (token * keep).sum(dim=1), keep.sum(dim=1)


def test_completion_logps_equal_plain_full_logits_forward(tokenizer):
    model = build_tiny_llama()
    pairs = _pairs(tokenizer)
    batch = collate_pairs(pairs, tokenizer.pad_token_id)
    assert batch["input_ids"].shape[0] == 2 * len(pairs)
    sums, counts = completion_logps(model, batch)
    with torch.no_grad():
        plain, plain_counts = _plain_logps(model, batch)
    torch.testing.assert_close(sums.detach(), plain, atol=1e-4, rtol=1e-5)
    assert counts.tolist() == plain_counts.tolist() and min(counts.tolist()) > 0
    one_by_one = pair_logps(model, pairs, pad_id=tokenizer.pad_token_id, batch_size=1)
    torch.testing.assert_close(one_by_one["chosen"], plain[:len(pairs)], atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(one_by_one["rejected"], plain[len(pairs):], atol=1e-4, rtol=1e-5)


def _lora_model(seed=0):
    model = build_tiny_llama()
    torch.manual_seed(seed)
    inject_lora(model, LoRAConfig(r=4, alpha=8, target_modules="all-linear"))
    with torch.no_grad():
        for name, param in adapter_parameters(model).items():
            if name.endswith("lora_B.weight"):
                param.normal_(0, 0.2)  # a trained-looking adapter, so adapters on and off differ
    return model


def test_reference_with_adapters_disabled_equals_fresh_base_model(tokenizer):
    pairs = _pairs(tokenizer)
    batch = collate_pairs(pairs, tokenizer.pad_token_id)
    model = _lora_model()
    with torch.no_grad():
        with adapters_disabled(model):
            reference, _ = completion_logps(model, batch)
        adapted, _ = completion_logps(model, batch)
        fresh, _ = completion_logps(build_tiny_llama(), batch)
    torch.testing.assert_close(reference, fresh, atol=1e-6, rtol=0)
    assert (adapted - fresh).abs().max() > 1e-2


def _plain_loss(model, pairs, pad_id, objective):
    """Each loss written out on full logits, with π_ref from a no-grad pass with adapters off."""
    batch = collate_pairs(pairs, pad_id)
    n, beta = len(pairs), objective.beta
    logps, counts = _plain_logps(model, batch)
    with torch.no_grad(), adapters_disabled(model):
        ref, _ = _plain_logps(model, batch)
    c, r, ref_c, ref_r, len_c, len_r = logps[:n], logps[n:], ref[:n], ref[n:], counts[:n], counts[n:]
    if objective.loss == "sigmoid":
        losses = -F.logsigmoid(beta * ((c - ref_c) - (r - ref_r)))
    elif objective.loss == "ipo":
        losses = ((c - ref_c) / len_c - (r - ref_r) / len_r - 1 / (2 * beta)) ** 2
    else:
        losses = -F.logsigmoid(beta * c / len_c - beta * r / len_r - objective.gamma)
    return losses.mean() + objective.sft_weight * (-c.sum() / len_c.sum())


def _reference(model):
    def base_model(batch, micro, layout):
        with torch.no_grad(), adapters_disabled(model):
            sums, _ = completion_logps(model, batch, layout=layout, host=micro.batch)
        return sums[:len(micro.indices)], sums[len(micro.indices):]
    return base_model


@pytest.mark.parametrize("objective", [DPOSection(beta=0.5), DPOSection(loss="ipo", beta=0.5),
                                       DPOSection(loss="simpo", beta=2.0, gamma=0.5, sft_weight=0.5)],
                         ids=["sigmoid", "ipo", "simpo+sft"])
@pytest.mark.parametrize("split", [[[0, 1, 2, 3]], [[0, 1], [2, 3]]], ids=["one-micro-batch", "two-micro-batches"])
def test_step_loss_and_gradient_match_plain_computation(tokenizer, objective, split):
    pairs = _pairs(tokenizer)
    pad_id = tokenizer.pad_token_id
    plain_model = _lora_model()
    loss = _plain_loss(plain_model, pairs, pad_id, objective)
    loss.backward()
    expected_grads = [p.grad.clone() for p in adapter_parameters(plain_model).values()]

    model = _lora_model()
    params = list(adapter_parameters(model).values())
    before = [p.detach().clone() for p in params]
    optimizer = torch.optim.SGD(params, lr=1.0)
    micro = [MicroBatch(collate_pairs([pairs[i] for i in indices], pad_id), indices) for indices in split]
    reference = None if objective.loss == "simpo" else _reference(model)
    loss_fn = PreferenceLoss(objective, reference)
    result = train_step(TrainingModule(model, loss_fn), optimizer, params, loss_fn, micro, lr=1.0,
                        max_grad_norm=None, device=torch.device("cpu"), dtype=torch.float32)
    assert result.loss == pytest.approx(float(loss), abs=1e-5)
    assert result.counts["pairs"] == 4 and not result.skipped
    expected_stats = {"reward_accuracy", "chosen_reward", "rejected_reward", "margin"}
    expected_stats |= {"sft_loss"} if objective.sft_weight else {"kl"}
    assert set(result.metrics) == expected_stats
    for old, new, grad in zip(before, params, expected_grads):  # SGD at lr 1: the step is −grad
        torch.testing.assert_close(old - new.detach(), grad, atol=1e-5, rtol=1e-4)


def test_reference_cache_round_trip_and_refuses_other_data(tmp_path):
    logps = {"train": {"chosen": torch.tensor([-1.5, -2.0]), "rejected": torch.tensor([-3.0, -0.5]),
                       "chosen_len": torch.tensor([3, 4]), "rejected_len": torch.tensor([2, 1])}}
    path = tmp_path / "reference_logps.safetensors"
    save_reference(path, logps, fingerprint="abc")
    loaded = load_reference(path, fingerprint="abc")
    assert loaded.keys() == {"train"} and all(torch.equal(loaded["train"][k], v) for k, v in logps["train"].items())
    with pytest.raises(TunesmithError, match="computed for other training data"):
        load_reference(path, fingerprint="other")
    with pytest.raises(TunesmithError, match="is missing"):
        load_reference(tmp_path / "none.safetensors", fingerprint="abc")
