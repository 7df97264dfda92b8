"""GGUF export (issue 28): round trips on tiny models of each supported layout and on the embedded model; each
check can fail (a corrupted tensor, a merge that drops the adapter, a wrong template, a wrong end token) and
then nothing is left at OUT."""

from __future__ import annotations

import json

import pytest
import torch
from tinymodels import build_tiny_llama

from tunesmith.cli import main
from tunesmith.errors import TunesmithError
from tunesmith.export import ExportCheckFailed, export_gguf
from tunesmith.export import gguf_file
from tunesmith.peft.io import save_adapter
from tunesmith.peft.lora import LoRAConfig, inject_lora, lora_modules

SHAPE = dict(vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True, bos_token_id=1,
             eos_token_id=2, pad_token_id=2)


def _save(model, path, tokenizer):
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory, tokenizer):
    from transformers import MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

    root = tmp_path_factory.mktemp("families")
    torch.manual_seed(0)
    mistral = MistralForCausalLM(MistralConfig(**SHAPE, sliding_window=None))
    torch.manual_seed(0)
    qwen = Qwen2ForCausalLM(Qwen2Config(**SHAPE))
    with torch.no_grad():  # Qwen2's q/k/v biases start at zero: make them count
        for layer in qwen.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0, 0.5)
    return {"llama": _save(build_tiny_llama(), root / "llama", tokenizer),
            "llama-untied": _save(build_tiny_llama(tie_word_embeddings=False), root / "untied", tokenizer),
            "mistral": _save(mistral, root / "mistral", tokenizer), "qwen2": _save(qwen, root / "qwen2", tokenizer)}


@pytest.fixture(scope="module")
def adapter_dir(family_dirs, tmp_path_factory):
    model = build_tiny_llama()
    inject_lora(model, LoRAConfig(r=4, alpha=8, target_modules="all-linear"))
    torch.manual_seed(1)
    for module in lora_modules(model).values():
        torch.nn.init.normal_(module.lora_B.weight, std=0.3)
    return save_adapter(model, LoRAConfig(r=4, alpha=8, target_modules="all-linear"),
                        tmp_path_factory.mktemp("adapter") / "a", base_model_name_or_path=str(family_dirs["llama"]))


@pytest.mark.parametrize("family", ["llama", "llama-untied", "mistral", "qwen2"])
def test_round_trip_of_each_layout(family_dirs, tmp_path, family):
    out = tmp_path / "model.gguf"
    summary = export_gguf(str(family_dirs[family]), out)
    assert summary["passed"] and out.is_file()
    assert json.loads((tmp_path / "model.gguf.json").read_text()) == json.loads(json.dumps(summary))
    assert summary["checks"]["logits"]["top1_agreement"] >= 0.99
    assert summary["checks"]["end_token"]["token"] == "<|im_end|>"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.gguf", "model.gguf.json"]


def test_the_adapter_is_merged(family_dirs, adapter_dir, tmp_path):
    import gguf

    out = tmp_path / "adapted.gguf"
    assert export_gguf(str(family_dirs["llama"]), out, adapter=str(adapter_dir))["passed"]
    plain = tmp_path / "plain.gguf"
    export_gguf(str(family_dirs["llama"]), plain)
    read = {t.name: t.data for t in gguf.GGUFReader(str(out)).tensors}
    base = {t.name: t.data for t in gguf.GGUFReader(str(plain)).tensors}
    assert not (read["blk.0.attn_v.weight"] == base["blk.0.attn_v.weight"]).all()  # the merge changed it
    assert (read["blk.0.attn_norm.weight"] == base["blk.0.attn_norm.weight"]).all()


def _fails(monkeypatch, family_dirs, tmp_path, check, *, adapter=None, **patches):
    for name, value in patches.items():
        monkeypatch.setattr(name, value)
    out = tmp_path / "bad.gguf"
    with pytest.raises(ExportCheckFailed) as error:
        export_gguf(str(family_dirs["llama"]), out, adapter=adapter)
    failed = [name for name, c in error.value.summary["checks"].items() if not c["passed"]]
    assert failed == [check]
    assert list(tmp_path.iterdir()) == []  # no file at OUT, no partial file beside it


def test_a_corrupted_tensor_fails_the_logits_check(monkeypatch, family_dirs, tmp_path):
    real = gguf_file.gguf_tensors

    def corrupted(*args):
        tensors = real(*args)
        return [(name, array * 1.5 if name == "blk.1.ffn_down.weight" else array) for name, array in tensors]

    _fails(monkeypatch, family_dirs, tmp_path, "logits", **{"tunesmith.export.gguf_file.gguf_tensors": corrupted})


def test_a_merge_that_drops_the_adapter_fails_the_logits_check(monkeypatch, family_dirs, adapter_dir, tmp_path):
    def unmerged(model):  # the base weights only, as a broken merge would write
        return {k.replace(".base_layer", ""): v for k, v in model.state_dict().items() if "lora_" not in k}

    _fails(monkeypatch, family_dirs, tmp_path, "logits", adapter=str(adapter_dir),
           **{"tunesmith.peft.merged.merged_state_dict": unmerged})


def test_a_wrong_template_or_end_token_fails(monkeypatch, family_dirs, tmp_path):
    real = gguf_file.write_gguf

    def other_template(path, **kwargs):
        kwargs["chat_template"] = kwargs["chat_template"].replace("<|im_start|>", "<|start|>")
        real(path, **kwargs)

    _fails(monkeypatch, family_dirs, tmp_path, "chat_template",
           **{"tunesmith.export.gguf_file.write_gguf": other_template})
    monkeypatch.undo()

    def end_of_text(path, **kwargs):
        kwargs["end_id"] = 0  # <|endoftext|>, not the end of turn the run trained on
        real(path, **kwargs)

    _fails(monkeypatch, family_dirs, tmp_path, "end_token", **{"tunesmith.export.gguf_file.write_gguf": end_of_text})


def test_unsupported_models_are_refused_by_name_before_any_work(tmp_path, tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel

    source = _save(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=49152)), tmp_path / "g",
                   tokenizer)
    with pytest.raises(TunesmithError, match="GGUF export supports llama, mistral, qwen2 models .*'gpt2'"):
        export_gguf(str(source), tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()


def test_cli_exit_codes(family_dirs, tmp_path, capsys):
    out = tmp_path / "m.gguf"
    assert main(["export", str(family_dirs["llama"]), "--gguf", str(out), "--type", "bf16"]) == 0
    assert "checks passed" in capsys.readouterr().out
    assert main(["export", str(family_dirs["llama"]), "--gguf", str(out)]) == 2  # exists: refused
    assert "exists" in capsys.readouterr().err


def test_four_bit_blocks_are_fitted_on_calibration_rows(tmp_path, tokenizer):
    # four blocks at width 64: the middle two hold 4-bit tensors (the first and last stay at 8 bits)
    model_dir = _save(build_tiny_llama(hidden_size=64, intermediate_size=128, num_hidden_layers=4), tmp_path / "m",
                      tokenizer)
    summary = export_gguf(str(model_dir), tmp_path / "m.gguf", kind="q4_1")
    assert summary["passed"] and summary["calibration"] == {"rows": 64, "source": "the built-in task's training rows"}
    import gguf

    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(tmp_path / "m.gguf")).tensors}
    assert types["blk.1.attn_q.weight"] == "Q4_1" and types["blk.0.attn_q.weight"] == "Q8_0"
    assert export_gguf(str(model_dir), tmp_path / "m8.gguf", kind="q8_0")["calibration"] is None


def test_embedded_model_q8_0(tmp_path):
    summary = export_gguf("default", tmp_path / "smollm2.gguf", kind="q8_0")
    assert summary["passed"] and summary["checks"]["logits"]["top1_agreement"] >= 0.95
