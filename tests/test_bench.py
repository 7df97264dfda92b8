"""`tunesmith bench` end to end on the CPU smoke shape: one JSON line per run with the fields the GPU
comparison reads, real numbers from real runs."""

import json

from tunesmith.bench import mfu, parameter_count, SHAPES
from tunesmith.cli import main


def test_bench_runs_tunesmith_and_reports_each_run(tmp_path, capsys):
    code = main(["bench", "--shape", "tiny", "--method", "lora", "--runs", "ts_fast,ts_plain", "--steps", "3",
                 "--extra", "ts_plain=train.layout=plain", "--work", str(tmp_path)])
    assert code == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    env, fast, plain = lines
    assert env["env"]["shape"] == "tiny" and env["env"]["device"] == "cpu"
    for row in (fast, plain):
        assert row["rc"] == 0 and row["stack"] == "tunesmith"
        assert 0 < row["trained_tokens_per_s"] < row["tokens_per_s"]
        assert len(row["losses"]) == 3 and round(row["final_loss"], 4) == row["losses"][-1]
        assert row["steady_tokens_per_s"] > 0 and row["kernels"] == {"name": "torch"}
        assert row["graphs"] == {"used": False, "reason": "train.graphs=auto: graphs need a CUDA GPU; this run is on cpu"}
        assert row["blas_workspace"] == {"mib": None, "reason": "no CUDA device"}
        assert row["mfu_formula"].startswith("tokens/s × (4N + 12·L·d·ctx)")
        assert row["N"] == parameter_count(SHAPES["tiny"], 49152)
    assert fast["layout"]["name"] == "rows" and plain["layout"]["name"] == "plain"
    assert fast["losses"] == plain["losses"] or all(abs(a - b) < 1e-3 for a, b in zip(fast["losses"], plain["losses"]))
    assert fast["tokens"] == plain["tokens"]


def test_mfu_formula():
    shape = SHAPES["llama8b"]
    n = parameter_count(shape, 128256)
    assert abs(n - 8.03e9) / 8.03e9 < 0.01  # Llama-3.1-8B's published size with its own vocabulary
    row = mfu(10_000, shape, 128256, 1000.0, full=False, peak=989e12)
    assert row["mfu"] == round(10_000 * (4 * n + 12 * 32 * 4096 * 1000) / 989e12, 4)


def test_bench_without_a_gpu_is_one_error_line(capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["bench", "--shape", "tinyllama"]) == 2
    assert "no CUDA GPU" in capsys.readouterr().err


def test_the_smollm2_shape_is_the_embedded_models(embedded_dir):
    """The benchmarks' SmolLM2 shape (``benchmarks/gpu_memory.py`` builds it) against the embedded model's own config."""
    config = json.loads((embedded_dir / "config.json").read_text())
    config["rope_theta"] = config.get("rope_theta") or config["rope_parameters"]["rope_theta"]  # transformers 5 nests it
    assert {key: config[key] for key in SHAPES["smollm2"]} == SHAPES["smollm2"]
