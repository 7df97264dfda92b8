"""The end of a run: the result saved (``adapter/`` or ``model/``), evaluated, ``summary.json`` (with the
environment it ran in) and ``report.html`` written, before/after printed; and the evaluation files both phases
write."""

from __future__ import annotations

import json
import os
import platform
import shutil
import time
from pathlib import Path

import torch
import transformers

import tunesmith
from tunesmith.eval.report import format_before_after, write_report
from tunesmith.peft import save_adapter
from tunesmith.recipes.run_dir import write_json
from tunesmith.recipes.setup import RunSetup
from tunesmith.train.engine import TrainResult
from tunesmith.train.metrics import read_metrics


def save_eval(setup: RunSetup, phase: str, metrics: dict, result) -> None:
    """``eval_<phase>.json``: the metrics and, when answers were scored (``result``), each row's prompt (its
    last message), expected answer, prediction, subset and row number, as parallel lists; ``answers_reused``:
    how many answers the loss pass determined (``eval.evaluate.agreed_answers``); ``prompts_prefilled``: how many
    of the rest were generated from the keys the loss pass kept (``eval.prompt_keys``); ``answers_settled``: how
    many ended once their score could no longer change (``eval.stop_settled``)."""
    rows = result.rows if result else []
    payload = {"metrics": metrics, "predictions": result.predictions if result else [],
               "prompts": [row.shown_prompt for row in rows], "expected": [row.expected for row in rows],
               "subsets": [row.subset for row in rows], "rows": [row.row for row in rows],
               "answers_reused": result.reused if result else 0,
               "prompts_prefilled": result.prefilled if result else 0,
               "answers_settled": result.settled if result else 0}
    write_json(setup.run_dir / f"eval_{phase}.json", payload)


def _publish_dir(build, target: Path) -> None:
    """Write a result dir beside ``target`` with ``build(tmp)``, then swap it into place."""
    tmp = target.with_name(f".{target.name}-new")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        build(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = target.with_name(f".{target.name}-old")
    if target.exists():
        os.rename(target, old)
    os.rename(tmp, target)
    shutil.rmtree(old, ignore_errors=True)


def save_result(setup: RunSetup, model, *, write_adapter=None) -> Path:
    """``model``'s ``adapter/`` (PEFT format) for LoRA, ``model/`` (plain HF dir) for full fine-tuning; with the
    tokenizer.

    ``write_adapter(dir)`` replaces the plain adapter save (a recipe whose adapter file is not the model's)."""
    config, tokenizer = setup.config, setup.tokenizer
    if config.method.uses_adapter:
        target = setup.run_dir / "adapter"

        def build(tmp: Path) -> None:
            if write_adapter is None:
                save_adapter(model, setup.lora_config, tmp, base_model_name_or_path=config.model.source)
            else:
                write_adapter(tmp)
            tokenizer.save_pretrained(tmp)
    else:
        target = setup.run_dir / "model"

        def build(tmp: Path) -> None:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
    _publish_dir(build, target)
    return target


def run_environment(device: torch.device, dtype: torch.dtype) -> dict:
    """The versions and the device a run used, as ``summary.json``'s ``environment`` and the report show them."""
    environment = {"python": platform.python_version(), "tunesmith": tunesmith.__version__,
                   "torch": torch.__version__, "transformers": transformers.__version__}
    if torch.version.cuda:
        environment["cuda"] = torch.version.cuda
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"{device.type} ({platform.machine()}, {os.cpu_count()} cores)"
    environment.update(device=name, dtype=str(dtype).removeprefix("torch."), platform=platform.platform())
    return environment


def finish_run(setup: RunSetup, result: TrainResult, started: float, *, evaluate, write_adapter=None) -> dict:
    """Save the result, evaluate it, write ``summary.json`` and ``report.html``, print before/after.

    ``evaluate("after")`` is the objective's held-out evaluation, which writes ``eval_after.json``;
    ``write_adapter`` goes to ``save_result``."""
    state = result.state
    output = save_result(setup, result.model, write_adapter=write_adapter)
    before_path = setup.run_dir / "eval_before.json"
    before = json.loads(before_path.read_text()) if before_path.exists() else None
    after = None
    eval_start = time.time()
    if setup.eval is not None:
        evaluate("after")
        after = json.loads((setup.run_dir / "eval_after.json").read_text())
    metrics = read_metrics(setup.run_dir)
    losses = [row for row in metrics if row.get("loss") is not None]
    summary = {"run_dir": str(setup.run_dir), "output": str(output), "method": setup.config.method.name,
               # what users compare runs by: the training loss of the last logged step (the loop always logs it)
               "final_loss": losses[-1]["loss"] if losses else None,
               "final_loss_step": losses[-1]["step"] if losses else None,
               "quantization": setup.quantization.summary() if setup.quantization else None, "steps": state.step,
               "skipped_steps": state.skipped, "tokens": state.tokens,
               "train_seconds": round(state.train_seconds, 2), "eval_seconds": round(time.time() - eval_start, 2),
               "before": before["metrics"] if before else None, "after": after["metrics"] if after else None,
               "dropped": setup.drops, "layout": result.layout.summary(),
               "kernels": result.kernels, "graphs": result.graphs,
               "forward_products": (result.products or {}).get("forward"),
               "backward_products": (result.products or {}).get("backward"),
               "blas_workspace": setup.blas_workspace, "plan": setup.plan,
               "environment": run_environment(torch.device(setup.device), setup.dtype)}
    write_json(setup.run_dir / "summary.json", summary)
    examples = []
    if after and after["predictions"]:
        for i in range(min(setup.config.eval.report_examples, len(after["predictions"]))):
            example = {"subset": after["subsets"][i], "prompt": after["prompts"][i],
                       "expected": after["expected"][i], "after": after["predictions"][i]}
            if before and before["predictions"]:
                example["before"] = before["predictions"][i]
            examples.append(example)
    write_report(setup.run_dir / "report.html", title=f"tunesmith run {setup.config.name}",
                 metrics=metrics, before=summary["before"], after=summary["after"],
                 examples=examples, config_yaml=setup.config.to_yaml(), drops=setup.drops,
                 environment=summary["environment"],
                 timing={"train_seconds": summary["train_seconds"], "eval_seconds": summary["eval_seconds"],
                         "total_seconds": round(time.time() - started, 2), "device": str(setup.device),
                         "steps": state.step, "tokens": state.tokens})
    if summary["after"]:
        print(format_before_after(summary["before"], summary["after"]))
    print(f"run dir: {setup.run_dir}  ({output.name}/, report.html, metrics.jsonl)")
    return summary
