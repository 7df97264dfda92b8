"""Issue 11 for models, merge, chat and adapters: a user's mistake is one `error:` line (exit 2) naming the file,
flag or key, and leaves nothing half-written; quality numbers are never nonsensical; normal runs print no noise."""

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from tinymodels import build_tiny_llama

from tunesmith.cli import main
from tunesmith.errors import TunesmithError
from tunesmith.peft.io import save_adapter
from tunesmith.peft.lora import LoRAConfig, adapter_parameters, inject_lora

LORA = LoRAConfig(r=4, alpha=8)


def write_adapter(out_dir: Path, base_dir: Path, seed: int = 0, scale: float = 0.05, model=None) -> Path:
    """A LoRA adapter with random (non-zero) weights drawn from ``seed`` over ``model`` (default: the tiny Llama
    that ``base_dir`` holds)."""
    model = model if model is not None else build_tiny_llama()
    inject_lora(model, LORA)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in adapter_parameters(model).values():
            param.copy_(torch.randn(param.shape, generator=generator) * scale)
    return save_adapter(model, LORA, out_dir, base_model_name_or_path=str(base_dir))


@pytest.fixture()
def adapter(tmp_path, tiny_model_dir):
    return write_adapter(tmp_path / "adapter", tiny_model_dir)


def error_line(capsys) -> str:
    """The one ``error:`` line on stderr (transformers' progress bars may come before it), no traceback."""
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert lines[-1].startswith("error: ") and "Traceback" not in err and err.count("error:") == 1, err
    return lines[-1]


# --- 1. --trust-remote-code is the caller's, never a run dir's config.yaml ------------------------------------

CUSTOM_CODE = """from transformers import LlamaConfig, LlamaForCausalLM


class CustomConfig(LlamaConfig):
    model_type = "tunesmith-custom"


class CustomLM(LlamaForCausalLM):
    config_class = CustomConfig
"""


@pytest.fixture()
def custom_code_model(tmp_path, tiny_model_dir):
    """The tiny Llama as a model dir that ships its own code (``auto_map``), like many hub models do."""
    path = tmp_path / "custom-model"
    shutil.copytree(tiny_model_dir, path)
    (path / "custom_lm.py").write_text(CUSTOM_CODE)
    config = json.loads((path / "config.json").read_text())
    config.update(model_type="tunesmith-custom",
                  auto_map={"AutoConfig": "custom_lm.CustomConfig", "AutoModelForCausalLM": "custom_lm.CustomLM"})
    (path / "config.json").write_text(json.dumps(config))
    return path


def test_merge_takes_trust_remote_code_from_the_caller_only(tmp_path, custom_code_model, capsys):
    run = tmp_path / "run"
    write_adapter(run / "adapter", custom_code_model)
    # a tampered run config asking for remote code must not get it
    (run / "config.yaml").write_text(f"model:\n  source: {custom_code_model}\n  trust_remote_code: true\n")
    out = tmp_path / "merged"
    assert main(["merge", str(run), "--out", str(out), "--check-rows", "1"]) == 2
    err = capsys.readouterr().err
    assert f"error: {custom_code_model} ships its own model code" in err and "--trust-remote-code" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["custom-model", "run"]

    assert main(["merge", str(run), "--out", str(out), "--check-rows", "1", "--trust-remote-code", "--dtype", "fp32",
                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["merged"]["max_abs_logit_diff"] < 1e-3
    assert json.loads((out / "config.json").read_text())["model_type"] == "tunesmith-custom"


def test_quantization_report_passes_trust_remote_code(custom_code_model, capsys):
    from tunesmith.quant.report import quantization_report

    assert main(["quantize", "report", "--model", str(custom_code_model), "--rows", "1"]) == 2
    assert "--trust-remote-code" in error_line(capsys)
    report = quantization_report(str(custom_code_model), data=None, trust_remote_code=True)
    assert report["parameters"] == sum(p.numel() for p in build_tiny_llama().parameters())


# --- 2. broken model dirs, devices, merge outputs: one error line, nothing left behind --------------------------

def _drop_tokenizer(path):
    for file in path.iterdir():
        if file.name.startswith(("tokenizer", "special_tokens", "vocab", "merges", "chat_template")):
            file.unlink()


def _edit_config(**changes):
    """Set config.json keys; None removes the key."""
    def edit(path):
        config = json.loads((path / "config.json").read_text())
        for key, value in changes.items():
            config.pop(key) if value is None else config.__setitem__(key, value)
        (path / "config.json").write_text(json.dumps(config))
    return edit


def _truncate_weights(path):
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])


BROKEN_DIRS = {
    "no-tokenizer": (_drop_tokenizer, "{path} holds no tokenizer"),
    "invalid-json": (lambda p: (p / "config.json").write_text("{oops"), "{path}/config.json is not valid JSON"),
    "no-model-type": (_edit_config(model_type=None), '{path}/config.json has no "model_type"'),
    "wrong-type": (_edit_config(hidden_size="big"), "{path}/config.json: Validation error for field 'hidden_size'"),
    "no-weights": (lambda p: (p / "model.safetensors").unlink(), "{path} holds no model weights"),
    "truncated-weights": (_truncate_weights, "{path}/model.safetensors is damaged or truncated"),
}


@pytest.mark.parametrize("case", list(BROKEN_DIRS))
def test_broken_model_dir_is_one_error_line(case, tmp_path, tiny_model_dir, capsys):
    path = tmp_path / case
    shutil.copytree(tiny_model_dir, path)
    breaks, expected = BROKEN_DIRS[case]
    breaks(path)
    assert main(["chat", "--model", str(path), "--prompt", "hi", "--max-tokens", "2"]) == 2
    assert expected.format(path=path) in error_line(capsys)


def test_unknown_or_unavailable_device_is_one_error_line(tiny_model_dir, capsys):
    assert main(["chat", "--model", str(tiny_model_dir), "--device", "tpu", "--prompt", "hi"]) == 2
    assert "unknown device 'tpu' (--device / model.device); use auto, cpu, cuda or cuda:N" in error_line(capsys)
    if not torch.cuda.is_available():
        assert main(["chat", "--model", str(tiny_model_dir), "--device", "cuda", "--prompt", "hi"]) == 2
        assert "device 'cuda' was asked for but CUDA is not available" in error_line(capsys)


def _merge(adapter, out, *extra):
    return main(["merge", str(adapter), "--out", str(out), "--check-rows", "1", *extra])


def test_merge_out_is_an_existing_file_or_a_non_empty_dir(adapter, tmp_path, capsys):
    (tmp_path / "file").write_text("keep me")
    assert _merge(adapter, tmp_path / "file") == 2
    assert f"--out {tmp_path / 'file'} is an existing file" in error_line(capsys)
    assert (tmp_path / "file").read_text() == "keep me"
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep me")
    assert _merge(adapter, tmp_path / "full") == 2
    assert f"--out {tmp_path / 'full'} already exists and is not empty" in error_line(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "file", "full"]


def test_merge_out_under_a_read_only_parent(adapter, tmp_path, capsys):
    readonly = tmp_path / "readonly"
    readonly.mkdir()
    readonly.chmod(0o555)
    # root ignores permission bits; sysfs refuses new directories to root too
    parent = readonly if not os.access(readonly, os.W_OK) else Path("/sys")
    assert _merge(adapter, parent / "merged") == 2
    assert f"cannot write --out {parent / 'merged'}" in error_line(capsys)
    assert not (parent / "merged").exists()


def test_merge_check_rows_must_be_positive(adapter, tmp_path):
    from tunesmith.merge import merge

    with pytest.raises(TunesmithError, match="--check-rows must be at least 1, got 0"):
        merge(str(adapter), str(tmp_path / "merged"), check_rows=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_failed_merge_leaves_no_partial_output(adapter, tmp_path, capsys):
    # fails after the merged weights were written: the held-out data file is not there
    assert _merge(adapter, tmp_path / "merged", "--data", str(tmp_path / "missing.jsonl")) == 2
    assert "missing.jsonl" in error_line(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


# --- 3. the merge check's KL is never negative -----------------------------------------------------------------

def test_merge_check_kl_is_never_negative(tmp_path, tiny_model_dir, capsys):
    # an exact fp32 merge: the logits agree to float rounding; for this adapter a float32 KL came out at -8e-9
    adapter = write_adapter(tmp_path / "adapter", tiny_model_dir, seed=2)
    assert _merge(adapter, tmp_path / "merged", "--dtype", "fp32", "--json") == 0
    merged = json.loads(capsys.readouterr().out)["merged"]
    assert merged["max_abs_logit_diff"] < 1e-4
    assert 0 <= merged["mean_kl"] < 1e-9


# --- 4. chat: a prompt longer than the model's context -------------------------------------------------------

def prompt_tokens(tokenizer, text: str) -> int:
    from tunesmith.templates import render_prompt

    return len(render_prompt(tokenizer, [{"role": "user", "content": text}]))


def test_chat_prompt_longer_than_the_context_is_one_error_line(tiny_model_dir, tokenizer, capsys):
    long = "alpha " * 600
    n = prompt_tokens(tokenizer, long)
    assert n > 512  # the tiny model's max_position_embeddings
    assert main(["chat", "--model", str(tiny_model_dir), "--prompt", long]) == 2
    assert error_line(capsys) == (f"error: the prompt is {n} tokens, which leaves no room in the model's context "
                                  "of 512 tokens; shorten the prompt")
    medium = "alpha " * 300
    n = prompt_tokens(tokenizer, medium)
    assert main(["chat", "--model", str(tiny_model_dir), "--prompt", medium, "--max-tokens", "256"]) == 2
    assert error_line(capsys) == (f"error: the prompt is {n} tokens and --max-tokens is 256: together more than the "
                                  f"model's context of 512 tokens; shorten the prompt or lower --max-tokens to "
                                  f"{512 - n} or less")


def test_interactive_chat_drops_a_too_long_turn_and_goes_on(tiny_model_dir, tokenizer, capsys, monkeypatch):
    import io

    monkeypatch.setattr("sys.stdin", io.StringIO("alpha " * 600 + "\nhello\n/exit\n"))
    assert main(["chat", "--model", str(tiny_model_dir), "--max-tokens", "3"]) == 0
    captured = capsys.readouterr()
    n = prompt_tokens(tokenizer, ("alpha " * 600).strip())
    assert (f"error: the prompt is {n} tokens, which leaves no room in the model's context of 512 tokens; "
            "shorten the prompt (/reset clears the history)\n") in captured.err
    # the second turn was answered: three prompts were shown (long, hello, /exit), one reply line between
    assert captured.out.count("> ") == 3 and captured.out.split("> ")[2].endswith("\n")


# --- 5. an adapter remembers its base: a different base of the same shape is refused --------------------------

@pytest.fixture()
def other_seed_model(tmp_path, tokenizer):
    path = tmp_path / "other-seed"
    build_tiny_llama(seed=1).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_adapter_on_a_same_shape_base_of_another_seed_is_refused(adapter, tiny_model_dir, other_seed_model,
                                                                  tmp_path, capsys):
    expected = (f"error: adapter {adapter / 'adapter_model.safetensors'} was trained on {tiny_model_dir}, and this "
                f"base model ({other_seed_model}) is a different one: their embedding and norm weights differ; "
                f"apply the adapter to {tiny_model_dir} (merge / eval: --base)")
    assert main(["chat", "--model", str(other_seed_model), "--adapter", str(adapter), "--prompt", "hi"]) == 2
    assert error_line(capsys) == expected
    assert _merge(adapter, tmp_path / "merged", "--base", str(other_seed_model)) == 2
    assert error_line(capsys) == expected
    assert not (tmp_path / "merged").exists()
    # its own base, in another dtype, is accepted
    assert main(["chat", "--model", str(tiny_model_dir), "--adapter", str(adapter), "--dtype", "bf16",
                 "--prompt", "hi", "--max-tokens", "2"]) == 0


def test_qlora_adapter_fingerprint_matches_its_dense_base(tmp_path, tiny_model_dir_64, capsys):
    from tunesmith.peft.io import load_adapter
    from tunesmith.quant.bnb import QuantSpec, quantize_model

    quantized = build_tiny_llama(hidden_size=64, intermediate_size=128)
    assert quantize_model(quantized, QuantSpec()).quantized  # the linear layers really are 4-bit
    adapter = write_adapter(tmp_path / "adapter", tiny_model_dir_64, model=quantized)
    # the dense base (merge, chat) and the 4-bit base (QLoRA DPO from this adapter) both match it
    assert _merge(adapter, tmp_path / "merged", "--dtype", "fp32") == 0
    requantized = build_tiny_llama(hidden_size=64, intermediate_size=128)
    quantize_model(requantized, QuantSpec())
    load_adapter(requantized, adapter)
    other = build_tiny_llama(seed=1, hidden_size=64, intermediate_size=128)
    quantize_model(other, QuantSpec())
    with pytest.raises(TunesmithError, match="is a different one"):
        load_adapter(other, adapter)


# --- 6. normal runs print no third-party noise -----------------------------------------------------------------

def test_qlora_train_and_merge_print_no_third_party_noise(tmp_path, tiny_model_dir_64):
    import subprocess
    import sys

    rows = [{"messages": [{"role": "user", "content": f"Repeat {i}"}, {"role": "assistant", "content": f"{i}"}]}
            for i in range(8)]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    # a fresh process: bitsandbytes warns when it is first imported, which a test process did long ago
    tunesmith = [sys.executable, "-m", "tunesmith"]
    train = subprocess.run(tunesmith + [
        "train", f"model.source={tiny_model_dir_64}", f"data.train={data}", f"data.eval={data}",
        f"output_dir={tmp_path}", "name=run", "method.name=qlora", "optim.name=paged_adamw_8bit",
        "train.max_steps=2", "train.micro_batch_size=2", "train.grad_accum=1", "train.progress=false",
        "eval.task_rows=0", "eval.before=false", "lora.r=4", "lora.alpha=8"],
        capture_output=True, text=True, timeout=120)
    merge = subprocess.run(tunesmith + ["merge", str(tmp_path / "run"), "--out", str(tmp_path / "merged"),
                                        "--merge-base", "dequantized", "--quantize", "nf4", "--check-rows", "1"],
                           capture_output=True, text=True, timeout=120)
    for run in (train, merge):
        assert run.returncode == 0, run.stderr
        noise = [line for line in run.stderr.splitlines()
                 if any(word in line.lower() for word in ("kernels-community", "warning", "deprecat", "loading weights",
                                                          "writing model shards"))]
        assert noise == [], run.stderr


def test_a_model_dir_holding_only_pickle_weights_is_refused(tmp_path, tiny_model_dir, capsys):
    """Issue 25: tunesmith never loads a pickle; the message says so and how to convert, never weights_only=False."""
    from safetensors.torch import load_file

    path = tmp_path / "pickled"
    shutil.copytree(tiny_model_dir, path)
    torch.save(load_file(str(path / "model.safetensors")), path / "pytorch_model.bin")
    (path / "model.safetensors").unlink()
    assert main(["chat", "--model", str(path), "--prompt", "Hi", "--max-tokens", "1"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert err == [f"error: {path} holds its weights only as PyTorch pickle files (pytorch_model*.bin); tunesmith "
                   "never loads pickles (loading one can run code). Convert them to safetensors where you trust the "
                   f"file, e.g. AutoModelForCausalLM.from_pretrained('{path}').save_pretrained('{path}-safetensors'), "
                   "and pass that dir"]
    assert "weights_only" not in err[0]


@pytest.mark.parametrize("key,value", [("target_modules", "(q_proj"), ("rank_pattern", {"q_proj[": 4}),
                                       ("alpha_pattern", {"*k_proj": 8})])
def test_an_adapter_config_with_an_invalid_regex_is_one_line(tmp_path, tiny_model_dir, capsys, key, value):
    """Issue 25: target_modules (a string) and rank/alpha_pattern keys are regular expressions; a bad one is named."""
    from tunesmith.peft.lora import LoRAConfig, inject_lora

    model = build_tiny_llama()
    inject_lora(model, LoRAConfig(r=2, alpha=4, target_modules=("q_proj", "k_proj")))
    adapter = save_adapter(model, LoRAConfig(r=2, alpha=4, target_modules=("q_proj", "k_proj")), tmp_path / "adapter",
                           base_model_name_or_path=str(tiny_model_dir))
    config = json.loads((adapter / "adapter_config.json").read_text())
    config[key] = value
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    capsys.readouterr()
    assert main(["chat", "--model", str(tiny_model_dir), "--adapter", str(adapter), "--prompt", "Hi",
                 "--max-tokens", "1"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:") or "Traceback" in line]
    pattern = value if isinstance(value, str) else next(iter(value))
    assert len(err) == 1 and err[0].startswith(
        f"error: adapter config {adapter / 'adapter_config.json'}: {key} {pattern!r} is not a valid regular expression (")
    assert err[0].endswith("); fix it in adapter_config.json")
