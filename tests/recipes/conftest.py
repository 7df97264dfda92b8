"""A tiny chat dataset and a config factory for recipe tests on the tiny model."""

import json

import pytest

from tunesmith.config import load_config

WORDS = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet"]


def chat_rows(n: int, offset: int = 0) -> list[dict]:
    rows = []
    for i in range(offset, offset + n):
        a, b = WORDS[i % 10], WORDS[(i * 3 + 1) % 10]
        rows.append({"messages": [{"role": "user", "content": f"Repeat {a} {b}"},
                                  {"role": "assistant", "content": f"{a} {b} {i % 7}"}]})
    return rows


@pytest.fixture()
def data_files(tmp_path):
    train, heldout = tmp_path / "train.jsonl", tmp_path / "eval.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in chat_rows(16)))
    heldout.write_text("".join(json.dumps(r) + "\n" for r in chat_rows(4, offset=100)))
    return train, heldout


@pytest.fixture()
def make_config(tmp_path, tiny_model_dir, tiny_model_dir_64, data_files):
    train, heldout = data_files

    def make(*overrides: str):
        # QLoRA runs use the 64-wide model so every linear layer is really 4-bit on the CPU kernel
        model = tiny_model_dir_64 if "method.name=qlora" in overrides else tiny_model_dir
        base = [f"model.source={model}", f"data.train={train}", f"data.eval={heldout}",
                f"output_dir={tmp_path / 'runs'}", "name=run", "train.progress=false", "eval.task_rows=0",
                "train.micro_batch_size=2", "train.grad_accum=2", "train.max_steps=6", "optim.lr=0.01",
                "lora.r=4", "lora.alpha=8", "train.checkpoint_every=2", "train.keep_checkpoints=5"]
        return load_config(None, base + list(overrides))

    return make


@pytest.fixture()
def train_tiny(tiny_model_dir, data_files):
    """``train_tiny(output_dir, name, *overrides)``: a 2-step LoRA run of the tiny model through the CLI, one
    checkpoint at its end; returns the exit status."""
    from tunesmith.cli import main

    train, heldout = data_files

    def run(output_dir, name, *overrides) -> int:
        return main(["train", f"model.source={tiny_model_dir}", f"data.train={train}", f"data.eval={heldout}",
                     f"output_dir={output_dir}", f"name={name}", "train.progress=false", "eval.task_rows=0",
                     "eval.before=false", "train.micro_batch_size=4", "train.max_steps=2", "lora.r=4",
                     "lora.alpha=8", "train.checkpoint_every=2", *overrides])

    return run
