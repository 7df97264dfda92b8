"""A run's setup: tokenizer and data (refused early when they cannot train), the model (QLoRA: its base in 4
bits), what trains, then the run dir; ``RunSetup`` carries them to the engine (``train_input``) and the
finish."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import torch

from tunesmith.config import RunConfig
from tunesmith.data.builtin import BUILTIN_NAME
from tunesmith.data.pipeline import PreparedData, prepare
from tunesmith.data.tokenize import TokenizeOptions
from tunesmith.errors import TunesmithError
from tunesmith.eval.evaluate import generation_rows
from tunesmith.eval.task import AnswerRow
from tunesmith.models.build import build_model, build_tokenizer
from tunesmith.models.load import resolve_path
from tunesmith.peft import LoRAConfig, adapter_parameters, freeze_base, inject_lora, load_adapter
from tunesmith.quant.bnb import QuantizedModel
from tunesmith.recipes.run_dir import claim_run_dir
from tunesmith.train.dist import current
from tunesmith.train.engine import Objective, TrainInput
from tunesmith.train.graphs import choose_graphs
from tunesmith.train.kernels import check_kernels, set_blas_workspace
from tunesmith.train.layout import Layout, choose_layout
from tunesmith.train.products import choose_products


@dataclass
class RunSetup:
    config: RunConfig
    run_dir: Path
    tokenizer: object
    model: torch.nn.Module
    device: torch.device
    dtype: torch.dtype
    train: PreparedData
    eval: PreparedData | None
    eval_rows: list[AnswerRow] | None  # held-out rows whose greedy answers are scored (see generation_rows)
    fingerprints: dict
    resume: bool  # False also when a --resume found no checkpoint and starts the run over
    lock: IO  # the open lock file: the run dir is ours while it stays open (see hold_run_dir)
    drops: dict  # "train" / "eval" → PreparedData.drops()
    params: list[torch.nn.Parameter]  # what trains: the adapters over a frozen base, or every weight (full)
    quantization: QuantizedModel | None = None
    layout: Layout | None = None  # the training layout (train/layout.py): chosen here, installed by the engine
    graphs: dict | None = None  # train/graphs.py's choice (the engine's result adds what it recorded)
    blas_workspace: dict | None = None  # train/kernels.py's set_blas_workspace (summary.json's "blas_workspace")
    plan: dict | None = None  # plan: auto's choice (plan/fit.py; summary.json's "plan")
    products: dict | None = None  # train/products.py's choice (forward and backward), installed by the engine

    @property
    def lora_config(self) -> LoRAConfig:
        return LoRAConfig.from_config(self.config.lora)

    def train_input(self, objective: Objective, *, on_micro_batch=None) -> TrainInput:
        """What the engine needs of this setup to train its parameters on ``objective``."""
        return TrainInput(config=self.config, run_dir=self.run_dir, model=self.model, params=self.params,
                          objective=objective, device=self.device, dtype=self.dtype, layout=self.layout,
                          graphs=self.graphs, fingerprints=self.fingerprints, resume=self.resume,
                          products=self.products, on_micro_batch=on_micro_batch)


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def _model_fingerprint(source: str) -> str:
    path = Path(resolve_path(source))
    if not path.is_dir():
        return _digest(source)
    files = sorted(p for p in path.iterdir() if p.suffix in (".json", ".safetensors"))
    return _digest([(p.name, p.stat().st_size, p.read_text() if p.name == "config.json" else "") for p in files])


def report_drops(data: PreparedData) -> dict:
    """Print the rows ``data`` dropped, by reason with the first row (or line) numbers; return ``data.drops()``."""
    drops = data.drops()
    if drops["count"]:
        reasons = ", ".join(f"{d['count']} × {reason}" for reason, d in drops["by_reason"].items())
        print(f"{data.name}: {drops['count']} of {data.rows} rows dropped ({reasons})")
        for reason, d in drops["by_reason"].items():
            more = ", …" if d["count"] > len(d["first"]) else ""
            unit = drops["unit"] + ("s" if d["count"] > 1 else "")
            print(f"  {reason}: {unit} {', '.join(map(str, d['first']))}{more}")
    return drops


def _check_objective(config: RunConfig, data: PreparedData) -> None:
    """Preference pairs train with DPO and only with DPO; say which setting fixes a mismatch."""
    pairs = data.normalised.format == "preference"
    if config.method.objective == "dpo" and not pairs:
        raise TunesmithError(f"method.objective=dpo needs preference data (prompt/chosen/rejected columns), but "
                             f"{data.name} is in {data.normalised.format} format; the built-in pairs are "
                             f"data.train={BUILTIN_NAME}-preference data.eval={BUILTIN_NAME}-preference:test")
    if config.method.objective == "sft" and pairs:
        raise TunesmithError(f"{data.name} holds preference pairs (prompt/chosen/rejected); train on them with "
                             "method.objective=dpo")


def _example_key(example: dict) -> tuple:
    if "chosen" in example:
        return (_example_key(example["chosen"]), _example_key(example["rejected"]))
    return (example["input_ids"], example["labels"])


def prepare_run(config: RunConfig, *, resume: bool, adjust_model=None, adapter: Path | None = None) -> RunSetup:
    """Tokenizer, data (refused early when nothing is trained, or when its kind does not fit the objective),
    then the model and what trains in it (a fresh adapter, or ``adapter`` to continue), then the run dir (locked:
    run the rest inside ``hold_run_dir(setup)``); ``adjust_model(model)`` may change the dense weights before a
    QLoRA base is quantized. Everything that can fail on the user's input fails before the dir is claimed.
    With ``plan: auto`` the settings that fit the GPU replace the config's first (plan/fit.py)."""
    plan = None
    if config.plan.mode == "auto":
        from tunesmith.plan.fit import plan_run

        config, plan = plan_run(config, gpus=current().size)
        print(plan.line())
    tokenizer = build_tokenizer(config.model)
    options = TokenizeOptions.from_config(config.data)
    train = prepare(config.data.train, tokenizer, options, fmt=config.data.format,
                    invalid_rows=config.data.invalid_rows, split=config.data.split,
                    sample=config.data.sample_rows, seed=config.seed)
    _check_objective(config, train)
    if config.data.batching == "pack" and config.data.token_budget:
        train.check_token_budget(config.data.token_budget)
    heldout, rows = None, None
    if config.data.eval:
        heldout = prepare(config.data.eval, tokenizer, options, fmt=config.data.format,
                          invalid_rows=config.data.invalid_rows)
        _check_objective(config, heldout)
        if config.eval.loss_rows is not None:
            heldout.tokenized.examples = heldout.tokenized.examples[:config.eval.loss_rows]
        rows = generation_rows(config)
    drops = {"train": report_drops(train), "eval": report_drops(heldout) if heldout is not None else None}
    blas = set_blas_workspace(config.train)  # before the model's first matrix product
    built = build_model(config.model, quant=config.quant if config.method.name == "qlora" else None,
                        adjust=adjust_model, tokenizer=tokenizer)
    layout = choose_layout(built.model, built.device, requested=config.train.layout, batching=config.data.batching,
                           max_length=config.data.max_length, checkpointing=config.train.gradient_checkpointing)
    check_kernels(config.train.kernels, built.model, built.device)
    graphs = choose_graphs(config, built.model, built.device, current().size)
    fingerprints = {"data": _digest([_example_key(ex) for ex in train.examples]),
                    "model": _model_fingerprint(config.model.source)}
    params = trainable_parameters(config, built.model, adapter=adapter)  # target modules and adapter files checked
    products = choose_products(config.train, built.model, built.device, objective=config.method.objective)
    # Only now, with the data, the model and its adapters known to be good, does the run take its dir (release:
    # hold_run_dir)
    run_dir, lock, resume = claim_run_dir(config, resume)
    return RunSetup(config=config, run_dir=run_dir, tokenizer=tokenizer, model=built.model, device=built.device,
                    dtype=built.dtype, train=train, eval=heldout, eval_rows=rows, fingerprints=fingerprints,
                    resume=resume, lock=lock, drops=drops, params=params, quantization=built.quantization,
                    layout=layout, graphs=graphs, blas_workspace=blas, plan=plan.summary() if plan else None,
                    products=products)


def trainable_parameters(config: RunConfig, model, *, adapter: Path | None = None) -> list[torch.nn.Parameter]:
    """LoRA/QLoRA: a fresh adapter, or the one in ``adapter`` to continue training, over a frozen base. Full:
    every parameter, optionally without the input embeddings."""
    if config.method.uses_adapter:
        torch.manual_seed(config.seed)  # adapter init is part of the run's identity
        if adapter is not None:
            load_adapter(model, adapter)
        else:
            inject_lora(model, LoRAConfig.from_config(config.lora))
        freeze_base(model)
        return list(adapter_parameters(model).values())
    for param in model.parameters():
        param.requires_grad_(True)
    if config.method.freeze_embeddings:
        model.get_input_embeddings().weight.requires_grad_(False)
    return [p for p in model.parameters() if p.requires_grad]
