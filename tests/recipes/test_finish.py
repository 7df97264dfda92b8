"""The end of a run: the environment recorded in summary.json, and the report a real tiny run writes."""

import json
import os
import platform
import re

import torch
import transformers

import tunesmith
from tunesmith.recipes import sft
from tunesmith.recipes.finish import run_environment


def test_run_environment_names_versions_and_device():
    environment = run_environment(torch.device("cpu"), torch.bfloat16)
    expected = {"python": platform.python_version(), "tunesmith": tunesmith.__version__,
                "torch": torch.__version__, "transformers": transformers.__version__}
    if torch.version.cuda:
        expected["cuda"] = torch.version.cuda
    expected.update(device=f"cpu ({platform.machine()}, {os.cpu_count()} cores)", dtype="bfloat16",
                    platform=platform.platform())
    assert environment == expected
    assert list(environment) == list(expected)  # the order the report lists them in


def test_a_run_records_its_environment_and_reports_the_loss_on_a_log_axis(make_config):
    # 16 rows, 4 a step: 4 steps an epoch, so 12 steps are 3 epochs, enough rows for the smoothed line
    config = make_config("train.max_steps=12", "train.checkpoint_every=12")
    summary = sft.run(config)
    run_dir = config.run_dir
    saved = json.loads((run_dir / "summary.json").read_text())
    assert saved["environment"] == run_environment(torch.device("cpu"), torch.float32)
    last = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()][-1]
    assert (saved["final_loss"], saved["final_loss_step"]) == (last["loss"], 12)  # issue 25: runs compared by it
    page = (run_dir / "report.html").read_text()
    titles = re.findall(r'<svg class="chart"[^>]*><title>([^<]+)</title>', page)
    assert titles == ["Loss", "Learning rate", "Gradient norm", "Throughput (tokens/s)"]
    loss = re.search(r'<svg class="chart".*?</svg>', page).group(0)
    assert '<g class="y-axis" data-scale="log">' in loss
    assert re.findall(r'data-name="([^"]+)" data-style="(\w+)"', loss) == [
        ("train (raw)", "faint"), ("train (smoothed)", "solid"), ("held-out", "dots")]
    held_out = re.findall(r"<title>held-out, step (\d+): ([^<]+)</title>", loss)
    assert [step for step, _ in held_out] == ["0", "12"]
    assert [float(value) for _, value in held_out] == [
        float(f"{summary[phase]['eval_loss']:.6g}") for phase in ("before", "after")]
    assert re.findall(r'<g class="marker">.*?>([^<]+)</text></g>', loss) == ["epoch 2", "epoch 3"]
    assert "<details><summary>Environment</summary>" in page
    assert f"<th>PyTorch</th><td>{torch.__version__}</td>" in page
