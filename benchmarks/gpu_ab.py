"""Two source trees of tunesmith, the same GPU, the same model and data: tokens/s and loss of each, alternating.

For "no speed lost" checks across a change: run the tree before the change and the tree after it in one device
call, on a random-init model of a real shape (no weights travel) and the same synthetic chats, each run a fresh
``tunesmith train`` process, the trees alternating so drift on the machine hits both alike. Per run it prints one JSON
line (tokens/s = tokens / summed step seconds from ``summary.json``; median per-step tokens/s from steps 3 on; peak
GiB; final loss) and a table at the end.

    git archive BEFORE src | tar -x -C .bench/before
    python benchmarks/gpu_ab.py --tok TOKENIZER_DIR --tree before=.bench/before/src --tree after=src --repeat 2
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_memory import SHAPES, build_model  # noqa: E402

SEVEN = "[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]"
# The tutorial's LoRA shape (r 64, alpha 32, dropout 0.1, seven targets, max length 512).
TUTORIAL = ["lora.r=64", "lora.alpha=32", "lora.dropout=0.1", f"lora.target_modules={SEVEN}", "data.max_length=512"]
RUNS = {
    "qlora_recipe": ["method.name=qlora", *TUTORIAL, "train.micro_batch_size=2", "train.grad_accum=4",
                     "train.gradient_checkpointing=true", "optim.name=paged_adamw_32bit"],
    "qlora_mb8": ["method.name=qlora", *TUTORIAL, "train.micro_batch_size=8", "train.grad_accum=1"],
    "lora_mb8": ["method.name=lora", *TUTORIAL, "train.micro_batch_size=8", "train.grad_accum=1"],
}
WORDS = ("model data token batch layer weight answer question system user memory kernel cache tensor graph shape "
         "vector matrix adapter rank").split()


def write_chats(path: Path, rows: int) -> None:
    """Seeded multi-sentence chats of varied length (a few dozen to a few hundred tokens)."""
    rng = random.Random(0)

    def text(low: int, high: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high))).capitalize() + "."

    with path.open("w") as f:
        for _ in range(rows):
            f.write(json.dumps({"messages": [{"role": "user", "content": text(10, 80)},
                                             {"role": "assistant", "content": text(20, 250)}]}) + "\n")


def one_run(tree: str, src: str, model_dir: Path, data: Path, run: str, steps: int, workdir: Path) -> dict:
    name = f"{tree}-{run}-{len(list(workdir.glob('*'))) if workdir.exists() else 0}"
    overrides = [f"model.source={model_dir}", f"data.train={data}", "data.eval=", f"output_dir={workdir}",
                 f"name={name}", "eval.before=false", "eval.task_rows=0", f"train.max_steps={steps}",
                 "train.log_every=1", "train.checkpoint_every=null", "train.progress=false", "optim.lr=2e-4",
                 *RUNS[run]]
    code = "import sys; from tunesmith.cli import main; sys.exit(main(['train', *sys.argv[1:]]))"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", code, *overrides], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        return {"tree": tree, "run": run, "error": proc.stderr[-1500:]}
    summary = json.loads((workdir / name / "summary.json").read_text())
    rows = [json.loads(line) for line in (workdir / name / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "loss" in r]
    return {"tree": tree, "run": run, "tokens_per_s": summary["tokens"] / summary["train_seconds"],
            "steady_tokens_per_s": statistics.median(r["tokens_per_s"] for r in rows[2:]),
            "peak_memory_gib": max(r.get("peak_memory_gib", 0.0) for r in rows), "final_loss": rows[-1]["loss"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tok", required=True, help="a tokenizer dir (the embedded model's)")
    parser.add_argument("--tree", action="append", required=True, metavar="NAME=SRC_DIR")
    parser.add_argument("--shape", default="tinyllama-1.1b", choices=sorted(SHAPES))
    parser.add_argument("--runs", default=",".join(RUNS))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeat", type=int, default=1)
    args = parser.parse_args()
    import torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    trees = [tuple(t.split("=", 1)) for t in args.tree]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        model_dir, data = Path(tmp) / args.shape, Path(tmp) / "chats.jsonl"
        build_model(args.shape, args.tok, model_dir)
        write_chats(data, 8 * args.steps)
        for run in args.runs.split(","):
            for i in range(args.repeat):
                for tree, src in (trees if i % 2 == 0 else trees[::-1]):
                    result = {"device": device, "shape": args.shape,
                              **one_run(tree, src, model_dir, data, run, args.steps, Path(tmp) / "runs")}
                    print(json.dumps(result), flush=True)
                    results.append(result)
    print(f"\n{device}, torch {torch.__version__}, {args.shape}, {args.steps} steps, 8 examples per step")
    print(f"{'run':14} {'tree':10} {'tokens/s':>9} {'steady':>9} {'peak GiB':>9} {'final loss':>11}")
    for r in results:
        if "error" in r:
            print(f"{r['run']:14} {r['tree']:10} failed: {r['error'].strip().splitlines()[-1]}")
        else:
            print(f"{r['run']:14} {r['tree']:10} {r['tokens_per_s']:9.0f} {r['steady_tokens_per_s']:9.0f} "
                  f"{r['peak_memory_gib']:9.2f} {r['final_loss']:11.5f}")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
