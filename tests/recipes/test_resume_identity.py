"""Resume identity: every field marked IDENTITY refuses a resume when it changed; other fields do not. The saved
configs a resume reads (the run dir's and the checkpoint's) go through the strict loader and the typed config."""

import hashlib
import json
import re
from types import SimpleNamespace

import pytest
import yaml

from tunesmith.cli import main
from tunesmith.errors import TunesmithError
from tunesmith.recipes import sft
from tunesmith.train.checkpoint import COMPLETE, CONFIG_FILE, STATE_FILE, latest_checkpoint
from tunesmith.train.resume import IDENTITY_KEYS, check_resumable
from tunesmith.train.metrics import read_metrics
from tunesmith.train.schedule import lr_at


def _saved_with(config, key: str, value) -> str:
    """``config``'s saved YAML with ``key`` set to ``value``: a checkpoint written under other settings."""
    tree = config.model_dump(mode="json")
    *sections, leaf = key.split(".")
    node = tree
    for section in sections:
        node[section] = node[section] or {}  # the dpo section is None outside DPO runs
        node = node[section]
    node[leaf] = value
    return yaml.safe_dump(tree)


# A valid value for each IDENTITY key other than the test config's: the saved config is validated like every
# config, so a changed key must still hold something the config accepts.
OTHER = {"model.source": "other", "model.template": "chatml", "method.name": "full", "method.objective": "dpo",
         "method.freeze_embeddings": True, "lora.r": 8, "lora.alpha": 4.0, "lora.dropout": 0.1,
         "lora.target_modules": ["q_proj"], "lora.use_rslora": True, "quant.type": "fp4", "quant.double_quant": False,
         "quant.blocksize": 128, "quant.storage": "bf16", "quant.skip_modules": [], "data.train": "other",
         "data.format": "messages", "data.split": "train", "data.max_length": 64, "data.overlength": "drop",
         "data.invalid_rows": "drop", "data.train_on": "last", "data.reasoning": "on", "data.batching": "pack",
         "data.token_budget": 64, "train.micro_batch_size": 3, "seed": 5, "optim.name": "adamw_8bit",
         "dpo.loss": "ipo", "dpo.reference": "precomputed", "dpo.init_adapter": "sft-run", "dpo.init_mode": "stack"}


@pytest.mark.parametrize("key", IDENTITY_KEYS)
def test_each_identity_key_refuses_a_resume(make_config, key):
    config = make_config(*(["method.objective=dpo"] if key.startswith("dpo.") else []))
    setup = SimpleNamespace(config=config, fingerprints={}, run_dir=config.run_dir)
    with pytest.raises(TunesmithError, match=f"cannot resume .*: .*{re.escape(key)} changed from "
                                             f"{re.escape(repr(OTHER[key]))} to "):
        check_resumable(_saved_with(config, key, OTHER[key]), {}, setup)


def test_a_key_the_checkpoint_predates_reads_as_its_default(make_config):
    """A checkpoint written before a key existed meant that key's default: no change is reported for it, and a
    current value other than the default is."""
    config = make_config()
    setup = SimpleNamespace(config=config, fingerprints={}, run_dir=config.run_dir)
    tree = config.model_dump(mode="json")
    del tree["data"]["overlength"]  # an IDENTITY key, absent from the old checkpoint
    check_resumable(yaml.safe_dump(tree), {}, setup)
    changed = make_config("data.overlength=drop")
    setup = SimpleNamespace(config=changed, fingerprints={}, run_dir=changed.run_dir)
    with pytest.raises(TunesmithError, match="data.overlength changed from 'truncate' to 'drop'"):
        check_resumable(yaml.safe_dump(tree), {}, setup)


def test_other_keys_do_not(make_config):
    config = make_config()
    setup = SimpleNamespace(config=config, fingerprints={}, run_dir=config.run_dir)
    for key in ("optim.lr", "train.max_steps", "eval.batch_size", "train.log_every"):
        check_resumable(_saved_with(config, key, 123), {}, setup)


@pytest.mark.parametrize("saved, now", [((2, 2), (4, 1)), ((1, 4), (2, 2)), ((2, 1), (1, 2))],
                         ids=["2x2-on-1x4", "4x1-on-2x2", "1x2-on-2x1"])
def test_the_global_batch_may_move_to_another_number_of_processes(make_config, saved, now):
    """(processes, grad_accum) of the checkpoint, then of the resume: the same micro-batches per step."""
    config = make_config(f"train.grad_accum={now[1]}")
    setup = SimpleNamespace(config=config, fingerprints={}, run_dir=config.run_dir)
    check_resumable(_saved_with(config, "train.grad_accum", saved[1]), {}, setup, saved_processes=saved[0],
                    processes=now[0])


@pytest.mark.parametrize("saved, now, hint", [
    ((2, 2), (1, 2), "on 1 process set train.grad_accum=4"),
    ((1, 3), (2, 1), "no train.grad_accum gives 3 on 2 processes"),
    ((1, 2), (1, 4), "on 1 process set train.grad_accum=2"),
])
def test_a_changed_global_batch_is_refused_with_the_grad_accum_that_keeps_it(make_config, saved, now, hint):
    config = make_config(f"train.grad_accum={now[1]}")
    setup = SimpleNamespace(config=config, fingerprints={}, run_dir=config.run_dir)

    def name(n):
        return f"{n} process" + ("es" if n > 1 else "")

    expected = (f"cannot resume {config.run_dir}: the global batch changed: the checkpoint took {name(saved[0])} "
                f"× grad_accum {saved[1]} = {saved[0] * saved[1]} micro-batches per step, this run {name(now[0])} "
                f"× grad_accum {now[1]} = {now[0] * now[1]}; {hint}. Start a new run for different settings")
    with pytest.raises(TunesmithError) as caught:
        check_resumable(_saved_with(config, "train.grad_accum", saved[1]), {}, setup, saved_processes=saved[0],
                        processes=now[0])
    assert str(caught.value) == expected


class Stop(Exception):
    pass


def _stop_at_step_3(config) -> None:
    """Run ``config`` and kill it as step 3 starts: its newest checkpoint is step 2's."""
    def stop(step, micro):
        if step == 3:
            raise Stop()

    with pytest.raises(Stop):
        sft.run(config, on_micro_batch=stop)


def _rewrite(checkpoint, name: str, text: str) -> None:
    """Replace a checkpoint file and its entry in the completion marker: a file written so, not damaged later."""
    (checkpoint / name).write_text(text)
    marker = json.loads((checkpoint / COMPLETE).read_text())
    for entry in marker["files"]:
        if entry["path"] == name:
            data = (checkpoint / name).read_bytes()
            entry.update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    (checkpoint / COMPLETE).write_text(json.dumps(marker))


@pytest.mark.parametrize("text, problem", [
    ("lora:\n  r: 4\nlora:\n  r: 8\n", "key 'lora' is written twice (lines 1 and 3); keep one"),
    ("lora:\n  rank: 4\n", "unknown key 'lora.rank'"),
    ("seed: -1\n", "seed: Input should be greater than or equal to 0 (got -1)"),
], ids=["duplicate-key", "unknown-key", "bad-value"])
def test_a_damaged_checkpoint_config_is_named(make_config, text, problem):
    config = make_config()
    setup = SimpleNamespace(config=config, fingerprints={}, run_dir=config.run_dir)
    with pytest.raises(TunesmithError) as caught:
        check_resumable(text, {}, setup, source="ckpt/config.yaml")
    assert str(caught.value).startswith("ckpt/config.yaml") and problem in str(caught.value)


def test_resume_refuses_a_saved_config_with_a_duplicate_key(make_config, capsys):
    """Through the CLI: the run dir's config.yaml, then the checkpoint's, with a key written twice — each is
    one error line naming the file (exit status 2), and nothing trains."""
    config = make_config()
    _stop_at_step_3(config)
    capsys.readouterr()
    logged = read_metrics(config.run_dir)
    saved = config.run_dir / "config.yaml"
    text = saved.read_text()
    saved.write_text(text + "seed: 1\n")
    assert main(["train", "--resume", str(config.run_dir)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: config file {saved}: key 'seed' is written twice") and err.count("\n") == 1
    saved.write_text(text)
    checkpoint = latest_checkpoint(config.run_dir)
    _rewrite(checkpoint, CONFIG_FILE, (checkpoint / CONFIG_FILE).read_text() + "seed: 1\n")
    assert main(["train", "--resume", str(config.run_dir)]) == 2
    *loading, last = capsys.readouterr().err.rstrip("\n").split("\n")  # the model loads first, then the check
    assert last.startswith(f"error: {checkpoint / CONFIG_FILE}: key 'seed' is written twice (lines ")
    assert not any("error" in line for line in loading)
    assert read_metrics(config.run_dir) == logged  # nothing trained, the log not cut back to the checkpoint


def test_a_checkpoint_that_records_no_process_count_was_written_by_one_process(make_config):
    """Checkpoints from before the count was recorded: their global batch is grad_accum × 1."""
    config = make_config()

    _stop_at_step_3(config)
    checkpoint = latest_checkpoint(config.run_dir)
    state = json.loads((checkpoint / STATE_FILE).read_text())
    assert state.pop("processes") == 1
    _rewrite(checkpoint, STATE_FILE, json.dumps(state))
    doubled = config.model_copy(update={"train": config.train.model_copy(update={"grad_accum": 4})})
    with pytest.raises(TunesmithError, match="the checkpoint took 1 process × grad_accum 2 = 2 micro-batches per"):
        sft.run(doubled, resume=True)
    sft.run(config, resume=True)
    assert [row["step"] for row in read_metrics(config.run_dir) if "loss" in row] == [1, 2, 3, 4, 5, 6]


def test_resume_with_a_new_learning_rate_continues(make_config):
    """End to end: a run stopped at step 3 resumes from its step-2 checkpoint under optim.lr=0.02 (not an
    identity key) and trains to the end; changing lora.r (one) is refused."""
    config = make_config()

    _stop_at_step_3(config)
    with pytest.raises(TunesmithError, match="lora.r changed from 4 to 8"):
        sft.run(config.model_copy(update={"lora": config.lora.model_copy(update={"r": 8})}), resume=True)
    faster = config.model_copy(update={"optim": config.optim.model_copy(update={"lr": 0.02})})
    sft.run(faster, resume=True)
    rows = [row for row in read_metrics(config.run_dir) if "loss" in row]
    assert [row["step"] for row in rows] == [1, 2, 3, 4, 5, 6]
    # steps 1-2 come from the checkpoint (lr 0.01), steps 3-6 ran at the new rate: the schedule is a function of
    # the step, so the new base rate applies from the resumed step on (6 steps, 1 warmup step)
    expected = [lr_at(row["step"] - 1, base_lr=0.01 if row["step"] <= 2 else 0.02, total_steps=6, warmup=1)
                for row in rows]
    assert [row["lr"] for row in rows] == pytest.approx(expected, rel=1e-12)
