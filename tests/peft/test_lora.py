"""LoRALinear algebra and injection on a hand-sized linear layer and the tiny Llama."""

import math

import pytest
import torch
from tinymodels import build_tiny_llama
from torch import nn

from tunesmith.errors import TunesmithError
from tunesmith.peft.lora import (LoRAConfig, LoRALinear, adapter_parameters, adapters_disabled, freeze_base,
                                 inject_lora, lora_modules, merge_all, unmerge_all)
from tunesmith.peft.merged import merged_state_dict

INPUT_IDS = torch.tensor([[1, 17, 256, 4096, 31, 2]])
ATTN_MLP = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def logits(model):
    with torch.no_grad():
        return model(input_ids=INPUT_IDS).logits


def randomize_adapters(model, seed=1):
    """Non-zero B (and a fresh A) so that an adapter that is ignored makes a test fail."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in adapter_parameters(model).values():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.5)


def golden_layer():
    """3 → 4 linear, r=2, alpha=4 (s=2), with integer weights so the expected values are checkable by hand."""
    base = nn.Linear(3, 4)
    with torch.no_grad():
        base.weight.copy_(torch.tensor([[1., 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 1]]))
        base.bias.copy_(torch.tensor([0.5, 0, 0, -1]))
    layer = LoRALinear(base, r=2, alpha=4)
    with torch.no_grad():
        layer.lora_A.weight.copy_(torch.tensor([[1., 0, 1], [0, 1, 0]]))
        layer.lora_B.weight.copy_(torch.tensor([[1., 0], [0, 1], [1, 1], [0, -1]]))
    return layer


def test_golden_forward_and_merge():
    layer = golden_layer()
    x = torch.tensor([1., 2, 3])
    # Wx + b = [1.5, 2, 3, 5]; A x = [4, 2]; B A x = [4, 2, 6, -2]; times s = 2 → [8, 4, 12, -4].
    expected = torch.tensor([9.5, 6, 15, 1])
    assert layer.scaling == 2
    torch.testing.assert_close(layer(x), expected)
    layer.merge()
    # W' = W + 2·B·A
    torch.testing.assert_close(layer.base_layer.weight,
                               torch.tensor([[3., 0, 2], [0, 3, 0], [2, 2, 3], [1, -1, 1]]))
    torch.testing.assert_close(layer(x), expected)


def test_merge_is_idempotent_and_unmerge_restores():
    layer = golden_layer()
    original = layer.base_layer.weight.detach().clone()
    layer.merge()
    once = layer.base_layer.weight.detach().clone()
    layer.merge()
    torch.testing.assert_close(layer.base_layer.weight, once, rtol=0, atol=0)
    layer.unmerge()
    layer.unmerge()
    assert not layer.merged
    torch.testing.assert_close(layer.base_layer.weight, original, rtol=0, atol=1e-5)


def test_disabled_merged_adapter_is_refused():
    layer = golden_layer()
    layer.merge()
    layer.disabled = True
    with pytest.raises(TunesmithError, match="unmerge"):
        layer(torch.ones(3))


def test_rslora_scaling():
    base = nn.Linear(8, 8)
    assert LoRALinear(base, r=4, alpha=8).scaling == 2
    assert LoRALinear(base, r=4, alpha=8, use_rslora=True).scaling == 4
    assert LoRALinear(base, r=16, alpha=8, use_rslora=True).scaling == 8 / math.sqrt(16)


def test_gradients_match_closed_form():
    layer = golden_layer()
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(5, 3, generator=generator)
    upstream = torch.randn(5, 4, generator=generator)  # G = dL/dY for L = sum(Y * G)
    (layer(x) * upstream).sum().backward()
    s, a, b = layer.scaling, layer.lora_A.weight.detach(), layer.lora_B.weight.detach()
    torch.testing.assert_close(layer.lora_B.weight.grad, s * upstream.T @ (x @ a.T))
    torch.testing.assert_close(layer.lora_A.weight.grad, s * b.T @ upstream.T @ x)


def _fused_and_reference(layer, x, tolerance, autocast=None):
    """Output and every gradient of the fused node against ``reference_forward`` (same dropout mask)."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=generator))
    upstream = torch.randn(*x.shape[:-1], layer.out_features, generator=generator)
    results = []
    for forward in (layer.forward, layer.reference_forward):
        inputs = x.clone().requires_grad_(True)
        torch.manual_seed(7)  # the same dropout mask on both paths
        with torch.autocast("cpu", dtype=autocast, enabled=autocast is not None):
            out = forward(inputs)
        (out.float() * upstream).sum().backward()
        results.append((out.detach().float(), out.grad_fn.name(), inputs.grad, layer.lora_A.weight.grad,
                        layer.lora_B.weight.grad))
        layer.zero_grad(set_to_none=True)
    (fused, fused_node, *fused_grads), (reference, reference_node, *reference_grads) = results
    assert "LoRALinearFunction" in fused_node and "LoRALinearFunction" not in reference_node
    torch.testing.assert_close(fused, reference, rtol=tolerance, atol=tolerance)
    for a, b in zip(fused_grads, reference_grads):
        assert a.dtype == b.dtype  # fp32 adapters get fp32 gradients on both paths
        torch.testing.assert_close(a, b, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("bias", [True, False])
def test_fused_path_matches_reference(dropout, bias):
    """A frozen plain base takes the one-node fused path; output and every gradient equal the module path's."""
    layer = LoRALinear(nn.Linear(6, 5, bias=bias), r=3, alpha=6, dropout=dropout)
    layer.base_layer.requires_grad_(False)
    _fused_and_reference(layer, torch.randn(2, 4, 6, generator=torch.Generator().manual_seed(1)), 1e-6)
    frozen = golden_layer().requires_grad_(False)  # also the fused path: the hand-checked values hold
    torch.testing.assert_close(frozen(torch.tensor([[1., 2, 3]])), torch.tensor([[9.5, 6, 15, 1]]))


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_fused_path_over_a_4bit_base_matches_bitsandbytes(dropout):
    """QLoRA: over bitsandbytes' ``Linear4bit`` the fused node dequantizes the codes itself (forward and
    backward) and gives what bitsandbytes' own 4-bit matmul gives through the module path."""
    from tunesmith.quant.bnb import QuantSpec, quantize_model

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 64, bias=True))
    quantize_model(model, QuantSpec(skip_modules=[]))
    assert type(model[0]).__name__ == "Linear4bit"
    layer = LoRALinear(model[0], r=4, alpha=8, dropout=dropout)
    _fused_and_reference(layer, torch.randn(3, 5, 128, generator=torch.Generator().manual_seed(1)), 1e-5)


def test_fused_path_under_autocast_computes_in_its_dtype():
    """Under autocast over a bf16 base, fp32 adapters are cast (not the activations to fp32 and back): same
    result and fp32 gradients as autocast over the module path, within bf16 rounding. Without autocast, mixed
    dtypes take the module path."""
    layer = LoRALinear(nn.Linear(64, 48, bias=False, dtype=torch.bfloat16), r=8, alpha=16, dtype=torch.float32)
    layer.base_layer.requires_grad_(False)
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(1))
    _fused_and_reference(layer, x, 2e-2, autocast=torch.bfloat16)
    assert layer._fused_dtype(x.bfloat16()) is None
    with torch.autocast("cpu", dtype=torch.float16):  # the base weight is not in autocast's dtype
        assert layer._fused_dtype(x) is None


def test_init_is_identity_and_reproducible(tiny_model):
    reference = logits(tiny_model)
    torch.manual_seed(123)
    inject_lora(tiny_model, LoRAConfig(r=4, alpha=8))
    torch.testing.assert_close(logits(tiny_model), reference, rtol=0, atol=0)
    again = build_tiny_llama()
    torch.manual_seed(123)
    inject_lora(again, LoRAConfig(r=4, alpha=8))
    first, second = adapter_parameters(tiny_model), adapter_parameters(again)
    assert first.keys() == second.keys()
    for name in first:
        torch.testing.assert_close(first[name], second[name], rtol=0, atol=0)
    a = first["model.layers.0.self_attn.q_proj.lora_A.weight"]
    bound = 1 / math.sqrt(a.shape[1])  # kaiming_uniform(a=√5) on fan_in
    assert a.abs().max() <= bound and a.abs().max() > bound / 2
    assert all(not p.any() for n, p in first.items() if n.endswith("lora_B.weight"))


def test_merged_logits_equal_unmerged_and_disabled_gives_base(tiny_model):
    base = logits(tiny_model)
    inject_lora(tiny_model, LoRAConfig(r=4, alpha=8, target_modules="all-linear"))
    randomize_adapters(tiny_model)
    adapted = logits(tiny_model)
    assert (adapted - base).abs().max() > 1e-3
    with adapters_disabled(tiny_model):
        torch.testing.assert_close(logits(tiny_model), base, rtol=0, atol=1e-6)
    assert not any(m.disabled for m in lora_modules(tiny_model).values())
    weights = {n: m.base_layer.weight.detach().clone() for n, m in lora_modules(tiny_model).items()}
    merge_all(tiny_model)
    torch.testing.assert_close(logits(tiny_model), adapted, rtol=0, atol=1e-5)
    with pytest.raises(TunesmithError, match="unmerge"):
        with adapters_disabled(tiny_model):
            pass
    unmerge_all(tiny_model)
    for name, module in lora_modules(tiny_model).items():
        torch.testing.assert_close(module.base_layer.weight.detach(), weights[name], rtol=0, atol=1e-5)
    torch.testing.assert_close(logits(tiny_model), adapted, rtol=0, atol=1e-5)


def test_freeze_base_leaves_only_adapters_trainable(tiny_model):
    with pytest.raises(TunesmithError, match="inject_lora"):
        freeze_base(tiny_model)
    names = inject_lora(tiny_model, LoRAConfig(r=2, alpha=4, target_modules=("q_proj", "k_proj", "v_proj", "o_proj")))
    freeze_base(tiny_model)
    trainable = {n for n, p in tiny_model.named_parameters() if p.requires_grad}
    expected = {f"{m}.lora_{ab}.weight" for m in names for ab in "AB"}
    assert trainable == expected == set(adapter_parameters(tiny_model))
    assert len(names) == 2 * 4


def test_all_linear_targets(tiny_model):
    names = inject_lora(tiny_model, LoRAConfig(target_modules="all-linear"))
    assert sorted({n.rsplit(".", 1)[-1] for n in names}) == sorted(ATTN_MLP)
    assert len(names) == 2 * len(ATTN_MLP)
    assert isinstance(tiny_model.lm_head, nn.Linear) and not isinstance(tiny_model.lm_head, LoRALinear)
    # PEFT's layout: the base weight moves under base_layer, the adapter sits beside it.
    keys = tiny_model.state_dict().keys()
    assert "model.layers.0.mlp.down_proj.base_layer.weight" in keys
    assert "model.layers.0.mlp.down_proj.lora_A.weight" in keys


def test_unknown_target_names_the_available_modules(tiny_model):
    with pytest.raises(TunesmithError) as info:
        inject_lora(tiny_model, LoRAConfig(target_modules=("q_proj", "qkv_proj")))
    message = str(info.value)
    assert "'qkv_proj'" in message and "'q_proj'" not in message
    for name in [*ATTN_MLP, "lm_head"]:
        assert name in message
    assert not lora_modules(tiny_model)


def test_tied_head_is_refused(tiny_model):
    with pytest.raises(TunesmithError, match="lm_head shares its weight"):
        inject_lora(tiny_model, LoRAConfig(target_modules=("q_proj", "lm_head")))


def test_rank_and_alpha_patterns(tiny_model):
    config = LoRAConfig(r=4, alpha=8, rank_pattern={"v_proj": 2, r"layers\.1\.self_attn\.q_proj": 6},
                        alpha_pattern={"o_proj": 3})
    inject_lora(tiny_model, config)
    modules = lora_modules(tiny_model)
    assert modules["model.layers.0.self_attn.v_proj"].r == 2
    assert modules["model.layers.1.self_attn.q_proj"].r == 6
    assert modules["model.layers.0.self_attn.q_proj"].r == 4
    assert modules["model.layers.0.self_attn.o_proj"].scaling == 3 / 4
    assert modules["model.layers.0.self_attn.k_proj"].scaling == 8 / 4


def test_merged_state_dict_is_pure_and_loads_into_a_fresh_model(tiny_model):
    inject_lora(tiny_model, LoRAConfig(r=4, alpha=8, target_modules="all-linear"))
    randomize_adapters(tiny_model)
    adapted = logits(tiny_model)
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    merged = merged_state_dict(tiny_model)
    after = tiny_model.state_dict()
    assert before.keys() == after.keys()
    for key in before:
        torch.testing.assert_close(after[key], before[key], rtol=0, atol=0)
    assert not any(m.merged for m in lora_modules(tiny_model).values())
    fresh = build_tiny_llama()
    assert merged.keys() == fresh.state_dict().keys()
    assert "model.layers.0.self_attn.q_proj.weight" in merged
    fresh.load_state_dict(merged, strict=True)
    torch.testing.assert_close(logits(fresh), adapted, rtol=0, atol=1e-5)
