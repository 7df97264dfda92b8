"""The default run with an id-level BPE dropout of the trained tokens (BENCHMARKS.md, "The default run's
accuracy on unseen names"): each trained token that the tokenizer built by a merge is replaced, with
probability P, by the two tokens it was merged from (again for each part), labels kept, so the answer is
trained in many spellings of the same text. It was tried so the model would learn to finish a name from any
split of it; it garbles names instead.

    python benchmarks/demo_variants/unmerge_run.py 0.1 [overrides...]    # e.g. seed=1

Prints the demo's after-training table and writes a run dir under runs/ like `tunesmith train`.
"""

from __future__ import annotations

import json
import random
import sys
import time

from tunesmith.config import load_config
from tunesmith.recipes.finish import finish_run
from tunesmith.recipes.run_dir import hold_run_dir
from tunesmith.recipes.setup import prepare_run
from tunesmith.recipes.sft import supervised_objective
from tunesmith.train.engine import train


def unmerger(tokenizer, probability: float, seed: int):
    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    vocab = backend["model"]["vocab"]
    parts = {}
    for merge in backend["model"]["merges"]:
        left, right = merge.split(" ") if isinstance(merge, str) else merge
        whole = vocab.get(left + right)
        if whole is not None and whole not in parts:
            parts[whole] = (vocab[left], vocab[right])
    rng = random.Random(f"unmerge:{seed}")

    def split(token: int) -> list[int]:
        if token in parts and rng.random() < probability:
            return split(parts[token][0]) + split(parts[token][1])
        return [token]

    def augment(example: dict) -> dict:
        ids, labels = [], []
        for token, label in zip(example["input_ids"], example["labels"]):
            pieces = split(token) if label != -100 else [token]
            ids += pieces
            labels += pieces if label != -100 else [label]
        return {**example, "input_ids": ids, "labels": labels}

    return augment


def main(probability: float, overrides: list[str]) -> None:
    started = time.time()
    config = load_config(None, ["eval.before=false", *overrides]).with_run_name()
    setup = prepare_run(config, resume=False)
    augment = unmerger(setup.tokenizer, probability, config.seed)
    setup.train.tokenized.examples = [augment(example) for example in setup.train.examples]
    with hold_run_dir(setup):
        objective = supervised_objective(setup)
        result = train(setup.train_input(objective))
        finish_run(setup, result, started, evaluate=lambda phase: objective.evaluate(result.model, phase))


if __name__ == "__main__":
    main(float(sys.argv[1]), sys.argv[2:])
