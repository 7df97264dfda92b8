"""Evaluation on the user's own data (``eval --generate``, ``eval.generate``), checked against answers from
transformers' own greedy ``model.generate`` (and PEFT's adapter loading), which we did not write."""

import json

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from tinymodels import build_tiny_llama
from tunesmith.cli import main
from tunesmith.config import load_config
from tunesmith.data.pipeline import prepare
from tunesmith.data.tokenize import TokenizeOptions
from tunesmith.eval.cli import run_eval
from tunesmith.eval.evaluate import agreed_answers, evaluate, heldout_loss
from tunesmith.eval.task import answer_prompts, answer_rows
from tunesmith.models import load
from tunesmith.peft.io import load_adapter
from tunesmith.templates import stop_token_ids

NEW_TOKENS = 6


def reference_answer(model, tokenizer, prompt) -> str:
    """transformers' greedy answer: a message list through the tokenizer's chat template with the generation
    prompt, a plain string as training tokenizes it; stopping at the template's end of turn / EOS."""
    return tokenizer.decode(reference_tokens(model, tokenizer, prompt), skip_special_tokens=True).strip()


def reference_tokens(model, tokenizer, prompt) -> list[int]:
    if isinstance(prompt, list):
        ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, return_dict=True,
                                            return_tensors="pt")["input_ids"]
    else:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    stops = tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=NEW_TOKENS,
                             eos_token_id=stops, pad_token_id=tokenizer.pad_token_id)
    return [t for t in out[0, ids.shape[1]:].tolist() if t not in stops]


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory, tokenizer):
    """The tiny Llama with untied, wider-initialised weights: its greedy answers are varied words, where the
    shared fixture's echo the template's last newline (an empty answer once stripped)."""
    path = tmp_path_factory.mktemp("tiny-varied")
    build_tiny_llama(tie_word_embeddings=False, initializer_range=0.3).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def hf_tiny(tiny_model_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def conversations() -> list[list[dict]]:
    """Three conversations; the second has two turns, so its prompt holds the first answer."""
    return [[{"role": "user", "content": "Repeat alpha bravo"}],
            [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Name a colour"},
             {"role": "assistant", "content": "red"}, {"role": "user", "content": "Another one"}],
            [{"role": "user", "content": "Count to three"}]]


def test_cli_generate_scores_the_last_assistant_turn_per_subset(tmp_path, tiny_model_dir, hf_tiny, tokenizer,
                                                                  capsys):
    prompts = conversations() + [[{"role": "user", "content": "Say hello"}]]
    answers = [reference_answer(hf_tiny, tokenizer, p) for p in prompts]
    expected = answers[:3] + ["not what greedy decoding says"]
    subsets = ["seen", "unseen", "unseen", "seen"]
    data = write_jsonl(tmp_path / "mine.jsonl", [
        {"messages": p + [{"role": "assistant", "content": e}], "subset": s}
        for p, e, s in zip(prompts, expected, subsets)])
    args = ["eval", str(tiny_model_dir), "--data", data, "--generate", "--max-new-tokens", str(NEW_TOKENS),
            "--whole-answers"]
    assert main(args + ["--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["exact_match"] == 0.75 and report["answers_settled"] == 0
    assert (report["exact_match_seen"], report["exact_match_unseen"]) == (0.5, 1.0)
    assert "valid_json_rate" not in report and "before" not in report  # text answers; no adapter, no before
    assert [s["after"] for s in report["samples"]] == answers
    assert [(s["row"], s["subset"], s["prompt"]) for s in report["samples"]] == [
        (1, "seen", "Repeat alpha bravo"), (2, "unseen", "Another one"), (3, "unseen", "Count to three"),
        (4, "seen", "Say hello")]
    # the terminal view: metrics, then each row with its mark
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "exact_match_unseen" in out and "row 4 [seen]" in out
    assert f"  after    : {answers[3]}  ✗" in out and f"  after    : {answers[0]}  ✓" in out
    # by default an answer ends once its score is settled: row 4 as soon as it leaves the expected text, the
    # same metrics
    assert main(args[:-1] + ["--json"]) == 0
    settled = json.loads(capsys.readouterr().out)
    assert settled["answers_settled"] == 1
    assert {k: v for k, v in settled.items() if k not in ("samples", "answers_settled")} == {
        k: v for k, v in report.items() if k not in ("samples", "answers_settled")}
    cut = settled["samples"][3]["after"]
    assert [s["after"] for s in settled["samples"][:3]] == answers[:3]
    assert cut and answers[3].startswith(cut) and len(cut) < len(answers[3])


def test_api_generate_on_alpaca_and_prompt_completion_rows_with_json_answers(tmp_path, tiny_model_dir, hf_tiny,
                                                                             tokenizer):
    alpaca_answer = reference_answer(hf_tiny, tokenizer, [{"role": "user", "content": "Translate\n\nbonjour"}])
    alpaca = write_jsonl(tmp_path / "alpaca.jsonl", [
        {"instruction": "Translate", "input": "bonjour", "output": alpaca_answer},
        {"instruction": "Give the booking as JSON", "input": "", "output": '{"name": "Ada", "guests": 4}'},
        {"instruction": "Give the list as JSON", "input": "", "output": '{"name": "Ben"}'}])
    report = run_eval(str(tiny_model_dir), data=alpaca, generate=True, max_new_tokens=NEW_TOKENS)
    # a random tiny model writes no JSON: both JSON rows fail every field; the text row matches
    assert report["exact_match"] == pytest.approx(1 / 3)
    assert report["valid_json_rate"] == 0.0 and report["fields"] == {"name": 0.0, "guests": 0.0}
    plain = ["The capital of France is", "One, two,"]
    completion = write_jsonl(tmp_path / "completion.jsonl", [
        {"prompt": p, "completion": reference_answer(hf_tiny, tokenizer, p)} for p in plain])
    report = run_eval(str(tiny_model_dir), data=completion, generate=True, max_new_tokens=NEW_TOKENS)
    assert report["exact_match"] == 1.0 and [s["prompt"] for s in report["samples"]] == plain


def test_generate_refuses_data_without_expected_answers(tmp_path, tiny_model_dir, capsys):
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "Hi", "chosen": "Hello", "rejected": "Go away"}])
    text = write_jsonl(tmp_path / "text.jsonl", [{"text": "Just some prose."}])
    bad_subset = write_jsonl(tmp_path / "subset.jsonl", [
        {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "subset": 3}])
    for data, message in ((pairs, "holds preference pairs (prompt/chosen/rejected): no row has one expected"),
                          (text, "holds plain text"), (bad_subset, 'line 1: "subset" must be a non-empty string')):
        assert main(["eval", str(tiny_model_dir), "--data", data, "--generate"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1


@pytest.fixture(scope="module")
def last_turn_run(tmp_path_factory, tiny_model_dir, tokenizer):
    """A 4-step LoRA run on two-turn conversations with data.train_on=last, a max_length that cuts every
    held-out row, and eval.generate: true, through the CLI."""
    tmp = tmp_path_factory.mktemp("last-turn")
    rows = []
    for i, (a, b) in enumerate([("alpha", "bravo"), ("charlie", "delta"), ("echo", "foxtrot"), ("golf", "hotel")]):
        rows.append({"messages": [{"role": "user", "content": f"Repeat {a}"}, {"role": "assistant", "content": a},
                                  {"role": "user", "content": f"Now {b}"},
                                  {"role": "assistant", "content": f"{b} {a} {b} {a} {b} {i}"}],
                     "subset": "seen" if i % 2 else "unseen"})
    train, heldout = write_jsonl(tmp / "train.jsonl", rows), write_jsonl(tmp / "eval.jsonl", rows[:3])
    # three tokens short of the shortest row: the end of every last answer is cut
    max_length = len(tokenizer(tokenizer.apply_chat_template(rows[0]["messages"], tokenize=False))["input_ids"]) - 3
    config = tmp / "run.yaml"
    config.write_text(yaml.safe_dump({
        "name": "last", "output_dir": str(tmp / "runs"), "model": {"source": str(tiny_model_dir)},
        "data": {"train": train, "eval": heldout, "train_on": "last", "max_length": max_length},
        "lora": {"r": 4, "alpha": 8}, "optim": {"lr": 0.05},
        "train": {"micro_batch_size": 4, "max_steps": 4, "progress": False, "checkpoint_every": None},
        "eval": {"generate": True, "max_new_tokens": NEW_TOKENS, "stop_settled": False}}))
    assert main(["train", "--config", str(config)]) == 0
    return tmp / "runs" / "last", rows[:3]


def test_training_with_eval_generate_scores_before_and_after_like_transformers(last_turn_run, tiny_model_dir,
                                                                              hf_tiny, tokenizer):
    from peft import PeftModel

    run_dir, rows = last_turn_run
    prompts = [r["messages"][:-1] for r in rows]
    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32),
                                      run_dir / "adapter").eval()
    before = json.loads((run_dir / "eval_before.json").read_text())
    after = json.loads((run_dir / "eval_after.json").read_text())
    assert before["predictions"] == [reference_answer(hf_tiny, tokenizer, p) for p in prompts]
    assert after["predictions"] == [reference_answer(tuned, tokenizer, p) for p in prompts]
    assert after["subsets"] == ["unseen", "seen", "unseen"] and after["rows"] == [1, 2, 3]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert {"exact_match", "exact_match_seen", "exact_match_unseen"} <= summary["after"].keys()
    assert summary["after"]["exact_match"] == 0.0  # the answers are not learnt in 4 steps: scored, and wrong
    page = (run_dir / "report.html").read_text(encoding="utf-8")
    assert "<th>subset</th><th>prompt</th><th>expected</th><th>before</th><th>match</th><th>after</th>" in page
    for row, prediction in zip(rows, after["predictions"]):
        assert f'<td class="text">{row["messages"][-1]["content"]}</td>' in page
        assert f'<td class="text">{prediction}</td>' in page


def test_eval_run_dir_uses_the_runs_tokenization_and_scores_before_after(last_turn_run, tiny_model_dir, hf_tiny,
                                                                         tokenizer, tmp_path, capsys):
    run_dir, rows = last_turn_run
    summary = json.loads((run_dir / "summary.json").read_text())
    assert main(["eval", str(run_dir), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    # the run's own tokenization (train_on=last, its max_length): the loss the run itself measured
    for key in ("eval_loss", "eval_tokens", "exact_match", "exact_match_seen"):
        assert report[key] == pytest.approx(summary["after"][key], abs=1e-6), key
        assert report["before"][key] == pytest.approx(summary["before"][key], abs=1e-6), key
    # ... which is not what the default tokenization (all turns, 512 tokens) gives: the test can tell them apart
    config = load_config(run_dir / "config.yaml")
    loaded = load(str(tiny_model_dir))
    load_adapter(loaded.model, run_dir / "adapter")
    for options, equal in ((TokenizeOptions(max_length=config.data.max_length, train_on="last"), True),
                           (TokenizeOptions(max_length=512), False)):
        examples = prepare(config.data.eval, loaded.tokenizer, options).examples
        loss = heldout_loss(loaded.model, examples, pad_id=tokenizer.pad_token_id)["eval_loss"]
        assert (abs(loss - report["eval_loss"]) < 1e-6) == equal
    # the user's own expected answers: two rows answered as the tuned model answers, one not
    after = json.loads((run_dir / "eval_after.json").read_text())["predictions"]
    mine = write_jsonl(tmp_path / "mine.jsonl", [
        {"messages": r["messages"][:-1] + [{"role": "assistant", "content": e}]}
        for r, e in zip(rows, after[:2] + ["something else"])])
    assert main(["eval", str(run_dir), "--data", mine, "--generate", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["exact_match"] == pytest.approx(2 / 3)
    assert [s["after"] for s in report["samples"]] == after
    assert [s["before"] for s in report["samples"]] == [reference_answer(hf_tiny, tokenizer, r["messages"][:-1])
                                                       for r in rows]


def test_answers_the_loss_pass_determines_are_what_transformers_generates(tmp_path, tiny_model_dir, hf_tiny,
                                                                          tokenizer):
    """``evaluate`` takes from the held-out loss pass the start of each row's greedy answer (all of it where the
    expected answer is the greedy one) and generates only the rest: the answers are transformers' greedy ones
    whatever the expected answers hold, and the loss is the plain pass's. The rows it generates start from the
    keys and values the pass computed of their prompts and known starts (``eval/prompt_keys.py``)."""
    prompts = conversations() + [[{"role": "user", "content": "Say hello"}]]
    tokens = [reference_tokens(hf_tiny, tokenizer, p) for p in prompts]
    answers = [tokenizer.decode(t, skip_special_tokens=True).strip() for t in tokens]
    # Expected answers as their tokens' text, unstripped, so the template renders those very tokens: the greedy
    # answer itself; its first two tokens and then other words; another answer; the greedy answer again
    expected = [tokenizer.decode(tokens[0]), tokenizer.decode(tokens[1][:2]) + " zebra yak",
                "not what greedy decoding says", tokenizer.decode(tokens[3])]
    data = write_jsonl(tmp_path / "mine.jsonl", [{"messages": p + [{"role": "assistant", "content": e}]}
                                                 for p, e in zip(prompts, expected)])
    loaded = load(str(tiny_model_dir))
    model = loaded.model.eval()
    examples = prepare(data, tokenizer, TokenizeOptions(max_length=512)).examples
    rows = answer_rows(data)
    metrics, task = evaluate(model, tokenizer, examples=examples, rows=rows, max_new_tokens=NEW_TOKENS)
    assert task.predictions == answers
    assert metrics["eval_loss"] == heldout_loss(model, examples, pad_id=tokenizer.pad_token_id)["eval_loss"]
    assert metrics["exact_match"] == 0.5 and task.reused == 1
    assert task.prefilled == 3  # the other three continue from the keys the pass kept
    with pytest.MonkeyPatch.context() as patch:  # as on a GPU: no keys kept, every row prefilled by the engine
        patch.setattr("tunesmith.eval.evaluate.keeps_keys", lambda model: False)
        _, plain = evaluate(model, tokenizer, examples=examples, rows=rows, max_new_tokens=NEW_TOKENS)
    assert plain.predictions == answers and plain.prefilled == 0 and plain.reused == 1
    # Answers ended once settled: rows 1 and 2 are wrong from the token where they leave the expected text, which
    # the pass determined, so they are not generated at all; the metrics are those of the whole answers
    cut_metrics, cut = evaluate(model, tokenizer, examples=examples, rows=rows, max_new_tokens=NEW_TOKENS,
                                settled=True)
    assert cut_metrics == metrics and (cut.settled, cut.reused, cut.prefilled) == (2, 1, 1)
    assert [cut.predictions[i] for i in (0, 3)] == [answers[0], answers[3]]
    for row, length in ((1, 3), (2, 1)):
        assert cut.predictions[row] == tokenizer.decode(tokens[row][:length], skip_special_tokens=True).strip()
    # What the pass determined: row 3 whole; row 1 its first two tokens and the token after them (where greedy
    # decoding leaves the expected answer); row 2 only its first token. Row 0's expected text, though the greedy
    # answer's, tokenizes otherwise from its second word on ("Ġlev ermis" is rendered "Ġlever mis"): the walk
    # stops there, and the rest is generated.
    picks = {}
    heldout_loss(model, examples, pad_id=tokenizer.pad_token_id, picks=picks)
    known = agreed_answers(answer_prompts(tokenizer, rows), examples, picks, stop_token_ids(tokenizer), NEW_TOKENS)
    assert {row: (len(answer), complete) for row, (answer, complete) in known.items()} == {
        0: (2, False), 1: (3, False), 2: (1, False), 3: (NEW_TOKENS, True)}
    assert all(answer == tokens[row][:len(answer)] for row, (answer, _) in known.items())
    # each pick is the argmax of transformers' own logits at that position
    for index, example in enumerate(examples):
        with torch.no_grad():
            logits = hf_tiny(torch.tensor([example["input_ids"]])).logits[0]
        trained = [t for t in range(1, len(example["labels"])) if example["labels"][t] != -100]
        assert picks[index] == [int(logits[t - 1].argmax()) for t in trained]


@pytest.mark.parametrize("picked, limit, known", [
    ([10, 11, 12, 99], 48, ([10, 11, 12], True)),  # greedy agrees up to the stop token
    ([10, 11, 99, 7], 48, ([10, 11], True)),  # greedy stops early: the answer is complete there
    ([10, 20, 12, 99], 48, ([10, 20], False)),  # greedy leaves the example at position 4: what follows is open
    ([10, 11, 12, 99], 2, ([10, 11], True)),  # the token budget ends the answer
])
def test_agreed_answers_walk(picked, limit, known):
    example = {"input_ids": [1, 2, 3, 10, 11, 12, 99], "labels": [-100, -100, -100, 10, 11, 12, 99]}
    assert agreed_answers([[1, 2, 3]], [example], {0: picked}, {99}, limit) == {0: known}


def test_agreed_answers_needs_the_prompt_and_a_trained_start():
    example = {"input_ids": [1, 2, 3, 10, 11, 99], "labels": [-100, -100, -100, -100, 11, 99]}
    # prompt [1, 2]: its next position (3) is not trained, so nothing is known; prompt [5] starts no example
    assert agreed_answers([[1, 2], [5], [1, 2, 3, 10]], [example], {0: [11, 99]}, {99}, 48) == {2: ([11], True)}
