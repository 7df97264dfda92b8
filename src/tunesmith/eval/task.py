"""Task metrics for the built-in extraction task: generate greedily on held-out prompts and score them."""

from __future__ import annotations

from dataclasses import dataclass

from tunesmith.data.builtin import score_predictions
from tunesmith.generate import SamplingConfig, generate
from tunesmith.templates import render_prompt, stop_token_ids


@dataclass
class TaskResult:
    metrics: dict  # valid_json_rate, exact_match, fields, n
    prompts: list[str]  # the user message of each row
    predictions: list[str]
    expected: list[str]


def evaluate_task(model, tokenizer, rows: list[dict], *, batch_size: int = 16, max_new_tokens: int = 48,
                  reasoning: str | None = None) -> TaskResult:
    """Greedy answers for ``rows`` (``messages`` format; the last message is the expected answer)."""
    prompts = [render_prompt(tokenizer, row["messages"][:-1], reasoning=reasoning) for row in rows]
    # Similar lengths batch together so left padding stays small.
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    predictions: list[str] = [""] * len(rows)
    sampling = SamplingConfig(max_new_tokens=max_new_tokens, temperature=0.0)
    stops = stop_token_ids(tokenizer)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        outputs = generate(model, [prompts[i] for i in chunk], sampling=sampling, stop_ids=stops,
                           pad_id=tokenizer.pad_token_id)
        for i, ids in zip(chunk, outputs):
            predictions[i] = tokenizer.decode(ids, skip_special_tokens=True).strip()
    expected = [row["messages"][-1]["content"] for row in rows]
    return TaskResult(metrics=score_predictions(predictions, expected),
                      prompts=[row["messages"][-2]["content"] for row in rows],
                      predictions=predictions, expected=expected)
