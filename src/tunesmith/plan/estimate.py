"""``tunesmith estimate``: a training config's peak GPU memory per GPU, term by term, from the model's config alone.

The prediction is of ``torch.cuda.max_memory_allocated`` (what PyTorch's allocator hands out at the run's peak).
A GPU also holds what that number leaves out, and these decide whether a run fits: the CUDA context, the
allocator's cached but unused blocks (more under CUDA graphs, whose pools keep every bucket's blocks), and paged
optimizer state. They are listed apart and added for the fit.

The peak comes during a backward pass after the first optimizer step (the optimizer's state exists from then
on): weights, trained parameters' gradients and optimizer state, plus the activations of one micro-batch at its
largest (``micro_batch_size × max_length`` tokens, or the packed rows), the head's buffers and the backward's
temporaries. ``terms.py`` has each term's formula.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from tunesmith.plan.shapes import Shape
from tunesmith.plan.terms import (GIB, MIB, backward_working_set, block_activations, four_bit_bytes, head_buffers,
                                  optimizer_bytes, paged)

CUDA_CONTEXT = 512 * MIB  # the CUDA context and kernels of PyTorch and cuBLAS, outside the allocator
SLACK = {"eager": 0.05, "graphs": 0.30}
"""Cached-but-free blocks as a share of the micro-batch's memory, measured (BENCHMARKS.md, TinyLlama QLoRA on an
H200): reserved / allocated 12.58 / 11.99 eager, 14.67 / 11.15 under graphs, 1.74 / 1.53 graphed and
checkpointed."""
GRAPHED_ACTIVATIONS = 0.92
"""Under CUDA graphs (one varlen row per micro-batch) the same batches peaked lower than eager by 8% of their
activations: TinyLlama mb 8 × 512, QLoRA 11.15–11.23 against 11.99 GiB, LoRA 11.73–12.05 against 12.93 (H200,
BENCHMARKS.md). Which saved tensor the padded path adds is not pinned down; the factor is fitted to those runs."""
DEFAULT_WORKSPACE_MIB = 32  # cuBLAS's workspace on Hopper GPUs, one per stream that runs products (two)


@dataclass(frozen=True)
class Settings:
    """What of a training config the memory depends on (``settings_of``), and what the planner changes."""
    micro_batch_size: int
    grad_accum: int
    tokens: int  # the largest micro-batch, in tokens (padded, or packed rows)
    checkpointing: bool
    optimizer: str
    graphs: bool
    gpus: int = 1


@dataclass
class Estimate:
    settings: Settings
    terms: list[dict] = field(default_factory=list)  # {"term", "bytes", "how"}: in max_memory_allocated
    outside: list[dict] = field(default_factory=list)  # on the GPU but not in max_memory_allocated
    memory: int | None = None  # the GPU's memory, when known

    @property
    def allocated(self) -> int:
        return sum(t["bytes"] for t in self.terms)

    @property
    def total(self) -> int:
        return self.allocated + sum(t["bytes"] for t in self.outside)

    def fits(self, margin: float) -> bool:
        return self.memory is None or self.total <= self.memory * (1 - margin)

    def to_json(self) -> dict:
        return {"settings": asdict(self.settings), "terms": self.terms, "outside": self.outside,
                "allocated_bytes": self.allocated, "total_bytes": self.total, "memory_bytes": self.memory,
                "allocated_gib": round(self.allocated / GIB, 3), "total_gib": round(self.total / GIB, 3)}


def settings_of(config, *, gpus: int = 1, cuda: bool = True) -> Settings:
    train, data = config.train, config.data
    rows = train.micro_batch_size * (2 if config.method.objective == "dpo" else 1)  # a pair is two rows
    per_row = data.token_budget if data.batching == "pack" and data.token_budget else data.max_length
    graphs = (cuda and train.graphs is not False and config.method.objective == "sft" and gpus == 1
              and train.layout in ("auto", "varlen"))
    return Settings(micro_batch_size=train.micro_batch_size, grad_accum=train.grad_accum, tokens=rows * per_row,
                    checkpointing=train.gradient_checkpointing, optimizer=config.optim.name, graphs=graphs, gpus=gpus)


def estimate(config, shape: Shape, settings: Settings, *, cuda: bool = True, memory: int | None = None) -> Estimate:
    """Predicted peak memory of one GPU (``cuda``; else the CPU run's memory) for ``config`` on ``shape`` with
    ``settings`` (``settings_of(config)``, or the planner's candidate)."""
    method = config.method.name
    fp32 = config.model.dtype == "fp32" or not cuda
    b = 4 if fp32 else 2
    s, n = settings, settings.gpus
    fsdp = n > 1 and (config.train.parallel == "fsdp" or config.train.parallel == "auto" and method == "full")
    result = Estimate(settings=s, memory=memory)

    def add(term: str, value: float, how: str, *, outside: bool = False) -> None:
        (result.outside if outside else result.terms).append({"term": term, "bytes": int(value), "how": how})

    # --- weights
    shard = f" / {n} GPUs (FSDP2)" if fsdp else ""
    if method == "qlora":
        q = config.quant
        quantized = sum(four_bit_bytes(o, i, blocksize=q.blocksize, double_quant=q.double_quant)
                        for o, i in shape.linears.values())
        dense = shape.parameters - sum(o * i for o, i in shape.linears.values())
        add("weights, 4-bit", quantized, f"{q.type.upper()}{' + double quantization' if q.double_quant else ''}, "
            f"blocks of {q.blocksize}, over {len(shape.linears)} linear layers")
        add(f"weights, {'fp32' if fp32 else 'bf16'}", dense * b, "embeddings, head, norms")
    else:
        add(f"weights, {'fp32' if fp32 else 'bf16'}", shape.parameters * b / (n if fsdp else 1),
            f"{shape.parameters:,} parameters{shard}")
    # --- what trains
    if method == "full":
        numels = [shape.parameters - (shape.embedding if config.method.freeze_embeddings else 0)]
        param_bytes, what = b, "every weight"
    else:
        numels = shape.lora_parameters()
        param_bytes = 4 if method == "qlora" and config.quant.storage == "uint8" else b
        add("LoRA parameters", sum(numels) * param_bytes,
            f"{sum(numels):,} in {len(shape.lora)} adapted layers, {'fp32' if param_bytes == 4 else 'bf16'}")
        what = "the adapters"
    trained = sum(numels)
    add("gradients", trained * param_bytes / (n if fsdp else 1), f"of {what}{shard}")
    state = optimizer_bytes(s.optimizer, [max(1, k // (n if fsdp else 1)) for k in numels], param_bytes)
    add(f"optimizer state ({s.optimizer})", state, "paged: in unified memory, outside the allocator"
        if paged(s.optimizer) and cuda else f"{trained:,} parameters{shard}", outside=paged(s.optimizer) and cuda)
    if n > 1 and not fsdp:
        add("DDP gradient buckets", trained * param_bytes, "a flat copy of the gradients for the all-reduce")
    if fsdp:
        gathered = shape.embedding + shape.head + 2 * shape.block_parameters
        add("FSDP2 gathered weights", gathered * b, "embeddings and head (the root unit) and two blocks at a "
            "time (the running one and the prefetched next)")
        add("FSDP2 reduce-scatter", shape.block_parameters * 4, "one block's unsharded gradients in fp32")
    # --- one micro-batch
    t = s.tokens
    ranks = {} if method == "full" else shape.block_ranks()
    part = block_activations(shape.block, b=b, ranks=ranks, full=method == "full",
                             dropout=method != "full" and config.lora.dropout > 0)
    per_block = sum(part.values()) * (GRAPHED_ACTIVATIONS if s.graphs else 1)
    if s.checkpointing:
        add("block inputs (checkpointing)", shape.layers * t * shape.block.hidden * b,
            f"{shape.layers} blocks × {t:,} tokens × {shape.block.hidden} × {b} bytes")
        add("recomputed block", t * per_block, f"one block's activations, {per_block:,.0f} bytes per token")
        # measured: adding them over-predicted every checkpointed run on the H100 grid (BENCHMARKS.md)
        add("backward temporaries", 0, "one block's gradients in flight take the place of the recomputed "
            "activations its backward frees")
    else:
        add("activations", shape.layers * t * per_block,
            f"{shape.layers} blocks × {t:,} tokens × {per_block:,.0f} bytes per token ("
            + ", ".join(f"{k} {v:,}" for k, v in part.items()) + (", × 0.92 under graphs" if s.graphs else "") + ")")
        add("backward temporaries", t * backward_working_set(shape.block, b=b), "one block's gradients in flight")
    add("final norm and head", t * (4 * shape.block.hidden + 4) + head_buffers(
        shape.vocab, shape.block.hidden, t, b=b, softcap=shape.softcap,
        trains_head=method == "full" and not (shape.tied and config.method.freeze_embeddings)),
        "fused head: one 256-position chunk of the vocabulary at a time")
    if method == "qlora":
        largest = max(o * i for o, i in shape.linears.values())
        add("dequantized weight", largest * b, "the largest 4-bit layer, unpacked for one product")
    if cuda:
        mib = config.train.blas_workspace_mib
        mib = mib if mib != "auto" else (4 if s.checkpointing else DEFAULT_WORKSPACE_MIB)
        add("cuBLAS workspaces", 2 * mib * MIB, f"2 × {mib} MiB (train.blas_workspace_mib)")
        batch = t * (per_block * (1 if s.checkpointing else shape.layers))
        share = SLACK["graphs" if s.graphs else "eager"]
        add("allocator slack", share * batch, f"{share:.0%} of the micro-batch's activations "
            + ("(CUDA graph pools keep every bucket's blocks)" if s.graphs else "(cached free blocks)"), outside=True)
        add("CUDA context", CUDA_CONTEXT, "driver, kernels and libraries, outside the allocator", outside=True)
    return result


def format_estimate(estimate: Estimate, *, source: str, margin: float) -> str:
    s = estimate.settings
    lines = [f"{source}: micro-batch {s.micro_batch_size} × accumulation {s.grad_accum}, {s.tokens:,} tokens per "
             f"micro-batch, checkpointing {'on' if s.checkpointing else 'off'}, {s.optimizer}, "
             f"graphs {'on' if s.graphs else 'off'}" + (f", {s.gpus} GPUs" if s.gpus > 1 else "")]
    width = max(len(t["term"]) for t in estimate.terms + estimate.outside)
    for t in estimate.terms:
        lines.append(f"  {t['term']:<{width}}  {t['bytes'] / GIB:8.3f} GiB  {t['how']}")
    lines.append(f"  {'predicted peak allocated':<{width}}  {estimate.allocated / GIB:8.3f} GiB")
    for t in estimate.outside:
        lines.append(f"  {t['term']:<{width}}  {t['bytes'] / GIB:8.3f} GiB  {t['how']}")
    lines.append(f"  {'needed on the GPU':<{width}}  {estimate.total / GIB:8.3f} GiB")
    if estimate.memory is not None:
        verdict = "fits" if estimate.fits(margin) else "does NOT fit"
        lines.append(f"  {verdict} in {estimate.memory / GIB:.2f} GiB with a {margin:.0%} margin "
                     f"({estimate.total / estimate.memory:.0%} used)")
    return "\n".join(lines)
