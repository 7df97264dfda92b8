"""LoRA SFT step throughput on CPU: tunesmith's loop against a plain PEFT + transformers loop.

Same model (the embedded SmolLM2-135M-Instruct, fp32), same data (the built-in task's training rows,
padded micro-batches in the same order), same LoRA (r=16, alpha=32, all linear layers, no dropout), same
AdamW settings. Throughput counts the real (non-padding) tokens of each batch per second of optimizer
steps, after warm-up steps that are not timed; the two loops alternate step by step on the same batches. Run:

    .venv/bin/python benchmarks/cpu_lora.py [--steps 20] [--warmup 2] [--batch 8] [--json]
    .venv/bin/python benchmarks/cpu_lora.py --only peft|ours   # one loop alone in this process

Loops in one process disturb each other's memory (see BENCHMARKS.md), so ``--only`` runs one loop per
process, as users run them; alternate ``--only peft`` and ``--only ours`` processes and compare.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch

from tunesmith.config import OptimConfig
from tunesmith.data.batching import pad_collate
from tunesmith.data.pipeline import prepare
from tunesmith.data.tokenize import TokenizeOptions
from tunesmith.models import load
from tunesmith.peft import LoRAConfig, adapter_parameters, freeze_base, inject_lora
from tunesmith.train.engine import train_step
from tunesmith.train.layout import choose_layout, install_layout
from tunesmith.train.module import TrainingModule
from tunesmith.train.objectives import MicroBatch, SupervisedLoss
from tunesmith.train.optim import build_optimizer

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def batches(tokenizer, size: int, count: int) -> list[dict]:
    examples = prepare("builtin", tokenizer, TokenizeOptions(max_length=512)).examples
    return [pad_collate(examples[i * size:(i + 1) * size], pad_id=tokenizer.pad_token_id) for i in range(count)]


def real_tokens(batch: dict) -> int:
    return int(batch["attention_mask"].sum())


def work_ratio(model, data: list[dict]) -> float:
    """The PEFT loop's matrix-product work over ours on ``data``, counted from the batches alone: the frozen
    linear layers cost a forward and an input-gradient product per token they see, the output head the same per
    position it sees. PEFT sees every padded position; tunesmith sees each real token once, the shared prefix
    once per batch, and the head only at trained positions. Attention, adapters and the trimmed last block are
    left out. The measured speedup can only pass this ratio by running its products faster than PEFT's."""
    from tunesmith.train.flat import shared_prefix_length

    head = model.get_output_embeddings().weight.numel()
    layers = sum(m.weight.numel() for name, m in model.named_modules()
                 if isinstance(m, torch.nn.Linear) and "layers." in name)
    peft = ours = 0
    for batch in data:
        prefix = shared_prefix_length(batch)
        trained = int((batch["labels"][:, 1:] != -100).sum())
        peft += batch["input_ids"].numel() * (layers + head)
        ours += (real_tokens(batch) - (len(batch["input_ids"]) - 1) * prefix) * layers + trained * head
    return peft / ours


def peft_stepper():
    from peft import LoraConfig, get_peft_model

    model = load("default").model
    torch.manual_seed(0)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS,
                                             task_type="CAUSAL_LM"))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=2e-3)

    def step(batch: dict) -> float:
        loss = model(**batch, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step


def ours_stepper():
    model = load("default").model
    torch.manual_seed(0)
    inject_lora(model, LoRAConfig(r=16, alpha=32, dropout=0.0, target_modules=TARGETS))
    freeze_base(model)
    params = list(adapter_parameters(model).values())
    model.train()
    optimizer = build_optimizer(OptimConfig(lr=2e-3, weight_decay=0.01), params)  # torch's AdamW defaults
    layout = install_layout(model, choose_layout(model, torch.device("cpu")))
    loss = SupervisedLoss()
    module = TrainingModule(model, loss, layout.name)

    def step(batch: dict) -> float:
        return train_step(module, optimizer, params, loss, [MicroBatch(batch)], lr=2e-3, max_grad_norm=1.0,
                          device=torch.device("cpu"), dtype=torch.float32).loss

    return step


def measure(steppers: dict, data: list[dict], warmup: int) -> dict:
    """Steps alternate between the loops on the same batch, so drifts in machine speed hit both alike."""
    seconds = {name: 0.0 for name in steppers}
    losses = {name: [] for name in steppers}
    tokens = 0
    for index, batch in enumerate(data):
        for name, step in steppers.items():
            start = time.perf_counter()
            losses[name].append(step(batch))
            if index >= warmup:
                seconds[name] += time.perf_counter() - start
        if index >= warmup:
            tokens += real_tokens(batch)
    return {name: (tokens / seconds[name], losses[name]) for name in steppers}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--only", choices=["peft", "ours"], help="time one loop alone")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    tokenizer = load("default").tokenizer
    data = batches(tokenizer, args.batch, args.warmup + args.steps)
    if args.only:
        (tps, losses), = measure({args.only: (peft_stepper if args.only == "peft" else ours_stepper)()}, data,
                                 args.warmup).values()
        print(json.dumps({"loop": args.only, "batch": args.batch, "steps": args.steps,
                          "tokens_per_s": round(tps, 1), "last_loss": round(losses[-1], 5),
                          "work_ratio": round(work_ratio(load("default").model, data[args.warmup:]), 2)}))
        return
    steppers = {"peft": peft_stepper(), "ours": ours_stepper()}
    results = measure(steppers, data, args.warmup)
    (peft_tps, peft_losses), (ours_tps, ours_losses) = results["peft"], results["ours"]
    result = {"device": f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                        f"torch {torch.__version__}",
              "batch": args.batch, "steps": args.steps,
              "peft_tokens_per_s": round(peft_tps, 1), "ours_tokens_per_s": round(ours_tps, 1),
              "speedup": round(ours_tps / peft_tps, 2),
              "work_ratio": round(work_ratio(load("default").model, data[args.warmup:]), 2),
              "first_loss": {"peft": round(peft_losses[0], 5), "ours": round(ours_losses[0], 5)},
              "last_loss": {"peft": round(peft_losses[-1], 5), "ours": round(ours_losses[-1], 5)}}
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:<20}{value}")


if __name__ == "__main__":
    main()
