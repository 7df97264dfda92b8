"""The built-in task's first N training rows as JSONL, for runs with more (or fewer) rows than the default 400.

BENCHMARKS.md records the runs ("the default recipe with three times the rows").

    python benchmarks/demo_variants/builtin_rows.py 1200 > train.jsonl
    tunesmith train data.train=train.jsonl seed=0
"""

from __future__ import annotations

import json
import sys

from tunesmith.data.builtin import builtin_task


def main(n: int) -> None:
    for row in builtin_task("train", n):
        print(json.dumps({"messages": row["messages"]}, ensure_ascii=False))


if __name__ == "__main__":
    main(int(sys.argv[1]))
