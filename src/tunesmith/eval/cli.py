"""``tunesmith eval``: evaluate a run dir or a model (optionally with an adapter) on held-out data.

A run dir is read through the same typed config the run wrote (``load_run_config``), so its
data is tokenized exactly as the run tokenized it (``train_on``, ``reasoning``, ``max_length``, over-length
policy, template) and its eval settings apply; the command line's options override single keys of it.
"""

from __future__ import annotations

from pathlib import Path

from tunesmith.config import RunConfig, load_config
from tunesmith.config_run import is_run_dir, load_run_config
from tunesmith.data.pipeline import prepare
from tunesmith.data.tokenize import TokenizeOptions
from tunesmith.errors import TunesmithError
from tunesmith.eval.evaluate import evaluate, generation_rows, task_metrics
from tunesmith.eval.report import format_before_after, format_samples
from tunesmith.eval.task import TaskResult
from tunesmith.models.build import build_model


def eval_config(target: str, *, data: str | None = None, task_rows: int | None = None,
                max_length: int | None = None, template: str | None = None, generate: bool = False,
                max_new_tokens: int | None = None, whole_answers: bool = False,
                trust_remote_code: bool = False) -> RunConfig:
    """The config an evaluation runs under: a run dir's own, else the defaults for the model ``target``;
    each given option replaces its key (``data`` → ``data.eval``, with the format detected afresh).

    The model goes on this machine's device in its default dtype (``auto``), not the run's: a run trained on a
    GPU is evaluated anywhere."""
    if is_run_dir(target):
        config = load_run_config(target, trust_remote_code=trust_remote_code)
        config.model.dtype, config.model.device = "auto", "auto"
    else:
        config = load_config(None, trust_remote_code=trust_remote_code)
        config.model.source = target
    if data is not None:
        config.data.eval, config.data.format = data, None
    elif config.data.eval is None:
        config.data.eval = "builtin:test"
    for section, key, value in ((config.data, "max_length", max_length), (config.model, "template", template),
                                (config.eval, "task_rows", task_rows),
                                (config.eval, "max_new_tokens", max_new_tokens)):
        if value is not None:
            setattr(section, key, value)
    config.eval.generate = config.eval.generate or generate
    config.eval.stop_settled = config.eval.stop_settled and not whole_answers
    return config


def _model_and_adapter(target: str, config: RunConfig, adapter: str | None) -> tuple[str, str | None]:
    """A run dir stands for its base model plus its adapter, or for its full model."""
    run_dir = Path(target)
    if not is_run_dir(run_dir):
        return target, adapter
    if (run_dir / "adapter").is_dir():
        return config.model.source, adapter or str(run_dir / "adapter")
    if (run_dir / "model").is_dir():
        return str(run_dir / "model"), adapter
    raise TunesmithError(f"{run_dir} has no adapter/ or model/ yet; the run has not finished")


def run_eval(target: str, *, adapter: str | None = None, data: str | None = None, task_rows: int | None = None,
             max_length: int | None = None, template: str | None = None, generate: bool = False,
             max_new_tokens: int | None = None, whole_answers: bool = False, trust_remote_code: bool = False) -> dict:
    """Metrics of ``target`` (a run dir or a model) on held-out data, as one dict.

    With generation (the built-in task, or ``generate``) it also holds ``samples`` (every scored row: prompt,
    expected, ``after`` = the evaluated model's answer); with an adapter, the base model (adapters off) is
    scored too: its metrics in ``before`` and its answers in each sample's ``before``."""
    config = eval_config(target, data=data, task_rows=task_rows, max_length=max_length, template=template,
                         generate=generate, max_new_tokens=max_new_tokens, whole_answers=whole_answers,
                         trust_remote_code=trust_remote_code)
    model_source, adapter = _model_and_adapter(target, config, adapter)
    # Data first: a dataset that cannot be scored is refused before the model loads.
    rows = generation_rows(config)
    # trust_remote_code: load_run_config put the caller's flag in config.model, whatever the run dir recorded
    loaded = build_model(config.model.model_copy(update={"source": model_source}), adapter=adapter)
    prepared = prepare(config.data.eval, loaded.tokenizer, TokenizeOptions.from_config(config.data),
                       fmt=config.data.format, invalid_rows=config.data.invalid_rows)
    if config.eval.loss_rows is not None:
        prepared.tokenized.examples = prepared.examples[:config.eval.loss_rows]

    def measure() -> tuple[dict, TaskResult | None]:
        if prepared.normalised.format == "preference":
            return _preference_metrics(loaded.model, loaded.tokenizer, prepared.examples, rows, config)
        return evaluate(loaded.model, loaded.tokenizer, examples=prepared.examples, rows=rows,
                        batch_size=config.eval.batch_size, max_new_tokens=config.eval.max_new_tokens,
                        reasoning=config.data.reasoning, settled=config.eval.stop_settled)

    metrics, after = measure()
    report = {"model": model_source, "adapter": adapter, "data": config.data.eval, **metrics}
    if after is None:
        return report
    before = None
    if adapter is not None and config.eval.before:
        from tunesmith.peft import adapters_disabled

        with adapters_disabled(loaded.model):
            report["before"], before = measure()
    report["answers_settled"] = after.settled
    report["samples"] = samples_of(after, before)
    return report


def samples_of(after: TaskResult, before: TaskResult | None, limit: int | None = None) -> list[dict]:
    """One dict per scored row (the first ``limit``): row, subset, prompt, expected, before, after."""
    samples = []
    for i, row in enumerate(after.rows[:limit]):
        sample = {"row": row.row, "subset": row.subset, "prompt": row.shown_prompt, "expected": row.expected}
        if before is not None:
            sample["before"] = before.predictions[i]
        sample["after"] = after.predictions[i]
        samples.append(sample)
    return samples


def format_eval(report: dict, samples: int = 12) -> str:
    """The terminal view of ``run_eval``'s result: metrics, the before/after table, the first samples."""
    shown = {key: value for key, value in report.items() if key not in ("before", "samples")}
    lines = [f"{key:<18}{value}" for key, value in shown.items()]
    if "before" in report:
        lines += ["", format_before_after(report["before"], shown)]
    if report.get("samples"):
        lines += ["", format_samples(report["samples"][:samples])]
    return "\n".join(lines)


def _preference_metrics(model, tokenizer, examples: list[dict], rows, config: RunConfig):
    """Preference pairs, reference-free: how often the model's own log-probability ranks chosen above rejected,
    and the loss per chosen token; with the built-in pairs, the task metrics on the same prompts."""
    from tunesmith.eval.task import evaluate_task
    from tunesmith.train.preference import pair_logps, ranked_above

    logps = pair_logps(model, examples, pad_id=tokenizer.pad_token_id, batch_size=config.eval.batch_size)
    metrics = {"likelihood_accuracy": float(ranked_above(logps["chosen"], logps["rejected"]).mean()),
               "chosen_loss": float(-logps["chosen"].sum() / logps["chosen_len"].sum().clamp(min=1)),
               "pairs": len(examples)}
    result = None
    if rows:
        result = evaluate_task(model, tokenizer, rows, batch_size=config.eval.batch_size,
                               max_new_tokens=config.eval.max_new_tokens, reasoning=config.data.reasoning,
                               settled=config.eval.stop_settled)
        metrics.update(task_metrics(result))
    return metrics, result

