"""How a micro-batch becomes a loss, per objective; the loop around it is ``train/engine.py``'s, shared.

Each loss answers three questions for the engine:

* ``counts(micro)`` — the denominators of this micro-batch (trained tokens; pairs), read from its labels on
  the host before any forward. The engine sums them over the whole accumulated batch of every rank first, so
  each micro-batch's loss is divided by the WHOLE batch's count and micro-batch × accumulation × processes
  splits give the same gradient (DDP sums the ranks' gradients, ``train/module.py``).
* ``loss(model, batch, micro, totals, layout=)`` — this micro-batch's share of the step's loss (a tensor to
  backward) and its share of the logged metrics (0-dim tensors, summed by the engine over micro-batches and read
  once per step: reading a device value waits for the device), computed in the layout installed at setup.
* ``step_metrics(sums)`` — the logged metrics of the step from those sums.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from tunesmith.templates import IGNORE_INDEX
from tunesmith.train.loss import supervised_loss_sum, trained_tokens
from tunesmith.train.preference import completion_logps, preference_losses, ranked_above


@dataclass
class MicroBatch:
    batch: dict[str, torch.Tensor]
    """The collated micro-batch, on the host (the engine moves it to the device)."""
    indices: list = field(default_factory=list)
    """The training examples it holds (a precomputed reference is looked up by them)."""


class SupervisedLoss:
    """Next-token cross-entropy summed over trained tokens, divided by the step's trained tokens."""

    def counts(self, micro: MicroBatch) -> dict[str, int]:
        return {"tokens": trained_tokens(micro.batch)}

    def loss(self, model, batch: dict, micro: MicroBatch, totals: dict[str, int], *,
             layout: str = "auto") -> tuple[torch.Tensor, dict]:
        return supervised_loss_sum(model, batch, layout=layout, host=micro.batch) / max(totals["tokens"], 1), {}

    def step_metrics(self, sums: dict) -> dict:
        return {}


class PreferenceLoss:
    """DPO / IPO / SimPO over ``collate_pairs`` batches (chosen rows, then rejected rows); the maths is in
    ``train/preference.py``.

    ``options`` has ``loss``, ``beta``, ``gamma`` and ``sft_weight`` (the config's ``dpo`` section);
    ``reference(batch, micro, layout)`` gives the reference's ``(chosen, rejected)`` summed log-probs without
    gradients (None: SimPO, no reference). Pair losses are divided by the step's pairs, the optional SFT term by
    its chosen tokens.
    """

    def __init__(self, options, reference=None):
        self.options, self.reference = options, reference

    def counts(self, micro: MicroBatch) -> dict[str, int]:
        pairs = len(micro.indices)
        return {"pairs": pairs, "chosen_tokens": int((micro.batch["labels"][:pairs, 1:] != IGNORE_INDEX).sum())}

    def loss(self, model, batch: dict, micro: MicroBatch, totals: dict[str, int], *,
             layout: str = "auto") -> tuple[torch.Tensor, dict]:
        n, pairs, options = len(micro.indices), totals["pairs"], self.options
        ref = self.reference(batch, micro, layout) if self.reference is not None else (None, None)
        logps, counts = completion_logps(model, batch, layout=layout, host=micro.batch)
        losses, chosen_reward, rejected_reward = preference_losses(
            logps[:n], logps[n:], ref[0], ref[1], counts[:n], counts[n:], loss=options.loss, beta=options.beta,
            gamma=options.gamma)
        nll = -logps[:n].sum() / max(totals["chosen_tokens"], 1)
        loss = losses.sum() / pairs + (options.sft_weight * nll if options.sft_weight else 0.0)
        with torch.no_grad():
            stats = {"reward_accuracy": ranked_above(chosen_reward, rejected_reward).sum() / pairs,
                     "chosen_reward": chosen_reward.sum() / pairs, "rejected_reward": rejected_reward.sum() / pairs}
            if ref[0] is not None:
                stats["kl"] = (logps[:n] - ref[0]).sum() / pairs
            if options.sft_weight:
                stats["sft_loss"] = nll.detach()
        return loss, stats

    def step_metrics(self, sums: dict) -> dict:
        """reward_accuracy, chosen/rejected reward, margin, kl (with a reference), sft_loss (with an SFT term)."""
        metrics = {key: sums[key] for key in ("reward_accuracy", "chosen_reward", "rejected_reward")}
        metrics["margin"] = metrics["chosen_reward"] - metrics["rejected_reward"]
        metrics.update({key: sums[key] for key in ("kl", "sft_loss") if key in sums})
        return metrics
