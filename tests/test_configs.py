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


def test_option_objects_default_to_the_typed_config():
    """One source of defaults: the options the library functions take default to what a config with nothing set
    asks for (the typed config documents each field), so a library call and a run mean the same thing."""
    from tunesmith.peft import LoRAConfig

    defaults = RunConfig()
    assert TokenizeOptions() == TokenizeOptions.from_config(defaults.data)
    assert TokenizeOptions().max_length == 512
    assert LoRAConfig() == LoRAConfig.from_config(defaults.lora)
    assert (LoRAConfig().r, LoRAConfig().alpha, LoRAConfig().target_modules) == (16, 32.0, "all-linear")
    lora = load_config(None, ["lora.target_modules=[q_proj, v_proj]", "lora.r=4"]).lora
    assert LoRAConfig.from_config(lora) == LoRAConfig(r=4, target_modules=("q_proj", "v_proj"))


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


# --- resume identity is metadata on the fields; a run dir is read by load_run_config ------------------------------

# The hand-written list resume.py held before identity became field metadata: the derived list must stay this set
# (a field marked or unmarked by accident changes what a resume accepts). train.grad_accum left it on purpose: a
# resume compares the global batch, grad_accum × processes (tests/recipes/test_resume_identity.py).
IDENTITY_BEFORE = ("model.source", "model.template", "method.name", "method.objective", "method.freeze_embeddings",
                   "lora.r", "lora.alpha", "lora.target_modules", "lora.use_rslora", "lora.dropout", "data.train",
                   "data.format", "data.split", "data.max_length", "data.overlength", "data.invalid_rows",
                   "data.train_on", "data.reasoning", "data.batching", "data.token_budget",
                   "train.micro_batch_size", "seed", "quant.type", "quant.double_quant",
                   "quant.blocksize", "quant.skip_modules", "quant.storage", "optim.name", "dpo.loss",
                   "dpo.reference", "dpo.init_adapter", "dpo.init_mode")


def test_identity_keys_come_from_field_metadata():
    from tunesmith.config import identity_keys
    from tunesmith.train.resume import IDENTITY_KEYS

    assert IDENTITY_KEYS == identity_keys()
    assert len(IDENTITY_KEYS) == len(set(IDENTITY_KEYS)) and set(IDENTITY_KEYS) == set(IDENTITY_BEFORE)
    # every key names a real leaf field of the config (none is a whole section)
    tree = RunConfig.model_validate({"method": {"objective": "dpo"}}).model_dump(mode="json")
    for key in IDENTITY_KEYS:
        node = tree
        for part in key.split("."):
            node = node[part]
        assert not isinstance(node, dict), key


def _run_dir(tmp_path, text: str | None = None, name: str = "run"):
    run_dir = tmp_path / "runs" / name
    run_dir.mkdir(parents=True)
    if text is None:
        text = load_config(None, ["name=old-name", "output_dir=/elsewhere", "lora.r=4"]).to_yaml()
    (run_dir / "config.yaml").write_text(text)
    return run_dir


def test_load_run_config_reads_the_saved_config_where_the_run_dir_is_now(tmp_path):
    from tunesmith.config_run import load_run_config

    run_dir = _run_dir(tmp_path)
    config = load_run_config(run_dir, ["optim.lr=0.5"], trust_remote_code=True)
    assert (config.lora.r, config.optim.lr, config.model.trust_remote_code) == (4, 0.5, True)
    assert (config.name, config.output_dir, config.run_dir) == ("run", str(tmp_path / "runs"), run_dir)
    assert load_run_config(run_dir).model.trust_remote_code is False  # only the caller's flag grants it


@pytest.mark.parametrize("text, problem", [
    ("lora: [r\n", "is not valid YAML at line 2"),
    ("lora:\n  rank: 4\n", "unknown key 'lora.rank'"),
    ("seed: -1\n", "seed: Input should be greater than or equal to 0 (got -1)"),
    ("- a list\n", "must hold a mapping of sections"),
], ids=["yaml", "unknown-key", "bad-value", "not-a-mapping"])
def test_damaged_run_config_is_named_with_the_fix(tmp_path, text, problem):
    from tunesmith.config_run import load_run_config

    run_dir = _run_dir(tmp_path, text)
    with pytest.raises(TunesmithError) as err:
        load_run_config(run_dir)
    message = str(err.value)
    assert problem in message and str(run_dir / "config.yaml") in message
    assert message.endswith(f"restore it, e.g. from {run_dir / 'checkpoints'}/step-N/config.yaml")


def test_missing_run_config_says_it_is_not_a_run_dir(tmp_path):
    from tunesmith.config_run import load_run_config

    with pytest.raises(TunesmithError, match=f"^{tmp_path} is not a run dir \\(no config.yaml\\)"):
        load_run_config(tmp_path)
