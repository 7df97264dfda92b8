"""``tunesmith estimate``: the model's sizes against the real model and its real adapters, and the whole breakdown
of a tiny config worked out by hand (issue 29)."""

import json

import pytest
from tinymodels import build_tiny_llama

from tunesmith.cli import main
from tunesmith.config import load_config
from tunesmith.config_limits import MIB
from tunesmith.errors import TunesmithError
from tunesmith.peft import LoRAConfig, adapter_parameters, inject_lora
from tunesmith.plan.estimate import estimate, settings_of
from tunesmith.plan.shapes import read_shape


def _config(model_dir, *overrides):
    return load_config(None, [f"model.source={model_dir}", "lora.r=4", "train.micro_batch_size=2",
                              "train.grad_accum=4", "data.max_length=32", *overrides])


@pytest.mark.parametrize("targets", ["all-linear", "[q_proj,v_proj]"])
def test_shape_equals_the_real_model_and_its_real_adapters(tiny_model_dir, targets):
    shape = read_shape(_config(tiny_model_dir, f"lora.target_modules={targets}"))
    model = build_tiny_llama()
    assert shape.parameters == sum(p.numel() for p in model.parameters())
    assert shape.tied and shape.head == 0 and shape.embedding == 49152 * 32 and shape.layers == 2
    inject_lora(model, LoRAConfig(r=4, target_modules="all-linear" if targets == "all-linear" else
                                  ("q_proj", "v_proj")))
    assert sum(shape.lora_parameters()) == sum(p.numel() for p in adapter_parameters(model).values())
    assert sorted(shape.lora) == sorted(name.removesuffix(".lora_A.weight") for name in adapter_parameters(model)
                                        if name.endswith("lora_A.weight"))


def test_the_breakdown_of_a_tiny_lora_run_by_hand(tiny_model_dir):
    config = _config(tiny_model_dir, "train.graphs=false")
    shape = read_shape(config)
    result = estimate(config, shape, settings_of(config), memory=80 * 2 ** 30)
    terms = {t["term"]: t["bytes"] for t in result.terms}
    params = sum(p.numel() for p in build_tiny_llama().parameters())
    # per block, LoRA r4: q 4·(32+32), k and v 4·(32+16), o 4·(32+32), gate and up 4·(32+64), down 4·(64+32)
    lora = 2 * (256 + 192 + 192 + 256 + 384 + 384 + 384)
    tokens = 2 * 32
    # per token per block: norms 2·(4·32+4), inputs 2·(32+32+64), U 7·2·4, attention 2·(4·32)+4·4, MLP 3·2·64
    per_block = 264 + 256 + 56 + 272 + 384
    assert terms == {
        "weights, bf16": 2 * params,
        "LoRA parameters": 2 * lora, "gradients": 2 * lora, "optimizer state (adamw)": 2 * 2 * lora,
        "activations": 2 * tokens * per_block,
        "backward temporaries": tokens * 2 * (3 * 64 + 2 * 32),
        "final norm and head": tokens * (4 * 32 + 4) + tokens * 49152 * 6 + tokens * 32 * 2,
        "cuBLAS workspaces": 2 * 32 * MIB}
    outside = {t["term"]: t["bytes"] for t in result.outside}
    assert outside == {"allocator slack": int(0.05 * 2 * tokens * per_block), "CUDA context": 512 * MIB}
    assert result.allocated == sum(terms.values()) and result.total == result.allocated + sum(outside.values())
    # checkpointing: every block's input, then one block recomputed; a 4 MiB workspace under auto
    checkpointed = _config(tiny_model_dir, "train.gradient_checkpointing=true", "train.graphs=false")
    terms = {t["term"]: t["bytes"] for t in estimate(checkpointed, shape, settings_of(checkpointed)).terms}
    assert terms["block inputs (checkpointing)"] == 2 * tokens * 32 * 2 and terms["recomputed block"] == \
        tokens * per_block and "activations" not in terms and terms["cuBLAS workspaces"] == 2 * 4 * MIB
    # ... whose backward's gradients in flight take the place of the activations it frees (fitted: the H100 grid)
    assert terms["backward temporaries"] == 0
    # under CUDA graphs (the default on a GPU) activations are 8% lower (fitted to measurements) and the
    # allocator keeps more cached blocks (30%)
    graphed = estimate(_config(tiny_model_dir), shape, settings_of(_config(tiny_model_dir)))
    assert graphed.settings.graphs and {t["term"]: t["bytes"] for t in graphed.terms}["activations"] == int(
        2 * tokens * per_block * 0.92)
    assert graphed.outside[0]["bytes"] == int(0.3 * 2 * tokens * per_block * 0.92)


def test_full_qlora_and_two_gpus(tiny_model_dir_64):
    config = _config(tiny_model_dir_64, "method.name=full", "optim.name=adamw_8bit")
    shape = read_shape(config)
    params = shape.parameters
    terms = {t["term"]: t["bytes"] for t in estimate(config, shape, settings_of(config)).terms}
    assert terms["gradients"] == 2 * params and terms["optimizer state (adamw_8bit)"] == 2 * (params + 4 * -(
        -params // 256))
    # FSDP2 over 2 GPUs: weights, gradients and state halve; two blocks and the root's weights are gathered
    sharded = estimate(config, shape, settings_of(config, gpus=2))
    halves = {t["term"]: t["bytes"] for t in sharded.terms}
    assert halves["weights, bf16"] == params and halves["gradients"] == params
    assert halves["FSDP2 gathered weights"] == 2 * (shape.embedding + 2 * shape.block_parameters)
    assert not sharded.settings.graphs  # several processes train eagerly
    qlora = _config(tiny_model_dir_64, "method.name=qlora")
    terms = {t["term"]: t["bytes"] for t in estimate(qlora, shape, settings_of(qlora)).terms}
    linears = sum(o * i for o, i in shape.linears.values())
    # NF4 + DQ: 4 bits a weight, an 8-bit code per 64, an fp32 absmax per 256 codes and a mean, per layer
    assert terms["weights, 4-bit"] == sum((4 * o * i + 8 * (o * i // 64) + 32 * -(-(o * i // 64) // 256) + 32) // 8
                                          for o, i in shape.linears.values())
    assert terms["weights, bf16"] == 2 * (params - linears) and terms["dequantized weight"] == 2 * 128 * 64
    assert terms["LoRA parameters"] == 4 * sum(shape.lora_parameters())  # fp32 adapters over a uint8-stored base


def test_estimate_cli_json_and_refusals(tiny_model_dir, capsys):
    assert main(["estimate", f"model.source={tiny_model_dir}", "--gpu-memory", "8GiB", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["parameters"] == sum(p.numel() for p in build_tiny_llama().parameters())
    assert report["estimate"]["memory_bytes"] == 8 * 2 ** 30 and report["estimate"]["allocated_bytes"] == sum(
        t["bytes"] for t in report["estimate"]["terms"])
    # key=value overrides after an option are overrides too, applied in order (the last one wins)
    assert main(["estimate", "train.micro_batch_size=5", "--gpu-memory", "8GiB", f"model.source={tiny_model_dir}",
                 "--json", "train.micro_batch_size=3"]) == 0
    assert json.loads(capsys.readouterr().out)["estimate"]["settings"]["micro_batch_size"] == 3
    assert main(["estimate", f"model.source={tiny_model_dir}", "--gpu-memory", "lots"]) == 2
    assert "--gpu-memory: 'lots' is not a memory size" in capsys.readouterr().err
    assert main(["estimate", f"model.source={tiny_model_dir}", "--verify"]) == 2
    assert "--verify trains on a GPU" in capsys.readouterr().err


def test_a_model_the_estimate_does_not_know_is_refused_by_name(tmp_path):
    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100).save_pretrained(tmp_path)
    with pytest.raises(TunesmithError, match="gpt2 model with linear layers none; the memory model knows"):
        read_shape(_config(tmp_path))


@pytest.mark.parametrize("family", ["Mistral", "Qwen2", "Qwen3", "Gemma2"])
def test_shapes_of_other_families_equal_their_real_models(tmp_path, family):
    import torch
    import transformers

    config = getattr(transformers, f"{family}Config")(vocab_size=128, hidden_size=32, intermediate_size=48,
                                                      num_hidden_layers=2, num_attention_heads=4,
                                                      num_key_value_heads=2, head_dim=8)
    config.save_pretrained(tmp_path)
    shape = read_shape(_config(tmp_path))
    torch.manual_seed(0)
    model = getattr(transformers, f"{family}ForCausalLM")(config)
    assert shape.parameters == sum(p.numel() for p in model.parameters())
    assert shape.block.head_dim == 8 and shape.block.kv_heads == 2 and shape.layers == 2
    assert shape.softcap == bool(getattr(config, "final_logit_softcapping", None))
    inject_lora(model, LoRAConfig(r=4, target_modules="all-linear"))
    assert sum(shape.lora_parameters()) == sum(p.numel() for p in adapter_parameters(model).values())
