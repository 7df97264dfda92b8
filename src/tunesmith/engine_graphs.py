"""Decode steps as CUDA graphs: one recorded per (batch bucket, adapters in the batch or not, cache allocation).

A decode step of a small batch launches hundreds of small kernels (every layer, every LoRA product); replaying a
recorded graph launches them at once. A graph replays fixed shapes at fixed addresses, so a step is padded up to
a bucket: the batch to the next power of two (rows past the running ones decode a pad token into free cache
rows, which nobody reads), and attention reads every column the cache has allocated (columns past a row's
length are masked; at decode, reading them costs little next to the weights), so the graphs are one per batch
bucket until the cache grows. Everything a step varies by (tokens, each row's length, each row's adapter slot) is
copied into the graph's input tensors before the replay; masks and positions are computed inside the graph.

Graphs whose batch holds an adapter run every row through the stacked adapters (``AdapterSlots.indexed``);
batches of base rows replay a graph without adapter products, so loading adapters costs base traffic nothing.
When the cache grows (new buffers), the graphs recorded on the old ones are dropped. If recording fails (a
model whose forward reads a device value on the host), decoding goes on eagerly, with a warning.
"""

from __future__ import annotations

import sys

import torch

def _bucket(n: int) -> int:
    return 1 << (n - 1).bit_length()


class DecodeGraphs:
    def __init__(self, engine):
        self.engine = engine
        self.graphs: dict[tuple[int, int, bool], tuple] = {}
        self.version = None
        self.pool = None
        self.stream = None
        self.failed: str | None = None

    def decode(self, tokens: list[int], lengths: list[int], names: list[str | None], width: int) -> torch.Tensor:
        """The last-position logits of one decode step for the running rows (``Engine._decode``'s inputs)."""
        engine, count = self.engine, len(tokens)
        batch = min(_bucket(count), max(_bucket(engine.max_batch), count))
        engine.cache.reserve(max(_bucket(engine.max_batch), batch), width)
        width = engine.cache.shape[1]  # every allocated column: one graph per batch bucket, not per length
        version = (engine.cache.version, getattr(engine.adapters, "version", 0))
        if self.version != version:  # buffers the graphs read were reallocated
            self.graphs.clear()
            self.version = version
        adapters = engine.adapters is not None and any(name is not None for name in names)
        slots = [engine.adapters.slot(name) for name in names] if adapters else []
        host = torch.tensor([tokens + [engine.pad_id] * (batch - count), lengths + [0] * (batch - count),
                             slots + [0] * (batch - count) if adapters else [0] * batch], dtype=torch.long)
        key = (batch, width, adapters)
        if self.failed is None and key not in self.graphs:
            try:
                self.graphs[key] = self._record(batch, width, adapters, host)
            except Exception as error:  # e.g. a forward that reads a device value on the host
                self.failed = f"{type(error).__name__}: {error}".splitlines()[0][:300]
                print(f"warning: recording a decode CUDA graph failed ({self.failed}); decoding goes on without "
                      f"graphs", file=sys.stderr)
                torch.cuda.synchronize(engine.device)
        if self.failed is not None:
            inputs = host.to(engine.device)
            return self._step(inputs, width, adapters)[:count]
        graph, inputs, logits = self.graphs[key]
        inputs.copy_(host, non_blocking=True)
        graph.replay()
        return logits[:count]

    def _step(self, inputs: torch.Tensor, width: int, adapters: bool) -> torch.Tensor:
        engine = self.engine
        tokens, columns, slots = inputs[0], inputs[1], inputs[2]
        masks, positions = engine.decode_inputs(columns, width)
        engine.cache.decode(len(columns), columns, width)
        if not adapters:
            return engine.forward(tokens[:, None], masks, positions)
        with engine.adapters.indexed(slots):
            return engine.forward(tokens[:, None], masks, positions)

    def _record(self, batch: int, width: int, adapters: bool, host: torch.Tensor) -> tuple:
        device = self.engine.device
        inputs = host.to(device)
        if self.stream is None:
            self.stream = torch.cuda.Stream(device)
            self.pool = torch.cuda.graph_pool_handle()
        # a warm-up run on the recording stream first (lazy initialisation, cuBLAS workspaces); it writes only
        # the pad rows' and the running rows' next columns, which the replay writes again
        self.stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(self.stream):
            self._step(inputs, width, adapters)
        torch.cuda.current_stream(device).wait_stream(self.stream)
        torch.cuda.synchronize(device)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool, stream=self.stream):
            logits = self._step(inputs, width, adapters)
        return graph, inputs, logits

    def summary(self) -> dict:
        return {"graphs": len(self.graphs), "shapes": [list(key) for key in sorted(self.graphs)],
                **({"failed": self.failed} if self.failed else {})}
