"""Resume identity: every field marked IDENTITY refuses a resume when it changed; other fields do not."""

from types import SimpleNamespace

import pytest
import yaml

from tunesmith.errors import TunesmithError
from tunesmith.recipes import sft
from tunesmith.recipes.resume import IDENTITY_KEYS, check_resumable
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


@pytest.mark.parametrize("key", IDENTITY_KEYS)
def test_each_identity_key_refuses_a_resume(make_config, key):
    config = make_config()
    setup = SimpleNamespace(config=config, fingerprints={}, run_dir=config.run_dir)
    with pytest.raises(TunesmithError, match=f"cannot resume .*: {key} changed from 'other' to "):
        check_resumable(_saved_with(config, key, "other"), {}, setup)


def test_other_keys_do_not(make_config):
    config = make_config()
    setup = SimpleNamespace(config=config, fingerprints={}, run_dir=config.run_dir)
    for key in ("optim.lr", "train.max_steps", "eval.batch_size", "train.log_every"):
        check_resumable(_saved_with(config, key, 123), {}, setup)


class Stop(Exception):
    pass


def test_resume_with_a_new_learning_rate_continues(make_config):
    """End to end: a run stopped at step 3 resumes from its step-2 checkpoint under optim.lr=0.02 (not an
    identity key) and trains to the end; changing lora.r (one) is refused."""
    config = make_config()

    def stop(step, micro):
        if step == 3:
            raise Stop()

    with pytest.raises(Stop):
        sft.run(config, on_micro_batch=stop)
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
