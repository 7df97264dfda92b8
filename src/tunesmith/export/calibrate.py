"""Which inputs of each linear layer matter, for the 4- and 5-bit GGUF types (``export/quants.py``).

A linear layer's output error from a weight error ΔW is ΔW·a for its input a, so the squared error it adds is
Σᵢⱼ ΔWᵣᵢ ΔWᵣⱼ E[aᵢaⱼ] per output row; keeping the diagonal, Σᵢ ΔWᵣᵢ² E[aᵢ²]. Each weight's rounding error
therefore counts in proportion to its input's mean squared activation — the "importance matrix" idea llama.cpp's
``llama-imatrix`` tool applies. The means are measured here by running the merged model over calibration rows:
the run's own training rows when the source is a run dir (what the model will see), else the built-in task's.
On the demo model this lowers the q4_1 export's mean KL from 0.094 to 0.055 (BENCHMARKS.md).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from tunesmith.errors import TunesmithError

ROWS = 64


def calibration_rows(source: str, tokenizer, *, trust_remote_code: bool = False) -> tuple[list[list[int]], str]:
    """Token ids of up to ``ROWS`` rows and where they came from."""
    from tunesmith.config_run import is_run_dir, load_run_config
    from tunesmith.data.builtin import BUILTIN_NAME
    from tunesmith.data.pipeline import prepare
    from tunesmith.data.tokenize import TokenizeOptions

    data, origin = BUILTIN_NAME, "the built-in task's training rows"
    options = None
    if is_run_dir(Path(source)):
        run = load_run_config(source, trust_remote_code=trust_remote_code)
        data, origin, options = run.data.train, f"the run's training data ({run.data.train})", run.data
    try:  # a seeded sample of the rows, drawn before tokenizing (a large dataset is not tokenized whole)
        prepared = prepare(data, tokenizer, TokenizeOptions.from_config(options) if options else TokenizeOptions(),
                           invalid_rows="drop", sample=ROWS)
    except TunesmithError:  # the run's data moved or is unreadable here: the built-in rows still calibrate
        prepared = prepare(BUILTIN_NAME, tokenizer, TokenizeOptions(), invalid_rows="drop", sample=ROWS)
        origin = "the built-in task's training rows (the run's data could not be read)"
    return [example["input_ids"] for example in prepared.examples], origin


def input_importance(model, rows: list[list[int]]) -> dict[str, np.ndarray]:
    """Each decoder linear layer's mean squared input per column, by its llama.cpp tensor name."""
    from tunesmith.export.gguf_file import NAMES

    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def record(name):
        def hook(_module, inputs, _output):
            a = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).float()
            sums[name] = sums.get(name, 0) + (a * a).sum(0)
            counts[name] = counts.get(name, 0) + a.shape[0]
        return hook

    hooks = []
    for name, module in model.named_modules():
        parts = name.split(".")
        if len(parts) == 5 and parts[:2] == ["model", "layers"] and ".".join(parts[3:]) in NAMES:
            hooks.append(module.register_forward_hook(record(f"blk.{parts[2]}.{NAMES['.'.join(parts[3:])]}.weight")))
    try:
        with torch.no_grad():
            for ids in rows:
                model(input_ids=torch.tensor([ids]))
    finally:
        for hook in hooks:
            hook.remove()
    return {name: (sums[name] / counts[name]).numpy() for name in sums}
