"""The memory model's terms, in bytes: each a small function of sizes, written out so a test can check it by hand.

Sizes of one decoder block (``Block``): d = hidden, f = intermediate, h query heads of width w (d_q = h·w),
k/v heads of the same width (d_kv), and per adapted projection its rank r. ``b`` is the compute dtype's bytes
(2 for bf16 under autocast on a GPU, 4 for fp32 on the CPU).

**Activations kept for the backward, per token, per block** (what autograd saves in a Llama-family block as
transformers writes it and as tunesmith's LoRA node saves it; frozen weights keep no input of their own):

    RMSNorm ×2          4d + 4 each          the fp32 copy of its input and the inverse RMS; full fine-tuning
                                             also keeps the normalised bf16 input of the trained weight (+ b·d)
    projection inputs   b·d (q/k/v), b·d (gate/up), b·f (down)   kept once per shared input, by the adapted (or
                                             trained) projections that read it; with LoRA dropout each adapted
                                             projection keeps its own dropped input and mask instead (b + 1 per
                                             input element), and the shared input is not kept
    LoRA                b·r per adapted projection      U = X'Aᵀ, for ∂L/∂B
    attention           b·(2d_q + 2d_k) + 4h  q and k after the rotary embedding, v, the output (read again by
                                             o_proj), and the kernel's fp32 log-sum-exp per head; d_k = d_q when
                                             the kernel gets k and v repeated to every query head (PyTorch 2.11's
                                             variable-length kernel, and SDPA under a padding mask), else d_kv
    MLP                 3·b·f                 SiLU's input, up_proj's output and SiLU's output (the product
                                             they make is down_proj's input, counted above)

With gradient checkpointing a block keeps only its input (b·d per token) and one block at a time is recomputed
in the backward, so the peak holds every block's input plus one block's activations.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from tunesmith.config_limits import GIB, MIB
from tunesmith.quant.report import stored_bits

ATTENTION_INPUTS = ("q_proj", "k_proj", "v_proj")
MLP_INPUTS = ("gate_proj", "up_proj")
PROJECTIONS = ATTENTION_INPUTS + ("o_proj",) + MLP_INPUTS + ("down_proj",)
EIGHT_BIT_MIN = 4096  # bitsandbytes keeps 32-bit state for tensors with fewer elements (its min_8bit_size)
EIGHT_BIT_BLOCK = 256  # elements per fp32 absmax of a blockwise 8-bit optimizer state
HEAD_CHUNK = 256  # train/head.py's CHUNK_POSITIONS: positions per vocabulary-sized buffer


@dataclass(frozen=True)
class Block:
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int

    @property
    def q_width(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_width(self) -> int:
        return self.kv_heads * self.head_dim

    def inputs(self) -> dict[str, int]:
        """Each projection's input width."""
        d = self.hidden
        return {"q_proj": d, "k_proj": d, "v_proj": d, "o_proj": self.q_width, "gate_proj": d, "up_proj": d,
                "down_proj": self.intermediate}


def block_activations(block: Block, *, b: int, ranks: dict[str, int], full: bool = False, dropout: bool = False,
                      kv_repeated: bool = True) -> dict[str, int]:
    """Bytes kept per token by one block (module docstring), by part. ``ranks``: adapted projection → rank."""
    d, f = block.hidden, block.intermediate
    norms = 2 * (4 * d + 4) + (2 * b * d if full else 0)
    widths = block.inputs()
    if full:
        inputs = b * (d + d + f)
    elif dropout:
        inputs = sum((b + 1) * widths[name] for name in ranks)
    else:
        inputs = b * ((d if set(ranks) & set(ATTENTION_INPUTS) else 0) + (d if set(ranks) & set(MLP_INPUTS) else 0)
                      + (f if "down_proj" in ranks else 0))
    k_width = block.q_width if kv_repeated else block.kv_width
    attention = b * (2 * block.q_width + 2 * k_width) + 4 * block.heads
    return {"norms": norms, "projection inputs": inputs, "lora": sum(b * r for r in ranks.values()),
            "attention": attention, "mlp": 3 * b * f}


def backward_working_set(block: Block, *, b: int) -> int:
    """Bytes per token of the largest temporaries while one block's backward runs: the gradients of the MLP's
    three f-wide tensors and of the residual stream in and out (2 × d)."""
    return b * (3 * block.intermediate + 2 * block.hidden)


def head_buffers(vocab: int, hidden: int, tokens: int, *, b: int, softcap: bool = False,
                 trains_head: bool = False) -> int:
    """The fused head's memory (train/head.py): one chunk's fp32 logits and their ``b``-byte gradient, the
    gradient of every position's hidden state (kept from forward to backward), and when the head trains its
    fp32 gradient and that gradient's cast to the weight's dtype."""
    chunk = min(tokens, HEAD_CHUNK) * vocab * (4 + b + (4 if softcap else 0))
    weight = vocab * hidden * (4 + b) if trains_head else 0
    return chunk + tokens * hidden * b + weight


def four_bit_bytes(out_features: int, in_features: int, *, blocksize: int, double_quant: bool) -> int:
    """A 4-bit weight with its scales (quant/report.py's ``stored_bits``), rounded up to whole bytes."""
    return math.ceil(stored_bits("nf4+dq" if double_quant else "nf4", out_features, in_features, blocksize) / 8)


def optimizer_bytes(name: str, numels: list[int], param_bytes: int) -> int:
    """Optimizer state for parameters of ``numels`` elements: AdamW keeps two moments in the parameter's dtype
    (torch's AdamW); the bitsandbytes 32-bit variants two fp32 moments; the 8-bit ones two 8-bit moments with
    one fp32 absmax per 256 elements each, except tensors under 4096 elements (two fp32 moments)."""
    if name == "adamw":
        return sum(2 * n * param_bytes for n in numels)
    if name == "paged_adamw_32bit":
        return sum(8 * n for n in numels)
    return sum(8 * n if n < EIGHT_BIT_MIN else 2 * (n + 4 * math.ceil(n / EIGHT_BIT_BLOCK)) for n in numels)


def paged(name: str) -> bool:
    """Paged optimizer state lives in CUDA unified memory, outside PyTorch's allocator: it is not in
    ``max_memory_allocated`` and the driver moves it to host memory when the GPU runs short."""
    return name.startswith("paged")
