"""`tunesmith merge`: plain HF output, exact fp32 merge, QLoRA merge bases, quality check, errors."""

import json
import shutil

import pytest
import torch

from tunesmith.cli import main
from tunesmith.recipes import sft


@pytest.fixture()
def lora_run(make_config):
    config = make_config("train.max_steps=3", "eval.before=false", "optim.lr=0.05")
    sft.run(config)
    return config.run_dir


def test_merge_fp32_matches_adapter_and_loads_without_tunesmith(lora_run, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "merged"
    assert main(["merge", str(lora_run), "--out", str(out), "--dtype", "fp32", "--json"]) == 0
    check = json.loads(capsys.readouterr().out)
    assert check["merged"]["max_abs_logit_diff"] < 1e-4 and abs(check["merged"]["mean_kl"]) < 1e-6
    assert json.loads((out / "merge_check.json").read_text()) == check
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.dtype == torch.float32 and "lora" not in " ".join(model.state_dict())
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template
    # the adapter changed the function: the merged model is not the base
    base = AutoModelForCausalLM.from_pretrained(check["base"])
    ids = torch.tensor([[1, 20, 30, 40]])
    with torch.no_grad():
        assert (model(ids).logits - base(ids).logits).abs().max() > 1e-3


def test_merge_bf16_and_nf4_quality_is_measured(lora_run, tmp_path):
    from tunesmith.merge import merge

    check = merge(str(lora_run), str(tmp_path / "q"), dtype="bf16", quantize="nf4", check_rows=2)
    assert 0 < check["merged"]["mean_kl"] < 1e-3
    assert check["quantized"]["mean_kl"] > check["merged"]["mean_kl"]
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    assert config["quantization_config"]["bnb_4bit_quant_type"] == "nf4"
    assert config["quantization_config"]["bnb_4bit_use_double_quant"] is True


def test_qlora_merge_bases(make_config, tmp_path, capsys):
    from tunesmith.merge import merge

    config = make_config("method.name=qlora", "train.max_steps=3", "eval.before=false", "optim.lr=0.05")
    sft.run(config)
    original = merge(str(config.run_dir), str(tmp_path / "orig"), dtype="fp32", check_rows=2)
    assert "not into the 4-bit weights" in capsys.readouterr().out
    exact = merge(str(config.run_dir), str(tmp_path / "deq"), dtype="fp32", merge_base="dequantized", check_rows=2)
    # against its own base each merge is exact; the two bases differ by the 4-bit rounding
    assert original["merged"]["max_abs_logit_diff"] < 1e-4 and exact["merged"]["max_abs_logit_diff"] < 1e-4
    from safetensors.torch import load_file
    a, b = load_file(tmp_path / "orig" / "model.safetensors"), load_file(tmp_path / "deq" / "model.safetensors")
    q = "model.layers.0.self_attn.q_proj.weight"
    assert (a[q] - b[q]).abs().max() > 1e-3
    torch.testing.assert_close(a["model.embed_tokens.weight"], b["model.embed_tokens.weight"])


def test_merge_errors(lora_run, tmp_path, capsys):
    out = str(tmp_path / "m")
    broken = tmp_path / "broken"
    shutil.copytree(lora_run / "adapter", broken)
    (broken / "adapter_model.safetensors").unlink()
    assert main(["merge", str(broken), "--out", out]) == 2
    assert "adapter_model.safetensors is missing" in capsys.readouterr().err
    assert main(["merge", str(lora_run), "--out", out, "--merge-base", "dequantized"]) == 2
    assert "for QLoRA adapters" in capsys.readouterr().err
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "f.txt").write_text("x")
    assert main(["merge", str(lora_run), "--out", str(tmp_path / "full")]) == 2
    assert "already exists" in capsys.readouterr().err
    # the run dir's config is read by load_run_config, for the run dir and for its adapter/ alike
    (lora_run / "config.yaml").write_text((lora_run / "config.yaml").read_text() + "lora:\n  r: 2\n")
    for source in (lora_run, lora_run / "adapter"):
        assert main(["merge", str(source), "--out", out]) == 2
        err = capsys.readouterr().err
        assert f"{lora_run / 'config.yaml'}: key 'lora' is written twice" in err and "restore it, e.g. from" in err
    assert not (tmp_path / "m").exists()


def test_merge_refuses_a_mismatched_base(lora_run, tmp_path, capsys, tokenizer):
    from tinymodels import build_tiny_llama

    other = tmp_path / "other"
    build_tiny_llama(hidden_size=48).save_pretrained(other)
    tokenizer.save_pretrained(other)
    assert main(["merge", str(lora_run), "--out", str(tmp_path / "m"), "--base", str(other)]) == 2
    err = capsys.readouterr().err
    assert "do not fit this model" in err and "different base model" in err
    assert not (tmp_path / "m").exists()
