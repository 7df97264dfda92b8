"""The fused, chunked output head + cross-entropy equals the plain one in value and gradients."""

import pytest
import torch
import torch.nn.functional as F

from tunesmith.train.head import linear_cross_entropy


def _plain(hidden, weight, targets, softcap, scales=None):
    logits = (hidden @ weight.t()).float()
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    if scales is not None:
        return (F.cross_entropy(logits, targets, reduction="none") * scales).sum()
    return F.cross_entropy(logits, targets, reduction="sum")


@pytest.mark.parametrize("scaled", [False, True])
@pytest.mark.parametrize("softcap", [None, 5.0])
@pytest.mark.parametrize("chunk", [3, 7, 256])
def test_matches_plain_loss_and_gradients(softcap, chunk, scaled):
    torch.manual_seed(0)
    hidden = torch.randn(10, 16, requires_grad=True)
    weight = torch.randn(50, 16, requires_grad=True)
    targets = torch.randint(0, 50, (10,))
    # per-position scales as train.graphs uses them: some positions weigh nothing
    scales = torch.tensor([0.0, 0.5, 0.5, 0.0, 2.0, 0.5, 0.0, 1.0, 0.5, 0.25]) if scaled else None
    grads = []
    for fn in (lambda: linear_cross_entropy(hidden, weight, targets, softcap=softcap, chunk=chunk, scales=scales),
               lambda: _plain(hidden, weight, targets, softcap, scales)):
        loss = fn() * 0.37  # a non-unit upstream gradient
        hidden.grad = weight.grad = None
        loss.backward()
        grads.append((loss.detach(), hidden.grad.clone(), weight.grad.clone()))
    for ours, ref in zip(*grads):
        torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


def test_frozen_weight_gets_no_gradient_and_no_grad_mode_works():
    torch.manual_seed(1)
    hidden = torch.randn(4, 8, requires_grad=True)
    weight = torch.randn(20, 8)
    targets = torch.tensor([0, 5, 19, 7])
    loss = linear_cross_entropy(hidden, weight, targets, chunk=2)
    loss.backward()
    assert weight.grad is None and hidden.grad.shape == (4, 8)
    with torch.no_grad():
        value = linear_cross_entropy(hidden, weight, targets)
    torch.testing.assert_close(value, _plain(hidden, weight, targets, None).detach())
    assert float(linear_cross_entropy(hidden[:0], weight, targets[:0])) == 0.0


@pytest.mark.parametrize("softcap", [None, 5.0])
def test_picks_are_the_argmax_of_the_plain_logits(softcap):
    torch.manual_seed(1)
    hidden, weight = torch.randn(9, 16), torch.randn(50, 16)
    targets = torch.randint(0, 50, (9,))
    picks = torch.full((9,), -1)
    with torch.no_grad():
        loss = linear_cross_entropy(hidden, weight, targets, softcap=softcap, chunk=4, picks=picks)
    logits = hidden @ weight.t()
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    assert picks.tolist() == logits.argmax(dim=1).tolist()
    torch.testing.assert_close(loss, _plain(hidden, weight, targets, softcap))
