"""A model's sizes from its ``config.json`` alone: the model is built on the meta device (no weights are read,
no memory is taken), then its parameters, linear layers and LoRA targets are listed."""

from __future__ import annotations

from dataclasses import dataclass, field

from tunesmith.errors import TunesmithError
from tunesmith.plan.terms import PROJECTIONS, Block


@dataclass(frozen=True)
class Shape:
    model_type: str
    layers: int
    block: Block
    vocab: int
    tied: bool
    softcap: bool
    parameters: int
    linears: dict[str, tuple[int, int]]  # every linear layer but the output head: name → (out, in)
    embedding: int  # input embedding parameters
    head: int  # output head parameters (0 when tied to the embedding)
    block_parameters: int  # the largest block's
    lora: dict[str, tuple[int, int, int]] = field(default_factory=dict)  # adapted layer → (out, in, rank)

    def lora_parameters(self) -> list[int]:
        return [n for out, inp, r in self.lora.values() for n in (r * inp, out * r)]

    def block_ranks(self) -> dict[str, int]:
        """The first block's adapted projections → rank (the blocks are alike)."""
        first = next(iter(self.linears), "").rsplit(".", 2)[0]
        return {name.rsplit(".", 1)[-1]: r for name, (_, _, r) in self.lora.items()
                if name.rsplit(".", 2)[0] == first}


def read_shape(config, *, trust_remote_code: bool = False) -> Shape:
    """The sizes of ``config.model.source`` (a run config's), with the LoRA targets of ``config.lora`` when the
    method adapts."""
    import torch
    from transformers import AutoModelForCausalLM

    from tunesmith.models.load import load_model_config, resolve_path
    from tunesmith.peft.lora import LoRAConfig, linear_layers, select_target_modules
    from tunesmith.train.decoder import decoder_layers

    path = resolve_path(config.model.source)
    hf = load_model_config(path, trust_remote_code=trust_remote_code or config.model.trust_remote_code)
    text = hf.get_text_config()
    if any(getattr(text, key, None) for key in ("num_local_experts", "num_experts", "n_routed_experts")):
        raise TunesmithError(f"{config.model.source}: a mixture-of-experts model ({hf.model_type}); the memory model "
                             "knows dense Llama-family decoders (Llama, Mistral, Qwen2/3, SmolLM, Gemma-style MLPs)")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf, trust_remote_code=trust_remote_code or
                                                 config.model.trust_remote_code)
    layers = decoder_layers(model)
    head_module = model.get_output_embeddings()
    linears = {name: (m.out_features, m.in_features) for name, m in linear_layers(model).items()
               if m is not head_module}
    short = {name.rsplit(".", 1)[-1] for name in linears}
    if not layers or short != set(PROJECTIONS):
        raise TunesmithError(f"{config.model.source}: a {hf.model_type} model with linear layers "
                             f"{', '.join(sorted(short)) or 'none'}; the memory model knows decoders whose blocks "
                             f"hold exactly {', '.join(PROJECTIONS)} (Llama, Mistral, Qwen2/3, SmolLM, Gemma)")
    heads = text.num_attention_heads
    block = Block(hidden=text.hidden_size, intermediate=text.intermediate_size, heads=heads,
                  kv_heads=getattr(text, "num_key_value_heads", None) or heads,
                  head_dim=getattr(text, "head_dim", None) or text.hidden_size // heads)
    embedding = model.get_input_embeddings().weight
    tied = head_module is not None and head_module.weight is embedding
    lora = {}
    if config.method.uses_adapter:
        settings = LoRAConfig.from_config(config.lora)
        for name in select_target_modules(model, settings.target_modules):
            out, inp = linears[name]
            lora[name] = (out, inp, settings.rank_for(name))
    return Shape(model_type=hf.model_type, layers=len(layers), block=block, vocab=embedding.shape[0], tied=tied,
                 softcap=bool(getattr(text, "final_logit_softcapping", None)),
                 parameters=sum(p.numel() for p in model.parameters()), linears=linears,
                 embedding=embedding.numel(), head=0 if tied or head_module is None else head_module.weight.numel(),
                 block_parameters=max(sum(p.numel() for p in layer.parameters()) for layer in layers), lora=lora)
