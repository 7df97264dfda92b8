"""Row attention for the flat layout: the same attention as SDPA over the block-masked flat sequence."""

import pytest
import torch
import torch.nn.functional as F

from tunesmith.train import rows as row_module
from tunesmith.train.rows import Rows, install_row_attention, row_attention_forward


def _block_mask(prefix: int, lengths: list[int]) -> torch.Tensor:
    segment = torch.cat([torch.full((prefix,), -1)] + [torch.full((n,), i) for i, n in enumerate(lengths)])
    order = torch.arange(len(segment))
    return (order[None] <= order[:, None]) & ((segment[None] == segment[:, None]) | (segment[None] < 0))


@pytest.mark.parametrize("prefix", [0, 5, 9])  # 9: a prefix longer than every row
def test_row_attention_equals_masked_sdpa(prefix):
    lengths = [3, 7, 1, 4]
    n, heads, kv_heads, dim = prefix + sum(lengths), 4, 2, 8
    torch.manual_seed(0)
    q = torch.randn(1, heads, n, dim, requires_grad=True)
    k = torch.randn(1, kv_heads, n, dim, requires_grad=True)
    v = torch.randn(1, kv_heads, n, dim, requires_grad=True)
    grad_out = torch.randn(1, n, heads, dim)
    ours, _ = row_attention_forward(None, q, k, v, None, scaling=0.3,
                                    tunesmith_rows=Rows.from_lengths(prefix, lengths, "cpu"))
    ours_grads = torch.autograd.grad((ours * grad_out).sum(), (q, k, v))
    reference = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
                                               attn_mask=_block_mask(prefix, lengths), scale=0.3).transpose(1, 2)
    reference_grads = torch.autograd.grad((reference * grad_out).sum(), (q, k, v))
    torch.testing.assert_close(ours, reference, atol=1e-6, rtol=1e-5)
    for a, b in zip(ours_grads, reference_grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_flat_layout_uses_row_attention_once_per_layer(tiny_model, monkeypatch):
    from tunesmith.train.loss import supervised_loss_sum

    calls = []

    def counting(*args, **kwargs):
        calls.append(kwargs.get("tunesmith_rows") is not None)
        return row_attention_forward(*args, **kwargs)

    monkeypatch.setattr(row_module, "row_attention_forward", counting)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16], [5, 6, 7, 8, 9, 10, 11, 12, 13, 20, 2, 2]])
    mask = torch.tensor([[1] * 12, [1] * 10 + [0, 0]])
    batch = {"input_ids": ids, "attention_mask": mask,
             "labels": torch.where((torch.arange(12) >= 9) & mask.bool(), ids, -100)}
    supervised_loss_sum(tiny_model, batch, layout="rows")
    assert calls == []  # not installed: the row plan is ignored and SDPA runs the masked sequence
    install_row_attention(tiny_model)
    supervised_loss_sum(tiny_model, batch, layout="rows")
    assert calls == [True, True]  # two layers, both with the row layout
    supervised_loss_sum(tiny_model, batch, layout="flat")
    assert calls == [True, True, False, False]  # no row plan in the call: SDPA inside the installed function
    assert tiny_model.config._attn_implementation == row_module.NAME  # installed once, never flipped back


def test_sliding_window_or_softcapping_models_are_not_flattened():
    from tunesmith.train.decoder import plain_causal_attention as _plain_causal_attention
    from tinymodels import build_tiny_llama

    config = build_tiny_llama().config
    assert _plain_causal_attention(config, 100)
    config.sliding_window = 64  # a window shorter than the rows: the flat mask would let rows see too far back
    assert not _plain_causal_attention(config, 100) and _plain_causal_attention(config, 64)
    config.sliding_window, config.attn_logit_softcapping = None, 50.0
    assert not _plain_causal_attention(config, 10)
