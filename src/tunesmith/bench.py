"""``tunesmith bench``: training speed on this GPU, beside the tutorial's stack when it is installed.

No weights are needed: the model is a random-init Llama of a real shape (speed depends on the shape, not on the
values) built from seed 0, saved with a tokenizer, and every run trains it on the same synthetic chats for the
same number of optimizer steps of the same examples. Each run is a fresh process, so its peak memory is its own.

Runs (``--runs``; default: every run whose stack is installed):

    ts_recipe   tunesmith, the tutorial's recipe as written: micro-batch 2 × accumulation 4, gradient
                checkpointing, paged AdamW 32-bit, LoRA r64 / alpha 32 / dropout 0.1 on seven projections, len 512
    ts_fast     tunesmith, the same 8 examples per step as one micro-batch, no checkpointing, fused AdamW, and
                CUDA graphs on a GPU (``train.graphs``' default, ``auto``)
    ts_eager    ts_fast without CUDA graphs (``train.graphs=false``; ``ts_pack_eager`` at 8B)
    trl         TRL + PEFT + bitsandbytes as the tutorial writes it (``trl_baseline.py`` in ``--baselines``)
    unsloth     Unsloth's fast path, dropout 0 (``unsloth_probe.py`` in ``--baselines``)

The 8B shape trains LoRA r16 on every linear layer, packed 2048-token rows, micro-batch 1 × accumulation 4 (no
checkpointing) for tunesmith and TRL alike (``trl_lora_rank.py``).

One JSON line per run: tokens/s over input tokens without padding (``tokens_per_s``, what every stack can count)
and over trained tokens (``trained_tokens_per_s``, tunesmith only: TRL trains every token of its text rows),
both divided by the seconds of the training loop, and the median step's rate after two warm-up steps
(``steady_tokens_per_s``, tunesmith only); peak allocated and reserved GiB (reset before training);
MFU with its formula; the final loss.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

from tunesmith.errors import TunesmithError

SHAPES = {
    "tinyllama": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                      num_key_value_heads=4, tie_word_embeddings=False),
    "smol3b": dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
                   num_key_value_heads=4, tie_word_embeddings=True),
    "smollm2": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, tie_word_embeddings=True, rope_theta=100000.0),  # the embedded model's
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, tie_word_embeddings=False),  # a CPU smoke test of the harness
    "llama8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                    num_key_value_heads=8, tie_word_embeddings=False),
}
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "4090": 165e12}
SEVEN = "[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]"
RECIPE_LORA = ["lora.r=64", "lora.alpha=32", "lora.dropout=0.1", f"lora.target_modules={SEVEN}", "data.max_length=512"]
RECIPE_STEP = ["train.micro_batch_size=2", "train.grad_accum=4", "train.gradient_checkpointing=true",
               "optim.name=paged_adamw_32bit"]
FAST_STEP = ["train.micro_batch_size=8", "train.grad_accum=1", "train.gradient_checkpointing=false", "optim.name=adamw"]
QLORA = ["method.name=qlora", "quant.type=nf4", "quant.double_quant=true"]
PACKED_8B = ["lora.r=16", "lora.alpha=32", "lora.dropout=0.0", "lora.target_modules=all-linear", "data.max_length=2048",
             "data.batching=pack", "data.token_budget=2048", "train.micro_batch_size=1", "train.grad_accum=4",
             "train.gradient_checkpointing=false", "optim.name=adamw"]
WORDS = ("the model learns to follow instructions and answer questions about science history code math cooking "
         "travel music language data training loss token gradient adapter").split()


def synthetic_chats(n: int, seed: int = 0) -> list[list[dict]]:
    """``n`` two-turn chats: a 10–80 word question, a log-normal length answer (median ~245 words)."""
    rng = random.Random(seed)
    chats = []
    for _ in range(n):
        question = " ".join(rng.choice(WORDS) for _ in range(rng.randint(10, 80)))
        answer = " ".join(rng.choice(WORDS) for _ in range(int(rng.lognormvariate(5.5, 0.6))))
        chats.append([{"role": "user", "content": question}, {"role": "assistant", "content": answer}])
    return chats


def parameter_count(shape: dict, vocab: int) -> int:
    d, f, layers = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"]
    kv = shape["num_key_value_heads"] * d // shape["num_attention_heads"]
    per_layer = 2 * d * d + 2 * d * kv + 3 * d * f + 2 * d
    return layers * per_layer + vocab * d * (1 if shape["tie_word_embeddings"] else 2) + d


def mfu(tokens_per_s: float, shape: dict, vocab: int, mean_context: float, *, full: bool, peak: float) -> dict:
    """Model FLOPs utilisation: per token 6N for full fine-tuning, 4N with a frozen base (forward 2N, input
    gradients 2N; the adapters' own products are left out), plus attention 12 · layers · d · mean context
    (forward and backward of QKᵀ and PV, causal, per example)."""
    n = parameter_count(shape, vocab)
    dense = (6 if full else 4) * n
    attention = 12 * shape["num_hidden_layers"] * shape["hidden_size"] * mean_context
    return {"mfu": round(tokens_per_s * (dense + attention) / peak, 4),
            "mfu_formula": f"tokens/s × ({6 if full else 4}N + 12·L·d·ctx) / {peak:.3g}", "N": n,
            "mean_context": round(mean_context, 1)}


def _device_peak(name: str) -> float:
    return next((flops for key, flops in PEAK_BF16_FLOPS.items() if key in name), 989e12)


def build_model_dir(shape: str, tokenizer_dir: str, out: Path) -> int:
    """A random-init Llama of ``shape`` (seed 0, bf16, built on the GPU) saved with the tokenizer; its vocab."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    if not (out / "config.json").exists():
        config = LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=8192,
                             bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id, **SHAPES[shape])
        torch.manual_seed(0)
        with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
            model = LlamaForCausalLM(config).to(torch.bfloat16)
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        del model
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # the runs that follow, in other processes, get the GPU whole
    return len(tokenizer)


def _run(cmd: list[str], timeout: float) -> tuple[int, str]:
    try:
        done = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout)
        return done.returncode, done.stdout
    except subprocess.TimeoutExpired as exc:
        return 124, exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")


def tunesmith_run(name: str, overrides: list[str], *, model_dir: Path, data: Path, work: Path, steps: int,
                  timeout: float) -> dict:
    common = [f"model.source={model_dir}", f"output_dir={work / 'runs'}", f"name={name}", f"data.train={data}",
              "data.eval=null", "eval.before=false", "train.checkpoint_every=null", "train.progress=false",
              f"train.max_steps={steps}", "optim.lr=2e-4", "seed=3407"]
    code = "import sys; from tunesmith.cli import main; sys.exit(main(['train', *sys.argv[1:]]))"
    shutil.rmtree(work / "runs" / name, ignore_errors=True)  # the harness's own scratch run of an earlier call
    rc, text = _run([sys.executable, "-c", code, *common, *overrides], timeout)
    row = {"stack": "tunesmith", "run": name, "overrides": overrides, "rc": rc}
    if rc:
        return {**row, "error_tail": text[-3000:]}
    run_dir = work / "runs" / name
    summary = json.loads((run_dir / "summary.json").read_text())
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    metrics = [m for m in metrics if "loss" in m]
    seconds = summary["train_seconds"]
    trained = sum(m.get("trained_tokens", 0) for m in metrics)
    return {**row, "tokens": summary["tokens"], "seconds": seconds,
            "tokens_per_s": round(summary["tokens"] / seconds), "trained_tokens_per_s": round(trained / seconds),
            "peak_allocated_gib": round(max(m.get("peak_memory_gib", 0.0) for m in metrics), 2),
            "peak_reserved_gib": round(max(m.get("peak_reserved_gib", 0.0) for m in metrics), 2),
            "steady_tokens_per_s": _steady(metrics),
            "first_loss": metrics[0]["loss"], "final_loss": metrics[-1]["loss"], "layout": summary.get("layout"),
            "kernels": summary.get("kernels"), "graphs": summary.get("graphs"),
            "blas_workspace": summary.get("blas_workspace"),
            "losses": [round(m["loss"], 4) for m in metrics]}


def _steady(metrics: list[dict]) -> int | None:
    """The median step's tokens/s leaving out the first two steps (warm-up: kernel compilation and autotuning,
    the allocator growing), which a short run's whole-loop rate still carries; None under 3 steps."""
    rates = sorted(m["tokens_per_s"] for m in metrics[2:] if m.get("tokens_per_s"))
    return round(rates[len(rates) // 2]) if rates else None


def baseline_run(name: str, script: Path, flags: list[str], *, timeout: float) -> dict:
    rc, text = _run([sys.executable, str(script), *flags], timeout)
    lines = [line for line in text.splitlines() if line.startswith("{")]
    row = {"stack": name.split("_")[0], "run": name, "flags": flags, "rc": rc}
    if rc or not lines:
        return {**row, "error_tail": text[-3000:]}
    result = json.loads(lines[-1])
    tokens_per_s = result.get("tok_per_s")
    return {**row, **result, "tokens_per_s": tokens_per_s, "peak_allocated_gib": result.get("peak_gib"),
            "final_loss": result.get("train_loss")}


def mean_context(tokenizer_dir: str, chats: list[list[dict]], max_length: int) -> float:
    """The mean context a token attends to (causal within its example), over the chats as templated."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    lengths = [min(len(tokenizer.apply_chat_template(chat, tokenize=True, return_dict=True)["input_ids"]),
                   max_length) for chat in chats]
    return sum(n * (n + 1) / 2 for n in lengths) / sum(lengths)


def run_bench(*, tokenizer_dir: str, shape: str = "tinyllama", method: str = "qlora", runs: list[str] | None = None,
              steps: int = 20, baselines: str | None = None, work: str | None = None, timeout: float = 600,
              extra: dict[str, list[str]] | None = None, emit=print) -> list[dict]:
    """Run the benchmark (module docstring); ``emit`` gets each result as a JSON line. ``extra``: more tunesmith
    runs, name → overrides on top of ``ts_fast``'s."""
    import torch
    import transformers

    work_dir = Path(work or os.environ.get("TMPDIR", "/tmp")) / f"tunesmith-bench-{shape}"
    work_dir.mkdir(parents=True, exist_ok=True)
    model_dir = work_dir / "model"
    vocab = build_model_dir(shape, tokenizer_dir, model_dir)
    big = shape == "llama8b"
    chats = synthetic_chats(160 if big else steps * 8)  # 8 chats a step; the packed 8B runs draw from 160
    data = work_dir / f"chats{len(chats)}.jsonl"
    data.write_text("".join(json.dumps({"messages": chat}) + "\n" for chat in chats))
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    scripts = Path(baselines) if baselines else None
    tunesmith = ({"ts_pack": ["method.name=lora", *PACKED_8B]} if big else
                 {"ts_recipe": [*(QLORA if method == "qlora" else ["method.name=lora"]), *RECIPE_LORA, *RECIPE_STEP],
                  "ts_fast": [*(QLORA if method == "qlora" else ["method.name=lora"]), *RECIPE_LORA, *FAST_STEP]})
    # the fast runs take train.graphs' default (auto: CUDA graphs on a GPU); *_eager runs the same without them
    tunesmith["ts_pack_eager" if big else "ts_eager"] = [*tunesmith["ts_pack" if big else "ts_fast"],
                                                         "train.graphs=false"]
    for name, overrides in (extra or {}).items():  # on ts_recipe when the name says so, else ts_fast / ts_pack
        base = "ts_pack" if big else "ts_recipe" if name.startswith("ts_recipe") else "ts_fast"
        tunesmith[name] = [*tunesmith[base], *overrides]
    trl_flags = (["--shape", shape, "--method", "lora", "--packing", "--no-ckpt", "--optim", "adamw_torch_fused",
                  "--bs", "1", "--ga", "4", "--max-length", "2048", "--steps", str(steps), "--r", "16", "--dropout", "0"]
                 if big else ["--shape", shape, "--method", method, "--steps", str(steps)])
    baseline = {"trl": ("trl_lora_rank.py" if big else "trl_baseline.py", ["--tok", tokenizer_dir, *trl_flags]),
                "unsloth": ("unsloth_probe.py", ["--tok", tokenizer_dir, "--shape", shape, "--steps", str(steps),
                                                 "--dropout", "0"])}
    runs = runs or [*tunesmith, *(name for name in baseline if scripts and _importable(name))]
    context = mean_context(tokenizer_dir, chats, 2048 if big else 512)
    env = {"device": device, "torch": torch.__version__, "transformers": transformers.__version__,
           "shape": shape, "method": "lora" if big else method, "steps": steps, "time": time.strftime("%Y-%m-%d %H:%M")}
    emit(json.dumps({"env": env}))
    results, trl_tokens = [], None
    for name in runs:
        if name in tunesmith:
            row = tunesmith_run(name, tunesmith[name], model_dir=model_dir, data=data, work=work_dir, steps=steps,
                                timeout=timeout)
        elif name in baseline and scripts:
            script, flags = baseline[name]
            row = baseline_run(name, scripts / script, flags, timeout=timeout)
            if name == "unsloth" and "seconds" in row and trl_tokens:  # it logs no token count: TRL's, same data
                row["tokens_per_s"] = round(trl_tokens / row["seconds"])
        else:
            raise SystemExit(f"unknown run {name!r} (or no --baselines dir); runs: {', '.join([*tunesmith, *baseline])}")
        if name == "trl":
            trl_tokens = row.get("tokens")
        if row.get("tokens_per_s"):
            full = any(o == "method.name=full" for o in row.get("overrides", []))
            row.update(mfu(row["tokens_per_s"], SHAPES[shape], vocab, context, full=full, peak=_device_peak(device)))
        row = {**row, "shape": shape, "device": device}
        results.append(row)
        emit(json.dumps(row))
    return results


def _importable(stack: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(stack) is not None


def bench_command(args) -> None:
    """``tunesmith bench``'s command line: the runs, on a GPU (``--shape tiny``: the harness on the CPU)."""
    import tempfile

    import torch

    if args.shape != "tiny" and not torch.cuda.is_available():
        raise TunesmithError("bench measures GPU training and no CUDA GPU is visible; --shape tiny runs the harness "
                             "on the CPU as a smoke test")
    extra = {}
    for item in args.extra:
        name, _, overrides = item.partition("=")
        if not name or not overrides:
            raise TunesmithError(f"--extra {item!r}: write NAME=key=value,key=value")
        extra[name] = overrides.split(",")
    tokenizer = args.tokenizer
    if tokenizer is None:
        from tunesmith.models.load import load_tokenizer

        tokenizer = tempfile.mkdtemp(prefix="tunesmith-tok-")
        load_tokenizer("default").save_pretrained(tokenizer)
    run_bench(tokenizer_dir=tokenizer, shape=args.shape, method=args.method,
              runs=args.runs.split(",") if args.runs else None, steps=args.steps, baselines=args.baselines,
              work=args.work, timeout=args.timeout, extra=extra)
