"""The engine on CUDA: decode steps replayed from CUDA graphs give the tokens the eager CPU engine gives (fp32,
tiny models), with and without adapters in the batch. Skipped without a GPU."""

from __future__ import annotations

import pytest
import torch
from tinymodels import build_tiny_llama

from tunesmith.engine import Engine, Request
from tunesmith.generate import SamplingConfig

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _tokens(model, prompts, names=(), adapters=None, **engine_args):
    engine = Engine(model, pad_id=0, adapters=adapters, **engine_args)
    names = list(names) or [None] * len(prompts)
    requests = [engine.submit(Request(p, sampling=SamplingConfig(max_new_tokens=12 + 3 * i), adapter=name))
                for i, (p, name) in enumerate(zip(prompts, names))]
    engine.run()
    return [r.tokens for r in requests], engine


def test_graphed_decode_equals_the_cpu_engine(tmp_path):
    torch.backends.cuda.matmul.allow_tf32 = False
    prompts = [torch.randint(3, 1000, (3 + 5 * i,), generator=torch.Generator().manual_seed(i)).tolist()
               for i in range(7)]
    expected, _ = _tokens(build_tiny_llama(initializer_range=0.5), prompts, max_batch=3)
    got, engine = _tokens(build_tiny_llama(initializer_range=0.5).cuda(), prompts, max_batch=3)
    assert engine.graphs is not None and engine.graphs.failed is None and engine.graphs.graphs
    assert got == expected


def test_graphed_mixed_adapters_equal_the_cpu_engine(tmp_path):
    from tunesmith.peft.io import save_adapter
    from tunesmith.peft.lora import LoRAConfig, inject_lora, lora_modules
    from tunesmith.peft.multi import AdapterSlots

    torch.backends.cuda.matmul.allow_tf32 = False
    dirs = {}
    for i, config in enumerate([LoRAConfig(r=2, alpha=4, target_modules=("q_proj", "v_proj")),
                                LoRAConfig(r=4, alpha=8, target_modules="all-linear"),
                                LoRAConfig(r=8, alpha=8, target_modules=("gate_proj", "down_proj"))]):
        model = build_tiny_llama(initializer_range=0.5)
        inject_lora(model, config)
        torch.manual_seed(i)
        for module in lora_modules(model).values():
            torch.nn.init.normal_(module.lora_B.weight, std=0.5)
        dirs[f"a{i}"] = save_adapter(model, config, tmp_path / f"a{i}", base_model_name_or_path="tiny")
    prompts = [torch.randint(3, 1000, (4 + 3 * i,), generator=torch.Generator().manual_seed(20 + i)).tolist()
               for i in range(8)]
    names = ["a0", None, "a1", "a2", "a1", None, "a0", "a2"]
    cpu = build_tiny_llama(initializer_range=0.5)
    expected, _ = _tokens(cpu, prompts, names, AdapterSlots(cpu, dirs))
    gpu = build_tiny_llama(initializer_range=0.5).cuda()
    got, engine = _tokens(gpu, prompts, names, AdapterSlots(gpu, dirs))
    assert engine.graphs.failed is None and any(key[2] for key in engine.graphs.graphs)
    assert got == expected
