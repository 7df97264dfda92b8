"""What is live on the GPU at a run's peak, grouped by the Python line that allocated it (PyTorch's allocator
history), for the memory tables in BENCHMARKS.md.

The model is a random-init Llama of a ``tunesmith bench`` shape with the given tokenizer, the data the bench's
synthetic chats; the run is the bench's tutorial recipe (``ts_recipe``) unless ``--fast``, plus any overrides.
Weights are loaded while the history records, so they appear in the table too. Run on a GPU machine:

    python benchmarks/gpu_peak_allocations.py --tok TOKENIZER_DIR [--steps 4] [--fast] [key=value ...]

e.g. ``train.graphs=false`` for the eager path. Prints the traced peak, ``max_memory_allocated`` and
``max_memory_reserved``, the 25 largest groups, and the live blocks by size.
"""

from __future__ import annotations

import argparse
import collections
import json
import tempfile
from pathlib import Path

import torch

from tunesmith.bench import FAST_STEP, QLORA, RECIPE_LORA, RECIPE_STEP, build_model_dir, synthetic_chats
from tunesmith.config import load_config
from tunesmith.recipes import sft


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tok", required=True, help="tokenizer dir (the embedded model's)")
    parser.add_argument("--shape", default="tinyllama")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--fast", action="store_true", help="one micro-batch of 8, no checkpointing (ts_fast)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="peak-"))
    build_model_dir(args.shape, args.tok, work / "model")
    data = work / "chats.jsonl"
    data.write_text("".join(json.dumps({"messages": chat}) + "\n" for chat in synthetic_chats(args.steps * 8)))
    overrides = [f"model.source={work / 'model'}", f"output_dir={work / 'runs'}", "name=probe", f"data.train={data}",
                 "data.eval=null", "eval.before=false", "train.checkpoint_every=null", "train.progress=false",
                 f"train.max_steps={args.steps}", *QLORA, *RECIPE_LORA, *(FAST_STEP if args.fast else RECIPE_STEP),
                 *args.overrides]
    torch.cuda.memory._record_memory_history(max_entries=400_000, stacks="python", context="alloc")
    sft.run(load_config(None, overrides))
    trace = torch.cuda.memory._snapshot()["device_traces"][0]
    torch.cuda.memory._record_memory_history(enabled=None)
    live, total, peak, at_peak = {}, 0, 0, {}
    for event in trace:
        if event["action"] == "alloc":
            live[event["addr"]] = event
            total += event["size"]
            if total > peak:
                peak, at_peak = total, dict(live)
        elif event["action"] == "free_completed" and event["addr"] in live:
            total -= live.pop(event["addr"])["size"]
    print(f"traced peak {peak / 2**30:.3f} GiB, max_memory_allocated {torch.cuda.max_memory_allocated() / 2**30:.3f}"
          f" GiB, max_memory_reserved {torch.cuda.max_memory_reserved() / 2**30:.3f} GiB")
    groups, sizes = collections.Counter(), collections.Counter()
    for event in at_peak.values():
        frames = [f for f in event.get("frames", []) if any(part in f["filename"] for part in
                                                              ("tunesmith", "transformers", "bitsandbytes", "torch/optim"))]
        where = " < ".join(f"{Path(f['filename']).name}:{f['line']}:{f['name']}" for f in frames[:3]) or "?"
        groups[where] += event["size"]
        sizes[round(event["size"] / 2**20, 1)] += 1
    for where, size in groups.most_common(25):
        print(f"{size / 2**20:9.1f} MiB  {where}")
    print("live blocks by size (MiB, count):", sorted(sizes.items(), key=lambda item: -item[0] * item[1])[:20])


if __name__ == "__main__":
    main()
