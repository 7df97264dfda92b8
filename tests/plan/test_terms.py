"""The memory model's terms against values worked out by hand (issue 29)."""

import math

import pytest

from tunesmith.config_limits import GIB, MIB, parse_memory
from tunesmith.plan.terms import Block, backward_working_set, block_activations, four_bit_bytes, head_buffers, \
    optimizer_bytes

BLOCK = Block(hidden=64, intermediate=128, heads=4, kv_heads=2, head_dim=16)
ALL = {name: 8 for name in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")}


def test_nf4_bytes_with_and_without_double_quantization():
    # 64 × 128 = 8,192 weights in 128 blocks of 64: 4 bits each, then per block a 32-bit absmax, or with double
    # quantization an 8-bit code per block, one fp32 absmax per 256 codes (1) and the codes' mean (32 bits)
    assert four_bit_bytes(64, 128, blocksize=64, double_quant=False) == (4 * 8192 + 32 * 128) // 8 == 4608
    assert four_bit_bytes(64, 128, blocksize=64, double_quant=True) == (4 * 8192 + 8 * 128 + 32 + 32) // 8 == 4232
    # blocks of 128 halve the scales
    assert four_bit_bytes(64, 128, blocksize=128, double_quant=False) == (4 * 8192 + 32 * 64) // 8 == 4352
    # 4.127 bits per weight on a large layer, the double-quantization figure the quantize report states
    assert four_bit_bytes(4096, 4096, blocksize=64, double_quant=True) * 8 / 4096 ** 2 == pytest.approx(4.127, abs=1e-3)


def test_optimizer_state_bytes():
    # AdamW: two moments in the parameters' dtype (bf16 here)
    assert optimizer_bytes("adamw", [1000, 5000], 2) == 2 * 6000 * 2
    assert optimizer_bytes("adamw", [1000], 4) == 8000
    # bitsandbytes 32-bit: two fp32 moments whatever the parameters' dtype
    assert optimizer_bytes("paged_adamw_32bit", [1000, 5000], 2) == 8 * 6000
    # 8-bit: under 4,096 elements two fp32 moments; else two bytes per element and an fp32 absmax per 256 each
    assert optimizer_bytes("adamw_8bit", [1000], 2) == 8000
    assert optimizer_bytes("adamw_8bit", [5000], 2) == 2 * (5000 + 4 * math.ceil(5000 / 256)) == 10160
    assert optimizer_bytes("paged_adamw_8bit", [1000, 5000], 4) == 8000 + 10160


def test_block_activations_per_token():
    # LoRA on the seven projections, no dropout, bf16: norms 2·(4·64 + 4); inputs 2·(64 + 64 + 128) (q/k/v's,
    # gate/up's, down's); U = X'Aᵀ 7 · 2 · 8; attention q, k, v, out at 64 wide (k, v repeated) + 4 · 4 lse;
    # MLP 3 · 2 · 128
    lora = block_activations(BLOCK, b=2, ranks=ALL)
    assert lora == {"norms": 520, "projection inputs": 512, "lora": 112, "attention": 2 * 4 * 64 + 16, "mlp": 768}
    # k and v at their own width when the kernel takes grouped heads
    assert block_activations(BLOCK, b=2, ranks=ALL, kv_repeated=False)["attention"] == 2 * (2 * 64 + 2 * 32) + 16
    # dropout: each adapted projection keeps its own dropped input (2 bytes) and mask (1 byte)
    assert block_activations(BLOCK, b=2, ranks=ALL, dropout=True)["projection inputs"] == 3 * (5 * 64 + 64 + 128)
    # full fine-tuning: the trained norm weights keep their normalised input; no adapters
    full = block_activations(BLOCK, b=2, ranks={}, full=True)
    assert full["norms"] == 520 + 2 * 2 * 64 and full["projection inputs"] == 512 and full["lora"] == 0
    # only q and v adapted: only their shared input is kept
    qv = block_activations(BLOCK, b=2, ranks={"q_proj": 8, "v_proj": 8})
    assert qv["projection inputs"] == 2 * 64 and qv["lora"] == 2 * 2 * 8
    # fp32 on the CPU: every b-byte term doubles
    assert block_activations(BLOCK, b=4, ranks=ALL)["mlp"] == 3 * 4 * 128
    assert backward_working_set(BLOCK, b=2) == 2 * (3 * 128 + 2 * 64)


def test_head_buffers():
    # a 256-position chunk of fp32 logits and their bf16 gradient, and ∂L/∂H for all 300 positions
    assert head_buffers(100, 64, 300, b=2) == 256 * 100 * 6 + 300 * 64 * 2
    assert head_buffers(100, 64, 100, b=2) == 100 * 100 * 6 + 100 * 64 * 2  # fewer positions than a chunk
    assert head_buffers(100, 64, 300, b=2, softcap=True) == 256 * 100 * 10 + 300 * 64 * 2
    # a trained head: its fp32 gradient and the cast to bf16
    assert head_buffers(100, 64, 300, b=2, trains_head=True) == 256 * 100 * 6 + 300 * 64 * 2 + 100 * 64 * 6


def test_memory_sizes():
    assert parse_memory("80GiB") == 80 * GIB and parse_memory("512MiB") == 512 * MIB
    assert parse_memory("24GB") == 24 * 10 ** 9 and parse_memory("1.5 GiB") == int(1.5 * GIB)
    assert parse_memory("4096") == 4096
    for bad in ("lots", "-1GiB", "0", "12 parsecs", "nanGiB"):
        with pytest.raises(ValueError, match="not a memory size"):
            parse_memory(bad)
