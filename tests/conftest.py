"""Shared fixtures: the embedded model's tokenizer and tiny, seeded Llama models built from a config."""

from __future__ import annotations

import pytest
import torch

from tunesmith.models.defaults import dequantized_dir, embedded_gguf_path


def build_tiny_llama(seed: int = 0, vocab_size: int = 49152, **overrides):
    """A 2-layer Llama with the embedded tokenizer's vocabulary; same seed, same weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    config.update(overrides)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**config))
    return model.float().eval()


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


@pytest.fixture()
def tiny_model():
    return build_tiny_llama()
