"""Model loading: local HF dirs, hub ids, GGUF files and the embedded default."""

from tunesmith.models.load import LoadedModel, load, load_tokenizer, resolve_device, resolve_dtype

__all__ = ["LoadedModel", "load", "load_tokenizer", "resolve_device", "resolve_dtype"]
