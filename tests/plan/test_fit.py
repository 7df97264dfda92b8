"""``plan: auto`` and ``estimate --fit`` (issue 29): a run whose micro-batch does not fit a (simulated) memory
budget gets settings that fit, keeps its effective batch, and trains exactly as the same settings given by hand."""

import json

import pytest
import yaml

from tunesmith.cli import main
from tunesmith.config import load_config
from tunesmith.errors import TunesmithError
from tunesmith.plan.estimate import estimate, settings_of
from tunesmith.plan.fit import choose
from tunesmith.plan.shapes import read_shape


@pytest.fixture()
def tiny_cpu(tiny_model_dir, tmp_path):
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"Repeat {i} {i * 7}"},
                                                      {"role": "assistant", "content": f"{i} {i * 7}"}]}) + "\n"
                             for i in range(16)))
    return [f"model.source={tiny_model_dir}", "model.device=cpu", f"data.train={train}", "data.eval=null",
            "data.max_length=64", "lora.r=4", "lora.alpha=8", "train.micro_batch_size=8", "train.grad_accum=1",
            "train.max_steps=2", "train.progress=false", "train.checkpoint_every=null", "eval.before=false",
            "eval.task_rows=0", f"output_dir={tmp_path / 'runs'}"]


def _plan(overrides, memory):
    config = load_config(None, overrides)
    return choose(config, read_shape(config), memory=memory, margin=0.1, cuda=False)


def test_the_fastest_settings_that_fit_are_chosen(tiny_cpu):
    # The tiny model on the CPU (fp32): its fused head's 8-byte chunk of 49,152 logits per position dominates,
    # 108 MB at micro-batch 4 (256 positions and more), 57 MB at 2, 32 MB at 1
    assert _plan(tiny_cpu, 10 ** 9).chosen.settings.micro_batch_size == 8  # fits as given
    plan = _plan(tiny_cpu, 10 ** 8)
    s = plan.chosen.settings
    assert (s.micro_batch_size, s.grad_accum, s.checkpointing, s.optimizer) == (2, 4, False, "adamw")
    assert plan.requested.total > 0.9 * 10 ** 8 >= plan.chosen.total
    s = _plan(tiny_cpu, 5 * 10 ** 7).chosen.settings
    assert (s.micro_batch_size, s.grad_accum) == (1, 8)
    with pytest.raises(TunesmithError, match=r"nothing fits 0.03 GiB .* the smallest of 24 plans \(micro-batch 1, "
                                             r"64 tokens, checkpointing on, adamw\) needs 0.03 GiB"):
        _plan(tiny_cpu, 3 * 10 ** 7)


def test_packed_runs_may_halve_their_token_budget(tiny_cpu):
    packed = tiny_cpu + ["data.batching=pack", "data.token_budget=256", "train.micro_batch_size=1"]
    plan = _plan(packed, 10 ** 8)
    assert plan.token_budget == 128 and plan.chosen.settings.grad_accum == 2 and plan.chosen.settings.tokens == 128


def test_plan_auto_trains_what_the_same_settings_by_hand_train(tiny_cpu, tmp_path, capsys):
    assert main(["train", *tiny_cpu, "name=planned", "plan=auto", "plan.memory=100MB"]) == 0
    assert "plan: micro-batch 8 → 2, accumulation 1 → 4" in capsys.readouterr().out
    planned = tmp_path / "runs" / "planned"
    saved = yaml.safe_load((planned / "config.yaml").read_text())
    assert (saved["train"]["micro_batch_size"], saved["train"]["grad_accum"]) == (2, 4)
    summary = json.loads((planned / "summary.json").read_text())
    assert summary["plan"]["chosen"]["micro_batch_size"] == 2 and summary["plan"]["requested"]["micro_batch_size"] == 8
    assert summary["plan"]["chosen_gib"] <= 0.9 * 10 ** 8 / 2 ** 30 < summary["plan"]["requested_gib"]
    assert main(["train", *tiny_cpu, "name=by-hand", "train.micro_batch_size=2", "train.grad_accum=4"]) == 0
    losses = [[row["loss"] for row in map(json.loads, (tmp_path / "runs" / name / "metrics.jsonl").open())
               if "loss" in row] for name in ("planned", "by-hand")]
    assert len(losses[0]) == 2 and losses[0] == losses[1]


def test_plan_auto_on_the_cpu_needs_a_memory(tiny_cpu, capsys):
    assert main(["train", *tiny_cpu, "name=x", "plan=auto"]) == 2
    assert "plan: auto on the CPU needs the memory to fit, e.g. plan.memory=8GiB" in capsys.readouterr().err


def test_estimate_fit_prints_the_overrides(tiny_cpu, capsys):
    assert main(["estimate", *tiny_cpu, "--gpu-memory", "100MB", "--fit", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["overrides"] == ["train.micro_batch_size=2", "train.grad_accum=4",
                                   "train.gradient_checkpointing=false", "optim.name=adamw"]
    config = load_config(None, tiny_cpu + report["overrides"])
    again = estimate(config, read_shape(config), settings_of(config, cuda=False), cuda=False)
    assert report["estimate"]["allocated_bytes"] == again.allocated


def test_a_planned_run_resumes_with_the_same_plan(tiny_cpu, tmp_path, capsys):
    planned = tiny_cpu + ["name=resumed", "plan=auto", "plan.memory=100MB", "train.checkpoint_every=1"]
    assert main(["train", *planned]) == 0
    run = tmp_path / "runs" / "resumed"
    # the saved config holds the chosen settings and plan: auto; re-planned on resume, it keeps them (the
    # effective batch is the same), so the checkpoint's identity matches
    assert main(["train", "--resume", str(run), "train.max_steps=3"]) == 0
    assert "plan: the settings as given" in capsys.readouterr().out
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").open() if "loss" in json.loads(line)]
    assert steps == [1, 2, 3]
