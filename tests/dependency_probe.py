"""Run every verb in one fresh process and write the top-level modules it imported to WORK/modules.json.

Used by ``test_dependencies.py`` (run as a script, never imported by pytest): the parent test maps the
modules to their distributions and checks each one against what pyproject declares. Arguments: a tiny
model dir and a work dir holding rows.parquet and saved/ (``ROWS``, written by the test).
``TUNESMITH_CACHE`` must point at an empty dir, so the embedded GGUF file is really read and converted here
(that is where transformers needs ``accelerate``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

# The test writes them as rows.parquet and a saved dataset dir too (through ``datasets``, in its own process).
ROWS = [{"messages": [{"role": "user", "content": f"Say {i}"}, {"role": "assistant", "content": str(i)}]}
        for i in range(8)]


def verbs(model: str, work: Path) -> list[list[str]]:
    """One command line for each verb, on the tiny model except where the embedded model is the point."""
    messages = work / "messages.json"
    messages.write_text(json.dumps([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]))
    jsonl = work / "rows.jsonl"
    jsonl.write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    csv = work / "rows.csv"
    csv.write_text("prompt,completion\n" + "".join(f"Say {i},{i}\n" for i in range(8)))
    run = work / "runs" / "probe"
    quick = ["train.max_steps=2", "eval.task_rows=2", "eval.loss_rows=2", "eval.max_new_tokens=2",
             "train.progress=false"]
    return [
        ["template", "--model", "default", "--messages", str(messages), "--no-color"],  # reads the GGUF file
        ["data", "inspect", str(jsonl), "--model", model],
        ["data", "inspect", str(csv), "--model", model, "--json"],
        ["data", "inspect", str(work / "rows.parquet"), "--model", model],
        ["data", "inspect", str(work / "saved"), "--model", model],
        ["train", f"model.source={model}", f"output_dir={work / 'runs'}", "name=probe", f"data.train={jsonl}",
         "data.eval=builtin:test", *quick],
        ["eval", str(run), "--generate", "--task-rows", "2", "--max-new-tokens", "2", "--json"],
        ["chat", "--model", model, "--adapter", str(run / "adapter"), "--prompt", "Hi", "--max-tokens", "2"],
        ["merge", str(run), "--out", str(work / "merged"), "--check-rows", "2"],
        ["compare", "--model", model, "--model", str(work / "merged"), "--prompt", "Hi", "--max-tokens", "2"],
        ["quantize", "report", "--model", model, "--rows", "2", "--json"],
        ["export", model, "--gguf", str(work / "probe.gguf")],
        ["demo", f"model.source={model}", f"output_dir={work / 'runs'}", "name=demo", "eval.before=false", *quick],
    ]


def main() -> int:
    model, work = sys.argv[1], Path(sys.argv[2])
    at_start = set(sys.modules)  # the interpreter's own start-up (site hooks of the venv) is not a verb's
    from tunesmith.cli import main as tunesmith

    for argv in verbs(model, work):
        print("verb:", " ".join(argv[:2]), file=sys.stderr)
        if tunesmith(argv) != 0:
            print(f"the verb failed: tunesmith {' '.join(argv)}", file=sys.stderr)
            return 1
    imported = {name.partition(".")[0] for name in set(sys.modules) - at_start}
    (work / "modules.json").write_text(json.dumps(sorted(imported)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
