"""The one training loop, for every objective (SFT, DPO / IPO / SimPO), top to bottom: optimizer → resume or
evaluate before → steps (plan, accumulate, clip, step, count, log, evaluate, checkpoint) → the final state.

What an objective changes is an ``Objective``: how a micro-batch becomes a loss (``train/objectives.py``), how
its examples are batched and counted, and how it evaluates. Everything else — accumulation, the schedule, the
non-finite policy, logging and progress, eval-every, checkpoints, the token count — is written once, here,
and the run's position is one ``TrainState``, which is also what a checkpoint stores.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from tunesmith.data.batching import plan_batches
from tunesmith.errors import TunesmithError
from tunesmith.recipes.resume import load_resume_state, save_training_checkpoint
from tunesmith.train.graphs import BlockDraws, GraphedSteps
from tunesmith.train.kernels import install_kernels
from tunesmith.train.layout import Layout, install_layout
from tunesmith.train.loop import autocast_for, enable_gradient_checkpointing
from tunesmith.train.dist import SINGLE, World, current, sum_counts, sum_floats
from tunesmith.train.fsdp import clip_gradients, gathered_model, parallel_for, sharded
from tunesmith.train.metrics import MetricsLog, Progress
from tunesmith.train.module import TrainingModule, wrap_for
from tunesmith.train.objectives import MicroBatch
from tunesmith.train.optim import build_optimizer
from tunesmith.train.schedule import lr_at, warmup_steps
from tunesmith.train.state import TrainState

if TYPE_CHECKING:
    from tunesmith.recipes.setup import RunSetup


@dataclass
class Objective:
    """What one training objective brings to the engine."""

    loss: object
    """``SupervisedLoss`` or ``PreferenceLoss``: micro-batch → loss and logged metrics."""
    lengths: list[int]
    """Tokens of each training example (pairs: chosen + rejected); the batch plan and the token count use them."""
    collate: Callable[[list], MicroBatch]
    """A batch of the plan (example indices; bins of indices when packing) → its micro-batch."""
    evaluate: Callable[..., dict]
    """``evaluate(phase, task=True)``: held-out metrics; phase "before"/"after" also saves them, None only
    computes (eval-every, without the task metrics)."""
    eval_log: dict[str, str]
    """Log-row key → ``evaluate`` metric logged at ``train.eval_every``."""
    token_budget: int | None = None
    """Tokens per packed row (``data.batching=pack``)."""


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
    (``train/graphs.py``; supervised loss, one process); ``step`` (the step's number) seeds their checkpointed
    blocks' random draws.
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


def train(setup: RunSetup, objective: Objective, params: list[torch.nn.Parameter], *,
          on_micro_batch=None) -> TrainState:
    """Train ``setup.model`` on ``objective`` from the start (evaluating it first) or from the run's newest
    checkpoint; returns the final state. ``on_micro_batch(step, micro_index)`` runs before every micro-batch."""
    config, model, device, world = setup.config, setup.model, setup.device, current()
    parallel = parallel_for(config, world)  # refuses what the chosen parallelism cannot do, before any work
    if not setup.resume and config.eval.before and setup.eval is not None and world.main:
        # before wrapping: rank 0 still holds the whole model (FSDP2 shards it next); the others wait at the wrap
        objective.evaluate("before")
    setup.kernels = install_kernels(model, config.train.kernels)  # once, before any training forward
    use_graphs = bool(setup.graphs and setup.graphs["used"])
    # under graphs, checkpointed blocks draw from generators of their own (train/graphs.py)
    draws = BlockDraws(device, config.seed) if use_graphs and config.train.gradient_checkpointing else None
    if config.train.gradient_checkpointing:
        enable_gradient_checkpointing(model, **(draws.checkpoint_options() if draws else {}))
    if use_graphs:  # graphs lay every micro-batch out as one varlen row (train/graphs.py)
        setup.layout = Layout("varlen", "CUDA graphs: every micro-batch as one row of fixed size")
    setup.layout = install_layout(model, setup.layout)  # once, before any forward
    module = wrap_for(TrainingModule(model, objective.loss, setup.layout.name), world, device,
                      parallel=parallel, dtype=setup.dtype)
    if sharded(model):  # FSDP2 replaced every parameter by its shard: the optimizer steps the shards
        params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(config.optim, params)
    graphs = None
    if use_graphs:
        width = objective.token_budget if config.data.batching == "pack" else config.data.max_length
        graphs = GraphedSteps(model, params, device, setup.dtype, capacity=config.train.micro_batch_size * width,
                              draws=draws)
    # A step takes grad_accum micro-batches on each rank: the next grad_accum × ranks of the epoch's one plan,
    # which every rank draws from the same seed, dealt out by rank (no example twice in an epoch)
    per_step = config.train.grad_accum * world.size

    def plan_for(epoch: int) -> list:
        return plan_batches(objective.lengths, strategy=config.data.batching, batch_size=config.train.micro_batch_size,
                            token_budget=objective.token_budget, seed=config.seed, epoch=epoch)

    steps_per_epoch = -(-len(plan_for(0)) // per_step)
    total_steps = config.train.max_steps or max(1, round(config.train.epochs * steps_per_epoch))
    state = TrainState(total_steps=total_steps)

    # --- resume, or start each rank's random stream
    if setup.resume:
        state = load_resume_state(setup, model, optimizer, world)
        state.total_steps = total_steps  # the length is the config's: a resume may extend the run (train.max_steps)
    elif world.rank:
        torch.manual_seed(config.seed + world.rank)  # each rank its own random draws (LoRA dropout)

    # --- train
    warmup = warmup_steps(state.total_steps, config.schedule.warmup_steps, config.schedule.warmup_ratio)
    log = MetricsLog(setup.run_dir) if world.main else None
    model.train()
    if device.type == "cuda":  # the logged peaks are training's own, not loading's or evaluation's
        torch.cuda.reset_peak_memory_stats(device)
    plan = plan_for(state.epoch)
    progress = Progress(config.train.progress and world.main, state.total_steps, state.step)
    window_start, window_tokens = time.time(), 0
    try:
        while state.step < state.total_steps:
            if state.micro >= len(plan):
                state.epoch, state.micro = state.epoch + 1, 0
                plan = plan_for(state.epoch)
            step, first = state.step, state.micro
            chunk = plan[first:first + per_step]
            mine = chunk[world.rank::world.size]
            hook = None if on_micro_batch is None else (
                lambda i: on_micro_batch(step, first + world.rank + i * world.size))
            micro_batches = [objective.collate(batch) for batch in (mine or chunk[:1])]
            lr = lr_at(step, base_lr=config.optim.lr, total_steps=state.total_steps, warmup=warmup,
                       kind=config.schedule.name, min_lr_ratio=config.schedule.min_lr_ratio)
            step_start = time.time()
            result = train_step(module, optimizer, params, objective.loss, micro_batches, lr=lr,
                                max_grad_norm=config.optim.max_grad_norm, device=device, dtype=setup.dtype,
                                on_micro_batch=hook, world=world, idle=not mine, graphs=graphs, step=step)
            # One token count for every objective: the examples' own tokens, without padding
            tokens = sum(objective.lengths[i] for batch in chunk for i in _indices(batch))
            state.train_seconds += time.time() - step_start
            state.step, state.micro, state.tokens = step + 1, first + len(chunk), state.tokens + tokens
            window_tokens += tokens
            if result.skipped:
                state.skipped += 1
                state.bad_streak += 1
                _check_bad_steps(config, state, result)
            else:
                state.bad_streak = 0
            row = None
            if state.step % config.train.log_every == 0 or state.step == state.total_steps:
                elapsed = max(time.time() - window_start, 1e-9)
                row = {"step": state.step, "epoch": state.epoch, "loss": result.loss, **result.metrics, "lr": lr,
                       "grad_norm": result.grad_norm, "tokens": state.tokens,
                       "tokens_per_s": window_tokens / elapsed, "skipped": result.skipped}
                if "tokens" in result.counts:  # trained tokens (SFT), beside the input tokens above
                    row["trained_tokens"] = result.counts["tokens"]
                if device.type == "cuda":
                    row["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
                    row["peak_reserved_gib"] = torch.cuda.max_memory_reserved(device) / 2**30
                window_start, window_tokens = time.time(), 0
            if (config.train.eval_every and state.step % config.train.eval_every == 0 and setup.eval is not None
                    and world.main):
                heldout = objective.evaluate(None, task=False)
                row = {**(row or {"step": state.step}),
                       **{key: heldout[metric] for key, metric in objective.eval_log.items()}}
                model.train()
            if row is not None and world.main:
                log.log(row)
                progress.update(row)
            if config.train.checkpoint_every and (state.step % config.train.checkpoint_every == 0
                                                  or state.step == state.total_steps):
                save_training_checkpoint(setup, model, optimizer, state, world)
    finally:
        if log is not None:
            log.close()
        progress.close()
        if graphs is not None:
            setup.graphs = {**setup.graphs, **graphs.summary()}
    model.eval()
    if sharded(model):  # rank 0 saves and evaluates the result: the whole model, gathered (every rank joins)
        setup.model = gathered_model(model, world, device)
    return state


def _indices(batch: list) -> list[int]:
    """The example indices of a planned batch, flat (a packed batch is a list of bins)."""
    return [i for item in batch for i in (item if isinstance(item, list) else [item])]


def _check_bad_steps(config, state: TrainState, result: StepResult) -> None:
    """After a skipped (non-finite) step: stop under ``train.nonfinite=abort`` or after too many in a row."""
    if config.train.nonfinite == "abort" or state.bad_streak >= config.train.max_bad_steps:
        why = ("train.nonfinite=abort" if config.train.nonfinite == "abort"
               else f"{state.bad_streak} non-finite steps in a row (train.max_bad_steps)")
        raise TunesmithError(f"step {state.step}: non-finite loss or gradient (loss {result.loss}, grad norm "
                             f"{result.grad_norm}); stopping because of {why}. The last checkpoint is intact: "
                             "lower optim.lr or check the data, then resume with --resume")
