"""Checkpoint store: exact round trip, retention, crash safety (a real SIGKILL mid-save), damage detection."""

from __future__ import annotations

import random
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

from tunesmith.errors import TunesmithError
from tunesmith.train.checkpoint import (COMPLETE, capture_rng, latest_checkpoint, load_checkpoint, restore_rng,
                                        save_checkpoint)


def _save(run_dir, step, *, value=0.0, **kwargs):
    """A tiny checkpoint whose weight holds ``value``, so tests can tell checkpoints apart."""
    return save_checkpoint(run_dir, step, weights={"w": torch.full((4,), value)},
                           optimizer={"state": {}, "param_groups": []}, state={"step": step},
                           rng=capture_rng(), config_yaml="seed: 0\n", **kwargs)


def _train_step(model, optimizer, x):
    optimizer.zero_grad()
    model(x).pow(2).mean().backward()
    optimizer.step()


def test_round_trip_resumes_exactly(tmp_path):
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    x = torch.randn(8, 4)
    for _ in range(2):
        _train_step(model, optimizer, x)
    state = {"step": 2, "epoch": 0, "batch_in_epoch": 5, "scheduler": {"last_epoch": 2, "_last_lr": [0.1]},
             "tokens_seen": 1234}
    config_yaml = "model: tiny\noptim:\n  lr: 0.1\n"
    random.seed(1)
    np.random.seed(2)
    random.gauss(0, 1)  # leaves a cached second Gaussian in random's state
    rng = capture_rng()
    expected_draws = (torch.rand(5), random.random(), random.gauss(0, 1), np.random.rand(3))

    path = save_checkpoint(tmp_path, 2, weights=model.state_dict(), optimizer=optimizer.state_dict(),
                           state=state, rng=rng, config_yaml=config_yaml)

    assert path == tmp_path / "checkpoints" / "step-2"
    ckpt = load_checkpoint(path)
    assert (ckpt.path, ckpt.step, ckpt.state, ckpt.config_yaml) == (path, 2, state, config_yaml)
    assert ckpt.weights.keys() == model.state_dict().keys()
    assert all(torch.equal(ckpt.weights[k], v) for k, v in model.state_dict().items())

    resumed = nn.Linear(4, 3)
    resumed.load_state_dict(ckpt.weights)
    resumed_optimizer = torch.optim.AdamW(resumed.parameters(), lr=0.1)
    resumed_optimizer.load_state_dict(ckpt.optimizer)
    _train_step(model, optimizer, x)
    _train_step(resumed, resumed_optimizer, x)
    for original, reloaded in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(original, reloaded)

    restore_rng(ckpt.rng)
    draws = (torch.rand(5), random.random(), random.gauss(0, 1), np.random.rand(3))
    assert torch.equal(draws[0], expected_draws[0])
    assert draws[1:3] == expected_draws[1:3]
    assert np.array_equal(draws[3], expected_draws[3])


def test_tied_and_non_contiguous_weights_are_saved(tmp_path):
    embed = torch.arange(6.0).reshape(2, 3)
    weights = {"embed.weight": embed, "lm_head.weight": embed, "transposed": embed.t()}
    ckpt = load_checkpoint(save_checkpoint(tmp_path, 1, weights=weights, optimizer={}, state={},
                                           rng=capture_rng(), config_yaml=""))
    assert all(torch.equal(ckpt.weights[k], v) for k, v in weights.items())


def test_keep_two_and_latest_ignores_incomplete_dirs(tmp_path):
    for step in (5, 9, 10):  # 10 < 9 as text: the order must be numeric
        _save(tmp_path, step, keep=2)
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["step-10", "step-9"]

    (root / ".tmp-step-11-deadbeef").mkdir()
    (root / "step-99").mkdir()
    (root / "step-99" / "weights.safetensors").write_bytes(b"half")
    assert latest_checkpoint(tmp_path) == root / "step-10"
    assert latest_checkpoint(tmp_path / "no-such-run") is None


def test_resaving_a_step_replaces_it_and_an_interrupted_replace_keeps_the_old_one(tmp_path):
    root = tmp_path / "checkpoints"
    _save(tmp_path, 3, value=1.0)
    _save(tmp_path, 3, value=2.0)
    assert sorted(p.name for p in root.iterdir()) == ["step-3"]
    assert torch.equal(load_checkpoint(root / "step-3").weights["w"], torch.full((4,), 2.0))

    # A crash between moving the old step-3 aside and publishing the new one.
    (root / "step-3").rename(root / ".old-step-3")
    assert latest_checkpoint(tmp_path) == root / ".old-step-3"
    _save(tmp_path, 4, value=4.0)
    assert sorted(p.name for p in root.iterdir()) == ["step-3", "step-4"]
    assert torch.equal(load_checkpoint(root / "step-3").weights["w"], torch.full((4,), 2.0))


_KILLED_SAVER = r"""
import sys, time
import torch
from tunesmith.train.checkpoint import capture_rng, save_checkpoint

def save(step, **kwargs):
    save_checkpoint(sys.argv[1], step, weights={"w": torch.full((4,), float(step))}, optimizer={},
                    state={"step": step}, rng=capture_rng(), config_yaml="seed: 0\n", **kwargs)

def write_slowly(tmp_dir):
    with open(tmp_dir / "adapter.bin", "wb") as f:
        f.write(b"\0" * (1 << 20))
        f.flush()
        print("saving", flush=True)
        time.sleep(60)

save(1)
save(2, write_extra=write_slowly)
"""


def test_sigkill_during_save_leaves_the_previous_checkpoint(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_SAVER, str(tmp_path)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.strip() == "saving", proc.stderr.read()
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=10) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()

    root = tmp_path / "checkpoints"
    assert [p.name for p in root.glob(".tmp-*")] and not (root / "step-2").exists()
    assert latest_checkpoint(tmp_path) == root / "step-1"
    ckpt = load_checkpoint(root / "step-1")
    assert ckpt.step == 1 and ckpt.state == {"step": 1}
    assert torch.equal(ckpt.weights["w"], torch.full((4,), 1.0))

    _save(tmp_path, 2, value=2.0)
    assert sorted(p.name for p in root.iterdir()) == ["step-1", "step-2"]
    assert load_checkpoint(latest_checkpoint(tmp_path)).step == 2


@pytest.mark.parametrize("name", ["optimizer.pt", "weights.safetensors"])
def test_truncated_file_is_named(tmp_path, name):
    path = _save(tmp_path, 4)
    file = path / name
    size = file.stat().st_size
    with open(file, "r+b") as f:
        f.truncate(size // 2)
    with pytest.raises(TunesmithError, match="truncated or corrupt") as err:
        load_checkpoint(path)
    assert str(file) in str(err.value)
    assert f"expected {size} bytes, found {size // 2}" in str(err.value)
    assert f"delete {path}" in str(err.value)


def test_corrupt_and_missing_files_and_missing_marker_are_named(tmp_path):
    path = _save(tmp_path, 4)
    weights = path / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # same size, different bytes
    weights.write_bytes(bytes(data))
    with pytest.raises(TunesmithError, match="sha256") as err:
        load_checkpoint(path)
    assert str(weights) in str(err.value)

    weights.unlink()
    with pytest.raises(TunesmithError, match="is missing") as err:
        load_checkpoint(path)
    assert str(weights) in str(err.value)

    (path / COMPLETE).unlink()
    with pytest.raises(TunesmithError, match="incomplete"):
        load_checkpoint(path)
