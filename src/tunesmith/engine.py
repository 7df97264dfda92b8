"""The generation engine: continuous batching over one model, each request with its own sampling and adapter.

Requests join and leave between decode steps. A step decodes one token for every running sequence in one
forward, then prefills the requests waiting to join (together, left-padded, up to ``max_batch`` rows in all)
and merges their KV cache into the running batch's; a sequence that finishes (a stop token, its token budget, a cancel) leaves the batch
at once, its cache rows dropped, so nobody decodes tokens no one reads.

KV cache: one transformers ``DynamicCache`` for the running batch, rows left-padded to the longest sequence
(``generate.py`` draws the layout): a joining group's cache is padded on the left to the batch's length (or the
batch's to the group's) and concatenated; pad columns are masked as keys and position ids count only real
tokens, so a row sees exactly what it would see alone. Models whose cache is not plain (sliding-window or
hybrid layers) cannot be merged: there a group joins only when the batch is empty.

Adapters: with ``AdapterSlots`` loaded into the model, each row runs its own adapter (``peft/multi.py``), the
base model being slot 0; nothing is merged or switched per request.

Sampling is per request (temperature, top_p, seed): each request owns a ``torch.Generator`` seeded with its
seed and draws one number per token, so its tokens do not depend on its neighbours or on when it joined.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from tunesmith.errors import TunesmithError
from tunesmith.generate import SamplingConfig, cache_argument, left_pad, next_tokens


@dataclass(eq=False)
class Request:
    """One prompt to continue, and what it has produced so far."""

    prompt: list[int]
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    stop_ids: frozenset[int] = frozenset()
    adapter: str | None = None
    """An adapter loaded in the engine's ``AdapterSlots``; None: the base model."""
    on_token: Callable[[int], None] | None = None
    """Called with each new token as it is produced (the stop token is not produced)."""
    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    """None while running; "stop" (a stop token), "length" (max_new_tokens) or "cancelled"."""

    def __post_init__(self):
        if not self.prompt:
            raise TunesmithError("a request needs a prompt of at least one token")
        self.stop_ids = frozenset(self.stop_ids)
        self.generator: torch.Generator | None = None

    @property
    def done(self) -> bool:
        return self.finish_reason is not None


class Engine:
    """Continuous batching over ``model`` (in eval mode). ``submit`` queues a request; ``step`` advances every
    running request by one token; ``run`` steps until nothing is left."""

    def __init__(self, model, *, pad_id: int, max_batch: int = 64, adapters=None):
        self.model = model
        self.pad_id = pad_id
        self.max_batch = max_batch
        self.adapters = adapters
        self.device = next(model.parameters()).device
        self.waiting: list[Request] = []
        self.running: list[Request] = []
        self._cache = None  # the running rows' KV cache, left-padded
        self._mask = None  # their attention mask over the cache's columns (0 on pads)
        self._next: dict[Request, int] = {}  # each running request's sampled token, fed at the next decode
        self._cache_key = cache_argument(model)

    def submit(self, request: Request) -> Request:
        if self.adapters is not None:
            self.adapters.slot(request.adapter)  # an unknown name is refused now, not mid-batch
        elif request.adapter is not None:
            raise TunesmithError(f"request for adapter {request.adapter!r}, but this engine serves no adapters")
        request.generator = torch.Generator(device=self.device).manual_seed(request.sampling.seed)
        if request.sampling.max_new_tokens == 0:
            request.finish_reason = "length"
        else:
            self.waiting.append(request)
        return request

    def cancel(self, request: Request) -> None:
        """Stop ``request``; it leaves the batch before the next step (its tokens so far stay)."""
        if not request.done:
            request.finish_reason = "cancelled"
        if request in self.waiting:
            self.waiting.remove(request)

    def run(self) -> None:
        while self.waiting or self.running:
            self.step()

    @torch.inference_mode()
    def step(self) -> None:
        """One token for every running request, and the first for every request that joins: the running rows
        decode on their cache, then the joiners are prefilled together and merged in (no row waits)."""
        self._leave()
        joining = self._admit()
        if self.running:
            self._decode()
        if joining:
            self._prefill(joining)
        self._leave()

    # --- the batch

    def _admit(self) -> list[Request]:
        room = self.max_batch - len(self.running)
        if room <= 0 or not self.waiting or (self.running and not self._mergeable()):
            return []
        joining, self.waiting = self.waiting[:room], self.waiting[room:]
        return joining

    def _prefill(self, joining: list[Request]) -> None:
        ids, mask = left_pad([r.prompt for r in joining], self.pad_id, self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache(config=self.model.config)
        logits = self._forward(joining, ids, mask, positions, cache)
        self._merge(joining, cache, mask)
        self._take(joining, logits)

    def _decode(self) -> None:
        ids = torch.tensor([[self._next[r]] for r in self.running], dtype=torch.long, device=self.device)
        positions = self._mask.sum(-1, keepdim=True)  # a row's real tokens so far: the new token's position
        self._mask = torch.cat([self._mask, self._mask.new_ones(len(self.running), 1)], dim=-1)
        logits = self._forward(self.running, ids, self._mask, positions, self._cache)
        self._take(self.running, logits)

    def _forward(self, requests, ids, mask, positions, cache) -> torch.Tensor:
        call = dict(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1,
                    **{self._cache_key: cache})
        if self.adapters is None:
            return self.model(**call).logits[:, -1].float()
        with self.adapters.rows([r.adapter for r in requests]):
            return self.model(**call).logits[:, -1].float()

    def _take(self, requests: list[Request], logits: torch.Tensor) -> None:
        """Sample each row's next token and record it; a stop token or the budget finishes the request."""
        for i, request in enumerate(requests):
            token = int(next_tokens(logits[i:i + 1], request.sampling, [request.generator])[0])
            self._next[request] = token
            if request.done:  # cancelled while its row was in flight
                continue
            if token in request.stop_ids:
                request.finish_reason = "stop"
                continue
            request.tokens.append(token)
            if request.on_token is not None:
                request.on_token(token)
            if len(request.tokens) >= request.sampling.max_new_tokens:
                request.finish_reason = "length"

    def _merge(self, joining: list[Request], cache, mask: torch.Tensor) -> None:
        """Append ``joining``'s rows (their cache and mask) to the running batch, left-padding the shorter."""
        if not self.running:
            self.running, self._cache, self._mask = list(joining), cache, mask
            return
        width = max(self._mask.shape[1], mask.shape[1])
        self._cache = self._rebuilt([(torch.cat([_left(k1, width), _left(k2, width)]),
                                      torch.cat([_left(v1, width), _left(v2, width)]))
                                     for (k1, v1), (k2, v2) in zip(_tensors(self._cache), _tensors(cache))])
        self._mask = torch.cat([_left(self._mask, width, dim=1), _left(mask, width, dim=1)])
        self.running = self.running + list(joining)

    def _leave(self) -> None:
        """Drop finished rows from the batch (their cache rows too), and trim pad columns no row needs."""
        keep = [i for i, r in enumerate(self.running) if not r.done]
        if len(keep) == len(self.running):
            return
        for request in self.running:
            if request.done:
                self._next.pop(request, None)
        if not keep:
            self.running, self._cache, self._mask = [], None, None
            return
        index = torch.tensor(keep, device=self.device)
        self.running = [self.running[i] for i in keep]
        self._cache.batch_select_indices(index)
        self._mask = self._mask[index]
        unused = int((self._mask.sum(0) == 0).long().cumprod(0).sum())  # leading columns every row pads
        if unused and self._mergeable():
            self._mask = self._mask[:, unused:]
            self._cache = self._rebuilt([(k[:, :, unused:], v[:, :, unused:]) for k, v in _tensors(self._cache)])

    def _rebuilt(self, tensors: list[tuple[torch.Tensor, torch.Tensor]]) -> DynamicCache:
        """A fresh cache holding ``tensors`` (keys, values per layer), filled through the cache's own ``update``."""
        cache = DynamicCache(config=self.model.config)
        for index, (keys, values) in enumerate(tensors):
            cache.update(keys, values, index)
        return cache

    def _mergeable(self) -> bool:
        return self._cache is None or all(type(layer) is DynamicLayer for layer in self._cache.layers)


def _tensors(cache: DynamicCache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each layer's (keys, values), read only."""
    return [(layer.keys, layer.values) for layer in cache.layers]


def _left(tensor: torch.Tensor, width: int, dim: int = 2) -> torch.Tensor:
    """``tensor`` padded with zeros on the left of ``dim`` to ``width``."""
    missing = width - tensor.shape[dim]
    if missing == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)


def generate(model, prompts: list[list[int]], *, sampling: SamplingConfig, stop_ids: Iterable[int], pad_id: int,
             on_token: Callable[[int, int], None] | None = None, adapters=None,
             adapter_names: list[str | None] | None = None, max_batch: int = 64) -> list[list[int]]:
    """Continue each prompt (token ids) on one engine and return only the new tokens, one list per prompt.

    A prompt stops at its first token in ``stop_ids`` (not returned, not streamed) or after
    ``sampling.max_new_tokens`` tokens. ``on_token(row, token_id)`` is called for each returned token as it is
    produced. ``adapter_names[i]`` (with ``adapters``) is prompt i's adapter. At most ``max_batch`` prompts run
    at once; the next joins as soon as one finishes. The model is used as given: put it in ``eval()`` mode
    first, or dropout stays on.

    Reproducibility: greedy decoding has no randomness; a sampled prompt's stream depends only on the seed, not
    on its place in the batch or its neighbours. The same model, prompts, config and seed on the same device and
    software give the same tokens; alone or in any batch, a prompt's logits may differ only in floating-point
    rounding (other padding lengths and batch sizes sum in other orders).
    """
    if any(len(prompt) == 0 for prompt in prompts):
        raise TunesmithError("generate got an empty prompt; every prompt needs at least one token")
    engine = Engine(model, pad_id=pad_id, adapters=adapters, max_batch=max_batch)
    names = adapter_names or [None] * len(prompts)
    requests = [engine.submit(Request(list(prompt), sampling=sampling, stop_ids=frozenset(stop_ids),
                                      adapter=names[row],
                                      on_token=None if on_token is None else (lambda t, row=row: on_token(row, t))))
                for row, prompt in enumerate(prompts)]
    engine.run()
    return [r.tokens for r in requests]
