"""``eval RUN_DIR`` reads the run dir through ``load_run_config`` and builds its model with the one builder:
the run's adapter and tokenization, this machine's device; a damaged config.yaml is one error line."""

import json

import pytest
import torch

from tinymodels import build_tiny_llama
from tunesmith.cli import main
from tunesmith.config import load_config
from tunesmith.data.pipeline import prepare
from tunesmith.data.tokenize import TokenizeOptions
from tunesmith.eval.evaluate import heldout_loss


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory, tokenizer):
    """The tiny Llama with wider-initialised weights: far from uniform, so which tokens are scored shows in the
    loss (the shared fixture's near-uniform logits give every token almost the same loss)."""
    path = tmp_path_factory.mktemp("tiny-varied")
    build_tiny_llama(tie_word_embeddings=False, initializer_range=0.3).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture()
def gpu_run_dir(tmp_path, tiny_model_dir):
    """A finished LoRA run as a GPU machine leaves it: config.yaml (model.device cuda:3, bf16, train_on=last)
    and a PEFT adapter (written by PEFT itself, non-zero B); returns the dir and PEFT's model as reference."""
    import peft
    from transformers import AutoModelForCausalLM

    heldout = tmp_path / "heldout.jsonl"
    heldout.write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": f"Say {word}"}, {"role": "assistant", "content": f"{word} {word}"},
        {"role": "user", "content": "Again"}, {"role": "assistant", "content": word}]}) + "\n"
        for word in ("alpha", "bravo", "charlie")))
    run_dir = tmp_path / "runs" / "gpu-run"
    run_dir.mkdir(parents=True)
    config = load_config(None, [f"model.source={tiny_model_dir}", "model.device=cuda:3", "model.dtype=bf16",
                                f"data.eval={heldout}", "data.train_on=last", "eval.task_rows=0", "name=old"])
    (run_dir / "config.yaml").write_text(config.to_yaml())
    torch.manual_seed(0)
    reference = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                                    peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                    init_lora_weights=False)).eval()
    reference.save_pretrained(run_dir / "adapter")
    return run_dir, reference, config


def test_eval_run_dir_is_the_runs_adapter_and_tokenization_on_this_machine(gpu_run_dir, tokenizer, capsys):
    run_dir, reference, config = gpu_run_dir
    assert main(["eval", str(run_dir), "--json"]) == 0  # on a CPU machine: cuda:3 / bf16 are the run's, not ours
    report = json.loads(capsys.readouterr().out)
    assert (report["model"], report["adapter"]) == (config.model.source, str(run_dir / "adapter"))
    # PEFT's model on the run's tokenization (last turn only) in fp32 gives the same loss; all turns would not
    losses = {}
    for train_on in ("last", "all"):
        examples = prepare(config.data.eval, tokenizer, TokenizeOptions(train_on=train_on)).examples
        losses[train_on] = heldout_loss(reference, examples, pad_id=tokenizer.pad_token_id)["eval_loss"]
    assert report["eval_loss"] == pytest.approx(losses["last"], abs=1e-5)
    assert abs(losses["all"] - losses["last"]) > 1e-3


@pytest.mark.parametrize("damage, problem", [
    (lambda path: path.write_text("lora: [r\n"), "is not valid YAML at line 2"),
    (lambda path: path.write_text(path.read_text() + "extra: 1\n"), "unknown key 'extra'"),
], ids=["yaml", "unknown-key"])
def test_damaged_run_config_is_one_error_line(gpu_run_dir, capsys, damage, problem):
    run_dir = gpu_run_dir[0]
    damage(run_dir / "config.yaml")
    assert main(["eval", str(run_dir)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and str(run_dir / "config.yaml") in err[0]
    assert problem in err[0] and "restore it, e.g. from" in err[0]
