"""NF4 and double quantization in plain PyTorch: the reference the bitsandbytes kernels are tested against.

**NF4 (4-bit NormalFloat).** Pretrained weights are close to normally distributed, so the 16 code values
are quantiles of N(0, 1) rather than evenly spaced numbers. To have an exact zero and use all 16 codes, the
positive and negative halves are built separately: with δ = ½(1/30 + 1/32) (half-way between the tail
probabilities of a 15- and a 16-level grid),

    positive: Φ⁻¹(pᵢ), pᵢ = 8 evenly spaced points from 1−δ down to (but not including) ½
    negative: −Φ⁻¹(qⱼ), qⱼ = 7 evenly spaced points from 1−δ down to (but not including) ½
    code    = sort({negative} ∪ {0} ∪ {positive}) / max  ∈ [−1, 1], 16 values

**Blockwise absmax.** A tensor is cut into blocks of B values (B = 64 in QLoRA). Each block stores its
absmax m = max|w| (fp32) and every value becomes the index of the code nearest to w / m (ties between two
codes go up). Dequantization is code[index] · m. Two indices pack into a byte, the first in the high nibble.

**Double quantization.** The absmax values cost 32 bits per block, 32/64 = 0.5 bits per weight. They are
quantized in turn: subtract their mean c, then quantize them blockwise (blocks of 256) to 8-bit indices
into a signed "dynamic" code (below), keeping one fp32 absmax per 256 scales. Per weight that is
8/64 + 32/(64·256) bits instead of 32/64: 0.5 − 0.127 = 0.373 bits saved (see ``bits_per_parameter``).

**The dynamic 8-bit code.** A sign bit, then a run of zero bits whose length e sets the decade 10^(e−6),
then a fraction: decade e holds 2^e values (the midpoints of 2^e equal steps of [0.1, 1]) scaled by
10^(e−6), for each sign, e = 0…6; plus the extra values of the all-zero-exponent case, 0 and 1. Sorted, these
are 256 numbers in [−1, 1], dense near zero where most normalised scales fall.
"""

from __future__ import annotations

import math

import torch

NF4_DELTA = 0.5 * (1 / 30 + 1 / 32)


def nf4_code() -> torch.Tensor:
    """The 16 NF4 values (float32, ascending, from −1 to 1, with an exact 0).

    Computed here in float64; bitsandbytes ships the same numbers as a float32 table, which agrees to
    within 3e-7 (float32 rounding of the published constants).
    """
    top = 1.0 - NF4_DELTA
    normal = torch.distributions.Normal(torch.tensor(0.0, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64))
    positive = normal.icdf(torch.linspace(top, 0.5, 9, dtype=torch.float64)[:-1])
    negative = -normal.icdf(torch.linspace(top, 0.5, 8, dtype=torch.float64)[:-1])
    values = torch.cat([negative, torch.zeros(1, dtype=torch.float64), positive]).float()
    values = values.sort().values
    return values / values.max()


def dynamic_code(exponent_bits: int = 7, total_bits: int = 8) -> torch.Tensor:
    """The signed dynamic 8-bit code used for double quantization (256 float32 values, ascending)."""
    values = []
    magnitude_bits = total_bits - 1
    for e in range(exponent_bits):
        steps = 2 ** (e + magnitude_bits - exponent_bits)
        edges = torch.linspace(0.1, 1.0, steps + 1, dtype=torch.float32)
        mids = ((edges[:-1] + edges[1:]) / 2).tolist()
        scale = 10.0 ** (e - (exponent_bits - 1))
        values += [scale * m for m in mids] + [-scale * m for m in mids]
    extra = 2 ** (magnitude_bits - exponent_bits) - 1
    if extra > 0:
        edges = torch.linspace(0.1, 1.0, extra + 1, dtype=torch.float32)
        mids = ((edges[:-1] + edges[1:]) / 2).tolist()
        scale = 10.0 ** (exponent_bits - 1 - (exponent_bits - 1))
        values += [scale * m for m in mids] + [-scale * m for m in mids]
    values += [0.0, 1.0]
    code = torch.tensor(values, dtype=torch.float32)
    missing = 2 ** total_bits - len(code)
    return torch.cat([code, torch.zeros(missing)]).sort().values


def _nearest(scaled: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """Index of the nearest code value (code ascending); a value exactly between two codes takes the upper."""
    midpoints = (code[:-1] + code[1:]) / 2
    return torch.bucketize(scaled, midpoints, right=False)


def quantize_blockwise(values: torch.Tensor, code: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (int64, flat) of the nearest ``code`` value to each value / its block's absmax, and the absmaxes."""
    flat = values.reshape(-1).float()
    pad = (-flat.numel()) % blocksize
    blocks = torch.nn.functional.pad(flat, (0, pad)).view(-1, blocksize)
    absmax = blocks.abs().amax(dim=1)
    scaled = (blocks / absmax.clamp(min=1e-38)[:, None]).clamp(-1, 1).reshape(-1)[:flat.numel()]
    return _nearest(scaled, code), absmax


def dequantize_blockwise(indices: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int,
                         shape: torch.Size) -> torch.Tensor:
    values = code[indices]
    pad = (-values.numel()) % blocksize
    blocks = torch.nn.functional.pad(values, (0, pad)).view(-1, blocksize) * absmax[:, None]
    return blocks.reshape(-1)[:math.prod(shape)].view(shape)


def pack_nibbles(indices: torch.Tensor) -> torch.Tensor:
    """Two 4-bit indices per byte, the first in the high nibble (odd counts get a zero nibble)."""
    idx = indices.to(torch.uint8)
    if idx.numel() % 2:
        idx = torch.cat([idx, idx.new_zeros(1)])
    return (idx[0::2] << 4) | idx[1::2]


def unpack_nibbles(packed: torch.Tensor, count: int) -> torch.Tensor:
    flat = packed.reshape(-1)
    return torch.stack([flat >> 4, flat & 0xF], dim=1).reshape(-1)[:count].long()


def quantize_nf4(weight: torch.Tensor, blocksize: int = 64, double_quant: bool = False,
                 blocksize2: int = 256) -> dict:
    """NF4-quantize ``weight``: packed codes, and the block scales (fp32, or double-quantized)."""
    indices, absmax = quantize_blockwise(weight, nf4_code(), blocksize)
    state = {"packed": pack_nibbles(indices), "shape": weight.shape, "blocksize": blocksize}
    if double_quant:
        offset = absmax.mean()
        scale_idx, absmax2 = quantize_blockwise(absmax - offset, dynamic_code(), blocksize2)
        state.update(scale_codes=scale_idx.to(torch.uint8), absmax2=absmax2, offset=offset, blocksize2=blocksize2,
                     blocks=absmax.numel())
    else:
        state["absmax"] = absmax
    return state


def scales(state: dict) -> torch.Tensor:
    """The per-block absmax values (recovered from the 8-bit codes under double quantization)."""
    if "absmax" in state:
        return state["absmax"]
    recovered = dequantize_blockwise(state["scale_codes"].long(), state["absmax2"], dynamic_code(),
                                     state["blocksize2"], torch.Size([state["blocks"]]))
    return recovered + state["offset"]


def dequantize_nf4(state: dict) -> torch.Tensor:
    count = math.prod(state["shape"])
    indices = unpack_nibbles(state["packed"], count)
    return dequantize_blockwise(indices, scales(state), nf4_code(), state["blocksize"], state["shape"])


def bits_per_parameter(*, code_bits: int = 4, blocksize: int | None = 64, scale_bits: int = 32,
                       double_quant: bool = False, scale_code_bits: int = 8, blocksize2: int = 256) -> float:
    """Storage per weight: the code plus its share of the block scales (per-tensor constants ignored).

    fp32 → 32, bf16 → 16 (blocksize None). NF4, blocks of 64, fp32 scales: 4 + 32/64 = 4.5.
    With double quantization: 4 + 8/64 + 32/(64·256) = 4.127; the saving is 0.373 bits per weight.
    """
    if blocksize is None:
        return float(code_bits)
    if not double_quant:
        return code_bits + scale_bits / blocksize
    return code_bits + scale_code_bits / blocksize + scale_bits / (blocksize * blocksize2)


def dequantize_bnb(packed: torch.Tensor, state) -> torch.Tensor:
    """Decode a bitsandbytes 4-bit weight (packed codes + ``QuantState``) with the arithmetic above.

    Blocks run over the flattened weight, as bitsandbytes quantizes them. Used to check that a kernel's
    dequantization agrees with the codes it stored (see ``tunesmith.quant.bnb.quantize_model``).
    """
    count = math.prod(state.shape)
    device = packed.device
    indices = unpack_nibbles(packed.contiguous().view(torch.uint8), count)
    absmax = state.absmax
    if state.nested:
        inner = state.state2
        absmax = dequantize_blockwise(absmax.long(), inner.absmax.float(), inner.code.to(device).float(),
                                      inner.blocksize, torch.Size([absmax.numel()])) + state.offset.float()
    return dequantize_blockwise(indices, absmax.float(), state.code.to(device).float(), state.blocksize,
                                torch.Size(state.shape))
