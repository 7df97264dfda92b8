"""What every recipe shares: the run dir, data and model setup, resume checks, evaluation phases, saving."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import torch
import yaml

from tunesmith.config import RunConfig
from tunesmith.data.builtin import BUILTIN_NAME
from tunesmith.data.pipeline import PreparedData, prepare
from tunesmith.data.tokenize import TokenizeOptions
from tunesmith.errors import TunesmithError
from tunesmith.eval.evaluate import evaluate, generation_rows
from tunesmith.eval.report import format_before_after, write_report
from tunesmith.eval.task import AnswerRow
from tunesmith.models import load, load_tokenizer, resolve_device, resolve_dtype
from tunesmith.models.load import resolve_path
from tunesmith.peft import LoRAConfig, adapter_parameters, save_adapter
from tunesmith.quant.bnb import QuantizedModel, QuantSpec, quantize_model
from tunesmith.templates import use_template
from tunesmith.train.checkpoint import (capture_rng, latest_checkpoint, load_checkpoint, os_error_of, restore_rng,
                                        save_checkpoint)
from tunesmith.train.metrics import read_metrics, truncate_metrics

# Config keys that define what a checkpoint's weights and data positions mean: changing any of them
# between a checkpoint and its resume would silently train something else.
IDENTITY_KEYS = ("model.source", "model.template", "method.name", "method.objective", "method.freeze_embeddings",
                 "lora.r", "lora.alpha", "lora.target_modules", "lora.use_rslora", "lora.dropout", "data.train",
                 "data.format", "data.split", "data.max_length", "data.overlength", "data.invalid_rows",
                 "data.train_on", "data.reasoning", "data.batching", "data.token_budget", "train.micro_batch_size",
                 "train.grad_accum", "seed", "quant.type", "quant.double_quant", "quant.blocksize",
                 "quant.skip_modules", "quant.storage", "optim.name", "dpo.loss", "dpo.reference",
                 "dpo.init_adapter", "dpo.init_mode")
LOCK_FILE = ".tunesmith.lock"
# Files only a run that got far enough writes: a dir holding none of them (and no checkpoint) is a failed start.
RESULT_FILES = ("adapter", "model", "summary.json")
# Write failures that are the disk's, not the program's: the run stops with one line, its checkpoints intact.
DISK_ERRNOS = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EROFS}


@dataclass
class RunSetup:
    config: RunConfig
    run_dir: Path
    tokenizer: object
    model: torch.nn.Module
    device: torch.device
    dtype: torch.dtype
    train: PreparedData
    eval: PreparedData | None
    eval_rows: list[AnswerRow] | None  # held-out rows whose greedy answers are scored (see generation_rows)
    fingerprints: dict
    resume: bool  # False also when a --resume found no checkpoint and starts the run over
    lock: IO  # the open lock file: the run dir is ours while it stays open (see hold_run_dir)
    drops: dict  # "train" / "eval" → PreparedData.drops()
    quantization: QuantizedModel | None = None

    @property
    def lora_config(self) -> LoRAConfig:
        lora = self.config.lora
        targets = lora.target_modules if isinstance(lora.target_modules, str) else tuple(lora.target_modules)
        return LoRAConfig(r=lora.r, alpha=lora.alpha, dropout=lora.dropout, target_modules=targets,
                          use_rslora=lora.use_rslora)


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def _model_fingerprint(source: str) -> str:
    path = Path(resolve_path(source))
    if not path.is_dir():
        return _digest(source)
    files = sorted(p for p in path.iterdir() if p.suffix in (".json", ".safetensors"))
    return _digest([(p.name, p.stat().st_size, p.read_text() if p.name == "config.json" else "") for p in files])


def _tokenize_options(config: RunConfig) -> TokenizeOptions:
    return TokenizeOptions.from_config(config.data)


def _lock_run_dir(run_dir: Path) -> IO:
    """An exclusive, non-blocking lock on ``run_dir``, held while the returned file stays open; the kernel drops
    it when the process dies, so a killed run never leaves the dir locked."""
    handle = open(run_dir / LOCK_FILE, "a")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise TunesmithError(f"run dir {run_dir} is in use by another tunesmith process (a run or a resume of it); "
                             "wait for that one to finish or stop it, then try again") from None
    return handle


def _failed_start(run_dir: Path) -> bool:
    """A run dir whose run stopped before its first checkpoint: nothing in it can be resumed or is a result."""
    return latest_checkpoint(run_dir) is None and not any((run_dir / name).exists() for name in RESULT_FILES)


def _clear_run_dir(run_dir: Path) -> None:
    for entry in run_dir.iterdir():
        if entry.name != LOCK_FILE:
            shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()


def _claim_run_dir(config: RunConfig, resume: bool) -> tuple[Path, IO, bool]:
    """Lock the run dir and write its config.yaml; returns (dir, lock, whether to resume from a checkpoint).

    A dir left by a run that stopped before its first checkpoint is cleared and the run starts over, both on
    ``--resume`` and when a new run takes the same name: there is nothing in it to keep."""
    run_dir = config.run_dir
    exists_hint = f"continue it with --resume {run_dir}, or choose another name with name=NEW_NAME"
    if resume and not (run_dir / "config.yaml").is_file():
        raise TunesmithError(f"{run_dir} is not a run dir (no config.yaml); nothing to resume")
    if run_dir.exists() and not run_dir.is_dir():
        raise TunesmithError(f"run dir {run_dir} is a file; choose another name with name=NEW_NAME")
    others = run_dir.is_dir() and any(p.name != LOCK_FILE for p in run_dir.iterdir())
    if not resume and others and not (run_dir / "config.yaml").is_file():
        raise TunesmithError(f"run dir {run_dir} already exists; {exists_hint}")  # not ours: leave no lock file
    created = not run_dir.exists()
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        lock = _lock_run_dir(run_dir)
    except OSError as exc:
        fix = "make it writable" if resume else "set output_dir to a writable directory"
        raise TunesmithError(f"cannot write in run dir {run_dir}: {exc.strerror}; {fix}") from None
    try:
        if resume and latest_checkpoint(run_dir) is not None:
            return run_dir, lock, True
        if any(p.name != LOCK_FILE for p in run_dir.iterdir()):
            if not _failed_start(run_dir):
                raise TunesmithError(f"{run_dir} holds a finished run without checkpoints (train.checkpoint_every "
                                     "was null); nothing to resume. Start a new run with name=NEW_NAME" if resume
                                     else f"run dir {run_dir} already exists; {exists_hint}")
            print(f"{run_dir} holds a run that stopped before its first checkpoint: starting it over from step 0"
                  + (" with its saved config" if resume else ""))
            _clear_run_dir(run_dir)
        _write_text(run_dir / "config.yaml", config.to_yaml())
    except BaseException:
        lock.close()
        if created:
            shutil.rmtree(run_dir, ignore_errors=True)
        raise
    return run_dir, lock, False


@contextlib.contextmanager
def hold_run_dir(setup: RunSetup):
    """The life of a run in its dir: the lock is released at the end, however the run ends, and a full or
    read-only disk stops it with one line that says its checkpoints are intact (a failed save removes its own
    partial files)."""
    try:
        yield
    except TunesmithError:
        raise
    except Exception as exc:
        error = os_error_of(exc)
        if error is None or error.errno not in DISK_ERRNOS:
            raise
        last = latest_checkpoint(setup.run_dir)
        intact = (f"the last checkpoint ({last.name}) is intact: free some space, then continue with "
                  f"tunesmith train --resume {setup.run_dir}" if last is not None else
                  f"no checkpoint was written yet: free some space, then start it over with tunesmith train "
                  f"--resume {setup.run_dir}")
        where = f" {error.filename}" if error.filename else f" into {setup.run_dir}"
        raise TunesmithError(f"cannot write{where}: {error.strerror} (the disk is full or read-only); "
                             f"{intact}") from None
    finally:
        setup.lock.close()


def report_drops(data: PreparedData) -> dict:
    """Print the rows ``data`` dropped, by reason with the first row (or line) numbers; return ``data.drops()``."""
    drops = data.drops()
    if drops["count"]:
        reasons = ", ".join(f"{d['count']} × {reason}" for reason, d in drops["by_reason"].items())
        print(f"{data.name}: {drops['count']} of {data.rows} rows dropped ({reasons})")
        for reason, d in drops["by_reason"].items():
            more = ", …" if d["count"] > len(d["first"]) else ""
            unit = drops["unit"] + ("s" if d["count"] > 1 else "")
            print(f"  {reason}: {unit} {', '.join(map(str, d['first']))}{more}")
    return drops


def _check_objective(config: RunConfig, data: PreparedData) -> None:
    """Preference pairs train with DPO and only with DPO; say which setting fixes a mismatch."""
    pairs = data.normalised.format == "preference"
    if config.method.objective == "dpo" and not pairs:
        raise TunesmithError(f"method.objective=dpo needs preference data (prompt/chosen/rejected columns), but "
                             f"{data.name} is in {data.normalised.format} format; the built-in pairs are "
                             f"data.train={BUILTIN_NAME}-preference data.eval={BUILTIN_NAME}-preference:test")
    if config.method.objective == "sft" and pairs:
        raise TunesmithError(f"{data.name} holds preference pairs (prompt/chosen/rejected); train on them with "
                             "method.objective=dpo")


def _example_key(example: dict) -> tuple:
    if "chosen" in example:
        return (_example_key(example["chosen"]), _example_key(example["rejected"]))
    return (example["input_ids"], example["labels"])


def prepare_run(config: RunConfig, *, resume: bool, adjust_model=None) -> RunSetup:
    """Tokenizer, data (refused early when nothing is trained, or when its kind does not fit the objective),
    then the model, then the run dir (locked: run the rest inside ``hold_run_dir(setup)``); ``adjust_model(model)``
    may change the dense weights before a QLoRA base is quantized."""
    tokenizer = load_tokenizer(config.model.source, trust_remote_code=config.model.trust_remote_code)
    use_template(tokenizer, config.model.template)
    options = _tokenize_options(config)
    train = prepare(config.data.train, tokenizer, options, fmt=config.data.format,
                    invalid_rows=config.data.invalid_rows, split=config.data.split,
                    sample=config.data.sample_rows, seed=config.seed)
    _check_objective(config, train)
    if config.data.batching == "pack" and config.data.token_budget:
        train.check_token_budget(config.data.token_budget)
    heldout, rows = None, None
    if config.data.eval:
        heldout = prepare(config.data.eval, tokenizer, options, fmt=config.data.format,
                          invalid_rows=config.data.invalid_rows)
        _check_objective(config, heldout)
        if config.eval.loss_rows is not None:
            heldout.tokenized.examples = heldout.tokenized.examples[:config.eval.loss_rows]
        rows = generation_rows(config)
    drops = {"train": report_drops(train), "eval": report_drops(heldout) if heldout is not None else None}
    device = resolve_device(config.model.device)
    qlora = config.method.name == "qlora"
    loaded = load(config.model.source, dtype=config.model.dtype, device="cpu" if qlora else config.model.device,
                  trust_remote_code=config.model.trust_remote_code)
    if adjust_model is not None:
        adjust_model(loaded.model)
    quantization = quantize_base(config, loaded.model, device) if qlora else None
    fingerprints = {"data": _digest([_example_key(ex) for ex in train.examples]),
                    "model": _model_fingerprint(config.model.source)}
    # Only now, with the data and the model known to be good, does the run take its dir (release: hold_run_dir)
    run_dir, lock, resume = _claim_run_dir(config, resume)
    return RunSetup(config=config, run_dir=run_dir, tokenizer=tokenizer, model=loaded.model, device=device,
                    dtype=resolve_dtype(config.model.dtype, device), train=train, eval=heldout, eval_rows=rows,
                    fingerprints=fingerprints, resume=resume, lock=lock, drops=drops, quantization=quantization)


def quant_spec(config: RunConfig, device: torch.device) -> QuantSpec:
    quant = config.quant
    compute = quant.compute_dtype
    if compute == "auto":
        compute_dtype = resolve_dtype("auto", device) if device.type == "cuda" else torch.float32
        if device.type == "cuda" and compute_dtype == torch.float32:
            compute_dtype = torch.float16
    else:
        compute_dtype = resolve_dtype(compute, device)
    return QuantSpec(quant_type=quant.type, double_quant=quant.double_quant, compute_dtype=compute_dtype,
                     storage=quant.storage, blocksize=quant.blocksize, skip_modules=list(quant.skip_modules))


def quantize_base(config: RunConfig, model: torch.nn.Module, device: torch.device) -> QuantizedModel:
    """QLoRA: the frozen base in 4 bits on ``device``; prints what was quantized and what was kept."""
    quantized = quantize_model(model, quant_spec(config, device), device)
    print(f"{config.quant.type}{' + double quantization' if config.quant.double_quant else ''}: "
          f"{quantized.summary()}")
    return quantized


def _lookup(tree: dict, dotted: str):
    for key in dotted.split("."):
        tree = tree.get(key) if isinstance(tree, dict) else None
    return tree


def check_resumable(saved_yaml: str, saved_fingerprints: dict, setup: RunSetup) -> None:
    """Refuse to resume when the model, adapter shape or data differ from the checkpoint's."""
    saved, current = yaml.safe_load(saved_yaml), setup.config.model_dump(mode="json")
    changes = [f"{key} changed from {_lookup(saved, key)!r} to {_lookup(current, key)!r}"
               for key in IDENTITY_KEYS if _lookup(saved, key) != _lookup(current, key)]
    for what, fingerprint in setup.fingerprints.items():
        if saved_fingerprints.get(what) != fingerprint:
            name = setup.config.data.train if what == "data" else setup.config.model.source
            changes.append(f"the {what} ({name}) changed on disk since the checkpoint")
    if changes:
        raise TunesmithError(f"cannot resume {setup.run_dir}: " + "; ".join(changes)
                             + ". Start a new run for different settings")


def load_resume_state(setup: RunSetup, model, optimizer) -> dict:
    path = latest_checkpoint(setup.run_dir)
    if path is None:
        raise TunesmithError(f"{setup.run_dir} has no complete checkpoint to resume from")
    ckpt = load_checkpoint(path)
    check_resumable(ckpt.config_yaml, ckpt.state.get("fingerprints", {}), setup)
    expected = set(_trainable_weights(setup, model))
    if set(ckpt.weights) != expected:
        missing, unexpected = sorted(expected - set(ckpt.weights)), sorted(set(ckpt.weights) - expected)
        raise TunesmithError(f"checkpoint {path} does not match the model: missing {missing[:4]}, "
                             f"unexpected {unexpected[:4]}")
    with torch.no_grad():
        params = dict(model.named_parameters())
        for name, value in ckpt.weights.items():
            params[name].copy_(value)
    optimizer.load_state_dict(ckpt.optimizer)
    restore_rng(ckpt.rng)
    truncate_metrics(setup.run_dir, ckpt.step)
    print(f"resuming {setup.run_dir} from {path.name}")
    return {k: v for k, v in ckpt.state.items() if k != "fingerprints"}


def _trainable_weights(setup: RunSetup, model) -> dict[str, torch.Tensor]:
    if setup.config.method.uses_adapter:
        return {name: p.detach() for name, p in adapter_parameters(model).items()}
    return {name: p.detach() for name, p in model.named_parameters()}


def save_training_checkpoint(setup: RunSetup, model, optimizer, state: dict) -> Path:
    def write_adapter(tmp: Path) -> None:
        if setup.config.method.uses_adapter:
            save_adapter(model, setup.lora_config, tmp / "adapter",
                         base_model_name_or_path=setup.config.model.source)

    return save_checkpoint(setup.run_dir, state["step"], weights=_trainable_weights(setup, model),
                           optimizer=optimizer.state_dict(), state={**state, "fingerprints": setup.fingerprints},
                           rng=capture_rng(), config_yaml=setup.config.to_yaml(),
                           keep=setup.config.train.keep_checkpoints, write_extra=write_adapter)


def evaluate_phase(setup: RunSetup, phase: str | None, *, task: bool = True) -> dict:
    """Held-out metrics (and task metrics); ``phase`` "before"/"after" also saves them as JSON."""
    cfg = setup.config.eval
    metrics, result = evaluate(setup.model, setup.tokenizer, examples=setup.eval.examples,
                               rows=setup.eval_rows if task else None, batch_size=cfg.batch_size,
                               max_new_tokens=cfg.max_new_tokens, reasoning=setup.config.data.reasoning)
    if phase is not None:
        save_eval(setup, phase, metrics, result)
    return metrics


def save_eval(setup: RunSetup, phase: str, metrics: dict, result) -> None:
    """``eval_<phase>.json``: the metrics and, when answers were scored (``result``), each row's prompt (its
    last message), expected answer, prediction, subset and row number, as parallel lists."""
    rows = result.rows if result else []
    payload = {"metrics": metrics, "predictions": result.predictions if result else [],
               "prompts": [row.shown_prompt for row in rows], "expected": [row.expected for row in rows],
               "subsets": [row.subset for row in rows], "rows": [row.row for row in rows]}
    _write_json(setup.run_dir / f"eval_{phase}.json", payload)


def _write_text(path: Path, text: str) -> None:
    """Write ``path`` whole or not at all: a temp file beside it, then a rename."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _write_json(path: Path, obj) -> None:
    _write_text(path, json.dumps(obj, indent=1))


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


def save_result(setup: RunSetup, *, write_adapter=None) -> Path:
    """``adapter/`` (PEFT format) for LoRA, ``model/`` (plain HF dir) for full fine-tuning; with the tokenizer.

    ``write_adapter(dir)`` replaces the plain adapter save (a recipe whose adapter file is not the model's)."""
    config, model, tokenizer = setup.config, setup.model, setup.tokenizer
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


def finish_run(setup: RunSetup, state: dict, started: float, *, evaluate_after=evaluate_phase,
               write_adapter=None) -> dict:
    """Save the result, evaluate it, write ``summary.json`` and ``report.html``, print before/after.

    ``evaluate_after(setup, "after")`` writes ``eval_after.json`` (recipes with their own held-out metrics
    pass theirs); ``write_adapter`` goes to ``save_result``."""
    output = save_result(setup, write_adapter=write_adapter)
    before_path = setup.run_dir / "eval_before.json"
    before = json.loads(before_path.read_text()) if before_path.exists() else None
    after = None
    eval_start = time.time()
    if setup.eval is not None:
        evaluate_after(setup, "after")
        after = json.loads((setup.run_dir / "eval_after.json").read_text())
    summary = {"run_dir": str(setup.run_dir), "output": str(output), "method": setup.config.method.name,
               "quantization": setup.quantization.summary() if setup.quantization else None, "steps": state["step"],
               "skipped_steps": state["skipped"], "tokens": state["tokens"],
               "train_seconds": round(state["train_seconds"], 2), "eval_seconds": round(time.time() - eval_start, 2),
               "before": before["metrics"] if before else None, "after": after["metrics"] if after else None,
               "dropped": setup.drops}
    _write_json(setup.run_dir / "summary.json", summary)
    examples = []
    if after and after["predictions"]:
        for i in range(min(setup.config.eval.report_examples, len(after["predictions"]))):
            example = {"subset": after["subsets"][i], "prompt": after["prompts"][i],
                       "expected": after["expected"][i], "after": after["predictions"][i]}
            if before and before["predictions"]:
                example["before"] = before["predictions"][i]
            examples.append(example)
    write_report(setup.run_dir / "report.html", title=f"tunesmith run {setup.config.name}",
                 metrics=read_metrics(setup.run_dir), before=summary["before"], after=summary["after"],
                 examples=examples, config_yaml=setup.config.to_yaml(), drops=setup.drops,
                 timing={"train_seconds": summary["train_seconds"], "eval_seconds": summary["eval_seconds"],
                         "total_seconds": round(time.time() - started, 2), "device": str(setup.device),
                         "steps": state["step"], "tokens": state["tokens"]})
    if summary["after"]:
        print(format_before_after(summary["before"], summary["after"]))
    print(f"run dir: {setup.run_dir}  ({output.name}/, report.html, metrics.jsonl)")
    return summary


def check_bad_steps(config: RunConfig, state: dict, result) -> None:
    """After a skipped (non-finite) step: stop under ``train.nonfinite=abort`` or after too many in a row."""
    if config.train.nonfinite == "abort" or state["bad_streak"] >= config.train.max_bad_steps:
        why = ("train.nonfinite=abort" if config.train.nonfinite == "abort"
               else f"{state['bad_streak']} non-finite steps in a row (train.max_bad_steps)")
        raise TunesmithError(f"step {state['step']}: non-finite loss or gradient (loss {result.loss}, grad norm "
                             f"{result.grad_norm}); stopping because of {why}. The last checkpoint is intact: "
                             "lower optim.lr or check the data, then resume with --resume")


class Progress:
    """A tqdm bar with loss, learning rate, tokens/s; tqdm shows the ETA."""

    def __init__(self, config: RunConfig, total: int, initial: int):
        self.bar = None
        if config.train.progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True)
        self.last = initial

    def update(self, row: dict) -> None:
        if self.bar is None:
            return
        self.bar.update(row["step"] - self.last)
        self.last = row["step"]
        if "loss" in row:
            self.bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}",
                                 tok_s=f"{row['tokens_per_s']:.0f}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
