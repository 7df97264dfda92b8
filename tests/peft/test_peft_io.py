"""PEFT-format adapters: ours load in ``peft``, PEFT's load in ours, with the same logits; bad input fails loudly."""

import json

import peft
import pytest
import torch
from tinymodels import build_tiny_llama
from safetensors.torch import load_file, save_file

from tunesmith.errors import TunesmithError
from tunesmith.peft import io as peft_io
from tunesmith.peft.io import load_adapter, save_adapter
from tunesmith.peft.lora import LoRAConfig, adapter_parameters, inject_lora, lora_modules

INPUT_IDS = torch.tensor([[1, 17, 256, 4096, 31, 2]])


def logits(model):
    with torch.no_grad():
        return model(input_ids=INPUT_IDS).logits


def randomize(params, seed=1):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in params:
            param.copy_(torch.randn(param.shape, generator=generator) * 0.5)


def our_adapter(out_dir, config, **model_overrides):
    model = build_tiny_llama(**model_overrides)
    inject_lora(model, config)
    randomize(adapter_parameters(model).values())
    save_adapter(model, config, out_dir, base_model_name_or_path="tiny-llama")
    return model


def peft_adapter(out_dir, **lora_kwargs):
    model = peft.get_peft_model(build_tiny_llama(), peft.LoraConfig(task_type="CAUSAL_LM", **lora_kwargs))
    randomize(p for n, p in model.named_parameters() if ".lora_" in n)
    model.eval()
    model.save_pretrained(out_dir)
    return model


@pytest.mark.parametrize("config", [
    LoRAConfig(r=4, alpha=8, target_modules=("q_proj", "k_proj", "v_proj", "o_proj")),
    LoRAConfig(r=4, alpha=8, target_modules="all-linear", use_rslora=True,
               rank_pattern={"v_proj": 2}, alpha_pattern={r"layers\.1\.mlp\.down_proj": 3}),
], ids=["attention", "all-linear-rslora-patterns"])
def test_our_adapter_loads_in_peft(tmp_path, config):
    ours = our_adapter(tmp_path / "adapter", config)
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == ["adapter_config.json",
                                                                      "adapter_model.safetensors"]
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["target_modules"] == sorted({n.rsplit(".", 1)[-1] for n in lora_modules(ours)})
    assert saved["peft_type"] == "LORA" and saved["base_model_name_or_path"] == "tiny-llama"
    keys = load_file(tmp_path / "adapter" / "adapter_model.safetensors").keys()
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys

    theirs = peft.PeftModel.from_pretrained(build_tiny_llama(), tmp_path / "adapter").eval()
    reference = logits(build_tiny_llama())
    assert (logits(ours) - reference).abs().max() > 1e-3
    torch.testing.assert_close(logits(theirs), logits(ours), rtol=0, atol=1e-5)


def test_short_names_that_would_overmatch_are_saved_as_paths(tmp_path):
    ours = our_adapter(tmp_path, LoRAConfig(r=4, alpha=8, target_modules=("layers.1.self_attn.q_proj",)))
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["target_modules"] == ["model.layers.1.self_attn.q_proj"]
    theirs = peft.PeftModel.from_pretrained(build_tiny_llama(), tmp_path).eval()
    torch.testing.assert_close(logits(theirs), logits(ours), rtol=0, atol=1e-5)


@pytest.mark.parametrize("lora_kwargs", [
    dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_rslora=True),
    dict(r=4, lora_alpha=8, target_modules="all-linear", rank_pattern={"up_proj": 2}, alpha_pattern={"k_proj": 2}),
], ids=["plain", "rslora", "all-linear-patterns"])
def test_peft_adapter_loads_in_ours(tmp_path, lora_kwargs):
    theirs = peft_adapter(tmp_path, **lora_kwargs)
    ours = build_tiny_llama()
    config = load_adapter(ours, tmp_path)
    assert config.r == 4 and config.use_rslora == lora_kwargs.get("use_rslora", False)
    assert len(lora_modules(ours)) == len(load_file(tmp_path / "adapter_model.safetensors")) // 2
    torch.testing.assert_close(logits(ours), logits(theirs), rtol=0, atol=1e-5)


def test_adapter_for_another_base_is_refused(tmp_path):
    our_adapter(tmp_path, LoRAConfig(r=4, alpha=8), hidden_size=48)
    model = build_tiny_llama()
    with pytest.raises(TunesmithError, match=r"adapter_model\.safetensors.*q_proj\.lora_A\.weight is \(4, 48\)"):
        load_adapter(model, tmp_path)
    assert not lora_modules(model)


@pytest.mark.parametrize("change", ["extra", "missing"])
def test_key_mismatch_is_refused(tmp_path, change):
    our_adapter(tmp_path, LoRAConfig(r=4, alpha=8))
    weights = tmp_path / "adapter_model.safetensors"
    tensors = load_file(weights)
    key = "base_model.model.model.layers.1.self_attn.k_proj.lora_B.weight"
    if change == "extra":
        tensors["base_model.model.model.layers.2.self_attn.q_proj.lora_A.weight"] = torch.zeros(4, 32)
        pattern = r"unexpected keys: base_model\.model\.model\.layers\.2\.self_attn\.q_proj\.lora_A\.weight"
    else:
        del tensors[key]
        pattern = f"missing keys: {key}"
    save_file(tensors, weights)
    model = build_tiny_llama()
    with pytest.raises(TunesmithError, match=pattern) as info:
        load_adapter(model, tmp_path)
    assert str(weights) in str(info.value)
    assert not lora_modules(model)


def test_missing_config_names_the_path(tmp_path, tiny_model):
    with pytest.raises(TunesmithError, match="no adapter config at .*adapter_config.json") as info:
        load_adapter(tiny_model, tmp_path)
    assert str(tmp_path / "adapter_config.json") in str(info.value)


@pytest.mark.parametrize("field, value", [("use_dora", True), ("bias", "all"), ("peft_type", "IA3")])
def test_unsupported_config_is_refused(tmp_path, tiny_model, field, value):
    our_adapter(tmp_path, LoRAConfig(r=4, alpha=8))
    config_path = tmp_path / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config[field] = value
    config_path.write_text(json.dumps(config))
    with pytest.raises(TunesmithError, match=field) as info:
        load_adapter(tiny_model, tmp_path)
    assert str(config_path) in str(info.value)


def test_failed_save_leaves_no_adapter_dir(tmp_path, monkeypatch):
    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(peft_io, "stable_safetensors", crash)
    with pytest.raises(OSError, match="disk full"):
        our_adapter(tmp_path / "adapter", LoRAConfig(r=4, alpha=8))
    assert list(tmp_path.iterdir()) == []


def test_save_replaces_an_adapter_dir_but_not_other_dirs(tmp_path):
    first = our_adapter(tmp_path / "adapter", LoRAConfig(r=4, alpha=8))
    second = our_adapter(tmp_path / "adapter", LoRAConfig(r=2, alpha=8))
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]
    reloaded = build_tiny_llama()
    assert load_adapter(reloaded, tmp_path / "adapter").r == 2
    torch.testing.assert_close(logits(reloaded), logits(second), rtol=0, atol=1e-5)
    assert (logits(first) - logits(second)).abs().max() > 1e-3
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(TunesmithError, match="not an adapter dir"):
        save_adapter(first, LoRAConfig(r=4, alpha=8), tmp_path / "run", base_model_name_or_path="tiny-llama")
    assert (tmp_path / "run" / "metrics.jsonl").exists()
