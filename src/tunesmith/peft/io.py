"""Adapters on disk in PEFT's format, so ``peft``, vLLM and others load what we save and we load what they save.

An adapter dir holds two files:

- ``adapter_config.json``: ``peft_type: "LORA"``, ``r``, ``lora_alpha``, ``target_modules``, ``use_rslora``,
  ``rank_pattern`` / ``alpha_pattern`` (per-module overrides), and fields pinned to what we implement
  (``bias: "none"``, ``use_dora: false``, ...).
- ``adapter_model.safetensors``: ``base_model.model.<module path>.lora_A.weight`` (r×d_in) and
  ``.lora_B.weight`` (d_out×r) for every adapted module; PEFT drops its adapter name ("default") from the keys.
  Its metadata (which PEFT ignores) holds ``tunesmith_base``: a fingerprint of the base model the adapter was
  trained on, checked by ``load_adapter`` (see ``base_fingerprint``).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_bytes
from torch import nn

from tunesmith.errors import TunesmithError
from tunesmith.peft.lora import (ALL_LINEAR, LoRAConfig, linear_module_names, lora_modules,
                                 select_target_modules, wrap_modules)

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
KEY_PREFIX = "base_model.model."
FINGERPRINT_KEY = "tunesmith_base"
FINGERPRINT_RTOL = 1e-2  # bf16 rounding moves a row norm by < 0.2%; another base's rows differ by far more
_FINGERPRINT_ROWS = 8

# PEFT features that change the forward pass or the weights beyond plain LoRA: (field, value meaning "off").
_UNSUPPORTED = {"use_dora": False, "lora_bias": False, "fan_in_fan_out": False, "use_qalora": False,
                "modules_to_save": None, "layers_to_transform": None, "exclude_modules": None,
                "target_parameters": None, "trainable_token_indices": None, "layer_replication": None,
                "alora_invocation_tokens": None}


def _peft_config(config: LoRAConfig, target_modules: list[str], base_model_name_or_path: str) -> dict:
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "revision": None,
        "inference_mode": True,
        "r": config.r,
        "lora_alpha": config.alpha,
        "lora_dropout": config.dropout,
        "use_rslora": config.use_rslora,
        "target_modules": target_modules,
        "rank_pattern": dict(config.rank_pattern),
        "alpha_pattern": dict(config.alpha_pattern),
        "bias": "none",
        "init_lora_weights": True,
        **_UNSUPPORTED,
    }


def _saved_target_modules(model: nn.Module, wrapped: list[str]) -> list[str]:
    """Short names (``q_proj``) when they pick exactly the wrapped modules, else the full module paths."""
    short = {name.rsplit(".", 1)[-1] for name in wrapped}
    inside_adapters = tuple(f"{name}." for name in wrapped)
    others = [n for n in linear_module_names(model) if not n.startswith(inside_adapters)]
    if any(n.rsplit(".", 1)[-1] in short for n in others):
        return sorted(wrapped)
    return sorted(short)


def base_fingerprint(model: nn.Module) -> dict | None:
    """Statistics of the weights QLoRA never quantizes, to tell the base an adapter was trained on from another.

    The L2 norms (in float64) of a few rows of the input embedding, spread over the vocabulary, and of every
    norm layer's weight. They survive what changes between training and use: the linear layers' 4-bit
    quantization (these layers stay dense) and the dtype (fp32 on CPU, bf16 on GPU: compared with a relative
    tolerance); another model of the same shape, even the same architecture with another seed, differs.
    None for a model without input embeddings.
    """
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embeddings is None:
        return None
    weight = embeddings.weight.detach()
    rows = torch.linspace(0, weight.shape[0] - 1, _FINGERPRINT_ROWS).long().to(weight.device)
    norms = [m.weight.detach() for m in model.modules()
             if "norm" in type(m).__name__.lower() and isinstance(getattr(m, "weight", None), torch.Tensor)]
    statistics = weight[rows].double().norm(dim=-1).tolist() + [float(w.double().norm()) for w in norms]
    return {"name": getattr(model, "name_or_path", None) or None, "embedding_shape": list(weight.shape),
            "statistics": statistics}


def adapter_metadata(model: nn.Module) -> dict[str, str]:
    """The safetensors metadata of an adapter file trained on ``model``'s base."""
    fingerprint = base_fingerprint(model)
    return {"format": "pt", **({FINGERPRINT_KEY: json.dumps(fingerprint)} if fingerprint else {})}


def stable_safetensors(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """A safetensors file whose bytes depend on the tensors and metadata only.

    The safetensors library writes its metadata from a hash map, so the keys' order (and the file's hash)
    changes from one process to the next though the tensors are equal. Here the header is written again with
    the metadata keys sorted; the header keeps its length (the same entries, reordered), so every data offset
    holds.
    """
    data = safetensors_bytes(tensors, metadata=metadata)
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + length])
    header["__metadata__"] = dict(sorted(header.get("__metadata__", {}).items()))
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    if len(text) > length:
        raise AssertionError("safetensors header grew when its metadata was sorted")
    return data[:8] + text.ljust(length, b" ") + data[8 + length:]


def _check_base(model: nn.Module, saved_json: str, weights_path: Path, config_path: Path) -> None:
    """Refuse to apply an adapter to a base other than the one it was trained on (same shape, other weights)."""
    try:
        saved = json.loads(saved_json)
    except json.JSONDecodeError:
        saved = None
    if not isinstance(saved, dict):
        raise TunesmithError(f"adapter weights {weights_path}: its {FINGERPRINT_KEY} metadata is unreadable; "
                             "save the adapter again")
    current = base_fingerprint(model)
    if current is None:
        return
    saved_statistics, statistics = saved.get("statistics", []), current["statistics"]
    same = (saved.get("embedding_shape") == current["embedding_shape"] and len(saved_statistics) == len(statistics)
            and all(math.isclose(a, b, rel_tol=FINGERPRINT_RTOL) for a, b in zip(saved_statistics, statistics)))
    if not same:
        # the name the user gave at training time (config.yaml's model.source) before the resolved path
        trained_on = json.loads(config_path.read_text()).get("base_model_name_or_path") or saved.get("name") \
            or "another model"
        raise TunesmithError(f"adapter {weights_path} was trained on {trained_on}, and this base model "
                             f"({current['name'] or 'the one given'}) is a different one: their embedding and norm "
                             f"weights differ; apply the adapter to {trained_on} (merge / eval: --base)")


def save_adapter(model: nn.Module, config: LoRAConfig, out_dir: str | os.PathLike, *,
                 base_model_name_or_path: str) -> Path:
    """Write ``model``'s adapters to ``out_dir`` in PEFT's format; returns the dir.

    The files are written to a temporary dir beside ``out_dir`` and renamed into place, so a crash leaves
    either the old adapter or the new one, never half of one. An existing ``out_dir`` is replaced only when
    it holds nothing but adapter files.
    """
    adapters = lora_modules(model)
    if not adapters:
        raise TunesmithError("the model has no LoRA adapters to save; call inject_lora first")
    for name, module in adapters.items():
        expected = (config.rank_for(name), config.alpha_for(name), config.use_rslora)
        if (module.r, module.alpha, module.use_rslora) != expected:
            raise TunesmithError(f"adapter {name} has r={module.r}, alpha={module.alpha}, "
                                 f"use_rslora={module.use_rslora} but the config says r, alpha, use_rslora = "
                                 f"{expected}; save with the config the adapters were made from")
    out_dir = Path(out_dir)
    is_adapter_dir = out_dir.is_dir() and {p.name for p in out_dir.iterdir()} <= {CONFIG_NAME, WEIGHTS_NAME}
    if out_dir.exists() and not is_adapter_dir:
        raise TunesmithError(f"{out_dir} exists and is not an adapter dir; choose another output path")
    tensors = {}
    for name, module in adapters.items():
        tensors[f"{KEY_PREFIX}{name}.lora_A.weight"] = module.lora_A.weight.detach().cpu().contiguous()
        tensors[f"{KEY_PREFIX}{name}.lora_B.weight"] = module.lora_B.weight.detach().cpu().contiguous()
    peft_config = _peft_config(config, _saved_target_modules(model, list(adapters)), base_model_name_or_path)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        (tmp / CONFIG_NAME).write_text(json.dumps(peft_config, indent=2, sort_keys=True) + "\n")
        (tmp / WEIGHTS_NAME).write_bytes(stable_safetensors(tensors, adapter_metadata(model)))
        if out_dir.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
            os.replace(out_dir, old / out_dir.name)
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _read_config(path: Path, linear_names: list[str]) -> LoRAConfig:
    if not path.is_file():
        raise TunesmithError(f"no adapter config at {path}; an adapter dir needs {CONFIG_NAME} and {WEIGHTS_NAME}")
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TunesmithError(f"cannot read adapter config {path}: {exc}") from exc
    if not isinstance(raw, dict):
        raise TunesmithError(f"adapter config {path} is not a JSON object")
    if raw.get("peft_type") != "LORA":
        raise TunesmithError(f"adapter config {path} has peft_type {raw.get('peft_type')!r}; only LORA is supported")
    on = [f"{key}={raw[key]!r}" for key in _UNSUPPORTED if raw.get(key) not in (None, False, [], {})]
    if raw.get("bias", "none") != "none":
        on.append(f"bias={raw['bias']!r}")
    if on:
        raise TunesmithError(f"adapter config {path} uses {', '.join(on)}, which tunesmith does not support "
                             "(plain LoRA / rsLoRA only)")
    missing = [key for key in ("r", "lora_alpha", "target_modules") if raw.get(key) is None]
    if missing:
        raise TunesmithError(f"adapter config {path} lacks {', '.join(missing)}")
    targets = raw["target_modules"]
    patterns = [("target_modules", targets)] if isinstance(targets, str) and targets != ALL_LINEAR else []
    for key in ("rank_pattern", "alpha_pattern"):
        value = raw.get(key) or {}
        if not isinstance(value, dict):
            raise TunesmithError(f"adapter config {path}: {key} must be an object (module pattern → value)")
        patterns += [(key, pattern) for pattern in value]
    for key, pattern in patterns:
        try:
            re.compile(pattern)
        except re.error as exc:
            raise TunesmithError(f"adapter config {path}: {key} {pattern!r} is not a valid regular expression "
                                 f"({exc}); fix it in {CONFIG_NAME}") from None
    if isinstance(targets, str) and targets != ALL_LINEAR:
        # PEFT reads any other string as a regex over full module names.
        targets = [name for name in linear_names if re.fullmatch(targets, name)]
        if not targets:
            raise TunesmithError(f"adapter config {path}: target_modules regex {raw['target_modules']!r} "
                                 "matches no linear layer of this model")
    try:
        return LoRAConfig(r=raw["r"], alpha=raw["lora_alpha"], dropout=raw.get("lora_dropout") or 0.0,
                          target_modules=targets, use_rslora=bool(raw.get("use_rslora", False)),
                          rank_pattern=raw.get("rank_pattern") or {}, alpha_pattern=raw.get("alpha_pattern") or {})
    except TunesmithError as exc:
        raise TunesmithError(f"adapter config {path}: {exc}") from exc


def _listed(keys: set[str], limit: int = 6) -> str:
    shown = sorted(keys)[:limit]
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(shown) + more


def load_adapter(model: nn.Module, adapter_dir: str | os.PathLike) -> LoRAConfig:
    """Wrap ``model``'s target layers with ``LoRALinear`` and load a PEFT-format LoRA adapter into them.

    Every key of the file must land on an adapted layer with the right shape and every adapted layer must be
    in the file; otherwise nothing is changed and the error names the keys (usually: an adapter trained for
    another base model).
    """
    if lora_modules(model):
        raise TunesmithError("this model already has LoRA adapters; load an adapter into a fresh base model")
    config, names, tensors = read_adapter(model, adapter_dir)
    wrap_modules(model, names, config)
    adapters = lora_modules(model)
    for name in names:
        adapters[name].lora_A.weight.data.copy_(tensors[f"{KEY_PREFIX}{name}.lora_A.weight"])
        adapters[name].lora_B.weight.data.copy_(tensors[f"{KEY_PREFIX}{name}.lora_B.weight"])
    return config


def read_adapter(model: nn.Module, adapter_dir: str | os.PathLike
                 ) -> tuple[LoRAConfig, list[str], dict[str, torch.Tensor]]:
    """A PEFT-format LoRA adapter for ``model``'s base, checked against it and not yet applied: its config, the
    names of the layers it adapts, and its tensors (``KEY_PREFIX<name>.lora_A.weight`` / ``lora_B``)."""
    adapter_dir = Path(adapter_dir)
    config_path, weights_path = adapter_dir / CONFIG_NAME, adapter_dir / WEIGHTS_NAME
    config = _read_config(config_path, linear_module_names(model))
    try:
        names = select_target_modules(model, config.target_modules, strict=False)
    except TunesmithError as exc:
        raise TunesmithError(f"adapter config {config_path}: {exc}") from exc
    if not weights_path.is_file():
        hint = " (adapter_model.bin is a pickle, which tunesmith never loads)" if (
            adapter_dir / "adapter_model.bin").exists() else ""
        raise TunesmithError(f"no adapter weights at {weights_path}{hint}")
    try:
        with safe_open(str(weights_path), framework="pt") as f:
            tensors = {key: f.get_tensor(key) for key in f.keys()}
            metadata = f.metadata() or {}
    except (OSError, SafetensorError) as exc:
        raise TunesmithError(f"cannot read adapter weights {weights_path}: {exc}") from exc

    expected_shapes = {}
    for name in names:
        base, r = model.get_submodule(name), config.rank_for(name)
        expected_shapes[f"{KEY_PREFIX}{name}.lora_A.weight"] = (r, base.in_features)
        expected_shapes[f"{KEY_PREFIX}{name}.lora_B.weight"] = (base.out_features, r)
    missing, unexpected = set(expected_shapes) - set(tensors), set(tensors) - set(expected_shapes)
    if missing or unexpected:
        parts = ([f"missing keys: {_listed(missing)}"] if missing else []) + (
            [f"unexpected keys: {_listed(unexpected)}"] if unexpected else [])
        raise TunesmithError(f"adapter weights {weights_path} do not fit this model ({'; '.join(parts)}); "
                             "was the adapter trained for a different base model?")
    wrong = [f"{key} is {tuple(tensors[key].shape)} in the file, the model needs {shape}"
             for key, shape in expected_shapes.items() if tuple(tensors[key].shape) != shape]
    if wrong:
        raise TunesmithError(f"adapter weights {weights_path} do not fit this model: {'; '.join(wrong[:6])}; "
                             "was the adapter trained for a different base model?")

    if FINGERPRINT_KEY in metadata:  # adapters made elsewhere (PEFT) carry none and load as before
        _check_base(model, metadata[FINGERPRINT_KEY], weights_path, config_path)
    return config, names, tensors
