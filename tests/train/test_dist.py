"""Several processes on the CPU (gloo), started by torchrun as a user would: two processes with accumulation A
train exactly what one process with accumulation 2A trains (per-step losses, gradient norms and the final
adapter, fp32, 1e-5), for SFT and DPO; a checkpoint of two processes resumes on one and the reverse, with every
example of the epoch seen once; ``--gpus`` without CUDA is one error line."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from tunesmith.cli import main
from tunesmith.train.checkpoint import latest_checkpoint
from tunesmith.train.metrics import read_metrics

WORDS = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet"]
# 13 examples in micro-batches of 2: a plan of 7 micro-batches, so an epoch's last step has one micro-batch and,
# with two processes, rank 1 has none (it runs one with weight 0 so DDP's all-reduce still meets)
ROWS = 13


def _chat(i: int) -> dict:
    a, b = WORDS[i % 10], WORDS[(i * 3 + 1) % 10]
    return {"messages": [{"role": "user", "content": f"Repeat {a} {b}"},
                         {"role": "assistant", "content": f"{a} {b} {i % 7}" + " again" * (i % 3)}]}


def _pair(i: int) -> dict:
    a, b = WORDS[i % 10], WORDS[(i * 3 + 1) % 10]
    return {"prompt": f"Repeat {a} {b}", "chosen": f"{a} {b}", "rejected": f"{b} {a} {i % 5}"}


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture()
def overrides(tmp_path, tiny_model_dir):
    def make(kind: str, name: str, *extra: str) -> list[str]:
        row = _pair if kind == "dpo" else _chat
        train = _write(tmp_path / f"{kind}-train.jsonl", [row(i) for i in range(ROWS)])
        heldout = _write(tmp_path / f"{kind}-eval.jsonl", [row(i) for i in range(100, 103)])
        base = [f"model.source={tiny_model_dir}", "model.device=cpu", f"data.train={train}", f"data.eval={heldout}",
                f"output_dir={tmp_path / 'runs'}", f"name={name}", "train.progress=false", "eval.task_rows=0",
                "train.micro_batch_size=2", "optim.lr=0.01", "lora.r=4", "lora.alpha=8", "train.log_every=1",
                "train.checkpoint_every=2", "train.keep_checkpoints=5"]
        if kind == "dpo":
            base += ["method.objective=dpo", "dpo.beta=0.5", "dpo.reference=precomputed"]
        return base + list(extra)

    return make


def torchrun(processes: int, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    """``torchrun --nproc-per-node N -m tunesmith train ARGS`` on the CPU, one thread per process."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}",
               "-m", "tunesmith", "train", *args]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180)
    assert (done.returncode == 0) == check, done.stderr[-4000:]
    return done


def _steps(run_dir) -> list[dict]:
    return [row for row in read_metrics(run_dir) if "loss" in row]


def _assert_same_training(one, two) -> None:
    """Per-step losses, metrics, gradient norms and token counts, and the final adapter, at 1e-5 (fp32)."""
    rows_one, rows_two = _steps(one), _steps(two)
    assert [r["step"] for r in rows_one] == [r["step"] for r in rows_two] and rows_one
    for a, b in zip(rows_one, rows_two):
        assert a["tokens"] == b["tokens"] and a["epoch"] == b["epoch"]
        for key in set(a) - {"tokens_per_s", "step", "epoch", "tokens", "skipped"}:
            assert b[key] == pytest.approx(a[key], abs=1e-5, rel=1e-5), (a["step"], key)
    weights_one = load_file(one / "adapter" / "adapter_model.safetensors")
    weights_two = load_file(two / "adapter" / "adapter_model.safetensors")
    assert weights_one.keys() == weights_two.keys()
    for key in weights_one:
        torch.testing.assert_close(weights_two[key], weights_one[key], atol=1e-5, rtol=1e-5)
    moved = [key for key in weights_one if "lora_B" in key and weights_one[key].abs().max() > 0]
    assert moved  # the adapters trained (lora_B starts at zero)


@pytest.mark.parametrize("kind", ["sft", "dpo"])
def test_two_processes_train_what_one_process_with_twice_the_accumulation_trains(kind, overrides, tmp_path, capsys):
    # 5 steps: one epoch of 4 steps (its last with one micro-batch) and one step into the next epoch
    assert main(["train", *overrides(kind, "one", "train.grad_accum=2", "train.max_steps=5")]) == 0
    done = torchrun(2, *overrides(kind, "two", "train.grad_accum=1", "train.max_steps=5"))
    one, two = tmp_path / "runs" / "one", tmp_path / "runs" / "two"
    _assert_same_training(one, two)
    assert "rank" not in done.stdout and done.stdout.count("run dir:") == 1  # rank 0 alone reports
    summary_one, summary_two = (json.loads((d / "summary.json").read_text()) for d in (one, two))
    assert summary_two["steps"] == summary_one["steps"] == 5 and summary_two["tokens"] == summary_one["tokens"]
    # rank 0 writes each checkpoint, with rank 1's RNG states beside its own
    assert (latest_checkpoint(two) / "rng-rank1.safetensors").is_file()
    assert not (latest_checkpoint(one) / "rng-rank1.safetensors").exists()


def _epoch_tokens(run_dir) -> int:
    """Tokens seen by the end of the first epoch (the last step whose epoch is 0)."""
    return [row["tokens"] for row in _steps(run_dir) if row["epoch"] == 0][-1]


@pytest.mark.parametrize("first, then", [(2, 1), (1, 2)], ids=["2-processes-then-1", "1-process-then-2"])
def test_resume_on_another_number_of_processes(first, then, overrides, tmp_path, capsys):
    """A checkpoint taken with ``first`` processes continues with ``then``: the weights and the data position
    come back, the steps before the checkpoint stay logged as they were, and the epoch ends with every example
    seen exactly once (its token count is the whole dataset's, as in a one-process run)."""
    def launch(processes, *args):
        if processes == 1:
            assert main(["train", *args]) == 0
        else:
            torchrun(processes, *args)

    reference = overrides("sft", "reference", "train.grad_accum=1", "train.max_steps=7")
    assert main(["train", *reference]) == 0
    launch(first, *overrides("sft", "run", "train.grad_accum=1", "train.max_steps=2"))
    run_dir = tmp_path / "runs" / "run"
    before = _steps(run_dir)
    checkpoint = load_file(latest_checkpoint(run_dir) / "weights.safetensors")
    launch(then, "--resume", str(run_dir), "train.max_steps=8")
    after = _steps(run_dir)
    assert after[:2] == before and [row["step"] for row in after] == list(range(1, 9))
    # 7 micro-batches: 2 steps of `first` processes take 2·first of them, the rest take one step per `then` each
    epoch_steps = 2 + -(-(7 - 2 * first) // then)
    assert [row["epoch"] for row in after].count(0) == epoch_steps
    assert _epoch_tokens(run_dir) == _epoch_tokens(tmp_path / "runs" / "reference")
    final = load_file(latest_checkpoint(run_dir) / "weights.safetensors")
    assert final.keys() == checkpoint.keys() and any(not torch.equal(final[k], v) for k, v in checkpoint.items())


def test_gpus_without_cuda_is_one_error_line(overrides, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["train", "--gpus", "2", *overrides("sft", "gpus")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("error: --gpus 2 needs CUDA GPUs")
    assert "torchrun --nproc-per-node 2 -m tunesmith train" in err


def test_rank0s_error_stops_every_rank_and_is_printed_once(overrides, tmp_path):
    taken = tmp_path / "runs" / "taken"
    taken.mkdir(parents=True)
    (taken / "notes.txt").write_text("not a run")
    done = torchrun(2, *overrides("sft", "taken", "train.max_steps=1"), check=False)
    assert done.stderr.count("error: run dir") == 1 and "already exists" in done.stderr
    assert sorted(p.name for p in taken.iterdir()) == ["notes.txt"]  # nothing written, no lock left
