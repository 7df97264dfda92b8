"""``tunesmith merge``: fold a LoRA adapter into its base and write a plain Hugging Face model dir.

The output loads with ``AutoModelForCausalLM.from_pretrained`` and no tunesmith code: safetensors shards,
config, and the tokenizer with the chat template used in training. Every merge is checked: held-out
conversations run through (base + adapter) and through the merged model as saved, and the logit differences
and KL divergence are printed and written to ``merge_check.json`` in the output dir.

A QLoRA adapter was trained against dequant(NF4(W)), not W. By default it is merged into the original 16-bit
weights (reloaded from the source) — the usual choice, as the 4-bit rounding is not baked into the result;
``merge_base="dequantized"`` merges into dequant(NF4(W)) instead, which reproduces the trained function.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from tunesmith.config import DataConfig, ModelConfig, RunConfig
from tunesmith.config_run import is_run_dir, load_run_config
from tunesmith.data.pipeline import prepare
from tunesmith.data.tokenize import TokenizeOptions
from tunesmith.errors import TunesmithError
from tunesmith.models.build import build_model, quant_spec
from tunesmith.models.load import resolve_dtype
from tunesmith.peft.io import CONFIG_NAME, WEIGHTS_NAME
from tunesmith.peft.merged import merged_state_dict
from tunesmith.quant.bnb import (QuantSpec, dequantized_weight, is_quantized, keep_training_numerics, quantize_model,
                                 quiet_bitsandbytes_import)


def _resolve(source: str, trust_remote_code: bool) -> tuple[Path, RunConfig | None]:
    """The adapter dir and, for a run dir (or a run's adapter/), the run's config (``load_run_config``)."""
    path = Path(source)
    if is_run_dir(path) and (path / "adapter").is_dir():
        return path / "adapter", load_run_config(path, trust_remote_code=trust_remote_code)
    if is_run_dir(path) and (path / "model").is_dir():
        raise TunesmithError(f"{path} is a full fine-tuning run: {path / 'model'} is already a plain model dir")
    if not path.is_dir():
        raise TunesmithError(f"{source} is neither a run dir nor an adapter dir")
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not (path / name).is_file():
            raise TunesmithError(f"{path / name} is missing: an adapter dir holds {CONFIG_NAME} and {WEIGHTS_NAME}")
    return path, (load_run_config(path.parent, trust_remote_code=trust_remote_code) if is_run_dir(path.parent)
                  else None)


def _dequantize_in_place(model: torch.nn.Module, spec: QuantSpec) -> None:
    """Replace the linear layers by dense ones holding dequant(quant(W)): the base a QLoRA adapter saw."""
    quantize_model(model, spec)
    for name, module in list(model.named_modules()):
        if isinstance(module, torch.nn.Linear) and is_quantized(module):
            dense = torch.nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
            dense.weight = torch.nn.Parameter(dequantized_weight(module).float(), requires_grad=False)
            if module.bias is not None:
                dense.bias = torch.nn.Parameter(module.bias.data.float(), requires_grad=False)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, dense)


def logit_agreement(reference, candidate, batches: list[dict]) -> dict:
    """Max / mean absolute logit difference and mean KL(reference ‖ candidate) per token.

    The KL is computed in float64 from log-softmax and each token's value is clamped at 0: KL is never negative,
    but for near-identical distributions (an exact fp32 merge) rounding leaves values like -1e-9, which would
    read as a nonsensical negative divergence.
    """
    max_abs, abs_sum, kl_sum, count = 0.0, 0.0, 0.0, 0
    with torch.no_grad():
        for batch in batches:
            ref = reference(input_ids=batch).logits.double()
            out = candidate(input_ids=batch).logits.double()
            diff = (ref - out).abs()
            max_abs = max(max_abs, float(diff.max()))
            abs_sum += float(diff.mean(dim=-1).sum())
            ref_logp, out_logp = ref.log_softmax(-1), out.log_softmax(-1)
            kl = (ref_logp.exp() * (ref_logp - out_logp)).sum(-1)
            kl_sum += float(kl.clamp(min=0).sum())
            count += ref.shape[0] * ref.shape[1]
    return {"max_abs_logit_diff": max_abs, "mean_abs_logit_diff": abs_sum / count, "mean_kl": kl_sum / count,
            "tokens": count}


def _claim_output(out_dir: Path) -> Path:
    """Check ``--out`` and make the temporary dir beside it that the merge is written into, then renamed."""
    if out_dir.exists() and not out_dir.is_dir():
        raise TunesmithError(f"--out {out_dir} is an existing file; give a directory that does not exist or is empty")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        raise TunesmithError(f"--out {out_dir} already exists and is not empty; choose another --out")
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-partial-", dir=out_dir.parent))
    except OSError as exc:
        raise TunesmithError(f"cannot write --out {out_dir}: {exc.strerror} ({exc.filename}); choose a directory "
                             "you can write to") from exc


def _base_model_name(adapter_dir: Path) -> str | None:
    path = adapter_dir / CONFIG_NAME
    try:
        adapter_config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TunesmithError(f"cannot read adapter config {path}: {exc}") from exc
    return adapter_config.get("base_model_name_or_path") if isinstance(adapter_config, dict) else None


def merge(source: str, out: str, *, dtype: str = "bf16", quantize: str | None = None,
          merge_base: str = "original", base: str | None = None, data: str | None = None,
          check_rows: int = 8, trust_remote_code: bool = False) -> dict:
    """Merge ``source`` (a run dir or an adapter dir) into its base and write the result to ``out``.

    ``trust_remote_code`` comes only from the caller (the command line), never from a run dir's config.yaml:
    a config file that someone else wrote must not be able to turn on running the model dir's own code.
    The result is built in a temporary dir beside ``out`` and renamed into place at the end; on any failure
    the temporary dir is removed, so ``out`` holds a whole merged model or nothing.
    """
    if check_rows < 1:
        raise TunesmithError(f"--check-rows must be at least 1, got {check_rows}: every merge is checked on "
                             "held-out rows")
    adapter_dir, run_config = _resolve(source, trust_remote_code)
    base = base or (run_config.model.source if run_config else None) or _base_model_name(adapter_dir)
    if not base:
        raise TunesmithError(f"{adapter_dir / CONFIG_NAME} names no base model; pass --base")
    method = run_config.method.name if run_config else "lora"
    if merge_base == "dequantized" and method != "qlora":
        raise TunesmithError("--merge-base dequantized is for QLoRA adapters; this adapter was trained with "
                             f"method {method!r} on the original weights")
    if quantize not in (None, "nf4"):
        raise TunesmithError(f"--quantize supports nf4, got {quantize!r}")
    target_dtype = resolve_dtype(dtype, torch.device("cpu"))
    out_dir = Path(out)
    tmp = _claim_output(out_dir)

    # merged in full precision on the CPU, with the run's template; the caller's flag alone permits remote code
    model = ModelConfig(source=base, template=run_config.model.template if run_config else None, dtype="fp32",
                        device="cpu", trust_remote_code=trust_remote_code)
    cpu = torch.device("cpu")
    # "dequantized" is refused above without a QLoRA run's config
    dequantize = ((lambda dense: _dequantize_in_place(dense, quant_spec(run_config.quant, cpu)))
                  if merge_base == "dequantized" else None)

    try:
        built = build_model(model, adapter=adapter_dir, adjust=dequantize)
        tokenizer, adapted = built.tokenizer, built.model
        if method == "qlora" and merge_base == "original":
            print(f"merging the QLoRA adapter into the original weights of {base} (reloaded in full precision), "
                  "not into the 4-bit weights it was trained against; --merge-base dequantized reproduces the "
                  "trained function exactly")

        # the merged model: a fresh base with the merged weights, in the requested dtype
        merged = build_model(model, adjust=dequantize, tokenizer=tokenizer).model
        merged.load_state_dict(merged_state_dict(adapted))
        merged.to(target_dtype)
        merged.save_pretrained(tmp, max_shard_size="2GB")
        tokenizer.save_pretrained(tmp)
        del merged

        from transformers import AutoModelForCausalLM

        heldout = data or (run_config.data.eval if run_config else None) or "builtin:test"
        # the run's own tokenization (template policies, max_length) when merging a run, else the defaults
        options = TokenizeOptions.from_config(run_config.data if run_config else DataConfig())
        examples = prepare(heldout, tokenizer, options, require_trained=False).examples
        batches = [torch.tensor([ex["input_ids"]]) for ex in examples[:check_rows]]
        reloaded = AutoModelForCausalLM.from_pretrained(tmp, dtype=target_dtype,
                                                        trust_remote_code=trust_remote_code).eval()
        check = {"base": base, "adapter": str(adapter_dir), "method": method, "merge_base": merge_base,
                 "dtype": str(target_dtype).replace("torch.", ""), "data": heldout,
                 "merged": logit_agreement(adapted, reloaded, batches)}
        del reloaded
        if quantize:
            check["quantized"] = _write_quantized(tmp, adapted, batches, trust_remote_code)
        (tmp / "merge_check.json").write_text(json.dumps(check, indent=1))
        tmp.chmod(0o755)  # mkdtemp makes it private; the result is an ordinary dir
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # never leave a half-written model behind
        raise
    return check


def _write_quantized(model_dir: Path, reference, batches, trust_remote_code: bool) -> dict:
    """Reload the merged weights quantized (bitsandbytes NF4 + double quantization) and save that instead."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quiet_bitsandbytes_import()  # transformers imports bitsandbytes for this load
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=config, device_map="cpu",
                                                 trust_remote_code=trust_remote_code).eval()
    keep_training_numerics(model)
    agreement = logit_agreement(reference, model, batches)
    for shard in model_dir.glob("model*.safetensors*"):
        shard.unlink()
    model.save_pretrained(model_dir)
    return agreement
