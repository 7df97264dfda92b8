"""Training-step helpers: supervised loss at trained positions only, token-normalised accumulation,
clipping and the non-finite policy. The recipe files call these; the loop itself stays in the recipe.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tunesmith.templates import IGNORE_INDEX


def trained_tokens(batch: dict) -> int:
    """Tokens that carry a loss: labels are shifted by one, so the first position never does."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def autocast_for(device: torch.device, dtype: torch.dtype):
    """bf16/fp16 autocast on CUDA; nothing on CPU, where training runs in fp32."""
    if device.type == "cuda" and dtype in (torch.bfloat16, torch.float16):
        return torch.autocast("cuda", dtype=dtype)
    return contextlib.nullcontext()


def supervised_loss_sum(model, batch: dict) -> torch.Tensor:
    """Summed next-token cross-entropy over trained positions.

    The shift happens here: hidden state ``t`` predicts ``labels[t + 1]``. Only the positions whose
    target is trained go through the output head, so prompt tokens never produce full-vocabulary
    logits (the head is a large share of a small model's compute and memory).
    """
    inputs = {key: batch[key] for key in ("attention_mask", "position_ids") if key in batch}
    hidden = model.get_decoder()(input_ids=batch["input_ids"], use_cache=False, **inputs).last_hidden_state
    targets = batch["labels"][:, 1:]
    keep = targets != IGNORE_INDEX
    logits = model.get_output_embeddings()(hidden[:, :-1][keep]).float()
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        logits = cap * torch.tanh(logits / cap)
    return F.cross_entropy(logits, targets[keep], reduction="sum")


@dataclass
class StepResult:
    loss: float  # mean loss per trained token over the whole accumulated batch
    grad_norm: float
    trained: int
    skipped: bool


def accumulate_and_step(model, optimizer, params: list[torch.nn.Parameter], micro_batches: list[dict], *,
                        lr: float, max_grad_norm: float | None, device: torch.device,
                        dtype: torch.dtype, on_micro_batch=None) -> StepResult:
    """One optimizer step over ``micro_batches``.

    Each micro-batch's summed loss is divided by the trained tokens of the WHOLE accumulated batch,
    so micro-batch 4 × accumulation 1 and micro-batch 1 × accumulation 4 give the same gradient.
    A non-finite loss or gradient leaves parameters and optimizer state untouched (``skipped``).
    """
    total = sum(trained_tokens(b) for b in micro_batches)
    loss_value = 0.0
    for index, batch in enumerate(micro_batches):
        if on_micro_batch is not None:
            on_micro_batch(index)
        batch = {key: value.to(device) for key, value in batch.items()}
        with autocast_for(device, dtype):
            loss = supervised_loss_sum(model, batch) / max(total, 1)
        loss.backward()
        loss_value += float(loss.detach())
    norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm if max_grad_norm else float("inf"))
    skipped = not (torch.isfinite(norm) and torch.isfinite(torch.tensor(loss_value)))
    if not skipped:
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return StepResult(loss=loss_value, grad_norm=float(norm), trained=total, skipped=skipped)
