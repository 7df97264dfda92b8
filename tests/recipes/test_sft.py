"""The SFT recipe end to end on the tiny model: accumulation, resume, refusals, non-finite steps, outputs."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tinymodels import build_tiny_llama
from tunesmith.errors import TunesmithError
from tunesmith.recipes import sft
from tunesmith.train import objectives
from tunesmith.train.checkpoint import latest_checkpoint
from tunesmith.train.metrics import read_metrics
from tunesmith.train.state import TrainState

# Runs compared at 1e-5 pin the products through frozen weights to exact (train/products.py): bf16 ones, what
# auto picks for LoRA on a CPU with native bf16, round each differently shaped product's result to bf16.
EXACT_PRODUCTS = ("train.forward_products=exact", "train.backward_products=exact")


def _losses(run_dir):
    return [row["loss"] for row in read_metrics(run_dir) if "loss" in row]


def _adapter(run_dir):
    return load_file(run_dir / "adapter" / "adapter_model.safetensors")


def _assert_same_weights(a, b, tol=1e-5):
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=tol, rtol=0)


def test_accumulation_equivalence(make_config):
    # at 1e-5: exact products through frozen weights (bf16 ones round each differently shaped product to bf16)
    exact = EXACT_PRODUCTS
    one = make_config("name=mb4", "train.micro_batch_size=4", "train.grad_accum=1", "train.max_steps=4", *exact)
    four = make_config("name=mb1", "train.micro_batch_size=1", "train.grad_accum=4", "train.max_steps=4", *exact)
    sft.run(one)
    sft.run(four)
    assert _losses(one.run_dir) == pytest.approx(_losses(four.run_dir), abs=1e-5)
    _assert_same_weights(_adapter(one.run_dir), _adapter(four.run_dir))
    assert [r["grad_norm"] for r in read_metrics(one.run_dir)] == pytest.approx(
        [r["grad_norm"] for r in read_metrics(four.run_dir)], abs=1e-5)


class Stop(Exception):
    pass


@pytest.mark.parametrize("method", [["method.name=lora", *EXACT_PRODUCTS],
                                    ["method.name=lora", "train.forward_products=bf16", "train.backward_products=bf16"],
                                    ["method.name=qlora", "optim.name=paged_adamw_8bit",
                                     "train.gradient_checkpointing=true"]], ids=["lora", "lora-bf16-products", "qlora"])
def test_resume_mid_epoch_mid_accumulation_reproduces_run(make_config, method):
    # Dropout makes the RNG part of the state that must be restored.
    straight = make_config("name=straight", "lora.dropout=0.2", *method)
    sft.run(straight)

    broken = make_config("name=broken", "lora.dropout=0.2", *method)

    def stop_at(step, micro):
        if (step, micro) == (3, 7):  # step 4's second micro-batch: mid-epoch, mid-accumulation
            raise Stop()

    with pytest.raises(Stop):
        sft.run(broken, on_micro_batch=stop_at)
    assert latest_checkpoint(broken.run_dir).name == "step-2"
    sft.run(broken, resume=True)
    assert _losses(broken.run_dir) == pytest.approx(_losses(straight.run_dir), abs=1e-5)
    assert len(_losses(broken.run_dir)) == 6
    _assert_same_weights(_adapter(broken.run_dir), _adapter(straight.run_dir))


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_sigkill_while_writing_checkpoint_then_resume(make_config, tmp_path, method):
    straight = make_config("name=straight", f"method.name={method}")
    sft.run(straight)
    killed = make_config("name=killed", f"method.name={method}")
    script = textwrap.dedent(f"""
        import sys, time
        from tunesmith.config import load_config
        from tunesmith.recipes import sft
        from tunesmith.train import resume
        real = resume.save_adapter
        def slow(model, config, out_dir, **kw):
            real(model, config, out_dir, **kw)
            if "step-4" in str(out_dir) or ".tmp-step-4" in str(out_dir):
                print("saving", flush=True)
                time.sleep(60)
        resume.save_adapter = slow
        config = load_config(None, {killed.model_dump(mode="json") and []!r})
    """)
    # The config travels as YAML, the way the CLI passes it.
    (tmp_path / "killed.yaml").write_text(killed.to_yaml())
    script = script.replace("load_config(None, [])", f"load_config({str(tmp_path / 'killed.yaml')!r})")
    script += "sft.run(config)\n"
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        # QLoRA prints its quantization summary first
        assert "saving" in (line.strip() for line in iter(proc.stdout.readline, ""))
    finally:
        proc.kill()
        proc.wait()
    assert latest_checkpoint(killed.run_dir).name == "step-2"
    assert any(p.name.startswith(".tmp-step-4") for p in (killed.run_dir / "checkpoints").iterdir())
    sft.run(killed, resume=True)
    assert _losses(killed.run_dir) == pytest.approx(_losses(straight.run_dir), abs=1e-5)
    _assert_same_weights(_adapter(killed.run_dir), _adapter(straight.run_dir))


def _interrupted(make_config, *overrides):
    config = make_config("name=changed", *overrides)

    def stop(step, micro):
        if step == 3:
            raise Stop()

    with pytest.raises(Stop):
        sft.run(config, on_micro_batch=stop)
    return config


def test_resume_refuses_changed_rank_dataset_or_model(make_config, data_files, tmp_path, tokenizer):
    config = _interrupted(make_config)
    with pytest.raises(TunesmithError, match="lora.r changed from 4 to 8"):
        sft.run(config.model_copy(update={"lora": config.lora.model_copy(update={"r": 8})}), resume=True)
    train, _ = data_files
    train.write_text(train.read_text().replace("alpha", "omega"))
    with pytest.raises(TunesmithError, match=f"the data \\({train}\\) changed on disk since the checkpoint"):
        sft.run(config, resume=True)

    other = tmp_path / "other-model"
    build_tiny_llama(seed=3).save_pretrained(other)
    tokenizer.save_pretrained(other)
    with pytest.raises(TunesmithError, match="model.source changed from"):
        sft.run(config.model_copy(update={"model": config.model.model_copy(update={"source": str(other)})}),
                resume=True)


def test_qlora_resume_refuses_changed_quantization(make_config):
    config = _interrupted(make_config, "method.name=qlora")
    changed = config.model_copy(update={"quant": config.quant.model_copy(update={"double_quant": False})})
    with pytest.raises(TunesmithError, match="quant.double_quant changed from True to False"):
        sft.run(changed, resume=True)


def test_truncated_checkpoint_file_is_named(make_config):
    config = _interrupted(make_config)
    optimizer_file = latest_checkpoint(config.run_dir) / "optimizer.pt"
    optimizer_file.write_bytes(optimizer_file.read_bytes()[:100])
    with pytest.raises(TunesmithError, match=f"{optimizer_file} is truncated or corrupt"):
        sft.run(config, resume=True)


def test_existing_run_dir_is_never_overwritten(make_config):
    config = make_config("train.max_steps=1")
    sft.run(config)
    with pytest.raises(TunesmithError, match="already exists; continue it with --resume"):
        sft.run(config)


def _nan_at(monkeypatch, bad_steps):
    real = objectives.supervised_loss_sum
    calls = {"n": 0}

    def maybe_nan(model, batch, **options):
        calls["n"] += 1
        loss = real(model, batch, **options)
        step = (calls["n"] - 1) // 2  # two micro-batches per step
        return loss * float("nan") if step in bad_steps else loss

    monkeypatch.setattr(objectives, "supervised_loss_sum", maybe_nan)


def test_nonfinite_skip_leaves_weights_and_optimizer_untouched(make_config, monkeypatch):
    reference = make_config("name=ref", "train.max_steps=2")
    sft.run(reference)
    _nan_at(monkeypatch, {2})
    config = make_config("name=skip", "train.max_steps=3", "train.checkpoint_every=1")
    sft.run(config)
    rows = read_metrics(config.run_dir)
    assert [r["skipped"] for r in rows] == [False, False, True]
    step2 = load_file(config.run_dir / "checkpoints" / "step-2" / "weights.safetensors")
    step3 = load_file(config.run_dir / "checkpoints" / "step-3" / "weights.safetensors")
    _assert_same_weights(step2, step3, tol=0)
    opt2 = torch.load(config.run_dir / "checkpoints" / "step-2" / "optimizer.pt", weights_only=True)
    opt3 = torch.load(config.run_dir / "checkpoints" / "step-3" / "optimizer.pt", weights_only=True)
    for key, state in opt2["state"].items():
        assert torch.equal(state["exp_avg"], opt3["state"][key]["exp_avg"])
    summary = json.loads((config.run_dir / "summary.json").read_text())
    assert summary["skipped_steps"] == 1
    # the checkpoint's state.json is the engine's TrainState (plus the fingerprints and the number of processes
    # that resume compares)
    saved = json.loads((config.run_dir / "checkpoints" / "step-3" / "state.json").read_text())
    assert set(saved.pop("fingerprints")) == {"data", "model"} and saved.pop("processes") == 1
    state = TrainState.from_json(saved, source="state.json")
    assert (state.step, state.total_steps, state.skipped, state.bad_streak, state.micro) == (3, 3, 1, 1, 6)
    assert state.tokens == summary["tokens"] == rows[-1]["tokens"]


def test_nonfinite_abort_and_consecutive_limit(make_config, monkeypatch):
    _nan_at(monkeypatch, {2})
    config = make_config("name=abort", "train.nonfinite=abort")
    with pytest.raises(TunesmithError, match="step 3: non-finite loss.*train.nonfinite=abort.*checkpoint is intact"):
        sft.run(config)
    assert latest_checkpoint(config.run_dir).name == "step-2"
    _nan_at(monkeypatch, {1, 2, 3})
    config = make_config("name=streak", "train.max_bad_steps=3")
    with pytest.raises(TunesmithError, match="3 non-finite steps in a row"):
        sft.run(config)


def test_full_finetune_writes_plain_hf_model(make_config):
    from transformers import AutoModelForCausalLM

    config = make_config("name=full", "method.name=full", "method.freeze_embeddings=true", "train.max_steps=2")
    summary = sft.run(config)
    model = AutoModelForCausalLM.from_pretrained(config.run_dir / "model")
    start = AutoModelForCausalLM.from_pretrained(config.model.source)
    assert torch.equal(model.get_input_embeddings().weight, start.get_input_embeddings().weight)
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, dict(start.named_parameters())[n])]
    assert "model.layers.0.self_attn.q_proj.weight" in changed
    assert summary["after"]["eval_loss"] < summary["before"]["eval_loss"]


def test_compile_is_refused_with_the_measurement(make_config):
    with pytest.raises(TunesmithError, match="train.compile was removed: it measured slower"):
        make_config("train.compile=true")


def test_layout_is_recorded_and_every_layout_trains_alike(make_config):
    exact = EXACT_PRODUCTS  # layouts compared at 1e-5 (see test_accumulation_equivalence)
    auto = sft.run(make_config("name=auto", "train.max_steps=3", "eval.before=false", *exact))
    recorded = json.loads((Path(auto["run_dir"]) / "summary.json").read_text())
    assert recorded["layout"] == {"name": "rows", "reason": "CPU with SDPA attention", "trimmed": True}
    assert recorded["kernels"] == {"name": "torch"}
    assert recorded["graphs"] == {"used": False,
                                  "reason": "train.graphs=auto: graphs need a CUDA GPU; this run is on cpu"}
    assert recorded["blas_workspace"] == {"mib": None, "reason": "no CUDA device"}
    assert recorded["forward_products"] == {"name": "exact", "reason": "train.forward_products=exact"}
    assert recorded["backward_products"] == {"name": "exact", "reason": "train.backward_products=exact"}
    for name in ("flat", "varlen", "cache", "plain"):
        forced = sft.run(make_config(f"name={name}", "train.max_steps=3", "eval.before=false", f"train.layout={name}",
                                     *exact))
        assert forced["layout"]["name"] == name
        assert _losses(Path(forced["run_dir"])) == pytest.approx(_losses(Path(auto["run_dir"])), abs=1e-5)
        _assert_same_weights(_adapter(Path(forced["run_dir"])), _adapter(Path(auto["run_dir"])))


def test_impossible_forced_layout_is_refused_before_the_run_dir(make_config):
    config = make_config("train.layout=rows", "data.batching=pack")
    with pytest.raises(TunesmithError, match="train.layout=rows needs"):
        sft.run(config)
    assert not config.run_dir.exists()


def test_liger_kernels_are_refused_before_the_run_dir_where_they_cannot_run(make_config, monkeypatch):
    """train.kernels=liger needs CUDA and the liger-kernel package; either missing is said before any work."""
    from tunesmith.train import kernels

    config = make_config("train.kernels=liger")
    with pytest.raises(TunesmithError, match="train.kernels=liger needs a CUDA GPU .* use train.kernels=torch"):
        sft.run(config)
    assert not config.run_dir.exists()
    model = build_tiny_llama()
    monkeypatch.setattr(kernels.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(TunesmithError, match="needs the liger-kernel package: pip install liger-kernel"):
        kernels.check_kernels("liger", model, torch.device("cuda"))
    kernels.check_kernels("torch", model, torch.device("cpu"))  # the default runs everywhere
    assert kernels.install_kernels(model, "torch") == {"name": "torch"}
