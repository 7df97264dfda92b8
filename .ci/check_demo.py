"""CI's check of `make demo`: read the run it wrote and fail if the tuned model got worse than a floor.

Exact match is recomputed here from the run's own files (``eval_after.json``: every held-out row's expected
answer and the tuned model's prediction), with plain ``json`` and no tunesmith code, so a regression in
training, generation or scoring cannot hide behind the product's own number; that number must agree.
The floors sit well below what the demo scores (88–94% overall, 86–92% on unseen names over the default
seeds, README): they catch a broken demo, not noise.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

FLOOR = {"all": 0.75, "unseen": 0.70}
ROWS = 100  # the demo's held-out rows (eval.task_rows); fewer means the evaluation itself shrank


def same(prediction: str, expected: str) -> bool:
    try:
        return json.loads(prediction.strip()) == json.loads(expected)
    except json.JSONDecodeError:
        return False


def main(runs: Path) -> int:
    done = sorted((p for p in runs.glob("*/eval_after.json")), key=lambda p: p.stat().st_mtime)
    if not done:
        print(f"check_demo: no run under {runs} has eval_after.json: the demo did not finish")
        return 1
    run = done[-1].parent
    after = json.loads((run / "eval_after.json").read_text())
    hits = [same(p, e) for p, e in zip(after["predictions"], after["expected"], strict=True)]
    rates = {"all": sum(hits) / len(hits)}
    unseen = [hit for hit, subset in zip(hits, after["subsets"], strict=True) if subset == "unseen"]
    rates["unseen"] = sum(unseen) / max(len(unseen), 1)
    reported = json.loads((run / "summary.json").read_text())["after"]
    print(f"check_demo: {run}: {len(hits)} held-out rows, exact match {rates['all']:.0%} "
          f"({len(unseen)} unseen: {rates['unseen']:.0%}); tunesmith reported {reported['exact_match']:.0%} / "
          f"{reported['exact_match_unseen']:.0%}")
    problems = [f"{len(hits)} held-out rows, expected {ROWS}"] if len(hits) != ROWS else []
    problems += [f"exact match ({name}) {rates[name]:.0%} < floor {floor:.0%}" for name, floor in FLOOR.items()
                 if rates[name] < floor]
    if abs(reported["exact_match"] - rates["all"]) > 1e-9:
        problems.append("tunesmith's own exact match disagrees with the recomputed one")
    for problem in problems:
        print(f"check_demo: FAIL: {problem}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1] if len(sys.argv) > 1 else "runs")))
