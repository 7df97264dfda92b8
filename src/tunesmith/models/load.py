"""Load any causal LM: a local HF dir, a hub id, a ``.gguf`` file, or ``default`` (the embedded model)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from tunesmith.errors import TunesmithError
from tunesmith.hub import HUB_ID, hub_reachable
from tunesmith.models.defaults import dequantized_dir, embedded_gguf_path

DEFAULT_MODEL = "default"
_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
           "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    source: str
    path: Path | str


def resolve_device(device: str | None = "auto") -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise TunesmithError(f"device {device!r} was asked for but CUDA is not available; use device=cpu")
    return torch.device(device)


def resolve_dtype(dtype: str | None, device: torch.device) -> torch.dtype:
    """``auto``: fp32 on CPU, bf16 on CUDA when the card supports it, else fp32."""
    if dtype in (None, "auto"):
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if dtype not in _DTYPES:
        raise TunesmithError(f"unknown dtype {dtype!r}; choose one of auto, {', '.join(sorted(_DTYPES))}")
    return _DTYPES[dtype]


def resolve_path(source: str) -> Path | str:
    """Turn a model source into something ``from_pretrained`` can read without surprises."""
    if source == DEFAULT_MODEL:
        return dequantized_dir(embedded_gguf_path())
    path = Path(source).expanduser()
    if path.suffix == ".gguf":
        return dequantized_dir(path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise TunesmithError(f"{path} is a directory but holds no config.json; point at a Hugging Face model dir")
        return path
    if path.exists():
        raise TunesmithError(f"{path} is neither a model directory nor a .gguf file")
    if not HUB_ID.match(source):
        raise TunesmithError(f"model {source!r} not found: no such directory or file, and it is not a hub id (org/name)")
    from huggingface_hub import snapshot_download

    try:  # a copy already in the local hub cache works offline
        return Path(snapshot_download(source, local_files_only=True))
    except Exception:
        pass
    if not hub_reachable():
        raise TunesmithError(
            f"model {source!r} looks like a hub id but the model hub cannot be reached (offline); "
            "download it elsewhere and pass its local directory, or use --model default"
        )
    return source


def load_tokenizer(source: str, *, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    path = resolve_path(source)
    tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load(source: str = DEFAULT_MODEL, *, dtype: str | None = "auto", device: str | None = "auto",
         trust_remote_code: bool = False) -> LoadedModel:
    """Load model and tokenizer; the model is in eval mode on the resolved device and dtype."""
    from transformers import AutoModelForCausalLM

    path = resolve_path(source)
    dev = resolve_device(device)
    tokenizer = load_tokenizer(source, trust_remote_code=trust_remote_code)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(path), dtype=resolve_dtype(dtype, dev), trust_remote_code=trust_remote_code
        )
    except OSError as exc:
        raise TunesmithError(f"cannot load model from {path}: {exc}") from exc
    model.to(dev).eval()
    return LoadedModel(model=model, tokenizer=tokenizer, source=source, path=path)
