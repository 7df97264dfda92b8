"""``tunesmith export --gguf``: the merged model as a GGUF file for llama.cpp / Ollama, checked before it is kept.

The adapter is merged first (``merged_state_dict``, the merge ``tunesmith merge`` writes), the file is written
under a temporary name beside OUT (``gguf_file.py``), then read back and checked; only if every check passes is
it renamed to OUT, with a JSON summary of the checks beside it. A failed check or error leaves nothing at OUT.

Checks, against the run's own model and tokenizer:
- logits: the file read back through transformers' GGUF loader against the model as it ran (base plus
  adapter, unmerged: so a wrong merge fails here too), on fixed
  conversations rendered with the run's chat template; bounds per type in ``BOUNDS`` (mean KL divergence over
  positions, top-1 agreement, and for f16/bf16 the largest logit difference relative to the logits' spread);
- tokenizer: the tokenizer built from the file's metadata alone gives the run tokenizer's ids on ``TEXTS``
  (multilingual, emoji, code, whitespace runs, every special token, a rendered conversation);
- chat template: the stored template renders a conversation to the run's text;
- end token: the file's end-of-sequence token is the end-of-turn token the run trained on.

The 4- and 5-bit types fit each block of 32 weights to its values weighted by how much each input matters
(``quants.py``, ``calibrate.py``: the mean squared activations on calibration rows, the run's own training rows
where there is a run); the summary names the rows.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from tunesmith.errors import TunesmithError

# (mean KL ≤, top-1 agreement ≥, max |Δlogit| / logit std ≤ or None), from the embedded model's exports (README)
BOUNDS = {"f16": (1e-4, 0.98, 0.1), "bf16": (1e-3, 0.95, 0.5), "q8_0": (0.02, 0.93, None),
          "q5_1": (0.2, 0.75, None), "q5_0": (0.2, 0.75, None), "q4_1": (0.3, 0.7, None), "q4_0": (0.3, 0.7, None)}
LOW_BIT = ("q5_1", "q5_0", "q4_1", "q4_0")  # fitted with the inputs' importance (export/calibrate.py)
TEXTS = ["Hello, world!", "Grüße aus Köln — naïve café, Ωμέγα, Привет мир, 你好，世界, こんにちは, 안녕하세요",
         "emoji 👍🏽 🇫🇷 👩‍👩‍👧 ✨", "def f(x):\n\treturn x ** 2  # square\n", "    four spaces\n\n\n  and\ttabs\t\t",
         "numbers 1234567890 3.14159 -42 1e-9", "   leading and trailing   ", "JSON: {\"a\": [1, 2, {\"b\": null}]}"]
CONVERSATION = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name two colours."},
                {"role": "assistant", "content": "Red and blue."}, {"role": "user", "content": "Two more?"}]


def export_gguf(source: str, out: str | os.PathLike, *, adapter: str | None = None, kind: str = "f16",
                trust_remote_code: bool = False) -> dict:
    """Write ``source`` (a run dir, or a model with ``adapter``) merged, as GGUF at ``out``; the checks' summary."""
    from tunesmith.export.gguf_file import TYPES, architecture, pre_tokenizer, write_gguf
    from tunesmith.peft.merged import merged_state_dict

    if kind not in TYPES:
        raise TunesmithError(f"--type {kind!r}: one of {', '.join(TYPES)}")
    out = Path(out)
    if out.exists() or out.is_symlink():
        raise TunesmithError(f"{out} exists; choose another path or remove it")
    if not out.parent.is_dir():
        raise TunesmithError(f"{out.parent} is not a directory")
    model_config, adapter_dir = _source(source, adapter, trust_remote_code)
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_config.source, trust_remote_code=trust_remote_code) if Path(
        model_config.source).is_dir() else None
    if config is not None:
        architecture(config)  # refused by name before anything loads
    from tunesmith.models.build import build_model

    built = build_model(model_config.model_copy(update={"dtype": "fp32", "device": "cpu"}), adapter=adapter_dir)
    model, tokenizer = built.model, built.tokenizer
    architecture(model.config)
    pre_tokenizer(tokenizer)
    end_id = _end_of_turn(tokenizer)
    calibration, importance = None, None
    if kind in LOW_BIT:  # which inputs matter, for fitting the low-bit blocks (export/calibrate.py)
        from tunesmith.export.calibrate import calibration_rows, input_importance

        rows, origin = calibration_rows(source, tokenizer, trust_remote_code=trust_remote_code)
        importance = input_importance(model, rows)
        calibration = {"rows": len(rows), "source": origin}
    state = merged_state_dict(model)
    fd, temp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent)
    os.close(fd)
    temp = Path(temp)
    try:
        write_gguf(temp, state=state, config=model.config, tokenizer=tokenizer,
                   chat_template=tokenizer.chat_template or "", end_id=end_id, kind=kind,
                   name=Path(source).name, importance=importance)
        summary = check_gguf(temp, model, tokenizer, kind=kind, end_id=end_id)
        summary.update({"file": str(out), "type": kind, "source": str(source), "calibration": calibration,
                        "adapter": str(adapter_dir) if adapter_dir else None, "bytes": temp.stat().st_size})
        if not summary["passed"]:
            raise ExportCheckFailed(summary)
        os.replace(temp, out)
    finally:
        temp.unlink(missing_ok=True)
    from tunesmith.files import write_atomic

    write_atomic(Path(str(out) + ".json"), json.dumps(summary, indent=2) + "\n")
    return summary


def add_export_arguments(p) -> None:
    """``tunesmith export``'s flags."""
    p.add_argument("source", help="a run dir, or a model (with --adapter)")
    p.add_argument("--gguf", required=True, metavar="OUT.gguf")
    p.add_argument("--adapter", help="a PEFT adapter dir merged first (default: the run's)")
    p.add_argument("--type", default="f16", choices=["f16", "bf16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0"])
    p.add_argument("--json", action="store_true", help="print the checks' summary as JSON")


class ExportCheckFailed(TunesmithError):
    def __init__(self, summary: dict):
        failed = [name for name, check in summary["checks"].items() if not check["passed"]]
        super().__init__(f"the GGUF file failed its checks ({', '.join(failed)}); nothing was written")
        self.summary = summary


def _source(source: str, adapter: str | None, trust_remote_code: bool):
    from tunesmith.config_run import is_run_dir, load_run_config
    from tunesmith.models.build import model_from_flags

    path = Path(source)
    if is_run_dir(path):
        run = load_run_config(path, trust_remote_code=trust_remote_code)
        if (path / "model").is_dir():  # a full fine-tune: its model, with the run's template
            return run.model.model_copy(update={"source": str(path / "model")}), adapter
        return run.model, adapter or (str(path / "adapter") if (path / "adapter").is_dir() else None)
    return model_from_flags(source, trust_remote_code=trust_remote_code), adapter


def _end_of_turn(tokenizer) -> int:
    from tunesmith.templates import stop_token_ids

    stops = stop_token_ids(tokenizer)
    if not stops:
        raise TunesmithError("the tokenizer defines no end-of-turn token; a llama.cpp chat would never stop")
    return stops[0]


def check_gguf(path: Path, reference, tokenizer, *, kind: str, end_id: int) -> dict:
    """Read ``path`` back (transformers' GGUF loader) and run the module's checks against ``reference`` (the
    model as it ran: base plus adapter, which the merged model equals up to rounding); a summary with
    ``passed``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunesmith.templates import render_prompt

    from transformers import AutoConfig, LlamaConfig

    config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    if config.model_type == "mistral":  # transformers calls a llama-layout file "mistral" when its name says so,
        # then finds no tensor names for that architecture: read it as the llama layout it is
        config = LlamaConfig(**{k: v for k, v in config.to_dict().items() if k not in ("model_type", "architectures")})
    read = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, config=config,
                                                dtype=torch.float32).eval()
    own = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    checks = {}
    prompts = [render_prompt(tokenizer, CONVERSATION[:i]) for i in (2, 4)] + [
        tokenizer(text, add_special_tokens=False)["input_ids"] for text in TEXTS[:3]]
    kl, agree, spread = [], [], []
    with torch.no_grad():
        for ids in prompts:
            ids = torch.tensor([ids])
            expected, got = reference(input_ids=ids).logits[0].float(), read(input_ids=ids).logits[0].float()
            log_p, log_q = expected.log_softmax(-1), got.log_softmax(-1)
            kl += (log_p.exp() * (log_p - log_q)).sum(-1).tolist()
            agree += (expected.argmax(-1) == got.argmax(-1)).tolist()
            spread.append(float((expected - got).abs().max() / expected.std()))
    kl_bound, top1_bound, spread_bound = BOUNDS[kind]
    mean_kl, top1 = sum(kl) / len(kl), sum(agree) / len(agree)
    checks["logits"] = {"positions": len(kl), "mean_kl": mean_kl, "top1_agreement": top1,
                        "max_abs_diff_over_std": max(spread), "bounds": {"mean_kl": kl_bound, "top1": top1_bound,
                                                                          "max_abs_diff_over_std": spread_bound},
                        "passed": mean_kl <= kl_bound and top1 >= top1_bound and (
                            spread_bound is None or max(spread) <= spread_bound)}
    rendered = tokenizer.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True)
    texts = TEXTS + ["".join(str(t) for t in tokenizer.all_special_tokens), rendered]
    mismatched = [text[:40] for text in texts if own(text, add_special_tokens=False)["input_ids"]
                  != tokenizer(text, add_special_tokens=False)["input_ids"]]
    checks["tokenizer"] = {"texts": len(texts), "mismatched": mismatched, "passed": not mismatched}
    try:
        stored = own.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True)
    except Exception as error:  # a template that does not render is a failed check, reported as such
        stored = f"<cannot render: {type(error).__name__}: {error}>"
    checks["chat_template"] = {"same_text": stored == rendered, "passed": stored == rendered}
    file_eos = own.eos_token_id
    checks["end_token"] = {"eos_token_id": file_eos, "end_of_turn_id": end_id,
                           "token": tokenizer.convert_ids_to_tokens(end_id), "passed": file_eos == end_id}
    return {"passed": all(check["passed"] for check in checks.values()), "checks": checks}


def summary_line(summary: dict) -> str:
    logits, checks = summary["checks"]["logits"], summary["checks"]
    return (f"wrote {summary['file']} ({summary['type']}, {summary['bytes'] / 2**20:.1f} MiB); checks passed: logits "
            f"mean KL {logits['mean_kl']:.2e}, top-1 {logits['top1_agreement']:.1%}; tokenizer "
            f"{checks['tokenizer']['texts']} texts; chat template; end token {checks['end_token']['token']}. "
            f"Summary: {summary['file']}.json")
