"""How much of a run's evaluation the loss pass answers: the held-out loss with greedy picks, the answers it
determines (``eval.evaluate.agreed_answers``), then generation of the rest, against generating every answer.
Prints one JSON line per repeat; the predictions of both ways must be identical.

    .venv/bin/python benchmarks/cpu_eval_answers.py runs/lora-YYYYMMDD-HHMMSS
"""

from __future__ import annotations

import argparse
import json
import time

from tunesmith.config import load_config
from tunesmith.data.pipeline import prepare
from tunesmith.data.tokenize import TokenizeOptions
from tunesmith.eval.evaluate import agreed_answers, heldout_loss
from tunesmith.eval.task import answer_prompts, answer_rows, evaluate_task
from tunesmith.models.build import build_model
from tunesmith.templates import stop_token_ids


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    config = load_config(f"{args.run_dir}/config.yaml")
    loaded = build_model(config.model, adapter=f"{args.run_dir}/adapter")
    model, tokenizer = loaded.model.eval(), loaded.tokenizer
    examples = prepare(config.data.eval, tokenizer, TokenizeOptions.from_config(config.data)).examples
    rows = answer_rows("builtin:test", limit=config.eval.task_rows)
    size, budget = config.eval.batch_size, config.eval.max_new_tokens
    for _ in range(args.repeats):
        picks: dict = {}
        start = time.perf_counter()
        heldout_loss(model, examples, pad_id=tokenizer.pad_token_id, batch_size=size, picks=picks)
        loss_seconds = time.perf_counter() - start
        prompts = answer_prompts(tokenizer, rows)
        known = agreed_answers(prompts, examples, picks, stop_token_ids(tokenizer), budget)
        start = time.perf_counter()
        rest = evaluate_task(model, tokenizer, rows, batch_size=size, max_new_tokens=budget, prompts=prompts,
                             known=known)
        rest_seconds = time.perf_counter() - start
        start = time.perf_counter()
        every = evaluate_task(model, tokenizer, rows, batch_size=size, max_new_tokens=budget)
        every_seconds = time.perf_counter() - start
        print(json.dumps({"loss_pass_s": round(loss_seconds, 1), "answers_whole_from_pass": rest.reused,
                          "generating_the_rest_s": round(rest_seconds, 1),
                          "generating_every_answer_s": round(every_seconds, 1),
                          "same_predictions": rest.predictions == every.predictions}), flush=True)


if __name__ == "__main__":
    main()
