"""Peak GPU memory and throughput of each method (full, LoRA, QLoRA) through ``tunesmith train``.

No weights can be downloaded on the GPU machine, so each model is a random-init Llama of a real shape
(the embedded SmolLM2-135M, TinyLlama-1.1B) saved with the embedded tokenizer; memory and speed depend on
the shape, not on the values. Every run is a fresh ``tunesmith train`` process on the built-in task
(micro-batch 8, bf16 on CUDA), so the peak is the run's own; it is read from ``metrics.jsonl``
(``peak_memory_gib``: ``torch.cuda.max_memory_allocated`` after the step). Run:

    python benchmarks/gpu_memory.py --tok TOKENIZER_DIR [--shapes smollm2-135m,tinyllama-1.1b] [--steps 12]

It prints one JSON line per run and a table at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

# this script's shape names (the commands BENCHMARKS.md records) → ``tunesmith bench``'s shapes
SHAPES = {"smollm2-135m": "smollm2", "tinyllama-1.1b": "tinyllama"}
RUNS = {
    "full": ["method.name=full"],
    "lora": ["method.name=lora"],
    "qlora": ["method.name=qlora"],
    "qlora+ckpt+paged8": ["method.name=qlora", "train.gradient_checkpointing=true", "optim.name=paged_adamw_8bit"],
    "lora+ckpt": ["method.name=lora", "train.gradient_checkpointing=true"],
    "full+ckpt+8bit": ["method.name=full", "train.gradient_checkpointing=true", "optim.name=adamw_8bit"],
}


def build_model(shape: str, tok_dir: str, out: Path) -> None:
    """The random-init model of ``shape`` saved with the tokenizer (``tunesmith bench``'s builder)."""
    from tunesmith.bench import build_model_dir

    build_model_dir(SHAPES[shape], tok_dir, out)


def one_run(model_dir: Path, run: str, steps: int, workdir: Path) -> dict:
    overrides = [f"model.source={model_dir}", f"output_dir={workdir}", f"name={run}", "data.eval=",
                 "eval.before=false", "eval.task_rows=0", f"train.max_steps={steps}", "train.log_every=1",
                 "train.checkpoint_every=null", "train.progress=false", "train.micro_batch_size=8", "lora.r=16",
                 "optim.lr=2e-4", *RUNS[run]]
    code = "import sys; from tunesmith.cli import main; sys.exit(main(['train', *sys.argv[1:]]))"
    proc = subprocess.run([sys.executable, "-c", code, *overrides], capture_output=True, text=True)
    if proc.returncode != 0:
        return {"run": run, "error": proc.stderr[-2000:]}
    rows = [json.loads(line) for line in (workdir / run / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "loss" in r]
    return {"run": run, "peak_memory_gib": max(r["peak_memory_gib"] for r in rows),
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in rows[2:]),
            "final_loss": rows[-1]["loss"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tok", required=True, help="a tokenizer dir (the embedded model's)")
    parser.add_argument("--shapes", default="smollm2-135m,tinyllama-1.1b")
    parser.add_argument("--runs", default=",".join(RUNS))
    parser.add_argument("--steps", type=int, default=12)
    args = parser.parse_args()
    import torch

    device = torch.cuda.get_device_name(0)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for shape in args.shapes.split(","):
            model_dir = Path(tmp) / shape
            build_model(shape, args.tok, model_dir)
            for run in args.runs.split(","):
                result = {"device": device, "shape": shape, **one_run(model_dir, run, args.steps, Path(tmp) / f"runs-{shape}")}
                print(json.dumps(result), flush=True)
                results.append(result)
    print(f"\n{device}, torch {torch.__version__}, micro-batch 8, built-in task, bf16 compute")
    print(f"{'shape':16} {'run':20} {'peak GiB':>9} {'tokens/s':>9}")
    for r in results:
        if "error" in r:
            print(f"{r['shape']:16} {r['run']:20} failed: {r['error'].strip().splitlines()[-1]}")
        else:
            print(f"{r['shape']:16} {r['run']:20} {r['peak_memory_gib']:9.2f} {r['tokens_per_s']:9.0f}")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
