"""Load any causal LM: a local HF dir, a hub id, a ``.gguf`` file, or ``default`` (the embedded model)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from tunesmith.errors import TunesmithError
from tunesmith.hub import HUB_ID, hub_reachable
from tunesmith.models.defaults import dequantized_dir, embedded_gguf_path
from tunesmith.train.dist import SharedError, launched_by_torchrun

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
    """``auto``: CUDA when available, else CPU; anything else must name a device this machine has.

    Under torchrun with several processes, ``cuda`` (and ``auto`` with CUDA) is this process's own GPU,
    ``cuda:LOCAL_RANK``; an explicit ``cuda:N`` would put every process on one GPU and is refused (once, by
    rank 0: every rank finds the same error)."""
    if device in (None, "auto"):
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        dev = None
    processes = int(os.environ.get("WORLD_SIZE", "1")) if launched_by_torchrun() else 1
    if dev is not None and dev.type == "cuda" and processes > 1:
        if dev.index is not None:
            raise SharedError(f"model.device={device} with {processes} processes would put every process on "
                              "that one GPU; use model.device=cuda (each process takes cuda:LOCAL_RANK)")
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise TunesmithError(f"unknown device {device!r} (--device / model.device); use auto, cpu, cuda or cuda:N")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise TunesmithError(f"device {device!r} was asked for but CUDA is not available on this machine; "
                             "use --device cpu (config: model.device=cpu) or auto")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise TunesmithError(f"device {device!r} was asked for but this machine has {torch.cuda.device_count()} "
                             "CUDA device(s), numbered from cuda:0")
    return dev


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


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt")


def _load_error(model_dir: Path | str, what: str, exc: Exception) -> TunesmithError:
    """``what`` (a file, or the tokenizer in ``model_dir``) could not be loaded: say why and what to do."""
    if "trust_remote_code" in str(exc):
        return TunesmithError(f"{model_dir} ships its own model code (auto_map in its config), which runs only with "
                              "the command-line flag --trust-remote-code (no config file can grant it); pass it "
                              f"only if you trust the code in {model_dir}")
    first_paragraph = " ".join(str(exc).strip().split("\n\n")[0].split())
    return TunesmithError(f"cannot load {what}: {first_paragraph}; fix it or restore it from the "
                          "model's source")


def load_tokenizer(source: str, *, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    path = resolve_path(source)
    if isinstance(path, Path) and not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise TunesmithError(f"{path} holds no tokenizer (none of {', '.join(TOKENIZER_FILES)}); copy the "
                             "tokenizer files of the model it came from into it")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError) as exc:  # transformers' wording for unreadable tokenizer files
        raise _load_error(path, f"the tokenizer in {path}", exc) from exc
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model_config(path: Path | str, *, trust_remote_code: bool = False):
    """The model's ``PretrainedConfig``; a broken ``config.json`` is an error naming the file and the problem."""
    from huggingface_hub.errors import StrictDataclassError
    from transformers import AutoConfig

    config_file = Path(path) / "config.json"
    if isinstance(path, Path):  # read it ourselves first: transformers' errors for these lack the file or line
        try:
            raw = json.loads(config_file.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise TunesmithError(f"{config_file} is not valid JSON ({exc}); restore it from the model's source") \
                from exc
        if not isinstance(raw, dict) or not isinstance(raw.get("model_type"), str):
            raise TunesmithError(f"{config_file} has no \"model_type\" (e.g. \"llama\"); it is not a Hugging Face "
                                 "model config: restore it from the model's source")
    try:
        return AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError, StrictDataclassError) as exc:  # e.g. a field of the wrong type
        raise _load_error(path, str(config_file), exc) from exc


def check_weights(path: Path) -> None:
    """Refuse missing or damaged safetensors files by name, before transformers fails on them mid-load."""
    from safetensors import SafetensorError, safe_open

    index = path / "model.safetensors.index.json"
    try:
        files = sorted({path / shard for shard in json.loads(index.read_text())["weight_map"].values()}) \
            if index.is_file() else sorted(path.glob("*.safetensors"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
        raise TunesmithError(f"{index} is not a valid safetensors index ({exc}); restore it from the model's source") \
            from exc
    if not files and any(path.glob("pytorch_model*.bin")):
        raise TunesmithError(
            f"{path} holds its weights only as PyTorch pickle files (pytorch_model*.bin); tunesmith never loads "
            "pickles (loading one can run code). Convert them to safetensors where you trust the file, e.g. "
            f"AutoModelForCausalLM.from_pretrained('{path}').save_pretrained('{path}-safetensors'), and pass that dir")
    if not files:
        raise TunesmithError(f"{path} holds no model weights (model.safetensors); copy the weight files into it")
    for file in files:
        if not file.is_file():
            raise TunesmithError(f"{file} is missing ({index.name} lists it); copy it from the model's source")
        try:
            with safe_open(str(file), framework="pt"):
                pass
        except (OSError, SafetensorError) as exc:
            raise TunesmithError(f"{file} is damaged or truncated ({exc}), e.g. by an interrupted download or "
                                 "copy; copy it again from the model's source") from exc


def load(source: str = DEFAULT_MODEL, *, dtype: str | None = "auto", device: str | None = "auto",
         trust_remote_code: bool = False, tokenizer=None) -> LoadedModel:
    """Load model and tokenizer; the model is in eval mode on the resolved device and dtype. ``tokenizer``: one
    already loaded from ``source``, used instead of loading it again."""
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    path = resolve_path(source)
    dev = resolve_device(device)
    config = load_model_config(path, trust_remote_code=trust_remote_code)
    if tokenizer is None:
        tokenizer = load_tokenizer(source, trust_remote_code=trust_remote_code)
    if isinstance(path, Path):
        check_weights(path)
    if getattr(config, "quantization_config", None):  # a saved 4-bit model: transformers imports bitsandbytes
        from tunesmith.quant.bnb import quiet_bitsandbytes_import

        quiet_bitsandbytes_import()
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(path), config=config, dtype=resolve_dtype(dtype, dev), trust_remote_code=trust_remote_code,
            use_safetensors=True,  # never a pickle (pytorch_model.bin), also for a hub id
        )
    except (OSError, SafetensorError) as exc:
        raise TunesmithError(f"cannot load model from {path}: {exc}") from exc
    model.to(dev).eval()
    return LoadedModel(model=model, tokenizer=tokenizer, source=source, path=path)
