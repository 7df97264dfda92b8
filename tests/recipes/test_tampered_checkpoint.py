"""Issue 25: a checkpoint changed by hand, its COMPLETE marker re-hashed to match, is refused on resume with one
line naming the file — never a traceback, never a run resumed into garbage."""

from __future__ import annotations

import json
import pickle

import pytest
import torch
from safetensors.torch import load_file, save_file

from tunesmith.cli import main
from tunesmith.train.checkpoint import COMPLETE, _write_marker, latest_checkpoint


def _state(ckpt, change):
    state = json.loads((ckpt / "state.json").read_text())
    (ckpt / "state.json").write_text(json.dumps(change(state)))


def _weights(ckpt, change):
    weights = load_file(str(ckpt / "weights.safetensors"))
    save_file(change(weights), str(ckpt / "weights.safetensors"))


def _first(mapping, value_of):
    name = sorted(mapping)[0]
    return {**mapping, name: value_of(mapping[name])}


class Evil:
    def __reduce__(self):
        return (print, ("pickle code ran",))


TAMPERS = {
    "state a list": (lambda c: (c / "state.json").write_text("[1, 2]"),
                     "state.json holds a list, not a train state (a JSON object)"),
    "step 1000 of 2": (lambda c: _state(c, lambda s: {**s, "step": 1000, "epoch": 10**6}),
                       "records an impossible position (step 1000, but the checkpoint is of step 2; epoch 1000000 "
                       "after 1000 steps"),
    "rng of the wrong size": (lambda c: save_file({**load_file(str(c / "rng.safetensors")),
                                                   "torch_cpu": torch.zeros(7, dtype=torch.uint8)},
                                                  str(c / "rng.safetensors")),
                              "rng.safetensors: the saved RNG state is damaged ("),
    "a weight of the wrong shape": (lambda c: _weights(c, lambda w: _first(w, lambda t: torch.zeros(3, 3))),
                                    "holds weights of the wrong shape: "),
    "NaN weights": (lambda c: _weights(c, lambda w: _first(w, lambda t: torch.full_like(t, float("nan")))),
                    "holds non-finite values (NaN or infinity) in "),
    "a truncated optimizer.pt": (lambda c: (c / "optimizer.pt").write_bytes((c / "optimizer.pt").read_bytes()[:100]),
                                 "optimizer.pt cannot be read ("),
    "a pickle optimizer.pt": (lambda c: (c / "optimizer.pt").write_bytes(pickle.dumps(Evil())),
                              "optimizer.pt holds Python objects beyond tensors (a pickle, which could run code when "
                              "loaded); tunesmith never loads pickles"),
}


@pytest.mark.parametrize("tamper", sorted(TAMPERS))
def test_a_tampered_checkpoint_is_refused_with_its_file(tmp_path, train_tiny, capsys, tamper):
    change, message = TAMPERS[tamper]
    assert train_tiny(tmp_path, "run") == 0
    ckpt = latest_checkpoint(tmp_path / "run")
    change(ckpt)
    (ckpt / COMPLETE).unlink()
    _write_marker(ckpt, 2)  # the marker re-hashed: only the contents can tell
    capsys.readouterr()
    assert main(["train", "--resume", str(tmp_path / "run"), "train.max_steps=4"]) == 2
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if line.startswith("error:") or "Traceback" in line]
    assert len(errors) == 1 and message in errors[0] and str(tmp_path / "run") in errors[0], errors
    assert "pickle code ran" not in captured.out + captured.err
    assert latest_checkpoint(tmp_path / "run") == ckpt  # nothing trained on
