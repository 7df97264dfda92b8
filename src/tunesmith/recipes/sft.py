"""Supervised fine-tuning (full or LoRA), top to bottom: setup → evaluate before → train → save → evaluate after.

What is SFT's own is the objective: next-token cross-entropy over the trained tokens (``SupervisedLoss``), the
examples padded, bucketed or packed, and held-out loss, perplexity and task metrics. The loop, checkpoints and
exact resume are the engine's (``tunesmith.train.engine``), shared with preference tuning.
"""

from __future__ import annotations

import contextlib
import time

from tunesmith.config import RunConfig
from tunesmith.data.batching import collate_for, gather_examples
from tunesmith.eval.evaluate import evaluate
from tunesmith.peft import adapters_disabled
from tunesmith.recipes.finish import finish_run, save_eval
from tunesmith.recipes.run_dir import hold_run_dir
from tunesmith.recipes.setup import RunSetup, prepare_run
from tunesmith.train.dist import current
from tunesmith.train.engine import Objective, train
from tunesmith.train.objectives import MicroBatch, SupervisedLoss


def run(config: RunConfig, *, resume: bool = False, on_micro_batch=None) -> dict | None:
    """Train according to ``config``; returns the final summary (also written to the run dir), or None on a
    rank other than 0 of a several-process run (rank 0 alone saves, evaluates and reports).

    ``on_micro_batch(step, micro_index)`` is called before every micro-batch (tests use it to stop a
    run at an exact point).
    """
    started = time.time()
    # --- setup: data first, so a dataset with nothing to train is refused before the model loads
    setup = prepare_run(config, resume=resume)
    with hold_run_dir(setup):
        objective = supervised_objective(setup)
        result = train(setup.train_input(objective, on_micro_batch=on_micro_batch))
        if not current().main:
            return None
        return finish_run(setup, result, started, evaluate=lambda phase: objective.evaluate(result.model, phase))


def supervised_objective(setup: RunSetup) -> Objective:
    config, examples = setup.config, setup.train.examples
    budget = config.data.token_budget or config.data.max_length
    collate = collate_for(config.data.batching, pad_id=setup.tokenizer.pad_token_id, token_budget=budget)

    def evaluate(model, phase: str | None, *, task: bool = True) -> dict:
        return evaluate_phase(setup, model, phase, task=task)

    return Objective(loss=SupervisedLoss(), lengths=[len(ex["input_ids"]) for ex in examples],
                     collate=lambda batch: MicroBatch(collate(gather_examples(examples, batch)), batch),
                     evaluate=evaluate if setup.eval is not None else None,
                     eval_log={"eval_loss": "eval_loss", "eval_perplexity": "perplexity"}, token_budget=budget)


def evaluate_phase(setup: RunSetup, model, phase: str | None, *, task: bool = True) -> dict:
    """Held-out metrics (and task metrics) of ``model``; ``phase`` "before"/"after" also saves them as JSON.
    Before training, a LoRA run is evaluated with its adapters off: the untuned model."""
    cfg = setup.config.eval
    untuned = phase == "before" and setup.config.method.uses_adapter
    with adapters_disabled(model) if untuned else contextlib.nullcontext():
        metrics, result = evaluate(model, setup.tokenizer, examples=setup.eval.examples,
                                   rows=setup.eval_rows if task else None, batch_size=cfg.batch_size,
                                   max_new_tokens=cfg.max_new_tokens, reasoning=setup.config.data.reasoning,
                                   settled=cfg.stop_settled)
    if phase is not None:
        save_eval(setup, phase, metrics, result)
    return metrics
