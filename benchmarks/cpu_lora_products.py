"""The ways to give each row its own adapter on the CPU, one decode step's products of the embedded model's shapes:
what ``peft/multi.py`` runs (the masked stack) against what PyTorch offers for per-adapter products.

Per layer (the seven products of a block, q k v o gate up down; 16 rows, rank-16 adapters assigned round-robin,
weights kept in cache, µs summed over the seven):
- ``base``: the base products alone;
- ``masked``: + every row through the stack, its own block kept by a 0/1 mask (``MultiLoRALinear``'s whole-stack
  path);
- ``grouped_mm``: + rows sorted by adapter through ``torch._grouped_mm`` (one call per product);
- ``padded_bmm``: + rows grouped by adapter into padded batches for ``bmm``;
- ``chunks2`` / ``chunks4``: + rows sorted by adapter, split into 2 or 4 chunks, each masked over its own slots;
- ``segments``: + a product pair per adapter over its rows (gathered and scattered by index).

Then a 30-layer step with distinct weights (read from memory): the masked stack against the B stack appended to
the base weight as extra columns (``W x + B h`` as one product). And one rank-16 product, (n×16)(16×1,536) for
n = 30, in its orientations and thread counts.

    .venv/bin/python benchmarks/cpu_lora_products.py
"""

from __future__ import annotations

import json
import time

import torch

from cpu_decode_floor import SHAPES  # q k v o gate up down
RANK, ROWS = 16, 16


def micros(run, repeats: int = 300) -> float:
    for _ in range(20):
        run()
    start = time.perf_counter()
    for _ in range(repeats):
        run()
    return (time.perf_counter() - start) / repeats * 1e6


def mask_for(slots: torch.Tensor, first: int, end: int) -> torch.Tensor:
    return (slots[:, None] == torch.arange(first, end).repeat_interleave(RANK)[None, :]).float()


def per_layer(adapters: int) -> dict:
    slots = torch.arange(ROWS) % adapters
    members = [torch.nonzero(slots == k).flatten() for k in range(adapters)]  # each adapter's rows
    order = torch.cat(members)
    offsets = torch.cumsum(torch.tensor([len(m) for m in members]), 0).to(torch.int32)
    widest = max(len(m) for m in members)
    gather = torch.cat([torch.cat([m, m[-1:].expand(widest - len(m))]) for m in members])  # pads repeat a row
    place = torch.empty(ROWS, dtype=torch.long)  # each row's place among the padded groups
    for k, m in enumerate(members):
        place[m] = torch.arange(len(m)) + k * widest
    totals: dict[str, float] = {}
    for d_in, d_out in SHAPES:
        weight = torch.randn(d_out, d_in)
        a, b = torch.randn(adapters * RANK, d_in) * 0.01, torch.randn(d_out, adapters * RANK) * 0.01
        x = torch.randn(ROWS, d_in)
        mask = mask_for(slots, 0, adapters)
        a3, b3 = a.view(adapters, RANK, d_in).transpose(1, 2), b.view(d_out, adapters, RANK).permute(1, 2, 0)
        sorted_x = x[order]

        def chunked(parts: int):
            out = x @ weight.T
            size = ROWS // parts
            for j in range(parts):
                rows = order[j * size:(j + 1) * size]
                first, end = int(slots[rows].min()), int(slots[rows].max()) + 1
                block = slice(first * RANK, end * RANK)
                out.index_add_(0, rows, ((x[rows] @ a[block].T) * mask_for(slots[rows], first, end)) @ b[:, block].T)
            return out

        def segments():
            out = x @ weight.T
            for k, rows in enumerate(members):
                block = slice(k * RANK, (k + 1) * RANK)
                out.index_add_(0, rows, (x[rows] @ a[block].T) @ b[:, block].T)
            return out

        runs = {
            "base": lambda: x @ weight.T,
            "masked": lambda: (x @ weight.T).addmm_((x @ a.T) * mask, b.T),
            "grouped_mm": lambda: (x @ weight.T).index_add_(0, order, torch._grouped_mm(
                torch._grouped_mm(sorted_x, a3, offs=offsets), b3, offs=offsets)),
            "padded_bmm": lambda: (x @ weight.T) + torch.bmm(torch.bmm(x[gather].view(adapters, widest, d_in), a3),
                                                             b3).view(-1, d_out)[place],
            "chunks2": lambda: chunked(2),
            "chunks4": lambda: chunked(4),
            "segments": segments,
        }
        reference = runs["masked"]()
        for name, run in runs.items():
            if name != "base":
                torch.testing.assert_close(run(), reference, rtol=1e-4, atol=1e-4)
            totals[name] = totals.get(name, 0.0) + micros(run)
    return {"run": "per layer, µs", "adapters": adapters, **{k: round(v) for k, v in totals.items()}}


def appended_b(adapters: int, layers: int = 30, repeats: int = 8) -> dict:
    columns = adapters * RANK
    slots = torch.arange(ROWS) % adapters
    mask = mask_for(slots, 0, adapters)
    stacks = [[(torch.randn(d_out, d_in), torch.randn(columns, d_in) * 0.01, torch.randn(d_out, columns) * 0.01)
               for d_in, d_out in SHAPES] for _ in range(layers)]
    joined = [[(w, a, torch.cat([w, b], 1)) for w, a, b in layer] for layer in stacks]
    inputs = {576: torch.randn(ROWS, 576), 1536: torch.randn(ROWS, 1536)}

    def masked():
        for layer in stacks:
            for w, a, b in layer:
                x = inputs[w.shape[1]]
                (x @ w.T).addmm_((x @ a.T) * mask, b.T)

    def appended():
        for layer in joined:
            for w, a, wb in layer:
                x = inputs[w.shape[1]]
                torch.cat([x, (x @ a.T) * mask], 1) @ wb.T

    return {"run": "30-layer step, ms", "adapters": adapters, "masked": round(micros(masked, repeats) / 1e3, 1),
            "B appended to W": round(micros(appended, repeats) / 1e3, 1)}


def rank16_orientations() -> dict:
    h, b = torch.randn(30, 16), torch.randn(1536, 64)[:, 16:32]
    out = torch.randn(30, 1536)
    threads = torch.get_num_threads()
    row = {"run": "(30×16)(16×1536), µs", "threads": threads, "h @ bᵀ": round(micros(lambda: h @ b.T, 2000), 1),
           "(b @ hᵀ)ᵀ": round(micros(lambda: (b @ h.T).T, 2000), 1),
           "out.addmm_": round(micros(lambda: out.addmm_(h, b.T), 2000), 1)}
    torch.set_num_threads(1)
    row["h @ bᵀ, one thread"] = round(micros(lambda: h @ b.T, 2000), 1)
    torch.set_num_threads(threads)
    return row


def main() -> None:
    torch.manual_seed(0)
    torch.set_grad_enabled(False)
    for adapters in (4, 8):
        print(json.dumps(per_layer(adapters)), flush=True)
    for adapters in (4, 8):
        print(json.dumps(appended_b(adapters)), flush=True)
    print(json.dumps(rank16_orientations(), ensure_ascii=False), flush=True)


if __name__ == "__main__":
    main()
