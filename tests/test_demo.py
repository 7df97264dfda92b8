"""The demo on a tiny model: held-out examples are labelled with their subset, and the unseen-entity exact
match is printed with the overall one, equal to what summary.json holds."""

from __future__ import annotations

import json
import re

from tunesmith.cli import main


def test_demo_reports_the_unseen_subset(tmp_path, tiny_model_dir, capsys):
    args = ["demo", f"model.source={tiny_model_dir}", f"output_dir={tmp_path}", "name=demo", "train.max_steps=1",
            "eval.before=false", "eval.task_rows=4", "eval.loss_rows=4", "eval.max_new_tokens=4",
            "train.progress=false"]
    assert main(args) == 0
    out = capsys.readouterr().out
    labels = re.findall(r"^  sentence : .*   \[(\w+) name and city\]$", out, re.MULTILINE)
    assert labels == ["unseen", "seen", "unseen"]  # test rows alternate, starting with an unseen one
    after = json.loads((tmp_path / "demo" / "summary.json").read_text())["after"]
    assert json.loads((tmp_path / "demo" / "eval_after.json").read_text())["subsets"] == ["unseen", "seen"] * 2
    assert (f"exact match {after['exact_match']:.0%} on 4 held-out rows, {after['exact_match_unseen']:.0%} "
            "on the 2 whose name and city no training row holds") in out
