"""The merged model's state dict, computed from a model with ``LoRALinear`` layers without changing it."""

from __future__ import annotations

import torch
from torch import nn

from tunesmith.peft.lora import LoRALinear, lora_modules


def _owning_adapter(key: str, adapters: dict[str, LoRALinear]) -> tuple[str, str] | None:
    """(module path, rest of the key) when ``key`` belongs to a LoRALinear, else None.

    Walks up the key's components rather than splitting on a name fragment, because quantized weights carry
    dotted suffixes (``weight.absmax``) and a module path may itself contain any word.
    """
    parts = key.split(".")
    for i in range(len(parts) - 1, 0, -1):
        prefix = ".".join(parts[:i])
        if prefix in adapters:
            return prefix, ".".join(parts[i:])
    return None


def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict of the merged model, keyed as the unwrapped model (``...q_proj.weight``).

    Pure: the model is not changed. Merged weights are new tensors; every other entry is the model's own
    tensor, detached (shared storage, no copy), so the result costs one extra copy of the adapted weights only.
    """
    adapters = lora_modules(model)
    merged = {}
    for key, tensor in model.state_dict(keep_vars=False).items():
        owner = _owning_adapter(key, adapters)
        if owner is None:
            merged[key] = tensor
            continue
        module_name, rest = owner
        child, _, param_name = rest.partition(".")
        if child != "base_layer":
            continue
        if param_name == "weight":
            merged[f"{module_name}.weight"] = adapters[module_name].merged_weight()
        else:
            merged[f"{module_name}.{param_name}"] = tensor
    return merged
