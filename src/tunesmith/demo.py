"""``make demo``: the product's default job end to end on the embedded model and the built-in task.

Shows the data and the loss mask, then runs the default recipe (LoRA SFT, before/after evaluation,
report) and prints a few held-out examples from the base and the tuned model. Half the held-out rows name
a person and a city that no training row holds; their exact match is what shows the model learned to copy
names rather than memorise them.
"""

from __future__ import annotations

import json
import time

from tunesmith.config import load_config
from tunesmith.data.builtin import builtin_task
from tunesmith.data.pipeline import format_inspection, inspection, prepare
from tunesmith.data.tokenize import TokenizeOptions
from tunesmith.mask_view import mask_view
from tunesmith.models.build import build_tokenizer
from tunesmith.templates import render


def run_demo(overrides: list[str] = (), examples: int = 3, *, trust_remote_code: bool = False) -> dict:
    from tunesmith.recipes.sft import run

    started = time.time()
    config = load_config(None, list(overrides), trust_remote_code=trust_remote_code).with_run_name()
    print("== the built-in task: extract a booking from a sentence into fixed JSON")
    tokenizer = build_tokenizer(config.model)  # the run's own tokenizer and template
    prepared = prepare(config.data.train, tokenizer, TokenizeOptions.from_config(config.data))
    print(format_inspection(inspection(prepared)))
    print("\n== one training example; only the highlighted tokens are trained")
    (first,) = render(tokenizer, builtin_task("train", 1)[0]["messages"])
    print(mask_view(first, color=True))
    print(f"\n== training: LoRA r={config.lora.r} on {config.model.source}, evaluating before and after")
    summary = run(config)
    before = json.loads((config.run_dir / "eval_before.json").read_text()) if summary["before"] else None
    after = json.loads((config.run_dir / "eval_after.json").read_text())
    shown = min(examples, len(after["predictions"]))
    print(f"\n== {shown} held-out examples")
    for i in range(shown):
        subset = after["subsets"][i]
        print(f"  sentence : {after['prompts'][i]}" + (f"   [{subset} name and city]" if subset else ""))
        print(f"  expected : {after['expected'][i]}")
        if before:
            print(f"  base     : {before['predictions'][i]}")
        print(f"  tuned    : {after['predictions'][i]}\n")
    metrics = summary["after"]
    if "exact_match_unseen" in metrics:
        print(f"exact match {metrics['exact_match']:.0%} on {len(after['subsets'])} held-out rows, "
              f"{metrics['exact_match_unseen']:.0%} on the {after['subsets'].count('unseen')} whose name and city "
              "no training row holds")
    print(f"training {summary['train_seconds']:.0f} s, whole demo {time.time() - started:.0f} s; "
          f"open {config.run_dir / 'report.html'} for curves and examples")
    return summary
