"""CUDA graphs of a micro-batch's forward and backward (``train.graphs``, on by default where they can run): the
host records a step's kernels once and the GPU replays them, instead of launching each of them every micro-batch.

Why: a LoRA step on a 1B model launches ~5,000 kernels, and on an H200 the host takes longer to launch them
than the GPU takes to run them (the GPU measured busy 30% of a step, BENCHMARKS.md). A replayed graph costs
one launch.

What a graph needs is a batch of fixed shape with no host decision inside it, so each micro-batch is laid out
on the host as one row of fixed size (``graph_plan``):

    tokens     every example's real tokens end to end (the ``varlen`` layout's row), then padding up to a
               bucket (sizes growing by ``GROWTH``, capped at the micro-batch's largest size: micro_batch_size
               × max_length, or the packed rows), so a run captures a few graphs, not one per batch
    sequences  where each example starts (``cu_seqlens`` for PyTorch's variable-length flash kernel), padded
               with empty sequences to a power of two, at least ``MIN_SEQUENCES``; the padding tokens are one
               sequence of their own
    targets    the token each position predicts, and its loss scale: 1 / (the step's trained tokens) where it
               trains, 0 elsewhere, so the graph's loss is the engine's micro-batch loss

Every position goes through the output head (scaled by 0 where nothing trains): the trained count changes
from batch to batch and a graph cannot. The loss and gradients equal the plain path's (tested on the CPU,
where the same plan runs eagerly); the capture itself runs on CUDA only.

A run starts with one eager micro-batch (lazy initialisation: cuBLAS handles, the kernel's first call), then
captures a graph the first time each (tokens, sequences) shape is seen and replays it from then on. All graphs
share one memory pool: a graph's memory is live only while it replays, and micro-batches run one after
another. The backward inside a graph adds into the parameters' ``.grad`` tensors, which must therefore stay
the same tensors for the whole run: the engine zeroes them after a step instead of freeing them.

Gradient checkpointing: a checkpointed block runs its forward twice, the second time inside the backward, and
its random draws (LoRA dropout) must be the same both times. PyTorch's checkpoint ensures that by reading and
setting the generator's state on the host, which a graph cannot record. Under graphs each block instead draws
from generators of its own (``BlockDraws``, handed to the checkpoint function as its ``context_fn`` when
checkpointing is enabled): one for its forward, one for its recomputation, both seeded from (run seed, step,
micro-batch, block) on the host before every micro-batch, so the recomputation draws what the forward drew. The
graph reads the seeds when it replays (the generators are registered with it).

Which objective: the supervised one only. A graph records one fixed computation, and the supervised loss is a
sum over positions, which a fixed-size row holds exactly: each position's term times its scale (``plan_loss``,
the same sum as ``SupervisedLoss``; tested against it). The engine runs it in place of the training module's
forward when graphs are on, and refuses any other objective there. The preference losses (DPO / IPO / SimPO) are
not such a sum: each is a non-linear function of a pair's summed log-probabilities (−log σ of a scaled
chosen-minus-rejected difference for DPO and SimPO, a square for IPO), over a number of pairs that changes from
batch to batch, and DPO and IPO read a reference — the same model with its adapters switched off (a switch set
on the host around a second forward), or cached log-probabilities looked up by example index. Recording them
would need a plan with per-pair segments padded to a fixed count and the reference pass inside the graph; that is
not built, so preference runs train eagerly (``choose_graphs`` says so in ``summary.json``).

``train.graphs=auto`` (the default) uses graphs wherever ``choose_graphs`` finds they can run (CUDA, the
supervised objective, one process, plain causal attention, checkpointing where transformers supports it);
``true`` refuses a run where they cannot. Should recording a graph still fail (a model family whose
forward reads a device value on the host), the run warns and goes on eagerly over the same plan, and
``summary.json`` says why.
"""

from __future__ import annotations

import contextlib
import hashlib
import sys
from dataclasses import dataclass

import torch

from tunesmith.errors import TunesmithError
from tunesmith.templates import IGNORE_INDEX
from tunesmith.train import varlen
from tunesmith.train.kernels import release_blas_workspaces
from tunesmith.train.layout import runs_varlen
from tunesmith.train.loss import autocast_for, head_loss
from tunesmith.train.varlen import varlen_plan, varlen_states

GROWTH = 2 ** 0.25
"""Token buckets grow by this factor (rounded up to ``ALIGN``): a batch pads by under a fifth, and batches of
one run fall into a few buckets (four graphs in a 20-step TinyLlama run, BENCHMARKS.md)."""
ALIGN = 64
MIN_SEQUENCES = 32
"""Sequences per plan at least (empty ones cost the kernel nothing measurable): packed rows of short examples
vary in count from batch to batch, and each count would otherwise be a graph of its own (measured: 4 graphs in
32 packed micro-batches of the Llama-3.1-8B shape with a floor of 1, BENCHMARKS.md)."""


@dataclass
class GraphPlan:
    """One micro-batch laid out at a fixed shape (module docstring), on the host."""

    input_ids: torch.Tensor  # (N,) long
    position_ids: torch.Tensor  # (N,) long
    cu_seqlens: torch.Tensor  # (K + 1,) int32
    targets: torch.Tensor  # (N,) long: the token position n predicts (0 where nothing trains)
    scales: torch.Tensor  # (N,) float32: the loss scale of position n (0 where nothing trains)

    @property
    def key(self) -> tuple[int, int]:
        return len(self.input_ids), len(self.cu_seqlens)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids, "position_ids": self.position_ids, "cu_seqlens": self.cu_seqlens,
                "targets": self.targets, "scales": self.scales}


def _aligned(n: float) -> int:
    return -(-int(n) // ALIGN) * ALIGN


def bucket(tokens: int, capacity: int) -> int:
    """The padded size for ``tokens`` real tokens: the smallest bucket (``ALIGN``, then × ``GROWTH`` each) that
    holds them, and never more than ``capacity`` (the micro-batch's largest size, itself a bucket)."""
    size = ALIGN
    while size < tokens:
        size = max(_aligned(size * GROWTH), size + ALIGN)
    return max(min(size, _aligned(capacity)), _aligned(tokens))


def graph_plan(host: dict, *, capacity: int, scale: float) -> GraphPlan:
    """``host`` (a collated micro-batch: right-padded rows, or packed rows with ``position_ids``) as a fixed-shape
    plan (module docstring). ``capacity``: the largest micro-batch in tokens; ``scale``: 1 / the step's trained
    tokens."""
    plan = varlen_plan(host)
    if plan is None:
        raise TunesmithError("train.graphs needs right-padded or packed batches; this batch is left-padded")
    ids, positions, index, cu, _ = plan
    ids, positions = ids[0], positions[0]
    real = len(ids)
    size = bucket(real, capacity)
    spans = len(cu) - 1 + (size > real)  # the examples, then the padding's own sequence
    slots = max(MIN_SEQUENCES, 1 << (spans - 1).bit_length())  # a power of two ≥ spans: the rest are empty
    cu_seqlens = torch.full((slots + 1,), size, dtype=torch.int32)
    cu_seqlens[:len(cu)] = cu.to(torch.int32)
    full_ids = torch.zeros(size, dtype=torch.long)
    full_ids[:real] = ids
    full_positions = torch.zeros(size, dtype=torch.long)
    full_positions[:real] = positions
    full_positions[real:] = torch.arange(size - real)
    labels = host["labels"][:, 1:]
    keep = labels != IGNORE_INDEX
    where = index[:, :-1][keep]
    targets = torch.zeros(size, dtype=torch.long)
    targets[where] = labels[keep]
    scales = torch.zeros(size, dtype=torch.float32)
    scales[where] = scale
    return GraphPlan(full_ids, full_positions, cu_seqlens, targets, scales)


def plan_loss(model, input_ids: torch.Tensor, position_ids: torch.Tensor, cu_seqlens: torch.Tensor,
              targets: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The micro-batch's loss from a plan's tensors (on the model's device): what a graph records. It is
    ``SupervisedLoss``'s loss for the micro-batch (the summed cross-entropy of its trained tokens over the
    step's), in the ``varlen`` layout at a fixed size."""
    hidden = varlen_states(model.get_decoder(), input_ids[None], position_ids[None], cu_seqlens, len(input_ids))
    return head_loss(model, hidden, targets, scales)


def choose_graphs(config, model, device: torch.device, world_size: int = 1) -> dict:
    """Whether this run's micro-batches go through CUDA graphs, and why: ``{"used": bool, "reason": str}``
    (``summary.json``'s ``"graphs"``). ``train.graphs=auto`` uses them wherever they can run; ``true`` refuses a
    run where they cannot, before the run dir is made; ``false`` never uses them."""
    requested = config.train.graphs
    if requested is False:
        return {"used": False, "reason": "train.graphs=false"}
    why = _blocker(config, model, device, world_size)
    if why is None:
        return {"used": True, "reason": f"train.graphs={str(requested).lower()}: CUDA, supervised, one process, "
                                        "plain causal attention"
                                        + (", graph-safe checkpointing" if config.train.gradient_checkpointing else "")}
    if requested == "auto":
        return {"used": False, "reason": f"train.graphs=auto: graphs need {why}"}
    raise TunesmithError(f"train.graphs=true needs {why}; set train.graphs=auto or false")


def _blocker(config, model, device: torch.device, world_size: int) -> str | None:
    if device.type != "cuda":
        return f"a CUDA GPU; this run is on {device.type}"
    if not varlen.available():
        return "PyTorch's variable-length attention (torch.nn.attention.varlen, torch ≥ 2.10)"
    if config.method.objective != "sft":
        return "the supervised objective (method.objective=sft); preference training runs eager"
    if config.train.layout not in ("auto", "varlen"):
        return f"train.layout=auto (graphs lay every batch out as one varlen row; this run forces {config.train.layout})"
    if config.train.gradient_checkpointing and not getattr(model, "supports_gradient_checkpointing", False):
        return "no gradient checkpointing, or a model that supports transformers' gradient checkpointing"
    if world_size > 1:
        return "one process (DDP and FSDP2 communicate between micro-batches)"
    if not runs_varlen(model, device, config.data.max_length):
        return ("attention the varlen layout can run: SDPA or eager, plain causal softmax (no sliding window, "
                "soft-capping or attention dropout), a decoder that hands keyword arguments to its blocks")
    return None


class BlockDraws:
    """Graph-safe random draws for checkpointed blocks (module docstring). Handed to the checkpoint function as
    its ``context_fn`` (``checkpoint_options``), so PyTorch calls ``contexts`` once per checkpointed block, in
    forward order: the micro-batch's ``k``-th block runs its forward drawing from ``pairs[k][0]`` and its
    recomputation from ``pairs[k][1]``. ``reseed`` sets both to the same seed before each micro-batch, so the
    recomputation repeats the forward's draws (LoRA dropout masks) exactly, and a run (or a resumed one) draws
    the same masks for the same (seed, step, micro-batch)."""

    def __init__(self, device: torch.device, seed: int):
        self.device, self.seed = device, seed
        if device.type == "cuda":
            index = torch.cuda.current_device() if device.index is None else device.index
            self.default = torch.cuda.default_generators[index]
        else:
            self.default = torch.default_generator
        self.pairs: list[tuple[torch.Generator, torch.Generator]] = []
        self.draw, self.blocks_seen = (0, 0), 0

    def checkpoint_options(self) -> dict:
        """Keyword arguments for PyTorch's checkpoint (``enable_gradient_checkpointing``): the states are ours, as
        PyTorch's own preservation reads the generator on the host, which a graph cannot record."""
        return {"preserve_rng_state": False, "context_fn": self.contexts}

    @property
    def generators(self) -> list[torch.Generator]:
        return [generator for pair in self.pairs for generator in pair]

    def reseed(self, draw: tuple[int, int]) -> None:
        """Before micro-batch ``draw`` = (step, index in the step): on the host, outside any graph."""
        self.draw, self.blocks_seen = draw, 0
        for block, pair in enumerate(self.pairs):
            self._seed(pair, block)

    def contexts(self):
        """(forward context, recomputation context) for the next checkpointed block of the micro-batch."""
        block, self.blocks_seen = self.blocks_seen, self.blocks_seen + 1
        if block == len(self.pairs):  # met for the first time: in the run's first micro-batch, which runs eagerly
            self.pairs.append((torch.Generator(device=self.device), torch.Generator(device=self.device)))
            self._seed(self.pairs[block], block)
        forward, recompute = self.pairs[block]
        return _drawing_from(self.default, forward), _drawing_from(self.default, recompute)

    def _seed(self, pair: tuple[torch.Generator, torch.Generator], block: int) -> None:
        key = f"{self.seed}:{self.draw[0]}:{self.draw[1]}:{block}".encode()
        seed = int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") >> 1
        for generator in pair:
            generator.manual_seed(seed)


@contextlib.contextmanager
def _drawing_from(default: torch.Generator, generator: torch.Generator):
    """Draws made through ``default`` (what dropout uses) come from ``generator`` and advance it."""
    if default.device.type == "cuda":  # swapped in by reference: recordable in a graph
        previous = default.graphsafe_get_state()
        default.graphsafe_set_state(generator)
        try:
            yield
        finally:
            default.graphsafe_set_state(previous)
        return
    previous = default.get_state()  # the CPU generator has no graph-safe form: copy the state in and out
    default.set_state(generator.get_state())
    try:
        yield
    finally:
        generator.set_state(default.get_state())
        default.set_state(previous)


class GraphedSteps:
    """Runs micro-batches (forward and backward) through CUDA graphs (module docstring); ``run`` returns the
    micro-batch's loss, already back-propagated into the parameters' ``.grad``."""

    def __init__(self, model, params: list[torch.nn.Parameter], device: torch.device, dtype: torch.dtype,
                 capacity: int, *, draws: BlockDraws | None = None):
        """``draws``: the checkpointed blocks' random draws, when the model checkpoints through them."""
        self.model, self.params, self.device, self.dtype, self.capacity = model, params, device, dtype, capacity
        self.draws = draws
        self.graphs: dict[tuple[int, int], tuple] = {}
        self.pool = None
        # eager micro-batches and recordings share one side stream: cuBLAS keeps a workspace per (thread, stream),
        # so one stream holds two (forward and backward thread) instead of four
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.warm = False
        self.failed: str | None = None  # why recording a graph failed; every micro-batch then runs eagerly

    def run(self, host: dict, scale: float, draw: tuple[int, int] = (0, 0)) -> torch.Tensor:
        """``draw``: (step, index in the step), which seeds checkpointed blocks' random draws."""
        plan = graph_plan(host, capacity=self.capacity, scale=scale)
        if self.draws is not None:
            self.draws.reseed(draw)
        inputs = {name: t.pin_memory().to(self.device, non_blocking=True) for name, t in plan.tensors().items()}
        if not self.warm or self.failed:  # the first micro-batch runs eagerly: lazy initialisation stays out
            if not self.warm:
                release_blas_workspaces()  # the default stream's (evaluation, loading): not used again here
            self.warm = True
            return self._eager(inputs)
        entry = self.graphs.get(plan.key)
        if entry is None:
            try:
                entry = self._capture(inputs)
            except Exception as error:  # e.g. a model family whose forward reads a device value on the host
                self.failed = f"{type(error).__name__}: {error}".splitlines()[0][:300]
                print(f"warning: recording a CUDA graph failed ({self.failed}); the run goes on without graphs",
                      file=sys.stderr)
                torch.cuda.synchronize(self.device)
                return self._eager(inputs)
            self.graphs[plan.key] = entry
        graph, static, loss = entry
        for name, tensor in inputs.items():
            static[name].copy_(tensor, non_blocking=True)
        graph.replay()
        return loss

    def _eager(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        with self._on_side_stream():
            with autocast_for(self.device, self.dtype, cache=False):
                loss = plan_loss(self.model, **inputs)
            loss.backward()
        return loss.detach()

    @contextlib.contextmanager
    def _on_side_stream(self):
        if self.stream is None:
            yield
            return
        main = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(main)  # the inputs' copies, the last step's zeroed gradients
        with torch.cuda.stream(self.stream):
            yield
        main.wait_stream(self.stream)  # the optimizer step reads the gradients

    def _capture(self, inputs: dict[str, torch.Tensor]) -> tuple:
        # the graph adds into these gradient tensors on every replay: they exist before it and are never freed
        for param in self.params:
            if param.grad is None:
                param.grad = torch.zeros_like(param)
        static = {name: tensor.clone() for name, tensor in inputs.items()}
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
            # the eager micro-batch's activations are cached by the allocator; the graphs' pool would sit beside
            # them: hand them back first
            torch.cuda.empty_cache()
        graph = torch.cuda.CUDAGraph()
        for generator in self.draws.generators if self.draws is not None else ():
            graph.register_generator_state(generator)  # the replay reads their seeds from the host
        torch.cuda.synchronize(self.device)
        with torch.cuda.graph(graph, pool=self.pool, stream=self.stream):
            with autocast_for(self.device, self.dtype, cache=False):
                loss = plan_loss(self.model, **static)
            loss.backward()
        return graph, static, loss.detach()

    def summary(self) -> dict:
        return {"graphs": len(self.graphs), "shapes": [list(key) for key in sorted(self.graphs)],
                **({"failed": self.failed} if self.failed else {})}
