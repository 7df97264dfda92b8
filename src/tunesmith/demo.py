"""``make demo``: the product's default job on the embedded model and the built-in task."""

from __future__ import annotations

import time

from tunesmith.data.builtin import builtin_task
from tunesmith.data.pipeline import format_inspection, inspection, prepare
from tunesmith.data.tokenize import TokenizeOptions
from tunesmith.eval.task import evaluate_task
from tunesmith.models import load
from tunesmith.templates import mask_view, render


def run_demo(n_eval: int = 40) -> dict:
    started = time.time()
    print("== loading the embedded model (SmolLM2-135M-Instruct; first use converts its GGUF once)")
    loaded = load("default")
    tokenizer = loaded.tokenizer
    print("\n== the built-in training set")
    prepared = prepare("builtin", tokenizer, TokenizeOptions(max_length=256))
    print(format_inspection(inspection(prepared)))
    print("\n== one training example; the trained tokens are highlighted")
    (first,) = render(tokenizer, builtin_task("train", 1)[0]["messages"])
    print(mask_view(first, color=True))
    print(f"\n== the untuned model on {n_eval} held-out examples")
    result = evaluate_task(loaded.model, tokenizer, builtin_task("test", n_eval))
    for prompt, predicted, expected in list(zip(result.prompts, result.predictions, result.expected))[:5]:
        print(f"  sentence : {prompt}\n  expected : {expected}\n  model    : {predicted!r}\n")
    metrics = result.metrics
    print(f"valid JSON {metrics['valid_json_rate']:.0%}  exact match {metrics['exact_match']:.0%}  "
          f"per field {', '.join(f'{k} {v:.0%}' for k, v in metrics['fields'].items())}")
    print(f"\ndone in {time.time() - started:.0f} s")
    return metrics
