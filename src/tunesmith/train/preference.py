"""Preference tuning maths: completion log-probabilities and the DPO / IPO / SimPO losses (the training step
is ``train/objectives.py``'s ``PreferenceLoss`` in the shared engine).

For a prompt x with a chosen answer c and a rejected answer r, the policy π scores an answer by the summed
log-probability of its completion tokens only (labels are ``IGNORE_INDEX`` on the prompt and padding):

    log π(y|x) = Σ_{t : labels[t] ≠ IGNORE} log softmax(W h_{t−1})[y_t]

Chosen and rejected rows of a batch go through the model together, in one padded batch (chosen rows first,
see ``collate_pairs``). With π_ref the reference (the starting policy), |y| the number of completion tokens
and σ the logistic function, the per-pair losses are

* sigmoid (DPO, Rafailov et al. 2023), with h = [log π(c) − log π_ref(c)] − [log π(r) − log π_ref(r)]:

      L = −log σ(β·h),                    ∂L/∂log π(c) = −β·σ(−β·h) = −∂L/∂log π(r)

* IPO (Azar et al. 2023), on per-token-averaged log-ratios, as in the IPO paper's experiments (and TRL):
  h̄ = [log π(c) − log π_ref(c)]/|c| − [log π(r) − log π_ref(r)]/|r|,

      L = (h̄ − 1/(2β))²,                  ∂L/∂log π(c) = 2·(h̄ − 1/(2β))/|c|

  Averaging per token keeps the regression target 1/(2β) on one scale whatever the answers' lengths.

* SimPO (Meng et al. 2024), reference-free, length-normalised, with a target margin γ:

      L = −log σ(β/|c|·log π(c) − β/|r|·log π(r) − γ)

The implicit rewards logged and evaluated are β·(log π − log π_ref) (sigmoid), β·(log π − log π_ref)/|y| (IPO)
and β·log π/|y| (SimPO); the margin is chosen minus rejected reward, and the reward accuracy the fraction of
pairs whose chosen reward is the higher (ties count one half: at the start, policy = reference, it is 0.5).
The KL proxy is the mean of log π(c) − log π_ref(c). An optional SFT term adds
``sft_weight · (−Σ log π(c)) / Σ|c|``, the NLL per chosen token.

Accumulation: each micro-batch's summed pair losses are divided by the number of pairs in the WHOLE
accumulated batch (and its chosen NLL by all the chosen tokens), so the step's loss and gradient do not
depend on how the pairs are split into micro-batches.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save as safetensors_bytes

from tunesmith.data.batching import pad_collate
from tunesmith.errors import TunesmithError
from tunesmith.files import write_atomic
from tunesmith.train.loss import autocast_for, trained_hidden

LOGIT_CHUNK = 256
LOSSES = ("sigmoid", "ipo", "simpo")


def collate_pairs(examples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """One right-padded batch of 2n rows: the n chosen sequences, then the n rejected ones.

    >>> pair = {"chosen": {"input_ids": [5, 6, 7], "labels": [-100, 6, 7]},
    ...         "rejected": {"input_ids": [5, 8], "labels": [-100, 8]}}
    >>> collate_pairs([pair], pad_id=0)["input_ids"]
    tensor([[5, 6, 7],
            [5, 8, 0]])
    """
    return pad_collate([ex["chosen"] for ex in examples] + [ex["rejected"] for ex in examples], pad_id)


def _token_logps(model, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log softmax(head(h))[y] per position, through the output head a chunk of positions at a time."""
    head = model.get_output_embeddings()
    cap = getattr(model.config, "final_logit_softcapping", None)
    pieces = []
    for start in range(0, hidden.shape[0], LOGIT_CHUNK):
        logits = head(hidden[start:start + LOGIT_CHUNK]).float()
        if cap:
            logits = cap * torch.tanh(logits / cap)
        y = targets[start:start + LOGIT_CHUNK]
        pieces.append(logits.gather(1, y[:, None]).squeeze(1) - torch.logsumexp(logits, dim=-1))
    return torch.cat(pieces) if pieces else hidden.new_zeros(0, dtype=torch.float32)


def completion_logps(model, batch: dict, *, layout: str = "auto", host: dict | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sums, counts)``: each row's summed log-probability of its trained tokens, and how many there are.

    As in ``supervised_loss_sum``, only the trained positions go through the output head (prompt tokens never
    produce logits); ``trained_hidden`` does the shift.
    """
    hidden, targets, keep = trained_hidden(model, batch, layout=layout, host=host)
    token = _token_logps(model, hidden, targets)
    rows = keep.nonzero(as_tuple=True)[0].to(token.device, non_blocking=True)
    sums = torch.zeros(len(keep), dtype=token.dtype, device=token.device).index_add(0, rows, token)
    return sums, keep.sum(dim=1).to(token.device, non_blocking=True)


def preference_losses(chosen: torch.Tensor, rejected: torch.Tensor, ref_chosen: torch.Tensor | None,
                      ref_rejected: torch.Tensor | None, chosen_len: torch.Tensor, rejected_len: torch.Tensor, *,
                      loss: str, beta: float, gamma: float = 0.0
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair ``(losses, chosen_rewards, rejected_rewards)`` from summed completion log-probs (module docstring).

    ``ref_*`` are unused (and may be None) for SimPO; lengths are completion token counts.
    """
    if loss not in LOSSES:
        raise ValueError(f"unknown preference loss {loss!r}; choose one of {', '.join(LOSSES)}")
    chosen_len, rejected_len = chosen_len.to(chosen.dtype), rejected_len.to(chosen.dtype)
    if loss == "simpo":
        chosen_reward, rejected_reward = beta * chosen / chosen_len, beta * rejected / rejected_len
        return F.softplus(-(chosen_reward - rejected_reward - gamma)), chosen_reward, rejected_reward
    chosen_ratio, rejected_ratio = chosen - ref_chosen, rejected - ref_rejected
    if loss == "ipo":
        chosen_ratio, rejected_ratio = chosen_ratio / chosen_len, rejected_ratio / rejected_len
        losses = (chosen_ratio - rejected_ratio - 1 / (2 * beta)) ** 2
        return losses, beta * chosen_ratio, beta * rejected_ratio
    chosen_reward, rejected_reward = beta * chosen_ratio, beta * rejected_ratio
    return F.softplus(-(chosen_reward - rejected_reward)), chosen_reward, rejected_reward


def ranked_above(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """1 where chosen scores higher, 0.5 on a tie, 0 where rejected scores higher."""
    return (chosen > rejected).float() + 0.5 * (chosen == rejected).float()


@torch.no_grad()
def pair_logps(model, examples: list[dict], *, pad_id: int, batch_size: int = 16) -> dict[str, torch.Tensor]:
    """Summed completion log-probs and lengths of every pair, in example order, in eval mode:
    ``{"chosen", "rejected", "chosen_len", "rejected_len"}`` (fp32 / int64 tensors on the CPU)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    dtype = next(p for p in model.parameters() if p.dtype.is_floating_point).dtype
    out = {"chosen": torch.zeros(len(examples)), "rejected": torch.zeros(len(examples)),
           "chosen_len": torch.zeros(len(examples), dtype=torch.long),
           "rejected_len": torch.zeros(len(examples), dtype=torch.long)}
    # Similar lengths batch together so padding stays small.
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]["chosen"]["input_ids"])
                   + len(examples[i]["rejected"]["input_ids"]))
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        batch = {k: v.to(device) for k, v in collate_pairs([examples[i] for i in chunk], pad_id).items()}
        with autocast_for(device, dtype):
            sums, counts = completion_logps(model, batch)
        n = len(chunk)
        out["chosen"][chunk], out["rejected"][chunk] = sums[:n].float().cpu(), sums[n:].float().cpu()
        out["chosen_len"][chunk], out["rejected_len"][chunk] = counts[:n].cpu(), counts[n:].cpu()
    model.train(was_training)
    return out


def preference_metrics(policy: dict[str, torch.Tensor], reference: dict[str, torch.Tensor] | None,
                       objective) -> dict:
    """Held-out metrics from ``pair_logps`` outputs (``reference`` None for SimPO).

    ``preference_accuracy``: the policy's implicit reward ranks chosen above rejected (for SimPO, the
    length-normalised log-prob); ``likelihood_accuracy``: its summed log-prob does, with no reference, so it
    also says something before training; ``eval_loss``: the mean preference loss; ``chosen_loss``: the NLL
    per chosen token, to see that the chosen answers do not lose likelihood.
    """
    ref = reference or {"chosen": None, "rejected": None}
    losses, chosen_reward, rejected_reward = preference_losses(
        policy["chosen"], policy["rejected"], ref["chosen"], ref["rejected"], policy["chosen_len"],
        policy["rejected_len"], loss=objective.loss, beta=objective.beta, gamma=objective.gamma)
    return {"eval_loss": float(losses.mean()),
            "preference_accuracy": float(ranked_above(chosen_reward, rejected_reward).mean()),
            "likelihood_accuracy": float(ranked_above(policy["chosen"], policy["rejected"]).mean()),
            "margin": float((chosen_reward - rejected_reward).mean()),
            "chosen_loss": float(-policy["chosen"].sum() / policy["chosen_len"].sum().clamp(min=1)),
            "pairs": len(losses)}


def save_reference(path, logps: dict[str, dict[str, torch.Tensor]], *, fingerprint: str) -> None:
    """Write reference log-probs (``{split: pair_logps output}``) as safetensors, tagged with the data's digest."""
    tensors = {f"{split}.{key}": value.contiguous() for split, values in logps.items() for key, value in values.items()}
    write_atomic(path, safetensors_bytes(tensors, metadata={"data": fingerprint}))


def load_reference(path, *, fingerprint: str) -> dict[str, dict[str, torch.Tensor]]:
    """Read what ``save_reference`` wrote; refuse a cache made for other data."""
    from safetensors import safe_open

    if not path.is_file():
        raise TunesmithError(f"{path} is missing: the run's reference log-probs cannot be recomputed once training "
                             "has moved the weights; start a new run")
    with safe_open(str(path), framework="pt") as f:
        if (f.metadata() or {}).get("data") != fingerprint:
            raise TunesmithError(f"{path} was computed for other training data; start a new run")
    logps: dict[str, dict[str, torch.Tensor]] = {}
    for name, value in load_file(str(path)).items():
        split, _, key = name.partition(".")
        logps.setdefault(split, {})[key] = value
    return logps
