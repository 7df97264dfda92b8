"""The one builder of "model + tokenizer + chat template (+ 4-bit base) (+ adapter)" from the typed config.

Every verb that needs a model gets it here — train (``recipes/setup.py``), eval, merge, chat and compare —
from a ``ModelConfig`` (a run's ``model`` section, or the command line's flags made into one by
``model_from_flags``), so the template, dtype, device, QLoRA quantization and the remote-code permission are
applied the same way everywhere instead of each verb assembling them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from pydantic import ValidationError

from tunesmith.config import ModelConfig, QuantSection
from tunesmith.errors import TunesmithError
from tunesmith.models.load import load, load_tokenizer, resolve_device, resolve_dtype
from tunesmith.quant.bnb import QuantizedModel, QuantSpec, quantize_model
from tunesmith.templates import use_template


@dataclass
class BuiltModel:
    model: torch.nn.Module
    tokenizer: object
    device: torch.device
    dtype: torch.dtype
    quantization: QuantizedModel | None = None  # what went to 4 bits (QLoRA), else None


def model_from_flags(source: str, *, template: str | None = None, dtype: str = "auto", device: str = "auto",
                     trust_remote_code: bool = False) -> ModelConfig:
    """The command line's model flags (chat, compare) as the typed section a run config holds."""
    resolve_device(device)  # first, so a bad --device gets the error that names the flag
    try:
        return ModelConfig(source=source, template=template, dtype=dtype, device=device,
                           trust_remote_code=trust_remote_code)
    except ValidationError as exc:
        problems = "; ".join(f"--{'.'.join(map(str, e['loc']))}: {e['msg'].removeprefix('Value error, ')}"
                             for e in exc.errors())
        raise TunesmithError(problems) from None


_DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def build_tokenizer(model: ModelConfig):
    """The model's tokenizer with the chat template the run uses (its own, or ``model.template``)."""
    tokenizer = load_tokenizer(model.source, trust_remote_code=model.trust_remote_code)
    use_template(tokenizer, model.template)
    return tokenizer


def quant_spec(quant: QuantSection, device: torch.device) -> QuantSpec:
    """The bitsandbytes settings of a config's ``quant`` section on ``device`` (compute dtype resolved)."""
    compute = quant.compute_dtype
    if compute == "auto":
        compute_dtype = resolve_dtype("auto", device) if device.type == "cuda" else torch.float32
        if device.type == "cuda" and compute_dtype == torch.float32:
            compute_dtype = torch.float16
    else:
        compute_dtype = resolve_dtype(compute, device)
    return QuantSpec(quant_type=quant.type, double_quant=quant.double_quant, compute_dtype=compute_dtype,
                     storage=quant.storage, blocksize=quant.blocksize, skip_modules=list(quant.skip_modules))


def quantize_base(quant: QuantSection, model: torch.nn.Module, device: torch.device) -> QuantizedModel:
    """QLoRA: the frozen base in 4 bits on ``device``; prints what was quantized and what was kept."""
    quantized = quantize_model(model, quant_spec(quant, device), device)
    print(f"{quant.type}{' + double quantization' if quant.double_quant else ''}: {quantized.summary()}")
    return quantized


def build_model(model: ModelConfig, *, quant: QuantSection | None = None, adapter: str | Path | None = None,
                adjust: Callable[[torch.nn.Module], None] | None = None, tokenizer=None,
                allow_no_template: bool = False) -> BuiltModel:
    """Load ``model.source`` on ``model.device`` in ``model.dtype`` with its template; then, in this order:

    - ``adjust(model)`` may change the dense weights (a DPO run stacking on an SFT adapter folds it in);
    - ``quant`` (QLoRA) puts the base in 4 bits — loaded on the CPU first, so the full-precision copy never
      has to fit on the GPU;
    - ``adapter`` (a PEFT adapter dir) is loaded over it for inference; training adds its own trainable one.

    ``tokenizer``: one already built by ``build_tokenizer`` (training tokenizes its data before the model
    loads, so a bad dataset is refused early); it is used instead of loading a second copy.
    ``allow_no_template``: a model with no chat template of its own and no ``model.template`` is kept as it is
    (compare prompts a base model with raw text) instead of refused.
    The model is returned in eval mode.
    """
    device = resolve_device(model.device)
    # A QLoRA base loads on the CPU in the dtype it computes in on the device (bf16 on a GPU, not the CPU's
    # fp32): the 4-bit blocks then dequantize straight to it, and the kept layers (embeddings, norms, head)
    # need no cast at every call. Measured on an H200: fp32 there made dtype copies a quarter of kernel time.
    dtype = model.dtype if quant is None else _DTYPE_NAMES[resolve_dtype(model.dtype, device)]
    loaded = load(model.source, dtype=dtype, device="cpu" if quant is not None else model.device,
                  trust_remote_code=model.trust_remote_code, tokenizer=tokenizer)
    if tokenizer is None and not (allow_no_template and model.template is None):
        use_template(loaded.tokenizer, model.template)
    if adjust is not None:
        adjust(loaded.model)
    quantization = quantize_base(quant, loaded.model, device) if quant is not None else None
    if adapter is not None:
        from tunesmith.peft.io import load_adapter

        load_adapter(loaded.model, adapter)
        loaded.model.eval()
    return BuiltModel(model=loaded.model, tokenizer=loaded.tokenizer, device=device,
                      dtype=resolve_dtype(model.dtype, device), quantization=quantization)
