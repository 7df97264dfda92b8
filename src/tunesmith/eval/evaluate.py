"""Held-out loss and perplexity on any dataset, plus task metrics (scored greedy answers) on the built-in task
and, with ``eval.generate``, on any data with expected answers."""

from __future__ import annotations

import contextlib
import math

import torch

from tunesmith.data.batching import pad_collate
from tunesmith.config import RunConfig
from tunesmith.data.builtin import BUILTIN_NAME
from tunesmith.eval.prompt_keys import KeptKeys, recording
from tunesmith.eval.task import AnswerRow, TaskResult, answer_prompts, answer_rows, evaluate_task
from tunesmith.templates import IGNORE_INDEX, stop_token_ids
from tunesmith.train.flat import FLAT_MAX_TOKENS, MIN_SHARED_PREFIX
from tunesmith.train.layout import resolve, rows_for_evaluation
from tunesmith.train.loss import autocast_for, head_loss, trained_hidden, trained_tokens

FLAT_EVAL_TOKENS = 1024


@torch.no_grad()
def heldout_loss(model, examples: list[dict], *, pad_id: int, batch_size: int = 16,
                 picks: dict[int, list[int]] | None = None, keys: KeptKeys | None = None) -> dict:
    """Mean cross-entropy per trained token over ``examples`` and its exponential, the perplexity. ``picks``,
    when given, receives for each example (by index) the greedy token at each of its trained positions, in
    order: the argmax of the logits the loss is computed from. ``keys`` (with ``picks``): keys and values of
    the examples' first tokens kept for generation (``eval/prompt_keys.py``).

    Shortest first, ``batch_size`` rows a batch. A CPU model with plain SDPA runs with row attention for the
    call (``train.layout.rows_for_evaluation``), as training would lay it out. Where a batch still runs as one
    flat sequence under a block mask (``flat``: eager attention on the CPU), at most ``FLAT_EVAL_TOKENS``
    tokens a batch too, since that attention grows with the square of the sequence (measured on the demo's 100
    rows: 21.5 s in batches of 64 rows, 13.4 s in batches of at most 1,024 tokens, the same loss; 2-core
    CPU). Row attention's batches hold at most ``FLAT_MAX_TOKENS`` tokens past their shared start, the most that
    runs as one flat row (more would run padded, with the start's keys repeated: the demo's rows at batch 128,
    13.2-15.3 s against 10.6-11.3 s; ``benchmarks/cpu_demo_probes.py heldout-batch``)."""
    was_training = model.training
    model.eval()
    longest = max((len(example["input_ids"]) for example in examples), default=1)
    with rows_for_evaluation(model, longest):
        total, count = _loss_sum(model, examples, pad_id, batch_size, picks, keys)
    model.train(was_training)
    loss = total / max(count, 1)
    return {"eval_loss": loss, "perplexity": math.exp(min(loss, 50.0)), "eval_tokens": count}


def _loss_sum(model, examples: list[dict], pad_id: int, batch_size: int, picks: dict | None,
              keys: KeptKeys | None = None) -> tuple[float, int]:
    device = next(model.parameters()).device
    total, count = 0.0, 0
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]["input_ids"]))
    layout = resolve(model, "auto")
    budget = {"flat": FLAT_EVAL_TOKENS, "rows": FLAT_MAX_TOKENS}.get(layout)
    keeping = keys is not None and picks is not None and layout in ("rows", "flat")  # where keys map back to rows
    with recording(model) if keeping else contextlib.nullcontext() as record:
        for batch_rows in _batches(order, examples, batch_size, budget, shared=layout == "rows"):
            host = pad_collate([examples[i] for i in batch_rows], pad_id)
            batch = {key: value.to(device) for key, value in host.items()}
            with autocast_for(device, next(model.parameters()).dtype):
                hidden, targets, keep = trained_hidden(model, batch)
                chosen = None if picks is None else torch.empty_like(targets)
                total += float(head_loss(model, hidden, targets, picks=chosen))
            if picks is not None:
                for i, part in zip(batch_rows, chosen.cpu().split(keep.sum(dim=1).tolist())):
                    picks[i] = part.tolist()
            if record is not None:
                keys.take(record, host, batch_rows, picks)
                record.clear()
            count += trained_tokens(batch)
    return total, count


def _batches(order: list[int], examples: list[dict], rows: int, tokens: int | None, shared: bool = False):
    """Up to ``rows`` examples a batch, in ``order``, and up to ``tokens`` tokens; ``shared``: the start all rows
    share (up to the first trained position, as ``train.flat.shared_prefix_length`` takes it) counted once."""
    batch: list[int] = []
    lengths: list[int] = []
    for i in order:
        ids = examples[i]["input_ids"]
        start = _untrained_start(examples[i]) if shared else 0
        if batch:
            joined = min(common, start, _common_start(first, ids))
            if len(batch) == rows or tokens is not None and _flat_tokens(lengths + [len(ids)], joined) > tokens:
                yield batch
                batch, lengths = [], []
        if batch:
            common = joined
        else:
            first, common = ids, start
        batch.append(i)
        lengths.append(len(ids))
    if batch:
        yield batch


def _flat_tokens(lengths: list[int], common: int) -> int:
    """Tokens of rows laid out as one flat row, a start of ``common`` tokens they share computed once."""
    return sum(lengths) - (common * (len(lengths) - 1) if common >= MIN_SHARED_PREFIX else 0)


def _common_start(a: list[int], b: list[int]) -> int:
    return next((t for t, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def _untrained_start(example: dict) -> int:
    """Tokens before the input of the example's first trained position (a shared start stops there)."""
    labels = example["labels"]
    return next((t - 1 for t, label in enumerate(labels) if label != IGNORE_INDEX), len(labels))


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
             max_new_tokens: int = 48, reasoning: str | None = None, settled: bool = False
             ) -> tuple[dict, TaskResult | None]:
    """Loss metrics on ``examples``; with ``rows``, the task metrics of greedy answers too.

    The loss pass computes the logits at every trained position of each example anyway; where an example is a
    row's prompt followed by its expected answer, the greedy tokens there give the start of the row's greedy
    answer, often all of it (``agreed_answers``). Only what they leave open is generated, by the engine, from
    the keys and values the pass computed of the prompts (``eval/prompt_keys.py``; on the CPU only).
    ``settled``: ``evaluate_task``'s."""
    was_training = model.training
    model.eval()
    picks = {} if rows else None
    prompts = answer_prompts(tokenizer, rows, reasoning) if rows else []
    matches = prompt_examples(prompts, examples)
    asked = {index: row for row, index in reversed(matches.items())}  # an example's first prompt
    stop_ids = frozenset(stop_token_ids(tokenizer)) if rows else frozenset()

    def wanted(index: int, picked: list[int]) -> int:  # keys up to the answer's last known token's input
        row = asked.get(index)
        if row is None:
            return 0
        answer, complete = _walk(len(prompts[row]), examples[index], picked, stop_ids, max_new_tokens)
        return 0 if complete else len(prompts[row]) + len(answer) - 1

    keys = KeptKeys(wanted) if rows and keeps_keys(model) else None
    metrics = heldout_loss(model, examples, pad_id=tokenizer.pad_token_id, batch_size=batch_size, picks=picks,
                           keys=keys)
    task = None
    if rows:
        known = agreed_answers(prompts, examples, picks, stop_ids, max_new_tokens)
        kept = keys.kept if keys is not None else {}
        starts = {row: kept[index] for row, index in matches.items() if index in kept}
        task = evaluate_task(model, tokenizer, rows, batch_size=batch_size, max_new_tokens=max_new_tokens,
                             prompts=prompts, known=known, keys=starts, settled=settled)
        metrics.update(task_metrics(task))
    model.train(was_training)
    return metrics, task


def keeps_keys(model) -> bool:
    """Whether evaluation keeps the loss pass's keys for generation: on the CPU, where a prefill costs as much as
    the pass; not on a GPU, where prefill is cheap and memory is planned without them."""
    return next(model.parameters()).device.type == "cpu"


def agreed_answers(prompts: list[list[int]], examples: list[dict], picks: dict[int, list[int]],
                   stop_ids, max_new_tokens: int) -> dict[int, tuple[list[int], bool]]:
    """What the loss pass already determines of each prompt's greedy answer: ``(tokens, complete)`` by prompt
    index, for the prompts it determines anything of.

    An example whose tokens start with prompt p holds, at each trained position t after it, the greedy token g_t
    given the tokens before t. Walking t from the prompt's end: a stop token g_t ends the answer (complete);
    otherwise g_t is the answer's next token, and the walk goes on only while g_t equals the example's own
    token there (the next position then sees what generation would have fed it). It ends, incomplete, after a
    disagreement, at an untrained position or at the example's end, and complete at ``max_new_tokens``."""
    stop_ids = frozenset(stop_ids)
    known = {}
    for row, index in prompt_examples(prompts, examples).items():
        answer, complete = _walk(len(prompts[row]), examples[index], picks[index], stop_ids, max_new_tokens)
        if answer or complete:
            known[row] = (answer, complete)
    return known


def prompt_examples(prompts: list[list[int]], examples: list[dict]) -> dict[int, int]:
    """By prompt index, the first example whose tokens start with that prompt, for the prompts that have one."""
    starts: dict[tuple[int, ...], int] = {}
    lengths = {len(prompt) for prompt in prompts}
    for index in reversed(range(len(examples))):  # the first example of a prompt wins
        ids = examples[index]["input_ids"]
        for n in lengths:
            if n < len(ids):
                starts[(n, *ids[:n])] = index
    found = {}
    for row, prompt in enumerate(prompts):
        index = starts.get((len(prompt), *prompt))
        if index is not None:
            found[row] = index
    return found


def _walk(start: int, example: dict, picked: list[int], stop_ids: frozenset[int], limit: int
          ) -> tuple[list[int], bool]:
    ids, labels = example["input_ids"], example["labels"]
    greedy = dict(zip((t for t in range(1, len(ids)) if labels[t] != IGNORE_INDEX), picked))
    answer: list[int] = []
    for t in range(start, len(ids)):
        if t not in greedy:
            return answer, False
        token = greedy[t]
        if token in stop_ids:
            return answer, True
        answer.append(token)
        if len(answer) >= limit:
            return answer, True
        if token != ids[t]:
            return answer, False
    return answer, False
