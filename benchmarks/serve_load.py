"""Load test of ``tunesmith serve``: requests/s and latency percentiles at 1, 8 and 32 concurrent clients,
through HTTP (the official ``openai`` client, one thread per client) and against the engine called directly on
the same requests (what the server costs).

The server is a real ``tunesmith serve`` process (its own interpreter, as deployed: the clients' threads do not
share its GIL), for the embedded model (or ``--model``) with ``--adapters N`` random rank-16 adapters made on the
fly, chat requests over the built-in task's held-out prompts, greedy, ``--max-tokens`` new tokens, adapters
round-robin. Each client sends its next request when its previous one returns. The direct runs build the same
server in this process once the server process has ended. Prints one JSON line per run.

    .venv/bin/python benchmarks/serve_load.py --clients 1,8,32 --requests 64
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cpu_generate import make_adapters  # noqa: E402

from tunesmith.data.builtin import builtin_task  # noqa: E402


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def report(name: str, clients: int, latencies: list[float], seconds: float, tokens: int) -> None:
    print(json.dumps({"run": name, "clients": clients, "requests": len(latencies),
                      "requests_per_s": round(len(latencies) / seconds, 2), "tokens_per_s": round(tokens / seconds, 1),
                      "p50_s": round(percentile(latencies, 0.5), 3), "p90_s": round(percentile(latencies, 0.9), 3),
                      "p99_s": round(percentile(latencies, 0.99), 3), "mean_s": round(statistics.mean(latencies), 3)}),
          flush=True)


def run_clients(name: str, call, jobs: list, clients_list: list[int]) -> None:
    for clients in clients_list:
        with concurrent.futures.ThreadPoolExecutor(clients) as pool:
            list(pool.map(call, jobs[:clients] * 2))  # warm: adapters resident, this concurrency's graphs recorded
            start = time.perf_counter()
            results = list(pool.map(call, jobs))
        seconds = time.perf_counter() - start
        report(name, clients, [r[0] for r in results], seconds, sum(r[1] for r in results))


def start_server(args, adapter_root: str) -> tuple[subprocess.Popen, str]:
    """``tunesmith serve`` in its own process on a free loopback port; returns it once /health answers."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "tunesmith", "serve", "--model", args.model, "--adapters", adapter_root,
               "--device", args.device, "--port", str(port), "--max-loaded", str(args.adapters), "--max-batch", "32"]
    server = subprocess.Popen(command, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"tunesmith serve exited with {server.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                return server, f"http://127.0.0.1:{port}/v1"
        except OSError:
            time.sleep(0.5)
    server.kill()
    raise SystemExit("tunesmith serve did not answer /health within 600 s")


def main() -> None:
    from openai import OpenAI

    from tunesmith.engine import Request
    from tunesmith.generate import SamplingConfig
    from tunesmith.serve.launch import build_server
    from tunesmith.templates import render_prompt, stop_token_ids

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default", help="a model source; on a GPU machine, where no weights "
                        "travel, a random-init dir (tunesmith.bench.build_model_dir)")
    parser.add_argument("--clients", default="1,8,32")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--adapters", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    rows = builtin_task("test", args.requests)
    clients_list = [int(c) for c in args.clients.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        names = list(make_adapters(args.adapters, Path(tmp), args.model))
        jobs = [(names[i % len(names)], row["messages"][:-1]) for i, row in enumerate(rows)]
        process, url = start_server(args, tmp)
        try:
            client = OpenAI(base_url=url, api_key="none", max_retries=0, timeout=600)

            def over_http(job):
                start = time.perf_counter()
                reply = client.chat.completions.create(model=job[0], messages=job[1], temperature=0,
                                                       max_tokens=args.max_tokens)
                return time.perf_counter() - start, reply.usage.completion_tokens

            run_clients("http", over_http, jobs, clients_list)
        finally:
            process.terminate()
            process.wait(timeout=120)

        server = build_server(args.model, adapter_root=tmp, device=args.device, max_loaded=args.adapters,
                              max_batch=32)
        tokenizer = server.tokenizer
        stops = frozenset(stop_token_ids(tokenizer))

        def direct(job):  # the engine called directly, through the server's own worker thread
            start = time.perf_counter()
            done = threading.Event()
            request = Request(render_prompt(tokenizer, job[1]), sampling=SamplingConfig(max_new_tokens=args.max_tokens),
                              stop_ids=stops, adapter=job[0], on_finish=lambda r: done.set())
            server.worker.call(lambda: server.engine.submit(request)).result()
            done.wait()
            return time.perf_counter() - start, len(request.tokens)

        server.worker.start()  # what the app's startup does
        try:
            for name in names:  # resident, as the HTTP runs left them (no more adapters than --max-loaded)
                asyncio.run(server.adapters.acquire(name))
            run_clients("engine direct", direct, jobs, clients_list)
        finally:
            server.worker.stop()


if __name__ == "__main__":
    main()
