"""Tiny seeded models built from a config, shared by the tests."""

import torch


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


def build_adapted_tiny_llama():
    """The tiny Llama with LoRA r4 on every linear layer over a frozen base, every adapter weight non-zero (a
    fresh adapter's B is zero, so half its gradient paths would carry nothing)."""
    from tunesmith.peft import LoRAConfig, adapter_parameters, freeze_base, inject_lora

    model = build_tiny_llama()
    torch.manual_seed(0)
    inject_lora(model, LoRAConfig(r=4, alpha=8, target_modules="all-linear"))
    freeze_base(model)
    for param in adapter_parameters(model).values():
        torch.nn.init.normal_(param, std=0.05)
    return model
