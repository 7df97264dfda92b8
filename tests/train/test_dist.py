"""Several processes on the CPU (gloo), started by torchrun as a user would: two processes with accumulation A
train exactly what one process with accumulation 2A trains (per-step losses, gradient norms and the final
adapter, fp32, 1e-5), for SFT and DPO, through DDP (LoRA) and FSDP2 (full fine-tuning); a checkpoint of two
processes resumes on one and the reverse when the global batch is kept, and trains exactly what an uninterrupted
run trains; ``--gpus`` without CUDA is one error line."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from tunesmith.cli import main
from tunesmith.config import load_config
from tunesmith.errors import TunesmithError
from tunesmith.train.dist import SINGLE, SharedError, World
from tunesmith.train.fsdp import parallel_for
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


@pytest.fixture(autouse=True)
def one_thread():
    """The in-process run on one thread, as each torchrun process is (``OMP_NUM_THREADS=1``): on some CPUs (an
    Intel Xeon with AMX, measured) MKL's products on two threads round differently from one thread, by enough
    that Adam's first steps move a near-zero-gradient weight by 1e-5 or more. Equal thread counts compare the
    processes' arithmetic alone."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture()
def overrides(tmp_path, tiny_model_dir):
    def make(kind: str, name: str, *extra: str) -> list[str]:
        row = _pair if kind == "dpo" else _chat
        train = _write(tmp_path / f"{kind}-train.jsonl", [row(i) for i in range(ROWS)])
        heldout = _write(tmp_path / f"{kind}-eval.jsonl", [row(i) for i in range(100, 103)])
        base = [f"model.source={tiny_model_dir}", "model.device=cpu", f"data.train={train}", f"data.eval={heldout}",
                f"output_dir={tmp_path / 'runs'}", f"name={name}", "train.progress=false", "eval.task_rows=0",
                "train.micro_batch_size=2", "optim.lr=0.01", "lora.r=4", "lora.alpha=8", "train.log_every=1",
                "train.checkpoint_every=2", "train.keep_checkpoints=5",
                # the processes' equivalence is asserted at 1e-5: bf16 products would round each differently
                # shaped product's result to bf16 (train/products.py)
                "train.forward_products=exact", "train.backward_products=exact"]
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


def _adapter_weights(run_dir) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "adapter" / "adapter_model.safetensors")


def _assert_same_training(one, two, weights=_adapter_weights, norm_rtol: float = 1e-5) -> None:
    """Per-step losses, metrics, gradient norms (at ``norm_rtol``) and token counts, and the final weights, at
    1e-5 (fp32)."""
    rows_one, rows_two = _steps(one), _steps(two)
    assert [r["step"] for r in rows_one] == [r["step"] for r in rows_two] and rows_one
    for a, b in zip(rows_one, rows_two):
        assert a["tokens"] == b["tokens"] and a["epoch"] == b["epoch"]
        for key in set(a) - {"tokens_per_s", "step", "epoch", "tokens", "skipped"}:
            rtol = norm_rtol if key == "grad_norm" else 1e-5
            assert b[key] == pytest.approx(a[key], abs=1e-5, rel=rtol), (a["step"], key)
    weights_one, weights_two = weights(one), weights(two)
    assert weights_one.keys() == weights_two.keys()
    for key in weights_one:
        torch.testing.assert_close(weights_two[key], weights_one[key], atol=1e-5, rtol=1e-5)
    if weights is _adapter_weights:
        assert [key for key in weights_one if "lora_B" in key and weights_one[key].abs().max() > 0]  # trained


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


def test_two_processes_train_alike_with_bf16_products(overrides, tmp_path, capsys):
    """Each process installs its own bf16 copies under DDP; the run matches one process with twice the
    accumulation to bf16's rounding (each differently shaped product rounds its result to bf16)."""
    bf16 = ["train.forward_products=bf16", "train.backward_products=bf16"]  # after the pinned exact: the last wins
    assert main(["train", *overrides("sft", "one", "train.grad_accum=2", "train.max_steps=3", *bf16)]) == 0
    torchrun(2, *overrides("sft", "two", "train.grad_accum=1", "train.max_steps=3", *bf16))
    one, two = tmp_path / "runs" / "one", tmp_path / "runs" / "two"
    losses_one, losses_two = ([row["loss"] for row in _steps(d)] for d in (one, two))
    assert len(losses_one) == 3 and losses_two == pytest.approx(losses_one, rel=1e-4)
    assert losses_two[0] == pytest.approx(losses_one[0], abs=1e-6)  # the first forward: before any update
    for run_dir in (one, two):
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["forward_products"] == {"name": "bf16", "reason": bf16[0]}
        assert summary["backward_products"] == {"name": "bf16", "reason": bf16[1]}
    # both ranks really ran bf16 products: the two-process run is as far from an exact run as bf16 makes it
    # (about 8e-5 here), where exact runs of one and two processes agree to 1e-6
    assert main(["train", *overrides("sft", "exact", "train.grad_accum=2", "train.max_steps=3")]) == 0
    exact = [row["loss"] for row in _steps(tmp_path / "runs" / "exact")]
    assert max(abs(a - b) for a, b in zip(losses_two[1:], exact[1:])) > 5e-6


@pytest.mark.parametrize("first, then", [(2, 1), (1, 2)], ids=["2-processes-then-1", "1-process-then-2"])
def test_resume_on_another_number_of_processes(first, then, overrides, tmp_path, capsys):
    """A checkpoint taken with ``first`` processes continues with ``then``, keeping the global batch (grad_accum
    × processes = 2): the steps before the checkpoint stay logged as they were, and the whole run — losses,
    gradient norms, tokens, epochs, the final adapter — is the uninterrupted one-process run's. Changing the
    global batch instead is refused with the grad_accum that keeps it."""
    def launch(processes, *args):
        if processes == 1:
            assert main(["train", *args]) == 0
        else:
            torchrun(processes, *args)

    constant = ["schedule.name=constant", "schedule.warmup_steps=0"]  # the same rate whatever max_steps is
    assert main(["train", *overrides("sft", "reference", "train.grad_accum=2", "train.max_steps=6", *constant)]) == 0
    launch(first, *overrides("sft", "run", f"train.grad_accum={2 // first}", "train.max_steps=2", *constant))
    run_dir = tmp_path / "runs" / "run"
    before = _steps(run_dir)
    assert json.loads((latest_checkpoint(run_dir) / "state.json").read_text())["processes"] == first
    capsys.readouterr()
    assert main(["train", "--resume", str(run_dir), "train.grad_accum=3"]) == 2  # 1 process × 3 ≠ 2
    assert (f"{first} process{'es' if first == 2 else ''} × grad_accum {2 // first} = 2 micro-batches per step, "
            "this run 1 process × grad_accum 3 = 3; on 1 process set train.grad_accum=2") in capsys.readouterr().err
    launch(then, "--resume", str(run_dir), f"train.grad_accum={2 // then}", "train.max_steps=6")
    assert _steps(run_dir)[:2] == before
    _assert_same_training(tmp_path / "runs" / "reference", run_dir)


def _full_weights(run_dir) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "model" / "model.safetensors")


def test_fsdp_full_fine_tuning_equals_one_process_and_resumes_across_process_counts(overrides, tmp_path,
                                                                                   tiny_model_dir, capsys):
    """FSDP2 (``train.parallel=auto`` picks it for full fine-tuning), 2 gloo processes × grad_accum 1: the same
    per-step losses, gradient norms (the reduce-scatter SUMS the ranks' gradients: an average would halve them)
    and final ``model/`` weights as 1 process × grad_accum 2, at 1e-5. Then one run hops 1 process → 2 FSDP
    processes → 1 process through its checkpoints (gathered on rank 0 in the one-process format) and trains
    exactly the same.

    The norm over shards sums each shard's squares in another order than one process does (a few 1e-6 relative
    at step 1, measured); clipping scales every gradient by it, so later steps' norms drift to ~7e-5 relative
    while losses and weights stay within 1e-5: later norms are compared at 1e-4."""
    full = ["method.name=full", "schedule.name=constant", "schedule.warmup_steps=0"]
    assert main(["train", *overrides("sft", "one", *full, "train.grad_accum=2", "train.max_steps=5")]) == 0
    done = torchrun(2, *overrides("sft", "two", *full, "train.grad_accum=1", "train.max_steps=5"))
    assert "parallel: fsdp, 2 processes" in done.stdout
    one, two = tmp_path / "runs" / "one", tmp_path / "runs" / "two"
    _assert_same_training(one, two, weights=_full_weights, norm_rtol=1e-4)
    # evaluated before sharding (rank 0, whole model) and after on the gathered model: the 1-process numbers
    for phase in ("before", "after"):
        ours, single = (json.loads((run / f"eval_{phase}.json").read_text())["metrics"] for run in (two, one))
        assert ours["eval_loss"] == pytest.approx(single["eval_loss"], abs=1e-5)
    assert _steps(two)[0]["grad_norm"] == pytest.approx(_steps(one)[0]["grad_norm"], rel=1e-5)
    start = load_file(tiny_model_dir / "model.safetensors")
    assert all(not torch.equal(_full_weights(two)[k], start[k]) for k in start)  # every weight trained

    assert main(["train", *overrides("sft", "hop", *full, "train.grad_accum=2", "train.max_steps=2")]) == 0
    hop = tmp_path / "runs" / "hop"
    torchrun(2, "--resume", str(hop), "train.grad_accum=1", "train.max_steps=4")
    assert json.loads((latest_checkpoint(hop) / "state.json").read_text())["processes"] == 2
    assert main(["train", "--resume", str(hop), "train.grad_accum=2", "train.max_steps=5"]) == 0
    _assert_same_training(one, hop, weights=_full_weights, norm_rtol=1e-4)


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


def test_parallel_choice_and_what_fsdp_refuses():
    """``train.parallel=auto``: FSDP2 for full fine-tuning, DDP for LoRA; one process is neither. FSDP with
    LoRA is a config error; evaluation on rank 0 alone during an FSDP run is refused (it would wait forever for
    the other processes' shards)."""
    two = World(rank=0, size=2)
    assert parallel_for(load_config(None, ["method.name=full"]), two) == "fsdp"
    assert parallel_for(load_config(None, ["method.name=full"]), SINGLE) == "single"
    assert parallel_for(load_config(None, []), two) == "ddp"
    assert parallel_for(load_config(None, ["method.name=full", "train.parallel=ddp"]), two) == "ddp"
    with pytest.raises(TunesmithError, match="train.parallel=fsdp shards full fine-tuning only; method.name=qlora "
                                             "trains data-parallel: set train.parallel=ddp"):
        load_config(None, ["method.name=qlora", "train.parallel=fsdp"])
    with pytest.raises(SharedError) as caught:
        parallel_for(load_config(None, ["method.name=full", "train.eval_every=2"]), two)
    assert str(caught.value) == ("train.parallel=fsdp on 2 processes cannot evaluate during training (a sharded "
                                 "model runs on every process, evaluation on rank 0): set train.eval_every=null "
                                 "(held-out metrics come before and after training), or train.parallel=ddp if the "
                                 "model fits one GPU")
