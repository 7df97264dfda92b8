"""``tunesmith serve``'s set-up: the model (a model or a run dir), the adapter root and names, then uvicorn."""

from __future__ import annotations

import os
from pathlib import Path

from tunesmith.errors import TunesmithError


def add_serve_arguments(p, whole_number, positive) -> None:
    """``tunesmith serve``'s flags (the command line's parser and its number types)."""
    p.add_argument("--model", default="default", help="a model, or a run dir (its base, its adapter by the run's name)")
    p.add_argument("--adapter", action="append", metavar="NAME=PATH", help="an adapter served as NAME (repeatable)")
    p.add_argument("--adapters", metavar="DIR", help="adapter root: each subdir is an adapter, named by its dir")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=whole_number, default=8000)
    p.add_argument("--api-key", help="required as 'Authorization: Bearer KEY' (or TUNESMITH_API_KEY)")
    p.add_argument("--admin-key", help="turns on /admin/adapters/load|unload (or TUNESMITH_ADMIN_KEY)")
    p.add_argument("--max-loaded", type=positive, default=8, help="adapters resident at once (LRU)")
    p.add_argument("--max-batch", type=positive, default=32, help="sequences decoded together")
    p.add_argument("--max-queue", type=positive, default=256, help="requests waiting beyond the batch (then 429)")
    p.add_argument("--max-body", type=positive, default=1 << 20, help="largest request body in bytes (then 413)")
    p.add_argument("--grace", type=positive, default=600, help="seconds SIGTERM waits for running requests")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--device", default="auto")


def build_server(model: str, *, adapters: list[str] = (), adapter_root: str | None = None, dtype: str = "auto",
                 device: str = "auto", trust_remote_code: bool = False, **config):
    """A ``Server`` for ``model`` (a model source, or a run dir: its base, with its adapter under the run's
    name) and the adapters named ``name=PATH`` or found under ``adapter_root``."""
    from tunesmith.config_run import is_run_dir, load_run_config
    from tunesmith.models.build import build_model, model_from_flags
    from tunesmith.models.load import load_tokenizer
    from tunesmith.peft.multi import AdapterSlots
    from tunesmith.serve.app import Server, ServerConfig
    from tunesmith.serve.registry import AdapterRegistry, ServeError

    named: dict[str, Path] = {}
    for item in adapters:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise TunesmithError(f"--adapter {item!r}: give it as name=PATH")
        named[name] = Path(path)
    if is_run_dir(model):
        run = load_run_config(model, trust_remote_code=trust_remote_code)
        section = run.model.model_copy(update={"dtype": dtype, "device": device})
        if (Path(model) / "model").is_dir():  # a full fine-tune: its model is the base
            section = section.model_copy(update={"source": str(Path(model) / "model")})
        elif (Path(model) / "adapter").is_dir():
            named.setdefault(Path(model).resolve().name, Path(model) / "adapter")
        base_name = Path(section.source).name if os.sep in section.source else section.source
    else:
        section = model_from_flags(model, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
        base_name = Path(model).name if os.sep in model else model
    built = build_model(section)
    try:
        registry = AdapterRegistry(adapter_root, named)
    except ServeError as error:
        raise TunesmithError(error.message) from None
    for name in registry.named:
        registry.resolve(name)
    tokenizers = {}
    for name, path in registry.named.items():  # an adapter saved with its run's template renders with it
        if (path / "tokenizer_config.json").is_file():
            tokenizers[name] = load_tokenizer(str(path), trust_remote_code=trust_remote_code)
    slots = AdapterSlots(built.model, capacity=config.get("max_loaded", 8), targets="all-linear")
    return Server(built.model, built.tokenizer, slots, registry,
                  ServerConfig(base_name=base_name, adapter_tokenizers=tokenizers, **config))


def serve(args) -> None:
    import uvicorn

    from tunesmith.serve.app import create_app

    server = build_server(args.model, adapters=args.adapter or [], adapter_root=args.adapters, dtype=args.dtype,
                          device=args.device, trust_remote_code=args.trust_remote_code,
                          api_key=args.api_key or os.environ.get("TUNESMITH_API_KEY"),
                          admin_key=args.admin_key or os.environ.get("TUNESMITH_ADMIN_KEY"),
                          max_loaded=args.max_loaded, max_batch=args.max_batch, max_queue=args.max_queue,
                          max_body=args.max_body)
    print(f"serving {server.config.base_name} and {len(server.registry.available())} adapter(s) on "
          f"http://{args.host}:{args.port}/v1", flush=True)
    uvicorn.run(create_app(server), host=args.host, port=args.port, log_level="warning",
                timeout_graceful_shutdown=args.grace)
