"""``tunesmith eval``: evaluate a run dir or a model (optionally with an adapter) on held-out data."""

from __future__ import annotations

from pathlib import Path

import yaml

from tunesmith.data.pipeline import prepare
from tunesmith.data.sources import load_rows
from tunesmith.data.tokenize import TokenizeOptions
from tunesmith.errors import TunesmithError
from tunesmith.eval.evaluate import evaluate, is_builtin_task
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
             max_length: int = 512, template: str | None = None) -> dict:
    model_source, adapter, data, template = _resolve_target(target, adapter, data, template)
    loaded = load(model_source)
    use_template(loaded.tokenizer, template)
    if adapter is not None:
        from tunesmith.peft.io import load_adapter

        load_adapter(loaded.model, adapter)
    loaded.model.eval()
    prepared = prepare(data, loaded.tokenizer, TokenizeOptions(max_length=max_length))
    rows = load_rows(data)[0][:task_rows] if is_builtin_task(data) and task_rows else None
    metrics, _ = evaluate(loaded.model, loaded.tokenizer, examples=prepared.examples, rows=rows)
    return {"model": model_source, "adapter": adapter, "data": data, **metrics}
