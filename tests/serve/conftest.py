"""A real server on a loopback port: a tiny Llama with ten adapters under an adapter root (issue 27)."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request

import pytest
import torch
from test_engine_adapters import make_adapters
from tinymodels import build_tiny_llama

from tunesmith.engine import Engine, Request
from tunesmith.generate import SamplingConfig
from tunesmith.peft.io import load_adapter
from tunesmith.templates import render_prompt

API_KEY, ADMIN_KEY = "test-key", "admin-key"


def build():
    return build_tiny_llama(initializer_range=0.5)


@pytest.fixture(scope="session")
def served_files(tmp_path_factory, tokenizer):
    """The base model dir and an adapter root with ten adapters (three ranks, two target sets)."""
    base = tmp_path_factory.mktemp("served-base")
    build().save_pretrained(base)
    tokenizer.save_pretrained(base)
    root = tmp_path_factory.mktemp("adapter-root")
    adapters = make_adapters(build, root, str(base))
    return base, root, adapters


class Running:
    """A server started in a thread; ``url`` is its /v1 root."""

    def __init__(self, base, root, **config):
        import uvicorn

        from tunesmith.serve.app import create_app
        from tunesmith.serve.launch import build_server

        config.setdefault("api_key", API_KEY)
        config.setdefault("admin_key", ADMIN_KEY)
        self.server = build_server(str(base), adapter_root=str(root) if root else None, dtype="fp32", device="cpu",
                                   **config)
        self.uvicorn = uvicorn.Server(uvicorn.Config(create_app(self.server), host="127.0.0.1", port=0,
                                                     log_level="error"))
        self.thread = threading.Thread(target=self.uvicorn.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.uvicorn.started:
            assert time.time() < deadline, "the server did not start"
            time.sleep(0.05)
        port = self.uvicorn.servers[0].sockets[0].getsockname()[1]
        self.root = f"http://127.0.0.1:{port}"
        self.url = self.root + "/v1"

    def stop(self):
        self.uvicorn.should_exit = True
        self.thread.join(timeout=30)

    def client(self, key=API_KEY):
        from openai import OpenAI

        return OpenAI(base_url=self.url, api_key=key, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def running(served_files):
    base, root, _ = served_files
    server = Running(base, root, max_loaded=4, max_batch=16)
    yield server
    server.stop()


def http(url, *, body=None, key=API_KEY, method=None, headers=None, raw=None):
    """(status, headers, parsed JSON or text) of one plain HTTP call."""
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    request = urllib.request.Request(url, data=data, method=method or ("POST" if data is not None else "GET"))
    if key is not None:
        request.add_header("Authorization", f"Bearer {key}")
    request.add_header("Content-Type", "application/json")
    for name, value in (headers or {}).items():
        request.add_header(name, value)
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            status, head, text = response.status, dict(response.headers), response.read().decode()
    except urllib.error.HTTPError as error:
        status, head, text = error.code, dict(error.headers), error.read().decode()
    try:
        return status, head, json.loads(text)
    except ValueError:
        return status, head, text


def alone(base_dir, tokenizer, adapter_dir, messages=None, prompt_ids=None, max_tokens=8):
    """What the model (with one adapter loaded the training way) answers alone, greedy: the text."""
    model = build()
    if adapter_dir is not None:
        load_adapter(model, adapter_dir)
    ids = prompt_ids if prompt_ids is not None else render_prompt(tokenizer, messages)
    from tunesmith.templates import stop_token_ids

    engine = Engine(model, pad_id=0, tokenizer=tokenizer)
    request = engine.submit(Request(ids, sampling=SamplingConfig(max_new_tokens=max_tokens),
                                    stop_ids=frozenset(stop_token_ids(tokenizer)), on_text=lambda piece: None))
    engine.run()
    return request.text


torch.set_num_threads(max(1, torch.get_num_threads()))
