"""``train.forward_products`` and ``train.backward_products`` through a whole run: bf16 products train what
exact ones train, to bf16's rounding; with exact forwards the first step's loss (a forward before any update) is
the same bits; every evaluation stays exact; the bf16 copies live only while training runs; summary.json records
the choices.

The adapters themselves are compared only for being different: on this random tiny model the first block's
gradients are near zero, where Adam's first steps (about lr · sign(g)) turn a small change of g into a large
relative one (up to 10% on a few tensors, 0.2% on most); the losses are what the runs must agree on."""

from pathlib import Path

import pytest
from safetensors.torch import load_file

from tunesmith.errors import TunesmithError
from tunesmith.recipes import sft
from tunesmith.train import engine
from tunesmith.train.metrics import read_metrics
from tunesmith.train.products import BACKWARD_WEIGHT, FORWARD_WEIGHT

RUNS = {"exact": ("exact", "exact"), "backward": ("exact", "bf16"), "both": ("bf16", "bf16")}


def _losses(run_dir) -> list[float]:
    return [row["loss"] for row in read_metrics(Path(run_dir)) if "loss" in row]


def _copies(model) -> tuple[int, int]:
    return (sum(FORWARD_WEIGHT in vars(module) for module in model.modules()),
            sum(BACKWARD_WEIGHT in vars(module) for module in model.modules()))


def test_bf16_products_train_alike_and_leave_no_copy_behind(make_config, monkeypatch):
    counts = []
    remove = engine.remove_products

    def counting_remove(model):  # what training held just before it ended, and what is left after
        held = _copies(model)
        remove(model)
        counts.append((held, _copies(model)))

    monkeypatch.setattr(engine, "remove_products", counting_remove)
    runs = {name: sft.run(make_config(f"name={name}", "train.max_steps=4",
                                      f"train.forward_products={forward}", f"train.backward_products={backward}"))
            for name, (forward, backward) in RUNS.items()}
    # every adapted projection of the two blocks (forward), and the head too (backward)
    assert counts == [((0, 0), (0, 0)), ((0, 2 * 7 + 1), (0, 0)), ((2 * 7, 2 * 7 + 1), (0, 0))]
    assert runs["both"]["forward_products"] == {"name": "bf16", "reason": "train.forward_products=bf16"}
    assert runs["both"]["backward_products"] == {"name": "bf16", "reason": "train.backward_products=bf16"}
    assert runs["exact"]["forward_products"] == {"name": "exact", "reason": "train.forward_products=exact"}
    assert runs["exact"]["backward_products"] == {"name": "exact", "reason": "train.backward_products=exact"}
    exact, backward, both = (_losses(runs[name]["run_dir"]) for name in RUNS)
    assert backward[0] == exact[0] and backward != exact
    assert backward == pytest.approx(exact, rel=1e-4)  # measured: 4e-6 at most
    assert both[0] != exact[0] and both == pytest.approx(exact, rel=1e-3)
    # the evaluation before training is exact in every run, and the one after within the runs' differences
    assert runs["both"]["before"]["eval_loss"] == runs["exact"]["before"]["eval_loss"]
    for name in ("backward", "both"):
        assert runs[name]["after"]["eval_loss"] == pytest.approx(runs["exact"]["after"]["eval_loss"], rel=1e-3)
    adapters = {name: load_file(Path(runs[name]["run_dir"]) / "adapter" / "adapter_model.safetensors")
                for name in RUNS}
    for name in ("backward", "both"):
        assert adapters[name].keys() == adapters["exact"].keys()
        assert any(not adapters[name][key].equal(adapters["exact"][key]) for key in adapters["exact"])


@pytest.mark.parametrize("setting", ["forward_products", "backward_products"])
def test_bf16_products_are_refused_for_full_fine_tuning_before_the_run_dir(make_config, setting):
    config = make_config("method.name=full", f"train.{setting}=bf16")
    with pytest.raises(TunesmithError, match=f"train.{setting}=bf16 acts on frozen float32 linear layers"):
        sft.run(config)
    assert not config.run_dir.exists()
