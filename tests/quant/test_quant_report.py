"""``tunesmith quantize report`` on the 64-wide tiny model: exact storage, error ordering, perplexity per format."""

import json

import pytest

from tunesmith.cli import main
from tunesmith.quant.report import footprint, stored_bits

# the 64-wide tiny Llama: per layer q, o 64x64; k, v 32x64 (2 kv heads of 16); gate, up 128x64; down 64x128
LINEAR_WEIGHTS = 2 * (2 * 4096 + 2 * 2048 + 3 * 8192)  # 73,728
ALL_PARAMETERS = LINEAR_WEIGHTS + 49152 * 64 + 5 * 64  # + tied embedding/head + 5 RMSNorms


def _rows(n):
    return [{"messages": [{"role": "user", "content": f"Count to {i}"},
                          {"role": "assistant", "content": " ".join(str(k) for k in range(1, i + 2))}]}
            for i in range(n)]


def test_stored_bits_per_matrix():
    # 64x64: 64 blocks of 64; DQ: 64 one-byte scale codes, one fp32 absmax for them, one fp32 offset
    assert stored_bits("nf4", 64, 64) == 4 * 4096 + 32 * 64
    assert stored_bits("nf4+dq", 64, 64) == 4 * 4096 + 8 * 64 + 32 + 32
    assert stored_bits("int8", 128, 64) == 8 * 8192 + 32 * 128
    assert stored_bits("nf4+dq", 64 * 1024, 1024) == 4 * 2**26 + 8 * 2**20 + 32 * 4096 + 32


def test_footprint_is_computed_from_the_layers(tiny_model_dir_64):
    from transformers import AutoModelForCausalLM

    report = footprint(AutoModelForCausalLM.from_pretrained(tiny_model_dir_64))
    assert report["parameters"] == ALL_PARAMETERS and report["quantized_parameters"] == LINEAR_WEIGHTS
    rows = {row["format"]: row for row in report["formats"]}
    assert rows["nf4"]["linear_bits_per_weight"] == 4.5
    # q, o: 16,960 bits; k, v: 8,512; gate, up, down: 33,856 — per layer, two layers
    dq_bits = 2 * (2 * 16960 + 2 * 8512 + 3 * 33856)
    assert rows["nf4+dq"]["linear_bits_per_weight"] == dq_bits / LINEAR_WEIGHTS
    assert rows["nf4+dq"]["bytes"] == (dq_bits + 16 * (ALL_PARAMETERS - LINEAR_WEIGHTS)) // 8
    assert rows["fp32"]["bytes"] == 4 * ALL_PARAMETERS and rows["bf16"]["bytes"] == 2 * ALL_PARAMETERS
    assert rows["nf4+dq"]["nominal_bits_per_weight"] == 4 + 8 / 64 + 32 / (64 * 256)
    assert report["double_quant_saving_bits"] == 0.373046875


def test_quantize_report_cli(tiny_model_dir_64, tmp_path, capsys):
    data = tmp_path / "heldout.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _rows(4)))
    args = ["quantize", "report", "--model", str(tiny_model_dir_64), "--data", str(data), "--rows", "4"]
    assert main(args + ["--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["rows"] == 4 and set(report["perplexity"]) == {"fp32", "bf16", "int8", "fp4", "nf4", "nf4+dq"}
    # fp32 is the model as it is: the same loss as tunesmith eval
    assert main(["eval", str(tiny_model_dir_64), "--data", str(data), "--json"]) == 0
    plain = json.loads(capsys.readouterr().out)
    assert report["perplexity"]["fp32"]["eval_loss"] == pytest.approx(plain["eval_loss"], abs=1e-6)
    assert report["perplexity"]["nf4"]["eval_loss"] != report["perplexity"]["fp32"]["eval_loss"]
    errors = report["reconstruction_error"]
    assert set(errors) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    for kind in errors.values():  # normally distributed weights: NF4 beats FP4; int8 beats both; DQ costs little
        assert kind["int8"] < kind["nf4"] < kind["fp4"]
        assert kind["nf4+dq"] == pytest.approx(kind["nf4"], rel=0.02)
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "double quantization saves 0.373 bits per weight" in text and "nf4+dq" in text


def test_quantize_report_bad_model(tmp_path, capsys):
    assert main(["quantize", "report", "--model", str(tmp_path / "nope")]) == 2
    assert "nope" in capsys.readouterr().err
