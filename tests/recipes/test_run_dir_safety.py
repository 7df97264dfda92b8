"""Issue 25, the run dir: only a dir tunesmith marked as a run is ever cleared, and clearing removes only what a
run writes; nothing is written through a symbolic link that leads outside the run dir."""

from __future__ import annotations

import json

import pytest

from tunesmith.cli import main
from tunesmith.files import check_links, write_atomic
from tunesmith.recipes.run_dir import LOCK_FILE, MARKER
from tunesmith.errors import TunesmithError


def _victim(tmp_path, config_yaml: str):
    """A user's dir that holds a copy of a run's config.yaml beside their own files."""
    victim = tmp_path / "out" / "victim"
    (victim / "src").mkdir(parents=True)
    (victim / "src" / "main.py").write_text("print('mine')\n")
    (victim / "config.yaml").write_text(config_yaml)
    (victim / "notes.txt").write_text("precious\n")
    return victim


def _error(capsys) -> str:
    """The one error line (loading draws progress bars on stderr too), with its newline."""
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:") or "Traceback" in line]
    assert len(lines) == 1, lines
    return lines[0] + "\n"


def _tree(path):
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


def test_a_dir_that_merely_holds_a_config_yaml_is_never_cleared(tmp_path, train_tiny, tiny_model_dir, data_files,
                                                                capsys):
    from tunesmith.config import load_config

    train, heldout = data_files
    config = load_config(None, [f"model.source={tiny_model_dir}", f"data.train={train}", f"data.eval={heldout}",
                                f"output_dir={tmp_path / 'out'}", "name=victim", "train.max_steps=2"])
    victim = _victim(tmp_path, config.to_yaml())
    before = _tree(victim)
    assert train_tiny(tmp_path / "out", "victim") == 2
    assert _error(capsys) == (f"error: run dir {victim} already exists and was not made by a tunesmith "
                                       f"run (no {MARKER}); choose another name with name=NEW_NAME\n")
    assert _tree(victim) == before and (victim / "notes.txt").read_text() == "precious\n"
    assert main(["train", "--resume", str(victim)]) == 2
    assert _error(capsys).endswith(f"was not made by a tunesmith run (no {MARKER}); nothing to resume\n")
    assert _tree(victim) == before and not (victim / LOCK_FILE).exists()


def test_clearing_a_failed_start_removes_only_what_the_run_wrote(tmp_path, train_tiny, capsys):
    victim = tmp_path / "out" / "victim"
    victim.mkdir(parents=True)
    # a failed start: tunesmith's marker and config, a metrics log, and a file of the user's own
    (victim / MARKER).write_text(json.dumps({"run_id": "x"}))
    (victim / "config.yaml").write_text("x\n")
    (victim / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    (victim / ".metrics.jsonl.tmp").write_text("half")
    (victim / "notes.txt").write_text("precious\n")
    capsys.readouterr()
    assert train_tiny(tmp_path / "out", "victim") == 0
    assert "stopped before its first checkpoint: starting it over" in capsys.readouterr().out
    assert (victim / "notes.txt").read_text() == "precious\n"
    assert not (victim / ".metrics.jsonl.tmp").exists()
    assert json.loads((victim / MARKER).read_text())["run_id"] != "x"  # the new run's own identity
    assert [json.loads(line)["step"] for line in (victim / "metrics.jsonl").read_text().splitlines()] == [1, 2]


@pytest.mark.parametrize("planted", ["metrics.jsonl.tmp", ".summary.json.tmp", "tb", "checkpoints/.tmp-step-9"])
def test_a_link_to_outside_the_run_dir_is_refused_before_anything_is_written(tmp_path, train_tiny, capsys, planted):
    assert train_tiny(tmp_path / "out", "victim") == 0
    victim = tmp_path / "out" / "victim"
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("keep\n")
    link = victim / planted
    if link.exists():
        import shutil

        shutil.rmtree(link)
    link.symlink_to(outside if planted == "tb" else outside / "keep.txt")
    capsys.readouterr()
    assert main(["train", "--resume", str(victim), "train.max_steps=4"]) == 2
    assert _error(capsys) == (f"error: run dir {victim} holds {link}, a symbolic link to {(outside if planted == 'tb' else outside / 'keep.txt').resolve()} "
                   "outside it; tunesmith writes only inside a run dir: remove the link, then try again\n")
    assert _tree(outside) == ["keep.txt"] and (outside / "keep.txt").read_text() == "keep\n"


def test_write_atomic_never_writes_through_a_planted_temp_link(tmp_path):
    outside = tmp_path / "outside.txt"
    outside.write_text("keep\n")
    target = tmp_path / "run" / "summary.json"
    target.parent.mkdir()
    (target.parent / ".summary.json.tmp").symlink_to(outside)
    write_atomic(target, "{}\n")
    assert outside.read_text() == "keep\n" and target.read_text() == "{}\n" and not target.is_symlink()
    assert not (target.parent / ".summary.json.tmp").exists()


def test_links_inside_the_run_dir_are_fine(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints" / "step-2").mkdir(parents=True)
    (run / "latest").symlink_to(run / "checkpoints" / "step-2")
    check_links(run)
    (run / "checkpoints" / "escape").symlink_to("../../..")
    with pytest.raises(TunesmithError, match="escape, a symbolic link to .* outside it"):
        check_links(run)


def test_a_garbage_metrics_line_on_resume_is_one_line(tmp_path, train_tiny, capsys):
    assert train_tiny(tmp_path / "out", "victim") == 0
    victim = tmp_path / "out" / "victim"
    with open(victim / "metrics.jsonl", "a") as f:
        f.write("garbage\n")
    capsys.readouterr()
    assert main(["train", "--resume", str(victim), "train.max_steps=3"]) == 2
    assert _error(capsys) == (f"error: {victim / 'metrics.jsonl'}: line 3 is not a metrics row (a JSON "
                                       "object); the file was changed by hand: remove the line, then try again\n")


@pytest.mark.parametrize("override", ["lora.target_modules=[]", "lora.target_modules=[nonexistent_proj]",
                                      "lora.target_modules=[lm_head]", "dpo.init_adapter=ADAPTER"])
def test_a_failed_start_leaves_no_run_dir(tmp_path, train_tiny, capsys, override):
    """Every check that can fail on the user's input runs before the run dir is claimed."""
    extra = [override]
    if override.startswith("dpo."):
        adapter = tmp_path / "sft-adapter"  # an adapter dir without its safetensors file
        adapter.mkdir()
        (adapter / "adapter_config.json").write_text(json.dumps(
            {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}))
        pairs = tmp_path / "pairs.jsonl"
        pairs.write_text("".join(json.dumps({"prompt": f"Say {i}", "chosen": f"{i}", "rejected": "no"}) + "\n"
                                 for i in range(8)))
        extra = [f"dpo.init_adapter={adapter}", "method.objective=dpo", f"data.train={pairs}", "data.eval="]
    assert train_tiny(tmp_path / "out", "victim", *extra) == 2
    assert _error(capsys).startswith("error: ")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("override", ["name=other", "output_dir=/elsewhere"])
def test_resume_refuses_to_move_or_rename_the_run(tmp_path, train_tiny, capsys, override):
    assert train_tiny(tmp_path / "out", "victim") == 0
    victim = tmp_path / "out" / "victim"
    capsys.readouterr()
    assert main(["train", "--resume", str(victim), override]) == 2
    assert _error(capsys) == (f"error: {override}: a run dir keeps its own name and place ({victim}); move or copy "
                              "the dir itself, or start a new run with --config and name=NEW_NAME\n")
    assert not (tmp_path / "out" / "other").exists() and not (tmp_path / "elsewhere").exists()
