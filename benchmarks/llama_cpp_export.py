"""The exported demo model in llama.cpp itself: greedy answers on the demo's held-out rows against tunesmith's own.

Not CI: it needs llama.cpp's Python binding built from source (``pip install llama-cpp-python``, CPU, several
minutes on two cores). For each type it exports RUN_DIR (a trained demo run) with ``tunesmith export``, loads
the file with ``llama_cpp.Llama`` and answers every held-out row greedily from the same prompt tokens tunesmith
renders (the run's chat template, so both see identical input), stopping at the file's end-of-turn token. It
prints, per type, the share of rows whose answer is the same as tunesmith's own generation and both exact-match
scores. Targets (issue 28): f16 the same answers on ≥ 98% of rows; q8_0 and q4_1 exact match within 2 points.

    pip install llama-cpp-python
    .venv/bin/python benchmarks/llama_cpp_export.py runs/lora-20261206-092031 --types f16,q8_0,q4_1
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path


def main() -> None:
    from llama_cpp import Llama

    from tunesmith.eval.task import answer_rows, evaluate_task, score_answers
    from tunesmith.export import export_gguf
    from tunesmith.models.build import build_model
    from tunesmith.config_run import load_run_config
    from tunesmith.templates import render_prompt

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("--types", default="f16,q8_0,q4_1")
    parser.add_argument("--rows", type=int, default=100)
    parser.add_argument("--max-tokens", type=int, default=48)
    args = parser.parse_args()
    config = load_run_config(args.run_dir)
    built = build_model(config.model.model_copy(update={"dtype": "fp32", "device": "cpu"}),
                        adapter=str(Path(args.run_dir) / "adapter"))
    tokenizer = built.tokenizer
    rows = answer_rows("builtin:test", limit=args.rows)
    start = time.perf_counter()
    ours = evaluate_task(built.model, tokenizer, rows, max_new_tokens=args.max_tokens)
    print(json.dumps({"run": "tunesmith", "exact_match": ours.metrics["exact_match"],
                      "seconds": round(time.perf_counter() - start, 1)}), flush=True)
    expected, subsets = [row.expected for row in rows], [row.subset for row in rows]
    with tempfile.TemporaryDirectory() as tmp:
        for kind in args.types.split(","):
            path = Path(tmp) / f"demo-{kind}.gguf"
            summary = export_gguf(args.run_dir, path, kind=kind)
            llm = Llama(model_path=str(path), n_ctx=512, n_threads=2, verbose=False, seed=0)
            start = time.perf_counter()
            answers = []
            for row in rows:
                ids = render_prompt(tokenizer, row.prompt)
                out = llm.create_completion(ids, max_tokens=args.max_tokens, temperature=0.0, top_k=1)
                answers.append(out["choices"][0]["text"].strip())
            metrics = score_answers(answers, expected, subsets)
            same = sum(a == b for a, b in zip(answers, ours.predictions)) / len(rows)
            print(json.dumps({"run": f"llama.cpp {kind}", "same_answers": same, "exact_match": metrics["exact_match"],
                              "exact_match_tunesmith": ours.metrics["exact_match"],
                              "export_mean_kl": summary["checks"]["logits"]["mean_kl"],
                              "seconds": round(time.perf_counter() - start, 1),
                              "first_differences": [(a, b) for a, b in zip(answers, ours.predictions) if a != b][:3]}),
                  flush=True)


if __name__ == "__main__":
    main()
