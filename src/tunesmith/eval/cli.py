"""``tunesmith eval``: evaluate a run dir or a model (optionally with an adapter) on held-out data."""

from __future__ import annotations

from pathlib import Path

import yaml

from tunesmith.data.pipeline import prepare
from tunesmith.data.sources import load_rows
from tunesmith.data.tokenize import TokenizeOptions
from tunesmith.errors import TunesmithError
from tunesmith.eval.evaluate import builtin_task_source, evaluate
from tunesmith.models import load
from tunesmith.templates import use_template


def _resolve_target(target: str, adapter: str | None, data: str | None, template: str | None):
    """A run dir stands for its base model plus its adapter (or its full model) and its eval data."""
    run_dir = Path(target)
    if not (run_dir / "config.yaml").is_file():
        return target, adapter, data or "builtin:test", template
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    if (run_dir / "adapter").is_dir():
        model, adapter = config["model"]["source"], adapter or str(run_dir / "adapter")
    elif (run_dir / "model").is_dir():
        model = str(run_dir / "model")
    else:
        raise TunesmithError(f"{run_dir} has no adapter/ or model/ yet; the run has not finished")
    return model, adapter, data or config["data"].get("eval") or "builtin:test", template or config["model"]["template"]


def run_eval(target: str, *, adapter: str | None = None, data: str | None = None, task_rows: int = 100,
             max_length: int = 512, template: str | None = None, trust_remote_code: bool = False) -> dict:
    model_source, adapter, data, template = _resolve_target(target, adapter, data, template)
    # a run dir's config.yaml records whether remote code ran, but only the caller's flag permits it
    loaded = load(model_source, trust_remote_code=trust_remote_code)
    use_template(loaded.tokenizer, template)
    if adapter is not None:
        from tunesmith.peft.io import load_adapter

        load_adapter(loaded.model, adapter)
    loaded.model.eval()
    prepared = prepare(data, loaded.tokenizer, TokenizeOptions(max_length=max_length))
    task_source = builtin_task_source(data)
    rows = load_rows(task_source)[0][:task_rows] if task_source and task_rows else None
    if prepared.normalised.format == "preference":
        metrics = _preference_metrics(loaded.model, loaded.tokenizer, prepared.examples, rows)
    else:
        metrics, _ = evaluate(loaded.model, loaded.tokenizer, examples=prepared.examples, rows=rows)
    return {"model": model_source, "adapter": adapter, "data": data, **metrics}


def _preference_metrics(model, tokenizer, examples: list[dict], rows: list[dict] | None) -> dict:
    """Preference pairs, reference-free: how often the model's own log-probability ranks chosen above rejected,
    and the loss per chosen token; with the built-in pairs, the task metrics on the same prompts."""
    from tunesmith.eval.task import evaluate_task
    from tunesmith.train.preference import pair_logps, ranked_above

    logps = pair_logps(model, examples, pad_id=tokenizer.pad_token_id)
    metrics = {"likelihood_accuracy": float(ranked_above(logps["chosen"], logps["rejected"]).mean()),
               "chosen_loss": float(-logps["chosen"].sum() / logps["chosen_len"].sum().clamp(min=1)),
               "pairs": len(examples)}
    if rows:
        result = evaluate_task(model, tokenizer, rows)
        metrics.update({k: result.metrics[k] for k in ("valid_json_rate", "exact_match", "fields")})
    return metrics
