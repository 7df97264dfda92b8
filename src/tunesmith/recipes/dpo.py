"""Preference tuning (DPO, IPO, SimPO), top to bottom: setup → reference → evaluate before → train → save →
evaluate after.

Same data pipeline, loop, checkpoints, exact resume, metrics and report as ``recipes/sft.py`` (the engine,
``tunesmith.train.engine``); the losses and the log-prob helpers are in ``tunesmith.train.preference``. The
reference model π_ref is never a second copy of the weights: it is the same model with its LoRA adapters off (``dpo.reference=adapters_disabled``), or the
starting policy's log-probs, computed once before training and cached in the run dir as
``reference_logps.safetensors`` (``precomputed``: full fine-tuning, and runs that continue an SFT
adapter). A resumed run reads the cache; it never recomputes it from weights that have already moved.

From an SFT run's adapter (``dpo.init_adapter``) the run either continues training that adapter, or stacks a
new one over it: the SFT adapter is folded into the frozen base weights (W + s·B·A), so the adapters-off
model is the SFT model, and the saved ``adapter/`` holds both as one PEFT adapter for the original base.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from tunesmith.config import RunConfig
from tunesmith.data.batching import gather_examples
from tunesmith.errors import TunesmithError
from tunesmith.eval.evaluate import task_metrics
from tunesmith.eval.task import evaluate_task
from tunesmith.peft import adapters_disabled, load_adapter, lora_modules
from tunesmith.peft.io import CONFIG_NAME, KEY_PREFIX, WEIGHTS_NAME, adapter_metadata, stable_safetensors
from tunesmith.recipes.finish import finish_run, save_eval
from tunesmith.recipes.run_dir import hold_run_dir
from tunesmith.recipes.setup import RunSetup, prepare_run
from tunesmith.train.dist import barrier, current
from tunesmith.train.engine import Objective, train
from tunesmith.train.objectives import MicroBatch, PreferenceLoss
from tunesmith.train.preference import (collate_pairs, completion_logps, load_reference, pair_logps,
                                        preference_metrics, save_reference)

REFERENCE_FILE = "reference_logps.safetensors"


def reference_kind(config: RunConfig) -> str:
    """``none`` (SimPO), ``adapters_disabled`` or ``precomputed``; ``auto`` picks adapters_disabled only when
    the adapters-off model is the starting policy (LoRA/QLoRA from the base model)."""
    dpo = config.dpo
    if dpo.loss == "simpo":
        return "none"
    if dpo.reference != "auto":
        return dpo.reference
    starts_from_base = not dpo.init_adapter or dpo.init_mode == "stack"  # adapters off = the starting policy
    return "adapters_disabled" if config.method.uses_adapter and starts_from_base else "precomputed"


def _init_adapter_dir(source: str) -> Path:
    path = Path(source)
    for candidate in (path / "adapter", path):
        if (candidate / "adapter_config.json").is_file():
            return candidate
    raise TunesmithError(f"dpo.init_adapter {source} is neither an SFT run dir (with adapter/) nor an adapter dir "
                         "(with adapter_config.json)")


def _check_options(config: RunConfig) -> None:
    """Refuse settings this recipe cannot honour before anything is loaded or written."""
    dpo, method = config.dpo, config.method
    if method.objective != "dpo":
        raise TunesmithError("the DPO recipe needs method.objective=dpo")
    if config.data.batching == "pack":
        raise TunesmithError("data.batching=pack is not supported for method.objective=dpo (chosen and rejected are "
                             "scored as rows of one padded batch); use data.batching=pad or bucket")
    kind = reference_kind(config)
    if kind == "adapters_disabled" and not method.uses_adapter:
        raise TunesmithError("dpo.reference=adapters_disabled needs method.name lora or qlora; full fine-tuning "
                             "uses dpo.reference=precomputed")
    if dpo.init_adapter is None:
        return
    if not method.uses_adapter:
        raise TunesmithError("dpo.init_adapter needs method.name lora or qlora; to start full fine-tuning from an "
                             "SFT run, set model.source to that run's model/ dir")
    saved = json.loads((_init_adapter_dir(dpo.init_adapter) / CONFIG_NAME).read_text())
    if saved.get("rank_pattern") or saved.get("alpha_pattern"):
        raise TunesmithError(f"the adapter in {dpo.init_adapter} has per-module ranks or alphas, which "
                             "dpo.init_adapter does not support")
    if dpo.init_mode == "stack":
        if method.name == "qlora":
            raise TunesmithError("dpo.init_mode=stack with method.name=qlora would quantize the SFT adapter into the "
                                 "4-bit base; use dpo.init_mode=continue, or method.name=lora")
        return
    if kind == "adapters_disabled":
        raise TunesmithError("dpo.reference=adapters_disabled with dpo.init_adapter would make the base model the "
                             "reference, not the SFT model the run starts from; use dpo.reference=precomputed, "
                             "or dpo.init_mode=stack")
    wanted = {"r": config.lora.r, "lora_alpha": config.lora.alpha, "use_rslora": config.lora.use_rslora}
    if any(saved.get(key, False) != value for key, value in wanted.items()):
        raise TunesmithError(f"the adapter in {dpo.init_adapter} has r={saved.get('r')}, "
                             f"alpha={saved.get('lora_alpha')}, use_rslora={saved.get('use_rslora', False)}; "
                             "set lora.r, lora.alpha and lora.use_rslora to match, so the run continues it")


def _fold_sft_adapter(adapter_dir: Path):
    """Stack: ``W ← W + s·B·A`` for every layer of the SFT adapter, then the plain layers back in place, so the
    frozen base the new adapter trains over (and the adapters-off reference) is the SFT model."""
    def fold(model) -> None:
        load_adapter(model, adapter_dir)
        for name, module in lora_modules(model).items():
            module.merge()
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, module.base_layer)

    return fold


def _stacked_adapter_writer(setup: RunSetup, model, sft_dir: Path):
    """Stack: write SFT + DPO adapters as one PEFT adapter for the original base.

    s₁·B₁A₁ + s₂·B₂A₂ = [s₁B₁ | s₂B₂] · [A₁ ; A₂], a LoRA of rank r₁ + r₂ with scale 1 (alpha = rank); a layer
    that only one of the two adapts gets zero blocks for the other.
    """
    def write(out: Path) -> None:
        sft_config = json.loads((sft_dir / CONFIG_NAME).read_text())
        sft = load_file(str(sft_dir / WEIGHTS_NAME))
        r1, r2 = sft_config["r"], setup.config.lora.r
        s1 = sft_config["lora_alpha"] / (math.sqrt(r1) if sft_config.get("use_rslora") else r1)
        new = lora_modules(model)
        names = sorted({key[len(KEY_PREFIX):-len(".lora_A.weight")] for key in sft if key.endswith(".lora_A.weight")}
                       | set(new))
        tensors = {}
        for name in names:
            layer = model.get_submodule(name)
            d_in, d_out = layer.in_features, layer.out_features
            a_key, b_key = f"{KEY_PREFIX}{name}.lora_A.weight", f"{KEY_PREFIX}{name}.lora_B.weight"
            if a_key in sft:
                a1, b1 = sft[a_key].float(), sft[b_key].float() * s1
            else:
                a1, b1 = torch.zeros(r1, d_in), torch.zeros(d_out, r1)
            if name in new:
                a2 = new[name].lora_A.weight.detach().float().cpu()
                b2 = new[name].lora_B.weight.detach().float().cpu() * new[name].scaling
            else:
                a2, b2 = torch.zeros(r2, d_in), torch.zeros(d_out, r2)
            tensors[a_key] = torch.cat([a1, a2]).contiguous()
            tensors[b_key] = torch.cat([b1, b2], dim=1).contiguous()
        config = {**sft_config, "r": r1 + r2, "lora_alpha": r1 + r2, "use_rslora": False, "rank_pattern": {},
                  "alpha_pattern": {}, "target_modules": names,
                  "base_model_name_or_path": setup.config.model.source}
        out.mkdir(parents=True, exist_ok=True)
        (out / WEIGHTS_NAME).write_bytes(stable_safetensors(tensors, adapter_metadata(model)))
        (out / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")

    return write


def _precompute_reference(setup: RunSetup) -> dict:
    """The starting policy's log-probs on the train (and held-out) pairs, written once to the run dir."""
    started = time.time()
    pad_id, batch_size = setup.tokenizer.pad_token_id, setup.config.eval.batch_size
    logps = {"train": pair_logps(setup.model, setup.train.examples, pad_id=pad_id, batch_size=batch_size)}
    if setup.eval is not None:
        logps["eval"] = pair_logps(setup.model, setup.eval.examples, pad_id=pad_id, batch_size=batch_size)
    save_reference(setup.run_dir / REFERENCE_FILE, logps, fingerprint=setup.fingerprints["data"])
    print(f"reference log-probs of {len(setup.train.examples)} training pairs computed in "
          f"{time.time() - started:.1f} s and cached in {setup.run_dir / REFERENCE_FILE}")
    return logps


def _training_reference(kind: str, model, cache: dict | None):
    """``reference(batch, micro, layout) -> (chosen, rejected)`` log-probs for training batches (``micro``: the
    engine's micro-batch, whose example indices and host copy are read; ``layout``: the run's); None for SimPO."""
    if kind == "none":
        return None
    if kind == "precomputed":
        def cached(batch, micro, layout):
            device, indices = batch["input_ids"].device, micro.indices
            return cache["train"]["chosen"][indices].to(device), cache["train"]["rejected"][indices].to(device)

        return cached

    def base_model(batch, micro, layout):
        with torch.no_grad(), adapters_disabled(model):
            sums, _ = completion_logps(model, batch, layout=layout, host=micro.batch)
        pairs = len(micro.indices)
        return sums[:pairs], sums[pairs:]

    return base_model


def evaluate_preferences(setup: RunSetup, model, phase: str | None, cache: dict | None, *,
                         task: bool = True) -> dict:
    """Held-out preference metrics of ``model`` (``preference_metrics``) and, for the built-in data, the task
    metrics (exact match of greedy answers); ``phase`` "before"/"after" also saves them as JSON."""
    config = setup.config
    pad_id, batch_size = setup.tokenizer.pad_token_id, config.eval.batch_size
    policy = pair_logps(model, setup.eval.examples, pad_id=pad_id, batch_size=batch_size)
    reference, kind = None, reference_kind(config)
    if kind == "adapters_disabled":
        with adapters_disabled(model):
            reference = pair_logps(model, setup.eval.examples, pad_id=pad_id, batch_size=batch_size)
    elif kind == "precomputed":
        reference = cache.get("eval")
        if reference is None or len(reference["chosen"]) != len(policy["chosen"]):
            cached = 0 if reference is None else len(reference["chosen"])
            raise TunesmithError(f"the cached reference covers {cached} held-out pairs but the run now has "
                                 f"{len(policy['chosen'])}; keep data.eval and eval.loss_rows as they were")
    metrics = preference_metrics(policy, reference, config.dpo)
    result = None
    if task and setup.eval_rows:
        was_training = model.training
        model.eval()
        result = evaluate_task(model, setup.tokenizer, setup.eval_rows, batch_size=batch_size,
                               max_new_tokens=config.eval.max_new_tokens, reasoning=config.data.reasoning,
                               settled=config.eval.stop_settled)
        model.train(was_training)
        metrics.update(task_metrics(result))
    if phase is not None:
        save_eval(setup, phase, metrics, result)
    return metrics


def run(config: RunConfig, *, resume: bool = False, on_micro_batch=None) -> dict | None:
    """Preference-tune according to ``config``; returns the final summary (also written to the run dir), or
    None on a rank other than 0 of a several-process run.

    ``on_micro_batch(step, micro_index)`` is called before every micro-batch (tests stop runs with it).
    """
    started = time.time()
    # --- setup: options and data first, so a bad config or dataset is refused before the model loads
    _check_options(config)
    init = config.dpo.init_adapter
    stack = _init_adapter_dir(init) if init and config.dpo.init_mode == "stack" else None
    continued = _init_adapter_dir(init) if init and config.dpo.init_mode == "continue" else None
    setup = prepare_run(config, resume=resume, adjust_model=_fold_sft_adapter(stack) if stack else None,
                        adapter=continued)
    with hold_run_dir(setup):
        objective = preference_objective(setup)
        result = train(setup.train_input(objective, on_micro_batch=on_micro_batch))
        if not current().main:
            return None
        return finish_run(setup, result, started, evaluate=lambda phase: objective.evaluate(result.model, phase),
                          write_adapter=_stacked_adapter_writer(setup, result.model, stack) if stack else None)


def preference_objective(setup: RunSetup) -> Objective:
    """The reference first — the starting policy, as cached log-probs (computed now, or read back on resume)
    or as the model with its adapters off — then the loss, batches and evaluation that use it."""
    config, examples, init = setup.config, setup.train.examples, setup.config.dpo.init_adapter
    kind = reference_kind(config)
    start = f", {config.dpo.init_mode} {init}" if init else ""
    print(f"dpo: loss {config.dpo.loss}, beta {config.dpo.beta}, reference {kind}{start}")
    cache = None
    if kind == "precomputed":
        path = setup.run_dir / REFERENCE_FILE
        # several processes: rank 0 computes and writes the cache, the others read it back
        fresh = not setup.resume and current().main
        cache = _precompute_reference(setup) if fresh else None
        barrier()
        if cache is None:
            cache = load_reference(path, fingerprint=setup.fingerprints["data"])
    pad_id = setup.tokenizer.pad_token_id

    def evaluate(model, phase: str | None, *, task: bool = True) -> dict:
        return evaluate_preferences(setup, model, phase, cache, task=task)

    return Objective(loss=PreferenceLoss(config.dpo, _training_reference(kind, setup.model, cache)),
                     lengths=[len(ex["chosen"]["input_ids"]) + len(ex["rejected"]["input_ids"]) for ex in examples],
                     collate=lambda batch: MicroBatch(collate_pairs(gather_examples(examples, batch), pad_id), batch),
                     evaluate=evaluate if setup.eval is not None else None,
                     eval_log={"eval_loss": "eval_loss", "eval_preference_accuracy": "preference_accuracy"})
