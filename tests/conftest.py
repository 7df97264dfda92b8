"""Shared fixtures: the embedded model's tokenizer and tiny, seeded Llama models built from a config."""

from __future__ import annotations

import pytest

from tinymodels import build_tiny_llama
from tunesmith.models.defaults import dequantized_dir, embedded_gguf_path


@pytest.fixture(scope="session")
def embedded_dir():
    return dequantized_dir(embedded_gguf_path())


@pytest.fixture(scope="session")
def tokenizer(embedded_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(embedded_dir))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer):
    """A local HF model dir (tiny random Llama + the embedded tokenizer and its chat template)."""
    path = tmp_path_factory.mktemp("tiny-llama")
    build_tiny_llama().save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir_64(tmp_path_factory, tokenizer):
    """The tiny Llama at width 64: its rows are whole 4-bit blocks, which bitsandbytes' CPU kernel needs."""
    path = tmp_path_factory.mktemp("tiny-llama-64")
    build_tiny_llama(hidden_size=64, intermediate_size=128).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture()
def tiny_model():
    return build_tiny_llama()
