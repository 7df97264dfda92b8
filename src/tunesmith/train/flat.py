"""A padded batch as one flat row: the prefix every row shares once, then each row's real tokens up to its last
trained target, no padding. The ``rows`` and ``flat`` layouts run it with a block mask (``train/loss.py``), the
``varlen`` layout, with no shared prefix, with sequence starts instead (``train/varlen.py``).

    rows (3 shared tokens p)    p p p a a a .
                                p p p b b . .
                                p p p c c c c
    flat row                    p  p  p  a  a  a  b  b  c  c  c  c
    segment                     -1 -1 -1 0  0  0  1  1  2  2  2  2
    positions                   0  1  2  3  4  5  3  4  3  4  5  6

Positions continue the prefix in every row, so each row sees what it saw padded.
"""

from __future__ import annotations

import torch

from tunesmith.templates import IGNORE_INDEX

MIN_SHARED_PREFIX = 8
FLAT_MAX_TOKENS = 4096


def shared_prefix_length(batch: dict) -> int:
    """Tokens at the start that every row of ``batch`` shares and that carry no loss (0: none worth sharing).

    Rows built from one template with one system prompt start with the same tokens. Their hidden states
    are identical across the batch, so they can be computed once and broadcast (see ``train.loss``).
    The prefix stops before the first trained target, so no loss position needs a prefix hidden state.
    Packed rows (``position_ids``) and left padding are never shared.
    """
    ids, labels = batch["input_ids"], batch["labels"]
    if ids.shape[0] < 2 or "position_ids" in batch:
        return 0
    same = (ids == ids[:1]).all(dim=0)
    if "attention_mask" in batch:
        same &= batch["attention_mask"].bool().all(dim=0)
    length = int(same.long().cumprod(0).sum())
    trained = (labels != IGNORE_INDEX).any(dim=0).nonzero()
    if len(trained):
        length = min(length, int(trained[0]) - 1)  # hidden[length - 1] predicts labels[length]: untrained
    length = min(length, ids.shape[1] - 1)  # keep at least one suffix position
    return length if length >= MIN_SHARED_PREFIX else 0


def flat_layout(batch: dict, shared: int):
    """One row holding the shared prefix once and every row's remaining real tokens (no padding), up to the
    row's last trained target.

    A row's tokens after that carry no loss and no later position reads them (hidden state ``t`` predicts
    ``labels[t + 1]``; attention is causal), so they are left out: with a chat template that is the closing
    ``<|im_end|>`` and newline of each row. Returns ``(input_ids, position_ids, segment, index)``:
    ``segment`` is -1 on the prefix and the row number elsewhere; ``index[i, t]`` is where row ``i``'s token
    ``t`` sits in the flat row (0 on padding and on the tokens left out). None when the batch is not
    right-padded.
    """
    ids = batch["input_ids"]
    size, width = ids.shape
    mask = batch.get("attention_mask", torch.ones_like(ids)).bool()
    lengths = mask.sum(dim=1)
    if not torch.equal(mask, torch.arange(width, device=ids.device) < lengths[:, None]):
        return None
    trained = batch["labels"] != IGNORE_INDEX
    last_target = torch.where(trained, torch.arange(width, device=ids.device), 0).amax(dim=1)
    lengths = torch.minimum(lengths, last_target.clamp(min=shared + 1)).cpu()
    pieces, positions, segment = [ids[0, :shared]], [torch.arange(shared)], [torch.full((shared,), -1)]
    index = torch.zeros(size, width, dtype=torch.long)
    index[:, :shared] = torch.arange(shared)
    cursor = shared
    for row, length in enumerate(lengths.tolist()):
        count = length - shared
        pieces.append(ids[row, shared:length])
        positions.append(torch.arange(shared, length))
        segment.append(torch.full((count,), row))
        index[row, shared:length] = torch.arange(cursor, cursor + count)
        cursor += count
    device = ids.device
    return (torch.cat(pieces)[None], torch.cat(positions)[None].to(device), torch.cat(segment).to(device),
            index.to(device))


def flat_mask(segment: torch.Tensor, implementation: str, dtype: torch.dtype) -> torch.Tensor:
    """Causal, within each row's own tokens plus the shared prefix: (1, 1, N, N), in the form the
    attention implementation reads (boolean for SDPA, additive for eager)."""
    order = torch.arange(len(segment), device=segment.device)
    allowed = (order[None, :] <= order[:, None]) & ((segment[None, :] == segment[:, None]) | (segment[None, :] < 0))
    if implementation == "sdpa":
        return allowed[None, None]
    return torch.zeros(allowed.shape, dtype=dtype, device=segment.device).masked_fill(
        ~allowed, torch.finfo(dtype).min)[None, None]
