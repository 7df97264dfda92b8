"""The server's security points, each a test (issue 27): keys, error shape without echo, names that try to
reach paths, unsafe adapter files, bad loads amid good traffic, limits, SIGTERM."""

from __future__ import annotations

import concurrent.futures
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse

import pytest
import torch
from conftest import ADMIN_KEY, API_KEY, Running, alone, http
from test_engine_adapters import make_adapters
from tinymodels import build_tiny_llama

MARKER = "ECHO-ME-7f3a"


@pytest.fixture(scope="module")
def hostile(served_files, tmp_path_factory):
    """An adapter root holding, beside good adapters: a symlink to an adapter outside, a pickle-only adapter,
    one with an invalid config, one trained on another base; and a server on it."""
    base, _, adapters = served_files
    root = tmp_path_factory.mktemp("hostile-root")
    outside = tmp_path_factory.mktemp("outside")
    for name in ("ad0", "ad1", "ad2"):
        shutil.copytree(adapters[name], root / name)
    shutil.copytree(adapters["ad3"], outside / "secret")
    (root / "escape").symlink_to(outside / "secret", target_is_directory=True)
    pickle_only = root / "pickled"
    pickle_only.mkdir()
    shutil.copy(adapters["ad0"] / "adapter_config.json", pickle_only)
    torch.save({"x": torch.zeros(1)}, pickle_only / "adapter_model.bin")
    broken = root / "broken"
    shutil.copytree(adapters["ad1"], broken)
    (broken / "adapter_config.json").write_text('{"r": "many"')
    other = make_adapters(lambda: build_tiny_llama(seed=5, initializer_range=0.5), tmp_path_factory.mktemp("o"),
                          "another-base", count=1)
    shutil.copytree(other["ad0"], root / "wrongbase")
    server = Running(base, root, max_loaded=3)
    yield server
    server.stop()


ROUTES = [("GET", "/v1/models", None), ("GET", "/metrics", None),
          ("POST", "/v1/chat/completions", {"model": "ad0", "messages": [{"role": "user", "content": "hi"}]}),
          ("POST", "/v1/completions", {"model": "ad0", "prompt": "hi"}),
          ("POST", "/admin/adapters/load", {"name": "ad0"})]


@pytest.mark.parametrize("key", [None, "wrong-key", API_KEY + "x", ""])
def test_every_route_but_health_needs_the_key(hostile, key):
    for method, path, body in ROUTES:
        status, _, reply = http(hostile.root + path, body=body, key=key, method=method)
        assert status == 401, path
        assert reply["error"]["code"] == "invalid_api_key" and reply["error"]["type"] == "invalid_request_error"
    status, _, reply = http(hostile.root + "/health", key=None)
    assert status == 200 and reply == {"status": "ok"}


def test_errors_are_openai_shaped_and_never_echo_the_input(hostile):
    url = hostile.url + "/chat/completions"
    cases = [
        (b'{"model": "ad0", "messages": [' + MARKER.encode(), "invalid_json"),
        (json.dumps({"model": "ad0", "messages": MARKER}).encode(), "invalid_request"),
        (json.dumps({"model": "ad0", "messages": [{"role": MARKER, "content": "x"}]}).encode(), "invalid_request"),
        (json.dumps({"model": "ad0", "messages": [{"role": "user", "content": "x"}], "temperature": MARKER}
                    ).encode(), "invalid_request"),
        (json.dumps([MARKER]).encode(), "invalid_json"),
    ]
    for raw, code in cases:
        status, _, reply = http(url, raw=raw)
        assert status == 400 and reply["error"]["code"] == code, reply
        assert MARKER not in json.dumps(reply)
        assert set(reply["error"]) == {"message", "type", "param", "code"}


@pytest.mark.parametrize("name", ["../ad0", "/etc/passwd", "%2e%2e/ad0", "%2E%2E", "..", "ad0/../ad1", "ad0\x00",
                                  "a" * 65, "escape", "ad0/", "org/model", " ad0", "\\..\\ad0"])
def test_a_request_can_never_name_a_path(hostile, name):
    status, _, reply = http(hostile.url + "/chat/completions",
                            body={"model": name, "messages": [{"role": "user", "content": "hi"}]})
    assert status in (400, 404) and reply["error"]["code"] in ("invalid_model_name", "model_not_found")
    assert "escape" not in [m["id"] for m in http(hostile.url + "/models")[2]["data"]]
    assert "ad3" not in hostile.server.loaded and "escape" not in hostile.server.loaded
    encoded = urllib.parse.quote(name, safe="")
    status, _, _ = http(hostile.root + "/admin/adapters/load", body={"name": name}, key=ADMIN_KEY)
    assert status in (400, 404), encoded


def test_bad_loads_mixed_into_good_traffic(hostile, served_files, tokenizer):
    base, _, adapters = served_files
    good = [("ad0", "cats"), ("ad1", "dogs"), ("ad2", "fish")] * 3
    bad = [("missing", 404, "model_not_found"), ("pickled", 400, "adapter_load_failed"),
           ("broken", 400, "adapter_load_failed"), ("wrongbase", 400, "adapter_load_failed")]

    def call(job):
        model, content = job
        return http(hostile.url + "/chat/completions", body={
            "model": model, "messages": [{"role": "user", "content": content}], "temperature": 0, "max_tokens": 8})

    jobs = good[:3] + [(name, "x") for name, _, _ in bad] + good[3:]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(call, jobs))
    outcome = dict(zip([j[0] for j in jobs], results))
    for name, status, code in bad:
        got_status, _, reply = outcome[name]
        assert (got_status, reply["error"]["code"]) == (status, code), name
    assert "pickle" in outcome["pickled"][2]["error"]["message"]
    assert "another-base" in outcome["wrongbase"][2]["error"]["message"]
    for (model, content), (status, _, reply) in zip(jobs, results):
        if model.startswith("ad"):
            assert status == 200
            assert reply["choices"][0]["message"]["content"] == alone(
                base, tokenizer, adapters[model], [{"role": "user", "content": content}])


def test_limits(hostile):
    url = hostile.url + "/completions"
    port = int(hostile.root.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port)) as sock:  # a declared body over the limit: refused unread
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + API_KEY.encode()
                     + b"\r\nContent-Type: application/json\r\nContent-Length: 2000000\r\n\r\n")
        received = b""
        while b"}}" not in received:
            chunk = sock.recv(4096)
            assert chunk, received
            received += chunk
    assert received.startswith(b"HTTP/1.1 413") and b'"code":"body_too_large"' in received
    status, _, reply = http(url, body={"model": "ad0", "prompt": "hello " * 600})
    assert status == 400 and reply["error"]["code"] == "context_length_exceeded"
    status, _, reply = http(url, body={"model": "ad0", "prompt": "hello", "max_tokens": 5000})
    assert status == 400 and "lower max_tokens" in reply["error"]["message"]
    status, _, reply = http(url, body={"model": "ad0", "prompt": "hello", "n": 99})
    assert status == 400 and "n: at most" in reply["error"]["message"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_sigterm_finishes_running_requests_and_refuses_new_ones(served_files, tmp_path):
    base, root, _ = served_files
    port = _free_port()
    env = {**os.environ, "TUNESMITH_API_KEY": API_KEY}
    proc = subprocess.Popen([sys.executable, "-m", "tunesmith", "serve", "--model", str(base), "--adapters",
                             str(root), "--port", str(port), "--device", "cpu", "--dtype", "fp32"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 60
        while True:
            try:
                if http(url + "/health", key=None)[0] == 200:
                    break
            except OSError:
                pass
            assert time.time() < deadline and proc.poll() is None, proc.stdout.read() if proc.poll() else "slow"
            time.sleep(0.2)
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            running = pool.submit(http, url + "/v1/completions", body={"model": "ad0", "prompt": "x",
                                                                        "max_tokens": 480, "temperature": 0})
            while "tunesmith_running_sequences 1" not in http(url + "/metrics")[2]:  # it is generating
                assert not running.done(), running.result()
                time.sleep(0.02)
            proc.send_signal(signal.SIGTERM)
            status, _, reply = running.result(timeout=60)
        assert status == 200 and reply["usage"]["completion_tokens"] > 0
        assert proc.wait(timeout=60) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once drained
        with pytest.raises(OSError):
            http(url + "/health", key=None)
    finally:
        if proc.poll() is None:
            proc.kill()
