"""Swap a model's linear layers for bitsandbytes 4-bit layers (NF4 or FP4, optional double quantization).

QLoRA keeps the frozen base in 4 bits and computes in ``compute_dtype``; LoRA adapters wrap the 4-bit layers
(``LoRALinear`` works over ``Linear4bit``). What stays unquantized is explicit: every module that is not an
``nn.Linear`` (embeddings, norms) and the linear layers named in ``skip_modules`` (the output head by
default) — ``quantize_model`` returns that list so runs can report it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import nn

from tunesmith.errors import TunesmithError

STORAGE_DTYPES = {"uint8": torch.uint8, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass
class QuantSpec:
    quant_type: str = "nf4"  # nf4 | fp4
    double_quant: bool = True
    compute_dtype: torch.dtype = torch.float32
    storage: str = "uint8"  # a float storage dtype lets FSDP shard the packed weights like any other tensor
    blocksize: int = 64
    skip_modules: list[str] = field(default_factory=lambda: ["lm_head"])


@dataclass
class QuantizedModel:
    quantized: list[str]
    kept: dict[str, str]  # module name -> why it stays in 16/32-bit

    def summary(self) -> str:
        kinds = sorted({name.rsplit(".", 1)[-1] for name in self.quantized})
        by_reason: dict[str, list[str]] = {}
        for name, why in self.kept.items():
            by_reason.setdefault(why, []).append(name)
        kept = ", ".join(f"{names[0]} ({why})" if len(names) == 1 else f"{len(names)} layers ({names[0]}, …: {why})"
                         for why, names in by_reason.items())
        return (f"{len(self.quantized)} linear layers in 4 bits ({', '.join(kinds)}); kept unquantized: {kept}")


def quiet_bitsandbytes_import() -> None:
    """Call before anything imports bitsandbytes: its CPU backend then logs only errors.

    On CPUs with AVX512-BF16, importing bitsandbytes logs a warning that the optional ``kernels`` package (a
    faster Hub kernel) is missing; it falls back to its own kernel and the user has nothing to act on. Only
    that one logger is quietened, and only for warnings.
    """
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


def _bnb():
    quiet_bitsandbytes_import()
    try:
        import bitsandbytes
    except ImportError as exc:  # pragma: no cover - bitsandbytes is a dependency
        raise TunesmithError("QLoRA needs bitsandbytes: pip install bitsandbytes") from exc
    return bitsandbytes


def _skipped(name: str, skip: list[str]) -> bool:
    return any(name == s or name.endswith("." + s) for s in skip)


def quantize_model(model: nn.Module, spec: QuantSpec, device: torch.device | str = "cpu") -> QuantizedModel:
    """Replace each ``nn.Linear`` (not in ``spec.skip_modules``) by a frozen ``Linear4bit`` quantized on ``device``.

    Layers are quantized one at a time on ``device`` from the (CPU) model, so the device never holds more than
    one full-precision layer beyond the quantized model.
    """
    bnb = _bnb()
    if spec.quant_type not in ("nf4", "fp4"):
        raise TunesmithError(f"quant.type must be nf4 or fp4, got {spec.quant_type!r}")
    device = torch.device(device)
    quantized, kept = [], {}
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    for name, module in list(model.named_modules()):
        if type(module) is not nn.Linear:
            continue
        if _skipped(name, spec.skip_modules) or module is head and head.weight is getattr(
                model.get_input_embeddings(), "weight", None):
            kept[name] = "output head" if module is head else "skip_modules"
            continue
        layer = bnb.nn.Linear4bit(module.in_features, module.out_features, bias=module.bias is not None,
                                  compute_dtype=spec.compute_dtype, compress_statistics=spec.double_quant,
                                  quant_type=spec.quant_type, quant_storage=STORAGE_DTYPES[spec.storage],
                                  device="meta")
        layer.weight = bnb.nn.Params4bit(module.weight.data.detach().to("cpu"), requires_grad=False,
                                         blocksize=spec.blocksize, compress_statistics=spec.double_quant,
                                         quant_type=spec.quant_type,
                                         quant_storage=STORAGE_DTYPES[spec.storage]).to(device)
        keep_training_numerics(layer)
        problem = _kernel_disagrees(layer)
        if problem:
            kept[name] = problem
            continue
        if module.bias is not None:
            layer.bias = nn.Parameter(module.bias.data.to(device, spec.compute_dtype), requires_grad=False)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, layer)
        quantized.append(name)
    for name, module in model.named_modules():
        if isinstance(module, nn.Embedding):
            kept[name] = "embedding"
        elif "norm" in type(module).__name__.lower():
            kept.setdefault("norms", f"{type(module).__name__} ×{sum(1 for m in model.modules() if type(m) is type(module))}")
    model.to(device)
    if not quantized:
        raise TunesmithError("no linear layer was quantized; check quant.skip_modules")
    return QuantizedModel(quantized=quantized, kept=kept)


def keep_training_numerics(model: nn.Module) -> None:
    """Make bitsandbytes' 4-bit layers compute the same way in eval mode as in training.

    On CPUs with AVX512-BF16, ``Linear4bit`` repacks its weight the first time it runs in eval mode without
    gradients, rounding the block scales to bf16 (and failing on rows shorter than a block). An evaluation
    in the middle of a run would then change the function the rest of the run trains — and a resumed run
    would differ from an uninterrupted one depending on the machine. The repack is turned off.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def _kernel_disagrees(layer: nn.Module) -> str | None:
    """Why this device's 4-bit kernel cannot be trusted with ``layer``, or None when it decodes its own codes.

    bitsandbytes' CPU kernel (0.50) dequantizes blocks row by row while quantizing over the flattened weight, so
    a weight whose rows are not a whole number of blocks comes back wrong — silently, in the forward pass too.
    The check decodes the stored codes with the plain-PyTorch reference and compares with the kernel's output.
    """
    import bitsandbytes.functional as bf

    from tunesmith.quant.nf4 import dequantize_bnb

    weight = layer.weight
    got = bf.dequantize_4bit(weight.data, weight.quant_state).float()
    want = dequantize_bnb(weight.data, weight.quant_state)
    error = (got - want).abs().max().item()
    if error <= 4 * torch.finfo(weight.quant_state.dtype).eps * want.abs().max().item():
        return None
    return (f"the {weight.device.type} 4-bit kernel mis-decodes rows of {layer.in_features} values in blocks of "
            f"{weight.quant_state.blocksize} (max error {error:.2g}); kept in full precision")


def dequantized_weight(layer: nn.Module) -> torch.Tensor:
    """The full-precision weight a 4-bit layer computes with (dequant of its NF4/FP4 codes)."""
    return dequantize(layer.weight)


def dequantize(weight: torch.Tensor) -> torch.Tensor:
    """A 4-bit weight's values in its compute dtype, by bitsandbytes' own kernel; a float weight as it is."""
    if not is_4bit(weight):
        return weight.data
    import bitsandbytes.functional as bf

    return bf.dequantize_4bit(weight.data, weight.quant_state).to(weight.quant_state.dtype)


def is_4bit(weight: torch.Tensor) -> bool:
    return getattr(weight, "quant_state", None) is not None


def is_quantized(layer: nn.Module) -> bool:
    return is_4bit(layer.weight)
