"""The products that carry the gradient back through frozen weights: exact, or in bf16 where the CPU multiplies
bf16 natively (``train.backward_products``).

In a LoRA step the base weights do not train, yet half of the step's arithmetic is theirs: every adapted layer's
backward computes ``∂L/∂X = G W`` (G = ∂L/∂Y, W its frozen weight), and the output head's backward computes
``∂L/∂H = (softmax − onehot) W``. Those products only carry the gradient on towards the adapters below; nothing
else reads them.

    exact  in the model's dtype: the plain path's bits
    bf16   G and W rounded to bfloat16, multiplied with float32 accumulation (oneDNN on the CPU), the result
           back in float32. On a CPU with AVX512-BF16 or AMX these products run about 2× faster; each is within
           about 3e-3 of the exact one (relative, measured: bf16's 8-bit mantissa on both factors)
    auto   bf16 on such a CPU for a float32 model whose frozen layers are plain linear layers (LoRA over an
           fp32 base), else exact

``bf16`` is a CPU setting: on a GPU a run computes in bf16 as a whole (``model.dtype``), and the memory
planner (``plan/``) counts no bf16 copies.

What bf16 leaves exact: the forward pass, hence every logged loss and every evaluation; the adapters' own
gradients, formed in float32 from G and the activations the forward saved (``∂L/∂A``, ``∂L/∂B``); the
optimizer. The bf16 copies of the frozen weights (half their fp32 size) are made once, before the first step,
set on the modules as ``backward_weight``, and removed when training ends, so nothing after training (saving,
merging, evaluating, serving) sees them. BENCHMARKS.md has what it measured on the demo.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

from tunesmith.errors import TunesmithError
from tunesmith.peft.lora import lora_modules

BACKWARD_WEIGHT = "backward_weight"
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
    """``(module, its frozen weight)`` for each module whose backward product can run in bf16: each adapted layer
    over a frozen fp32 ``nn.Linear`` (its ``LoRALinear``), and a plain frozen fp32 output head."""
    layers = [(module, module.base_layer.weight) for module in lora_modules(model).values()
              if _frozen_linear(module.base_layer)]
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and _frozen_linear(head) and head.bias is None:
        layers.append((head, head.weight))
    return layers


def choose_backward_products(requested: str, model: nn.Module, device: torch.device, *,
                             native: bool | None = None) -> dict:
    """``{"name": "exact" | "bf16", "reason": ...}`` (``summary.json``'s ``"backward_products"``); an explicit
    ``bf16`` that has nothing to act on is refused here, before the run dir is made. ``native`` overrides the
    CPU check (tests)."""
    layers = frozen_layers(model)
    if requested == "exact":
        return {"name": "exact", "reason": "train.backward_products=exact"}
    if requested == "bf16":
        if device.type != "cpu":
            raise TunesmithError(f"train.backward_products=bf16 is a CPU setting; this run is on {device.type}, where "
                                 "a run computes in bf16 as a whole (model.dtype=bf16): use "
                                 "train.backward_products=auto or exact")
        if not layers:
            raise TunesmithError("train.backward_products=bf16 acts on frozen float32 linear layers (LoRA over an "
                                 "fp32 base); this model has none (full fine-tuning, QLoRA or a bf16/fp16 model): "
                                 "use train.backward_products=exact or auto")
        return {"name": "bf16", "reason": "train.backward_products=bf16"}
    if device.type != "cpu":
        return {"name": "exact", "reason": f"auto on {device.type}: bf16 products are chosen on CPUs only"}
    if not layers:
        return {"name": "exact", "reason": "auto: no frozen float32 linear layers"}
    if not (native_bf16_cpu() if native is None else native):
        return {"name": "exact", "reason": "auto: this CPU has no native bf16 products (AVX512-BF16 / AMX)"}
    return {"name": "bf16", "reason": "auto: a CPU with native bf16 products, LoRA over a float32 base"}


def install_backward_products(model: nn.Module, choice: dict) -> None:
    """Give each frozen layer its bf16 weight for the backward (``choice`` from ``choose_backward_products``);
    exact: nothing. Called once, before the first training forward."""
    if choice["name"] != "bf16":
        return
    for module, weight in frozen_layers(model):
        setattr(module, BACKWARD_WEIGHT, weight.detach().to(torch.bfloat16))


def remove_backward_products(model: nn.Module) -> None:
    """Drop every bf16 copy (training has ended: a merge or a new run must never read a stale one)."""
    for module in model.modules():
        if BACKWARD_WEIGHT in vars(module):
            delattr(module, BACKWARD_WEIGHT)


def backward_product(grad: torch.Tensor, weight: torch.Tensor, low: torch.Tensor | None) -> torch.Tensor:
    """``grad @ weight``: exact, or through ``low`` (``weight`` in bf16) with the result in ``grad``'s dtype."""
    if low is None:
        return grad @ weight
    return (grad.to(low.dtype) @ low).to(grad.dtype)
