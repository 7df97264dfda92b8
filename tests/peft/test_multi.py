"""Many adapters in one batch (issue 26's foundation): each row of a mixed batch gets exactly what its adapter
gives alone, base rows exactly the base, and PEFT's own mixed batches (``adapter_names``) agree."""

from __future__ import annotations

import peft
import pytest
import torch
from tinymodels import build_tiny_llama

from tunesmith.errors import TunesmithError
from tunesmith.peft.io import load_adapter, save_adapter
from tunesmith.peft.lora import LoRAConfig, inject_lora, lora_modules
from tunesmith.peft import row_kernel
from tunesmith.peft.multi import AdapterSlots, MultiLoRALinear

# three ranks, three target sets (one with rsLoRA)
SHAPES = {"qv2": LoRAConfig(r=2, alpha=4, target_modules=("q_proj", "v_proj")),
          "all4": LoRAConfig(r=4, alpha=8, target_modules="all-linear"),
          "mlp8": LoRAConfig(r=8, alpha=8, target_modules=("gate_proj", "down_proj", "o_proj"), use_rslora=True)}


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    dirs = {}
    for seed, (name, config) in enumerate(SHAPES.items()):
        model = build_tiny_llama()
        torch.manual_seed(seed)
        inject_lora(model, config)
        for module in lora_modules(model).values():  # B = 0 at init: give every adapter a real update
            torch.nn.init.normal_(module.lora_B.weight, std=0.5)
        dirs[name] = save_adapter(model, config, root / name, base_model_name_or_path="tiny")
    return dirs


def _alone(name, adapters, ids):
    model = build_tiny_llama().eval()
    if name is not None:
        load_adapter(model, adapters[name])
    with torch.no_grad():
        return model(input_ids=ids).logits


ROWS = ["qv2", None, "all4", "mlp8", "qv2", "mlp8"]


def test_a_mixed_batch_gives_each_row_its_adapter_alone(adapters):
    ids = torch.randint(0, 1000, (len(ROWS), 7), generator=torch.Generator().manual_seed(0))
    model = build_tiny_llama().eval()
    slots = AdapterSlots(model, adapters)
    assert slots.slots == {"qv2": 1, "all4": 2, "mlp8": 3}
    assert all(isinstance(layer, MultiLoRALinear) for layer in slots.layers.values())
    with torch.no_grad(), slots.rows(ROWS):
        mixed = model(input_ids=ids).logits
    base = _alone(None, adapters, ids)  # the base on the same batch (BLAS results depend on the batch's shape)
    for i, name in enumerate(ROWS):
        alone = _alone(name, adapters, ids[i:i + 1])[0]
        if name is None:
            assert torch.equal(mixed[i], base[i])  # slot 0 adds nothing at all
            torch.testing.assert_close(mixed[i], alone, rtol=1e-5, atol=1e-5)
        else:
            torch.testing.assert_close(mixed[i], alone, rtol=1e-5, atol=1e-5)
            assert not torch.allclose(alone, _alone(None, adapters, ids[i:i + 1])[0], atol=1e-3)  # a real update
    with torch.no_grad():  # outside the block every row is the base
        torch.testing.assert_close(model(input_ids=ids).logits, _alone(None, adapters, ids), rtol=0, atol=0)


def test_greedy_tokens_equal_each_adapter_alone(adapters):
    prompts = torch.randint(0, 1000, (len(ROWS), 5), generator=torch.Generator().manual_seed(1))
    model = build_tiny_llama().eval()
    slots = AdapterSlots(model, adapters)

    def greedy(run, ids, steps=8):
        for _ in range(steps):
            with torch.no_grad():
                ids = torch.cat([ids, run(ids).argmax(-1, keepdim=True)], dim=1)
        return ids[:, prompts.shape[1]:].tolist()

    def mixed_logits(ids):
        with slots.rows(ROWS):
            return model(input_ids=ids).logits[:, -1]

    mixed = greedy(mixed_logits, prompts)
    for i, name in enumerate(ROWS):
        single = build_tiny_llama().eval()
        if name is not None:
            load_adapter(single, adapters[name])
        assert mixed[i] == greedy(lambda ids: single(input_ids=ids).logits[:, -1], prompts[i:i + 1])[0], name


def test_peft_mixed_batches_agree(adapters):
    """The outside oracle: PEFT with every adapter loaded and one per row through ``adapter_names``."""
    ids = torch.randint(0, 1000, (len(ROWS), 6), generator=torch.Generator().manual_seed(2))
    reference = None
    for name, path in adapters.items():
        if reference is None:
            reference = peft.PeftModel.from_pretrained(build_tiny_llama().eval(), str(path), adapter_name=name)
        else:
            reference.load_adapter(str(path), adapter_name=name)
    with torch.no_grad():
        expected = reference(input_ids=ids, adapter_names=[name or "__base__" for name in ROWS]).logits
    model = build_tiny_llama().eval()
    slots = AdapterSlots(model, adapters)
    with torch.no_grad(), slots.rows(ROWS):
        torch.testing.assert_close(model(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)


def test_an_unknown_adapter_name_is_named(adapters):
    slots = AdapterSlots(build_tiny_llama().eval(), adapters)
    with pytest.raises(TunesmithError, match=r"no adapter named 'nope' is loaded; loaded: qv2, all4, mlp8"):
        with slots.rows(["nope"]):
            pass


def test_the_engine_serves_mixed_adapters_token_for_token(adapters):
    """Continuous batching with one adapter per request: each request's greedy tokens equal its adapter alone."""
    from tunesmith.engine import Engine, Request
    from tunesmith.generate import SamplingConfig

    prompts = [torch.randint(3, 1000, (4 + i,), generator=torch.Generator().manual_seed(10 + i)).tolist()
               for i in range(len(ROWS))]
    sampling = SamplingConfig(max_new_tokens=6)
    model = build_tiny_llama().eval()
    engine = Engine(model, pad_id=0, adapters=AdapterSlots(model, adapters))
    requests = [engine.submit(Request(p, sampling=sampling, adapter=name)) for p, name in zip(prompts[:3], ROWS)]
    engine.step()
    requests += [engine.submit(Request(p, sampling=sampling, adapter=name))  # join mid-flight
                 for p, name in zip(prompts[3:], ROWS[3:])]
    engine.run()
    for request, prompt, name in zip(requests, prompts, ROWS):
        single = build_tiny_llama().eval()
        if name is not None:
            load_adapter(single, adapters[name])
        alone = Engine(single, pad_id=0)
        expected = alone.submit(Request(prompt, sampling=sampling))
        alone.run()
        assert request.tokens == expected.tokens, name


@pytest.mark.parametrize("kernel", [True, False], ids=["row kernel", "masked stack"])
@pytest.mark.parametrize("rows", [["qv2", None, "mlp8", "qv2"], ["qv2", "qv2", None, "mlp8"], ["all4", "all4"],
                                  ["all4", "qv2", "mlp8", None], ["mlp8", "all4", "qv2", "qv2"]],
                         ids=["segments", "segments side by side", "one adapter", "gathered", "whole stack"])
def test_both_ways_of_computing_a_batch_give_each_row_its_adapter(adapters, rows, kernel, monkeypatch):
    """Up to SEGMENTS_MAX adapters run segment by segment (rows side by side as slices of the batch, others by
    index); more run each row through its own block with the CPU row kernel, or, without it, through one
    gathered product over the span of slots present (or the whole stack, when every slot is present): the
    same rows."""
    if kernel and not row_kernel.available()[0]:
        pytest.skip(row_kernel.available()[1])
    if not kernel:
        monkeypatch.setattr(AdapterSlots, "row_kernel", lambda self: False)
    ids = torch.randint(0, 1000, (len(rows), 5), generator=torch.Generator().manual_seed(3))
    model = build_tiny_llama().eval()
    slots = AdapterSlots(model, adapters)
    if rows[0] == "qv2" and rows[1] == "qv2":
        assert slots._rows_of([slots.slot(name) for name in rows], slots.slot("qv2")) == slice(0, 2)
    with torch.no_grad(), slots.rows(rows):
        if len(set(rows) - {None}) > 2 and kernel:
            assert slots.plan.slots.tolist() == [slots.slot(name) for name in rows] and slots.plan.columns is None
        elif len(set(rows) - {None}) == len(adapters):
            assert slots.plan.columns is not None and slots.plan.span is None
        elif len(set(rows) - {None}) > 2:
            assert slots.plan.span is not None
        mixed = model(input_ids=ids).logits
    for i, name in enumerate(rows):
        torch.testing.assert_close(mixed[i], _alone(name, adapters, ids[i:i + 1])[0], rtol=1e-5, atol=1e-5)


def test_prefixes_of_two_lengths_in_one_prefill(adapters):
    """Each adapter stores its own shared start; joiners of both, with starts of different lengths, prefill in one
    forward (the shorter prefix left-padded): every answer equals its adapter alone."""
    from tunesmith.engine import Engine, Request
    from tunesmith.generate import SamplingConfig

    def ints(seed, n):
        return torch.randint(3, 1000, (n,), generator=torch.Generator().manual_seed(seed)).tolist()

    sampling = SamplingConfig(max_new_tokens=6)
    starts = {"qv2": ints(80, 40), "all4": ints(81, 34)}
    model = build_tiny_llama().eval()
    engine = Engine(model, pad_id=0, adapters=AdapterSlots(model, adapters))
    first = [engine.submit(Request(starts[name] + ints(82 + i, 3), sampling=sampling, adapter=name))
             for name in starts for i in range(2)]
    engine.step()
    late = [engine.submit(Request(starts[name] + ints(90 + i, 2 + i), sampling=sampling, adapter=name))
            for i, name in enumerate(starts)]
    engine.run()
    for request in [*first, *late]:
        single = build_tiny_llama().eval()
        load_adapter(single, adapters[request.adapter])
        alone = Engine(single, pad_id=0)
        expected = alone.submit(Request(request.prompt, sampling=sampling))
        alone.run()
        assert request.tokens == expected.tokens, request.adapter


def test_the_whole_stack_runs_one_a_product_per_shared_input(adapters):
    """q/k/v (and gate/up) keep their A stacks side by side: the first called computes every sibling's part,
    regrouped after each rank growth; every row still equals its adapter alone, and a sibling called with
    another input computes its own."""
    ids = torch.randint(0, 1000, (4, 6), generator=torch.Generator().manual_seed(5))
    model = build_tiny_llama().eval()
    slots = AdapterSlots(model, {"qv2": adapters["qv2"]}, capacity=3, targets="all-linear")
    slots.load("all4", adapters["all4"])  # rank 2 → 4 → 8: the stacks grow and are regrouped twice
    slots.load("mlp8", adapters["mlp8"])
    attention = "model.layers.0.self_attn."
    q, k, v = (slots.layers[attention + name] for name in ("q_proj", "k_proj", "v_proj"))
    assert q.group is k.group is v.group is not None and q.group.intact()
    assert q.lora_A.untyped_storage().data_ptr() == v.lora_A.untyped_storage().data_ptr()
    assert slots.layers["model.layers.0.mlp.gate_proj"].group is slots.layers["model.layers.0.mlp.up_proj"].group
    assert slots.layers["model.layers.0.mlp.down_proj"].group is None
    rows = ["all4", "qv2", "mlp8", None]
    index = torch.tensor([slots.slot(name) for name in rows])
    with torch.no_grad(), slots.indexed(index):
        mixed = model(input_ids=ids).logits
    for i, name in enumerate(rows):
        torch.testing.assert_close(mixed[i], _alone(name, adapters, ids[i:i + 1])[0], rtol=1e-5, atol=1e-5)
    x, y = torch.randn(2, 4, 1, q.in_features, generator=torch.Generator().manual_seed(6))
    with torch.no_grad(), slots.indexed(index):
        q(x)
        assert q.group.input is x and q.group.pending == {1, 2}  # k's and v's parts wait for them
        got = k(y)  # another input: k's own product
    with torch.no_grad(), slots.rows(rows, stacked=False):
        torch.testing.assert_close(got, k(y), rtol=1e-5, atol=1e-5)


def test_row_kernel_gives_each_row_its_own_block_and_leaves_slot_0_alone():
    """The C kernel against the product written out: ranks below the stack's (a padded block is read only up to
    its adapter's rank), a slot with no adapter here (rank 0), rows of slot 0 untouched, rows out of slot order."""
    if not row_kernel.available()[0]:
        pytest.skip(row_kernel.available()[1])
    g = torch.Generator().manual_seed(5)
    rank, din, dout, slots = 8, 37, 21, 4
    a, bt = torch.randn(slots * rank, din, generator=g), torch.randn(slots * rank, dout, generator=g)
    ranks = torch.tensor([0, 8, 3, 0, 5])
    rows = torch.tensor([2, 0, 1, 4, 3, 2, 1, 0])
    x, y = torch.randn(len(rows), din, generator=g), torch.randn(len(rows), dout, generator=g)
    expected = y.clone()
    for i, s in enumerate(rows.tolist()):
        r = int(ranks[s])
        if s and r:
            block = slice((s - 1) * rank, (s - 1) * rank + r)
            expected[i] += (a[block] @ x[i]) @ bt[block]
    row_kernel.lora_rows(x, y, rows, ranks, a, bt, rank)
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(y[1], expected[1]) and torch.equal(y[7], expected[7])  # slot 0: exactly as given


def test_without_a_compiler_the_masked_stack_runs(adapters, monkeypatch):
    monkeypatch.setenv("CC", "no-such-compiler-here")
    row_kernel._library.cache_clear()
    try:
        available, reason = row_kernel.available()
        assert not available and "no C compiler found" in reason
        model = build_tiny_llama().eval()
        slots = AdapterSlots(model, adapters)
        with torch.no_grad(), slots.rows(["qv2", "all4", "mlp8", None]):
            assert slots.plan.slots is None and slots.plan.columns is not None
    finally:
        row_kernel._library.cache_clear()
