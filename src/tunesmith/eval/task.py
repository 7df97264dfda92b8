"""Task metrics on any held-out data with an expected answer: generate greedily and score the answers.

Every row that has a natural expected answer can be scored: a conversation (``messages``, ShareGPT,
alpaca, prompt/completion as message lists) by its last assistant turn, answered from the conversation
before it rendered with the generation prompt through the model's template; a plain prompt/completion
row by its completion, answered from the prompt as training sees it (no template). Preference pairs and
plain text have no single expected answer and are refused.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tunesmith.data.formats import normalise
from tunesmith.data.sources import load_rows
from tunesmith.engine import Engine, Request
from tunesmith.errors import TunesmithError
from tunesmith.eval.score import expected_json, score_answers, score_settled
from tunesmith.generate import SamplingConfig
from tunesmith.templates import render_prompt, stop_token_ids


@dataclass
class AnswerRow:
    """One held-out row scored by generation."""

    row: int  # its number in the source (a line of a JSONL/CSV file)
    prompt: list[dict] | str  # the messages before the expected answer, or a plain prompt string
    expected: str
    subset: str | None = None  # the row's "subset" key: its rates are also reported on their own

    @property
    def shown_prompt(self) -> str:
        """What a person reads as the question: the last message before the answer, or the plain prompt."""
        return self.prompt if isinstance(self.prompt, str) else str(self.prompt[-1].get("content") or "")


@dataclass
class TaskResult:
    metrics: dict  # see tunesmith.eval.score.score_answers
    rows: list[AnswerRow]
    predictions: list[str]
    reused: int = 0
    """Rows whose greedy answer came from the loss pass, not generated again (``evaluate.agreed_answers``)."""
    prefilled: int = 0
    """Rows generated from keys and values the loss pass kept (``eval/prompt_keys.py``), their prompts not run
    again."""
    settled: int = 0
    """Answers ended once their score could no longer change (``evaluate_task``'s ``settled``)."""


def answer_rows(source: str, *, fmt: str | None = None, invalid_rows: str = "error",
                limit: int | None = None) -> list[AnswerRow]:
    """The first ``limit`` rows of ``source`` with their expected answers (refused when it has none)."""
    rows, name = load_rows(source)
    normalised = normalise(rows, fmt, policy=invalid_rows, name=name)
    if normalised.format in ("preference", "text"):
        what = "preference pairs (prompt/chosen/rejected)" if normalised.format == "preference" else "plain text"
        raise TunesmithError(f"{name} holds {what}: no row has one expected answer to score generated answers "
                             "against; --generate (eval.generate) needs rows with an answer: messages, "
                             "prompt/completion or alpaca")
    by_number = dict(zip(getattr(rows, "numbers", range(1, len(rows) + 1)), rows))
    unit = normalised.unit
    out = []
    for example in normalised.examples[:limit]:
        subset = by_number[example.row].get("subset")
        if subset is not None and (not isinstance(subset, str) or not subset):
            raise TunesmithError(f"{name}: {unit} {example.row}: \"subset\" must be a non-empty string naming the "
                                 f"row's group, not {subset!r}")
        if example.kind == "completion":
            out.append(AnswerRow(example.row, example.prompt, example.completion, subset))
            continue
        last = max((i for i, m in enumerate(example.messages) if m["role"] == "assistant"), default=None)
        answer = example.messages[last].get("content") if last is not None else None
        if not isinstance(answer, str) or last == 0:
            raise TunesmithError(f"{name}: {unit} {example.row}: the last assistant turn has no text answer after "
                                 "a prompt to score generation against; end each row with a text answer, or "
                                 "drop the row")
        out.append(AnswerRow(example.row, example.messages[:last], answer, subset))
    return out


def answer_prompts(tokenizer, rows: list[AnswerRow], reasoning: str | None = None) -> list[list[int]]:
    """Each row's prompt as the model continues it: messages rendered with the generation prompt through the
    template, a plain prompt tokenized as training sees it."""
    return [render_prompt(tokenizer, row.prompt, reasoning=reasoning) if isinstance(row.prompt, list)
            else tokenizer(row.prompt, add_special_tokens=True)["input_ids"] for row in rows]


def evaluate_task(model, tokenizer, rows: list[AnswerRow], *, batch_size: int = 16, max_new_tokens: int = 48,
                  reasoning: str | None = None, prompts: list[list[int]] | None = None,
                  known: dict[int, tuple[list[int], bool]] | None = None,
                  keys: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] | None = None,
                  settled: bool = False) -> TaskResult:
    """Greedy answers for ``rows``, scored with ``score_answers``. The model is used as given (put it in
    ``eval()`` mode first). ``prompts``: ``answer_prompts``' result, when already made; ``known``: by row, the
    start of its greedy answer already determined (token ids) and whether that is all of it: a complete answer
    is not generated, an incomplete one is continued from where it ends. ``keys``: by row, the keys and values of
    the leading tokens of its prompt and known start, computed before (``eval/prompt_keys.py``): only the rest
    runs. ``settled``: an answer ends as soon as no later token can change its score (``score_settled``; the
    prediction is the answer up to there), the metrics the same as with whole answers."""
    prompts = answer_prompts(tokenizer, rows, reasoning) if prompts is None else prompts
    known = known or {}
    answers = {i: tokens for i, (tokens, complete) in known.items() if complete}
    reused = len(answers)
    heads = {i: known[i][0] if i in known else [] for i in range(len(rows)) if i not in answers}
    checks = {i: _settles(tokenizer, heads[i], rows[i].expected) for i in heads} if settled else {}
    settled_rows = {i for i, check in checks.items() if check is not None and heads[i] and check([])}
    answers.update((i, heads.pop(i)) for i in settled_rows)
    # Similar lengths run together so left padding stays small; up to batch_size at once, continuously batched
    # (the next prompt joins as soon as an answer ends)
    engine = Engine(model, pad_id=tokenizer.pad_token_id, max_batch=batch_size)
    stop_ids = stop_token_ids(tokenizer)
    keys = {i: start for i, start in (keys or {}).items()
            if i in heads and start[0][0].shape[2] < len(prompts[i]) + len(heads[i])}
    requests = {}
    # rows that start from kept keys (one token each to run) first; the engine prefills them apart from whole prompts
    for i in sorted(keys) + sorted(set(heads) - set(keys), key=lambda i: len(prompts[i]) + len(heads[i])):
        requests[i] = engine.submit(Request(prompts[i] + heads[i], stop_ids=stop_ids, prefix_keys=keys.get(i),
                                            sampling=SamplingConfig(max_new_tokens=max_new_tokens - len(heads[i]),
                                                                    temperature=0.0), settled=checks.get(i)))
    engine.run()
    answers.update((i, heads[i] + request.tokens) for i, request in requests.items())
    settled_rows |= {i for i, request in requests.items() if request.finish_reason == "settled"}
    predictions = [tokenizer.decode(answers[i], skip_special_tokens=True).strip() for i in range(len(rows))]
    metrics = score_answers(predictions, [row.expected for row in rows], [row.subset for row in rows])
    return TaskResult(metrics=metrics, rows=rows, predictions=predictions,
                      reused=reused, prefilled=len(keys),
                      settled=len(settled_rows))


def _settles(tokenizer, head: list[int], expected: str):
    """The ``Request.settled`` check of an answer that starts with ``head``: its text so far settles its score
    (``score_settled``). None for a text answer whose tokenizer cleans up spaces when decoding (" ," becomes ","
    once the comma comes), where the text so far need not be the start of the final text."""
    if expected_json(expected) is None and getattr(tokenizer, "clean_up_tokenization_spaces", False):
        return None

    def check(tokens: list[int]) -> bool:
        text = tokenizer.decode(head + tokens, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        return score_settled(text, expected)

    return check
