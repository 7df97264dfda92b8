"""Supervised fine-tuning (full or LoRA), top to bottom: setup → evaluate before → train → save → evaluate after.

The loop below is the whole training procedure; the helpers it calls (loss, accumulation, schedule,
checkpoints, metrics) live in ``tunesmith.train``. Resuming restores weights, optimizer, RNG and the
position in the data, so an interrupted run continues exactly as if it had never stopped.
"""

from __future__ import annotations

import contextlib
import time

import torch

from tunesmith.config import RunConfig
from tunesmith.data.batching import collate_for, gather_examples, plan_batches
from tunesmith.peft import adapter_parameters, adapters_disabled, freeze_base, inject_lora
from tunesmith.recipes.common import (Progress, RunSetup, check_bad_steps, evaluate_phase, finish_run,
                                      hold_run_dir, load_resume_state, prepare_run, save_training_checkpoint)
from tunesmith.train.loop import accumulate_and_step, compiled_layers, enable_gradient_checkpointing
from tunesmith.train.optim import build_optimizer
from tunesmith.train.metrics import MetricsLog
from tunesmith.train.schedule import lr_at, warmup_steps


def _trainable(setup: RunSetup) -> list[torch.nn.Parameter]:
    """LoRA: adapters only. Full: every parameter, optionally without the input embeddings."""
    config, model = setup.config, setup.model
    if config.method.uses_adapter:
        torch.manual_seed(config.seed)  # adapter init is part of the run's identity
        inject_lora(model, setup.lora_config)
        freeze_base(model)
        return list(adapter_parameters(model).values())
    for param in model.parameters():
        param.requires_grad_(True)
    if config.method.freeze_embeddings:
        model.get_input_embeddings().weight.requires_grad_(False)
    return [p for p in model.parameters() if p.requires_grad]


def run(config: RunConfig, *, resume: bool = False, on_micro_batch=None) -> dict:
    """Train according to ``config``; returns the final summary (also written to the run dir).

    ``on_micro_batch(step, micro_index)`` is called before every micro-batch (tests use it to stop a
    run at an exact point).
    """
    started = time.time()
    # --- setup: data first, so a dataset with nothing to train is refused before the model loads
    setup = prepare_run(config, resume=resume)
    with hold_run_dir(setup):
        return _train(setup, started, on_micro_batch)


def _train(setup: RunSetup, started: float, on_micro_batch) -> dict:
    """Evaluate before, train, save, evaluate after: the run from its claimed dir on."""
    config = setup.config
    params = _trainable(setup)
    model, device, tokenizer = setup.model, setup.device, setup.tokenizer
    if config.train.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    optimizer = build_optimizer(config.optim, params)
    examples = setup.train.examples
    lengths = [len(ex["input_ids"]) for ex in examples]
    budget = config.data.token_budget or config.data.max_length
    collate = collate_for(config.data.batching, pad_id=tokenizer.pad_token_id, token_budget=budget)

    def plan_for(epoch: int) -> list:
        return plan_batches(lengths, strategy=config.data.batching, batch_size=config.train.micro_batch_size,
                            token_budget=budget, seed=config.seed, epoch=epoch)

    steps_per_epoch = -(-len(plan_for(0)) // config.train.grad_accum)
    total_steps = config.train.max_steps or max(1, round(config.train.epochs * steps_per_epoch))
    warmup = warmup_steps(total_steps, config.schedule.warmup_steps, config.schedule.warmup_ratio)
    state = {"step": 0, "epoch": 0, "micro": 0, "bad_streak": 0, "skipped": 0, "tokens": 0,
             "train_seconds": 0.0, "total_steps": total_steps}

    # --- evaluate the untuned model (LoRA: the same model with adapters off)
    if setup.resume:
        state.update(load_resume_state(setup, model, optimizer))
    elif config.eval.before and setup.eval is not None:
        with adapters_disabled(model) if config.method.uses_adapter else contextlib.nullcontext():
            evaluate_phase(setup, "before")

    # --- train
    log = MetricsLog(setup.run_dir)
    model.train()
    plan = plan_for(state["epoch"])
    progress = Progress(config, total_steps, state["step"])
    window_start, window_tokens = time.time(), 0
    with compiled_layers(model, config.train.compile):
        try:
            while state["step"] < total_steps:
                if state["micro"] >= len(plan):
                    state["epoch"], state["micro"] = state["epoch"] + 1, 0
                    plan = plan_for(state["epoch"])
                step, chunk = state["step"], plan[state["micro"]: state["micro"] + config.train.grad_accum]
                first = state["micro"]
                hook = None if on_micro_batch is None else (lambda i: on_micro_batch(step, first + i))
                micro_examples = [gather_examples(examples, batch) for batch in chunk]
                lr = lr_at(step, base_lr=config.optim.lr, total_steps=total_steps, warmup=warmup,
                           kind=config.schedule.name, min_lr_ratio=config.schedule.min_lr_ratio)
                step_start = time.time()
                result = accumulate_and_step(model, optimizer, params, [collate(m) for m in micro_examples], lr=lr,
                                             max_grad_norm=config.optim.max_grad_norm, device=device,
                                             dtype=setup.dtype, on_micro_batch=hook)
                tokens = sum(len(ex["input_ids"]) for m in micro_examples for ex in _flat(m))
                state["train_seconds"] += time.time() - step_start
                state.update(step=step + 1, micro=state["micro"] + len(chunk), tokens=state["tokens"] + tokens)
                window_tokens += tokens
                if result.skipped:
                    state["skipped"] += 1
                    state["bad_streak"] += 1
                    check_bad_steps(config, state, result)
                else:
                    state["bad_streak"] = 0
                row = None
                if state["step"] % config.train.log_every == 0 or state["step"] == total_steps:
                    elapsed = max(time.time() - window_start, 1e-9)
                    row = {"step": state["step"], "epoch": state["epoch"], "loss": result.loss, "lr": lr,
                           "grad_norm": result.grad_norm, "tokens": state["tokens"],
                           "tokens_per_s": window_tokens / elapsed, "skipped": result.skipped}
                    if device.type == "cuda":
                        row["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
                    window_start, window_tokens = time.time(), 0
                if config.train.eval_every and state["step"] % config.train.eval_every == 0 and setup.eval is not None:
                    heldout = evaluate_phase(setup, None, task=False)
                    row = {**(row or {"step": state["step"]}), "eval_loss": heldout["eval_loss"],
                           "eval_perplexity": heldout["perplexity"]}
                    model.train()
                if row is not None:
                    log.log(row)
                    progress.update(row)
                if config.train.checkpoint_every and (state["step"] % config.train.checkpoint_every == 0
                                                      or state["step"] == total_steps):
                    save_training_checkpoint(setup, model, optimizer, state)
        finally:
            log.close()
            progress.close()

    # --- save the result, evaluate it, write the report
    model.eval()
    return finish_run(setup, state, started)


def _flat(batch: list) -> list[dict]:
    return [ex for item in batch for ex in (item if isinstance(item, list) else [item])]
