"""Held-out loss and perplexity on any dataset, plus task metrics when the data is the built-in task."""

from __future__ import annotations

import math

import torch

from tunesmith.data.batching import pad_collate
from tunesmith.data.builtin import BUILTIN_NAME
from tunesmith.eval.task import TaskResult, evaluate_task
from tunesmith.train.loop import autocast_for, supervised_loss_sum, trained_tokens


@torch.no_grad()
def heldout_loss(model, examples: list[dict], *, pad_id: int, batch_size: int = 16) -> dict:
    """Mean cross-entropy per trained token over ``examples`` and its exponential, the perplexity."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]["input_ids"]))
    for start in range(0, len(order), batch_size):
        batch = pad_collate([examples[i] for i in order[start:start + batch_size]], pad_id)
        batch = {key: value.to(device) for key, value in batch.items()}
        with autocast_for(device, next(model.parameters()).dtype):
            total += float(supervised_loss_sum(model, batch))
        count += trained_tokens(batch)
    model.train(was_training)
    loss = total / max(count, 1)
    return {"eval_loss": loss, "perplexity": math.exp(min(loss, 50.0)), "eval_tokens": count}


def builtin_task_source(source: str | None) -> str | None:
    """The built-in task split whose rows a built-in eval source is scored on (``builtin-preference:test``
    has the same prompts as ``builtin:test``); None for any other source."""
    kind, _, split = (source or "").partition(":")
    if kind in (BUILTIN_NAME, f"{BUILTIN_NAME}-preference"):
        return f"{BUILTIN_NAME}:{split}" if split else BUILTIN_NAME
    return None


def evaluate(model, tokenizer, *, examples: list[dict], rows: list[dict] | None, batch_size: int = 16,
             max_new_tokens: int = 48, reasoning: str | None = None) -> tuple[dict, TaskResult | None]:
    """Loss metrics on ``examples``; with ``rows`` of the built-in task, its task metrics too."""
    metrics = heldout_loss(model, examples, pad_id=tokenizer.pad_token_id, batch_size=batch_size)
    task = None
    if rows:
        was_training = model.training
        model.eval()
        task = evaluate_task(model, tokenizer, rows, batch_size=batch_size, max_new_tokens=max_new_tokens,
                             reasoning=reasoning)
        model.train(was_training)
        metrics.update({k: task.metrics[k] for k in ("valid_json_rate", "exact_match", "fields")})
    return metrics, task
