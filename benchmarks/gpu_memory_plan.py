"""The memory model against the GPU: ``tunesmith estimate``'s predicted peak against the measured
``torch.cuda.max_memory_allocated`` of real training runs, over a grid of shapes × methods × lengths ×
micro-batches × checkpointing × graphs × padded / packed, with each run's tokens/s (issue 29).

No weights reach the GPU machine: each model is a random-init Llama of a real shape (``tunesmith bench``'s
builder; memory depends on the shape, not on the values). The data's rows are all longer than the run's
``data.max_length`` (truncated to it), so every micro-batch is the estimate's worst case and the two numbers
describe the same batch. Each run is a fresh ``tunesmith train`` process of a few optimizer steps (the peak
comes after the first step, when the optimizer's state exists); the peak is the largest ``peak_memory_gib`` of
its ``metrics.jsonl`` and tokens/s the median of the steps after the first two. Run:

    python benchmarks/gpu_memory_plan.py --tok TOKENIZER_DIR [--only NAME,...] [--steps 4]

One JSON line per run, then a markdown table (predicted, measured, error) for BENCHMARKS.md. Without a GPU:

    python benchmarks/gpu_memory_plan.py --predict-only   # the grid's predictions (config.json dirs, no weights)
    python benchmarks/gpu_memory_plan.py --earlier        # the estimate against peaks earlier sessions measured
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

QLORA, FULL, CKPT = ["method.name=qlora"], ["method.name=full"], ["train.gradient_checkpointing=true"]


def _pad(length: int, micro: int) -> list[str]:
    return [f"data.max_length={length}", f"train.micro_batch_size={micro}", "train.grad_accum=1"]


def _pack(length: int) -> list[str]:
    return [f"data.max_length={length}", "data.batching=pack", f"data.token_budget={length}",
            "train.micro_batch_size=1", "train.grad_accum=2"]


GRID = {  # name → (shape, overrides); LoRA r16 on every linear layer unless the method says otherwise
    "tl-lora-512x8": ("tinyllama", _pad(512, 8)),
    "tl-lora-512x8-eager": ("tinyllama", _pad(512, 8) + ["train.graphs=false"]),
    "tl-lora-512x8-ckpt": ("tinyllama", _pad(512, 8) + CKPT),
    "tl-qlora-512x8": ("tinyllama", _pad(512, 8) + QLORA),
    "tl-qlora-512x2-ckpt": ("tinyllama", _pad(512, 2) + QLORA + CKPT),
    "tl-full-512x4": ("tinyllama", _pad(512, 4) + FULL),
    "tl-full-512x4-ckpt-8bit": ("tinyllama", _pad(512, 4) + FULL + CKPT + ["optim.name=adamw_8bit"]),
    "tl-lora-pack2048": ("tinyllama", _pack(2048)),
    "3b-lora-1024x4": ("smol3b", _pad(1024, 4)),
    "3b-lora-pack2048-ckpt": ("smol3b", _pack(2048) + CKPT),
    "3b-qlora-1024x4": ("smol3b", _pad(1024, 4) + QLORA),
    "3b-qlora-pack4096-ckpt": ("smol3b", _pack(4096) + QLORA + CKPT),
    "3b-full-512x2-ckpt": ("smol3b", _pad(512, 2) + FULL + CKPT),
    "8b-lora-pack2048": ("llama8b", _pack(2048)),
    "8b-lora-pack4096-ckpt": ("llama8b", _pack(4096) + CKPT),
    "8b-qlora-pack2048": ("llama8b", _pack(2048) + QLORA),
    "8b-qlora-pack4096-ckpt": ("llama8b", _pack(4096) + QLORA + CKPT),
    "8b-qlora-1024x4": ("llama8b", _pad(1024, 4) + QLORA),
}
# plan: auto on the real GPU: settings as given that do not fit; the run's own summary.json names the plan chosen,
# and its prediction is what the measurement is compared with.
AUTO = {
    "8b-lora-2048x16-auto": ("llama8b", _pad(2048, 16) + ["plan=auto"]),
    "3b-full-1024x16-auto": ("smol3b", _pad(1024, 16) + FULL + ["plan=auto"]),
}
RUNS = {**GRID, **AUTO}


# Peaks earlier sessions measured on one H200 (BENCHMARKS.md, the sections named) whose batches were all at their
# largest: (what, shape, overrides, measured GiB). The 8B rows ran before CUDA graphs existed: eager.
_RECIPE = ["lora.r=64", "lora.alpha=32", "lora.dropout=0.1",
           "lora.target_modules=[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]", "data.max_length=512"]
_MB8 = ["train.micro_batch_size=8", "train.grad_accum=1"]
_8B = ["lora.r=16", "lora.alpha=32", "data.batching=pack", "train.micro_batch_size=1", "train.graphs=false"]
EARLIER = [
    ("ts_recipe (re-check of 8d4be77)", "tinyllama", _RECIPE + QLORA + CKPT + [
        "train.micro_batch_size=2", "train.grad_accum=4", "optim.name=paged_adamw_32bit"], 1.53),
    ("ts_fast (re-check of 8d4be77)", "tinyllama", _RECIPE + QLORA + _MB8, 11.15),
    ("ts_eager (CUDA graphs, call 8)", "tinyllama", _RECIPE + QLORA + _MB8 + ["train.graphs=false"], 11.99),
    ("ts_lora_g (CUDA graphs, call 4)", "tinyllama", _RECIPE + _MB8, 11.73),
    ("ts_lora_graphs (CUDA graphs, call 7)", "tinyllama", _RECIPE + _MB8, 12.05),
    ("LoRA bf16 mb 8 (fused node, call 1)", "tinyllama", _RECIPE + _MB8 + ["train.graphs=false"], 12.93),
    ("8B QLoRA 2048, checkpointing", "llama8b", _8B + QLORA + CKPT + ["data.max_length=2048",
                                                                     "data.token_budget=2048"], 5.87),
    ("8B QLoRA 2048", "llama8b", _8B + QLORA + ["data.max_length=2048", "data.token_budget=2048"], 17.30),
    ("8B LoRA 2048", "llama8b", _8B + ["data.max_length=2048", "data.token_budget=2048"], 26.55),
    ("8B QLoRA 4096", "llama8b", _8B + QLORA + ["data.max_length=4096", "data.token_budget=4096"], 30.23),
    ("8B LoRA 4096", "llama8b", _8B + ["data.max_length=4096", "data.token_budget=4096"], 39.48),
]


def config_dir(shape: str, out: Path, vocab: int = 49152) -> Path:
    """A dir holding only ``config.json`` for ``shape`` (``tunesmith bench``'s shapes, the embedded tokenizer's
    vocabulary): all the estimate reads."""
    from tunesmith.bench import SHAPES

    out.mkdir(parents=True, exist_ok=True)
    config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": vocab,
              "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "hidden_act": "silu", **SHAPES[shape]}
    (out / "config.json").write_text(json.dumps(config))
    return out


def print_predictions(earlier: bool) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        if earlier:
            print("| run | shape | measured GiB | predicted GiB | error |\n|---|---|---|---|---|")
            for what, shape, extra, measured in EARLIER:
                gib = predicted([f"model.source={config_dir(shape, Path(tmp) / shape)}", *extra])["predicted_gib"]
                print(f"| {what} | {shape} | {measured:.2f} | {gib:.2f} | {100 * (gib / measured - 1):+.1f}% |")
            return
        print("| run | tokens / micro-batch | predicted GiB |\n|---|---|---|")
        for name, (shape, extra) in GRID.items():
            p = predicted([f"model.source={config_dir(shape, Path(tmp) / shape)}", "lora.r=16", *extra])
            print(f"| {name} | {p['tokens_per_micro_batch']:,} | {p['predicted_gib']:.2f} |")


def long_chats(path: Path, n: int, words: int) -> None:
    """``n`` chats whose answers run past ``words`` tokens (truncated to the run's length)."""
    vocabulary = "the model learns to follow instructions and answer questions about science history code".split()
    rng = random.Random(0)
    with path.open("w") as f:
        for _ in range(n):
            answer = " ".join(rng.choice(vocabulary) for _ in range(words))
            f.write(json.dumps({"messages": [{"role": "user", "content": "Tell me everything."},
                                             {"role": "assistant", "content": answer}]}) + "\n")


def predicted(overrides: list[str]) -> dict:
    from tunesmith.config import load_config
    from tunesmith.plan.estimate import estimate, settings_of
    from tunesmith.plan.shapes import read_shape

    config = load_config(None, overrides)
    result = estimate(config, read_shape(config), settings_of(config))
    return {"predicted_gib": result.allocated / 2 ** 30, "tokens_per_micro_batch": result.settings.tokens}


def one_run(name: str, model_dir: Path, data: Path, steps: int, work: Path) -> dict:
    shape, extra = RUNS[name]
    overrides = [f"model.source={model_dir}", f"data.train={data}", "data.eval=", "eval.before=false",
                 "eval.task_rows=0", f"train.max_steps={steps}", "train.log_every=1", "train.checkpoint_every=null",
                 "train.progress=false", "lora.r=16", "lora.alpha=32", "optim.lr=2e-4", f"output_dir={work}",
                 f"name={name}", *extra]
    result = {"run": name, "shape": shape, **predicted(overrides)}
    code = "import sys; from tunesmith.cli import main; sys.exit(main(['train', *sys.argv[1:]]))"
    proc = subprocess.run([sys.executable, "-c", code, *overrides], capture_output=True, text=True)
    if proc.returncode != 0:
        return {**result, "error": proc.stderr[-1500:]}
    rows = [json.loads(line) for line in (work / name / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "loss" in r]
    measured = max(r["peak_memory_gib"] for r in rows)
    plan = json.loads((work / name / "summary.json").read_text()).get("plan")
    if plan:  # plan: auto: the prediction and the micro-batch of the settings it chose
        result.update(plan=plan, predicted_gib=plan["chosen_allocated_gib"],
                      tokens_per_micro_batch=plan["chosen"]["tokens"])
    return {**result, "measured_gib": measured, "error_pct": 100 * (result["predicted_gib"] / measured - 1),
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in rows[2:] or rows)}


def verify_run(name: str, model_dir: Path, data: Path) -> dict:
    """``tunesmith estimate --fit --verify`` on ``name``'s settings: the plan, then two steps trained with it."""
    code = "import sys; from tunesmith.cli import main; sys.exit(main(['estimate', *sys.argv[1:]]))"
    overrides = [f"model.source={model_dir}", f"data.train={data}", "lora.r=16", "lora.alpha=32",
                 *(o for o in AUTO[name][1] if o != "plan=auto")]
    proc = subprocess.run([sys.executable, "-c", code, "--fit", "--verify", "--json", *overrides],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        return {"run": f"{name} (estimate --fit --verify)", "error": proc.stderr[-1500:]}
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"run": f"{name} (estimate --fit --verify)", "overrides": report["overrides"], **report["verify"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tok", help="a tokenizer dir (the embedded model's); needed to train")
    parser.add_argument("--only", help="comma-separated run names (default: the whole grid)")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--predict-only", action="store_true", help="print the grid's predictions, train nothing")
    parser.add_argument("--earlier", action="store_true", help="the estimate against earlier measured peaks")
    parser.add_argument("--verify", help="comma-separated AUTO names to run through tunesmith estimate --fit --verify")
    args = parser.parse_args()
    if args.predict_only or args.earlier:
        print_predictions(args.earlier)
        return
    if args.tok is None:
        parser.error("--tok is needed to train (or pass --predict-only / --earlier)")
    import torch

    from tunesmith.bench import build_model_dir

    names = args.only.split(",") if args.only is not None else list(GRID)
    names = [n for n in names if n]
    device = torch.cuda.get_device_name(0)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "long.jsonl"
        long_chats(data, 64, 4200)
        for name in names:
            model_dir = Path(tmp) / RUNS[name][0]
            build_model_dir(RUNS[name][0], args.tok, model_dir)
            result = {"device": device, **one_run(name, model_dir, data, args.steps, Path(tmp) / "runs")}
            print(json.dumps(result), flush=True)
            results.append(result)
        for name in filter(None, (args.verify or "").split(",")):
            model_dir = Path(tmp) / AUTO[name][0]
            build_model_dir(AUTO[name][0], args.tok, model_dir)
            print(json.dumps({"device": device, **verify_run(name, model_dir, data)}), flush=True)
    print(f"\n{device}, torch {torch.__version__}\n")
    print("| run | tokens / micro-batch | predicted GiB | measured GiB | error | tokens/s |\n|---|---|---|---|---|---|")
    for r in results:
        if "error" in r:
            print(f"| {r['run']} | {r['tokens_per_micro_batch']:,} | {r['predicted_gib']:.2f} | failed | | |")
        else:
            print(f"| {r['run']} | {r['tokens_per_micro_batch']:,} | {r['predicted_gib']:.2f} | "
                  f"{r['measured_gib']:.2f} | {r['error_pct']:+.1f}% | {r['tokens_per_s']:,.0f} |")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
