"""What training reads off a transformers decoder, and the one way it installs an attention function in it: the
repeated blocks, the attention implementation, whether attention is plain causal softmax. The layouts
(``train/layout.py``), the row and varlen kernels (``train/rows.py``, ``train/varlen.py``) and the training
module (``train/module.py``) all build on it; it imports none of them.
"""

from __future__ import annotations

import torch


def decoder_layers(model) -> list[torch.nn.Module]:
    """The repeated transformer blocks (``model.layers`` / ``h`` / ``blocks`` of the decoder)."""
    decoder = model.get_decoder()
    for name in ("layers", "h", "blocks"):
        layers = getattr(decoder, name, None)
        if isinstance(layers, torch.nn.ModuleList):
            return list(layers)
    return []


def attention_implementation(model) -> str:
    return getattr(model.config, "_attn_implementation", None) or "eager"


def plain_causal_attention(config, length: int) -> bool:
    """Whether attention is plain causal softmax for rows of ``length``: no logit soft-capping and no sliding
    window shorter than the rows (the flat layouts' masks know neither)."""
    config = getattr(config, "get_text_config", lambda: config)()
    window = getattr(config, "sliding_window", None)
    return not getattr(config, "attn_logit_softcapping", None) and (window is None or window >= length)


def install_attention(model, name: str, function) -> None:
    """Run ``model``'s attention through ``function`` (registered as ``name``) from now on, with SDPA's masks: the
    one way ``rows`` and ``varlen`` install their kernels (transformers' public attention interface)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(name, function)
    ALL_MASK_ATTENTION_FUNCTIONS.register(name, sdpa_mask)
    model.set_attn_implementation(name)
