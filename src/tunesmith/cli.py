"""The ``tunesmith`` command: parse arguments, then call one function per verb."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import warnings
from pathlib import Path

from tunesmith.config_limits import SEED_MAX
from tunesmith.errors import TunesmithError, capped
from tunesmith.export import add_export_arguments
from tunesmith.plan.cli import add_estimate_arguments
from tunesmith.serve.launch import add_serve_arguments
from tunesmith.launch import launch_torchrun


class _Parser(argparse.ArgumentParser):
    """argparse, except that a bad argument is one ``error:`` line (exit status 2), as every other user error."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def _number(cast, allowed, wanted: str):
    """An argparse ``type`` that parses with ``cast`` and refuses values for which ``allowed`` is false."""
    def parse(text: str):
        try:
            value = cast(text)
        except ValueError:
            value = None
        if value is None or not allowed(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not {wanted}")
        return value

    return parse


# NaN fails every comparison, so each float check below refuses it; infinity is refused by isfinite.
_TEMPERATURE = _number(float, lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0 (0 = greedy)")
_TOP_P = _number(float, lambda v: 0 < v <= 1, "a number in (0, 1]")
_POSITIVE = _number(int, lambda v: v > 0, "a whole number > 0")
_NON_NEGATIVE = _number(int, lambda v: v >= 0, "a whole number >= 0")
_SEED = _number(int, lambda v: 0 <= v <= SEED_MAX, f"a whole number from 0 to {SEED_MAX}")


def _trust_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trust-remote-code", action="store_true",
                   help="let the model run Python code shipped with it; no config file can turn this on")


def _sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--temperature", type=_TEMPERATURE, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=_TOP_P, default=1.0)
    p.add_argument("--top-k", type=_NON_NEGATIVE, default=0, help="sample among the k most likely (0: all)")
    p.add_argument("--max-tokens", type=_POSITIVE, default=256)
    p.add_argument("--seed", type=_SEED, default=0)
    p.add_argument("--system", help="system prompt")
    p.add_argument("--reasoning", choices=["on", "off"], help="reasoning mode, for templates that have one")
    p.add_argument("--template", help="built-in template (chatml, zephyr, llama3) for models without one")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--device", default="auto")
    _trust_arg(p)


def _data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="default", help="model whose tokenizer and template are used")
    p.add_argument("--format", help="override the detected format")
    p.add_argument("--split", help="split of a saved or hub dataset")
    p.add_argument("--template")
    p.add_argument("--max-length", type=_POSITIVE, default=1024)
    p.add_argument("--overlength", choices=["truncate", "drop", "error"], default="truncate")
    p.add_argument("--invalid-rows", choices=["error", "drop"], default="error")
    p.add_argument("--train-on", choices=["all", "last"], default="all")
    p.add_argument("--reasoning", choices=["on", "off"])
    _mask_args(p)
    _trust_arg(p)


def _mask_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--append-eos", action="store_true",
                   help="train the tokenizer's EOS after each answer (for templates with no end-of-turn marker)")
    p.add_argument("--control-tokens", choices=["refuse", "allow"], default="refuse",
                   help="a message holding a control token such as <|im_end|>: refuse the row (default) or allow it")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="tunesmith", description="Fine-tune open causal language models.")
    verbs = parser.add_subparsers(dest="verb", required=True)

    p = verbs.add_parser("template", help="render a conversation and show which tokens are trained")
    p.add_argument("--model", default="default")
    p.add_argument("--messages", required=True, help="JSON file: a list of messages or {\"messages\": [...]}")
    p.add_argument("--template")
    p.add_argument("--train-on", choices=["all", "last"], default="all")
    p.add_argument("--reasoning", choices=["on", "off"])
    _mask_args(p)
    p.add_argument("--no-color", action="store_true", help="mark trained text as [[...]] instead of colour")
    _trust_arg(p)

    data = verbs.add_parser("data", help="dataset tools").add_subparsers(dest="data_verb", required=True)
    p = data.add_parser("inspect", help="validate a dataset and summarise rows, lengths and trained tokens")
    p.add_argument("dataset")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    _data_args(p)

    p = verbs.add_parser("chat", help="chat with a model, one-shot (--prompt) or interactive")
    p.add_argument("--model", default="default")
    p.add_argument("--adapter", help="a LoRA adapter dir (PEFT format)")
    p.add_argument("--prompt")
    _sampling_args(p)

    p = verbs.add_parser("compare", help="the same prompt through two models, side by side")
    p.add_argument("--model", action="append", required=True, help="give twice")
    p.add_argument("--prompt", required=True)
    p.add_argument("--width", type=_POSITIVE)
    _sampling_args(p)

    p = verbs.add_parser("train", help="fine-tune; with no config, the built-in default recipe")
    p.add_argument("--config", help="a YAML config (see configs/)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its newest complete checkpoint")
    p.add_argument("--gpus", type=_POSITIVE, metavar="N",
                   help="train data-parallel on N CUDA GPUs of this machine (starts N processes with torchrun)")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value")
    _trust_arg(p)

    p = verbs.add_parser("eval", help="held-out loss / perplexity, and scored greedy answers (built-in task, "
                                      "or any data with --generate); a run dir is evaluated with its own settings")
    p.add_argument("target", metavar="RUN_DIR_OR_MODEL")
    p.add_argument("--adapter", help="a LoRA adapter dir to apply to the model")
    p.add_argument("--data", help="held-out dataset (default: the run's eval data, else builtin:test)")
    p.add_argument("--generate", action="store_true",
                   help="score greedy answers to each row's last assistant turn (or completion): exact match, and "
                        "valid-JSON rate and per-field accuracy for JSON answers")
    p.add_argument("--task-rows", type=_NON_NEGATIVE,
                   help="rows scored by generation (default: the run's eval.task_rows, else 100)")
    p.add_argument("--max-new-tokens", type=_POSITIVE, help="longest generated answer (default: the run's, else 48)")
    p.add_argument("--whole-answers", action="store_true",
                   help="generate every answer to its end, not only until its score can no longer change "
                        "(eval.stop_settled=false)")
    p.add_argument("--max-length", type=_POSITIVE, help="default: the run's data.max_length, else 512")
    p.add_argument("--template")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    _trust_arg(p)

    p = verbs.add_parser("serve", help="an OpenAI-compatible server for a model and many LoRA adapters")
    add_serve_arguments(p, _NON_NEGATIVE, _POSITIVE)
    _trust_arg(p)

    p = verbs.add_parser("export", help="write the merged model as a GGUF file for llama.cpp / Ollama, checked")
    add_export_arguments(p)
    _trust_arg(p)

    p = verbs.add_parser("estimate", help="predict a training config's peak GPU memory; --fit picks settings that fit")
    add_estimate_arguments(p, _POSITIVE)
    _trust_arg(p)

    p = verbs.add_parser("merge", help="fold a LoRA/QLoRA adapter into its base; write a plain HF model dir")
    p.add_argument("source", metavar="RUN_DIR_OR_ADAPTER")
    p.add_argument("--out", required=True, help="output dir (must not exist or be empty)")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--quantize", choices=["nf4"], help="save the merged model in 4 bits (bitsandbytes NF4 + DQ)")
    p.add_argument("--merge-base", choices=["original", "dequantized"], default="original",
                   help="QLoRA: merge into the original weights (default) or into dequant(NF4) ones")
    p.add_argument("--base", help="base model (default: the run's or the adapter's)")
    p.add_argument("--data", help="held-out data for the quality check (default: the run's eval data)")
    p.add_argument("--check-rows", type=_POSITIVE, default=8)
    p.add_argument("--json", action="store_true")
    _trust_arg(p)

    quant = verbs.add_parser("quantize", help="quantization tools").add_subparsers(dest="quant_verb", required=True)
    p = quant.add_parser("report", help="memory, reconstruction error and perplexity at each precision")
    p.add_argument("--model", default="default")
    p.add_argument("--data", default="builtin:test", help="held-out data for perplexity")
    p.add_argument("--rows", type=_POSITIVE, default=32, help="held-out rows for perplexity")
    p.add_argument("--json", action="store_true")
    _trust_arg(p)

    p = verbs.add_parser("bench", help="training speed on this GPU: a random-init model of a real shape, beside TRL "
                         "and Unsloth when installed; one JSON line per run")
    p.add_argument("--shape", choices=["tinyllama", "smol3b", "llama8b", "tiny"], default="tinyllama",
                   help="tiny: a CPU smoke test of the harness")
    p.add_argument("--method", choices=["lora", "qlora"], default="qlora", help="llama8b always runs LoRA, packed")
    p.add_argument("--runs", help="comma-separated: ts_recipe, ts_fast (ts_pack for llama8b), trl, unsloth, and "
                   "--extra names (default: every run whose stack is installed)")
    p.add_argument("--steps", type=_POSITIVE, default=20, help="optimizer steps per run")
    p.add_argument("--tokenizer", help="a tokenizer dir (default: the embedded model's)")
    p.add_argument("--baselines", help="the dir holding trl_baseline.py, trl_lora_rank.py and unsloth_probe.py")
    p.add_argument("--extra", action="append", default=[], metavar="NAME=key=value,...",
                   help="another tunesmith run: ts_fast (ts_recipe when NAME starts with ts_recipe; ts_pack "
                   "for llama8b) plus these overrides")
    p.add_argument("--work", help="where models and runs go (default: $TMPDIR)")
    p.add_argument("--timeout", type=_POSITIVE, default=900, help="seconds per run")

    p = verbs.add_parser("demo", help="the default job: tune the embedded model on the built-in task, before/after")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="changes to the default recipe")
    _trust_arg(p)
    return parser


def _read_messages(path: str) -> list[dict]:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TunesmithError(f"{path}: no such file") from None
    except UnicodeDecodeError as exc:
        raise TunesmithError(f"{path}: not UTF-8 text (byte {exc.start}); re-save it as UTF-8") from None
    except (json.JSONDecodeError, RecursionError) as exc:
        raise TunesmithError(f"{path}: not valid JSON ({exc})") from None
    except OSError as exc:
        raise TunesmithError(f"{path}: cannot read it ({exc.strerror})") from None
    messages = data.get("messages") if isinstance(data, dict) else data
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise TunesmithError(f"{path}: expected a list of messages or an object with a 'messages' list")
    from tunesmith.data.formats import checked_conversation
    from tunesmith.data.validate import InvalidRow

    try:
        return checked_conversation(messages)
    except InvalidRow as problem:
        raise TunesmithError(f"{path}: {problem}; fix the conversation") from None


def cmd_template(args) -> None:
    from tunesmith.data.tokenize import mask_note_line
    from tunesmith.data.validate import InvalidRow, check_control_tokens
    from tunesmith.models import load_tokenizer
    from tunesmith.mask_view import mask_view
    from tunesmith.templates import control_tokens, render, use_template

    messages = _read_messages(args.messages)
    tokenizer = load_tokenizer(args.model, trust_remote_code=args.trust_remote_code)
    use_template(tokenizer, args.template)
    if args.control_tokens == "refuse":
        try:
            check_control_tokens(messages, control_tokens(tokenizer), "conversation")
        except InvalidRow as problem:
            raise TunesmithError(f"{args.messages}: {problem}") from None
    examples = render(tokenizer, messages, train_on=args.train_on, reasoning=args.reasoning,
                      append_eos=args.append_eos)
    for i, rendered in enumerate(examples):
        if len(examples) > 1:
            print(f"== example {i + 1} of {len(examples)} (the template rewrites history) ==")
        print(mask_view(rendered, color=not args.no_color))
        for note, count in rendered.notes.items():
            print(f"note: {mask_note_line(note, count)}")


def cmd_data_inspect(args) -> None:
    from tunesmith.data.pipeline import format_inspection, inspection, prepare
    from tunesmith.data.tokenize import TokenizeOptions, mask_note_line
    from tunesmith.models import load_tokenizer
    from tunesmith.templates import use_template

    tokenizer = load_tokenizer(args.model, trust_remote_code=args.trust_remote_code)
    use_template(tokenizer, args.template)
    options = TokenizeOptions(max_length=args.max_length, overlength=args.overlength, train_on=args.train_on,
                              reasoning=args.reasoning, append_eos=args.append_eos,
                              control_tokens=args.control_tokens)
    with warnings.catch_warnings():  # the mask notes are part of the report here
        warnings.simplefilter("ignore")
        prepared = prepare(args.dataset, tokenizer, options, fmt=args.format, invalid_rows=args.invalid_rows,
                           split=args.split, require_trained=False)
    report = inspection(prepared)
    report["mask_notes"] = prepared.tokenized.mask_notes
    if args.json:
        print(json.dumps(report))
        return
    print(format_inspection(report))
    for note, count in report["mask_notes"].items():
        print(f"masks         {mask_note_line(note, count)}")


def _chat_options(args):
    from tunesmith.chat import ChatOptions
    from tunesmith.generate import SamplingConfig

    sampling = SamplingConfig(max_new_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                              top_k=args.top_k, seed=args.seed)
    return ChatOptions(system=args.system, reasoning=args.reasoning, sampling=sampling)


def cmd_chat(args) -> None:
    from tunesmith.chat import chat, load_for_chat

    loaded = load_for_chat(args.model, adapter=args.adapter, template=args.template, dtype=args.dtype,
                           device=args.device, trust_remote_code=args.trust_remote_code)
    chat(loaded, _chat_options(args), prompt=args.prompt)


def cmd_compare(args) -> None:
    from tunesmith.chat import compare

    if len(args.model) != 2:
        raise TunesmithError("compare needs exactly two --model arguments")
    print(compare(args.model, args.prompt, _chat_options(args), template=args.template, dtype=args.dtype,
                  device=args.device, width=args.width, trust_remote_code=args.trust_remote_code))


def cmd_train(args) -> None:
    import contextlib

    from tunesmith.train.dist import SharedError, launched_by_torchrun, on_rank0, process_group

    if args.gpus:
        return launch_torchrun(args)
    # Under torchrun every rank parses the same config: an error there is printed once, by rank 0
    quiet_rank = launched_by_torchrun() and os.environ.get("RANK", "0") != "0"
    try:
        config = _train_config(args)
    except TunesmithError:
        if quiet_rank:
            raise SystemExit(2) from None
        raise
    from tunesmith.recipes import dpo, sft

    recipe = dpo if config.method.objective == "dpo" else sft
    with process_group(config.model.device) as world:
        # a run without a name is named by the time it starts: rank 0's time, for every rank
        config = config.model_copy(update={"name": on_rank0(lambda: config.with_run_name().name, world)})
        # rank 0 alone prints progress and results; errors (stderr) come from whichever rank meets them
        with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull if not world.main else sys.stdout):
            try:
                recipe.run(config, resume=bool(args.resume))
            except SharedError:
                if world.main:
                    raise
                raise SystemExit(2) from None


def _train_config(args):
    from tunesmith.config import load_config
    from tunesmith.config_run import load_run_config

    trust = args.trust_remote_code
    if args.resume:
        if args.config:
            raise TunesmithError("--resume takes the run's own config.yaml; drop --config")
        return load_run_config(args.resume, args.overrides, trust_remote_code=trust)
    return load_config(args.config, args.overrides, trust_remote_code=trust)


def cmd_eval(args) -> None:
    from tunesmith.eval.cli import format_eval, run_eval

    report = run_eval(args.target, adapter=args.adapter, data=args.data, task_rows=args.task_rows,
                      max_length=args.max_length, template=args.template, generate=args.generate,
                      max_new_tokens=args.max_new_tokens, whole_answers=args.whole_answers,
                      trust_remote_code=args.trust_remote_code)
    print(json.dumps(report) if args.json else format_eval(report))


def cmd_serve(args) -> None:
    from tunesmith.serve.launch import serve

    serve(args)


def cmd_export(args) -> None:
    from tunesmith.export import ExportCheckFailed, export_gguf, summary_line

    try:
        summary = export_gguf(args.source, args.gguf, adapter=args.adapter, kind=args.type,
                              trust_remote_code=args.trust_remote_code)
    except ExportCheckFailed as error:
        print(json.dumps(error.summary, indent=2))
        raise
    print(json.dumps(summary) if args.json else summary_line(summary))


def cmd_merge(args) -> None:
    from tunesmith.merge import merge

    check = merge(args.source, args.out, dtype=args.dtype, quantize=args.quantize, merge_base=args.merge_base,
                  base=args.base, data=args.data, check_rows=args.check_rows, trust_remote_code=args.trust_remote_code)
    if args.json:
        print(json.dumps(check))
        return
    print(f"merged {check['adapter']} into {check['base']} ({check['merge_base']} weights) -> {args.out} "
          f"[{check['dtype']}]")
    for name in ("merged", "quantized"):
        if name in check:
            c = check[name]
            print(f"  {name:<10} max |Δlogit| {c['max_abs_logit_diff']:.3g}  mean |Δlogit| "
                  f"{c['mean_abs_logit_diff']:.3g}  mean KL {c['mean_kl']:.3g}  ({c['tokens']} tokens)")
    print(f"  quality check saved to {Path(args.out) / 'merge_check.json'}")


def cmd_quantize(args) -> None:
    from tunesmith.quant.report import format_report, quantization_report

    report = quantization_report(args.model, data=args.data, rows=args.rows,
                                 trust_remote_code=args.trust_remote_code)
    print(json.dumps(report) if args.json else format_report(report))


def cmd_bench(args) -> None:
    from tunesmith.bench import bench_command

    bench_command(args)


def cmd_estimate(args) -> None:
    from tunesmith.plan.cli import run_estimate

    run_estimate(args)


def cmd_demo(args) -> None:
    from tunesmith.demo import run_demo

    run_demo(args.overrides, trust_remote_code=args.trust_remote_code)


COMMANDS = {"template": cmd_template, "chat": cmd_chat, "compare": cmd_compare, "train": cmd_train,
            "eval": cmd_eval, "demo": cmd_demo, "bench": cmd_bench, "merge": cmd_merge, "quantize": cmd_quantize,
            "serve": cmd_serve, "export": cmd_export, "estimate": cmd_estimate}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # key=value overrides after an option (``estimate a=1 --gpus 2 b=2``) are overrides too, in order
        if not hasattr(args, "overrides") or any("=" not in item or item.startswith("-") for item in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    # the hub library's per-file download and shard-loading bars tell a user of local models nothing; set before
    # transformers is first imported (every verb imports it lazily), and a user's own setting wins
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    command = cmd_data_inspect if args.verb == "data" else COMMANDS[args.verb]
    try:
        command(args)
    except TunesmithError as exc:
        print(f"error: {capped(str(exc))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
