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



@pytest.mark.parametrize("kind", ["q4_1", "q4_0"])
def test_important_inputs_are_fitted_more_closely(kind):
    weights = _weights()
    importance = np.ones(256, dtype=np.float32)
    importance[::4] = 50.0  # every fourth input's activations are large
    w = np.broadcast_to(importance, weights.shape).reshape(-1, 32)
    x = weights.reshape(-1, 32)
    plain, weighted = fit_blocks(x, kind), fit_blocks(x, kind, w)
    cost = [(w * (x - (d * q + m)) ** 2).sum() for q, d, m in (plain, weighted)]
    assert cost[1] < 0.95 * cost[0]
    decoded = gguf.quants.dequantize(quantize(weights, kind, importance), KINDS[kind])
    np.testing.assert_array_equal(decoded.reshape(-1, 32), (weighted[1] * weighted[0] + weighted[2]))


def test_input_importance_is_each_columns_mean_square(tokenizer):
    import torch
    from tinymodels import build_tiny_llama

    from tunesmith.export.calibrate import input_importance

    model = build_tiny_llama()
    rows = [[1, 5, 9, 200], [7, 7, 3]]
    importance = input_importance(model, rows)
    assert len(importance) == 2 * 7  # every projection of both blocks
    with torch.no_grad():  # block 0's q/k/v read the first norm of the embeddings
        normed = [model.model.layers[0].input_layernorm(model.model.embed_tokens(torch.tensor(r))) for r in rows]
    expected = (torch.cat(normed) ** 2).mean(0).numpy()
    np.testing.assert_allclose(importance["blk.0.attn_q.weight"], expected, rtol=1e-5)
    np.testing.assert_array_equal(importance["blk.0.attn_k.weight"], importance["blk.0.attn_q.weight"])
