"""Held-out loss and perplexity on any dataset, plus task metrics (scored greedy answers) on the built-in task
and, with ``eval.generate``, on any data with expected answers."""

from __future__ import annotations

import math

import torch

from tunesmith.data.batching import pad_collate
from tunesmith.config import RunConfig
from tunesmith.data.builtin import BUILTIN_NAME
from tunesmith.eval.task import AnswerRow, TaskResult, answer_rows, evaluate_task
from tunesmith.train.layout import resolve
from tunesmith.train.loss import autocast_for, supervised_loss_sum, trained_tokens

FLAT_EVAL_TOKENS = 1024


@torch.no_grad()
def heldout_loss(model, examples: list[dict], *, pad_id: int, batch_size: int = 16) -> dict:
    """Mean cross-entropy per trained token over ``examples`` and its exponential, the perplexity.

    Shortest first, ``batch_size`` rows a batch; where the batch runs as one flat sequence under a block mask
    (``flat``: SDPA on the CPU before training installs row attention), at most ``FLAT_EVAL_TOKENS`` tokens a
    batch too, since that attention grows with the square of the sequence (measured on the demo's 100 rows:
    21.5 s in batches of 64 rows, 13.4 s in batches of at most 1,024 tokens, the same loss; 2-core CPU)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]["input_ids"]))
    budget = FLAT_EVAL_TOKENS if resolve(model, "auto") == "flat" else None
    for batch in _batches(order, examples, batch_size, budget):
        batch = pad_collate([examples[i] for i in batch], pad_id)
        batch = {key: value.to(device) for key, value in batch.items()}
        with autocast_for(device, next(model.parameters()).dtype):
            total += float(supervised_loss_sum(model, batch))
        count += trained_tokens(batch)
    model.train(was_training)
    loss = total / max(count, 1)
    return {"eval_loss": loss, "perplexity": math.exp(min(loss, 50.0)), "eval_tokens": count}


def _batches(order: list[int], examples: list[dict], rows: int, tokens: int | None):
    batch, size = [], 0
    for i in order:
        length = len(examples[i]["input_ids"])
        if batch and (len(batch) == rows or tokens is not None and size + length > tokens):
            yield batch
            batch, size = [], 0
        batch.append(i)
        size += length
    if batch:
        yield batch


def builtin_task_source(source: str | None) -> str | None:
    """The built-in task split whose rows a built-in eval source is scored on (``builtin-preference:test``
    has the same prompts as ``builtin:test``); None for any other source."""
    kind, _, split = (source or "").partition(":")
    if kind in (BUILTIN_NAME, f"{BUILTIN_NAME}-preference"):
        return f"{BUILTIN_NAME}:{split}" if split else BUILTIN_NAME
    return None


def generation_rows(config: RunConfig) -> list[AnswerRow] | None:
    """The held-out rows whose greedy answers are scored: up to ``eval.task_rows`` of the built-in task when
    ``data.eval`` is built-in (``builtin-preference:test`` has the prompts of ``builtin:test``), or of
    ``data.eval`` itself with ``eval.generate``; None when nothing is generated."""
    source, cfg = config.data.eval, config.eval
    if source is None or not cfg.task_rows:
        return None
    builtin = builtin_task_source(source)
    if builtin is not None:
        return answer_rows(builtin, limit=cfg.task_rows)
    if cfg.generate:
        return answer_rows(source, fmt=config.data.format, invalid_rows=config.data.invalid_rows,
                           limit=cfg.task_rows)
    return None


def task_metrics(result: TaskResult) -> dict:
    """The task rates that join the held-out metrics (the row counts stay in the task result)."""
    return {key: value for key, value in result.metrics.items() if key != "n" and not key.startswith("n_")}


def evaluate(model, tokenizer, *, examples: list[dict], rows: list[AnswerRow] | None, batch_size: int = 16,
             max_new_tokens: int = 48, reasoning: str | None = None) -> tuple[dict, TaskResult | None]:
    """Loss metrics on ``examples``; with ``rows``, the task metrics of greedy answers too."""
    metrics = heldout_loss(model, examples, pad_id=tokenizer.pad_token_id, batch_size=batch_size)
    task = None
    if rows:
        was_training = model.training
        model.eval()
        task = evaluate_task(model, tokenizer, rows, batch_size=batch_size, max_new_tokens=max_new_tokens,
                             reasoning=reasoning)
        model.train(was_training)
        metrics.update(task_metrics(task))
    return metrics, task
