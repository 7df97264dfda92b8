"""The DPO recipe end to end on the tiny model: metrics and report, every method and loss, exact resume with
the cached reference, continuing or stacking on an SFT adapter, refusals, and row-numbered data errors."""

import hashlib
import json
import math

import peft
import pytest
import torch
from safetensors.torch import load_file

from tunesmith.cli import main
from tunesmith.data.pipeline import prepare
from tunesmith.data.tokenize import TokenizeOptions
from tunesmith.errors import TunesmithError
from tunesmith.models import load
from tunesmith.peft import load_adapter
from tunesmith.recipes import dpo, sft
from tunesmith.train.checkpoint import latest_checkpoint
from tunesmith.train.metrics import read_metrics
from tunesmith.train.preference import collate_pairs, pair_logps

WORDS = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet"]
LOG2 = math.log(2)
STEP_KEYS = {"step", "epoch", "loss", "reward_accuracy", "chosen_reward", "rejected_reward", "margin", "lr",
             "grad_norm", "tokens", "tokens_per_s", "skipped"}


def preference_rows(n: int, offset: int = 0) -> list[dict]:
    rows = []
    for i in range(offset, offset + n):
        a, b = WORDS[i % 10], WORDS[(i * 3 + 1) % 10]
        if i % 2:  # prompt and answers as messages
            rows.append({"prompt": [{"role": "user", "content": f"Repeat {a} {b}"}],
                         "chosen": [{"role": "assistant", "content": f"{a} {b}"}],
                         "rejected": [{"role": "assistant", "content": f"{b} {a} {i % 7}"}]})
        else:  # plain strings
            rows.append({"prompt": f"Repeat {a} {b}", "chosen": f"{a} {b}", "rejected": f"{b} {a}"})
    return rows


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture()
def make_dpo(tmp_path, make_config):
    train = _write(tmp_path / "pairs.jsonl", preference_rows(8))
    heldout = _write(tmp_path / "pairs_eval.jsonl", preference_rows(4, offset=100))

    def make(*overrides: str):
        return make_config("method.objective=dpo", f"data.train={train}", f"data.eval={heldout}", "dpo.beta=0.5",
                           *overrides)

    return make


def _losses(run_dir):
    return [row["loss"] for row in read_metrics(run_dir) if "loss" in row]


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_lora_run_logs_preference_metrics_and_writes_report(make_dpo, capsys):
    config = make_dpo("name=lora", "train.max_steps=4")
    summary = dpo.run(config)
    out = capsys.readouterr().out
    assert "reference adapters_disabled" in out and "preference_accuracy" in out
    rows = read_metrics(config.run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and all(STEP_KEYS | {"kl"} <= r.keys() for r in rows)
    # before the first update the policy is the reference: loss log 2, rewards 0, every pair a tie
    assert rows[0]["loss"] == pytest.approx(LOG2, abs=1e-6)
    assert (rows[0]["reward_accuracy"], rows[0]["margin"], rows[0]["kl"]) == pytest.approx((0.5, 0.0, 0.0), abs=1e-6)
    assert rows[-1]["loss"] < LOG2 and rows[-1]["reward_accuracy"] > 0.5
    assert summary["before"]["preference_accuracy"] == 0.5 and summary["before"]["eval_loss"] == pytest.approx(LOG2)
    assert summary["after"]["pairs"] == 4 and summary["after"]["eval_loss"] != summary["before"]["eval_loss"]
    assert not (config.run_dir / dpo.REFERENCE_FILE).exists()
    report = (config.run_dir / "report.html").read_text()
    assert "Reward accuracy" in report and "Chosen and rejected rewards" in report and "preference_accuracy" in report
    assert list(config.run_dir.glob("tb/events.out.tfevents.*"))
    assert (config.run_dir / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("method", ["lora", "qlora", "full"])
def test_every_method_trains(make_dpo, tokenizer, method):
    config = make_dpo(f"name={method}", f"method.name={method}", "train.max_steps=3", "eval.before=false")
    summary = dpo.run(config)
    losses = _losses(config.run_dir)
    # policy = reference at the first step (full: up to the cached log-probs' rounding in another batch layout)
    assert len(losses) == 3 and losses[0] == pytest.approx(LOG2, abs=1e-4) and losses[-1] < losses[0]
    assert summary["method"] == method and (summary["quantization"] is not None) == (method == "qlora")
    assert (config.run_dir / ("model" if method == "full" else "adapter")).is_dir()
    cache = config.run_dir / dpo.REFERENCE_FILE
    assert cache.exists() == (method == "full")
    if method == "full":  # the base model's log-probs, computed once before training
        examples = prepare(config.data.train, tokenizer, TokenizeOptions(max_length=config.data.max_length)).examples
        fresh = pair_logps(load(config.model.source).model, examples, pad_id=tokenizer.pad_token_id)
        cached = load_file(cache)
        for key in ("chosen", "rejected", "chosen_len", "rejected_len"):
            torch.testing.assert_close(cached[f"train.{key}"], fresh[key], atol=1e-5, rtol=0)
        assert cached["eval.chosen"].shape == (4,)


@pytest.mark.parametrize("loss", ["ipo", "simpo"])
def test_ipo_and_simpo_train(make_dpo, loss):
    config = make_dpo(f"name={loss}", f"dpo.loss={loss}", "dpo.gamma=0.2", "train.max_steps=3", "eval.before=false")
    summary = dpo.run(config)
    rows = read_metrics(config.run_dir)
    if loss == "ipo":  # h̄ = 0 at the start: (0 − 1/(2β))² = 1 for β = 0.5
        assert rows[0]["loss"] == pytest.approx(1.0, abs=1e-6) and "kl" in rows[0]
    else:  # reference-free: no reference at all
        assert "kl" not in rows[0] and not (config.run_dir / dpo.REFERENCE_FILE).exists()
    assert rows[-1]["loss"] < rows[0]["loss"] and 0 <= summary["after"]["preference_accuracy"] <= 1


class Stop(Exception):
    pass


@pytest.mark.parametrize("method", ["lora", "full"])
def test_resume_reproduces_loss_curve_and_reuses_the_reference_cache(make_dpo, method):
    straight = make_dpo("name=straight", f"method.name={method}", "eval.before=false")
    dpo.run(straight)
    broken = make_dpo("name=broken", f"method.name={method}", "eval.before=false")

    def stop_at(step, micro):
        if (step, micro) == (3, 3):  # step 4's second micro-batch: mid-accumulation
            raise Stop()

    with pytest.raises(Stop):
        dpo.run(broken, on_micro_batch=stop_at)
    assert latest_checkpoint(broken.run_dir).name == "step-2"
    cache = broken.run_dir / dpo.REFERENCE_FILE
    digest = _sha(cache) if method == "full" else None
    dpo.run(broken, resume=True)
    assert _losses(broken.run_dir) == pytest.approx(_losses(straight.run_dir), abs=1e-5)
    assert len(_losses(broken.run_dir)) == 6
    if method == "full":  # recomputing it from the half-trained weights would have changed the curve
        assert _sha(cache) == digest
    else:
        a, b = (load_file(c.run_dir / "adapter" / "adapter_model.safetensors") for c in (broken, straight))
        for key in a:
            torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=0)


def test_continue_from_an_sft_adapter(make_config, make_dpo, tokenizer):
    sft_config = make_config("name=sft", "train.max_steps=2", "eval.before=false", "data.eval=")
    sft.run(sft_config)
    config = make_dpo("name=continued", f"dpo.init_adapter={sft_config.run_dir}", "train.max_steps=2")
    summary = dpo.run(config)
    # the reference is the SFT model (the starting policy), cached before training
    model = load(config.model.source).model
    load_adapter(model, sft_config.run_dir / "adapter")
    examples = prepare(config.data.train, tokenizer, TokenizeOptions(max_length=config.data.max_length)).examples
    cached = load_file(config.run_dir / dpo.REFERENCE_FILE)
    sft_logps = pair_logps(model, examples, pad_id=tokenizer.pad_token_id)
    torch.testing.assert_close(cached["train.chosen"], sft_logps["chosen"], atol=1e-5, rtol=0)
    assert _losses(config.run_dir)[0] == pytest.approx(LOG2, abs=1e-4)
    assert summary["before"]["preference_accuracy"] == 0.5
    start = load_file(sft_config.run_dir / "adapter" / "adapter_model.safetensors")
    end = load_file(config.run_dir / "adapter" / "adapter_model.safetensors")
    assert start.keys() == end.keys() and any(not torch.equal(start[k], end[k]) for k in start)


def test_stack_a_new_adapter_over_the_sft_one(make_config, make_dpo, tokenizer):
    sft_config = make_config("name=sft", "train.max_steps=2", "eval.before=false", "data.eval=")
    sft.run(sft_config)
    config = make_dpo("name=stacked", f"dpo.init_adapter={sft_config.run_dir}", "dpo.init_mode=stack", "lora.r=2",
                      "lora.alpha=4", "train.max_steps=2")
    summary = dpo.run(config)
    # adapters off = the folded SFT model = the starting policy: an exact tie at the first step, no cache
    assert _losses(config.run_dir)[0] == pytest.approx(LOG2, abs=1e-6)
    assert not (config.run_dir / dpo.REFERENCE_FILE).exists()
    sft_model = load(config.model.source).model
    load_adapter(sft_model, sft_config.run_dir / "adapter")
    heldout = prepare(config.data.eval, tokenizer, TokenizeOptions(max_length=config.data.max_length)).examples
    sft_logps = pair_logps(sft_model, heldout, pad_id=tokenizer.pad_token_id)
    assert summary["before"]["chosen_loss"] == pytest.approx(
        float(-sft_logps["chosen"].sum() / sft_logps["chosen_len"].sum()), abs=1e-5)
    # adapter/ is SFT + DPO as one rank-6 adapter for the original base: it reproduces the trained model
    saved = json.loads((config.run_dir / "adapter" / "adapter_config.json").read_text())
    assert (saved["r"], saved["lora_alpha"]) == (6, 6)
    stacked = load(config.model.source).model
    load_adapter(stacked, config.run_dir / "adapter")
    logps = pair_logps(stacked, heldout, pad_id=tokenizer.pad_token_id)
    assert summary["after"]["chosen_loss"] == pytest.approx(
        float(-logps["chosen"].sum() / logps["chosen_len"].sum()), abs=1e-5)
    assert summary["after"]["chosen_loss"] != pytest.approx(summary["before"]["chosen_loss"], abs=1e-6)
    theirs = peft.PeftModel.from_pretrained(load(config.model.source).model, config.run_dir / "adapter").eval()
    ids = collate_pairs(heldout[:1], tokenizer.pad_token_id)["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(theirs(input_ids=ids).logits, stacked(input_ids=ids).logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("overrides, message", [
    (["dpo.init_mode=stack", "method.name=qlora"], "would quantize the SFT adapter into the 4-bit base"),
    (["dpo.reference=adapters_disabled"], "would make the base model the reference"),
    (["lora.r=8"], "has r=4, alpha=8.0, use_rslora=False; set lora.r"),
    (["method.name=full"], "dpo.init_adapter needs method.name lora or qlora"),
])
def test_refusals_before_anything_is_written(make_dpo, tmp_path, overrides, message):
    adapter = tmp_path / "sft-adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8.0}))
    config = make_dpo("name=refused", f"dpo.init_adapter={adapter}", *overrides)
    with pytest.raises(TunesmithError, match=message):
        dpo.run(config)
    assert not config.run_dir.exists()


def test_data_errors_name_the_row_and_drops_are_counted(make_dpo, make_config, tmp_path, capsys):
    rows = preference_rows(8)
    rows[2]["rejected"] = rows[2]["chosen"]
    bad = _write(tmp_path / "bad.jsonl", rows)
    with pytest.raises(TunesmithError, match="line 3: chosen and rejected are identical"):
        dpo.run(make_dpo("name=bad", f"data.train={bad}"))
    long_prompt = preference_rows(8)
    long_prompt[4]["prompt"] = "Repeat " + "alpha " * 200
    long = _write(tmp_path / "long.jsonl", long_prompt)
    with pytest.raises(TunesmithError, match="line 5: .* tokens is over max_length 64"):
        dpo.run(make_dpo("name=long", f"data.train={long}", "data.max_length=64", "data.overlength=error"))
    config = make_dpo("name=dropped", f"data.train={bad}", "data.invalid_rows=drop", "train.max_steps=1",
                      "eval.before=false", "data.eval=")
    dpo.run(config)
    assert "1 of 8 rows dropped (1 × chosen and rejected are identical" in capsys.readouterr().out
    config = make_dpo("name=cut", f"data.train={long}", "data.max_length=64", "train.max_steps=1",
                      "eval.before=false", "data.eval=")
    dpo.run(config)
    out = capsys.readouterr().out
    assert "1 of 8 rows dropped (1 × no trained token left after truncation to max_length 64)" in out
    with pytest.raises(TunesmithError, match="method.objective=dpo needs preference data"):
        dpo.run(make_config("name=chat", "method.objective=dpo"))
    with pytest.raises(TunesmithError, match="holds preference pairs .* method.objective=dpo"):
        sft.run(make_config("name=pairs-sft", f"data.train={bad}", "data.invalid_rows=drop"))


def test_cli_train_runs_and_resumes_dpo(make_dpo, tmp_path):
    config = make_dpo("name=cli", "train.max_steps=2", "eval.before=false")
    path = tmp_path / "dpo.yaml"
    path.write_text(config.to_yaml())
    assert main(["train", "--config", str(path)]) == 0
    rows = read_metrics(config.run_dir)
    assert [r["step"] for r in rows] == [1, 2] and "reward_accuracy" in rows[0]
    assert main(["train", "--resume", str(config.run_dir)]) == 0
    assert json.loads((config.run_dir / "summary.json").read_text())["steps"] == 2


def test_eval_cli_on_a_dpo_run_scores_the_pairs(make_dpo, capsys):
    config = make_dpo("name=evaluated", "train.max_steps=2", "eval.before=false")
    dpo.run(config)
    capsys.readouterr()
    assert main(["eval", str(config.run_dir), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    after = json.loads((config.run_dir / "eval_after.json").read_text())
    after = after.get("metrics", after)
    assert result["pairs"] == 4 and result["adapter"] == str(config.run_dir / "adapter")
    assert result["likelihood_accuracy"] == pytest.approx(after["likelihood_accuracy"], abs=1e-9)
    assert result["chosen_loss"] == pytest.approx(after["chosen_loss"], rel=1e-5)
