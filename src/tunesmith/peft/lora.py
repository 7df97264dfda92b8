"""LoRA: a low-rank update beside a frozen linear layer, and the functions that put it into a model.

For a base layer ``y = W x + b`` (W is d_out×d_in), LoRA learns A (r×d_in) and B (d_out×r) and computes

    y = W x + b + s · B (A x),        s = α / r    (rsLoRA: s = α / √r)

which is the same as using the merged weight ``W' = W + s · B · A``. B starts at zero, so at initialisation
the model is exactly the base model; A starts like ``nn.Linear``'s default (Kaiming-uniform, a = √5).

Gradients, written for a batch X (n×d_in, rows are inputs) with G = ∂L/∂Y (n×d_out); dropout, when on,
replaces X by dropout(X) in the adapter path only:

    ∂L/∂B = s · Gᵀ (X Aᵀ)          (d_out×r)
    ∂L/∂A = s · Bᵀ Gᵀ X            (r×d_in)
    ∂L/∂X = G W + s · G B A

For one input column x: ∂L/∂B = s · (∂L/∂y)(A x)ᵀ and ∂L/∂A = s · Bᵀ (∂L/∂y) xᵀ. Because B = 0 at the start,
∂L/∂A is zero on the first step and only B moves; A follows once B is non-zero.

The wrapped module keeps PEFT's layout (``<name>.base_layer``, ``<name>.lora_A``, ``<name>.lora_B``), so the
state-dict keys of a wrapped model are the ones PEFT writes.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from tunesmith.config import LoRASection
from tunesmith.errors import TunesmithError
from tunesmith.quant.bnb import dequantize, is_4bit

ALL_LINEAR = "all-linear"
_OUTPUT_HEAD_NAME = "lm_head"


class LoRALinear(nn.Module):
    """``base_layer(x) + s · lora_B(lora_A(dropout(x)))`` over any layer with ``in_features``,
    ``out_features`` and ``weight`` (``nn.Linear``, or a 4-bit ``bitsandbytes`` ``Linear4bit``).

    ``disabled`` turns the adapter off (the DPO reference model); ``merge()`` folds it into the base weight
    and ``unmerge()`` takes it out again. Merging needs a floating-point base weight.
    """

    backward_weight: torch.Tensor | None = None
    """The base weight in bf16 for the backward's ``G W`` while a run trains with
    ``train.backward_products=bf16`` (set and removed by ``train/products.py``); None: exact."""

    forward_weight: torch.Tensor | None = None
    """The base weight in bf16 for ``X Wᵀ`` in forwards under autograd while a run trains with
    ``train.forward_products=bf16`` (set and removed by ``train/products.py``); None, or grad off: exact."""

    def __init__(self, base_layer: nn.Module, r: int, alpha: float, dropout: float = 0.0,
                 use_rslora: bool = False, dtype: torch.dtype | None = None):
        super().__init__()
        if r <= 0:
            raise TunesmithError(f"LoRA rank r must be a positive integer, got {r}")
        self.base_layer = base_layer
        self.in_features = base_layer.in_features
        self.out_features = base_layer.out_features
        self.r = r
        self.alpha = alpha
        self.use_rslora = use_rslora
        self.scaling = alpha / math.sqrt(r) if use_rslora else alpha / r
        base_weight = base_layer.weight
        # A quantized base stores packed integers; its adapter trains in fp32 unless told otherwise.
        if dtype is None:
            dtype = base_weight.dtype if base_weight.dtype.is_floating_point else torch.float32
        # Built on "meta" and materialised once, so each matrix draws from the global RNG exactly once.
        self.lora_A = nn.Linear(self.in_features, r, bias=False, device="meta", dtype=dtype)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, device="meta", dtype=dtype)
        self.lora_A.to_empty(device=base_weight.device)
        self.lora_B.to_empty(device=base_weight.device)
        self.reset_lora_parameters()
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        self.disabled = False

    def reset_lora_parameters(self) -> None:
        """A like ``nn.Linear``'s default init (from torch's global seed), B = 0: the adapter starts as a no-op."""
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.disabled and self.merged:
            raise TunesmithError("a merged LoRA adapter cannot be disabled; call unmerge() first")
        if self.disabled or self.merged:
            return self.base_layer(x)
        dtype = self._fused_dtype(x)
        if dtype is not None:
            x = x.to(dtype)
            bias = self.base_layer.bias
            low_forward = self.forward_weight  # while training only: a forward without grad (evaluation) is exact
            if low_forward is not None and not torch.is_grad_enabled():
                low_forward = None
            return _lora_linear(x, self.lora_dropout(x), self.base_layer.weight,
                                None if bias is None else bias.to(dtype), self.lora_A.weight.to(dtype),
                                self.lora_B.weight.to(dtype), self.scaling, self.backward_weight, low_forward)
        return self.reference_forward(x)

    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The adapter through the plain modules (the fused path's reference)."""
        result = self.base_layer(x)
        hidden = self.lora_A(self.lora_dropout(x).to(self.lora_A.weight.dtype)).to(result.dtype)
        # s is folded into B (r×d_out, cheap) and the add into the matmul: one kernel over the activations
        scaled_b = (self.lora_B.weight * self.scaling).to(result.dtype)
        out = torch.addmm(result.reshape(-1, result.shape[-1]), hidden.reshape(-1, self.r), scaled_b.t())
        return out.view(result.shape)

    def _fused_dtype(self, x: torch.Tensor) -> torch.dtype | None:
        """The dtype ``_lora_linear`` computes this call in, or None when the module path must run.

        The fused path takes a frozen base that is a plain ``nn.Linear`` or a bitsandbytes 4-bit layer (its
        weight is dequantized inside the node, in the forward and again in the backward, never kept). Under
        autocast it computes in autocast's dtype, as autocast would: the activations and the small adapter
        matrices are cast, never the base weight, which must already be in that dtype (a 4-bit weight must
        dequantize to it). Without autocast everything must share one dtype.
        """
        weight = self.base_layer.weight
        if weight.requires_grad:
            return None
        if type(self.base_layer) is nn.Linear:
            base_dtype = weight.dtype
        elif is_4bit(weight):
            base_dtype = weight.quant_state.dtype
        else:
            return None
        device = x.device.type
        if torch.is_autocast_enabled(device):
            dtype = torch.get_autocast_dtype(device)
            return dtype if base_dtype == dtype else None
        adapter = (self.lora_A.weight.dtype, self.lora_B.weight.dtype)
        return x.dtype if base_dtype == x.dtype and adapter == (x.dtype, x.dtype) else None

    def delta_weight(self) -> torch.Tensor:
        """``s · B · A`` in fp32 (d_out×d_in): what merging adds to the base weight."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling

    def merged_weight(self) -> torch.Tensor:
        """A new tensor holding ``W + s · B · A`` in the base weight's dtype; the layer is not changed."""
        weight = self._dense_base_weight()
        if self.merged:
            return weight.detach().clone()
        return (weight.detach().float() + self.delta_weight()).to(weight.dtype)

    def merge(self) -> None:
        """``W ← W + s · B · A`` (computed in fp32, stored in W's dtype). Calling it twice merges once."""
        if self.merged:
            return
        weight = self._dense_base_weight()
        with torch.no_grad():
            weight.copy_((weight.float() + self.delta_weight()).to(weight.dtype))
        self.merged = True

    def unmerge(self) -> None:
        """``W ← W − s · B · A``: the inverse of ``merge()`` (exact up to rounding in W's dtype)."""
        if not self.merged:
            return
        weight = self._dense_base_weight()
        with torch.no_grad():
            weight.copy_((weight.float() - self.delta_weight()).to(weight.dtype))
        self.merged = False

    def _dense_base_weight(self) -> torch.Tensor:
        weight = self.base_layer.weight
        if not weight.dtype.is_floating_point:
            raise TunesmithError(
                f"cannot merge LoRA into a quantized base layer ({type(self.base_layer).__name__}, weight dtype "
                f"{weight.dtype}); load the base model in fp32/bf16/fp16 to merge, or keep the adapter separate")
        return weight

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
                f"alpha={self.alpha}, scaling={self.scaling:g}, merged={self.merged}, disabled={self.disabled}")


class _LoRALinearFunction(torch.autograd.Function):
    """``Y = X Wᵀ + b + s · (X' Aᵀ) Bᵀ`` with ``X'`` = dropout(X), as one autograd node. ``W`` may be a 4-bit
    bitsandbytes weight: it is dequantized for the forward product and again for the backward's ``G W``, and
    only its packed codes are kept between them (what bitsandbytes' own 4-bit matmul does).

    Backward, with G = ∂L/∂Y and U = X' Aᵀ (n×r, kept from the forward):

        ∂L/∂X = G W + s · (G B) A      (with dropout, the second term is ∂L/∂X' and flows back through it)
        ∂L/∂A = s · (G B)ᵀ X'          ∂L/∂B = s · Gᵀ U

    Autograd over the plain modules computes the same products but as separate nodes, each allocating its
    own output and adding it to the next: on CPU that bookkeeping costs about as much as the rank-r products
    themselves. Here the adapter's products accumulate in place into the base layer's output (forward) and
    input gradient (backward). On a GPU under autocast the plain modules also copy the activations twice per
    adapter (to the fp32 adapter's dtype for QLoRA, then back to bf16 by autocast); here only the small
    adapter matrices are cast. ``LoRALinear.reference_forward`` is the reference; tests compare them.
    ``low`` (W in bf16, ``train.backward_products=bf16``): the backward's ``G W`` from bf16 factors with float32
    accumulation. ``low_forward`` (the same, ``train.forward_products=bf16``): the forward's ``X Wᵀ`` likewise.
    The adapter's products and ∂L/∂A, ∂L/∂B stay in the adapter's dtype either way.
    """

    @staticmethod
    def forward(ctx, x, x_adapter, weight, bias, lora_a, lora_b, scaling, low=None, low_forward=None):
        shape = x.shape
        x2, xa2 = x.reshape(-1, shape[-1]), x_adapter.reshape(-1, shape[-1])
        hidden = xa2 @ lora_a.t()
        if low_forward is not None:  # X Wᵀ from bf16 factors, float32 accumulation, the result back in x's dtype
            out = (x2.to(low_forward.dtype) @ low_forward.t()).to(x2.dtype)
            if bias is not None:
                out.add_(bias)
        else:
            dense = dequantize(weight)  # a 4-bit weight: its compute-dtype values, for this product only
            out = torch.addmm(bias, x2, dense.t()) if bias is not None else x2 @ dense.t()
        out.addmm_(hidden, lora_b.t(), alpha=scaling)
        quantized = is_4bit(weight)
        ctx.save_for_backward(xa2, lora_a, lora_b, hidden, *(() if quantized else (weight,)))
        ctx.packed = weight if quantized else None  # dequantized again in the backward, never kept
        ctx.scaling, ctx.shape, ctx.same_input = scaling, shape, x_adapter is x
        ctx.low = low  # W in bf16 (train/products.py): G W from bf16 factors, float32 accumulation
        return out.view(*shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        xa2, lora_a, lora_b, hidden, *dense = ctx.saved_tensors
        s, shape = ctx.scaling, ctx.shape
        g = grad.reshape(-1, grad.shape[-1])
        gb = g @ lora_b  # (n×r)
        grad_x = grad_xa = grad_bias = grad_a = grad_b = None
        if ctx.needs_input_grad[0]:
            if ctx.low is not None:
                grad_x = (g.to(ctx.low.dtype) @ ctx.low).to(g.dtype)
            else:
                grad_x = g @ (dense[0] if dense else dequantize(ctx.packed))
            if ctx.same_input:
                grad_x.addmm_(gb, lora_a, alpha=s)
            grad_x = grad_x.view(shape)
        if ctx.needs_input_grad[1] and not ctx.same_input:
            grad_xa = (gb @ lora_a).mul_(s).view(shape)
        if ctx.needs_input_grad[3]:
            grad_bias = g.sum(0)
        # The two reductions over the n positions run as (d×n)(n×r) products and are returned transposed:
        # with r = 16 that orientation is ~25% faster on CPU (measured) than (r×n)(n×d).
        if ctx.needs_input_grad[4]:
            grad_a = (xa2.t() @ gb).mul_(s).t()
        if ctx.needs_input_grad[5]:
            grad_b = (hidden.t() @ g).mul_(s).t()
        return grad_x, grad_xa, None, grad_bias, grad_a, grad_b, None, None, None


def _lora_linear(x, x_adapter, weight, bias, lora_a, lora_b, scaling, low=None, low_forward=None):
    return _LoRALinearFunction.apply(x, x_adapter, weight, bias, lora_a, lora_b, scaling, low, low_forward)


_DEFAULTS = LoRASection()  # the typed config's defaults, where each field is documented for users


@dataclass
class LoRAConfig:
    """Which linear layers get an adapter, and its shape and scale; ``from_config`` builds a run's from its typed
    ``lora`` section, and the defaults are that section's."""

    r: int = _DEFAULTS.r
    """Rank of the update B·A."""
    alpha: float = _DEFAULTS.alpha
    """Scale numerator: the update is multiplied by alpha/r (alpha/√r with rsLoRA)."""
    dropout: float = _DEFAULTS.dropout
    """Dropout on the adapter's input (training only; the base path never sees it)."""
    target_modules: tuple[str, ...] | str = _DEFAULTS.target_modules
    """Module names matched by their last component(s) (``q_proj``, or ``self_attn.q_proj``, or a full path),
    or ``"all-linear"``: every ``nn.Linear`` except the output head."""
    use_rslora: bool = _DEFAULTS.use_rslora
    """Rank-stabilised LoRA: scale by alpha/√r, so the update's size does not shrink as r grows."""
    rank_pattern: dict[str, int] = field(default_factory=dict)
    """Per-module rank overrides, PEFT's rule: key ``k`` applies to a module whose full name matches the
    regex ``(.*\\.)?(k)$``; the first matching key wins."""
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    """Per-module alpha overrides, same matching rule as ``rank_pattern``."""

    def __post_init__(self):
        if isinstance(self.target_modules, str):
            if self.target_modules != ALL_LINEAR:
                raise TunesmithError(f"lora target_modules must be a list of module names or {ALL_LINEAR!r}, "
                                     f"got {self.target_modules!r}")
        else:
            self.target_modules = tuple(self.target_modules)
            if not self.target_modules:
                raise TunesmithError("lora target_modules is empty; name at least one module or use 'all-linear'")
        ranks = {"r": self.r, **{f"rank_pattern[{k!r}]": v for k, v in self.rank_pattern.items()}}
        for name, rank in ranks.items():
            if not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0:
                raise TunesmithError(f"lora {name} must be a positive integer, got {rank!r}")
        alphas = {"alpha": self.alpha, **{f"alpha_pattern[{k!r}]": v for k, v in self.alpha_pattern.items()}}
        for name, alpha in alphas.items():
            if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or alpha <= 0:
                raise TunesmithError(f"lora {name} must be a positive number, got {alpha!r}")
        if not isinstance(self.dropout, (int, float)) or isinstance(self.dropout, bool) or not 0 <= self.dropout < 1:
            raise TunesmithError(f"lora dropout must be in [0, 1), got {self.dropout!r}")

    @classmethod
    def from_config(cls, lora: LoRASection) -> LoRAConfig:
        """The adapter a run's typed ``lora`` section asks for: training, its checkpoints and the saved adapter
        build it this one way."""
        return cls(r=lora.r, alpha=lora.alpha, dropout=lora.dropout, target_modules=lora.target_modules,
                   use_rslora=lora.use_rslora)

    def rank_for(self, module_name: str) -> int:
        return _pattern_value(self.rank_pattern, module_name, self.r)

    def alpha_for(self, module_name: str) -> float:
        return _pattern_value(self.alpha_pattern, module_name, self.alpha)


def _pattern_value(patterns: dict, module_name: str, default):
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module_name):
            return value
    return default


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    """The registry of adapters: every ``LoRALinear`` in ``model`` by its module path."""
    return {name: module for name, module in model.named_modules() if isinstance(module, LoRALinear)}


def adapter_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The trainable adapter parameters by their names in ``model.named_parameters()``."""
    params = {}
    for name, module in lora_modules(model).items():
        params[f"{name}.lora_A.weight"] = module.lora_A.weight
        params[f"{name}.lora_B.weight"] = module.lora_B.weight
    return params


def linear_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The model's linear layers by name. A serving wrapper (``serves_as_linear``: the multi-adapter layer)
    stands for the linear layer it wraps, under that layer's name, so adapters are read against a served model
    as against its base."""
    modules = dict(model.named_modules())
    return {name: module for name, module in modules.items()
            if getattr(module, "serves_as_linear", False) or (
                isinstance(module, nn.Linear) and not getattr(modules.get(name.rpartition(".")[0]),
                                                              "serves_as_linear", False))}


def linear_module_names(model: nn.Module) -> list[str]:
    return list(linear_layers(model))


def _short_name(module_name: str) -> str:
    return module_name.rsplit(".", 1)[-1]


def _matches(module_name: str, target: str) -> bool:
    return module_name == target or module_name.endswith("." + target)


def _tied_to_embedding(module: nn.Module, model: nn.Module) -> bool:
    return any(isinstance(m, nn.Embedding) and m.weight is module.weight for m in model.modules())


def _is_output_head(name: str, module: nn.Module, model: nn.Module) -> bool:
    get_output = getattr(model, "get_output_embeddings", None)
    return (_short_name(name) == _OUTPUT_HEAD_NAME or (callable(get_output) and get_output() is module)
            or _tied_to_embedding(module, model))


def select_target_modules(model: nn.Module, target_modules: tuple[str, ...] | str, *,
                          strict: bool = True) -> list[str]:
    """Names of the ``nn.Linear`` modules that ``target_modules`` picks, in model order.

    With ``strict``, every target name must match something; otherwise at least one must.
    """
    linear = linear_layers(model)
    if target_modules == ALL_LINEAR:
        return [name for name, module in linear.items() if not _is_output_head(name, module, model)]
    selected = [name for name in linear if any(_matches(name, t) for t in target_modules)]
    unmatched = [t for t in target_modules if not any(_matches(name, t) for name in linear)]
    if unmatched and (strict or not selected):
        available = ", ".join(sorted({_short_name(name) for name in linear}))
        raise TunesmithError(f"LoRA target module(s) {', '.join(map(repr, unmatched))} match no linear layer "
                             f"of this model; available linear modules: {available}")
    tied = [name for name in selected if _tied_to_embedding(linear[name], model)]
    if tied:
        # Merging into a tied head would also change the input embedding it shares its weight with.
        raise TunesmithError(f"{', '.join(tied)} shares its weight with the input embedding, so a LoRA on it "
                             "could not be merged; drop it from target_modules")
    return selected


def wrap_modules(model: nn.Module, names: list[str], config: LoRAConfig) -> None:
    """Replace each named linear module in place by a ``LoRALinear`` owning it."""
    for name in names:
        parent_name, _, child_name = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        wrapped = LoRALinear(getattr(parent, child_name), r=config.rank_for(name), alpha=config.alpha_for(name),
                             dropout=config.dropout, use_rslora=config.use_rslora)
        setattr(parent, child_name, wrapped)


def inject_lora(model: nn.Module, config: LoRAConfig) -> list[str]:
    """Wrap the linear layers picked by ``config.target_modules``; returns their module names.

    Adapters are initialised from torch's global RNG, so the same seed gives the same adapters.
    """
    if lora_modules(model):
        raise TunesmithError("this model already has LoRA adapters; inject them once, into the base model")
    names = select_target_modules(model, config.target_modules)
    wrap_modules(model, names, config)
    return names


def freeze_base(model: nn.Module) -> None:
    """``requires_grad`` off for every parameter except the adapters' A and B."""
    adapters = adapter_parameters(model)
    if not adapters:
        raise TunesmithError("the model has no LoRA adapters, so freezing the base would leave nothing to train; "
                             "call inject_lora first")
    for param in model.parameters():
        param.requires_grad_(False)
    for param in adapters.values():
        param.requires_grad_(True)


def merge_all(model: nn.Module) -> None:
    for module in lora_modules(model).values():
        module.merge()


def unmerge_all(model: nn.Module) -> None:
    for module in lora_modules(model).values():
        module.unmerge()


@contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Run ``model`` as its base model inside the block (e.g. the DPO reference); restores the switches after."""
    modules = lora_modules(model).values()
    if any(m.merged for m in modules):
        raise TunesmithError("cannot disable merged LoRA adapters; call unmerge_all(model) first")
    previous = [m.disabled for m in modules]
    for module in modules:
        module.disabled = True
    try:
        yield model
    finally:
        for module, was_disabled in zip(modules, previous):
            module.disabled = was_disabled
