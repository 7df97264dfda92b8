"""``tunesmith estimate``: the flags, the printed breakdown, ``--fit`` and ``--verify``."""

from __future__ import annotations

import json

from tunesmith.errors import TunesmithError


def add_estimate_arguments(p, positive) -> None:
    p.add_argument("--config", help="a training config (YAML); without one, the built-in default recipe")
    p.add_argument("overrides", nargs="*", help="key=value overrides, as for train")
    p.add_argument("--gpus", type=positive, default=1, help="GPUs the run spreads over (FSDP2 shards full "
                   "fine-tuning across them; LoRA / QLoRA replicate the base)")
    p.add_argument("--gpu-memory", help="the GPU's memory, e.g. 80GiB (default: this machine's GPU, if any)")
    p.add_argument("--margin", type=float, default=None, help="share of the memory left free (default plan.margin)")
    p.add_argument("--fit", action="store_true", help="choose settings that fit and train fastest (plan: auto)")
    p.add_argument("--verify", action="store_true", help="on a GPU: train two optimizer steps of the (chosen) "
                   "settings and report measured against predicted peak memory")
    p.add_argument("--json", action="store_true")


def run_estimate(args) -> None:
    from tunesmith.config import load_config
    from tunesmith.models.load import resolve_device
    from tunesmith.plan.estimate import estimate, format_estimate, settings_of
    from tunesmith.plan.fit import apply_plan, choose, memory_to_fit
    from tunesmith.plan.shapes import read_shape

    config = load_config(args.config, args.overrides, trust_remote_code=args.trust_remote_code)
    cuda = config.model.device == "auto" or resolve_device(config.model.device).type == "cuda"
    try:
        memory = memory_to_fit(args.gpu_memory or config.plan.memory)
    except ValueError as error:
        raise TunesmithError(f"--gpu-memory: {error}") from None
    margin = config.plan.margin if args.margin is None else args.margin
    if not 0 <= margin < 1:
        raise TunesmithError(f"--margin {margin}: give a share of the memory in [0, 1)")
    shape = read_shape(config, trust_remote_code=args.trust_remote_code)
    source = config.model.source
    report: dict = {"model": source, "model_type": shape.model_type, "parameters": shape.parameters}
    if args.fit or config.plan.mode == "auto":
        if memory is None:
            raise TunesmithError("--fit needs the memory to fit: --gpu-memory 80GiB (no GPU is visible here)")
        plan = choose(config, shape, memory=memory, margin=margin, gpus=args.gpus, cuda=cuda)
        result, config = plan.chosen, apply_plan(config, plan)
        report["plan"] = plan.summary()
        report["overrides"] = _overrides(plan)
        text = [plan.line(), "as train overrides: " + " ".join(report["overrides"]), ""]
    else:
        result, text = estimate(config, shape, settings_of(config, gpus=args.gpus, cuda=cuda), cuda=cuda,
                                memory=memory), []
    report["estimate"] = result.to_json()
    text.append(format_estimate(result, source=source, margin=margin))
    if args.verify:
        report["verify"] = verify(config, result)
        text.append(f"verify: measured peak allocated {report['verify']['measured_gib']:.3f} GiB, predicted "
                    f"{report['verify']['predicted_gib']:.3f} GiB ({report['verify']['error']:+.1%})")
    print(json.dumps(report) if args.json else "\n".join(text))


def _overrides(plan) -> list[str]:
    s = plan.chosen.settings
    items = [f"train.micro_batch_size={s.micro_batch_size}", f"train.grad_accum={s.grad_accum}",
             f"train.gradient_checkpointing={str(s.checkpointing).lower()}", f"optim.name={s.optimizer}"]
    if plan.requested.settings.graphs and not s.graphs:
        items.append("train.graphs=false")
    if plan.token_budget is not None:
        items.append(f"data.token_budget={plan.token_budget}")
    return items


def verify(config, predicted) -> dict:
    """Train two optimizer steps of ``config`` on this machine's GPU (no evaluation, a scratch run dir) and read
    the peak ``max_memory_allocated`` the run logged. The data's micro-batches may be shorter than the estimate's
    worst case (every row at data.max_length): then the measurement is below the prediction."""
    import tempfile

    import torch

    from tunesmith.config_limits import GIB
    from tunesmith.recipes import sft
    from tunesmith.train.metrics import read_metrics

    if not torch.cuda.is_available():
        raise TunesmithError("--verify trains on a GPU and none is visible here; drop --verify")
    if config.method.objective != "sft":
        raise TunesmithError("--verify runs the supervised objective; estimate a DPO config without --verify")
    with tempfile.TemporaryDirectory(prefix="tunesmith-verify-") as scratch:
        run = config.model_copy(update={
            "name": "verify", "output_dir": scratch, "plan": config.plan.model_copy(update={"mode": "off"}),
            "train": config.train.model_copy(update={"max_steps": 2, "checkpoint_every": None, "eval_every": None,
                                                     "progress": False}),
            "eval": config.eval.model_copy(update={"before": False, "task_rows": 0}),
            "data": config.data.model_copy(update={"eval": None})})
        sft.run(run)
        peaks = [row["peak_memory_gib"] for row in read_metrics(run.run_dir) if "peak_memory_gib" in row]
    measured = max(peaks) * GIB
    return {"measured_gib": measured / GIB, "predicted_gib": predicted.allocated / GIB,
            "error": predicted.allocated / measured - 1}
