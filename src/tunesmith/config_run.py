"""A run dir's own config: the resolved ``config.yaml`` its run wrote, read back by the loader that validates
every config (``tunesmith.config``), for eval, merge, export, serve and ``train --resume``."""

from __future__ import annotations

from pathlib import Path

from pydantic import ValidationError

from tunesmith.config import RunConfig, resolve_tree
from tunesmith.config_yaml import explain_validation, parse_yaml, read_config_file
from tunesmith.errors import TunesmithError

RUN_CONFIG_FILE = "config.yaml"


def is_run_dir(path: str | Path) -> bool:
    """Whether ``path`` is a run dir: one that holds the resolved config its run wrote."""
    return (Path(path) / RUN_CONFIG_FILE).is_file()


def load_run_config(run_dir: str | Path, overrides: list[str] = (), *, trust_remote_code: bool = False) -> RunConfig:
    """The config a run dir's run was started with, read by the loader that validates every config, so a run
    dir means to eval, merge and train --resume exactly what it meant to the run.

    ``name`` and ``output_dir`` point at ``run_dir`` where it is now (a moved or copied run dir is still
    itself). The saved file is checked on its own before ``overrides`` apply, so a damaged file is named as
    such; ``trust_remote_code`` comes only from the caller, as in ``load_config``."""
    run_dir = Path(run_dir)
    path = run_dir / RUN_CONFIG_FILE
    placed = [o for o in overrides if o.split("=", 1)[0].strip() in ("name", "output_dir")]
    if placed:
        raise TunesmithError(f"{', '.join(placed)}: a run dir keeps its own name and place ({run_dir}); move or "
                             "copy the dir itself, or start a new run with --config and name=NEW_NAME")
    if not path.is_file():
        raise TunesmithError(f"{run_dir} is not a run dir (no {RUN_CONFIG_FILE}); give the directory a run wrote, "
                             "e.g. runs/<name>")
    damaged = (f"; {path} is the run's saved config and tunesmith wrote it valid: restore it, e.g. from "
               f"{run_dir / 'checkpoints'}/step-N/{RUN_CONFIG_FILE}")
    try:
        tree = read_config_file(path)
        RunConfig.model_validate(tree)
    except TunesmithError as exc:
        raise TunesmithError(f"{exc}{damaged}") from None
    except ValidationError as exc:
        raise TunesmithError(f"{explain_validation(exc, str(path))}{damaged}") from None
    config = resolve_tree(tree, str(path), overrides, trust_remote_code)
    return config.model_copy(update={"name": run_dir.name, "output_dir": str(run_dir.parent)})


def parse_saved_config(text: str, origin: str) -> RunConfig:
    """A config tunesmith saved (a checkpoint's ``config.yaml``), read as every config is: the strict YAML loader
    (a key written twice is an error) and the typed models, without overrides; a problem is one line naming
    ``origin``. A key the saved file predates reads as its default, which is what the run meant by it."""
    tree = parse_yaml(text, origin) or {}
    if not isinstance(tree, dict):
        raise TunesmithError(f"{origin} must hold a mapping of sections")
    try:
        return RunConfig.model_validate(tree)
    except ValidationError as exc:
        raise explain_validation(exc, origin) from None
