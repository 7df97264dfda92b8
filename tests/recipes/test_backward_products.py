"""``train.backward_products`` through a whole run: bf16 products train what exact ones train, to bf16's
rounding; the first step's loss (a forward before any update) is the same bits; the bf16 copies live only
while training runs; summary.json records the choice.

The adapters themselves are compared only for being different: on this random tiny model the first block's
gradients are near zero, where Adam's first steps (about lr · sign(g)) turn a small change of g into a large
relative one (up to 10% on a few tensors, 0.2% on most); the losses are what the two runs must agree on."""

from pathlib import Path

import pytest
from safetensors.torch import load_file

from tunesmith.errors import TunesmithError
from tunesmith.recipes import sft
from tunesmith.train import engine
from tunesmith.train.backward import BACKWARD_WEIGHT
from tunesmith.train.metrics import read_metrics


def _losses(run_dir) -> list[float]:
    return [row["loss"] for row in read_metrics(Path(run_dir)) if "loss" in row]


def test_bf16_products_train_alike_and_leave_no_copy_behind(make_config, monkeypatch):
    counts = []
    remove = engine.remove_backward_products

    def counting_remove(model):  # what training held just before it ended, and what is left after
        held = sum(BACKWARD_WEIGHT in vars(module) for module in model.modules())
        remove(model)
        counts.append((held, sum(BACKWARD_WEIGHT in vars(module) for module in model.modules())))

    monkeypatch.setattr(engine, "remove_backward_products", counting_remove)
    runs = {mode: sft.run(make_config(f"name={mode}", "train.max_steps=4", "eval.before=false",
                                      f"train.backward_products={mode}"))
            for mode in ("exact", "bf16")}
    assert counts == [(0, 0), (2 * 7 + 1, 0)]  # every adapted projection of the two blocks, and the head
    assert runs["bf16"]["backward_products"] == {"name": "bf16", "reason": "train.backward_products=bf16"}
    assert runs["exact"]["backward_products"] == {"name": "exact", "reason": "train.backward_products=exact"}
    exact, low = _losses(runs["exact"]["run_dir"]), _losses(runs["bf16"]["run_dir"])
    assert low[0] == exact[0] and low != exact
    assert low == pytest.approx(exact, rel=1e-4)  # measured: 4e-6 at most
    assert runs["bf16"]["after"]["eval_loss"] == pytest.approx(runs["exact"]["after"]["eval_loss"], rel=1e-4)
    a = load_file(Path(runs["exact"]["run_dir"]) / "adapter" / "adapter_model.safetensors")
    b = load_file(Path(runs["bf16"]["run_dir"]) / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and any(not a[key].equal(b[key]) for key in a)


def test_bf16_products_are_refused_for_full_fine_tuning_before_the_run_dir(make_config):
    config = make_config("method.name=full", "train.backward_products=bf16")
    with pytest.raises(TunesmithError, match="train.backward_products=bf16 acts on frozen float32 linear layers"):
        sft.run(config)
    assert not config.run_dir.exists()
