"""Load test of ``tunesmith serve``: requests/s and latency percentiles at 1, 8 and 32 concurrent clients,
through HTTP (the official ``openai`` client, one thread per client) and against the engine called directly on
the same requests (what the server costs).

The embedded model (or ``--model``) with ``--adapters N`` random rank-16 adapters made on the fly, chat requests
over the built-in task's held-out prompts, greedy, ``--max-tokens`` new tokens, adapters round-robin. Each
client sends its next request when its previous one returns. Prints one JSON line per run.

    .venv/bin/python benchmarks/serve_load.py --clients 1,8,32 --requests 64
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import statistics
import sys
import tempfile
import threading
import time
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


def main() -> None:
    import uvicorn
    from openai import OpenAI

    from tunesmith.engine import Request
    from tunesmith.generate import SamplingConfig
    from tunesmith.serve.app import create_app
    from tunesmith.serve.launch import build_server
    from tunesmith.templates import render_prompt, stop_token_ids

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--clients", default="1,8,32")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--adapters", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    rows = builtin_task("test", args.requests)
    with tempfile.TemporaryDirectory() as tmp:
        names = list(make_adapters(args.adapters, Path(tmp)))
        server = build_server(args.model, adapter_root=tmp, device=args.device, max_loaded=args.adapters,
                              max_batch=32)
        jobs = [(names[i % len(names)], row["messages"][:-1]) for i, row in enumerate(rows)]
        uv = uvicorn.Server(uvicorn.Config(create_app(server), host="127.0.0.1", port=0, log_level="error"))
        threading.Thread(target=uv.run, daemon=True).start()
        while not uv.started:
            time.sleep(0.05)
        url = f"http://127.0.0.1:{uv.servers[0].sockets[0].getsockname()[1]}/v1"
        client = OpenAI(base_url=url, api_key="none", max_retries=0, timeout=600)

        def over_http(job):
            start = time.perf_counter()
            reply = client.chat.completions.create(model=job[0], messages=job[1], temperature=0,
                                                   max_tokens=args.max_tokens)
            return time.perf_counter() - start, reply.usage.completion_tokens

        tokenizer = server.tokenizer
        stops = frozenset(stop_token_ids(tokenizer))

        def direct(job):  # the engine called directly, through the server's own thread
            start = time.perf_counter()
            done = threading.Event()
            request = Request(render_prompt(tokenizer, job[1]), sampling=SamplingConfig(max_new_tokens=args.max_tokens),
                              stop_ids=stops, adapter=job[0], on_finish=lambda r: done.set())
            server.worker.call(lambda: server.engine.submit(request)).result()
            done.wait()
            return time.perf_counter() - start, len(request.tokens)

        for name, call in (("http", over_http), ("engine direct", direct)):
            for clients in (int(c) for c in args.clients.split(",")):
                call(jobs[0])  # warm: the adapter loaded, the first graphs recorded
                start = time.perf_counter()
                with concurrent.futures.ThreadPoolExecutor(clients) as pool:
                    results = list(pool.map(call, jobs))
                seconds = time.perf_counter() - start
                report(name, clients, [r[0] for r in results], seconds, sum(r[1] for r in results))
        uv.should_exit = True


if __name__ == "__main__":
    main()
