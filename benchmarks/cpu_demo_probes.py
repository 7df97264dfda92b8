"""Probes behind this session's CPU numbers in BENCHMARKS.md (embedded model, 2-core machine), one per argument:

* ``kernel``: the row kernel alone (``peft/row_kernel.py``), 16 rows over 8 rank-16 adapters, µs and GFLOP/s per
  product shape of the demo model, and an empty call.
* ``heldout``: the demo's held-out loss on the base model with plain SDPA (flat) and with row attention,
  alternating twice.
* ``eval-batch``: the base model's 100 greedy answers at ``eval.batch_size`` 64 and 128, alternating, twice in each
  order; the answers must be the same.
* ``gguf-parse``: gguf's reader against ``models.defaults``' plain-view reader on the embedded file, alternating.
* ``demo-timeline``: ``tunesmith demo`` in this process, each piece stamped (the GGUF conversion on first use,
  the held-out loss passes, the answers) with when it started and how long it took; run it with an empty
  ``TUNESMITH_CACHE`` to include the conversion.
* ``gguf-dequantize``: every tensor of the embedded file decoded by gguf (numpy) and by the conversion's torch
  decoding, alternating twice; the values must be the same bits.
* ``heldout-batch``: the demo's held-out loss on the base model at ``eval.batch_size`` 64 and 128, alternating
  twice, with the length of each batch's flat row (an empty list: the batches ran padded).
* ``answer-phases``: the base model's 100 greedy answers (no kept keys), the seconds spent in prefill and in decode.
* ``eval-keys``: ``evaluate`` before training (loss pass and answers) keeping no keys (budget 0) and keeping
  them, alternating twice; the answers must be the same.
* ``bf16-products``: a 4,096 × 576 × 1,536 matrix product (and the two of its backward) in fp32 and in bf16; then
  the demo's backward products G W as a training step runs them (about 500 positions a micro-batch, 256 for the
  head), fp32 against ``train/products.py``'s ``backward_product`` with a bf16 weight, alternating, with the
  relative error.
* ``train-profile``: ``torch.profiler`` over five of the demo's training steps (steps 4–8), each operator's
  share of the time.
* ``products``: the demo's first four training micro-batches (forward and backward, adapters set to small random
  values so every gradient path carries something) with exact products through the frozen weights, with bf16
  backward products (``train.backward_products``) and with bf16 forward and backward products
  (``train.forward_products`` as well), in rotation, the order shifted each round; the backward-only losses must
  be the same bits as exact; printed: the median seconds of each, the largest relative loss difference of the
  bf16 forward, and the adapter gradients' largest relative difference from exact.
* ``eval-settled``: ``evaluate`` before training (loss pass and answers) with whole answers and with answers ended
  once their score is settled, alternating twice; the metrics must be the same, each settled prediction the start
  of the whole one.

    .venv/bin/python benchmarks/cpu_demo_probes.py kernel
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from cpu_decode_floor import SHAPES


def kernel() -> None:
    from tunesmith.peft.row_kernel import lora_rows

    rank, rows, slots = 16, 16, 8
    for din, dout in sorted(set(SHAPES)):
        a, bt = torch.randn(slots * rank, din), torch.randn(slots * rank, dout)
        x, y = torch.randn(rows, din), torch.zeros(rows, dout)
        which, ranks = torch.arange(rows) % slots + 1, torch.full((slots + 1,), rank, dtype=torch.long)
        for _ in range(100):
            lora_rows(x, y, which, ranks, a, bt, rank)
        start = time.perf_counter()
        for _ in range(2000):
            lora_rows(x, y, which, ranks, a, bt, rank)
        seconds = (time.perf_counter() - start) / 2000
        print(json.dumps({"probe": "kernel", "shape": [din, dout], "us": round(seconds * 1e6, 1),
                          "gflop_s": round(2 * rows * rank * (din + dout) / seconds / 1e9, 1)}), flush=True)
    start = time.perf_counter()
    for _ in range(2000):
        lora_rows(x, y, torch.zeros(rows, dtype=torch.long), ranks, a, bt, rank)
    print(json.dumps({"probe": "kernel", "empty_call_us": round((time.perf_counter() - start) / 2 * 1e3, 1)}))


def _demo():
    from tunesmith.config import load_config
    from tunesmith.models.build import build_model

    config = load_config(None, [])
    loaded = build_model(config.model)
    return config, loaded.model.eval(), loaded.tokenizer


def heldout() -> None:
    from tunesmith.data.pipeline import prepare
    from tunesmith.data.tokenize import TokenizeOptions
    from tunesmith.eval.evaluate import _loss_sum
    from tunesmith.train import rows

    config, model, tokenizer = _demo()
    examples = prepare(config.data.eval, tokenizer, TokenizeOptions.from_config(config.data)).examples
    for _ in range(2):
        for name in ("flat", "rows"):
            model.set_attn_implementation("sdpa")
            if name == "rows":
                rows.install_row_attention(model)
            start = time.perf_counter()
            with torch.no_grad():
                total, count = _loss_sum(model, examples, tokenizer.pad_token_id, 64, None)
            print(json.dumps({"probe": "heldout", "attention": name, "s": round(time.perf_counter() - start, 1),
                              "loss": round(total / count, 7)}), flush=True)
    model.set_attn_implementation("sdpa")


def eval_batch() -> None:
    from tunesmith.eval.task import answer_rows, evaluate_task

    _, model, tokenizer = _demo()
    rows = answer_rows("builtin:test", limit=100)
    answers = {}
    for order in ((64, 128), (128, 64)):
        for size in order:
            start = time.perf_counter()
            answers.setdefault(size, evaluate_task(model, tokenizer, rows, batch_size=size).predictions)
            print(json.dumps({"probe": "eval-batch", "batch_size": size, "s": round(time.perf_counter() - start, 1)}),
                  flush=True)
    print(json.dumps({"probe": "eval-batch", "same_answers": answers[64] == answers[128]}))


def gguf_parse() -> None:
    import gguf

    from tunesmith.models.defaults import _fast_reader, embedded_gguf_path

    path = embedded_gguf_path()
    for reader in (gguf.GGUFReader, _fast_reader(), gguf.GGUFReader, _fast_reader()):
        start = time.perf_counter()
        reader(path)
        print(json.dumps({"probe": "gguf-parse", "reader": reader.__name__,
                          "s": round(time.perf_counter() - start, 2)}), flush=True)


def gguf_dequantize() -> None:
    import gguf
    import numpy as np

    from tunesmith.models.defaults import _dequantize, _fast_reader, embedded_gguf_path

    tensors = _fast_reader()(embedded_gguf_path()).tensors
    results = {}
    for name in ("gguf", "torch", "gguf", "torch"):
        start = time.perf_counter()
        results[name] = [gguf.dequantize(t.data, t.tensor_type) if name == "gguf" else
                         _dequantize(t.data, t.tensor_type, fallback=gguf.dequantize) for t in tensors]
        print(json.dumps({"probe": "gguf-dequantize", "by": name, "s": round(time.perf_counter() - start, 2)}),
              flush=True)
    print(json.dumps({"probe": "gguf-dequantize", "same_bits": all(
        np.array_equal(a.view(np.uint32), b.view(np.uint32)) for a, b in zip(results["gguf"], results["torch"]))}))


def heldout_batch() -> None:
    import tunesmith.train.loss as loss
    from tunesmith.data.pipeline import prepare
    from tunesmith.data.tokenize import TokenizeOptions
    from tunesmith.eval.evaluate import heldout_loss

    config, model, tokenizer = _demo()
    examples = prepare(config.data.eval, tokenizer, TokenizeOptions.from_config(config.data)).examples
    flat_rows, layout = [], loss.flat_layout

    def recorded(batch, shared):
        flat = layout(batch, shared)
        flat_rows.append(None if flat is None else flat[0].shape[1])
        return flat

    loss.flat_layout = recorded
    for size in (64, 128, 64, 128):
        flat_rows.clear()
        start = time.perf_counter()
        metrics = heldout_loss(model, examples, pad_id=tokenizer.pad_token_id, batch_size=size)
        print(json.dumps({"probe": "heldout-batch", "batch_size": size, "s": round(time.perf_counter() - start, 1),
                          "flat_rows": flat_rows, "loss": round(metrics["eval_loss"], 8)}), flush=True)


def answer_phases() -> None:
    from tunesmith.engine import Engine
    from tunesmith.eval.task import answer_rows, evaluate_task

    _, model, tokenizer = _demo()
    seconds = {"prefill": 0.0, "decode": 0.0}

    def timed(name, method):
        def run(self, *args):
            start = time.perf_counter()
            method(self, *args)
            seconds[name] += time.perf_counter() - start
        return run

    Engine._prefill, Engine._decode = timed("prefill", Engine._prefill), timed("decode", Engine._decode)
    start = time.perf_counter()
    evaluate_task(model, tokenizer, answer_rows("builtin:test", limit=100), batch_size=128)
    print(json.dumps({"probe": "answer-phases", "s": round(time.perf_counter() - start, 1),
                      **{k: round(v, 1) for k, v in seconds.items()}}))


def eval_keys() -> None:
    import tunesmith.eval.evaluate as evaluate
    from tunesmith.data.pipeline import prepare
    from tunesmith.data.tokenize import TokenizeOptions
    from tunesmith.eval.prompt_keys import KEYS_BUDGET, KeptKeys
    from tunesmith.eval.task import answer_rows

    config, model, tokenizer = _demo()
    examples = prepare(config.data.eval, tokenizer, TokenizeOptions.from_config(config.data)).examples
    rows = answer_rows("builtin:test", limit=100)
    answers = {}
    for budget in (0, KEYS_BUDGET, 0, KEYS_BUDGET):
        evaluate.KeptKeys = lambda length, budget=budget: KeptKeys(length, budget=budget)
        start = time.perf_counter()
        metrics, task = evaluate.evaluate(model, tokenizer, examples=examples, rows=rows, batch_size=128)
        answers.setdefault(budget, task.predictions)
        print(json.dumps({"probe": "eval-keys", "budget": budget, "s": round(time.perf_counter() - start, 2),
                          "exact_match": metrics["exact_match"], "prefilled": task.prefilled}), flush=True)
    print(json.dumps({"probe": "eval-keys", "same_answers": answers[0] == answers[KEYS_BUDGET]}))


def eval_settled() -> None:
    from tunesmith.data.pipeline import prepare
    from tunesmith.data.tokenize import TokenizeOptions
    from tunesmith.eval.evaluate import evaluate
    from tunesmith.eval.task import answer_rows

    config, model, tokenizer = _demo()
    examples = prepare(config.data.eval, tokenizer, TokenizeOptions.from_config(config.data)).examples
    rows = answer_rows("builtin:test", limit=100)
    results = {}
    for settled in (False, True, False, True):
        start = time.perf_counter()
        metrics, task = evaluate(model, tokenizer, examples=examples, rows=rows, batch_size=128, settled=settled)
        results[settled] = (metrics, task.predictions)
        print(json.dumps({"probe": "eval-settled", "settled": settled, "s": round(time.perf_counter() - start, 2),
                          "answers_settled": task.settled, "exact_match": metrics["exact_match"],
                          "answer_chars": sum(map(len, task.predictions))}), flush=True)
    (whole, full), (cut, short) = results[False], results[True]
    print(json.dumps({"probe": "eval-settled", "same_metrics": whole == cut,
                      "predictions_are_starts": all(f.startswith(s) for f, s in zip(full, short))}))


def demo_timeline() -> None:
    import functools

    import tunesmith.eval.evaluate as evaluate
    import tunesmith.models.defaults as defaults
    from tunesmith.demo import run_demo

    start = time.perf_counter()
    stamps = []

    def stamped(module, name):
        method = getattr(module, name)

        @functools.wraps(method)
        def run(*args, **kwargs):
            began = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                stamps.append({"piece": name, "at": round(began - start, 1),
                               "s": round(time.perf_counter() - began, 2)})
        setattr(module, name, run)

    stamped(defaults, "_convert_gguf")
    stamped(evaluate, "heldout_loss")
    stamped(evaluate, "evaluate_task")
    summary = run_demo()
    for stamp in stamps:
        print(json.dumps({"probe": "demo-timeline", **stamp}))
    print(json.dumps({"probe": "demo-timeline", "demo_s": round(time.perf_counter() - start, 1),
                      "train_s": summary["train_seconds"]}))


def bf16_products() -> None:
    m, k, n = 4096, 576, 1536
    for dtype in (torch.float32, torch.bfloat16):
        pairs = {"forward": (torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)),
                 "input grad": (torch.randn(m, n, dtype=dtype), torch.randn(n, k, dtype=dtype)),
                 "weight grad": (torch.randn(k, m, dtype=dtype), torch.randn(m, n, dtype=dtype))}
        for name, (a, b) in pairs.items():
            for _ in range(3):
                a @ b
            start = time.perf_counter()
            for _ in range(20):
                a @ b
            seconds = (time.perf_counter() - start) / 20
            print(json.dumps({"probe": "bf16-products", "dtype": str(dtype), "product": name,
                              "gflop_s": round(2 * m * k * n / seconds / 1e9, 1)}), flush=True)
    from tunesmith.train.products import backward_product

    def rate(g, w, low) -> float:
        for _ in range(3):
            backward_product(g, w, low)
        start = time.perf_counter()
        for _ in range(20):
            backward_product(g, w, low)
        return 2 * g.shape[0] * w.shape[0] * w.shape[1] / ((time.perf_counter() - start) / 20) / 1e9

    for rows, n, k in ((512, 1536, 576), (512, 576, 1536), (512, 576, 576), (256, 49152, 576)):
        g, w = torch.randn(rows, n), torch.randn(n, k)
        low = w.bfloat16()
        exact = backward_product(g, w, None)
        error = float((backward_product(g, w, low) - exact).norm() / exact.norm())
        rates = {"fp32": [], "bf16": []}
        for round_ in range(2):
            for mode in (("fp32", "bf16") if round_ == 0 else ("bf16", "fp32")):
                rates[mode].append(round(rate(g, w, None if mode == "fp32" else low), 1))
        print(json.dumps({"probe": "bf16-products", "backward_product": [rows, n, k], "gflop_s": rates,
                          "relative_error": round(error, 5)}), flush=True)


def train_profile() -> None:
    import tempfile

    from torch.profiler import ProfilerActivity, profile

    from tunesmith.config import load_config
    from tunesmith.recipes.sft import run

    profiler = profile(activities=[ProfilerActivity.CPU])

    def on_micro_batch(step: int, micro: int) -> None:
        if (step, micro) == (3, 3):  # step 4 (its first micro-batch is micro 3 of the epoch's plan)
            profiler.__enter__()
        if (step, micro) == (8, 8):  # step 9 begins: steps 4-8 recorded
            profiler.__exit__(None, None, None)

    config = load_config(None, [f"output_dir={tempfile.mkdtemp()}", "data.eval=null", "eval.before=false",
                                "eval.task_rows=0", "train.max_steps=9", "train.progress=false"])
    run(config.with_run_name(), on_micro_batch=on_micro_batch)
    events = sorted(profiler.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    for event in events[:8]:
        print(json.dumps({"probe": "train-profile", "op": event.key, "calls": event.count,
                          "self_s": round(event.self_cpu_time_total / 1e6, 3),
                          "share": round(event.self_cpu_time_total / total, 3)}), flush=True)


def products(rounds: int = 6) -> None:
    import statistics
    import tempfile

    from tunesmith.config import load_config
    from tunesmith.data.batching import plan_batches
    from tunesmith.recipes.setup import prepare_run
    from tunesmith.recipes.sft import supervised_objective
    from tunesmith.train.layout import install_layout
    from tunesmith.train.loss import supervised_loss_sum
    from tunesmith.train.products import install_products, remove_products

    config = load_config(None, [f"output_dir={tempfile.mkdtemp()}", "data.eval=null", "eval.before=false"])
    setup = prepare_run(config.with_run_name(), resume=False)
    objective, model = supervised_objective(setup), setup.model
    install_layout(model, setup.layout)
    model.train()
    plan = plan_batches(objective.lengths, strategy="pad", batch_size=8, token_budget=objective.token_budget,
                        seed=0, epoch=0)
    batches = [objective.collate(batch).batch for batch in plan[:4]]
    torch.manual_seed(0)
    for param in setup.params:
        torch.nn.init.normal_(param, std=0.01)
    modes = {"exact": ("exact", "exact"), "bf16_backward": ("exact", "bf16"), "bf16_both": ("bf16", "bf16")}

    def once(mode: str):
        forward, backward = modes[mode]
        remove_products(model)
        install_products(model, {"forward": {"name": forward}, "backward": {"name": backward}})
        model.zero_grad()
        start = time.perf_counter()
        losses = []
        for batch in batches:
            loss = supervised_loss_sum(model, batch, layout=setup.layout.name)
            loss.backward()
            losses.append(loss.item())
        return time.perf_counter() - start, losses, [p.grad.clone() for p in setup.params]

    seconds = {mode: [] for mode in modes}
    first = {mode: once(mode) for mode in modes}
    assert first["exact"][1] == first["bf16_backward"][1], "bf16 backward products leave the forward's bits"
    loss_difference = max(abs(b / a - 1) for a, b in zip(first["exact"][1], first["bf16_both"][1]))
    errors = {mode: round(max(float((b - a).norm() / a.norm()) for a, b in zip(first["exact"][2], first[mode][2])), 5)
              for mode in ("bf16_backward", "bf16_both")}
    order = list(modes)
    for round_ in range(rounds):
        for mode in order[round_ % 3:] + order[:round_ % 3]:
            seconds[mode].append(once(mode)[0])
    remove_products(model)
    print(json.dumps({"probe": "products", "micro_batches": len(batches),
                      **{f"{mode}_median_s": round(statistics.median(values), 3) for mode, values in seconds.items()},
                      "seconds": {mode: [round(v, 2) for v in values] for mode, values in seconds.items()},
                      "bf16_forward_max_relative_loss_difference": round(loss_difference, 6),
                      "max_adapter_grad_relative_difference": errors}), flush=True)


PROBES = {"kernel": kernel, "heldout": heldout, "eval-batch": eval_batch, "gguf-parse": gguf_parse,
          "heldout-batch": heldout_batch, "answer-phases": answer_phases, "eval-keys": eval_keys,
          "bf16-products": bf16_products, "eval-settled": eval_settled, "gguf-dequantize": gguf_dequantize,
          "demo-timeline": demo_timeline, "products": products,
          "train-profile": train_profile}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("probe", choices=list(PROBES))
    PROBES[parser.parse_args().probe]()


if __name__ == "__main__":
    main()
