"""Every optimizer with every method, QLoRA's 4-bit base, and gradient checkpointing, on the tiny model."""

import pytest
import torch
from safetensors.torch import load_file

from tunesmith.recipes import sft
from tunesmith.train.checkpoint import latest_checkpoint, load_checkpoint
from tunesmith.train.metrics import read_metrics

OPTIMIZERS = ["adamw", "adamw_8bit", "paged_adamw_32bit", "paged_adamw_8bit"]


def _losses(run_dir):
    return [row["loss"] for row in read_metrics(run_dir) if "loss" in row]


@pytest.mark.parametrize("method", ["lora", "qlora", "full"])
@pytest.mark.parametrize("optim", OPTIMIZERS)
def test_every_optimizer_with_every_method(make_config, method, optim):
    config = make_config(f"method.name={method}", f"optim.name={optim}", "train.max_steps=3", "eval.before=false",
                         "data.eval=", "train.checkpoint_every=3", "optim.lr=0.003", "train.progress=false")
    summary = sft.run(config)
    losses = _losses(config.run_dir)
    assert len(losses) == 3 and all(loss == loss for loss in losses)
    states = list(load_checkpoint(latest_checkpoint(config.run_dir)).optimizer["state"].values())
    if optim == "adamw":
        assert all({"exp_avg", "exp_avg_sq"} <= set(s) for s in states)
    else:  # bitsandbytes: 8-bit moments (uint8 + a quantization map) for tensors of ≥ 4096 elements
        inner = [s["__bnb_optimizer_quant_state__"] for s in states]
        large = [s for s in inner if s["state1"].numel() >= 4096]
        assert all((s["state1"].dtype == torch.uint8) == optim.endswith("8bit") for s in large)
        assert all(s["state1"].dtype == torch.float32 for s in inner if s["state1"].numel() < 4096)
        assert large or method != "full"
    assert summary["method"] == method
    assert (summary["quantization"] is not None) == (method == "qlora")
    output = config.run_dir / ("model" if method == "full" else "adapter")
    assert output.is_dir()


def test_adamw_8bit_keeps_8bit_state_for_large_tensors(make_config):
    config = make_config("method.name=full", "optim.name=adamw_8bit", "train.max_steps=1", "eval.before=false",
                         "data.eval=", "train.checkpoint_every=1")
    sft.run(config)
    state = load_checkpoint(latest_checkpoint(config.run_dir)).optimizer["state"]
    dtypes = {str(s["__bnb_optimizer_quant_state__"]["state1"].dtype) for s in state.values()}
    assert dtypes == {"torch.uint8", "torch.float32"}  # embeddings are ≥ 4096 elements, norms are not


def test_qlora_base_is_4bit_and_reported(make_config, capsys):
    config = make_config("method.name=qlora", "train.max_steps=1", "eval.before=false", "data.eval=",
                         "quant.double_quant=false", "quant.type=fp4")
    summary = sft.run(config)
    out = capsys.readouterr().out
    assert "fp4:" in out and "14 linear layers in 4 bits" in out and "lm_head (output head)" in out
    assert "model.embed_tokens (embedding)" in summary["quantization"]
    adapter = load_file(config.run_dir / "adapter" / "adapter_model.safetensors")
    assert all(t.dtype == torch.float32 for t in adapter.values()) and len(adapter) == 28


@pytest.mark.parametrize("method", ["lora", "full"])
def test_gradient_checkpointing_gives_the_same_run(make_config, method):
    plain = make_config("name=plain", f"method.name={method}", "train.max_steps=3", "eval.before=false",
                        "optim.lr=0.003")
    ckpt = make_config("name=ckpt", f"method.name={method}", "train.max_steps=3", "eval.before=false",
                       "optim.lr=0.003", "train.gradient_checkpointing=true")
    a, b = sft.run(plain), sft.run(ckpt)
    assert _losses(plain.run_dir) == pytest.approx(_losses(ckpt.run_dir), abs=1e-5)
    assert a["after"]["eval_loss"] == pytest.approx(b["after"]["eval_loss"], abs=1e-5)


def test_qlora_learns(make_config):
    config = make_config("method.name=qlora", "train.max_steps=6", "optim.lr=0.02")
    summary = sft.run(config)
    assert summary["after"]["eval_loss"] < summary["before"]["eval_loss"] - 0.05
