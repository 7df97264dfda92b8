"""The 4-bit GGUF blocks three ways on one run, by the export's own logits check (mean KL, top-1): the reference
rounding (gguf's quantizer), the least-squares fit with every weight counted alike, and the fit weighted by each
input's mean squared activation (what ``tunesmith export`` writes). Only the block quantizer changes between the
three exports; everything else is the same file. Not CI (six exports of the model). Run:

    .venv/bin/python benchmarks/gguf_block_fit.py runs/lora-20261206-123722 --types q4_1,q4_0
"""

from __future__ import annotations

import argparse
import json
import tempfile

import gguf

from tunesmith.export import export_gguf, quants

FITTED = quants.quantize
WAYS = {
    "reference": lambda array, kind, importance=None: gguf.quants.quantize(
        array.astype("float32"), getattr(gguf.GGMLQuantizationType, kind.upper())),
    "fit, unweighted": lambda array, kind, importance=None: FITTED(array, kind),
    "fit, weighted (export)": FITTED,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("--types", default="q4_1,q4_0")
    args = parser.parse_args()
    for kind in args.types.split(","):
        for way, quantize in WAYS.items():
            quants.quantize = quantize  # the block quantizer gguf_file.py calls for the 4/5-bit tensors
            with tempfile.TemporaryDirectory() as tmp:
                logits = export_gguf(args.run_dir, f"{tmp}/m.gguf", kind=kind)["checks"]["logits"]
            print(json.dumps({"type": kind, "blocks": way, "mean_kl": round(logits["mean_kl"], 4),
                              "top1_agreement": round(logits["top1_agreement"], 3)}), flush=True)
    quants.quantize = FITTED


if __name__ == "__main__":
    main()
