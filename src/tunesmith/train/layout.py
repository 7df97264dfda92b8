"""How a training batch is laid out for the model: chosen once at setup, installed once, never changed per call.

Layouts (all give the plain forward's loss and gradients; tested):

    layout  what runs                                                   chosen by ``auto`` when
    rows    the shared prefix once, each row's real tokens after it,   CPU, SDPA attention, no checkpointing
            attention row by row (``train.rows``), last block at the
            trained positions only (``train.trim``)
    flat    the same flat sequence, attention masked by the model's     SDPA or eager attention otherwise
            own SDPA / eager kernel; last block trimmed too
    varlen  every example's real tokens in one row (packed rows end     under CUDA graphs (the engine installs it
            to end), PyTorch's variable-length flash kernel, no mask;   for ``train/graphs.py``); eager: never
            last block trimmed                                          (slower than plain on an H200; forced
                                                                        with train.layout=varlen)
    cache   the prefix once, its key/value cache repeated over the      flash attention (transformers')
            batch, the rows' suffixes at full batch size
    plain   the batch as given (packed rows with per-row positions,     GPUs; packed batches; sliding-window
            sliding-window or hybrid caches)                            or soft-capped attention

``install_layout`` does what a layout needs from the model once, before the first step: ``rows`` (``varlen``)
sets the model's attention implementation to ``train.rows``'s (``train.varlen``'s) function through
transformers' public ``set_attn_implementation`` (without a plan in the call it runs SDPA, so generation and
evaluation are unchanged); ``rows``, ``flat`` and ``varlen`` add the trimming hooks to the last block
(``train.trim``). After that no forward changes a module or a config attribute: per-batch information (the row
plan, the trained positions) travels as keyword arguments of the decoder call, which transformers hands to every
block and attention call. Without the installation those arguments are ignored and the same loss comes out,
only slower.

A batch that does not fit its layout (left padding, more than ``FLAT_MAX_TOKENS`` flat tokens, rows longer than
a sliding window) runs as ``cache`` or ``plain`` for that batch alone.
"""

from __future__ import annotations

import inspect
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch

from tunesmith.errors import TunesmithError
from tunesmith.train import rows, varlen
from tunesmith.train.decoder import attention_implementation, decoder_layers, plain_causal_attention
from tunesmith.train.trim import install_last_block_trim

LAYOUTS = ("rows", "flat", "varlen", "cache", "plain")


@dataclass(frozen=True)
class Layout:
    name: str
    reason: str
    trimmed: bool = False  # the last block computes its position-wise parts at trained positions only

    def summary(self) -> dict:
        return asdict(self)


def _passes_keywords(model) -> bool:
    """Whether the decoder hands extra keyword arguments down to its blocks (transformers' ``**kwargs`` models)."""
    decoder = model.get_decoder()
    return any(p.kind is p.VAR_KEYWORD for p in inspect.signature(decoder.forward).parameters.values())


def _underlying_attention(model) -> str:
    """The model's attention implementation, with ``rows`` / ``varlen`` (installed by an earlier run on this
    model object) read as the SDPA they run underneath."""
    implementation = attention_implementation(model)
    return "sdpa" if implementation in (rows.NAME, varlen.NAME) else implementation


def _plain(model, max_length: int) -> bool:
    """SDPA or eager attention, plain causal softmax, and a decoder that hands per-call plans to its blocks."""
    return (_underlying_attention(model) in ("sdpa", "eager") and plain_causal_attention(model.config, max_length)
            and _passes_keywords(model))


def runs_varlen(model, device: torch.device, max_length: int) -> bool:
    """Whether the ``varlen`` layout can run this model (``train/graphs.py`` lays every batch out in it)."""
    return _plain(model, max_length) and not getattr(model.config, "attention_dropout", 0.0) and (
        device.type != "cuda" or varlen.available())


def choose_layout(model, device: torch.device, *, requested: str = "auto", batching: str = "pad",
                  max_length: int = 512, checkpointing: bool = False) -> Layout:
    """The layout for training ``model`` on ``device`` (see the module docstring); ``requested`` forces one
    (``train.layout``), refused when the model or the batching cannot run it."""
    implementation = _underlying_attention(model)
    flat_ok = _plain(model, max_length) and batching != "pack"
    # On a GPU auto takes the padded batch: measured on an H200 (BENCHMARKS.md), it beat the masked flat row by
    # 18% and the varlen kernel by 9-33% (tutorial shape, 8 chats per step); varlen stays forceable
    varlen_ok = runs_varlen(model, device, max_length)
    trim = not checkpointing  # checkpointed blocks recompute after the call: keep the last block whole
    if requested != "auto":
        why = {"rows": None if flat_ok and implementation == "sdpa" else
               "SDPA attention, plain causal softmax (no sliding window below data.max_length, no soft-capping) "
               "and padded batches (data.batching=pad or bucket)",
               "flat": None if flat_ok else
               "SDPA or eager attention, plain causal softmax and padded batches (data.batching=pad or bucket)",
               "varlen": None if varlen_ok else "SDPA or eager attention, plain causal softmax, no attention "
               "dropout and, on CUDA, torch.nn.attention.varlen",
               "cache": None if batching != "pack" else "padded batches (data.batching=pad or bucket)",
               "plain": None}
        if requested not in why:
            raise TunesmithError(f"train.layout={requested!r} is not a layout; choose auto, {', '.join(LAYOUTS)}")
        if why[requested]:
            raise TunesmithError(f"train.layout={requested} needs {why[requested]}; this run has "
                                 f"{implementation} attention and data.batching={batching}. Use train.layout=auto")
        return Layout(requested, "train.layout", trimmed=trim and requested in ("rows", "flat", "varlen"))
    if batching == "pack":
        return Layout("plain", "packed rows carry their own positions")
    if flat_ok and implementation == "sdpa" and device.type == "cpu" and not checkpointing:
        return Layout("rows", "CPU with SDPA attention", trimmed=True)
    if flat_ok and device.type == "cpu":
        return Layout("flat", f"{implementation} attention on the CPU"
                      + (" with gradient checkpointing" if checkpointing else ""), trimmed=trim)
    if implementation.startswith("flash"):
        return Layout("cache", f"{implementation}: no block mask, the prefix's cache is shared instead")
    if flat_ok:
        return Layout("plain", f"{implementation} attention on {device.type}: the padded batch (measured faster "
                      "there than the flat row and the varlen kernel)")
    return Layout("plain", f"{implementation} attention, sliding window or soft-capping: the batch as given")


@contextmanager
def rows_for_evaluation(model, max_length: int):
    """Row attention (``rows``) for the duration, where a CPU model runs plain SDPA that training would lay out
    as ``rows``: a held-out loss before training then runs as it does after (measured on the demo's 100 rows:
    10.7 against 12.7 s, the same loss). SDPA is put back after; any other model is left as it is."""
    device = next(model.parameters()).device
    if attention_implementation(model) != "sdpa" or device.type != "cpu" or not _plain(model, max_length):
        yield
        return
    rows.install_row_attention(model)
    try:
        yield
    finally:
        model.set_attn_implementation("sdpa")


def install_layout(model, layout: Layout) -> Layout:
    """Prepare ``model`` for ``layout`` once (see the module docstring); returns the layout as installed."""
    if layout.name == "rows":
        rows.install_row_attention(model)
    if layout.name == "varlen":
        varlen.install_varlen_attention(model)
    trimmed = False
    if layout.trimmed:
        layers = decoder_layers(model)
        trimmed = bool(layers) and install_last_block_trim(layers[-1])
    return Layout(layout.name, layout.reason, trimmed=trimmed)


def resolve(model, layout: str) -> str:
    """``layout`` for one call: a named layout as is; ``auto`` from how the model is installed."""
    if layout != "auto":
        return layout
    implementation = attention_implementation(model)
    if implementation == rows.NAME:
        return "rows"
    if implementation == varlen.NAME:
        return "varlen"
    if implementation in ("sdpa", "eager"):
        return "flat"
    return "cache" if implementation.startswith("flash") else "plain"

