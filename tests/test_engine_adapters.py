"""Mixed-adapter traffic through the engine (issue 26's acceptance): 10 adapters of three ranks and two target sets,
three requests each, submitted together with base requests, greedy. Each request gets token for token what its
adapter gives alone, what the model merged by ``tunesmith merge`` gives alone, and what transformers' own
``generate`` gives with the adapters loaded through PEFT (mixed batches through ``adapter_names``)."""

from __future__ import annotations

import peft
import pytest
import torch
from tinymodels import build_tiny_llama
from transformers import AutoModelForCausalLM

from tunesmith.engine import Engine, Request
from tunesmith.generate import SamplingConfig, left_pad
from tunesmith.merge import merge
from tunesmith.peft.io import load_adapter, save_adapter
from tunesmith.peft.lora import LoRAConfig, inject_lora, lora_modules
from tunesmith.peft.multi import AdapterSlots

RANKS = (2, 4, 8)
TARGETS = (("q_proj", "v_proj"), "all-linear")
GREEDY = SamplingConfig(max_new_tokens=8)


def make_adapters(build, root, base_name: str, count: int = 10, std: float = 0.5) -> dict:
    dirs = {}
    for i in range(count):
        model = build()
        config = LoRAConfig(r=RANKS[i % 3], alpha=2 * RANKS[i % 3], target_modules=TARGETS[i % 2],
                            use_rslora=i == 9)
        inject_lora(model, config)
        torch.manual_seed(100 + i)
        for module in lora_modules(model).values():  # B = 0 at init: give every adapter a real update
            torch.nn.init.normal_(module.lora_B.weight, std=std)
        dirs[f"ad{i}"] = save_adapter(model, config, root / f"ad{i}", base_model_name_or_path=base_name)
    return dirs


def run_together(model, adapters: dict, prompts: dict) -> dict:
    """Every (adapter or None, prompt) request on one engine at once: the tokens of each."""
    engine = Engine(model, pad_id=0, adapters=AdapterSlots(model, adapters))
    requests = {key: engine.submit(Request(prompt, sampling=GREEDY, adapter=key[0]))
                for key, prompt in prompts.items()}
    engine.run()
    return {key: request.tokens for key, request in requests.items()}


def run_alone(model, prompts: list[list[int]]) -> list[list[int]]:
    """One adapter's (or the base's) requests on an engine with no other adapter loaded."""
    engine = Engine(model, pad_id=0)
    requests = [engine.submit(Request(prompt, sampling=GREEDY)) for prompt in prompts]
    engine.run()
    return [request.tokens for request in requests]


def traffic(names: list[str], make_prompt) -> dict:
    prompts = {(name, i): make_prompt(n * 3 + i) for n, name in enumerate(names) for i in range(3)}
    prompts.update({(None, i): make_prompt(1000 + i) for i in range(3)})
    return prompts


@pytest.fixture(scope="module")
def wide_model_dir(tmp_path_factory, tokenizer):
    """The tiny Llama at a wide init (its greedy answers depend on the whole prompt), saved with a tokenizer."""
    path = tmp_path_factory.mktemp("wide-llama")
    build_tiny_llama(initializer_range=0.5).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, wide_model_dir):
    adapters = make_adapters(lambda: build_tiny_llama(initializer_range=0.5), tmp_path_factory.mktemp("ten"),
                             str(wide_model_dir))
    prompts = traffic(list(adapters), lambda seed: torch.randint(
        3, 1000, (3 + seed % 7,), generator=torch.Generator().manual_seed(seed)).tolist())
    return adapters, prompts, run_together(build_tiny_llama(initializer_range=0.5), adapters, prompts)


def _by_adapter(prompts: dict, name):
    return [prompt for (key, _), prompt in prompts.items() if key == name]


def test_ten_adapters_mixed_equal_each_adapter_alone_and_merged(tiny, tmp_path):
    adapters, prompts, together = tiny
    assert len({tuple(tokens) for tokens in together.values()}) > 20  # the adapters change the answers
    assert [together[(None, i)] for i in range(3)] == run_alone(build_tiny_llama(initializer_range=0.5),
                                                                 _by_adapter(prompts, None))
    for name, path in adapters.items():
        single = build_tiny_llama(initializer_range=0.5)
        load_adapter(single, path)
        expected = [together[(name, i)] for i in range(3)]
        assert run_alone(single, _by_adapter(prompts, name)) == expected, name
        merge(str(path), str(tmp_path / name), dtype="fp32")
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / name).eval()
        assert run_alone(merged, _by_adapter(prompts, name)) == expected, f"{name} merged"


def test_ten_adapters_mixed_equal_transformers_generate_through_peft(tiny):
    adapters, prompts, together = tiny
    reference = None
    for name, path in adapters.items():
        if reference is None:
            base = build_tiny_llama(initializer_range=0.5)
            reference = peft.PeftModel.from_pretrained(base, str(path), adapter_name=name)
        else:
            reference.load_adapter(str(path), adapter_name=name)
    reference.eval()
    keys = list(prompts)
    ids, mask = left_pad([prompts[key] for key in keys], 0, torch.device("cpu"))
    with torch.no_grad():
        out = reference.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=8,
                                 pad_token_id=0, eos_token_id=None,
                                 adapter_names=[key[0] or "__base__" for key in keys])
    for row, key in enumerate(keys):
        assert out[row, ids.shape[1]:].tolist() == together[key], key


def test_embedded_model_ten_adapters(tmp_path, tokenizer):
    """The real model: 10 adapters × 3 chat prompts mixed with base requests, each equal to its adapter alone;
    two of them (one per target set) also equal to the merged model alone."""
    from tunesmith.data.builtin import builtin_task
    from tunesmith.models.load import load
    from tunesmith.templates import render_prompt

    build = lambda: load("default", dtype="fp32", device="cpu").model.eval()  # noqa: E731
    adapters = make_adapters(build, tmp_path, "default", std=0.02)
    rows = builtin_task("test", 40)
    prompts = traffic(list(adapters), lambda seed: render_prompt(tokenizer, rows[seed % 40]["messages"][:-1]))
    together = run_together(build(), adapters, prompts)
    assert len({tuple(tokens) for tokens in together.values()}) > 10
    assert [together[(None, i)] for i in range(3)] == run_alone(build(), _by_adapter(prompts, None))
    for name, path in adapters.items():
        single = build()
        load_adapter(single, path)
        expected = [together[(name, i)] for i in range(3)]
        assert run_alone(single, _by_adapter(prompts, name)) == expected, name
        if name in ("ad0", "ad1"):
            merge(str(path), str(tmp_path / f"merged-{name}"), dtype="fp32")
            merged = AutoModelForCausalLM.from_pretrained(tmp_path / f"merged-{name}").eval()
            assert run_alone(merged, _by_adapter(prompts, name)) == expected, f"{name} merged"
