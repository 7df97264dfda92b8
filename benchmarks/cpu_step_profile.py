"""Where a CPU training step of the default run spends its time (BENCHMARKS.md, "three times the rows").

Three readings: the top operators of an 8-step default run under ``torch.profiler``; the rate of plain
matrix products of the embedded model's shapes (a 480-token micro-batch through the attention and MLP
projections, and a 256-position chunk of the output head); the fused head and loss
(``train/head.py``) at several chunk sizes, forward and backward over 266 trained positions.

    .venv/bin/python benchmarks/cpu_step_profile.py
"""

from __future__ import annotations

import tempfile
import time

import torch
from torch.profiler import ProfilerActivity, profile

from tunesmith.config import load_config
from tunesmith.recipes.sft import run
from tunesmith.train.head import linear_cross_entropy

SHAPES = [(480, 576, 576), (480, 576, 1536), (480, 1536, 576), (256, 576, 49152)]


def seconds(fn, reps: int) -> float:
    for _ in range(2):
        fn()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - start) / reps


def main() -> None:
    with tempfile.TemporaryDirectory() as out:
        config = load_config(None, ["data.sample_rows=64", "data.eval=null", "eval.before=false",
                                    "train.progress=false", f"output_dir={out}"]).with_run_name()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            run(config)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))
    for m, k, n in SHAPES:
        a, b = torch.randn(m, k), torch.randn(k, n)
        print(f"a @ b, {m}×{k} @ {k}×{n}: {2 * m * k * n / seconds(lambda: a @ b, 30) / 1e9:.0f} GFLOP/s")
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(49152, 576, generator=generator) * 0.02
    hidden = torch.randn(266, 576, generator=generator, requires_grad=True)
    targets = torch.randint(0, 49152, (266,), generator=generator)
    for chunk in (256, 128, 64, 32):
        step = seconds(lambda: linear_cross_entropy(hidden, weight, targets, chunk=chunk).backward(), 8)
        print(f"head and loss, chunks of {chunk}: {step * 1000:.0f} ms")


if __name__ == "__main__":
    main()
