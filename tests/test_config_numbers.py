"""Issue 25: every numeric config option refuses true/false and values beyond its range, through the CLI, with
exit 2 and one line that names the key and the largest accepted value."""

from __future__ import annotations

import pytest
from pydantic import BaseModel

from tunesmith.cli import main
from tunesmith.config import RunConfig
from tunesmith.config_limits import FLOAT_MAX, INT_MAX, SEED_MAX, leaf_types


def numeric_keys(model: type[BaseModel] = RunConfig, prefix: str = "") -> list[tuple[str, bool]]:
    """(dotted key, whether it takes real numbers) for every numeric option, sections included."""
    found = []
    for name, field in model.model_fields.items():
        leaves = leaf_types(field.annotation)
        section = next((t for t in leaves if isinstance(t, type) and issubclass(t, BaseModel)), None)
        if section is not None:
            found += numeric_keys(section, f"{prefix}{name}.")
        elif leaves & {int, float} and bool not in leaves:
            found.append((f"{prefix}{name}", float in leaves))
    return found


KEYS = numeric_keys()


def test_the_walk_finds_the_numeric_options():
    keys = dict(KEYS)
    assert len(KEYS) == 35 and keys["plan.margin"] is True
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


@pytest.mark.parametrize("key", ["name", "output_dir", "data.train", "model.source"])
def test_a_nul_byte_in_a_string_option_is_refused(tmp_path, key, capsys):
    config = tmp_path / "c.yaml"
    section, _, leaf = key.rpartition(".")
    config.write_text(f'{section}:\n  {leaf}: "a\\0b"\n' if section else f'{leaf}: "a\\0b"\n')
    assert main(["train", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f": {key}: holds a NUL byte, which no path or name can; remove it" in err


def test_a_name_too_long_for_the_file_system(capsys):
    assert main(["train", "name=" + "n" * 256]) == 2
    assert "name: is 256 bytes long; a directory name takes at most 255" in capsys.readouterr().err
    assert main(["train", "name=" + "é" * 128]) == 2  # 256 bytes in UTF-8
    assert "name: is 256 bytes long" in capsys.readouterr().err


YAML_CASES = {
    "unhashable": ("? [a, b]\n: 1\n", "line 1: a key must be a plain value, not a list"),
    "deep": ("a: " + "[" * 5000 + "]" * 5000 + "\n", "nests more than 32 levels deep; a config is a few flat sections"),
    "bomb": ("a: &a [" + ",".join(['"lol"'] * 9) + "]\n" + "".join(
        f"{b}: &{b} [" + ",".join([f"*{a}"] * 9) + "]\n" for a, b in zip("abcdef", "bcdefg")),
        "expands to more than 100,000 values (through YAML aliases or sheer size); a config is a few dozen values"),
}


@pytest.mark.parametrize("case", sorted(YAML_CASES))
def test_hostile_yaml_is_one_line(tmp_path, case, capsys):
    text, message = YAML_CASES[case]
    config = tmp_path / "c.yaml"
    config.write_text(text)
    assert main(["train", "--config", str(config)]) == 2
    assert capsys.readouterr().err == f"error: config file {config}{':' if case == 'unhashable' else ''} {message}\n"


def test_a_config_file_over_the_size_limit_is_refused_unread(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("# padding\n" * 110_000)
    assert main(["train", "--config", str(config)]) == 2
    assert capsys.readouterr().err == (f"error: config file {config} is 1.0 MiB; a config file is at most 1 MiB (a few "
                                       "dozen values): check that this is the config\n")


def test_an_alias_within_the_limits_still_works():
    from tunesmith.config import load_config
    from tunesmith.config_yaml import parse_yaml

    assert parse_yaml("base: &b 3\nseed: *b\n", "x") == {"base": 3, "seed": 3}
    assert load_config(None, ["seed=3"]).seed == 3
