"""The HTTP side of ``tunesmith serve``: OpenAI's routes on FastAPI over one engine (``worker.py``).

Every generating request becomes ``n`` engine requests; their text comes back through an asyncio queue as the
engine produces it (server-sent events when ``stream`` is on). Which adapters are resident, and when one loads or
goes, is ``resident.py``'s part.
"""

from __future__ import annotations

import asyncio
import collections
import hmac
import json
import secrets
import time
from dataclasses import dataclass, field

from fastapi import FastAPI, Request as HttpRequest
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from tunesmith.engine import Engine, Request
from tunesmith.errors import TunesmithError
from tunesmith.generate import SamplingConfig
from tunesmith.serve.registry import AdapterRegistry, ServeError, check_name
from tunesmith.serve.resident import ResidentAdapters
from tunesmith.serve.requests import ChatBody, CompletionBody, parse_body
from tunesmith.serve.worker import Worker
from tunesmith.templates import render_prompt, stop_token_ids


@dataclass
class ServerConfig:
    base_name: str
    api_key: str | None = None
    admin_key: str | None = None
    max_loaded: int = 8
    max_batch: int = 32
    max_queue: int = 256
    max_body: int = 1 << 20
    max_n: int = 8
    slot_wait: float = 60.0  # seconds a load waits for an adapter slot to free before a 503
    adapter_tokenizers: dict = field(default_factory=dict)  # name → tokenizer saved with the adapter


class Server:
    def __init__(self, model, tokenizer, slots, registry: AdapterRegistry, config: ServerConfig):
        self.model, self.tokenizer, self.slots, self.registry, self.config = model, tokenizer, slots, registry, config
        self.engine = Engine(model, pad_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0,
                             max_batch=config.max_batch, adapters=slots, tokenizer=tokenizer)
        self.worker = Worker(self.engine)
        self.outstanding = 0  # engine requests submitted and not finished
        self.requests_by_model: collections.Counter = collections.Counter()
        self.adapters = ResidentAdapters(model, slots, registry, self.worker, self.engine,
                                         max_loaded=config.max_loaded, slot_wait=config.slot_wait)
        self.context = getattr(model.config, "max_position_embeddings", None)

    @property
    def loaded(self) -> list[str]:
        """The resident adapters, least recently used first."""
        return list(self.adapters.loaded)

    # --- generation

    def resolve_model(self, model: str) -> str | None:
        """The adapter a request's ``model`` names; None for the base."""
        if model == self.config.base_name:
            return None
        check_name(model)
        if model not in self.loaded:
            self.registry.resolve(model)  # unknown or refused names fail before anything waits
        return model

    def tokenizer_for(self, adapter: str | None):
        return self.config.adapter_tokenizers.get(adapter, self.tokenizer) if adapter else self.tokenizer

    def check_fits(self, prompt: list[int], max_tokens: int | None) -> int:
        if self.context is None:
            return max_tokens or 256
        if len(prompt) >= self.context:
            raise ServeError(400, f"the prompt is {len(prompt)} tokens; this model's context is {self.context}",
                             code="context_length_exceeded")
        room = self.context - len(prompt)
        if max_tokens is not None and max_tokens > room:
            raise ServeError(400, f"the prompt is {len(prompt)} tokens and max_tokens is {max_tokens}: more than the "
                             f"model's context of {self.context}; lower max_tokens to {room} or less",
                             code="context_length_exceeded")
        return max_tokens if max_tokens is not None else room

    async def generate(self, prompt: list[int], body, adapter: str | None, stop_ids: set[int]):
        """Submit ``body.n`` requests; yields ("text", index, piece) and ("done", index, request) events."""
        n = body.n
        max_tokens = self.check_fits(prompt, body.max_tokens)
        if self.outstanding + n > self.config.max_batch + self.config.max_queue:
            raise ServeError(429, "the server's queue is full; retry shortly", kind="rate_limit_error",
                             code="queue_full", headers={"Retry-After": "1"})
        self.outstanding += n  # counted before any await, so concurrent requests see each other
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        seed = body.seed if body.seed is not None else secrets.randbelow(1 << 62)
        requests = []
        for index in range(n):
            sampling = SamplingConfig(max_new_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p,
                                      top_k=body.top_k, seed=seed + index)
            requests.append(Request(list(prompt), sampling=sampling, stop_ids=frozenset(stop_ids), adapter=adapter,
                                    stop=tuple(body.stop),
                                    on_token=self.worker.count,
                                    on_text=lambda piece, i=index: loop.call_soon_threadsafe(
                                        events.put_nowait, ("text", i, piece)),
                                    on_finish=lambda r, i=index: loop.call_soon_threadsafe(
                                        events.put_nowait, ("done", i, r))))
        try:
            await self.adapters.acquire(adapter)
        except BaseException:
            self.outstanding -= n
            raise
        self.requests_by_model[adapter or self.config.base_name] += 1
        finished = 0
        try:
            await asyncio.wrap_future(self.worker.call(lambda: [self.engine.submit(r) for r in requests]))
            while finished < n:
                event = await events.get()
                finished += event[0] == "done"
                yield event
        finally:
            self.outstanding -= n
            self.adapters.release(adapter)
            if finished < n:  # the client went away: free the rows at the next step
                self.worker.call(lambda: [self.engine.cancel(r) for r in requests])


def _error(status: int, message: str, kind: str = "invalid_request_error", code: str | None = None,
           headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": None, "code": code}}, status_code=status,
                        headers=headers)


def _check_key(request: HttpRequest, key: str | None) -> None:
    if key is None:
        return
    given = request.headers.get("authorization", "")
    token = given[7:] if given[:7].lower() == "bearer " else ""
    if not hmac.compare_digest(token.encode("utf-8", "replace"), key.encode("utf-8")):
        raise ServeError(401, "missing or wrong API key (Authorization: Bearer <key>)", code="invalid_api_key")


async def _body(request: HttpRequest, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ServeError(413, f"the request body is over {limit} bytes", code="body_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ServeError(413, f"the request body is over {limit} bytes", code="body_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


def _usage(prompt: list[int], requests: list[Request]) -> dict:
    completion = sum(len(r.tokens) for r in requests)
    return {"prompt_tokens": len(prompt), "completion_tokens": completion, "total_tokens": len(prompt) + completion}


def _finish_reason(request: Request) -> str:
    if request.finish_reason == "error":
        raise ServeError(500, f"generation failed: {request.error}", kind="server_error", code="generation_failed")
    return "length" if request.finish_reason == "length" else "stop"


def _sse(payload) -> bytes:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n".encode()


def create_app(server: Server) -> FastAPI:
    app = FastAPI(title="tunesmith", docs_url=None, redoc_url=None, openapi_url=None,
                  lifespan=_lifespan(server))
    config = server.config

    @app.exception_handler(ServeError)
    async def serve_error(request, error: ServeError):
        return _error(error.status, error.message, error.kind, error.code, error.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, error: StarletteHTTPException):
        return _error(error.status_code, str(error.detail), code="not_found" if error.status_code == 404 else None)

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models(request: HttpRequest):
        _check_key(request, config.api_key)
        created = int(time.time())
        names = [config.base_name] + server.registry.available()
        return {"object": "list", "data": [{"id": name, "object": "model", "created": created,
                                            "owned_by": "tunesmith", **({"parent": config.base_name} if i else {})}
                                           for i, name in enumerate(names)]}

    @app.get("/metrics")
    async def metrics(request: HttpRequest):
        _check_key(request, config.api_key)
        engine = server.engine
        lines = ["# HELP tunesmith_queue_depth Requests waiting to join the batch.",
                 "# TYPE tunesmith_queue_depth gauge", f"tunesmith_queue_depth {len(engine.waiting)}",
                 "# HELP tunesmith_running_sequences Sequences in the running batch.",
                 "# TYPE tunesmith_running_sequences gauge", f"tunesmith_running_sequences {len(engine.running)}",
                 "# HELP tunesmith_generated_tokens_total Tokens generated since start.",
                 "# TYPE tunesmith_generated_tokens_total counter",
                 f"tunesmith_generated_tokens_total {server.worker.generated}",
                 "# HELP tunesmith_tokens_per_second Tokens generated per second over the last 10 seconds.",
                 "# TYPE tunesmith_tokens_per_second gauge",
                 f"tunesmith_tokens_per_second {server.worker.tokens_per_second():.3f}",
                 "# HELP tunesmith_adapters_loaded Adapters resident in the model's slots.",
                 "# TYPE tunesmith_adapters_loaded gauge", f"tunesmith_adapters_loaded {len(server.loaded)}",
                 "# HELP tunesmith_requests_total Generation requests by model (base or adapter).",
                 "# TYPE tunesmith_requests_total counter"]
        lines += [f'tunesmith_requests_total{{model="{name}"}} {count}'
                  for name, count in sorted(server.requests_by_model.items())]
        return PlainTextResponse("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")

    async def _read(request: HttpRequest, kind):
        """The checked key, then the request's body, the adapter its model names and that model's tokenizer."""
        _check_key(request, config.api_key)
        body = parse_body(await _body(request, config.max_body), kind, max_n=config.max_n)
        adapter = server.resolve_model(body.model)
        return body, adapter, server.tokenizer_for(adapter)

    @app.post("/v1/chat/completions")
    async def chat(request: HttpRequest):
        body, adapter, tokenizer = await _read(request, ChatBody)
        try:
            prompt = render_prompt(tokenizer, body.conversation(), reasoning=body.reasoning_mode())
        except (TunesmithError, ValueError) as error:
            raise ServeError(400, f"the messages cannot be rendered with this model's chat template: {error}",
                             code="invalid_messages") from None
        return await _respond(server, request, body, prompt, adapter, set(stop_token_ids(tokenizer)), chat=True)

    @app.post("/v1/completions")
    async def completions(request: HttpRequest):
        body, adapter, tokenizer = await _read(request, CompletionBody)
        prompt = tokenizer(body.prompt, add_special_tokens=True)["input_ids"]
        if not prompt:
            raise ServeError(400, "the prompt is empty", code="empty_prompt")
        stops = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
        return await _respond(server, request, body, prompt, adapter, stops, chat=False)

    @app.post("/admin/adapters/load")
    async def admin_load(request: HttpRequest):
        name = await _admin_name(request)
        await server.adapters.acquire(name)
        server.adapters.release(name)
        return {"loaded": name, "resident": list(server.loaded)}

    @app.post("/admin/adapters/unload")
    async def admin_unload(request: HttpRequest):
        name = await _admin_name(request)
        return {"unloaded": name if await server.adapters.unload(name) else None, "resident": list(server.loaded)}

    async def _admin_name(request: HttpRequest) -> str:
        if config.admin_key is None:
            raise ServeError(404, "admin routes are off (start the server with --admin-key)", code="not_found")
        _check_key(request, config.admin_key)
        raw = await _body(request, config.max_body)
        try:
            name = json.loads(raw).get("name")
        except (ValueError, AttributeError):
            raise ServeError(400, 'the body must be JSON: {"name": "<adapter>"}') from None
        check_name(name)
        server.registry.resolve(name)
        return name

    return app


async def _respond(server: Server, http: HttpRequest, body, prompt: list[int], adapter: str | None,
                   stop_ids: set[int], *, chat: bool):
    ident = ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12)
    created, model = int(time.time()), body.model
    events = server.generate(prompt, body, adapter, stop_ids)
    first = await anext(events)  # errors (queue full, a bad adapter, the context) answer before any stream
    if body.stream:
        return StreamingResponse(_stream(first, events, ident, created, model, prompt, body, chat),
                                 media_type="text/event-stream")
    finished: dict[int, Request] = {}
    watcher = asyncio.ensure_future(_disconnected(http))
    try:
        event = first
        while True:
            if event[0] == "done":
                finished[event[1]] = event[2]
            next_event = asyncio.ensure_future(anext(events))
            done, _ = await asyncio.wait({next_event, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if watcher in done:
                next_event.cancel()
                await events.aclose()
                return _error(499, "client closed the request")
            try:
                event = next_event.result()
            except StopAsyncIteration:
                break
    finally:
        watcher.cancel()
    requests = [finished[i] for i in range(body.n)]
    if chat:
        choices = [{"index": i, "message": {"role": "assistant", "content": r.text}, "logprobs": None,
                    "finish_reason": _finish_reason(r)} for i, r in enumerate(requests)]
    else:
        choices = [{"index": i, "text": r.text, "logprobs": None, "finish_reason": _finish_reason(r)}
                   for i, r in enumerate(requests)]
    return {"id": ident, "object": "chat.completion" if chat else "text_completion", "created": created,
            "model": model, "choices": choices, "usage": _usage(prompt, requests)}


async def _disconnected(http: HttpRequest) -> None:
    while not await http.is_disconnected():
        await asyncio.sleep(0.1)


async def _stream(first, events, ident, created, model, prompt, body, chat: bool):
    kind = "chat.completion.chunk" if chat else "text_completion"

    def chunk(index: int, text: str | None, finish: str | None, role: bool = False) -> dict:
        if chat:
            delta = ({"role": "assistant", "content": ""} if role else {} if text is None else {"content": text})
            choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish}
        return {"id": ident, "object": kind, "created": created, "model": model, "choices": [choice]}

    finished: list[Request] = []
    try:
        if chat:
            for index in range(body.n):
                yield _sse(chunk(index, None, None, role=True))
        event = first
        while True:
            if event[0] == "text":
                yield _sse(chunk(event[1], event[2], None))
            else:
                request = event[2]
                finished.append(request)
                try:
                    reason = _finish_reason(request)
                except ServeError as error:
                    yield _sse({"error": {"message": error.message, "type": error.kind, "param": None,
                                          "code": error.code}})
                    return
                yield _sse(chunk(event[1], None, reason))
            try:
                event = await anext(events)
            except StopAsyncIteration:
                break
        if body.include_usage():
            yield _sse({"id": ident, "object": kind, "created": created, "model": model, "choices": [],
                        "usage": _usage(prompt, finished)})
        yield _sse("[DONE]")
    finally:
        await events.aclose()  # a client that left: its rows are cancelled


def _lifespan(server: Server):
    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app):
        server.worker.start()
        try:
            yield
        finally:
            server.worker.stop()

    return lifespan
