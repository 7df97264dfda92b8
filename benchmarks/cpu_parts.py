"""Micro-benchmarks behind the CPU notes in BENCHMARKS.md: each fast path against its plain reference.

* row attention (``train.rows``) against SDPA on the same padded rows with a mask, one layer of the embedded
  model's shape, forward and backward;
* one decoder layer's seven LoRA linears, fused node (``_LoRALinearFunction``) against the module path;
* fused AdamW against torch's per-tensor loop, with clipping, over the 420 adapter matrices;
* a LoRA step of a 30-layer model of width 64 (the Python and dispatch floor of a step).

    .venv/bin/python benchmarks/cpu_parts.py
"""

from __future__ import annotations

import os
import time

import torch
import torch.nn.functional as F
from torch import nn

from tunesmith.peft.lora import LoRALinear
from tunesmith.train.rows import Rows, row_attention_forward

SHAPES = [(576, 576), (576, 192), (576, 192), (576, 576), (576, 1536), (576, 1536), (1536, 576)]


def ms(fn, reps: int = 30) -> float:
    for _ in range(3):
        fn()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - start) / reps * 1e3


def attention() -> dict:
    prefix, lengths, heads, kv_heads, dim = 39, [56, 60, 52, 58, 55, 61, 57, 48], 9, 3, 64
    n, width = prefix + sum(lengths), max(lengths)
    q = torch.randn(1, heads, n, dim, requires_grad=True)
    k = torch.randn(1, kv_heads, n, dim, requires_grad=True)
    v = torch.randn(1, kv_heads, n, dim, requires_grad=True)
    grad = torch.randn(1, n, heads, dim)
    rows = Rows.from_lengths(prefix, lengths, "cpu")

    def ours():
        out, _ = row_attention_forward(None, q, k, v, None, scaling=0.125, tunesmith_rows=rows)
        out.backward(grad)

    def sdpa():  # the same padded rows through SDPA's kernel with a mask, prefix apart
        starts = [prefix + sum(lengths[:i]) for i in range(len(lengths))]
        pad = lambda t: torch.stack([F.pad(t[0, :, s:s + n_], (0, 0, 0, width - n_)) for s, n_ in zip(starts, lengths)])
        rep = heads // kv_heads
        kr = torch.cat([k[:, :, :prefix].expand(len(lengths), -1, -1, -1), pad(k)], 2).repeat_interleave(rep, 1)
        vr = torch.cat([v[:, :, :prefix].expand(len(lengths), -1, -1, -1), pad(v)], 2).repeat_interleave(rep, 1)
        mask = torch.cat([torch.ones(width, prefix, dtype=torch.bool), torch.ones(width, width, dtype=torch.bool).tril()], 1)
        rows_out = F.scaled_dot_product_attention(pad(q), kr, vr, attn_mask=mask, scale=0.125)
        head = F.scaled_dot_product_attention(q[:, :, :prefix], k[:, :, :prefix], v[:, :, :prefix], is_causal=True,
                                              scale=0.125, enable_gqa=True)
        out = torch.cat([head[0]] + [r[:, :n_] for r, n_ in zip(rows_out, lengths)], 1).transpose(0, 1)[None]
        out.backward(grad)

    return {"row_attention_ms": round(ms(ours), 2), "sdpa_masked_rows_ms": round(ms(sdpa), 2)}


def lora_layer() -> dict:
    n, timings = 463, {}
    for name, fused in (("fused", True), ("modules", False)):
        layers = []
        for d_in, d_out in SHAPES:
            layer = LoRALinear(nn.Linear(d_in, d_out, bias=False), r=16, alpha=32)
            layer.base_layer.requires_grad_(False)
            nn.init.normal_(layer.lora_B.weight)
            layers.append(layer)
        xs = {d: torch.randn(n, d, requires_grad=True) for d in (576, 1536)}

        def run():
            total = sum((layer if fused else layer.reference_forward)(xs[d_in]).sum()
                        for layer, (d_in, _) in zip(layers, SHAPES))
            total.backward()
        timings[f"lora_layer_{name}_ms"] = round(ms(run), 2)
    plain = [nn.Linear(d_in, d_out, bias=False).requires_grad_(False) for d_in, d_out in SHAPES]
    xs = {d: torch.randn(n, d, requires_grad=True) for d in (576, 1536)}
    timings["frozen_linears_only_ms"] = round(ms(lambda: sum(m(xs[d]).sum() for m, (d, _) in zip(plain, SHAPES)).backward()), 2)
    return timings


def adamw() -> dict:
    shapes = [s for _ in range(30) for d_in, d_out in SHAPES for s in ((16, d_in), (d_out, 16))]
    timings = {}
    for name, kwargs in (("loop", {}), ("fused", {"fused": True})):
        params = [nn.Parameter(torch.randn(s)) for s in shapes]
        for p in params:
            p.grad = torch.randn_like(p) * 1e-3
        optimizer = torch.optim.AdamW(params, lr=1e-3, **kwargs)
        timings[f"adamw_{name}_with_clipping_ms"] = round(ms(lambda: (torch.nn.utils.clip_grad_norm_(params, 1.0),
                                                                     optimizer.step())), 2)
    return timings


def dispatch_floor() -> dict:
    import sys

    sys.path.insert(0, os.path.dirname(__file__))
    from cpu_lora import TARGETS, batches
    from transformers import LlamaConfig, LlamaForCausalLM

    from tunesmith.config import OptimConfig
    from tunesmith.models import load
    from tunesmith.peft import LoRAConfig, adapter_parameters, freeze_base, inject_lora
    from tunesmith.train.engine import train_step
    from tunesmith.train.layout import choose_layout, install_layout
    from tunesmith.train.module import TrainingModule
    from tunesmith.train.objectives import MicroBatch, SupervisedLoss
    from tunesmith.train.optim import build_optimizer

    data = batches(load("default").tokenizer, 8, 10)
    config = LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=30,
                         num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=True)
    config._attn_implementation = "sdpa"
    model = LlamaForCausalLM(config)
    inject_lora(model, LoRAConfig(r=16, alpha=32, target_modules=TARGETS))
    freeze_base(model)
    params = list(adapter_parameters(model).values())
    model.train()
    optimizer = build_optimizer(OptimConfig(lr=2e-3), params)
    layout = install_layout(model, choose_layout(model, torch.device("cpu")))
    loss = SupervisedLoss()
    module = TrainingModule(model, loss, layout.name)
    step = lambda b: train_step(module, optimizer, params, loss, [MicroBatch(b)], lr=2e-3,
                                max_grad_norm=1.0, device=torch.device("cpu"), dtype=torch.float32)
    for batch in data[:2]:
        step(batch)
    start = time.perf_counter()
    for batch in data[2:]:
        step(batch)
    return {"width64_30_layers_step_ms": round((time.perf_counter() - start) / 8 * 1e3, 1)}


def main() -> None:
    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(0)
    for part in (attention, lora_layer, adamw, dispatch_floor):
        for key, value in part().items():
            print(f"{key:<34}{value}")


if __name__ == "__main__":
    main()
