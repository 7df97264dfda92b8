"""Products through frozen weights in bf16 (``train.forward_products``, ``train.backward_products``): the
forward's X Wᵀ and the backward's ∂L/∂X through a frozen weight are the bf16 products, the adapters' own gradient
formulas stay exact, a forward without grad (evaluation) stays exact, and the choice follows the CPU, the model
and the objective."""

from types import SimpleNamespace

import pytest
import torch
from tinymodels import build_adapted_tiny_llama, build_tiny_llama

from tunesmith.errors import TunesmithError
from tunesmith.peft import LoRAConfig, LoRALinear, freeze_base, inject_lora
from tunesmith.train.products import (BACKWARD_WEIGHT, FORWARD_WEIGHT, choose_products, frozen_layers,
                                      install_products, native_bf16_cpu, remove_products)
from tunesmith.train.head import linear_cross_entropy
from tunesmith.train.loss import supervised_loss_sum

CPU = torch.device("cpu")


def _products(forward: str = "exact", backward: str = "exact") -> dict:
    return {"forward": {"name": forward}, "backward": {"name": backward}}


def _choose(model, device=CPU, forward="auto", backward="auto", **kwargs) -> tuple[str, str]:
    train = SimpleNamespace(forward_products=forward, backward_products=backward)
    chosen = choose_products(train, model, device, **kwargs)
    return chosen["forward"]["name"], chosen["backward"]["name"]


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


def _exact_then_installed(products: dict):
    """One layer run exact, then with ``products`` installed: the layer, its inputs and both runs' results."""
    layer = _layer()
    x, grad = torch.randn(3, 5, 24), torch.randn(3, 5, 40)
    exact = _run_layer(layer, x, grad)
    layer.lora_A.weight.grad = layer.lora_B.weight.grad = None
    install_products(torch.nn.Sequential(layer), products)
    return layer, x, grad, exact, _run_layer(layer, x, grad)


def test_lora_layer_carries_the_gradient_through_bf16_factors_and_nothing_else_changes():
    layer, x, grad, exact, low = _exact_then_installed(_products(backward="bf16"))
    assert getattr(layer, BACKWARD_WEIGHT).dtype == torch.bfloat16 and FORWARD_WEIGHT not in vars(layer)
    assert torch.equal(low[0], exact[0])  # the forward: the same bits
    assert torch.equal(low[2], exact[2]) and torch.equal(low[3], exact[3])  # ∂L/∂A, ∂L/∂B from G and X alone
    # ∂L/∂X = G W (bf16 factors, float32 result) + s · (G B) A
    g, w = grad.reshape(-1, 40), layer.base_layer.weight
    expected = (g.bfloat16() @ w.bfloat16()).float()
    expected.addmm_(g @ layer.lora_B.weight, layer.lora_A.weight, alpha=layer.scaling)
    assert torch.equal(low[1], expected.view(3, 5, 24))
    assert 1e-5 < _relative(low[1], exact[1]) < 1e-2
    remove_products(layer)
    assert BACKWARD_WEIGHT not in vars(layer) and layer.backward_weight is None


def test_lora_layer_forward_in_bf16_only_under_grad():
    """The forward's X Wᵀ from bf16 factors while autograd records (a training step); without grad (every
    evaluation) the exact bits; the adapter's gradients are the exact formulas of the same G and X."""
    layer, x, grad, exact, low = _exact_then_installed(_products(forward="bf16"))
    assert getattr(layer, FORWARD_WEIGHT).dtype == torch.bfloat16 and BACKWARD_WEIGHT not in vars(layer)
    # Y = X Wᵀ (bf16 factors, float32 result) + b + s · (X Aᵀ) Bᵀ in float32
    x2, w, a, b = x.reshape(-1, 24), layer.base_layer.weight, layer.lora_A.weight, layer.lora_B.weight
    expected = (x2.bfloat16() @ w.bfloat16().t()).float().add_(layer.base_layer.bias)
    expected.addmm_(x2 @ a.t(), b.t(), alpha=layer.scaling)
    assert torch.equal(low[0], expected.view(3, 5, 40))
    assert 1e-5 < _relative(low[0], exact[0]) < 1e-2
    assert torch.equal(low[1], exact[1])  # ∂L/∂X: exact G W (the backward's products stay exact here)
    assert torch.equal(low[2], exact[2]) and torch.equal(low[3], exact[3])  # ∂L/∂A, ∂L/∂B from G and X alone
    with torch.no_grad():
        assert torch.equal(layer(x), exact[0])
    with torch.inference_mode():
        assert torch.equal(layer(x), exact[0])
    remove_products(layer)
    assert FORWARD_WEIGHT not in vars(layer) and layer.forward_weight is None
    assert torch.equal(layer(x), exact[0])


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
    assert _choose(model, native=True) == ("bf16", "bf16")
    train = SimpleNamespace(forward_products="auto", backward_products="auto")
    no_native = choose_products(train, model, CPU, native=False)
    assert [no_native[key]["name"] for key in ("forward", "backward")] == ["exact", "exact"]
    assert "AVX512-BF16" in no_native["forward"]["reason"] and "AVX512-BF16" in no_native["backward"]["reason"]
    assert _choose(model, torch.device("cuda"), native=True) == ("exact", "exact")
    assert _choose(model, forward="exact", backward="exact", native=True) == ("exact", "exact")
    assert _choose(model, forward="exact", native=True) == ("exact", "bf16")
    assert _choose(model, forward="bf16", backward="bf16", native=False) == ("bf16", "bf16")
    # a preference objective: the policy's forward must match its exact reference before any update
    assert _choose(model, native=True, objective="dpo") == ("exact", "bf16")
    with pytest.raises(TunesmithError, match="train.forward_products=bf16 is refused under method.objective=dpo"):
        _choose(model, forward="bf16", objective="dpo")
    for key in ("forward", "backward"):
        with pytest.raises(TunesmithError, match=f"train.{key}_products=bf16 is a CPU setting; this run is on cuda"):
            _choose(model, torch.device("cuda"), **{key: "bf16"})
    full = build_tiny_llama()  # full fine-tuning: nothing frozen
    full.requires_grad_(True)
    assert _choose(full, native=True) == ("exact", "exact")
    for key in ("forward", "backward"):
        with pytest.raises(TunesmithError, match=f"train.{key}_products=bf16 .*has none"):
            _choose(full, **{key: "bf16"})
    half = _adapted().to(torch.bfloat16)
    assert frozen_layers(half) == []
    assert _choose(half, native=True) == ("exact", "exact")


def test_a_whole_model_in_bf16_stays_close_to_exact():
    """Two decoder blocks, every projection adapted. bf16 backward products: the loss is the same bits. A bf16
    forward as well: the loss within 1e-3 of exact and not equal to it. Either way every adapter gradient is
    within 1e-2 of exact (relative, per tensor) and not equal to it; and a forward without grad stays exact."""
    model = build_adapted_tiny_llama()
    torch.manual_seed(3)
    ids = torch.randint(3, 49152, (2, 9))
    labels = ids.clone()
    labels[:, :4] = -100
    batch = {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)}
    runs = {}
    for name, products in (("exact", _products()), ("backward", _products(backward="bf16")),
                           ("both", _products("bf16", "bf16"))):
        install_products(model, products)
        model.zero_grad()
        loss = supervised_loss_sum(model, batch)
        loss.backward()
        with torch.no_grad():
            evaluated = supervised_loss_sum(model, batch)
        runs[name] = (loss.detach(), evaluated, {n: p.grad.clone() for n, p in model.named_parameters()
                                                  if p.grad is not None})
        remove_products(model)
    exact = runs["exact"]
    assert torch.equal(runs["backward"][0], exact[0])
    assert not torch.equal(runs["both"][0], exact[0]) and float(abs(runs["both"][0] / exact[0] - 1)) < 1e-3
    for name in ("backward", "both"):
        assert torch.equal(runs[name][1], exact[0])  # without grad: exact
        errors = [_relative(runs[name][2][key], grad) for key, grad in exact[2].items()]
        assert len(errors) == 2 * 7 * 2 and max(errors) < 1e-2 and min(errors) > 0
