"""``plan: auto`` and ``tunesmith estimate --fit``: the settings that fit a GPU's memory and train fastest.

Candidates keep the step's examples (micro-batch × accumulation, the effective batch) and vary:

    micro-batch     every divisor of the effective batch (accumulation makes up the rest); packed runs may also
                    halve their token budget down to data.max_length, doubling the accumulation
    checkpointing   off or on
    optimizer       the one asked for, or one that keeps less state in the allocator: adamw → adamw_8bit →
                    paged_adamw_8bit
    CUDA graphs     as asked; ``auto`` may fall back to eager, whose allocator keeps fewer cached blocks

A candidate fits when its estimate (allocated, plus the context, cached blocks and paged state) is within the
memory less the margin. Among those that fit the planner takes the highest expected throughput, relative:

    tokens/s ∝ T / (T + 512)          T tokens per micro-batch: small micro-batches leave the GPU idle
             × 0.6 with checkpointing  (measured: Llama-3.1-8B QLoRA 3,935 against 6,782 tokens/s, H200)
             × 0.75 eager, below 3B parameters (measured: TinyLlama QLoRA 9,857 against 13,183 under graphs);
               0.95 eager from 3B up
             × 0.97 with an 8-bit optimizer when every weight trains (its update costs more)

and, between equals, the fewest changes of checkpointing, optimizer and graphs, then the smaller memory.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from tunesmith.errors import TunesmithError
from tunesmith.plan.estimate import Estimate, Settings, estimate, settings_of
from tunesmith.plan.shapes import Shape
from tunesmith.plan.terms import GIB

CHEAPER = ("adamw", "adamw_8bit", "paged_adamw_8bit")


@dataclass
class Plan:
    requested: Estimate
    chosen: Estimate
    token_budget: int | None  # a packed run's new data.token_budget
    memory: int
    margin: float
    candidates: int

    def summary(self) -> dict:
        """``summary.json``'s ``"plan"``."""
        return {"memory_gib": round(self.memory / GIB, 2), "margin": self.margin, "candidates": self.candidates,
                "requested": asdict(self.requested.settings), "chosen": asdict(self.chosen.settings),
                "token_budget": self.token_budget,
                "requested_gib": round(self.requested.total / GIB, 3), "chosen_gib": round(self.chosen.total / GIB, 3),
                "chosen_allocated_gib": round(self.chosen.allocated / GIB, 3)}

    def line(self) -> str:
        s, r = self.chosen.settings, self.requested.settings
        changes = [f"{name} {getattr(r, key)} → {getattr(s, key)}" for key, name in (
            ("micro_batch_size", "micro-batch"), ("grad_accum", "accumulation"), ("checkpointing", "checkpointing"),
            ("optimizer", "optimizer"), ("graphs", "graphs"), ("tokens", "tokens per micro-batch"))
            if getattr(r, key) != getattr(s, key)]
        return (f"plan: {', '.join(changes) if changes else 'the settings as given'}; predicted "
                f"{self.chosen.total / GIB:.2f} GiB of {self.memory / GIB:.2f} GiB "
                f"(as given: {self.requested.total / GIB:.2f} GiB)")


def expected_speed(settings: Settings, shape: Shape, method: str) -> float:
    """Relative tokens/s of ``settings`` (the module docstring's model)."""
    speed = settings.tokens / (settings.tokens + 512)
    if settings.checkpointing:
        speed *= 0.6
    if not settings.graphs:
        speed *= 0.75 if shape.parameters < 3e9 else 0.95
    if method == "full" and "8bit" in settings.optimizer:
        speed *= 0.97
    return speed


def _candidates(config, requested: Settings):
    effective = requested.micro_batch_size * requested.grad_accum
    per_micro = requested.tokens // requested.micro_batch_size
    budgets = [(per_micro, 1)]
    if config.data.batching == "pack":
        while budgets[-1][0] // 2 >= config.data.max_length:
            budgets.append((budgets[-1][0] // 2, budgets[-1][1] * 2))
    asked = requested.optimizer
    optimizers = [asked] + [o for o in CHEAPER[CHEAPER.index(asked) + 1:]] if asked in CHEAPER else [asked]
    graphs = [requested.graphs] + ([False] if requested.graphs and config.train.graphs == "auto" else [])
    for micro in (m for m in range(effective, 0, -1) if effective % m == 0):
        for tokens, split in budgets:
            for checkpointing in (False, True):
                for optimizer in optimizers:
                    for graph in graphs:
                        yield replace(requested, micro_batch_size=micro, grad_accum=effective // micro * split,
                                      tokens=micro * tokens, checkpointing=checkpointing, optimizer=optimizer,
                                      graphs=graph), tokens


def choose(config, shape: Shape, *, memory: int, margin: float, gpus: int = 1, cuda: bool = True) -> Plan:
    """The fastest settings (module docstring) whose estimate fits ``memory`` less ``margin``; an error naming
    the smallest estimate when none does."""
    requested = settings_of(config, gpus=gpus, cuda=cuda)
    asked = estimate(config, shape, requested, cuda=cuda, memory=memory)
    best, smallest, count = None, None, 0
    for settings, budget in _candidates(config, requested):
        count += 1
        candidate = estimate(config, shape, settings, cuda=cuda, memory=memory)
        if smallest is None or candidate.total < smallest.total:
            smallest = candidate
        if not candidate.fits(margin):
            continue
        changes = sum(getattr(settings, k) != getattr(requested, k) for k in ("checkpointing", "optimizer", "graphs"))
        key = (expected_speed(settings, shape, config.method.name), -changes, -candidate.total)
        if best is None or key > best[0]:
            best = (key, candidate, budget)
    if best is None:
        s = smallest.settings
        raise TunesmithError(
            f"nothing fits {memory / GIB:.2f} GiB with a {margin:.0%} margin: the smallest of {count} plans (micro-batch "
            f"{s.micro_batch_size}, {s.tokens:,} tokens, checkpointing {'on' if s.checkpointing else 'off'}, "
            f"{s.optimizer}) needs {smallest.total / GIB:.2f} GiB. Lower data.max_length, train with "
            "method.name=qlora, or spread the run over more GPUs (--gpus)")
    _, chosen, budget = best
    packed = config.data.batching == "pack" and budget != requested.tokens // requested.micro_batch_size
    return Plan(requested=asked, chosen=chosen, token_budget=budget if packed else None, memory=memory,
                margin=margin, candidates=count)


def apply_plan(config, plan: Plan):
    """``config`` with the plan's settings."""
    s = plan.chosen.settings
    train = config.train.model_copy(update={"micro_batch_size": s.micro_batch_size, "grad_accum": s.grad_accum,
                                            "gradient_checkpointing": s.checkpointing,
                                            **({} if s.graphs or config.train.graphs is False else {"graphs": False})})
    update = {"train": train, "optim": config.optim.model_copy(update={"name": s.optimizer})}
    if plan.token_budget is not None:
        update["data"] = config.data.model_copy(update={"token_budget": plan.token_budget})
    return config.model_copy(update=update)


def memory_to_fit(text: str | None, device=None) -> int | None:
    """``text`` (e.g. 80GiB) in bytes; without it what the CUDA ``device`` (default: the first GPU) has free now,
    plus what this process's allocator already holds (other processes' memory is not ours to plan with), or None
    where there is no GPU."""
    import torch

    from tunesmith.config_limits import parse_memory

    if text is not None:
        return parse_memory(text)
    if torch.cuda.is_available() and (device is None or device.type == "cuda"):
        index = device if device is not None else 0
        free, _total = torch.cuda.mem_get_info(index)
        return free + torch.cuda.memory_reserved(index)
    return None


def plan_run(config, *, gpus: int = 1):
    """``config`` with ``plan: auto`` applied (and the plan), for the GPU the run trains on, or for
    ``plan.memory`` (a run on the CPU needs it: there is no GPU memory to read)."""
    from tunesmith.models.load import resolve_device
    from tunesmith.plan.shapes import read_shape

    device = resolve_device(config.model.device)
    memory = memory_to_fit(config.plan.memory, device)
    if memory is None:
        raise TunesmithError("plan: auto on the CPU needs the memory to fit, e.g. plan.memory=8GiB (there is no GPU "
                             "memory to read)")
    plan = choose(config, read_shape(config), memory=memory, margin=config.plan.margin, gpus=gpus,
                  cuda=device.type == "cuda")
    return apply_plan(config, plan), plan
