"""The products through frozen weights while a LoRA run trains: exact, or in bf16 where the CPU multiplies bf16
natively (``train.forward_products``, ``train.backward_products``).

In a LoRA step the base weights do not train, yet nearly all of the step's arithmetic is theirs: every adapted
layer's forward computes ``Y = X Wᵀ``, its backward ``∂L/∂X = G W`` (G = ∂L/∂Y), and the output head's backward
``∂L/∂H = (softmax − onehot) W``. The backward's products only carry the gradient on towards the adapters below;
the forward's feed the loss the step descends.

    exact  in the model's dtype: the plain path's bits
    bf16   both factors rounded to bfloat16, multiplied with float32 accumulation (oneDNN on the CPU), the
           result back in float32. On a CPU with AVX512-BF16 or AMX these products run 2-4.8x faster; each is
           within about 3e-3 of the exact one (relative, measured: bf16's 8-bit mantissa on both factors)
    auto   bf16 on such a CPU for a float32 model whose frozen layers are plain linear layers (LoRA over an
           fp32 base), else exact; for the forward, also only under the supervised objective

What bf16 leaves exact: every evaluation (the held-out loss before, during and after training, the answers, the
report), since the forward's bf16 products run only under autograd, while a step trains; the adapters' own
products (``X Aᵀ``, ``(X Aᵀ) Bᵀ`` and the gradients ``∂L/∂A``, ``∂L/∂B``, formed in float32 from G and the
activations the forward saved); the head's logits; attention, norms and the residual stream; the optimizer. The
training losses logged each step come from the bf16 forward.

A preference objective (DPO) compares the policy's log-probabilities with its reference's, computed without
grad, hence exact: the policy's in bf16 would differ from the reference by bf16's rounding at step 0, where the two
must agree, so ``auto`` keeps that forward exact and an explicit ``bf16`` is refused.

``bf16`` is a CPU setting: on a GPU a run computes in bf16 as a whole (``model.dtype``), and the memory
planner (``plan/``) counts no bf16 copies. The bf16 copies of the frozen weights (half their fp32 size, one copy
shared by both settings) are made once, before the first step, set on the modules as ``forward_weight`` /
``backward_weight``, and removed when training ends, so nothing after training (saving, merging, evaluating,
serving) sees them. BENCHMARKS.md has what they measured on the demo.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

from tunesmith.errors import TunesmithError
from tunesmith.peft.lora import LoRALinear, lora_modules

BACKWARD_WEIGHT = "backward_weight"
FORWARD_WEIGHT = "forward_weight"
_NATIVE_FLAGS = ("avx512_bf16", "amx_bf16")


def native_bf16_cpu(cpuinfo: str | None = None) -> bool:
    """Whether this CPU multiplies bf16 in hardware (AVX512-BF16 or AMX-BF16 in ``/proc/cpuinfo``'s flags).
    Elsewhere PyTorch emulates bf16 products, which makes them slower than float32; macOS and Windows read as
    False (no bf16 products chosen by ``auto`` there)."""
    if cpuinfo is None:
        if not sys.platform.startswith("linux"):
            return False
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
    flags = set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags.update(line.partition(":")[2].split())
    return any(flag in flags for flag in _NATIVE_FLAGS)


def _frozen_linear(module: nn.Module) -> bool:
    return (type(module) is nn.Linear and not module.weight.requires_grad and module.weight.dtype == torch.float32)


def frozen_layers(model: nn.Module) -> list[tuple[nn.Module, torch.Tensor]]:
    """``(module, its frozen weight)`` for each module whose products can run in bf16: each adapted layer over a
    frozen fp32 ``nn.Linear`` (its ``LoRALinear``), and a plain frozen fp32 output head (backward only)."""
    layers = [(module, module.base_layer.weight) for module in lora_modules(model).values()
              if _frozen_linear(module.base_layer)]
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and _frozen_linear(head) and head.bias is None:
        layers.append((head, head.weight))
    return layers


def _choose(setting: str, requested: str, has_layers: bool, device: torch.device, native: bool,
            preference: bool) -> dict:
    key = f"train.{setting}"
    if requested == "exact":
        return {"name": "exact", "reason": f"{key}=exact"}
    if requested == "bf16":
        if device.type != "cpu":
            raise TunesmithError(f"{key}=bf16 is a CPU setting; this run is on {device.type}, where a run computes "
                                 f"in bf16 as a whole (model.dtype=bf16): use {key}=auto or exact")
        if not has_layers:
            raise TunesmithError(f"{key}=bf16 acts on frozen float32 linear layers (LoRA over an fp32 base); this "
                                 f"model has none (full fine-tuning, QLoRA or a bf16/fp16 model): use {key}=exact "
                                 "or auto")
        if preference:
            raise TunesmithError(f"{key}=bf16 is refused under method.objective=dpo: the reference model's "
                                 "log-probabilities are computed exactly, and a policy forward in bf16 would "
                                 f"differ from them before any update; use {key}=exact or auto")
        return {"name": "bf16", "reason": f"{key}=bf16"}
    if device.type != "cpu":
        return {"name": "exact", "reason": f"auto on {device.type}: bf16 products are chosen on CPUs only"}
    if not has_layers:
        return {"name": "exact", "reason": "auto: no frozen float32 linear layers"}
    if preference:
        return {"name": "exact", "reason": "auto: a preference objective compares the policy with its exact "
                                           "reference"}
    if not native:
        return {"name": "exact", "reason": "auto: this CPU has no native bf16 products (AVX512-BF16 / AMX)"}
    return {"name": "bf16", "reason": "auto: a CPU with native bf16 products, LoRA over a float32 base"}


def choose_products(train, model: nn.Module, device: torch.device, *, objective: str = "sft",
                    native: bool | None = None) -> dict:
    """``{"forward": choice, "backward": choice}``, each ``{"name": "exact" | "bf16", "reason": ...}``
    (``summary.json``'s ``"forward_products"`` and ``"backward_products"``) from ``train`` (the config's train
    section, or anything with ``forward_products`` and ``backward_products``). An explicit ``bf16`` that has
    nothing to act on is refused here, before the run dir is made. ``native`` overrides the CPU check (tests)."""
    if native is None:
        native = device.type == "cpu" and native_bf16_cpu()  # read once, for both settings
    layers = frozen_layers(model)
    adapted = any(isinstance(module, LoRALinear) for module, _ in layers)
    return {"forward": _choose("forward_products", train.forward_products, adapted, device, native,
                               objective != "sft"),
            "backward": _choose("backward_products", train.backward_products, bool(layers), device, native, False)}


def install_products(model: nn.Module, products: dict | None) -> None:
    """Give each frozen layer its bf16 weight for the products ``products`` (from ``choose_products``; None:
    exact) puts in bf16: one copy per layer, for the forward (adapted layers) and the backward. Called once,
    before the first training forward."""
    forward = bool(products) and products["forward"]["name"] == "bf16"
    backward = bool(products) and products["backward"]["name"] == "bf16"
    if not (forward or backward):
        return
    for module, weight in frozen_layers(model):
        adapted = isinstance(module, LoRALinear)
        if not (backward or adapted):
            continue
        low = weight.detach().to(torch.bfloat16)
        if backward:
            setattr(module, BACKWARD_WEIGHT, low)
        if forward and adapted:
            setattr(module, FORWARD_WEIGHT, low)


def remove_products(model: nn.Module) -> None:
    """Drop every bf16 copy (training has ended: a merge or a new run must never read a stale one)."""
    for module in model.modules():
        for name in (FORWARD_WEIGHT, BACKWARD_WEIGHT):
            if name in vars(module):
                delattr(module, name)


def backward_product(grad: torch.Tensor, weight: torch.Tensor, low: torch.Tensor | None) -> torch.Tensor:
    """``grad @ weight``: exact, or through ``low`` (``weight`` in bf16) with the result in ``grad``'s dtype."""
    if low is None:
        return grad @ weight
    return (grad.to(low.dtype) @ low).to(grad.dtype)
