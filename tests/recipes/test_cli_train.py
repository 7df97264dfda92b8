"""`tunesmith train` / `eval` / `chat --adapter` through the CLI, and our run's adapter in PEFT."""

import json

import pytest
import torch
import yaml

from tunesmith.cli import main
from tunesmith.config import load_config
from tunesmith.models import load
from tunesmith.peft.io import load_adapter


@pytest.fixture()
def trained_run(tmp_path, tiny_model_dir, data_files, capsys):
    """A 4-step LoRA run from a YAML config plus overrides, through the CLI."""
    train, heldout = data_files
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({
        "name": "cli", "output_dir": str(tmp_path / "runs"),
        "model": {"source": str(tiny_model_dir)},
        "data": {"train": str(train), "eval": str(heldout)},
        "lora": {"r": 4, "alpha": 8},
        "train": {"micro_batch_size": 4, "max_steps": 4, "progress": False},
        "eval": {"task_rows": 0},
    }))
    assert main(["train", "--config", str(config), "optim.lr=0.02", "train.checkpoint_every=2"]) == 0
    out = capsys.readouterr().out
    return tmp_path / "runs" / "cli", out


def test_train_cli_writes_run_dir_and_prints_before_after(trained_run):
    run_dir, out = trained_run
    assert {"config.yaml", "adapter", "checkpoints", "metrics.jsonl", "report.html", "summary.json",
            "eval_before.json", "eval_after.json"} <= {p.name for p in run_dir.iterdir()}
    resolved = load_config(run_dir / "config.yaml")
    assert resolved.optim.lr == 0.02 and resolved.lora.r == 4 and resolved.name == "cli"
    assert "metric" in out and "eval_loss" in out and "before" in out and "after" in out
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 4
    assert summary["after"]["eval_loss"] < summary["before"]["eval_loss"]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [row for row in rows if "loss" in row]
    assert [row["step"] for row in steps] == [1, 2, 3, 4]
    assert {"step", "loss", "lr", "grad_norm", "tokens", "tokens_per_s"} <= steps[0].keys()
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-2", "step-4"]
    assert list(run_dir.glob("tb/events.out.tfevents.*"))


def test_eval_cli_json_on_run_dir_matches_summary(trained_run, capsys):
    run_dir, _ = trained_run
    assert main(["eval", str(run_dir), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert report["adapter"] == str(run_dir / "adapter")
    assert report["eval_loss"] == pytest.approx(summary["after"]["eval_loss"], abs=1e-5)
    assert report["perplexity"] == pytest.approx(summary["after"]["perplexity"], rel=1e-5)


def test_eval_cli_builtin_task_metrics(tiny_model_dir, capsys):
    assert main(["eval", str(tiny_model_dir), "--data", "builtin:test", "--task-rows", "2", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["data"] == "builtin:test" and report["adapter"] is None
    # a random tiny model writes no JSON: the task metrics say so exactly
    assert report["valid_json_rate"] == 0.0 and report["exact_match"] == 0.0
    assert set(report["fields"]) and all(v == 0.0 for v in report["fields"].values())
    assert report["eval_loss"] > 0 and report["perplexity"] == pytest.approx(2.718281828 ** report["eval_loss"],
                                                                               rel=1e-4)


def test_eval_cli_errors(tmp_path, capsys):
    (tmp_path / "config.yaml").write_text("model: {source: default}\ndata: {eval: null}\n")
    assert main(["eval", str(tmp_path)]) == 2
    assert "has no adapter/ or model/" in capsys.readouterr().err


def test_train_cli_rejects_bad_override(capsys):
    assert main(["train", "lora.rank=8"]) == 2
    assert "unknown key 'lora.rank'" in capsys.readouterr().err
    assert main(["train", "--config", "/nonexistent.yaml"]) == 2
    assert "/nonexistent.yaml does not exist" in capsys.readouterr().err


def test_run_adapter_loads_in_peft_with_same_logits(trained_run, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run_dir, _ = trained_run
    ids = torch.tensor([[1, 20, 30, 40, 50, 60]])
    ours = load(str(tiny_model_dir)).model
    load_adapter(ours, run_dir / "adapter")
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    theirs = PeftModel.from_pretrained(base, run_dir / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(ids).logits, theirs(ids).logits, atol=1e-5, rtol=0)
        # the trained adapter changes the function
        plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)(ids).logits
    assert (plain - theirs(ids).logits.detach()).abs().max() > 1e-3


def test_chat_with_adapter_uses_it(trained_run, tiny_model_dir, capsys):
    run_dir, _ = trained_run
    args = ["chat", "--model", str(tiny_model_dir), "--prompt", "Repeat alpha bravo", "--max-tokens", "6"]
    assert main(args) == 0
    plain = capsys.readouterr().out
    assert main(args + ["--adapter", str(run_dir / "adapter")]) == 0
    tuned = capsys.readouterr().out
    assert tuned != plain
    assert main(["chat", "--model", str(tiny_model_dir), "--prompt", "x", "--adapter", str(run_dir)]) == 2
    assert "adapter" in capsys.readouterr().err


def test_demo_runs_the_default_recipe_with_overrides(tmp_path, tiny_model_dir, capsys):
    args = ["demo", f"model.source={tiny_model_dir}", f"output_dir={tmp_path}", "name=demo", "train.max_steps=2",
            "eval.task_rows=2", "eval.loss_rows=4", "eval.max_new_tokens=4", "train.progress=false"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "the built-in task" in out and "exact_match" in out and "2 held-out examples" in out
    assert out.count("expected : {") == 2 and "base     :" in out and "tuned    :" in out
    summary = json.loads((tmp_path / "demo" / "summary.json").read_text())
    assert summary["steps"] == 2 and (tmp_path / "demo" / "report.html").is_file()
