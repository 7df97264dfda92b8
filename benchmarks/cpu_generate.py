"""Generation throughput on the CPU, embedded model: the engine's continuous batching against fixed chunks run to
completion (what ``generate`` did before the engine), and mixed-adapter traffic against the base alone.

Prompts: the built-in task's held-out rows rendered with the model's template, greedy, up to 48 new tokens
(the demo's evaluation). Adapters: rank 16 over every linear layer with random B (so each changes the answers),
assigned round-robin. Prints one JSON line per run: generated tokens, seconds, tokens/s. Each adapter setting runs
``--rounds`` times, each time right after a run of the base alone: its ratio to the base is the median of the
rounds' ratios, so that a machine whose speed drifts between settings does not decide it.

    .venv/bin/python benchmarks/cpu_generate.py --rows 64 --adapters 1,4,8 --rounds 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from tunesmith.data.builtin import builtin_task
from tunesmith.engine import generate
from tunesmith.generate import SamplingConfig
from tunesmith.models.load import load
from tunesmith.peft.io import save_adapter
from tunesmith.peft.lora import LoRAConfig, inject_lora, lora_modules
from tunesmith.peft.multi import AdapterSlots
from tunesmith.templates import render_prompt, stop_token_ids


def make_adapters(count: int, out: Path, model_source: str = "default") -> dict[str, Path]:
    """``count`` rank-16 adapters over every linear layer of ``model_source``, each with its own seeded random
    A and B (the model is loaded once)."""
    model = load(model_source, dtype="fp32", device="cpu").model
    config = LoRAConfig(r=16, alpha=32, target_modules="all-linear")
    inject_lora(model, config)
    paths = {}
    for i in range(count):
        torch.manual_seed(i)
        for module in lora_modules(model).values():
            torch.nn.init.kaiming_uniform_(module.lora_A.weight, a=5 ** 0.5)
            torch.nn.init.normal_(module.lora_B.weight, std=0.01)
        paths[f"a{i}"] = save_adapter(model, config, out / f"a{i}", base_model_name_or_path=model_source)
    return paths


def timed(name: str, run) -> dict:
    start = time.perf_counter()
    outputs = run()
    seconds = time.perf_counter() - start
    tokens = sum(len(o) for o in outputs)
    row = {"run": name, "generated_tokens": tokens, "seconds": round(seconds, 2),
           "tokens_per_s": round(tokens / seconds, 1)}
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--adapters", default="1,4,8")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    loaded = load("default", dtype="fp32", device="cpu")
    model, tokenizer = loaded.model, loaded.tokenizer
    rows = builtin_task("test", args.rows)
    prompts = sorted((render_prompt(tokenizer, row["messages"][:-1]) for row in rows), key=len)
    common = dict(sampling=SamplingConfig(max_new_tokens=48), stop_ids=stop_token_ids(tokenizer),
                  pad_id=tokenizer.pad_token_id)

    def chunked():
        out = []
        for start in range(0, len(prompts), args.batch):
            out += generate(model, prompts[start:start + args.batch], max_batch=args.batch, **common)
        return out

    def base():
        return timed("base, continuous batching", lambda: generate(model, prompts, max_batch=args.batch, **common))

    timed("base, fixed chunks to completion", chunked)
    base()
    with tempfile.TemporaryDirectory() as tmp:
        for count in (int(c) for c in args.adapters.split(",")):
            served = load("default", dtype="fp32", device="cpu").model
            slots = AdapterSlots(served, make_adapters(count, Path(tmp) / str(count)))
            names = [f"a{i % count}" for i in range(len(prompts))]
            ratios = []
            for _ in range(args.rounds):
                alone = base()
                row = timed(f"{count} adapters mixed, continuous batching",
                            lambda: generate(served, prompts, adapters=slots, adapter_names=names,
                                             max_batch=args.batch, **common))
                ratios.append(round(row["tokens_per_s"] / alone["tokens_per_s"], 3))
            print(json.dumps({"adapters": count, "vs_base": round(statistics.median(ratios), 2), "rounds": ratios}))


if __name__ == "__main__":
    main()
