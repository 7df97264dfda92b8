"""Issue 11, config and command line: every bad value a user can type is one `error:` line naming it, exit 2,
found before any model loads."""

import typing

import pytest
from pydantic import BaseModel

from tunesmith.cli import build_parser, main
from tunesmith.config import RunConfig, load_config


def _numeric_fields(section: type[BaseModel], prefix: str = ""):
    """(dotted key, kind) for every int, float and tuple-of-floats option, walking sections recursively, so a
    field added later is swept too."""
    for name, field in section.model_fields.items():
        kinds = [a for a in (typing.get_args(field.annotation) or (field.annotation,)) if a is not type(None)]
        if isinstance(kinds[0], type) and issubclass(kinds[0], BaseModel):
            yield from _numeric_fields(kinds[0], f"{prefix}{name}.")
        elif typing.get_origin(field.annotation) is tuple:
            yield f"{prefix}{name}", "floats"
        elif kinds[0] in (int, float):
            yield f"{prefix}{name}", kinds[0].__name__


FIELDS = list(_numeric_fields(RunConfig))
BAD = {"int": ["-1"], "float": ["-1", ".nan", ".inf"], "floats": ["[-1, 0.9]", "[0.9, .nan]", "[0.9, .inf]"]}
CASES = [(key, value) for key, kind in FIELDS for value in BAD[kind]]


def test_the_sweep_sees_every_section():
    keys = dict(FIELDS)
    assert keys["optim.max_grad_norm"] == "float" and keys["optim.betas"] == "floats" and keys["seed"] == "int"
    assert keys["dpo.beta"] == "float" and keys["lora.alpha"] == "float" and keys["eval.loss_rows"] == "int"
    assert len(FIELDS) >= 30


@pytest.mark.parametrize(("key", "value"), CASES, ids=[f"{k}={v}" for k, v in CASES])
def test_every_numeric_option_refuses_out_of_range_values(key, value, tmp_path, capsys):
    # a model that does not exist: if validation let the value through, the run would fail on the model instead
    dpo = ["method.objective=dpo"] if key.startswith("dpo.") else []
    assert main(["train", f"model.source={tmp_path / 'no-model'}", *dpo, f"{key}={value}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert f" {key}: " in err or f" {key}.0: " in err or f" {key}.1: " in err


def test_model_device_is_checked(tmp_path, capsys):
    assert main(["train", f"model.source={tmp_path / 'no-model'}", "model.device=gpu"]) == 2
    assert "model.device: must be auto, cpu, cuda, cuda:N (a GPU index) or mps (got 'gpu')" in capsys.readouterr().err
    assert [load_config(None, [f"model.device={d}"]).model.device for d in ("cpu", "cuda:1", "mps")] == [
        "cpu", "cuda:1", "mps"]


ARG_CASES = [
    (["chat", "--temperature", "nan"], "--temperature"),
    (["chat", "--temperature", "-0.5"], "--temperature"),
    (["chat", "--temperature", "inf"], "--temperature"),
    (["chat", "--top-p", "0"], "--top-p"),
    (["chat", "--top-p", "1.5"], "--top-p"),
    (["chat", "--top-p", "nan"], "--top-p"),
    (["chat", "--max-tokens", "0"], "--max-tokens"),
    (["compare", "--model", "M", "--model", "M", "--prompt", "x", "--width", "0"], "--width"),
    (["eval", "M", "--task-rows", "-1"], "--task-rows"),
    (["eval", "M", "--max-length", "0"], "--max-length"),
    (["merge", "M", "--out", "OUT", "--check-rows", "0"], "--check-rows"),
    (["data", "inspect", "M", "--max-length", "-3"], "--max-length"),
    (["quantize", "report", "--rows", "0"], "--rows"),
]


@pytest.mark.parametrize(("argv", "flag"), ARG_CASES, ids=[" ".join(a) for a, _ in ARG_CASES])
def test_numeric_flags_are_checked(argv, flag, tmp_path, capsys):
    missing = str(tmp_path / "missing")  # were the value accepted, the command would fail on this instead
    argv = [missing if a in ("M", "OUT") else a for a in argv]
    if "--model" not in argv and argv[0] in ("chat", "quantize"):
        argv += ["--model", missing]
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: argument {flag}: ") and err.count("\n") == 1


def _config_error(path, capsys) -> str:
    assert main(["train", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    return err


def test_duplicate_yaml_keys_are_refused(tmp_path, capsys):
    path = tmp_path / "dup.yaml"
    path.write_text("lora:\n  r: 4\n  alpha: 8\n  r: 16\n")
    assert _config_error(path, capsys) == (f"error: config file {path}: key 'r' is written twice (lines 2 and 4); "
                                           "keep one\n")
    path.write_text("train:\n  max_steps: 2\nseed: 1\ntrain:\n  max_steps: 3\n")
    assert "key 'train' is written twice (lines 1 and 4)" in _config_error(path, capsys)


def test_unreadable_config_files_are_one_line(tmp_path, capsys):
    latin = tmp_path / "latin.yaml"
    latin.write_bytes(b"name: caf\xe9\n")
    assert _config_error(latin, capsys) == (f"error: config file {latin} is not UTF-8 text (byte 0xe9 at offset 9); "
                                            "save it as UTF-8\n")
    assert _config_error(tmp_path, capsys) == f"error: config file {tmp_path} is a directory; pass a YAML file\n"
    broken = tmp_path / "broken.yaml"
    broken.write_text("lora:\n  r: [4\n")
    assert f"config file {broken} is not valid YAML at line 3" in _config_error(broken, capsys)


def test_override_that_is_not_yaml_is_one_line(capsys):
    assert main(["train", "name=a: b: c"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: override name=a: b: c is not valid YAML at line 1") and err.count("\n") == 1


def test_only_the_flag_allows_remote_code(tmp_path, capsys):
    path = tmp_path / "trusting.yaml"
    path.write_text("model:\n  trust_remote_code: true\n")
    assert load_config(path).model.trust_remote_code is False
    assert "model.trust_remote_code in " in capsys.readouterr().err
    assert load_config(None, ["model.trust_remote_code=true"]).model.trust_remote_code is False
    assert load_config(None, trust_remote_code=True).model.trust_remote_code is True


VERBS = [["train"], ["train", "--resume", "R"], ["demo"], ["eval", "R"], ["merge", "R", "--out", "O"],
         ["chat"], ["compare", "--model", "a", "--model", "b", "--prompt", "p"], ["template", "--messages", "m"],
         ["data", "inspect", "d"], ["quantize", "report"]]


@pytest.mark.parametrize("argv", VERBS, ids=" ".join)
def test_every_model_loading_verb_takes_the_flag(argv):
    assert build_parser().parse_args(argv + ["--trust-remote-code"]).trust_remote_code is True
    assert build_parser().parse_args(argv).trust_remote_code is False


def test_an_error_that_echoes_a_huge_value_is_capped(tmp_path, capsys):
    """Issue 25: an error message echoing megabytes of input prints at most ~2,000 characters, head and tail."""
    from tunesmith.errors import MAX_ERROR_CHARS, capped

    message = "start " + "x" * 1_000_000 + " end"
    short = capped(message)
    assert short.startswith("start xxx") and short.endswith("xxx end") and len(short) < MAX_ERROR_CHARS + 60
    assert f"[{len(message) - MAX_ERROR_CHARS:,} characters left out]" in short
    assert capped("short") == "short"
    assert main(["data", "inspect", "z" * 100_000 + ".jsonl"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot read dataset path zzz") and "(File name too long)" in err and err.count("\n") == 1 and len(err) < MAX_ERROR_CHARS + 80
