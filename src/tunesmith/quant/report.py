"""``tunesmith quantize report``: what each weight precision costs in memory and in quality, for one model.

Three measurements, per format (fp32, bf16, int8, FP4, NF4, NF4 + double quantization):

- **Footprint.** Bits actually stored for the model's weights, scales included: the quantized formats apply
  to the linear layers QLoRA quantizes (every ``nn.Linear`` but the output head); embeddings, the head and
  norms stay in bf16 (fp32 in the fp32 row). Per layer of n weights in blocks of 64:

      int8      8·n + 32·rows                      (one fp32 absmax per output row)
      FP4/NF4   4·n + 32·⌈n/64⌉                    (one fp32 absmax per block)
      NF4 + DQ  4·n + 8·b + 32·⌈b/256⌉ + 32        (b = ⌈n/64⌉ block scales as 8-bit codes, one fp32 absmax
                                                    per 256 of them, and the scales' mean)

  The nominal bits per weight (whole blocks, from ``nf4.bits_per_parameter``) are reported beside them: 4.5
  and 4.127, a double-quantization saving of 0.373 bits.
- **Reconstruction error.** ‖W − deq(q(W))‖ / ‖W‖ per layer type (q_proj, down_proj, …), summed over layers.
  The 4-bit codes are bitsandbytes' own; they are decoded with the plain-PyTorch reference, which is exact on
  every shape (bitsandbytes' CPU kernel is not, see ``quant.bnb``).
- **Perplexity.** Held-out loss of the model with its linear weights replaced by their dequantized values
  (computation in fp32, so only the weights' precision changes).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from tunesmith.quant import nf4

FORMATS = ("fp32", "bf16", "int8", "fp4", "nf4", "nf4+dq")
BLOCK, BLOCK2 = 64, 256


def quantizable_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """The linear layers QLoRA quantizes: every ``nn.Linear`` except the output head."""
    head = model.get_output_embeddings()
    return {name: module for name, module in model.named_modules()
            if type(module) is nn.Linear and module is not head}


def stored_bits(fmt: str, out_features: int, in_features: int, blocksize: int = BLOCK) -> int:
    """Bits stored for one weight matrix in ``fmt``, scales included (see the module docstring; the 4-bit
    formats with one absmax per ``blocksize`` weights)."""
    n = out_features * in_features
    blocks = math.ceil(n / blocksize)
    return {
        "fp32": 32 * n,
        "bf16": 16 * n,
        "int8": 8 * n + 32 * out_features,
        "fp4": 4 * n + 32 * blocks,
        "nf4": 4 * n + 32 * blocks,
        "nf4+dq": 4 * n + 8 * blocks + 32 * math.ceil(blocks / BLOCK2) + 32,
    }[fmt]


def nominal_bits(fmt: str) -> float:
    return {"fp32": 32.0, "bf16": 16.0, "int8": 8.0,
            "fp4": nf4.bits_per_parameter(blocksize=BLOCK), "nf4": nf4.bits_per_parameter(blocksize=BLOCK),
            "nf4+dq": nf4.bits_per_parameter(blocksize=BLOCK, double_quant=True, blocksize2=BLOCK2)}[fmt]


def footprint(model: nn.Module) -> dict:
    linears = quantizable_linears(model)
    shapes = [(m.out_features, m.in_features) for m in linears.values()]
    quantizable = sum(o * i for o, i in shapes)
    total = sum(p.numel() for p in model.parameters())
    rows = []
    for fmt in FORMATS:
        linear_bits = sum(stored_bits(fmt, o, i) for o, i in shapes)
        other_bits = (32 if fmt == "fp32" else 16) * (total - quantizable)
        rows.append({"format": fmt, "nominal_bits_per_weight": nominal_bits(fmt),
                     "linear_bits_per_weight": linear_bits / quantizable,
                     "bytes": (linear_bits + other_bits) // 8,
                     "bits_per_parameter": (linear_bits + other_bits) / total})
    return {"parameters": total, "quantized_parameters": quantizable, "formats": rows,
            "double_quant_saving_bits": nominal_bits("nf4") - nominal_bits("nf4+dq")}


def fake_quantize(weight: torch.Tensor, fmt: str) -> torch.Tensor:
    """``weight`` after a round trip through ``fmt`` (float32)."""
    weight = weight.detach().float()
    if fmt == "fp32":
        return weight.clone()
    if fmt == "bf16":
        return weight.to(torch.bfloat16).float()
    if fmt == "int8":
        scale = weight.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / 127
        return (weight / scale).round().clamp(-127, 127) * scale
    from tunesmith.quant.bnb import quiet_bitsandbytes_import

    quiet_bitsandbytes_import()
    import bitsandbytes.functional as bf

    packed, state = bf.quantize_4bit(weight, blocksize=BLOCK, quant_type=fmt[:3],
                                     compress_statistics=fmt.endswith("+dq"))
    return nf4.dequantize_bnb(packed, state).view_as(weight)


def reconstruction_errors(model: nn.Module) -> dict[str, dict[str, float]]:
    """Relative Frobenius error of each format per layer type, over all layers of that type."""
    sums: dict[str, dict[str, float]] = {}
    norms: dict[str, float] = {}
    for name, module in quantizable_linears(model).items():
        kind = name.rsplit(".", 1)[-1]
        weight = module.weight.detach().float()
        norms[kind] = norms.get(kind, 0.0) + float(weight.pow(2).sum())
        per_kind = sums.setdefault(kind, {})
        for fmt in FORMATS[2:]:
            per_kind[fmt] = per_kind.get(fmt, 0.0) + float((fake_quantize(weight, fmt) - weight).pow(2).sum())
    return {kind: {fmt: math.sqrt(err / norms[kind]) for fmt, err in per_kind.items()}
            for kind, per_kind in sums.items()}


def perplexities(model: nn.Module, examples: list[dict], pad_id: int) -> dict[str, dict]:
    """Held-out loss and perplexity with the linear weights at each precision (model restored afterwards)."""
    from tunesmith.eval.evaluate import heldout_loss

    linears = quantizable_linears(model)
    originals = {name: module.weight.data.clone() for name, module in linears.items()}
    results = {}
    try:
        for fmt in FORMATS:
            for name, module in linears.items():
                module.weight.data.copy_(fake_quantize(originals[name], fmt))
            metrics = heldout_loss(model, examples, pad_id=pad_id)
            results[fmt] = {"eval_loss": metrics["eval_loss"], "perplexity": metrics["perplexity"]}
    finally:
        for name, module in linears.items():
            module.weight.data.copy_(originals[name])
    return results


def quantization_report(source: str, *, data: str | None = "builtin:test", rows: int = 32,
                        max_length: int = 512, trust_remote_code: bool = False) -> dict:
    """Footprint, reconstruction error and held-out perplexity of ``source`` at each precision."""
    from tunesmith.data.pipeline import prepare
    from tunesmith.data.tokenize import TokenizeOptions
    from tunesmith.models import load

    loaded = load(source, dtype="fp32", device="cpu", trust_remote_code=trust_remote_code)
    model = loaded.model.eval()
    report = {"model": source, **footprint(model), "reconstruction_error": reconstruction_errors(model)}
    if data and rows > 0:
        prepared = prepare(data, loaded.tokenizer, TokenizeOptions(max_length=max_length), sample=rows, seed=0)
        report.update(data=data, rows=len(prepared.examples),
                      perplexity=perplexities(model, prepared.examples, loaded.tokenizer.pad_token_id))
    return report


def format_report(report: dict) -> str:
    lines = [f"{report['model']}: {report['parameters']:,} parameters, "
             f"{report['quantized_parameters']:,} in quantizable linear layers "
             "(the rest stay bf16: embeddings, output head, norms)", "",
             f"{'format':8} {'nominal b/w':>11} {'linear b/w':>10} {'model b/p':>9} {'weights':>10}"
             + (f" {'perplexity':>10}" if "perplexity" in report else "")]
    for row in report["formats"]:
        line = (f"{row['format']:8} {row['nominal_bits_per_weight']:11.3f} {row['linear_bits_per_weight']:10.3f} "
                f"{row['bits_per_parameter']:9.3f} {_size(row['bytes']):>10}")
        if "perplexity" in report:
            line += f" {report['perplexity'][row['format']]['perplexity']:10.3f}"
        lines.append(line)
    lines += ["", f"double quantization saves {report['double_quant_saving_bits']:.3f} bits per weight "
              "(nominal, whole blocks)"]
    if "perplexity" in report:
        lines.append(f"perplexity on {report['rows']} rows of {report['data']}, weights at each precision, "
                     "computed in fp32")
    kinds = report["reconstruction_error"]
    lines += ["", "relative weight error ‖W − deq(q(W))‖/‖W‖ per layer type",
              f"{'layer':12}" + "".join(f" {fmt:>8}" for fmt in FORMATS[2:])]
    for kind, errors in kinds.items():
        lines.append(f"{kind:12}" + "".join(f" {errors[fmt]:8.4f}" for fmt in FORMATS[2:]))
    return "\n".join(lines)


def _size(n_bytes: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n_bytes >= scale:
            return f"{n_bytes / scale:.1f} {unit}"
    return f"{n_bytes} B"
