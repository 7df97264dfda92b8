"""The one training loop, for every objective (SFT, DPO / IPO / SimPO), top to bottom: set up (kernels, layout,
the training module, optimizer) → resume or start (evaluating first) → steps (plan, accumulate, clip, step,
count, log, evaluate, checkpoint) → the result.

What an objective changes is an ``Objective``: how a micro-batch becomes a loss (``train/objectives.py``), how
its examples are batched and counted, and how it evaluates. Everything else — accumulation, the schedule, the
non-finite policy, logging and progress, eval-every, checkpoints, the token count — is written once, here,
and the run's position is one ``TrainState``, which is also what a checkpoint stores (``train/resume.py``).

``train`` takes a ``TrainInput`` (what setup decided: the recipes build it) and returns a ``TrainResult``; it
changes nothing it was given but the model, which it trains.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tunesmith.config import RunConfig
from tunesmith.data.batching import plan_batches
from tunesmith.errors import TunesmithError
from tunesmith.train.dist import SINGLE, World, current, sum_counts, sum_floats
from tunesmith.train.fsdp import clip_gradients, gathered_model, parallel_for, sharded
from tunesmith.train.graphs import BlockDraws, GraphedSteps
from tunesmith.train.kernels import install_kernels
from tunesmith.train.layout import Layout, install_layout
from tunesmith.train.loss import autocast_for, enable_gradient_checkpointing
from tunesmith.train.metrics import MetricsLog, Progress
from tunesmith.train.module import TrainingModule, wrap_for
from tunesmith.train.objectives import MicroBatch, SupervisedLoss
from tunesmith.train.optim import build_optimizer
from tunesmith.train.products import install_products, remove_products
from tunesmith.train.resume import load_resume_state, save_training_checkpoint
from tunesmith.train.schedule import lr_at, warmup_steps
from tunesmith.train.state import TrainState


@dataclass
class Objective:
    """What one training objective brings to the engine."""

    loss: object
    """``SupervisedLoss`` or ``PreferenceLoss``: micro-batch → loss and logged metrics."""
    lengths: list[int]
    """Tokens of each training example (pairs: chosen + rejected); the batch plan and the token count use them."""
    collate: Callable[[list], MicroBatch]
    """A batch of the plan (example indices; bins of indices when packing) → its micro-batch."""
    evaluate: Callable[..., dict] | None
    """``evaluate(model, phase, task=True)``: held-out metrics of ``model``; phase "before"/"after" also saves
    them, None only computes (eval-every, without the task metrics). None: the run has no held-out data."""
    eval_log: dict[str, str]
    """Log-row key → ``evaluate`` metric logged at ``train.eval_every``."""
    token_budget: int | None = None
    """Tokens per packed row (``data.batching=pack``)."""


@dataclass
class TrainInput:
    """Everything one training run needs, decided at setup (``recipes/setup.py`` builds it from a run's setup)."""

    config: RunConfig
    """The resolved config: train, optim, schedule, batching and eval settings; every checkpoint saves it."""
    run_dir: Path
    """Where ``metrics.jsonl`` and ``checkpoints/`` are written."""
    model: torch.nn.Module
    params: list[torch.nn.Parameter]
    """What trains: the adapters (LoRA / QLoRA) or the model's weights (full)."""
    objective: Objective
    device: torch.device
    dtype: torch.dtype
    layout: Layout
    """The layout chosen at setup (``choose_layout``); the engine installs it (under CUDA graphs: ``varlen``)."""
    graphs: dict | None
    """``choose_graphs``'s choice, ``{"used": bool, "reason": str}``."""
    fingerprints: dict
    """The data and model fingerprints every checkpoint records and a resume compares (``train/resume.py``)."""
    products: dict | None = None
    """``train/products.py``'s choice for the forward and the backward (None: exact); the engine installs it and
    removes it when training ends."""
    resume: bool = False
    """Continue from the run's newest checkpoint, checked against this run first; False: start at step 0,
    evaluating first (``eval.before``)."""
    on_micro_batch: Callable[[int, int], None] | None = None
    """``on_micro_batch(step, micro_index)`` runs before every micro-batch (tests stop runs with it)."""


@dataclass
class TrainResult:
    state: TrainState
    """Where the run ended: steps, tokens, skipped steps, train seconds."""
    model: torch.nn.Module
    """The trained model in eval mode, whole: under FSDP2 gathered to rank 0 (every rank joins)."""
    layout: Layout
    """The layout as installed (``summary.json``'s ``"layout"``)."""
    kernels: dict
    """What ``train/kernels.py`` installed (``summary.json``'s ``"kernels"``)."""
    graphs: dict | None
    """The graphs choice and, when used, what they recorded (``summary.json``'s ``"graphs"``)."""
    products: dict | None = None
    """The forward and backward products the run trained with (``summary.json``'s ``"forward_products"`` and
    ``"backward_products"``)."""


def train(run: TrainInput) -> TrainResult:
    """Train ``run.model`` on ``run.objective`` from step 0 (evaluating it first) or from the run's newest
    checkpoint; returns the final state, the model and what was installed on it."""
    world = current()
    parallel = parallel_for(run.config, world)  # refuses what the chosen parallelism cannot do, before any work
    _evaluate_before(run, world)
    training = _set_up(run, world, parallel)
    try:
        state = _resume_or_start(run, training, world)
        _run_steps(run, training, state, world)
    finally:
        remove_products(run.model)  # nothing after training may read a copy of a weight
    return _finish(run, training, state, world)


@dataclass
class _Training:
    """What setup installed and built, once, before the first training forward."""

    module: torch.nn.Module
    """The ``TrainingModule``, wrapped for the processes (DDP, FSDP2) or itself in one."""
    params: list[torch.nn.Parameter]
    """What the optimizer steps: ``run.params``, or their shards under FSDP2."""
    optimizer: torch.optim.Optimizer
    layout: Layout
    kernels: dict
    graphs: GraphedSteps | None


def _evaluate_before(run: TrainInput, world: World) -> None:
    # before wrapping: rank 0 still holds the whole model (FSDP2 shards it next); the others wait at the wrap
    if not run.resume and run.config.eval.before and run.objective.evaluate is not None and world.main:
        run.objective.evaluate(run.model, "before")


def _set_up(run: TrainInput, world: World, parallel: str) -> _Training:
    """Kernels, checkpointing and the layout installed on the model once, before any training forward; the
    training module wrapped for the processes; the optimizer; under CUDA graphs, the graphed steps."""
    config, model, device = run.config, run.model, run.device
    use_graphs = bool(run.graphs and run.graphs["used"])
    if use_graphs and not isinstance(run.objective.loss, SupervisedLoss):
        raise TunesmithError("CUDA graphs record the supervised loss only (train/graphs.py); set train.graphs=false")
    kernels = install_kernels(model, config.train.kernels)
    install_products(model, run.products)
    # under graphs, checkpointed blocks draw from generators of their own (train/graphs.py)
    draws = BlockDraws(device, config.seed) if use_graphs and config.train.gradient_checkpointing else None
    if config.train.gradient_checkpointing:
        enable_gradient_checkpointing(model, **(draws.checkpoint_options() if draws else {}))
    # graphs lay every micro-batch out as one varlen row (train/graphs.py)
    layout = install_layout(model, Layout("varlen", "CUDA graphs: every micro-batch as one row of fixed size")
                            if use_graphs else run.layout)
    module = wrap_for(TrainingModule(model, run.objective.loss, layout.name), world, device, parallel=parallel,
                      dtype=run.dtype)
    # FSDP2 replaced every parameter by its shard: the optimizer steps the shards
    params = [p for p in model.parameters() if p.requires_grad] if sharded(model) else run.params
    optimizer = build_optimizer(config.optim, params)
    graphs = None
    if use_graphs:
        width = run.objective.token_budget if config.data.batching == "pack" else config.data.max_length
        graphs = GraphedSteps(model, params, device, run.dtype, capacity=config.train.micro_batch_size * width,
                              draws=draws)
    return _Training(module=module, params=params, optimizer=optimizer, layout=layout, kernels=kernels,
                     graphs=graphs)


def _per_step(run: TrainInput, world: World) -> int:
    """Micro-batches per step, all ranks together: each rank takes grad_accum of them, the next grad_accum ×
    ranks of the epoch's one plan, which every rank draws from the same seed, dealt out by rank (no example
    twice in an epoch)."""
    return run.config.train.grad_accum * world.size


def _plan(run: TrainInput, epoch: int) -> list:
    """The epoch's batch plan: batches of example indices (bins of them when packing), drawn from the seed."""
    config = run.config
    return plan_batches(run.objective.lengths, strategy=config.data.batching,
                        batch_size=config.train.micro_batch_size, token_budget=run.objective.token_budget,
                        seed=config.seed, epoch=epoch)


def _resume_or_start(run: TrainInput, training: _Training, world: World) -> TrainState:
    """The run's newest checkpoint put back (checked against the run first, ``train/resume.py``), or step 0
    with each rank's own random stream. The run's length is the config's either way: a resume may extend it
    (``train.max_steps``)."""
    config = run.config
    steps_per_epoch = -(-len(_plan(run, 0)) // _per_step(run, world))
    total_steps = config.train.max_steps or max(1, round(config.train.epochs * steps_per_epoch))
    if not run.resume:
        if world.rank:
            torch.manual_seed(config.seed + world.rank)  # each rank its own random draws (LoRA dropout)
        return TrainState(total_steps=total_steps)
    state = load_resume_state(run, run.model, training.optimizer, world)
    state.total_steps = total_steps
    return state


def _run_steps(run: TrainInput, training: _Training, state: TrainState, world: World) -> None:
    """Optimizer steps until ``state.total_steps``, each on the next micro-batches of the epoch's plan; then
    logged, evaluated and checkpointed as the config asks."""
    config = run.config
    warmup = warmup_steps(state.total_steps, config.schedule.warmup_steps, config.schedule.warmup_ratio)
    run.model.train()
    if run.device.type == "cuda":  # the logged peaks are training's own, not loading's or evaluation's
        torch.cuda.reset_peak_memory_stats(run.device)
    plan = _plan(run, state.epoch)
    log = _StepLog(run, state, world)
    try:
        while state.step < state.total_steps:
            if state.micro >= len(plan):
                state.epoch, state.micro = state.epoch + 1, 0
                plan = _plan(run, state.epoch)
            chunk = plan[state.micro:state.micro + _per_step(run, world)]
            lr = lr_at(state.step, base_lr=config.optim.lr, total_steps=state.total_steps, warmup=warmup,
                       kind=config.schedule.name, min_lr_ratio=config.schedule.min_lr_ratio)
            result = _step(run, training, state, chunk, lr, world)
            log.write(_evaluate_every(run, state, log.row(state, result, lr), world))
            every = config.train.checkpoint_every
            if every and (state.step % every == 0 or state.step == state.total_steps):
                save_training_checkpoint(run, run.model, training.optimizer, state, world)
    finally:
        log.close()


def _step(run: TrainInput, training: _Training, state: TrainState, chunk: list, lr: float,
          world: World) -> StepResult:
    """One optimizer step on ``chunk`` (the step's batches of the plan, every rank's): this rank's share
    collated and trained, then counted into ``state``; a non-finite step is counted and may stop the run."""
    objective, step, first = run.objective, state.step, state.micro
    mine = chunk[world.rank::world.size]
    hook = None if run.on_micro_batch is None else (
        lambda i: run.on_micro_batch(step, first + world.rank + i * world.size))
    micro_batches = [objective.collate(batch) for batch in (mine or chunk[:1])]
    started = time.time()
    result = train_step(training.module, training.optimizer, training.params, objective.loss, micro_batches,
                        lr=lr, max_grad_norm=run.config.optim.max_grad_norm, device=run.device, dtype=run.dtype,
                        on_micro_batch=hook, world=world, idle=not mine, graphs=training.graphs, step=step)
    # One token count for every objective: the examples' own tokens, without padding
    tokens = sum(objective.lengths[i] for batch in chunk for i in _indices(batch))
    state.train_seconds += time.time() - started
    state.step, state.micro, state.tokens = step + 1, first + len(chunk), state.tokens + tokens
    _count_skipped(run.config, state, result)
    return result


@dataclass
class StepResult:
    loss: float
    """The step's loss: the mean over its trained tokens (SFT) or pairs (preference), accumulated."""
    grad_norm: float
    skipped: bool
    counts: dict[str, int]
    """The step's denominators (``counts`` of the loss, summed over micro-batches)."""
    metrics: dict = field(default_factory=dict)
    """The loss's own logged metrics for the step (``step_metrics``)."""


def train_step(module, optimizer, params: list[torch.nn.Parameter], loss_fn, micro_batches: list[MicroBatch], *,
               lr: float, max_grad_norm: float | None, device: torch.device, dtype: torch.dtype,
               on_micro_batch=None, world: World = SINGLE, idle: bool = False,
               graphs: GraphedSteps | None = None, step: int = 0) -> StepResult:
    """One optimizer step over ``micro_batches`` (this rank's share of the step): forward and backward of each
    through ``module`` (a ``TrainingModule``, under DDP with several processes), then clip and step.

    The denominators are counted over the WHOLE accumulated batch — every micro-batch of every rank — before
    the first forward, so micro-batch 4 × accumulation 1, 1 × 4 and 2 processes × 2 give the same gradient.
    Under DDP only the last micro-batch's backward all-reduces (``no_sync`` before it); gradients are summed
    over ranks. ``idle``: this rank has no micro-batch left in the epoch's last step; it runs its one given
    micro-batch with weight 0 so the all-reduce still meets every rank. A non-finite loss or gradient leaves
    parameters and optimizer state untouched (``skipped``). ``graphs``: micro-batches run through CUDA graphs
    (``train/graphs.py``: the supervised loss, recorded on a fixed-shape plan, in place of ``module``; one
    process); ``step`` (the step's number) seeds their checkpointed blocks' random draws.
    """
    totals = Counter()
    for micro in micro_batches:
        # an idle rank contributes zeros under the same keys (the all-reduce needs one layout on every rank)
        totals.update({key: 0 if idle else n for key, n in loss_fn.counts(micro).items()})
    totals = sum_counts(dict(totals), world)
    # Losses and metrics stay on the device until the step ends: one read per step, not one per micro-batch
    # (each read waits for the device and leaves it idle while the host prepares the next micro-batch).
    loss_sum, sums = torch.zeros((), device=device), {}
    for index, micro in enumerate(micro_batches):
        if on_micro_batch is not None and not idle:
            on_micro_batch(index)
        if graphs is not None:
            loss_sum = loss_sum + graphs.run(micro.batch, 1.0 / max(totals["tokens"], 1), (step, index)).float()
            continue
        batch = {key: _to_device(value, device) for key, value in micro.batch.items()}
        last = index == len(micro_batches) - 1
        # the kernel choice holds for the backward too: checkpointed blocks recompute there, and must pick the
        # same attention kernel as their forward did
        with (contextlib.nullcontext() if last or not world.distributed else module.no_sync()), \
                attention_kernels(device):
            with autocast_for(device, dtype):
                loss, stats = module(batch, micro, totals)
            (loss * 0.0 if idle else loss).backward()
        weight = 0.0 if idle else 1.0  # an idle rank still reports every key (one all-reduce layout)
        loss_sum = loss_sum + weight * loss.detach().float()
        for key, value in stats.items():
            sums[key] = sums.get(key, 0.0) + weight * value
    keys = list(sums)
    values = torch.stack([loss_sum, *(torch.as_tensor(sums[key], device=device).float() for key in keys)])
    # clipped to max_grad_norm (none: only measured); the norm before clipping, on the device
    grad_norm = clip_gradients(params, max_grad_norm if max_grad_norm else float("inf"))
    read = torch.cat([values, grad_norm.reshape(1).to(values)]).tolist()  # the step's one device read
    summed = sum_floats(dict(zip(["loss", *keys], read[:-1])), world)
    loss_value, sums = summed.pop("loss"), summed
    # a graph adds into the same gradient tensors on every replay: they are zeroed, never freed
    grad_norm, skipped = _step_if_finite(optimizer, loss_value, read[-1], lr=lr, keep_grads=graphs is not None)
    return StepResult(loss=loss_value, grad_norm=grad_norm, skipped=skipped, counts=dict(totals),
                      metrics=loss_fn.step_metrics(sums))


def _to_device(value: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on ``device``; to a GPU through pinned memory, so the copy does not hold the host up."""
    if device.type == "cuda":
        return value.pin_memory().to(device, non_blocking=True)
    return value.to(device)


def attention_kernels(device: torch.device):
    """SDPA without its cuDNN backend on CUDA: cuDNN plans every new shape on the host (2.7–3.5 ms of CPU per
    call measured on an H200, for 0.3–0.6 ms of GPU work), and a training run's shapes change with every batch.
    Flash and memory-efficient kernels need no planning."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


def _step_if_finite(optimizer, loss_value: float, grad_norm: float, *, lr: float,
                    keep_grads: bool = False) -> tuple[float, bool]:
    """Step at ``lr`` unless the loss or the gradient norm is not finite; then parameters and optimizer state
    stay untouched. Gradients are cleared either way. Returns ``(grad_norm, skipped)``."""
    skipped = not (math.isfinite(loss_value) and math.isfinite(grad_norm))
    if not skipped:
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.step()
    optimizer.zero_grad(set_to_none=not keep_grads)
    return grad_norm, skipped


def _indices(batch: list) -> list[int]:
    """The example indices of a planned batch, flat (a packed batch is a list of bins)."""
    return [i for item in batch for i in (item if isinstance(item, list) else [item])]


def _count_skipped(config, state: TrainState, result: StepResult) -> None:
    """Count a skipped (non-finite) step; stop under ``train.nonfinite=abort`` or after too many in a row."""
    if not result.skipped:
        state.bad_streak = 0
        return
    state.skipped += 1
    state.bad_streak += 1
    if config.train.nonfinite == "abort" or state.bad_streak >= config.train.max_bad_steps:
        why = ("train.nonfinite=abort" if config.train.nonfinite == "abort"
               else f"{state.bad_streak} non-finite steps in a row (train.max_bad_steps)")
        raise TunesmithError(f"step {state.step}: non-finite loss or gradient (loss {result.loss}, grad norm "
                             f"{result.grad_norm}); stopping because of {why}. The last checkpoint is intact: "
                             "lower optim.lr or check the data, then resume with --resume")


class _StepLog:
    """``metrics.jsonl`` and the progress bar, on rank 0: a row every ``train.log_every`` steps and at the end,
    its tokens/s over the steps since the last row."""

    def __init__(self, run: TrainInput, state: TrainState, world: World):
        self.config, self.device, self.main = run.config, run.device, world.main
        self.metrics = MetricsLog(run.run_dir) if world.main else None
        self.progress = Progress(run.config.train.progress and world.main, state.total_steps, state.step)
        self.window_start, self.window_tokens = time.time(), state.tokens  # when the window began; tokens then

    def row(self, state: TrainState, result: StepResult, lr: float) -> dict | None:
        """The step's log row, or None when this step logs nothing."""
        if state.step % self.config.train.log_every != 0 and state.step != state.total_steps:
            return None
        elapsed = max(time.time() - self.window_start, 1e-9)
        row = {"step": state.step, "epoch": state.epoch, "loss": result.loss, **result.metrics, "lr": lr,
               "grad_norm": result.grad_norm, "tokens": state.tokens,
               "tokens_per_s": (state.tokens - self.window_tokens) / elapsed, "skipped": result.skipped}
        if "tokens" in result.counts:  # trained tokens (SFT), beside the input tokens above
            row["trained_tokens"] = result.counts["tokens"]
        if self.device.type == "cuda":
            row["peak_memory_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
            row["peak_reserved_gib"] = torch.cuda.max_memory_reserved(self.device) / 2**30
        self.window_start, self.window_tokens = time.time(), state.tokens
        return row

    def write(self, row: dict | None) -> None:
        if row is not None and self.main:
            self.metrics.log(row)
            self.progress.update(row)

    def close(self) -> None:
        if self.metrics is not None:
            self.metrics.close()
        self.progress.close()


def _evaluate_every(run: TrainInput, state: TrainState, row: dict | None, world: World) -> dict | None:
    """Every ``train.eval_every`` steps (rank 0): held-out metrics added to the step's log row."""
    every, evaluate = run.config.train.eval_every, run.objective.evaluate
    if not (every and state.step % every == 0 and evaluate is not None and world.main):
        return row
    heldout = evaluate(run.model, None, task=False)
    run.model.train()
    return {**(row or {"step": state.step}), **{key: heldout[metric] for key, metric in run.objective.eval_log.items()}}


def _finish(run: TrainInput, training: _Training, state: TrainState, world: World) -> TrainResult:
    """The model in eval mode and whole — under FSDP2 rank 0 gathers it to save and evaluate (every rank joins)
    — with what was installed on it."""
    run.model.eval()
    model = gathered_model(run.model, world, run.device) if sharded(run.model) else run.model
    graphs = run.graphs if training.graphs is None else {**run.graphs, **training.graphs.summary()}
    return TrainResult(state=state, model=model, layout=training.layout, kernels=training.kernels, graphs=graphs,
                       products=run.products)
