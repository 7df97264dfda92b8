"""Writing a merged model as a GGUF file for llama.cpp: llama.cpp's tensor names and metadata, the tokenizer, the
chat template, the end-of-turn token.

Layouts: Llama-family decoders (Llama, Mistral, SmolLM2, written as llama.cpp's ``llama`` architecture) and
Qwen2 (``qwen2``: biases on q/k/v, no permutation). llama.cpp applies RoPE to query and key rows in interleaved
pairs, where transformers' Llama rotates the two halves of each head: the ``llama`` layout's q and k rows are
permuted per head so the two agree (transformers' GGUF loader undoes exactly this permutation).

Tokenizers: byte-level BPE (tokens, merges, token types) with a pre-tokenizer llama.cpp knows by name; anything
else is refused before any work (``check_supported``).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from tunesmith.errors import TunesmithError
from tunesmith.export import quants

ARCHITECTURES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}
TYPES = ("f16", "bf16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0")
# llama.cpp's pre-tokenizer names, by the split rule the tokenizer's pre-tokenizer applies before byte-level BPE
GPT2_SPLIT = "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+"
LLAMA3_SPLIT = ("(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*"
                "|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")
QWEN2_SPLIT = ("(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*"
               "|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")
NAMES = {"embed_tokens.weight": "token_embd.weight", "norm.weight": "output_norm.weight",
         "input_layernorm.weight": "attn_norm", "post_attention_layernorm.weight": "ffn_norm",
         "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
         "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
         "mlp.down_proj": "ffn_down"}


def architecture(config) -> str:
    """The GGUF architecture for a transformers config; other model types are refused by name."""
    if config.model_type not in ARCHITECTURES:
        raise TunesmithError(f"GGUF export supports {', '.join(sorted(ARCHITECTURES))} models (Llama-family "
                             f"layouts); this model is {config.model_type!r}")
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise TunesmithError(f"GGUF export writes plain RoPE; this model uses {rope.get('rope_type')} RoPE scaling")
    return ARCHITECTURES[config.model_type]


def pre_tokenizer(tokenizer) -> str:
    """llama.cpp's name for the tokenizer's pre-tokenizer; refused when it is not one llama.cpp knows."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str()) if hasattr(tokenizer, "backend_tokenizer") else None
    if spec is None or (spec.get("model") or {}).get("type") != "BPE" or not _byte_level(spec.get("decoder")):
        raise TunesmithError("GGUF export writes byte-level BPE tokenizers (GPT-2 style); this tokenizer is "
                             f"{((spec or {}).get('model') or {}).get('type', type(tokenizer).__name__)}")
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [step.get("type") for step in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        pattern = (steps[0].get("pattern") or {}).get("Regex")
        known = {LLAMA3_SPLIT: "llama-bpe", QWEN2_SPLIT: "qwen2"}
        if pattern in known:
            return known[pattern]
    raise TunesmithError(f"the tokenizer's pre-tokenizer ({' + '.join(map(str, kinds))}) is not one llama.cpp "
                         "knows by name (gpt-2, smollm, llama-bpe, qwen2); a GGUF with a guessed one would split "
                         "text differently in llama.cpp")


def _byte_level(decoder) -> bool:
    if not decoder:
        return False
    steps = decoder.get("decoders", [decoder]) if decoder.get("type") == "Sequence" else [decoder]
    return any(step.get("type") == "ByteLevel" for step in steps)


def _permute(weight: np.ndarray, heads: int) -> np.ndarray:
    """Rows of each head reordered from transformers' halves to llama.cpp's interleaved pairs."""
    return weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(
        weight.shape)


def gguf_tensors(state: dict[str, torch.Tensor], config, arch: str):
    """(llama.cpp name, float32 array) for every tensor of the merged state dict, in a stable order."""
    heads, kv_heads = config.num_attention_heads, getattr(config, "num_key_value_heads", config.num_attention_heads)
    out = []
    for key, tensor in state.items():
        if key == "lm_head.weight":
            if not getattr(config, "tie_word_embeddings", False):
                out.append(("output.weight", tensor))
            continue
        name = key.removeprefix("model.")
        if name in NAMES:
            out.append((NAMES[name], tensor))
            continue
        parts = name.split(".")
        if parts[0] != "layers" or len(parts) < 4:
            raise TunesmithError(f"GGUF export: no llama.cpp name for tensor {key}")
        block, rest = parts[1], ".".join(parts[2:])
        module, _, kind = rest.rpartition(".")
        short = NAMES.get(rest) or NAMES.get(module)
        if short is None:
            raise TunesmithError(f"GGUF export: no llama.cpp name for tensor {key}")
        gguf_name = f"blk.{block}.{short}" if rest in NAMES else f"blk.{block}.{short}.{kind}"
        array = tensor.detach().float().cpu().numpy()
        if arch == "llama" and short in ("attn_q", "attn_k"):
            array = _permute(array, heads if short == "attn_q" else kv_heads)
        out.append((gguf_name if gguf_name.endswith((".weight", ".bias")) else gguf_name + ".weight", array))
    return [(name, t if isinstance(t, np.ndarray) else t.detach().float().cpu().numpy()) for name, t in out]


def write_gguf(path: Path, *, state: dict[str, torch.Tensor], config, tokenizer, chat_template: str, end_id: int,
               kind: str, name: str, importance: dict | None = None) -> None:
    """The GGUF file; ``importance``: llama.cpp tensor name → its inputs' mean squared activation, which the 4- and
    5-bit blocks are fitted with (``export/calibrate.py``)."""
    import gguf

    arch = architecture(config)
    writer = gguf.GGUFWriter(str(path), arch)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", config.num_attention_heads))
    writer.add_rope_dimension_count(head_dim)
    rope = getattr(config, "rope_parameters", None) or {}
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(len(tokenizer))
    writer.add_file_type(_FILE_TYPES[kind])
    _write_tokenizer(writer, tokenizer, chat_template, end_id)
    for tensor_name, array in gguf_tensors(state, config, arch):
        data, qtype = _encode(tensor_name, array, kind, config.num_hidden_layers, (importance or {}).get(tensor_name))
        writer.add_tensor(tensor_name, data, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


# In the 4- and 5-bit types: the embeddings, the output head, the value and down projections, and the whole
# first and last blocks (what llama.cpp's own quantization mixes keep at higher precision) are written at 8 bits.
EIGHT_BIT_IN_LOW_TYPES = ("token_embd.weight", "output.weight", "attn_v.weight", "ffn_down.weight")
_FILE_TYPES = {"f16": 1, "bf16": 32, "q8_0": 7, "q5_1": 9, "q5_0": 8, "q4_1": 3, "q4_0": 2}


def _encode(name: str, array: np.ndarray, kind: str, blocks: int, importance: np.ndarray | None = None):
    """The tensor's bytes in ``kind`` (1D tensors stay f32; a row length the block size does not divide: f16)."""
    import gguf
    from gguf import GGMLQuantizationType as Q

    if array.ndim == 1:
        return array.astype(np.float32), Q.F32
    if kind == "f16":
        return array.astype(np.float16), Q.F16
    if kind == "bf16":
        return gguf.quants.quantize(array.astype(np.float32), Q.BF16), Q.BF16
    qtype = {"q8_0": Q.Q8_0, "q5_1": Q.Q5_1, "q5_0": Q.Q5_0, "q4_1": Q.Q4_1, "q4_0": Q.Q4_0}[kind]
    index = int(name.split(".")[1]) if name.startswith("blk.") else None
    if name.endswith(EIGHT_BIT_IN_LOW_TYPES) or (index is not None and not 0 < index < blocks - 1):
        qtype = Q.Q8_0  # the tensors whose rounding costs most stay at 8 bits, as llama.cpp's mixes keep them
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    if array.shape[-1] % block:
        return array.astype(np.float16), Q.F16
    if qtype == Q.Q8_0:
        return gguf.quants.quantize(array.astype(np.float32), qtype), qtype
    return quants.quantize(array, kind, importance), qtype  # each block's scale fitted (export/quants.py)


def _write_tokenizer(writer, tokenizer, chat_template: str, end_id: int) -> None:
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    vocab = spec["model"]["vocab"]
    size = len(tokenizer)
    tokens = [""] * size
    for token, index in vocab.items():
        tokens[index] = token
    types = [1] * size  # normal
    for index, added in tokenizer.added_tokens_decoder.items():
        tokens[index] = added.content
        types[index] = 3 if added.special else 4  # control, user-defined
    if any(token == "" for token in tokens):
        raise TunesmithError("GGUF export: the tokenizer's vocabulary has gaps (ids without a token)")
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_tokenizer(tokenizer))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    if tokenizer.bos_token_id is not None:
        writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(end_id)  # the end of turn the run trained on: where a llama.cpp chat stops
    writer.add_eot_token_id(end_id)
    if tokenizer.unk_token_id is not None:
        writer.add_unk_token_id(tokenizer.unk_token_id)
    if tokenizer.pad_token_id is not None:
        writer.add_pad_token_id(tokenizer.pad_token_id)
    writer.add_add_bos_token(bool(getattr(tokenizer, "add_bos_token", False)))
    writer.add_add_eos_token(False)
    writer.add_chat_template(chat_template)
