"""Two identical runs write byte-identical adapter files (the safetensors library orders metadata keys by a
per-process hash, so its own writer does not)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import torch
from safetensors import safe_open

from tunesmith.peft.io import stable_safetensors

SCRIPT = """
import sys, torch
from tunesmith.peft.io import stable_safetensors
tensors = {"b.weight": torch.arange(6.).reshape(2, 3), "a.weight": torch.ones(4, dtype=torch.bfloat16)}
metadata = {"format": "pt", "tunesmith_base": '{"name": "Ünïcode"}', "a": "1", "z": "2", "m": "3"}
sys.stdout.buffer.write(stable_safetensors(tensors, metadata))
"""


def test_the_bytes_do_not_depend_on_the_process(tmp_path):
    outputs = {subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, check=True,
                              env={**os.environ, "PYTHONHASHSEED": str(seed)}).stdout for seed in range(6)}
    assert len(outputs) == 1
    path = tmp_path / "a.safetensors"
    path.write_bytes(outputs.pop())
    with safe_open(str(path), "pt") as f:
        assert sorted(f.metadata()) == ["a", "format", "m", "tunesmith_base", "z"]  # read back as a hash map
        assert f.metadata()["tunesmith_base"] == '{"name": "Ünïcode"}'
        assert torch.equal(f.get_tensor("b.weight"), torch.arange(6.).reshape(2, 3))
        assert torch.equal(f.get_tensor("a.weight"), torch.ones(4, dtype=torch.bfloat16))


def test_two_identical_training_runs_write_identical_adapter_files(tmp_path, tiny_model_dir):
    digests = []
    for name in ("one", "two"):
        subprocess.run([sys.executable, "-m", "tunesmith", "train", f"model.source={tiny_model_dir}",
                        f"output_dir={tmp_path}", f"name={name}", "train.max_steps=2", "eval.before=false",
                        "eval.task_rows=1", "eval.loss_rows=2", "eval.max_new_tokens=1", "train.progress=false"],
                       check=True, capture_output=True)
        digests.append(hashlib.sha256((tmp_path / name / "adapter" / "adapter_model.safetensors").read_bytes()).digest())
    assert digests[0] == digests[1]


def test_metadata_order_is_sorted_even_when_given_reversed():
    data = stable_safetensors({"x": torch.zeros(1)}, {"z": "1", "a": "2"})
    assert data[8:].startswith(b'{"__metadata__":{"a":"2","z":"1"}')
