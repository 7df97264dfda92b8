"""Issue 11, the run dir's life: remote code only by flag, one process per run dir, a failed start that can be
started over, write failures as one line with the checkpoints intact, and dropped rows reported."""

import fcntl
import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
import yaml

from tunesmith.cli import main
from tunesmith.recipes import sft
from tunesmith.recipes.run_dir import LOCK_FILE, MARKER
from tunesmith.train.checkpoint import latest_checkpoint, load_checkpoint
from tunesmith.train.metrics import read_metrics

EVIL_CODE = '''import os
from pathlib import Path

from transformers import LlamaConfig, LlamaForCausalLM

Path(os.environ["TUNESMITH_TEST_MARKER"]).write_text("remote code ran")


class EvilConfig(LlamaConfig):
    pass


class EvilForCausalLM(LlamaForCausalLM):
    config_class = EvilConfig
'''


@pytest.fixture()
def evil_model_dir(tmp_path, tiny_model_dir, monkeypatch):
    """The tiny model with code of its own (config.json's auto_map) that leaves a marker file when it runs."""
    path = tmp_path / "evil-model"
    shutil.copytree(tiny_model_dir, path)
    config = json.loads((path / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilForCausalLM"}
    (path / "config.json").write_text(json.dumps(config))
    (path / "evil.py").write_text(EVIL_CODE)
    monkeypatch.setenv("TUNESMITH_TEST_MARKER", str(tmp_path / "remote-code-ran"))
    return path


def _errors(captured) -> list[str]:
    """The error lines on stderr (model loading draws progress bars there too)."""
    return [line for line in captured.err.splitlines() if line.startswith("error:") or "Traceback" in line]


def _overrides(tmp_path, model_dir, data_files, *extra):
    train, heldout = data_files
    return [f"model.source={model_dir}", f"data.train={train}", f"data.eval={heldout}",
            f"output_dir={tmp_path / 'runs'}", "name=run", "train.progress=false", "eval.task_rows=0",
            "eval.before=false", "train.micro_batch_size=4", "train.max_steps=2", "lora.r=4", "lora.alpha=8",
            "train.checkpoint_every=2", *extra]


def test_resume_never_takes_remote_code_permission_from_the_run_dir(tmp_path, evil_model_dir, data_files, capsys):
    run_dir = tmp_path / "runs" / "run"
    assert main(["train", *_overrides(tmp_path, evil_model_dir, data_files)]) == 0
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["model"]["trust_remote_code"] is False
    saved["model"]["trust_remote_code"] = True  # tampered: whoever can write the run dir wants their code run
    (run_dir / "config.yaml").write_text(yaml.safe_dump(saved))
    assert main(["train", "--resume", str(run_dir), "train.max_steps=3", "train.checkpoint_every=1"]) == 0
    assert not (tmp_path / "remote-code-ran").exists()
    assert "model.trust_remote_code in " in capsys.readouterr().err
    used = yaml.safe_load((latest_checkpoint(run_dir) / "config.yaml").read_text())
    assert latest_checkpoint(run_dir).name == "step-3" and used["model"]["trust_remote_code"] is False


@pytest.mark.parametrize("verb", [["template", "--messages", "M"], ["data", "inspect", "D"], ["chat", "--prompt", "Hi",
                                  "--max-tokens", "1"], ["eval", "MODEL", "--data", "D", "--task-rows", "0"],
                                  ["quantize", "report", "--data", "D", "--rows", "1"]], ids=lambda v: " ".join(v[:2]))
def test_the_flag_does_let_remote_code_run(verb, tmp_path, evil_model_dir, data_files):
    # the control for the test above, and the flag reaching the loader on each verb: the marker appears
    messages = tmp_path / "m.json"
    messages.write_text(json.dumps([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]))
    (evil_model_dir / "evil.py").write_text(f"# {tmp_path}\n" + EVIL_CODE)  # new code: imported afresh
    args = [{"M": str(messages), "D": str(data_files[1]), "MODEL": str(evil_model_dir)}.get(a, a) for a in verb]
    model = [] if "MODEL" in verb else ["--model", str(evil_model_dir)]
    main([*args, *model, "--trust-remote-code"])
    assert (tmp_path / "remote-code-ran").exists()


def test_a_second_process_on_the_run_dir_is_refused(tmp_path, tiny_model_dir, data_files, capsys):
    run_dir = tmp_path / "runs" / "run"
    assert main(["train", *_overrides(tmp_path, tiny_model_dir, data_files)]) == 0
    before = sorted(p.name for p in (run_dir / "checkpoints").iterdir()), read_metrics(run_dir)
    with open(run_dir / LOCK_FILE, "a") as other:  # another process holding the run, as flock sees it
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert main(["train", "--resume", str(run_dir), "train.max_steps=4"]) == 2
    assert _errors(capsys.readouterr()) == [f"error: run dir {run_dir} is in use by another tunesmith process (a run "
                                            "or a resume of it); wait for that one to finish or stop it, then try "
                                            "again"]
    assert (sorted(p.name for p in (run_dir / "checkpoints").iterdir()), read_metrics(run_dir)) == before
    # released, the run dir resumes (the lock is also let go when a run ends)
    assert main(["train", "--resume", str(run_dir), "train.max_steps=4"]) == 0
    assert latest_checkpoint(run_dir).name == "step-4"


class Stop(Exception):
    pass


def _die_before_first_checkpoint(make_config):
    config = make_config("train.checkpoint_every=4")

    def stop(step, micro):
        if step == 2:
            raise Stop()

    with pytest.raises(Stop):
        sft.run(config, on_micro_batch=stop)
    assert latest_checkpoint(config.run_dir) is None and [r["step"] for r in read_metrics(config.run_dir)] == [1, 2]
    return config


def test_resume_of_a_failed_start_starts_it_over(make_config, capsys):
    config = _die_before_first_checkpoint(make_config)
    capsys.readouterr()
    assert main(["train", "--resume", str(config.run_dir)]) == 0
    assert "stopped before its first checkpoint: starting it over from step 0" in capsys.readouterr().out
    assert [r["step"] for r in read_metrics(config.run_dir)] == [1, 2, 3, 4, 5, 6]
    assert json.loads((config.run_dir / "summary.json").read_text())["steps"] == 6


def test_new_run_with_the_name_of_a_failed_start_replaces_it(make_config, tmp_path, capsys):
    config = _die_before_first_checkpoint(make_config)
    again = config.model_copy(update={"train": config.train.model_copy(update={"max_steps": 2})})
    (tmp_path / "again.yaml").write_text(again.to_yaml())
    assert main(["train", "--config", str(tmp_path / "again.yaml")]) == 0
    assert [r["step"] for r in read_metrics(config.run_dir)] == [1, 2]
    assert [p.name for p in (config.run_dir / "checkpoints").iterdir()] == ["step-2"]
    assert (config.run_dir / "adapter").is_dir()


@pytest.mark.skipif(torch.cuda.is_available(), reason="the failure below is asking for CUDA where there is none")
def test_a_run_that_fails_setup_leaves_no_run_dir(tmp_path, tiny_model_dir, data_files, capsys):
    # the data is fine; the device is not: found when the model loads, after the data was prepared
    assert main(["train", *_overrides(tmp_path, tiny_model_dir, data_files, "model.device=cuda")]) == 2
    assert "CUDA is not available" in capsys.readouterr().err
    assert not (tmp_path / "runs" / "run").exists()


def test_output_dir_that_is_a_file(tmp_path, tiny_model_dir, data_files, capsys):
    (tmp_path / "runs").write_text("not a dir")
    assert main(["train", *_overrides(tmp_path, tiny_model_dir, data_files)]) == 2
    assert _errors(capsys.readouterr()) == [f"error: cannot write in run dir {tmp_path / 'runs' / 'run'}: Not a "
                                            "directory; set output_dir to a writable directory"]
    assert (tmp_path / "runs").read_text() == "not a dir"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only dir; the file case above covers it")
def test_output_dir_that_is_read_only(tmp_path, tiny_model_dir, data_files, capsys):
    (tmp_path / "runs").mkdir(mode=0o500)
    try:
        assert main(["train", *_overrides(tmp_path, tiny_model_dir, data_files)]) == 2
        assert _errors(capsys.readouterr()) == [f"error: cannot write in run dir {tmp_path / 'runs' / 'run'}: "
                                                "Permission denied; set output_dir to a writable directory"]
        assert list((tmp_path / "runs").iterdir()) == []
    finally:
        (tmp_path / "runs").chmod(0o700)


def test_full_disk_while_checkpointing_is_one_line_and_keeps_the_last_checkpoint(tmp_path, tiny_model_dir,
                                                                                  data_files, capsys):
    run_dir = tmp_path / "runs" / "run"
    assert main(["train", *_overrides(tmp_path, tiny_model_dir, data_files)]) == 0
    weights = run_dir / "checkpoints" / "step-2" / "weights.safetensors"
    limit = weights.stat().st_size // 2  # the next checkpoint's weights cannot be written; the log lines can
    # A file size limit makes writes past it fail with EFBIG, as a full disk fails them with ENOSPC (Python
    # ignores SIGXFSZ, so the write fails instead of the process dying).
    script = textwrap.dedent(f"""
        import resource, sys
        resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))
        from tunesmith.cli import main
        sys.exit(main(["train", "--resume", {str(run_dir)!r}, "train.max_steps=4"]))
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:") or "Traceback" in line]
    assert result.returncode == 2 and len(errors) == 1
    assert errors[0].startswith("error: cannot write ")
    assert errors[0].endswith(f"File too large (the disk is full or read-only); the last checkpoint (step-2) is "
                              f"intact: free some space, then continue with tunesmith train --resume {run_dir}")
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == ["step-2"]  # the failed save left nothing
    load_checkpoint(run_dir / "checkpoints" / "step-2")  # every file checks out against its marker
    assert not [p for p in run_dir.iterdir() if p.name.startswith(".") and p.name not in (LOCK_FILE, MARKER)]


def test_dropped_rows_are_reported_for_sft(tmp_path, tiny_model_dir, data_files, capsys):
    train, _ = data_files
    lines = train.read_text().splitlines()
    lines[2] = json.dumps({"messages": [{"role": "wizard", "content": "x"}]})
    lines[6] = json.dumps({"messages": [{"role": "user", "content": "only a question"}]})
    lines[9] = json.dumps({"messages": [{"role": "wizard", "content": "y"}]})
    train.write_text("\n".join(lines) + "\n")
    assert main(["train", *_overrides(tmp_path, tiny_model_dir, data_files, "data.invalid_rows=drop")]) == 0
    out = capsys.readouterr().out
    summary = json.loads((tmp_path / "runs" / "run" / "summary.json").read_text())
    drops = summary["dropped"]["train"]
    assert drops["count"] == 3 and drops["unit"] == "line" and summary["dropped"]["eval"]["count"] == 0
    (wizard, wizard_drop), (other, other_drop) = drops["by_reason"].items()
    assert wizard_drop == {"count": 2, "first": [3, 10]} and other_drop == {"count": 1, "first": [7]}
    assert f"{train}: 3 of 16 rows dropped (2 × {wizard}, 1 × {other})\n  {wizard}: lines 3, 10\n  {other}: line 7\n" \
        in out
    report = (tmp_path / "runs" / "run" / "report.html").read_text()
    assert "<h2>Dropped rows</h2>" in report and "<td>lines 3, 10</td>" in report


def test_resume_after_a_metrics_line_cut_short(tmp_path, tiny_model_dir, data_files):
    # a full disk (or a kill) mid-write leaves half a line at the end of metrics.jsonl; resume drops it
    run_dir = tmp_path / "runs" / "run"
    assert main(["train", *_overrides(tmp_path, tiny_model_dir, data_files)]) == 0
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "lo')
    assert main(["train", "--resume", str(run_dir), "train.max_steps=3"]) == 0
    assert [row["step"] for row in read_metrics(run_dir)] == [1, 2, 3]


def test_the_remote_code_refusal_names_only_the_flag(evil_model_dir, capsys):
    """Issue 25: config values never grant remote code, so the message names the command-line flag alone. A
    model type transformers does not know can only load through its own code."""
    config = json.loads((evil_model_dir / "config.json").read_text())
    (evil_model_dir / "config.json").write_text(json.dumps({**config, "model_type": "evil-llama"}))
    assert main(["chat", "--model", str(evil_model_dir), "--prompt", "Hi", "--max-tokens", "1"]) == 2
    assert _errors(capsys.readouterr()) == [
        f"error: {evil_model_dir} ships its own model code (auto_map in its config), which runs only with the "
        "command-line flag --trust-remote-code (no config file can grant it); pass it only if you trust the code in "
        f"{evil_model_dir}"]
