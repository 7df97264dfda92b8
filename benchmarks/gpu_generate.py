"""Serving throughput on one GPU: the engine against transformers' ``generate`` with PEFT, on the same traffic.

A random-init model of a real shape in bf16 (no weights travel), 8 LoRA adapters (rank 16 over the seven linear
layers, made by PEFT with random A and B) and seeded mixed traffic: prompts of 32–512 tokens, each request with
its own budget of 16–256 new tokens (no stop token: every request produces exactly its budget), adapters assigned
round-robin. Useful tokens/s = the requests' budgets summed / wall seconds (a fixed batch that decodes past a
row's budget does not count those tokens). Runs, all in one process:

- engine, base traffic, no adapters loaded (the base alone)
- engine, base traffic, the 8 adapters loaded (what loading adapters costs base traffic)
- engine, mixed traffic over the 8 adapters, CUDA graphs, and eagerly
- transformers ``generate`` + PEFT, batches of the engine's size in arrival order, one adapter per row through
  ``adapter_names`` (PEFT at its best), and one request at a time switching adapters (as most people run it)
- transformers ``generate`` on the base traffic, batched (the base stack)

The engine runs keep one engine per setting, as a server does: a warm-up over the whole traffic records every
decode graph first, so no timed run records one. ``--skip peft,hf_base,eager`` leaves runs out (the PEFT runs
take minutes at 8B).

    python benchmarks/gpu_generate.py --shape tinyllama-1.1b --requests 256 --batch 64
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

import torch

SHAPES = {
    "tinyllama-1.1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                           num_key_value_heads=4, vocab_size=32000, rope_theta=10000.0),
    "llama-3.1-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0),
}
SEVEN = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build(shape: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(**SHAPES[shape], max_position_embeddings=4096, tie_word_embeddings=False,
                         torch_dtype="bfloat16")
    config._attn_implementation = "sdpa"
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = LlamaForCausalLM(config)
    torch.set_default_dtype(torch.float32)
    return model.eval()


def traffic(count: int, vocab: int, adapters: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [{"prompt": [rng.randrange(3, vocab) for _ in range(rng.randint(32, 512))],
             "budget": rng.randint(16, 256), "adapter": f"a{i % adapters}"} for i in range(count)]


def timed(name: str, run, useful: int, extra: dict | None = None) -> dict:
    torch.cuda.synchronize()
    start = time.perf_counter()
    run()
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    row = {"run": name, "useful_tokens": useful, "seconds": round(seconds, 2),
           "tokens_per_s": round(useful / seconds, 1), **(extra or {})}
    print(json.dumps(row), flush=True)
    return row


def make_engine(model, batch: int, slots=None, graphs: bool = True):
    """One engine per setting, kept across its runs as a server keeps it: its decode graphs are recorded once,
    by the warm-up, not inside a timed run."""
    from tunesmith.engine import Engine

    return Engine(model, pad_id=0, max_batch=batch, adapters=slots, graphs=graphs)


def run_engine(engine, requests, use_adapters: bool = True):
    from tunesmith.engine import Request
    from tunesmith.generate import SamplingConfig

    for r in requests:
        engine.submit(Request(r["prompt"], sampling=SamplingConfig(max_new_tokens=r["budget"]),
                              adapter=r["adapter"] if use_adapters else None))
    engine.run()
    return engine


def run_hf(model, requests, batch: int, adapter_names: bool):
    from tunesmith.generate import left_pad

    for start in range(0, len(requests), batch):
        chunk = requests[start:start + batch]
        ids, mask = left_pad([r["prompt"] for r in chunk], 0, torch.device("cuda"))
        extra = {"adapter_names": [r["adapter"] for r in chunk]} if adapter_names else {}
        with torch.no_grad():
            model.generate(input_ids=ids, attention_mask=mask, do_sample=False, pad_token_id=0, eos_token_id=None,
                           max_new_tokens=max(r["budget"] for r in chunk), **extra)


def run_switching(model, requests):
    for r in requests:
        model.set_adapter(r["adapter"])
        ids = torch.tensor([r["prompt"]], device="cuda")
        with torch.no_grad():
            model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, pad_token_id=0,
                           eos_token_id=None, max_new_tokens=r["budget"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tinyllama-1.1b")
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--switching", type=int, default=16, help="requests run one at a time, switching")
    parser.add_argument("--skip", default="", help="comma-separated runs to leave out: eager,hf_base,peft")
    args = parser.parse_args()
    skip = set(args.skip.split(","))
    import peft

    from tunesmith.peft.multi import AdapterSlots

    model = build(args.shape)
    requests = traffic(args.requests, model.config.vocab_size, args.adapters)
    useful = sum(r["budget"] for r in requests)
    info = {"shape": args.shape, "device": torch.cuda.get_device_name(), "batch": args.batch}
    print(json.dumps({**info, "requests": len(requests), "useful_tokens": useful}), flush=True)
    engine = make_engine(model, args.batch)
    run_engine(engine, requests, use_adapters=False)  # warm-up: every graph bucket, the cache at its largest
    base = timed("engine, base traffic, no adapters loaded", lambda: run_engine(engine, requests, False), useful)
    if "hf_base" not in skip:
        timed("transformers generate, base traffic, batched", lambda: run_hf(model, requests, args.batch, False),
              useful)
    with tempfile.TemporaryDirectory() as tmp:
        config = peft.LoraConfig(r=16, lora_alpha=32, target_modules=SEVEN, init_lora_weights=False)
        wrapped = peft.get_peft_model(model, config, adapter_name="a0")
        for i in range(1, args.adapters):
            wrapped.add_adapter(f"a{i}", config)
        wrapped.eval()
        dirs = {}
        for i in range(args.adapters):
            wrapped.save_pretrained(Path(tmp) / "peft", selected_adapters=[f"a{i}"])
            dirs[f"a{i}"] = Path(tmp) / "peft" / f"a{i}"
        peft_batched = None
        if "peft" not in skip:
            peft_batched = timed("transformers generate + PEFT, mixed batches (adapter_names)",
                                 lambda: run_hf(wrapped, requests, args.batch, True), useful)
            subset = requests[:args.switching]
            timed("transformers generate + PEFT, one request at a time, switching adapters",
                  lambda: run_switching(wrapped, subset), sum(r["budget"] for r in subset))
        model = wrapped.unload()
        slots = AdapterSlots(model, dirs)
        engine = make_engine(model, args.batch, slots)
        run_engine(engine, requests, use_adapters=False)  # warm-up: base graphs and mixed graphs, every bucket
        run_engine(engine, requests)
        loaded = timed(f"engine, base traffic, {args.adapters} adapters loaded",
                       lambda: run_engine(engine, requests, False), useful)
        mixed = timed("engine, mixed traffic over the adapters, CUDA graphs", lambda: run_engine(engine, requests),
                      useful)
        print(json.dumps({"graphs": engine.graphs.summary()}), flush=True)
        if "eager" not in skip:
            eager = make_engine(model, args.batch, slots, graphs=False)
            timed("engine, mixed traffic over the adapters, eager", lambda: run_engine(eager, requests), useful)
    print(json.dumps({**info, "mixed_vs_base": round(mixed["tokens_per_s"] / base["tokens_per_s"], 2),
                      "base_loaded_vs_base": round(loaded["tokens_per_s"] / base["tokens_per_s"], 3),
                      "mixed_vs_base_loaded": round(mixed["tokens_per_s"] / loaded["tokens_per_s"], 2),
                      "mixed_vs_peft_batched": peft_batched and round(mixed["tokens_per_s"] /
                                                                      peft_batched["tokens_per_s"], 2)}),
          flush=True)


if __name__ == "__main__":
    main()
