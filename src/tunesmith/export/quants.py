"""The 4- and 5-bit GGUF block types with each block's scale fitted, in llama.cpp's byte layouts.

A block of 32 weights x is stored as integer codes q (0…15 for the 4-bit types, 0…31 for the 5-bit ones) and
fp16 numbers that map them back: ``x ≈ d·q + m`` (q4_1, q5_1: a scale and an offset per block) or
``x ≈ d·(q − z)`` (q4_0, q5_0: a scale only, z = 8 or 16). The reference quantizers (gguf's, and llama.cpp's
``quantize_row_*_ref``) take d and m from the block's extremes, so one outlier decides the step of all 32.

Here that choice is only the start. Then, a few times: with the codes fixed, the d (and m) that minimise
Σ (x − x̂)² in closed form (a least-squares line through the points (q, x), or through the origin in (q − z));
rounded to fp16 as the file stores them; the codes rounded again for them. Each block keeps the best of the
rounds, so the error is never above the reference's (tested), and on the demo model the reconstruction error of
the q4_1 tensors falls by about a fifth. The file is read by the same dequantization (codes are codes), so
llama.cpp, gguf's reader and transformers' loader see nothing different but the values.
"""

from __future__ import annotations

import numpy as np

BLOCK = 32
LEVELS = {"q4_0": 15, "q4_1": 15, "q5_0": 31, "q5_1": 31}
ROUNDS = 6
STEPS = (-1.0, -0.5, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0)


def _codes(x: np.ndarray, d: np.ndarray, m: np.ndarray, levels: int) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.where(d == 0, 0.0, np.rint((x - m) / d))
    return np.clip(q, 0, levels)


def _half(value: np.ndarray) -> np.ndarray:
    return value.astype(np.float16).astype(np.float32)


def fit_blocks(x: np.ndarray, kind: str, w: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Codes (uint8), d and m (fp16 values, shape (n, 1)) for blocks ``x`` (n × 32, float32) in ``kind``; for the
    scale-only types m = −z·d. ``w`` (n × 32): each weight's importance in the squared error (default 1)."""
    w = np.ones_like(x) if w is None else w
    levels, offset = LEVELS[kind], kind.endswith("_1")
    zero = (levels + 1) // 2
    best = None

    def keep(d, m):
        """Round the codes for (d, m); each block keeps whichever of these and its best so far errs less."""
        nonlocal best
        q = _codes(x, d, m, levels)
        candidate = ((w * (x - (d * q + m)) ** 2).sum(axis=1, keepdims=True), q, d, m)
        best = candidate if best is None else tuple(np.where(candidate[0] < best[0], new, old)
                                                    for new, old in zip(candidate, best))
        return q

    if offset:
        low, high = x.min(axis=1, keepdims=True), x.max(axis=1, keepdims=True)
        m = _half(low)
        keep(_half((high - low) / levels), m)
        for step in STEPS:  # the extremes spread over a few more or fewer steps than the codes have
            keep(_half((high - low) / (levels + step)), m)
    else:
        extreme = np.take_along_axis(x, np.abs(x).argmax(axis=1, keepdims=True), axis=1)
        for step in (0.0,) + STEPS:
            d = _half(extreme / -(zero + step / 2))
            keep(d, -zero * d)
    _, q, d, m = best
    for _ in range(ROUNDS):  # least squares for d (and m) with the codes fixed, then the codes again
        if offset:
            total = w.sum(axis=1, keepdims=True)
            with np.errstate(divide="ignore", invalid="ignore"):
                qm, xm = (w * q).sum(axis=1, keepdims=True) / total, (w * x).sum(axis=1, keepdims=True) / total
                spread = (w * (q - qm) ** 2).sum(axis=1, keepdims=True)
                fitted = np.where(spread > 0, (w * (q - qm) * (x - xm)).sum(axis=1, keepdims=True) / spread, d)
            d, m = _half(fitted), _half(np.where(spread > 0, xm - fitted * qm, m))
        else:
            c = q - zero
            norm = (w * c * c).sum(axis=1, keepdims=True)
            with np.errstate(divide="ignore", invalid="ignore"):
                d = _half(np.where(norm > 0, (w * c * x).sum(axis=1, keepdims=True) / norm, d))
            m = -zero * d
        q = keep(d, m)
    _, q, d, m = best
    return q.astype(np.uint8), d, m


def quantize(array: np.ndarray, kind: str, importance: np.ndarray | None = None) -> np.ndarray:
    """``array`` (rows × columns, columns a multiple of 32) as ``kind``'s bytes, one row of blocks per row;
    ``importance`` (columns): each input's weight in the squared error (its mean squared activation)."""
    rows, columns = array.shape
    x = np.ascontiguousarray(array, dtype=np.float32).reshape(-1, BLOCK)
    w = None if importance is None else np.broadcast_to(importance.astype(np.float32), (rows, columns)).reshape(-1, BLOCK)
    q, d, m = fit_blocks(x, kind, w)
    low, high = q[:, :BLOCK // 2], q[:, BLOCK // 2:]
    parts = [d.astype(np.float16).view(np.uint8)]
    if kind.endswith("_1"):
        parts.append(m.astype(np.float16).view(np.uint8))
    if kind.startswith("q5"):
        parts.append(np.packbits((q >> 4).astype(np.uint8), axis=1, bitorder="little"))
    parts.append((low & 0x0F) | ((high & 0x0F) << 4))
    return np.concatenate(parts, axis=1).reshape(rows, -1)
