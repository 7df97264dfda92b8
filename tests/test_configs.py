"""The example configs in configs/ validate offline, and the JSONL one trains on its shipped example data."""

from pathlib import Path

import pytest

from tunesmith.config import RunConfig, load_config
from tunesmith.data.pipeline import prepare
from tunesmith.data.tokenize import TokenizeOptions
from tunesmith.errors import TunesmithError

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


def test_every_expected_config_is_there():
    assert {p.stem for p in CONFIGS} >= {"default", "full", "lora_jsonl", "tinyllama_ultrachat", "dpo_sigmoid",
                                         "dpo_ipo", "dpo_simpo"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_validates_offline(path):
    config = load_config(path)
    assert isinstance(config, RunConfig)
    # the saved, resolved form reloads to the same config
    again = RunConfig.model_validate(__import__("yaml").safe_load(config.to_yaml()))
    assert again == config


def test_default_config_is_the_builtin_default():
    assert load_config(ROOT / "configs" / "default.yaml") == load_config(None)


def test_tutorial_config_keeps_the_tutorial_settings():
    config = load_config(ROOT / "configs" / "tinyllama_ultrachat.yaml")
    assert (config.lora.r, config.lora.alpha, config.lora.dropout) == (64, 32.0, 0.1)
    assert (config.train.micro_batch_size, config.train.grad_accum, config.optim.lr) == (2, 4, 2e-4)
    assert config.model.template == "zephyr" and config.data.sample_rows == 3000
    assert (config.method.name, config.quant.type, config.quant.double_quant) == ("qlora", "nf4", True)
    assert config.optim.name == "paged_adamw_32bit" and config.train.gradient_checkpointing


@pytest.mark.parametrize("loss", ["sigmoid", "ipo", "simpo"])
def test_dpo_configs_one_per_loss(loss):
    config = load_config(ROOT / "configs" / f"dpo_{loss}.yaml")
    assert config.method.objective == "dpo" and config.dpo.loss == loss
    assert config.data.train == "builtin-preference" and config.data.eval == "builtin-preference:test"
    assert (config.lora.r, config.lora.alpha) == (16, 32.0)  # the default SFT adapter's shape, to continue it
    with_adapter = load_config(ROOT / "configs" / f"dpo_{loss}.yaml", ["dpo.init_adapter=runs/sft"])
    assert with_adapter.dpo.init_adapter == "runs/sft" and with_adapter.dpo.init_mode == "continue"


def test_dpo_section_follows_the_objective():
    assert load_config(None).dpo is None
    assert load_config(None, ["method.objective=dpo"]).dpo.loss == "sigmoid"
    with pytest.raises(TunesmithError, match="the dpo section applies only to method.objective=dpo"):
        load_config(None, ["dpo.beta=0.2"])
    with pytest.raises(TunesmithError, match="unknown key 'dpo.temperature'"):
        load_config(None, ["method.objective=dpo", "dpo.temperature=1"])


def test_sample_rows_is_seeded_and_keeps_source_row_numbers(tokenizer):
    path = str(ROOT / "examples" / "chats.jsonl")
    options = TokenizeOptions(max_length=256)
    a = prepare(path, tokenizer, options, sample=10, seed=1)
    b = prepare(path, tokenizer, options, sample=10, seed=1)
    c = prepare(path, tokenizer, options, sample=10, seed=2)
    rows = [ex["row"] for ex in a.examples]
    assert rows == [ex["row"] for ex in b.examples] and rows != [ex["row"] for ex in c.examples]
    assert len(rows) == 10 and rows == sorted(rows) and len(set(rows)) == 10 and max(rows) <= 48


def test_lora_jsonl_config_trains_on_example_data(tmp_path, tiny_model_dir, monkeypatch):
    from tunesmith.recipes.sft import run

    monkeypatch.chdir(ROOT)
    config = load_config(ROOT / "configs" / "lora_jsonl.yaml",
                         [f"model.source={tiny_model_dir}", f"output_dir={tmp_path}", "name=j", "train.max_steps=2",
                          "train.progress=false", "eval.before=false"])
    summary = run(config)
    assert summary["steps"] == 2 and summary["after"]["eval_tokens"] > 0
    assert (tmp_path / "j" / "adapter" / "adapter_config.json").is_file()
