"""The generation engine: continuous batching over one model, each request with its own sampling and adapter.

Requests join and leave between decode steps. A step decodes one token for every running sequence in one
forward, then prefills the requests waiting to join (together, left-padded, up to ``max_batch`` rows in all);
a sequence that finishes (a stop token, a stop string, its token budget, a cancel) leaves the batch at once, so
nobody decodes tokens no one reads.

KV cache: preallocated slots (``kv.py``), a row per running sequence, each sequence left-aligned in its row,
so joining or leaving never moves the others. A row sees exactly what it would see alone: its own keys, at
its own positions.

On CUDA, decode steps replay CUDA graphs recorded per bucket of batch size and cache width
(``engine_graphs.py``); on the CPU they run eagerly. Prefill always runs eagerly.

Adapters: with ``AdapterSlots`` loaded into the model, each row runs its own adapter (``peft/multi.py``), the
base model being slot 0; nothing is merged or switched per request.

Sampling is per request (temperature, top_k, top_p, seed): each request owns a ``torch.Generator`` seeded with
its seed and draws one number per token, so its tokens do not depend on its neighbours or on when it joined.
With a tokenizer, a request can also stop at strings and stream text (``generate.TextStream``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch

from tunesmith.engine_graphs import DecodeGraphs
from tunesmith.errors import TunesmithError
from tunesmith.generate import SamplingConfig, TextStream, cache_argument, left_pad, next_tokens
from tunesmith.kv import SlotCache, attention_kinds, attention_masks

PREFIX_MIN = 32  # tokens: a shorter shared start is not worth its own forward
PREFIXES_MAX = 8  # stored prefixes (one per adapter); the oldest goes first


@dataclass(eq=False)
class Request:
    """One prompt to continue, and what it has produced so far."""

    prompt: list[int]
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    stop_ids: frozenset[int] = frozenset()
    adapter: str | None = None
    """An adapter loaded in the engine's ``AdapterSlots``; None: the base model."""
    stop: tuple[str, ...] = ()
    """Strings that end the answer (not part of its text); needs an engine with a tokenizer."""
    on_token: Callable[[int], None] | None = None
    """Called with each new token as it is produced (the stop token is not produced)."""
    on_text: Callable[[str], None] | None = None
    """Called with each new piece of text (whole characters, never a part of a stop string)."""
    on_finish: Callable[["Request"], None] | None = None
    """Called once when the request ends, whatever the reason (after its last text)."""
    settled: Callable[[list[int]], bool] | None = None
    """Called with the answer's tokens after each new one; True ends the request there ("settled"): for a caller
    that knows no later token can matter to it (evaluation, once an answer's score cannot change)."""
    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    """None while running; "stop" (a stop token or string), "length" (max_new_tokens), "settled" (``settled``),
    "cancelled" or "error" (the step failed: ``error`` says why)."""
    error: str | None = None
    prefix_keys: list[tuple[torch.Tensor, torch.Tensor]] | None = None
    """Per layer, the keys and values (1, kv_heads, n, head_dim) of the prompt's first n tokens, computed before by
    this model (the held-out loss pass: ``eval/prompt_keys.py``); only the prompt's other tokens run. Dropped
    once the request has joined."""

    def __post_init__(self):
        if not self.prompt:
            raise TunesmithError("a request needs a prompt of at least one token")
        if self.prefix_keys is not None and not 0 < self.prefix_keys[0][0].shape[2] < len(self.prompt):
            raise TunesmithError(f"prefix_keys hold {self.prefix_keys[0][0].shape[2]} tokens of a {len(self.prompt)}"
                                 "-token prompt; they must cover at least one token and leave at least one to run")
        self.stop_ids = frozenset(self.stop_ids)
        self.stop = tuple(self.stop)
        if any(not s for s in self.stop):
            raise TunesmithError("a stop string cannot be empty")
        self.generator: torch.Generator | None = None
        self.stream: TextStream | None = None

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    @property
    def text(self) -> str | None:
        """The answer's text so far (with a tokenizer), cut before a stop string."""
        return None if self.stream is None else self.stream.emitted


class Engine:
    """Continuous batching over ``model`` (in eval mode). ``submit`` queues a request; ``step`` advances every
    running request by one token; ``run`` steps until nothing is left. ``graphs``: record decode steps as CUDA
    graphs (default: on CUDA)."""

    def __init__(self, model, *, pad_id: int, max_batch: int = 64, adapters=None, tokenizer=None,
                 graphs: bool | None = None):
        attention_kinds(model.config)  # a model the cache cannot hold is refused before any request
        self.model = model
        self.pad_id = pad_id
        self.max_batch = max_batch
        self.adapters = adapters
        self.tokenizer = tokenizer
        self.device = next(model.parameters()).device
        self.dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
        self.waiting: list[Request] = []
        self.running: list[Request] = []  # running[i] lives in cache row i
        self.lengths: list[int] = []  # tokens in each running row's cache
        self.cache = SlotCache(model.config.num_hidden_layers, self.device)
        self._next: dict[Request, int] = {}  # each running request's sampled token, fed at the next decode
        self._prefixes: dict[str | None, tuple[list[int], list]] = {}  # adapter → (shared start, its keys)
        self._cache_key = cache_argument(model)
        use_graphs = self.device.type == "cuda" if graphs is None else graphs
        self.graphs = DecodeGraphs(self) if use_graphs else None

    def submit(self, request: Request) -> Request:
        if self.adapters is not None:
            self.adapters.slot(request.adapter)  # an unknown name is refused now, not mid-batch
        elif request.adapter is not None:
            raise TunesmithError(f"request for adapter {request.adapter!r}, but this engine serves no adapters")
        if request.prefix_keys is not None and len(request.prefix_keys) != self.cache.layers:
            raise TunesmithError(f"prefix_keys for {len(request.prefix_keys)} layers, but the model has "
                                 f"{self.cache.layers}")
        if request.stop or request.on_text is not None:
            if self.tokenizer is None:
                raise TunesmithError("stop strings and text streaming need an engine made with a tokenizer")
            request.stream = TextStream(self.tokenizer, stops=request.stop)
        request.generator = torch.Generator(device=self.device).manual_seed(request.sampling.seed)
        if request.sampling.max_new_tokens == 0:
            request.finish_reason = "length"
        else:
            self.waiting.append(request)
        return request

    def cancel(self, request: Request) -> None:
        """Stop ``request``; it leaves the batch before the next step (its tokens so far stay)."""
        if not request.done:
            self._finish(request, "cancelled")
        if request in self.waiting:
            self.waiting.remove(request)

    def abort(self, error: str) -> None:
        """End every request (a step failed: the batch's state cannot be trusted) and start empty."""
        for request in self.running + self.waiting:
            if not request.done:
                request.error = error
                self._finish(request, "error")
        for state in (self.running, self.waiting, self.lengths, self._next):  # the engine's own, emptied
            state.clear()

    def run(self) -> None:
        while self.waiting or self.running:
            self.step()

    @torch.inference_mode()
    def step(self) -> None:
        """One token for every running request, and the first for every request that joins: the running rows
        decode, then the joiners are prefilled into free rows (no row waits), in groups of similar width."""
        self._leave()
        room = self.max_batch - len(self.running)
        joining, self.waiting = self.waiting[:max(room, 0)], self.waiting[max(room, 0):]
        if self.running:
            self._decode()
        for group in self._by_width(joining):
            self._prefill(group)
        self._leave()

    # --- the batch

    def _by_width(self, joining: list[Request]) -> list[list[Request]]:
        """``joining`` in groups, one prefill forward each. A prefill pads every row to its group's widest (the
        tokens a row runs: its prompt past the keys it starts from, its own or a stored prefix's). Narrowest
        first, a group ends where the next joiner would make its padding outweigh its real tokens: a row that
        brings the keys of all but one token of its prompt then never runs at the width of a whole prompt."""
        widths = {request: len(request.prompt) - (len(start[0]) if (start := self._prefix_of(request)) else 0)
                  for request in joining}
        groups: list[list[Request]] = []
        real = 0
        for request in sorted(joining, key=widths.get):
            width = widths[request]
            if not groups or (len(groups[-1]) + 1) * width > 2 * (real + width):
                groups.append([])
                real = 0
            groups[-1].append(request)
            real += width
        return groups

    def _prefill(self, joining: list[Request]) -> None:
        """Prefill ``joining`` in one forward into the rows after the running ones. A row whose prompt starts with
        a stored prefix (of its adapter) runs only the rest, attending to the prefix's keys first. Joiners of one
        adapter take rows side by side (each adapter's rows are then one slice of the batch)."""
        if self.adapters is not None:
            joining = sorted(joining, key=lambda r: self.adapters.slot(r.adapter))
        self._learn_prefixes(joining)
        prefixes = [self._prefix_of(r) for r in joining]
        shared = [0 if p is None else len(p[0]) for p in prefixes]
        ids, pads = left_pad([r.prompt[n:] for r, n in zip(joining, shared)], self.pad_id, self.device)
        count, width, head = len(joining), ids.shape[1], max(shared)
        start = torch.tensor(shared, device=self.device)[:, None]
        positions = start + (pads.cumsum(-1) - 1).clamp(min=0)
        causal = torch.ones(width, width, dtype=torch.bool, device=self.device).tril()
        allowed = causal[None] & pads.bool()[:, None, :]
        key_positions = positions
        columns = torch.arange(head + width, device=self.device)[None, :]
        suffix = torch.tensor([width - len(r.prompt) + n for r, n in zip(joining, shared)], device=self.device)
        sources = torch.where(columns < start, head - start + columns, head + suffix[:, None] + columns - start)
        prefix = None
        if head:  # the prefixes' keys, left-padded to the longest, before the group's own
            prefix_columns = torch.arange(head, device=self.device)[None, :] - (head - start)
            allowed = torch.cat([(prefix_columns >= 0)[:, None, :].expand(-1, width, -1), allowed], dim=2)
            key_positions = torch.cat([prefix_columns.clamp(min=0), positions], dim=1)
            prefix = [tuple(torch.cat([_left(p[1][layer][i], head) if p else _left(None, head, like=kv[i])
                                       for p in prefixes]) for i in range(2))
                      for layer, kv in enumerate(next(p for p in prefixes if p)[1])]
        for request in joining:
            request.prefix_keys = None  # copied into the cache below; not kept twice
        masks = attention_masks(self.model.config, allowed, positions, key_positions, self.dtype)
        first = len(self.running)
        self.cache.prefill(first, sources.clamp(max=head + width - 1), rows=first + count, prefix=prefix)
        logits = self._forward([r.adapter for r in joining], ids, masks, positions, prefill=True)
        self.running = self.running + joining
        self.lengths = self.lengths + [len(r.prompt) for r in joining]
        self._take(joining, logits)

    def _prefix_of(self, request: Request):
        """The stored start of ``request``'s adapter that its prompt begins with, or the longest part of it (at
        least PREFIX_MIN tokens) that it does: a causal prefix's first n keys are the keys of its first n tokens.
        At least one token of the prompt is left to run. A request's own ``prefix_keys`` come first."""
        if request.prefix_keys is not None:
            return request.prompt[:request.prefix_keys[0][0].shape[2]], request.prefix_keys
        stored = self._prefixes.get(request.adapter)
        if stored is None:
            return None
        tokens, keys = stored
        shared = 0
        for shared, (a, b) in enumerate(zip(tokens, request.prompt[:-1]), start=1):
            if a != b:
                shared -= 1
                break
        if shared < PREFIX_MIN:
            return None
        if shared == len(tokens):
            return stored
        return tokens[:shared], [tuple(t[:, :, :shared] for t in kv) for kv in keys]

    def _learn_prefixes(self, joining: list[Request]) -> None:
        """Store the keys of the start that two or more joiners of one adapter share (at least PREFIX_MIN tokens,
        e.g. a system prompt), computed once, for them and for whoever joins later with the same start."""
        by_adapter: dict[str | None, list[list[int]]] = {}
        for request in joining:
            if self._prefix_of(request) is None:
                by_adapter.setdefault(request.adapter, []).append(request.prompt)
        for adapter, prompts in by_adapter.items():
            if len(prompts) < 2:
                continue
            shared = min(len(p) for p in prompts) - 1
            for position in range(shared):
                if any(p[position] != prompts[0][position] for p in prompts):
                    shared = position
                    break
            if shared < PREFIX_MIN:
                continue
            tokens = prompts[0][:shared]
            ids = torch.tensor([tokens], device=self.device)
            positions = torch.arange(shared, device=self.device)[None, :]
            allowed = torch.ones(shared, shared, dtype=torch.bool, device=self.device).tril()[None]
            masks = attention_masks(self.model.config, allowed, positions, positions, self.dtype)
            collected = self.cache.collect()
            self._forward([adapter], ids, masks, positions, prefill=True)
            if len(self._prefixes) >= PREFIXES_MAX and adapter not in self._prefixes:
                self._prefixes.pop(next(iter(self._prefixes)))
            self._prefixes[adapter] = (tokens, collected)

    def forget_prefixes(self) -> None:
        """Drop the stored prefixes (an adapter's weights changed)."""
        self._prefixes.clear()

    def _decode(self) -> None:
        count, width = len(self.running), max(self.lengths) + 1
        self.cache.reserve(count, width)
        names = [r.adapter for r in self.running]
        tokens = [self._next[r] for r in self.running]
        if self.graphs is not None:
            logits = self.graphs.decode(tokens, self.lengths, names, width)
        else:
            columns = torch.tensor(self.lengths, device=self.device)
            ids = torch.tensor(tokens, device=self.device)[:, None]
            masks, positions = self.decode_inputs(columns, width)
            self.cache.decode(count, columns, width)
            logits = self._forward(names, ids, masks, positions)
        self.lengths = [n + 1 for n in self.lengths]
        self._take(self.running, logits)

    def decode_inputs(self, columns: torch.Tensor, width: int):
        """The masks and position ids of a decode step whose rows hold ``columns`` tokens (device tensors only:
        a recorded graph computes them on replay)."""
        keys = torch.arange(width, device=self.device)[None, :]
        positions = columns[:, None]
        allowed = (keys <= positions)[:, None, :]
        return attention_masks(self.model.config, allowed, positions, keys.expand(len(columns), -1),
                               self.dtype), positions

    def forward(self, ids, masks, positions) -> torch.Tensor:
        """Last-position logits (float) of one step through the cache as set up by ``prefill`` / ``decode``."""
        return self.model(input_ids=ids, attention_mask=masks, position_ids=positions, use_cache=True,
                          logits_to_keep=1, **{self._cache_key: self.cache}).logits[:, -1].float()

    def _forward(self, names, ids, masks, positions, prefill: bool = False) -> torch.Tensor:
        rows = self.adapters.rows(names, stacked=not prefill) if self.adapters is not None else \
            contextlib.nullcontext()
        with rows:
            return self.forward(ids, masks, positions)

    def _take(self, requests: list[Request], logits: torch.Tensor) -> None:
        """Sample each row's next token and record it; a stop token, a stop string or the budget finishes the
        request."""
        picks = logits.argmax(dim=-1)
        sampled = [i for i, r in enumerate(requests) if r.sampling.temperature > 0]
        if sampled:
            picks = picks.clone()
            for i in sampled:
                picks[i] = next_tokens(logits[i:i + 1], requests[i].sampling, [requests[i].generator])[0]
        for request, token in zip(requests, picks.tolist()):
            self._next[request] = token
            if request.done:  # cancelled while its row was in flight
                continue
            if token in request.stop_ids:
                self._finish(request, "stop")
                continue
            request.tokens.append(token)
            if request.on_token is not None:
                request.on_token(token)
            if request.stream is not None:
                self._text(request, request.stream.push(token))
                if request.stream.stopped:
                    self._finish(request, "stop")
                    continue
            if len(request.tokens) >= request.sampling.max_new_tokens:
                self._finish(request, "length")
            elif request.settled is not None and request.settled(request.tokens):
                self._finish(request, "settled")

    def _finish(self, request: Request, reason: str) -> None:
        request.finish_reason = reason
        if request.stream is not None:
            self._text(request, request.stream.flush())
        if request.on_finish is not None:
            request.on_finish(request)

    @staticmethod
    def _text(request: Request, piece: str) -> None:
        if piece and request.on_text is not None:
            request.on_text(piece)

    def _leave(self) -> None:
        """Drop finished rows: the last running rows move into the rows they free."""
        count = len(self.running)
        keep = [i for i, r in enumerate(self.running) if not r.done]
        if len(keep) == count:
            return
        for request in self.running:
            if request.done:
                self._next.pop(request, None)
        size = len(keep)
        holes = [i for i in range(size) if self.running[i].done]
        movers = [i for i in keep if i >= size]
        if movers:
            self.cache.move(movers, holes)
        order = list(range(size))
        for hole, mover in zip(holes, movers):
            order[hole] = mover
        self.running = [self.running[i] for i in order]
        self.lengths = [self.lengths[i] for i in order]


def _left(tensor: torch.Tensor | None, width: int, like: torch.Tensor | None = None) -> torch.Tensor:
    """``tensor`` (1, heads, n, dim) padded with zeros on the left of its columns to ``width``; None: all zeros
    shaped like ``like``."""
    if tensor is None:
        return like.new_zeros(1, like.shape[1], width, like.shape[3])
    if tensor.shape[2] == width:
        return tensor
    return torch.cat([tensor.new_zeros(1, tensor.shape[1], width - tensor.shape[2], tensor.shape[3]), tensor], dim=2)


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
