"""Two probes of mixed-adapter generation on the CPU (embedded model, rank-16 adapters over every linear layer):

* ``prefill``: an engine prefills 16 joiners (storing each adapter's shared start), then 12 more together, three
  times: the 12-joiner prefill's milliseconds for the base, for 8 adapters through the row kernel, and for 8
  adapters segment by segment (``KERNEL_ROWS`` 0).
* ``alternate``: the 64 prompts of ``cpu_generate.py`` (batch 16) for the base and for 8 adapters, alternating
  twice in one process, with the seconds spent in prefill and in decode.

    .venv/bin/python benchmarks/cpu_adapter_probes.py prefill
    .venv/bin/python benchmarks/cpu_adapter_probes.py alternate
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

import tunesmith.peft.multi as multi
from cpu_generate import make_adapters
from tunesmith.data.builtin import builtin_task
from tunesmith.engine import Engine, Request, generate
from tunesmith.generate import SamplingConfig
from tunesmith.models.load import load
from tunesmith.peft.multi import AdapterSlots
from tunesmith.templates import render_prompt, stop_token_ids


def prefill(prompts, tokenizer, slots, names) -> None:
    kernel_rows = multi.KERNEL_ROWS
    for label, rows, count in (("base", kernel_rows, 0), ("8 adapters, kernel", kernel_rows, 8),
                               ("8 adapters, segments", 0, 8)):
        multi.KERNEL_ROWS = rows
        engine = Engine(slots.model, pad_id=tokenizer.pad_token_id, adapters=slots, max_batch=64)
        for i, prompt in enumerate(prompts[:16]):
            engine.submit(Request(prompt, sampling=SamplingConfig(max_new_tokens=2),
                                  adapter=names[i % 8] if count else None))
        engine.step()
        times = []
        for _ in range(3):
            for i, prompt in enumerate(prompts[16:28]):
                engine.submit(Request(prompt, sampling=SamplingConfig(max_new_tokens=2),
                                      adapter=names[i % 8] if count else None))
            engine.running, engine.lengths = [], []
            joining, engine.waiting = engine.waiting, []
            start = time.perf_counter()
            engine._prefill(joining)
            times.append(round((time.perf_counter() - start) * 1e3))
        print(json.dumps({"probe": "12-joiner prefill", "setting": label, "ms": times}), flush=True)
    multi.KERNEL_ROWS = kernel_rows


def alternate(prompts, tokenizer, paths) -> None:
    spent: dict[str, float] = {}
    for name in ("_prefill", "_decode"):
        original = getattr(Engine, name)

        def timed(self, *args, _original=original, _name=name):
            start = time.perf_counter()
            result = _original(self, *args)
            spent[_name] = spent.get(_name, 0.0) + time.perf_counter() - start
            return result

        setattr(Engine, name, timed)
    for count in (0, 8, 0, 8):
        model = load("default", dtype="fp32", device="cpu").model.eval()
        names = [f"a{i}" for i in range(count)]
        slots = AdapterSlots(model, {n: paths[n] for n in names}) if count else None
        spent.clear()
        start = time.perf_counter()
        outputs = generate(model, prompts, sampling=SamplingConfig(max_new_tokens=48), stop_ids=stop_token_ids(tokenizer),
                           pad_id=tokenizer.pad_token_id, adapters=slots, max_batch=16,
                           adapter_names=[names[i % count] for i in range(len(prompts))] if count else None)
        print(json.dumps({"probe": "alternate", "adapters": count, "seconds": round(time.perf_counter() - start, 2),
                          "tokens": sum(map(len, outputs)), "prefill_s": round(spent["_prefill"], 2),
                          "decode_s": round(spent["_decode"], 2)}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("probe", choices=["prefill", "alternate"])
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    loaded = load("default", dtype="fp32", device="cpu")
    tokenizer = loaded.tokenizer
    prompts = [render_prompt(tokenizer, row["messages"][:-1]) for row in builtin_task("test", 64)]
    with tempfile.TemporaryDirectory() as tmp:
        paths = make_adapters(8, Path(tmp))
        names = [f"a{i}" for i in range(8)]
        if args.probe == "prefill":
            with torch.inference_mode():
                prefill(prompts, tokenizer, AdapterSlots(loaded.model.eval(), {n: paths[n] for n in names}), names)
        else:
            alternate(prompts, tokenizer, paths)


if __name__ == "__main__":
    main()
