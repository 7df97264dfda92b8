"""The fitted 4/5-bit block quantizer (export/quants.py) against gguf's reference quantizer and reader."""

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q

from tunesmith.export.quants import fit_blocks, quantize

KINDS = {"q4_0": Q.Q4_0, "q4_1": Q.Q4_1, "q5_0": Q.Q5_0, "q5_1": Q.Q5_1}


def _weights():
    rng = np.random.default_rng(0)
    weights = (rng.standard_normal((48, 256)) * 0.02).astype(np.float32)
    weights[3, 5] = 0.3  # one outlier decides its block's step under the reference
    weights[7, :32] = 0.25  # a constant block (0.25 is exact in fp16)
    weights[9, 32:64] = 0.0  # an empty one
    return weights


@pytest.mark.parametrize("kind", KINDS)
def test_the_bytes_are_llama_cpps_layout_and_never_worse_than_the_reference(kind):
    weights = _weights()
    ours, reference = quantize(weights, kind), gguf.quants.quantize(weights, KINDS[kind])
    assert ours.shape == reference.shape and ours.dtype == np.uint8
    # gguf's own reader decodes our bytes to exactly d·q + m of the fitted blocks
    q, d, m = fit_blocks(weights.reshape(-1, 32), kind)
    decoded = gguf.quants.dequantize(ours, KINDS[kind])
    np.testing.assert_array_equal(decoded.reshape(-1, 32), (d * q + m).astype(np.float32))
    ours_error = ((decoded - weights) ** 2).reshape(-1, 32).sum(axis=1)
    reference_error = ((gguf.quants.dequantize(reference, KINDS[kind]) - weights) ** 2).reshape(-1, 32).sum(axis=1)
    assert (ours_error <= reference_error * (1 + 1e-6) + 1e-12).all()  # no block worse
    assert ours_error.sum() < 0.95 * reference_error.sum()  # and the tensor's squared error at least 5% lower
    assert ours_error[7 * 8] == 0 and ours_error[9 * 8 + 1] == 0  # constant and empty blocks exactly

