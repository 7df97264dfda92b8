"""The activation term against autograd itself: the bytes a real block saves for the backward (transformers'
Llama block with tunesmith's LoRA node, bf16 autocast), counted by ``saved_tensors_hooks``, per token."""

import pytest
import torch
from tinymodels import build_tiny_llama

from tunesmith.peft import LoRAConfig, freeze_base, inject_lora
from tunesmith.plan.terms import PROJECTIONS, Block, block_activations

BLOCK = Block(hidden=64, intermediate=128, heads=4, kv_heads=2, head_dim=16)


def _saved_bytes(model, tokens: int, layer: int) -> int:
    """Bytes of the distinct storages block ``layer`` saves for the backward (weights excluded), batch of 2."""
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen, inside = {}, [False]

    def pack(tensor):
        storage = tensor.untyped_storage()
        if inside[0] and storage.data_ptr() not in weights:
            seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    block = model.model.layers[layer]
    hooks = [block.register_forward_pre_hook(lambda *_: inside.__setitem__(0, True)),
             block.register_forward_hook(lambda *_: inside.__setitem__(0, False))]
    torch.manual_seed(0)
    ids = torch.randint(3, 1000, (2, tokens))
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
            model(input_ids=ids)
    finally:
        for hook in hooks:
            hook.remove()
    return sum(seen.values())


def _per_token(model, layer: int = 1) -> float:
    # the difference of two lengths leaves what grows with the tokens; less the rotary tables (cos and sin,
    # 16 bf16 values a position each, made once for every block)
    return (_saved_bytes(model, 64, layer) - _saved_bytes(model, 32, layer)) / 64 - 2 * 16 * 2 / 2


@pytest.mark.parametrize("case", ["lora", "lora-q-v", "lora-dropout", "full"])
def test_saved_bytes_per_token_equal_the_formula(case):
    model = build_tiny_llama(hidden_size=64, intermediate_size=128).to(torch.bfloat16).train()
    targets = ("q_proj", "v_proj") if case == "lora-q-v" else PROJECTIONS
    dropout = 0.1 if case == "lora-dropout" else 0.0
    if case != "full":
        inject_lora(model, LoRAConfig(r=4, alpha=8, dropout=dropout, target_modules=targets))
        freeze_base(model)
    ranks = {} if case == "full" else {name: 4 for name in targets}
    # SDPA on the CPU without a padding mask takes the grouped k and v as they are (no repeat)
    expected = sum(block_activations(BLOCK, b=2, ranks=ranks, full=case == "full", dropout=dropout > 0,
                                     kv_repeated=False).values())
    if dropout:  # the CPU's dropout keeps its mask in the input's dtype (2 bytes); CUDA's is a bool (1 byte)
        expected += sum(BLOCK.inputs().values())
    assert _per_token(model) == expected


def test_the_first_block_of_a_frozen_embedding_keeps_no_first_norm():
    # Its input carries no gradient, so its first RMSNorm saves nothing: 4d + 4 bytes a token less (the
    # estimate leaves this out: one norm of one block)
    model = build_tiny_llama(hidden_size=64, intermediate_size=128).to(torch.bfloat16).train()
    inject_lora(model, LoRAConfig(r=4, alpha=8, target_modules=PROJECTIONS))
    freeze_base(model)
    assert _per_token(model, layer=1) - _per_token(model, layer=0) == 4 * 64 + 4
