"""Tokenized examples → batches: plain padding, length bucketing, and best-fit packing.

An example is ``{"input_ids": list[int], "labels": list[int]}`` with labels aligned to the tokens
(``IGNORE_INDEX`` where a token is not trained). Nothing here shifts labels: the model's loss
predicts ``labels[i]`` from position ``i - 1``. That is why a packed example must not train its
first token — it would be predicted from the previous example's last token.

The training loop uses two calls, the same for every strategy::

    plan = plan_batches(lengths, strategy=s, batch_size=b, token_budget=t, seed=seed, epoch=epoch)
    collate = collate_for(s, pad_id=tokenizer.pad_token_id, token_budget=t)
    for batch in plan:
        loss = model(**collate(gather_examples(examples, batch)), use_cache=False).loss

``use_cache=False`` is required for packing, not an optimisation: transformers (5.x) finds the
example boundaries of a packed row from ``position_ids`` only when there is no attention mask and
no KV cache, and a Llama with ``config.use_cache=True`` builds a cache on every forward, train mode
included. With a cache the row silently gets one causal mask and examples attend to each other.
"""

from __future__ import annotations

import math
import random
from bisect import bisect_left, insort
from collections.abc import Callable, Sequence
from functools import partial

import torch

from tunesmith.templates import IGNORE_INDEX

TokenizedExample = dict[str, list[int]]
STRATEGIES = ("pad", "bucket", "pack")


def pad_collate(examples: Sequence[TokenizedExample], pad_id: int, *,
                pad_to_multiple_of: int | None = None) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example (rounded up to ``pad_to_multiple_of``); pads are never trained.

    Right padding keeps every example's real tokens at positions ``0..len-1``, so the default
    position ids are right and causal attention never looks at the pads that follow.

    >>> batch = pad_collate([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]},
    ...                      {"input_ids": [8], "labels": [8]}], pad_id=0)
    >>> batch["input_ids"], batch["attention_mask"], batch["labels"]
    (tensor([[5, 6, 7],
            [8, 0, 0]]), tensor([[1, 1, 1],
            [1, 0, 0]]), tensor([[-100,    6,    7],
            [   8, -100, -100]]))
    """
    for i, example in enumerate(examples):
        if len(example["input_ids"]) != len(example["labels"]):
            raise ValueError(f"example {i}: {len(example['input_ids'])} input_ids but "
                             f"{len(example['labels'])} labels")
    width = max(len(example["input_ids"]) for example in examples)
    if pad_to_multiple_of:
        width = math.ceil(width / pad_to_multiple_of) * pad_to_multiple_of
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example["input_ids"])
        input_ids[row, :n] = torch.tensor(example["input_ids"])
        attention_mask[row, :n] = 1
        labels[row, :n] = torch.tensor(example["labels"])
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def sequential_batches(n: int, batch_size: int, *, seed: int, shuffle: bool = True) -> list[list[int]]:
    """Indices ``0..n-1`` in batches of ``batch_size`` (the last may be short), shuffled by ``seed``."""
    order = list(range(n))
    if shuffle:
        random.Random(seed).shuffle(order)
    return [order[start:start + batch_size] for start in range(0, n, batch_size)]


def bucket_batches(lengths: Sequence[int], batch_size: int, *, seed: int, shuffle: bool = True,
                   bucket_factor: int = 50) -> list[list[int]]:
    """Batches of similar length, so padding to the longest wastes little.

    Indices are shuffled, cut into chunks of ``batch_size * bucket_factor``, sorted by length inside
    each chunk and split into batches; then the batches are shuffled. Sorting only within a chunk
    keeps some randomness in which examples meet; shuffling the batches keeps the model from seeing
    lengths in order. Every index appears exactly once.
    """
    order = list(range(len(lengths)))
    rng = random.Random(seed)
    if shuffle:
        rng.shuffle(order)
    chunk = batch_size * bucket_factor
    batches = []
    for start in range(0, len(order), chunk):
        by_length = sorted(order[start:start + chunk], key=lambda i: lengths[i])
        batches += [by_length[k:k + batch_size] for k in range(0, len(by_length), batch_size)]
    if shuffle:
        rng.shuffle(batches)
    return batches


def pack_best_fit(lengths: Sequence[int], budget: int) -> list[list[int]]:
    """Best-fit decreasing bin packing: bins of example indices, each totalling at most ``budget`` tokens.

    Longest first, each example goes into the open bin it fills most tightly (ties: the oldest
    bin), else into a new bin. Remaining capacities stay sorted, so each placement is a bisect.
    Over-long examples are an error: truncation is decided when tokenizing, not here.
    """
    for i, length in enumerate(lengths):
        if length > budget:
            raise ValueError(f"example {i} has {length} tokens, more than the packing budget of {budget}")
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (remaining capacity, bin number), sorted
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        slot = bisect_left(free, (lengths[i], -1))
        if slot == len(free):
            bins.append([])
            remaining, number = budget, len(bins) - 1
        else:
            remaining, number = free.pop(slot)
        bins[number].append(i)
        insort(free, (remaining - lengths[i], number))
    return bins


def pack_collate(examples: Sequence[TokenizedExample] | Sequence[Sequence[TokenizedExample]], *,
                 pad_id: int, budget: int | None = None) -> dict[str, torch.Tensor]:
    """Concatenate each bin into one row; ``position_ids`` restart at 0 per example; no attention mask.

    ``examples`` is one bin (a list of examples → one row) or a list of bins (one row each). Rows
    are right-padded to ``budget`` (to the longest row when ``budget`` is None). Three examples
    A (3 tokens), B (2), C (4) in a row of budget 10, every real token trained::

        input_ids      a0   a1   a2   b0   b1   c0   c1   c2   c3  pad
        position_ids    0    1    2    0    1    0    1    2    3    4
        labels       -100   a1   a2 -100   b1 -100   c1   c2   c3 -100

        attention (query row, key column; x = attends):
                       a0   a1   a2   b0   b1   c0   c1   c2   c3  pad
        a0              x
        a1              x    x
        a2              x    x    x
        b0                             x
        b1                             x    x
        c0                                       x
        c1                                       x    x
        c2                                       x    x    x
        c3                                       x    x    x    x
        pad                                      x    x    x    x    x

    transformers turns a drop in ``position_ids`` into a new block of the block-diagonal causal
    mask (``masking_utils.find_packed_sequence_indices``) when it gets no attention mask and no
    cache — call the model with ``use_cache=False``. Pads continue the last example's positions so
    they join its block; being last and causal, they are seen by no real token, and their labels
    are ``IGNORE_INDEX``. The first label of every example is ``IGNORE_INDEX`` because the loss
    would predict it from the previous example's last token (for the first example of a row the
    shift drops it anyway, so this changes no loss relative to padding).
    """
    bins = [examples] if examples and isinstance(examples[0], dict) else examples
    rows = []
    for bin_ in bins:
        input_ids, labels, positions = [], [], []
        for example in bin_:
            input_ids += example["input_ids"]
            labels += [IGNORE_INDEX] + example["labels"][1:]
            positions += range(len(example["input_ids"]))
        rows.append((input_ids, labels, positions))
    width = budget if budget is not None else max(len(row[0]) for row in rows)
    batch = {name: torch.empty((len(rows), width), dtype=torch.long)
             for name in ("input_ids", "labels", "position_ids")}
    for r, (input_ids, labels, positions) in enumerate(rows):
        pad = width - len(input_ids)
        if pad < 0:
            raise ValueError(f"packed row {r} has {len(input_ids)} tokens, more than the budget of {width}")
        last = positions[-1] + 1 if positions else 0
        batch["input_ids"][r] = torch.tensor(input_ids + [pad_id] * pad)
        batch["labels"][r] = torch.tensor(labels + [IGNORE_INDEX] * pad)
        batch["position_ids"][r] = torch.tensor(positions + list(range(last, last + pad)))
    return batch


def plan_batches(lengths: Sequence[int], *, strategy: str, batch_size: int, token_budget: int | None,
                 seed: int, epoch: int) -> list[list[int]] | list[list[list[int]]]:
    """The epoch's batches of example indices; the same (seed, epoch) gives the same plan.

    - ``"pad"``: random batches of ``batch_size`` indices; collate with ``pad_collate``.
    - ``"bucket"``: batches of ``batch_size`` indices of similar length; collate with ``pad_collate``.
    - ``"pack"``: each batch is a list of up to ``batch_size`` bins (rows), each bin the indices
      packed into one row of at most ``token_budget`` tokens; collate with ``pack_collate``, which
      gives ``[rows, token_budget]`` tensors. Bins are fixed by the lengths (best-fit decreasing);
      only their order changes between epochs.

    Every index appears exactly once. ``token_budget`` is used only by ``"pack"``. ``collate_for``
    and ``gather_examples`` turn a batch into tensors the same way for every strategy.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown batching strategy {strategy!r}; expected one of {', '.join(STRATEGIES)}")
    # Not seed + epoch: (seed 0, epoch 1) and (seed 1, epoch 0) would share an order.
    epoch_seed = (seed << 32) + epoch
    if strategy == "pad":
        return sequential_batches(len(lengths), batch_size, seed=epoch_seed)
    if strategy == "bucket":
        return bucket_batches(lengths, batch_size, seed=epoch_seed)
    if token_budget is None:
        raise ValueError("strategy 'pack' needs a token_budget (tokens per packed row)")
    bins = pack_best_fit(lengths, token_budget)
    random.Random(epoch_seed).shuffle(bins)
    return [bins[start:start + batch_size] for start in range(0, len(bins), batch_size)]


def collate_for(strategy: str, *, pad_id: int, token_budget: int | None = None,
                pad_to_multiple_of: int | None = None) -> Callable[..., dict[str, torch.Tensor]]:
    """The collate function that turns one of ``plan_batches(strategy=...)``'s batches into tensors."""
    if strategy == "pack":
        return partial(pack_collate, pad_id=pad_id, budget=token_budget)
    if strategy in STRATEGIES:
        return partial(pad_collate, pad_id=pad_id, pad_to_multiple_of=pad_to_multiple_of)
    raise ValueError(f"unknown batching strategy {strategy!r}; expected one of {', '.join(STRATEGIES)}")


def gather_examples(examples: Sequence[TokenizedExample], batch: list) -> list:
    """Replace every index in ``batch`` by its example, keeping the nesting (flat batch or list of bins)."""
    return [gather_examples(examples, item) if isinstance(item, list) else examples[item] for item in batch]
