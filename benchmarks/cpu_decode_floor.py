"""Where mixed-adapter decoding stands on the CPU: the engine's decode steps with 0, 4 and 8 adapters, paired, and
a synthetic loop that separates reading the adapters' weights from multiplying by them.

1. ``steps``: one engine per setting (the embedded model in fp32; rank-16 adapters over the seven linear
   layers, random B, assigned round-robin), a steady batch of ``--batch`` rows (70-token random prompts, no stop).
   Each round times ``--steps`` decode steps of the base, then of 4 adapters, then of 8, through the CPU row
   kernel and then through the masked stack; the medians over ``--rounds`` rounds, and the medians of the
   per-round ratios (the machine's speed drifts between rounds).
2. ``synthetic``: the model's 30 layers of seven products (its shapes, distinct weights, so each is read from
   memory) for one decode step of ``--batch`` rows: the base products alone; with the masked adapter stack (what
   ``peft/multi.py`` runs, 4 or 8 adapters); and the base products plus only reading every adapter stack once
   (a sum, no product). When reading costs what the masked products cost, the products run at the speed of
   reading their weights.

    .venv/bin/python benchmarks/cpu_decode_floor.py --rounds 12
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from cpu_generate import make_adapters
from tunesmith.engine import Engine, Request
from tunesmith.generate import SamplingConfig
from tunesmith.models.load import load
from tunesmith.peft.multi import AdapterSlots

SHAPES = [(576, 576), (576, 192), (576, 192), (576, 576), (576, 1536), (576, 1536), (1536, 576)]  # q k v o gate up down


def steady_engine(adapters: dict[str, Path], batch: int, kernel: bool = True) -> Engine:
    model = load("default", dtype="fp32", device="cpu").model
    names = sorted(adapters)
    slots = AdapterSlots(model, adapters) if names else None
    if slots is not None and not kernel:  # the masked stack, as without the row kernel
        slots.row_kernel = lambda: False
    engine = Engine(model, pad_id=0, max_batch=batch, adapters=slots)
    prompts = torch.randint(100, 40000, (batch, 70), generator=torch.Generator().manual_seed(0)).tolist()
    for i, prompt in enumerate(prompts):
        engine.submit(Request(prompt, sampling=SamplingConfig(max_new_tokens=10 ** 6),
                              adapter=names[i % len(names)] if names else None))
    engine.step()  # the prefill
    engine.step()
    return engine


def paired_steps(batch: int, steps: int, rounds: int) -> dict:
    """Base, then 4 and 8 adapters through the row kernel (``peft/row_kernel.py``) and through the masked stack."""
    settings = {"base": (0, True), "4 kernel": (4, True), "8 kernel": (8, True), "4 masked": (4, False),
                "8 masked": (8, False)}
    with tempfile.TemporaryDirectory() as tmp:
        paths = make_adapters(8, Path(tmp))
        engines = {name: steady_engine({f"a{i}": paths[f"a{i}"] for i in range(count)}, batch, kernel)
                   for name, (count, kernel) in settings.items()}
    times: dict[str, list[float]] = {name: [] for name in engines}
    for _ in range(rounds):
        for name, engine in engines.items():
            start = time.perf_counter()
            for _ in range(steps):
                engine.step()
            times[name].append((time.perf_counter() - start) / steps * 1e3)
    medians = {name: statistics.median(values) for name, values in times.items()}
    return {"run": "decode steps", "batch": batch, "ms_per_step": {k: round(v, 1) for k, v in medians.items()},
            **{f"{name} vs base": round(statistics.median([b / a for a, b in zip(times[name], times["base"])]), 3)
               for name in engines if name != "base"}}


def synthetic(batch: int, adapters: int, rank: int = 16, layers: int = 30, repeats: int = 8) -> dict:
    columns = adapters * rank
    weights = [[torch.randn(d_out, d_in) for d_in, d_out in SHAPES] for _ in range(layers)]
    stacks = [[(torch.randn(columns, d_in) * 0.01, torch.randn(d_out, columns) * 0.01) for d_in, d_out in SHAPES]
              for _ in range(layers)]
    inputs = {576: torch.randn(batch, 576), 1536: torch.randn(batch, 1536)}
    slots = torch.arange(batch) % adapters
    mask = (slots[:, None] == torch.arange(adapters).repeat_interleave(rank)[None, :]).float()

    def base():
        for layer in weights:
            for w in layer:
                inputs[w.shape[1]] @ w.T

    def masked():
        for layer, stack in zip(weights, stacks):
            for w, (a, b) in zip(layer, stack):
                x = inputs[w.shape[1]]
                (x @ w.T).addmm_((x @ a.T) * mask, b.T)

    def read_only():
        for layer, stack in zip(weights, stacks):
            for w, (a, b) in zip(layer, stack):
                inputs[w.shape[1]] @ w.T
                a.sum(), b.sum()

    def timed(run) -> float:
        run()
        start = time.perf_counter()
        for _ in range(repeats):
            run()
        return round((time.perf_counter() - start) / repeats * 1e3, 1)

    return {"run": "synthetic step", "batch": batch, "adapters": adapters,
            "adapter_mb": round(layers * sum(columns * (i + o) for i, o in SHAPES) * 4 / 1e6),
            "ms": {"base": timed(base), "masked stack": timed(masked), "base + reading the stacks": timed(read_only)}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=12)
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    print(json.dumps(paired_steps(args.batch, args.steps, args.rounds)), flush=True)
    for adapters in (4, 8):
        print(json.dumps(synthetic(args.batch, adapters)), flush=True)


if __name__ == "__main__":
    main()
