"""``train.graphs``: the fixed-shape plan a CUDA graph records gives the plain path's loss and gradients (shown on
the CPU, where the plan runs eagerly), its shapes fall into few buckets, and the option is refused where a graph
cannot run. The capture itself is CUDA-only (the last test, skipped here)."""

import pytest
import torch

from tinymodels import build_adapted_tiny_llama
from tunesmith.config import RunConfig
from tunesmith.data.batching import pack_collate
from tunesmith.errors import TunesmithError
from tunesmith.peft import adapter_parameters, lora_modules
from tunesmith.train.decoder import decoder_layers
from tunesmith.train.graphs import MIN_SEQUENCES, BlockDraws, bucket, choose_graphs, graph_plan, plan_loss
from tunesmith.train.layout import choose_layout, install_layout
from tunesmith.train.loss import enable_gradient_checkpointing, supervised_loss_sum

CPU = torch.device("cpu")


def _padded():
    """Three right-padded rows of different lengths sharing no prefix; the middle row trains two tokens."""
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11], [12, 13, 14, 15, 0, 0, 0], [16, 17, 18, 19, 20, 0, 0]])
    labels = torch.tensor([[-100, -100, 7, 8, 9, 10, 11], [-100, -100, 14, 15, -100, -100, -100],
                           [-100, -100, -100, 19, 20, -100, -100]])
    return {"input_ids": ids, "labels": labels, "attention_mask": (torch.arange(7) < torch.tensor([[7], [4], [5]])).long()}


def _packed():
    examples = [{"input_ids": [5, 6, 7, 8, 9], "labels": [-100, -100, 7, 8, 9]},
                {"input_ids": [10, 11, 12], "labels": [-100, 11, 12]},
                {"input_ids": [13, 14, 15, 16], "labels": [-100, -100, -100, 16]}]
    return pack_collate([examples[:2], examples[2:]], pad_id=0, budget=9)


def _loss_and_grads(model, compute):
    model.zero_grad(set_to_none=True)
    loss = compute()
    loss.backward()
    return loss.detach(), {k: p.grad.clone() for k, p in adapter_parameters(model).items()}


@pytest.mark.parametrize("make, capacity", [(_padded, 8 * 7), (_packed, 2 * 9)])
def test_the_plan_gives_the_plain_loss_and_gradients(make, capacity):
    model = build_adapted_tiny_llama()
    batch = make()
    tokens = int((batch["labels"][:, 1:] != -100).sum())
    plain, plain_grads = _loss_and_grads(model, lambda: supervised_loss_sum(model, batch, layout="plain") / tokens)
    install_layout(model, choose_layout(model, CPU, requested="varlen", batching="pad"))
    plan = graph_plan(batch, capacity=capacity, scale=1.0 / tokens)
    ours, grads = _loss_and_grads(model, lambda: plan_loss(model, **plan.tensors()))
    torch.testing.assert_close(ours, plain, atol=1e-6, rtol=1e-5)
    for key in plain_grads:
        torch.testing.assert_close(grads[key], plain_grads[key], atol=1e-6, rtol=1e-4)
    # the padding positions are there and weigh nothing
    assert plan.scales.count_nonzero() == tokens and len(plan.input_ids) == bucket(len(plan.input_ids), capacity)


def test_the_plan_pads_to_buckets_and_empty_sequences():
    plan = graph_plan(_padded(), capacity=8 * 64, scale=0.5)
    # real tokens: each row up to its last trained target (6 + 3 + 4 = 13), in the first bucket (64)
    assert plan.key == (64, MIN_SEQUENCES + 1)  # 3 examples + the padding's sequence, then empty ones
    assert plan.cu_seqlens.tolist() == [0, 6, 9, 13, *[64] * (MIN_SEQUENCES - 3)]
    assert plan.position_ids[:16].tolist() == [*range(6), *range(3), *range(4), 0, 1, 2]
    assert plan.input_ids[:13].tolist() == [5, 6, 7, 8, 9, 10, 12, 13, 14, 16, 17, 18, 19]
    # position n predicts the label after it: row 0's token 6 (n = 1) predicts 7, ...
    assert plan.targets[:13].tolist() == [0, 7, 8, 9, 10, 11, 0, 14, 15, 0, 0, 19, 20]
    assert plan.scales[:13].tolist() == [0, .5, .5, .5, .5, .5, 0, .5, .5, 0, 0, .5, .5]
    many = graph_plan({key: value.repeat(12, 1) for key, value in _padded().items()}, capacity=8 * 64, scale=0.5)
    assert many.key == (192, 65)  # 36 examples + padding = 37 spans → 64 sequences, 27 of them empty
    assert many.cu_seqlens.tolist()[:4] == [0, 6, 9, 13] and many.cu_seqlens.tolist()[36:] == [156, *[192] * 28]
    # a batch of the same bucket gets the same shape: one graph serves both
    other = {key: value[:2] for key, value in _padded().items()}
    assert graph_plan(other, capacity=8 * 64, scale=1.0).key[0] == 64
    assert [bucket(n, 4096) for n in (1, 64, 65, 200, 512, 513, 2400, 3800, 4096)] == [
        64, 64, 128, 256, 512, 640, 2560, 4096, 4096]  # 64 · 2^(k/4) rounded up to 64, capped at the capacity
    assert bucket(2048, 2048) == 2048  # packed rows: one bucket


def test_empty_sequences_are_skipped():
    """The power-of-two sequence count adds empty sequences; they attend to nothing and change nothing."""
    model = build_adapted_tiny_llama()
    install_layout(model, choose_layout(model, CPU, requested="varlen", batching="pad"))
    plan = graph_plan(_padded(), capacity=8 * 7, scale=0.1)
    fewer = plan.tensors()
    more = {**fewer, "cu_seqlens": torch.cat([plan.cu_seqlens, plan.cu_seqlens[-1:].repeat(8)])}
    with torch.no_grad():
        torch.testing.assert_close(plan_loss(model, **more), plan_loss(model, **fewer))


def test_auto_trains_eagerly_on_the_cpu_and_true_is_refused():
    model = build_adapted_tiny_llama()
    auto = choose_graphs(RunConfig(), model, CPU)
    assert auto == {"used": False, "reason": "train.graphs=auto: graphs need a CUDA GPU; this run is on cpu"}
    assert choose_graphs(RunConfig.model_validate({"train": {"graphs": False}}), model, CPU)["used"] is False
    with pytest.raises(TunesmithError, match="train.graphs=true needs a CUDA GPU; this run is on cpu"):
        choose_graphs(RunConfig.model_validate({"train": {"graphs": True}}), model, CPU)


@pytest.mark.parametrize("train, method, world, why", [
    ({"gradient_checkpointing": True, "graphs": True}, {}, 1, None),
    ({}, {"objective": "dpo"}, 1, "the supervised objective"),
    ({}, {}, 2, "one process"),
    ({"layout": "plain"}, {}, 1, "train.layout=auto"),
    ({"graphs": True, "layout": "varlen"}, {}, 1, None),
])
def test_where_graphs_can_run_on_cuda(monkeypatch, train, method, world, why):
    from tunesmith.train import varlen

    monkeypatch.setattr(varlen, "available", lambda: True)
    cuda, model = torch.device("cuda"), build_adapted_tiny_llama()
    auto = choose_graphs(RunConfig.model_validate({"train": train, "method": method}), model, cuda, world)
    if why is None:
        assert auto["used"] and auto["reason"].startswith("train.graphs=true")
        assert auto["reason"].endswith("graph-safe checkpointing") == bool(train.get("gradient_checkpointing"))
        return
    assert not auto["used"] and why in auto["reason"]
    with pytest.raises(TunesmithError, match=why):
        choose_graphs(RunConfig.model_validate({"train": {**train, "graphs": True}, "method": method}), model, cuda,
                      world)
    assert choose_graphs(RunConfig(), model, cuda, 1)["used"]  # the defaults can


def _with_dropout(model, p: float = 0.3):
    for module in lora_modules(model).values():
        module.lora_dropout = torch.nn.Dropout(p)
    return model.train()


def _checkpointed_loss_and_grads(model, batch, tokens, draws=None, draw=(0, 0)):
    if draws is not None:
        draws.reseed(draw)
    plan = graph_plan(batch, capacity=8 * 7, scale=1.0 / tokens)
    return _loss_and_grads(model, lambda: plan_loss(model, **plan.tensors()))


def _each_block_once_under(draws, model):
    """The reference: no checkpointing, each block's forward run once under the context ``draws`` gives a
    checkpointed forward (the same generator, the same masks). Returns the hooks' handles."""
    entered = []

    def enter(module, args):
        forward, _ = draws.contexts()
        forward.__enter__()
        entered.append(forward)

    def leave(module, args, output):
        entered.pop().__exit__(None, None, None)

    return [handle for block in decoder_layers(model)
            for handle in (block.register_forward_pre_hook(enter), block.register_forward_hook(leave))]


def test_checkpointed_blocks_recompute_the_forwards_draws():
    """Under graphs a checkpointed block draws its dropout masks from its own generators (``BlockDraws``, the
    checkpoint's ``context_fn``), seeded on the host: its recomputation in the backward draws the forward's masks,
    so the gradients are those of the same masks without checkpointing. PyTorch's checkpoint without its
    host-side state handling (the only form a graph could record) draws new masks in the recomputation, and its
    gradients are wrong."""
    batch = _padded()
    tokens = int((batch["labels"][:, 1:] != -100).sum())
    model = _with_dropout(build_adapted_tiny_llama())
    install_layout(model, choose_layout(model, CPU, requested="varlen", batching="pad"))
    draws = BlockDraws(CPU, seed=3)

    # the reference: the same draws, each block run once (no recomputation)
    handles = _each_block_once_under(draws, model)
    once, once_grads = _checkpointed_loss_and_grads(model, batch, tokens, draws)
    for handle in handles:
        handle.remove()
    assert len(draws.pairs) == model.config.num_hidden_layers

    enable_gradient_checkpointing(model, **draws.checkpoint_options())
    loss, grads = _checkpointed_loss_and_grads(model, batch, tokens, draws)
    assert once == loss
    for key in grads:
        torch.testing.assert_close(grads[key], once_grads[key], atol=1e-7, rtol=1e-6)

    # the same (step, micro-batch) draws the same masks; another draws others
    again, _ = _checkpointed_loss_and_grads(model, batch, tokens, draws)
    other, _ = _checkpointed_loss_and_grads(model, batch, tokens, draws, draw=(0, 1))
    assert again == loss and other != loss

    # checkpointing that leaves the random state alone recomputes with other masks: gradients differ
    enable_gradient_checkpointing(model, preserve_rng_state=False)
    torch.manual_seed(0)
    _, naive = _checkpointed_loss_and_grads(model, batch, tokens)
    assert any(not torch.allclose(naive[key], grads[key], atol=1e-4) for key in grads)


def test_graphs_refuse_checkpointing_a_model_transformers_cannot_checkpoint(monkeypatch):
    from tunesmith.train import varlen

    monkeypatch.setattr(varlen, "available", lambda: True)
    model = build_adapted_tiny_llama()
    monkeypatch.setattr(model, "supports_gradient_checkpointing", False)
    config = RunConfig.model_validate({"train": {"gradient_checkpointing": True}})
    auto = choose_graphs(config, model, torch.device("cuda"))
    assert not auto["used"] and "supports transformers' gradient checkpointing" in auto["reason"]
    assert choose_graphs(RunConfig(), model, torch.device("cuda"))["used"]  # without checkpointing they run


def _train_tiny_on_cuda(graphed: bool, steps: int = 4, checkpointing: bool = False):
    """``steps`` SGD steps of the tiny bf16 model over the padded batch (the flash kernel is bf16 only), through
    ``GraphedSteps`` or the same plan eagerly: (losses, adapter weights, the runner). ``checkpointing``: with
    checkpointed blocks and LoRA dropout, their draws from ``BlockDraws`` either way."""
    from tunesmith.train.graphs import GraphedSteps

    cuda = torch.device("cuda")
    model = build_adapted_tiny_llama().to(cuda, torch.bfloat16).train()
    install_layout(model, choose_layout(model, cuda, requested="varlen", batching="pad"))
    draws = BlockDraws(cuda, seed=5) if checkpointing else None
    if checkpointing:
        enable_gradient_checkpointing(_with_dropout(model), **draws.checkpoint_options())
    params = list(adapter_parameters(model).values())
    optimizer = torch.optim.SGD(params, lr=0.1)
    runner = GraphedSteps(model, params, cuda, torch.bfloat16, capacity=8 * 7, draws=draws)
    losses = []
    for step in range(steps):
        batch = _padded()
        scale = 1.0 / int((batch["labels"][:, 1:] != -100).sum())
        if graphed:
            loss = runner.run(batch, scale, (step, 0))
        else:
            if runner.draws is not None:
                runner.draws.reseed((step, 0))
            plan = graph_plan(batch, capacity=8 * 7, scale=scale)
            with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False):
                loss = plan_loss(model, **{k: v.cuda() for k, v in plan.tensors().items()})
            loss.backward()
        losses.append(float(loss))
        optimizer.step()
        optimizer.zero_grad(set_to_none=not graphed)
    return losses, [p.detach().clone() for p in params], runner


def test_auto_steps_aside_for_attention_the_varlen_row_cannot_carry(monkeypatch):
    """The graphs' row needs what the varlen layout needs: a decoder that hands the sequence plan to its blocks
    (without it the row would attend across examples), and plain causal softmax."""
    from tunesmith.train import varlen

    monkeypatch.setattr(varlen, "available", lambda: True)
    cuda = torch.device("cuda")
    model = build_adapted_tiny_llama()
    decoder = model.get_decoder()
    plain_forward = decoder.forward
    decoder.forward = lambda input_ids=None, position_ids=None, attention_mask=None, use_cache=None: plain_forward(
        input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask, use_cache=use_cache)
    assert "keyword arguments to its blocks" in choose_graphs(RunConfig(), model, cuda)["reason"]
    windowed = build_adapted_tiny_llama()
    windowed.config.sliding_window = 64
    assert not choose_graphs(RunConfig(), windowed, cuda)["used"]  # data.max_length 512 > the window


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_graphed_training_matches_eager_on_cuda():
    """The same kernels either way: the same losses and adapter weights; one graph for the one shape."""
    eager, eager_params, _ = _train_tiny_on_cuda(False)
    ours, params, runner = _train_tiny_on_cuda(True)
    assert runner.summary() == {"graphs": 1, "shapes": [[64, MIN_SEQUENCES + 1]]}
    assert ours == pytest.approx(eager, rel=1e-5)
    for a, b in zip(params, eager_params):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_graphed_checkpointed_training_with_dropout_matches_eager_on_cuda():
    """Checkpointed blocks with LoRA dropout inside graphs: the graph's forward and recomputation draw what the
    eager run's draw (``BlockDraws``, reseeded every micro-batch), so losses and weights match; and the dropout
    does draw (a run without it ends elsewhere)."""
    eager, eager_params, _ = _train_tiny_on_cuda(False, checkpointing=True)
    ours, params, runner = _train_tiny_on_cuda(True, checkpointing=True)
    assert runner.summary() == {"graphs": 1, "shapes": [[64, MIN_SEQUENCES + 1]]}
    assert ours == pytest.approx(eager, rel=1e-5)
    for a, b in zip(params, eager_params):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    plain, _, _ = _train_tiny_on_cuda(True)
    assert plain[1:] != pytest.approx(ours[1:], rel=1e-3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_a_failed_recording_goes_on_eagerly(monkeypatch, capsys):
    """A forward that reads a device value on the host cannot be recorded: the run warns, trains on eagerly and
    ends where the eager run ends."""
    from tunesmith.train import graphs

    eager, eager_params, _ = _train_tiny_on_cuda(False)
    plain = graphs.plan_loss

    def reads_on_the_host(model, **tensors):
        loss = plain(model, **tensors)
        float(loss)  # a host read: not allowed while a graph records
        return loss

    monkeypatch.setattr(graphs, "plan_loss", reads_on_the_host)
    ours, params, runner = _train_tiny_on_cuda(True)
    summary = runner.summary()
    assert summary["graphs"] == 0 and summary["failed"]
    assert "recording a CUDA graph failed" in capsys.readouterr().err
    assert ours == pytest.approx(eager, rel=1e-5)
    for a, b in zip(params, eager_params):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
