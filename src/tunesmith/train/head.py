"""Output head and cross-entropy in one pass over chunks of positions, never holding all the logits.

For hidden states H (n×d), head weight W (V×d) and targets y, the summed loss is

    L = Σᵢ [ logsumexp(zᵢ) − zᵢ[yᵢ] ],    zᵢ = W hᵢ   (optionally soft-capped: c · tanh(zᵢ / c))

and its gradients are ∂L/∂zᵢ = softmax(zᵢ) − onehot(yᵢ), ∂L/∂hᵢ = Wᵀ ∂L/∂zᵢ, ∂L/∂W = Σᵢ ∂L/∂zᵢ hᵢᵀ.
The forward pass computes them chunk by chunk (a chunk's logits are the only vocabulary-sized tensor alive)
and keeps ∂L/∂H (n×d) and, when W trains, ∂L/∂W; the backward pass only scales them by the incoming
gradient. With a 49k-token vocabulary this skips materialising, soft-maxing and zero-filling an n×V
logits tensor and its gradient, which is a large share of a small model's step.
"""

from __future__ import annotations

import torch

from tunesmith.train.products import backward_product

CHUNK_POSITIONS = 256


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, softcap: float | None,
                chunk: int, with_grad: bool, scales: torch.Tensor | None, picks: torch.Tensor | None,
                low: torch.Tensor | None) -> torch.Tensor:
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if with_grad else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if with_grad and weight.requires_grad else None
        for start in range(0, hidden.shape[0], chunk):
            h = hidden[start:start + chunk]
            y = targets[start:start + chunk]
            s = None if scales is None else scales[start:start + chunk, None]
            # One vocabulary-sized buffer per chunk, transformed in place: logits -> exp -> softmax -> ∂L/∂z
            # (fresh temporaries of this size each cost a pass over memory plus page faults on CPU).
            z = (h @ weight.t()).float()
            if softcap:
                z.div_(softcap).tanh_()
                tanh = z.clone() if with_grad else None
                z.mul_(softcap)
            if picks is not None:  # the greedy token at each position, from the logits a generator would see
                picks[start:start + chunk] = z.argmax(dim=1)
            picked = z.gather(1, y[:, None]).squeeze(1)
            peak = z.amax(dim=1, keepdim=True)
            norm = z.sub_(peak).exp_().sum(dim=1, keepdim=True)  # z now holds exp(z - max)
            losses = peak + norm.log() - picked[:, None]
            total += (losses if s is None else losses * s).sum()
            if not with_grad:
                continue
            grad = z.div_(norm)  # softmax
            grad[torch.arange(len(y), device=y.device), y] -= 1.0
            if softcap:
                grad.mul_(1.0 - tanh.square_())  # d(c·tanh(x/c))/dx = 1 − tanh²
            if s is not None:
                grad.mul_(s)
            grad_hidden[start:start + chunk] = backward_product(grad.to(weight.dtype), weight, low).to(hidden.dtype)
            if grad_weight is not None:
                grad_weight += grad.t() @ h.float()
        if with_grad:
            ctx.save_for_backward(grad_hidden, grad_weight if grad_weight is not None else torch.empty(0))
        ctx.weight_dtype = weight.dtype
        ctx.weight_grad = grad_weight is not None
        return total

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        dh = grad_hidden * grad_output.to(grad_hidden.dtype)
        dw = (grad_weight * grad_output).to(ctx.weight_dtype) if ctx.weight_grad else None
        return dh, dw, None, None, None, None, None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                         softcap: float | None = None, chunk: int = CHUNK_POSITIONS,
                         scales: torch.Tensor | None = None, picks: torch.Tensor | None = None,
                         backward_weight: torch.Tensor | None = None) -> torch.Tensor:
    """Summed cross-entropy of ``hidden @ weight.T`` against ``targets`` (see the module docstring); with
    ``scales`` (n, float32) each position's term is multiplied by its scale (0: the position carries no loss),
    so a batch of fixed shape can hold positions that do not train (``train.graphs``). ``picks`` (n, long) is
    filled with each position's greedy token (the argmax of its soft-capped logits, lowest id on ties).
    ``backward_weight`` (``weight`` in bf16, ``train/products.py``): ∂L/∂H from bf16 factors; the loss is exact."""
    if hidden.shape[0] == 0:
        return hidden.sum() * 0.0
    with_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    return _LinearCrossEntropy.apply(hidden, weight, targets, softcap, chunk, with_grad, scales, picks,
                                     backward_weight)
