"""The training layout: chosen once from device, attention and batching, installed once, the same loss as the
plain forward, and no module or config attribute changed by any forward after that."""

import pytest
import torch

from tinymodels import build_adapted_tiny_llama, build_tiny_llama
from tunesmith.errors import TunesmithError
from tunesmith.peft import adapter_parameters
from tunesmith.templates import IGNORE_INDEX
from tunesmith.train.decoder import decoder_layers
from tunesmith.train.layout import choose_layout, install_layout, resolve, rows_for_evaluation
from tunesmith.train.loss import supervised_loss_sum
from tunesmith.train.rows import NAME as ROWS
from tunesmith.train.varlen import NAME as VARLEN

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def _with_attention(name: str):
    model = build_tiny_llama()
    model.config._attn_implementation_internal = name  # only read by the choice, never run
    return model


@pytest.mark.parametrize("attention, device, options, expected, trimmed", [
    ("sdpa", CPU, {}, "rows", True),
    ("sdpa", CUDA, {}, "plain", False),
    ("sdpa", CUDA, {"batching": "pack"}, "plain", False),
    ("eager", CPU, {}, "flat", True),
    ("sdpa", CPU, {"checkpointing": True}, "flat", False),
    ("sdpa", CPU, {"batching": "pack"}, "plain", False),
    ("sdpa", CPU, {"batching": "bucket"}, "rows", True),
    ("flash_attention_2", CUDA, {}, "cache", False),
])
def test_auto_choice(attention, device, options, expected, trimmed):
    layout = choose_layout(_with_attention(attention), device, **options)
    assert (layout.name, layout.trimmed) == (expected, trimmed)
    assert layout.reason


def test_varlen_is_forced_only_and_needs_no_attention_dropout(monkeypatch):
    from tunesmith.train import varlen

    monkeypatch.setattr(varlen, "available", lambda: True)
    for batching in ("pad", "pack"):
        assert choose_layout(build_tiny_llama(), CUDA, batching=batching).name == "plain"  # measured faster
        assert choose_layout(build_tiny_llama(), CUDA, requested="varlen", batching=batching).trimmed
    model = build_tiny_llama()
    model.config.attention_dropout = 0.1  # the kernel has no dropout
    with pytest.raises(TunesmithError, match="train.layout=varlen needs"):
        choose_layout(model, CPU, requested="varlen")


def test_auto_leaves_windowed_or_softcapped_attention_alone():
    model = build_tiny_llama()
    model.config.sliding_window = 64
    assert choose_layout(model, CPU, max_length=64).name == "rows"  # the window covers every row
    assert choose_layout(model, CPU, max_length=65).name == "plain"
    model.config.sliding_window, model.config.attn_logit_softcapping = None, 50.0
    assert choose_layout(model, CPU).name == "plain"


def test_forced_layouts_and_refusals():
    model = build_tiny_llama()
    assert choose_layout(model, CPU, requested="cache").name == "cache"
    assert choose_layout(model, CPU, requested="flat").trimmed
    assert not choose_layout(model, CPU, requested="flat", checkpointing=True).trimmed
    with pytest.raises(TunesmithError, match="train.layout=rows needs SDPA"):
        choose_layout(_with_attention("eager"), CPU, requested="rows")
    with pytest.raises(TunesmithError, match=r"train.layout=flat .*data.batching=pack"):
        choose_layout(model, CPU, requested="flat", batching="pack")


def _batch():
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16], [5, 6, 7, 8, 9, 10, 11, 12, 13, 20, 21, 2]])
    mask = torch.tensor([[1] * 12, [1] * 11 + [0]])
    labels = torch.where((torch.arange(12) >= 9) & mask.bool(), ids, IGNORE_INDEX)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _loss_and_grads(model, layout):
    model.zero_grad(set_to_none=True)
    loss = supervised_loss_sum(model, _batch(), layout=layout)
    loss.backward()
    return loss.detach(), {k: p.grad.clone() for k, p in adapter_parameters(model).items()}


def _snapshot(model):
    return ([(name, id(module), module._compiled_call_impl) for name, module in model.named_modules()],
            model.config._attn_implementation, list(model.state_dict()))


@pytest.mark.parametrize("name", ["rows", "flat", "varlen", "cache"])
def test_installed_layout_gives_the_plain_loss_and_never_changes_the_model(name):
    model = build_adapted_tiny_llama()
    plain_loss, plain_grads = _loss_and_grads(model, "plain")
    layout = install_layout(model, choose_layout(model, CPU, requested=name))
    assert layout.trimmed == (name != "cache")
    assert model.config._attn_implementation == {"rows": ROWS, "varlen": VARLEN}.get(name, "sdpa")
    mlp_rows = []
    decoder_layers(model)[-1].mlp.register_forward_hook(lambda m, args, out: mlp_rows.append(args[0].shape[1]))
    before = _snapshot(model)
    for _ in range(2):
        loss, grads = _loss_and_grads(model, layout.name)
        assert _snapshot(model) == before
        torch.testing.assert_close(loss, plain_loss, atol=1e-5, rtol=1e-6)
        for key in plain_grads:
            torch.testing.assert_close(grads[key], plain_grads[key], atol=1e-5, rtol=1e-4)
    if layout.trimmed:  # 3 + 2 trained positions
        assert mlp_rows == [5, 5]
    # an installed model still generates like the plain one (no row plan: SDPA)
    with torch.no_grad():
        installed = model(input_ids=_batch()["input_ids"][:1]).logits
        fresh = build_adapted_tiny_llama()
        fresh.load_state_dict(model.state_dict())
        torch.testing.assert_close(installed, fresh(input_ids=_batch()["input_ids"][:1]).logits, atol=1e-5, rtol=1e-5)


def test_varlen_layout_on_packed_rows_gives_the_plain_loss():
    from tunesmith.data.batching import pack_collate

    model = build_adapted_tiny_llama()
    examples = [{"input_ids": [5, 6, 7, 8, 9], "labels": [-100, -100, 7, 8, 9]},
                {"input_ids": [10, 11, 12], "labels": [-100, 11, 12]},
                {"input_ids": [13, 14, 15, 16], "labels": [-100, -100, -100, 16]}]
    batch = pack_collate([examples[:2], examples[2:]], pad_id=0, budget=9)
    results = []
    for name in ("plain", "varlen"):
        if name == "varlen":
            install_layout(model, choose_layout(model, CPU, requested="varlen", batching="pack"))
        model.zero_grad(set_to_none=True)
        loss = supervised_loss_sum(model, batch, layout=name)
        loss.backward()
        results.append((loss.detach(), {k: p.grad.clone() for k, p in adapter_parameters(model).items()}))
    (plain, plain_grads), (ours, grads) = results
    torch.testing.assert_close(ours, plain, atol=1e-5, rtol=1e-6)
    for key in plain_grads:
        torch.testing.assert_close(grads[key], plain_grads[key], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", ["rows", "flat", "varlen", "cache", "plain"])
def test_the_plan_is_read_from_the_host_copy(name):
    """On a GPU the engine passes the batch's host copy beside the device batch and every layout decision, index
    and target comes from it (a read of the device batch would wait for the GPU). Shown on the CPU: the device
    batch's labels are wiped, the host copy's are not, and the loss is the normal one."""
    model = build_adapted_tiny_llama()
    install_layout(model, choose_layout(model, CPU, requested=name))
    expected = supervised_loss_sum(model, _batch(), layout=name)
    wiped = {**_batch(), "labels": torch.full_like(_batch()["labels"], IGNORE_INDEX)}
    torch.testing.assert_close(supervised_loss_sum(model, wiped, layout=name, host=_batch()), expected)


def test_held_out_loss_runs_row_attention_and_puts_sdpa_back():
    """``heldout_loss`` on a CPU SDPA model runs row attention for the call (``rows_for_evaluation``) and
    leaves SDPA installed after; its loss is transformers' own forward's (shared prefix, rows of three lengths).
    An eager model is left as it is."""
    import torch.nn.functional as F

    from tunesmith.eval.evaluate import heldout_loss

    model = build_tiny_llama().eval()
    assert model.config._attn_implementation == "sdpa"
    with rows_for_evaluation(model, 64):
        assert resolve(model, "auto") == "rows"
    assert model.config._attn_implementation == "sdpa" and resolve(model, "auto") == "flat"
    prefix = torch.randint(5, 900, (12,), generator=torch.Generator().manual_seed(1)).tolist()
    examples = []
    for i, size in enumerate((7, 11, 4)):
        ids = prefix + torch.randint(5, 900, (size,), generator=torch.Generator().manual_seed(2 + i)).tolist()
        examples.append({"input_ids": ids, "labels": [IGNORE_INDEX] * (len(ids) - size // 2) + ids[-(size // 2):]})
    total, count = 0.0, 0
    with torch.no_grad():
        for example in examples:
            logits = model(input_ids=torch.tensor([example["input_ids"]])).logits[0, :-1]
            labels = torch.tensor(example["labels"][1:])
            total += float(F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum"))
            count += int((labels != IGNORE_INDEX).sum())
    assert heldout_loss(model, examples, pad_id=0)["eval_loss"] == pytest.approx(total / count, rel=1e-5)
    assert model.config._attn_implementation == "sdpa"
    eager = build_tiny_llama(attn_implementation="eager").eval()
    with rows_for_evaluation(eager, 64):
        assert eager.config._attn_implementation == "eager"
