"""Backward products in bf16 (``train.backward_products``): the forward and the adapters' own gradient formulas
stay exact, ∂L/∂X through a frozen weight is the bf16 product, and the choice follows the CPU and the model."""

import pytest
import torch
from tinymodels import build_adapted_tiny_llama, build_tiny_llama

from tunesmith.errors import TunesmithError
from tunesmith.peft import LoRAConfig, LoRALinear, freeze_base, inject_lora
from tunesmith.train.backward import (BACKWARD_WEIGHT, choose_backward_products, frozen_layers,
                                      install_backward_products, native_bf16_cpu, remove_backward_products)
from tunesmith.train.head import linear_cross_entropy
from tunesmith.train.loss import supervised_loss_sum

CPU = torch.device("cpu")


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("flags, native", [("fpu avx512f avx512_bf16 avx512_vnni", True), ("fpu amx_bf16 amx_tile", True),
                                           ("fpu avx512f avx512bw avx2", False), ("", False)])
def test_native_bf16_is_read_from_the_cpu_flags(flags, native):
    assert native_bf16_cpu(f"processor\t: 0\nflags\t\t: {flags}\nbugs\t\t: avx512_bf16_fake\n") is native


def _layer():
    torch.manual_seed(0)
    layer = LoRALinear(torch.nn.Linear(24, 40), r=4, alpha=8)
    layer.base_layer.requires_grad_(False)
    torch.nn.init.normal_(layer.lora_B.weight, std=0.1)
    return layer


def _run_layer(layer, x, grad):
    x = x.clone().requires_grad_(True)
    out = layer(x)
    out.backward(grad)
    return out.detach(), x.grad, layer.lora_A.weight.grad.clone(), layer.lora_B.weight.grad.clone()


def test_lora_layer_carries_the_gradient_through_bf16_factors_and_nothing_else_changes():
    layer = _layer()
    x, grad = torch.randn(3, 5, 24), torch.randn(3, 5, 40)
    exact = _run_layer(layer, x, grad)
    layer.lora_A.weight.grad = layer.lora_B.weight.grad = None
    install_backward_products(layer_model := torch.nn.Sequential(layer), {"name": "bf16"})
    assert getattr(layer, BACKWARD_WEIGHT).dtype == torch.bfloat16
    low = _run_layer(layer, x, grad)
    assert torch.equal(low[0], exact[0])  # the forward: the same bits
    assert torch.equal(low[2], exact[2]) and torch.equal(low[3], exact[3])  # ∂L/∂A, ∂L/∂B from G and X alone
    # ∂L/∂X = G W (bf16 factors, float32 result) + s · (G B) A
    g, w = grad.reshape(-1, 40), layer.base_layer.weight
    expected = (g.bfloat16() @ w.bfloat16()).float()
    expected.addmm_(g @ layer.lora_B.weight, layer.lora_A.weight, alpha=layer.scaling)
    assert torch.equal(low[1], expected.view(3, 5, 24))
    assert 1e-5 < _relative(low[1], exact[1]) < 1e-2
    remove_backward_products(layer_model)
    assert BACKWARD_WEIGHT not in vars(layer) and layer.backward_weight is None


def test_head_loss_is_exact_and_its_hidden_gradient_comes_from_bf16_factors():
    torch.manual_seed(0)
    weight, targets = torch.randn(300, 16), torch.randint(0, 300, (12,))
    hidden = torch.randn(12, 16, requires_grad=True)
    losses, grads = [], []
    for low in (None, weight.bfloat16()):
        loss = linear_cross_entropy(hidden, weight, targets, chunk=5, backward_weight=low)
        hidden.grad = None
        (loss * 0.5).backward()
        losses.append(loss.detach())
        grads.append(hidden.grad.clone())
    assert torch.equal(losses[0], losses[1])
    softmax_minus_onehot = torch.softmax(hidden.detach() @ weight.t(), dim=1)
    softmax_minus_onehot[torch.arange(12), targets] -= 1.0
    reference = (softmax_minus_onehot.bfloat16() @ weight.bfloat16()).float() * 0.5
    torch.testing.assert_close(grads[1], reference, rtol=0, atol=2e-6)
    assert 1e-5 < _relative(grads[1], grads[0]) < 1e-2


def _adapted():
    model = build_tiny_llama()
    inject_lora(model, LoRAConfig(r=4, alpha=8, target_modules="all-linear"))
    freeze_base(model)
    return model


def test_auto_picks_bf16_only_on_a_native_cpu_for_lora_over_float32():
    model = _adapted()
    assert len(frozen_layers(model)) == 2 * 7 + 1  # every adapted projection and the tied head
    assert choose_backward_products("auto", model, CPU, native=True)["name"] == "bf16"
    no_native = choose_backward_products("auto", model, CPU, native=False)
    assert no_native["name"] == "exact" and "AVX512-BF16" in no_native["reason"]
    assert choose_backward_products("auto", model, torch.device("cuda"), native=True)["name"] == "exact"
    assert choose_backward_products("exact", model, CPU, native=True)["name"] == "exact"
    assert choose_backward_products("bf16", model, CPU, native=False)["name"] == "bf16"
    with pytest.raises(TunesmithError, match="train.backward_products=bf16 is a CPU setting; this run is on cuda"):
        choose_backward_products("bf16", model, torch.device("cuda"))
    full = build_tiny_llama()  # full fine-tuning: nothing frozen
    full.requires_grad_(True)
    assert choose_backward_products("auto", full, CPU, native=True)["name"] == "exact"
    with pytest.raises(TunesmithError, match="train.backward_products=bf16 .*has none"):
        choose_backward_products("bf16", full, CPU)
    half = _adapted().to(torch.bfloat16)
    assert frozen_layers(half) == []
    assert choose_backward_products("auto", half, CPU, native=True)["name"] == "exact"


def test_a_whole_model_backward_in_bf16_stays_close_to_exact():
    """Two decoder blocks, every projection adapted: the loss is the same bits, every adapter gradient within
    1e-2 of exact (relative, per tensor) and, through the bf16 products, not equal to it."""
    model = build_adapted_tiny_llama()
    torch.manual_seed(3)
    ids = torch.randint(3, 49152, (2, 9))
    labels = ids.clone()
    labels[:, :4] = -100
    batch = {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)}
    runs = []
    for mode in ("exact", "bf16"):
        install_backward_products(model, {"name": mode})
        model.zero_grad()
        loss = supervised_loss_sum(model, batch)
        loss.backward()
        runs.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
        remove_backward_products(model)
    assert torch.equal(runs[0][0], runs[1][0])
    errors = [_relative(runs[1][1][name], grad) for name, grad in runs[0][1].items()]
    assert len(errors) == 2 * 7 * 2 and max(errors) < 1e-2 and min(errors) > 0
