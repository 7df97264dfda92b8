"""Issue 25: every numeric config option refuses true/false and values beyond its range, through the CLI, with
exit 2 and one line that names the key and the largest accepted value."""

from __future__ import annotations

import pytest
from pydantic import BaseModel

from tunesmith.cli import main
from tunesmith.config import FLOAT_MAX, INT_MAX, SEED_MAX, RunConfig, _leaf_types


def numeric_keys(model: type[BaseModel] = RunConfig, prefix: str = "") -> list[tuple[str, bool]]:
    """(dotted key, whether it takes real numbers) for every numeric option, sections included."""
    found = []
    for name, field in model.model_fields.items():
        leaves = _leaf_types(field.annotation)
        section = next((t for t in leaves if isinstance(t, type) and issubclass(t, BaseModel)), None)
        if section is not None:
            found += numeric_keys(section, f"{prefix}{name}.")
        elif leaves & {int, float} and bool not in leaves:
            found.append((f"{prefix}{name}", float in leaves))
    return found


KEYS = numeric_keys()


def test_the_walk_finds_the_numeric_options():
    keys = dict(KEYS)
    assert len(KEYS) == 34
    assert keys["seed"] is False and keys["lora.r"] is False and keys["optim.lr"] is True
    assert keys["optim.betas"] is True and keys["dpo.beta"] is True and keys["train.blas_workspace_mib"] is False
    assert "train.graphs" not in keys and "eval.before" not in keys  # booleans (and "auto") are not numbers


@pytest.mark.parametrize("value", ["true", "1e23", str(2**64)])
@pytest.mark.parametrize("key,real", KEYS, ids=[k for k, _ in KEYS])
def test_every_numeric_option_refuses_booleans_and_huge_values(key, real, value, capsys):
    extra = ["method.objective=dpo"] if key.startswith("dpo.") else []
    assert main(["train", f"{key}={value}", *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and f": {key}: " in err, err
    if value == "true":
        assert "must be a number, not true" in err
    elif key == "optim.betas":
        assert "largest accepted value is" in err or "less than 1" in err
    else:
        largest = f"{FLOAT_MAX:g}" if real else str(SEED_MAX if key == "seed" else INT_MAX)
        assert f"largest accepted value is {largest}" in err or "less than or equal to 1" in err \
            or "less than 1" in err or "Input should be" in err, err


def test_the_largest_seed_is_accepted_and_one_more_is_not():
    from tunesmith.config import load_config

    assert load_config(None, [f"seed={SEED_MAX}"]).seed == SEED_MAX
    assert main(["train", f"seed={SEED_MAX + 1}"]) == 2


def test_chat_seed_is_range_checked(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["chat", "--prompt", "hi", "--seed", str(2**64)])
    assert exit_.value.code == 2
    assert capsys.readouterr().err == (f"error: argument --seed: '{2**64}' is not a whole number from 0 to {SEED_MAX} "
                                       "(see tunesmith chat --help)\n")
