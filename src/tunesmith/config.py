"""Run configuration: YAML plus ``key.sub=value`` overrides, validated into typed models.

The models below are the one place each option is documented. Unknown keys and wrong types are errors
that name the key; the resolved config is saved with every run and checkpoint.
"""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path
from typing import Annotated, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from tunesmith.config_limits import FLOAT_MAX, INT_MAX, MAX_NAME_BYTES, SEED_MAX, leaf_types, parse_memory
from tunesmith.config_yaml import explain_validation, read_config_file, set_dotted
from tunesmith.errors import TunesmithError


class _Identity:
    """Marks a field that defines what a checkpoint's weights and data positions mean: changing it between a
    checkpoint and its resume would silently train something else, so a resume refuses it (``identity_keys``)."""

    def __repr__(self) -> str:
        return "IDENTITY"


IDENTITY = _Identity()


class _Section(BaseModel):
    # NaN or infinity in any float option is refused: NaN passes no range check, and would train garbage
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _numbers_in_range(cls, value, info):
        """true/false is not a number (YAML's ``true`` would read as 1), no number is beyond what its option can
        take, and no string holds a NUL byte (a path with one fails deep inside the operating system)."""
        if isinstance(value, str) and "\0" in value:
            raise ValueError("holds a NUL byte, which no path or name can; remove it")
        leaves = leaf_types(cls.model_fields[info.field_name].annotation)
        if not leaves & {int, float} or bool in leaves:
            return value
        if isinstance(value, bool):
            raise ValueError(f"must be a number, not {str(value).lower()}")
        number = value
        if isinstance(value, str):  # YAML reads 1e23 (no dot) as a string, which pydantic then converts
            try:
                number = float(value)
            except ValueError:
                return value
        if isinstance(number, (int, float)):
            largest = SEED_MAX if info.field_name == "seed" else INT_MAX if float not in leaves else FLOAT_MAX
            if number > largest:
                raise ValueError(f"is {value} but the largest accepted value is {largest:g}"
                                 if float in leaves else f"is {value} but the largest accepted value is {largest}")
        return value


_DEVICE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


class ModelConfig(_Section):
    source: Annotated[str, IDENTITY] = "default"
    """`default` (the embedded model), a local HF dir, a .gguf file, or a hub id."""
    template: Annotated[str | None, IDENTITY] = None
    """A built-in chat template (chatml, zephyr, llama3) for models without one; None uses the model's own."""
    dtype: str = "auto"
    """auto (fp32 on CPU, bf16 on CUDA when supported), fp32, bf16 or fp16."""
    device: str = "auto"
    """auto (CUDA when available, else CPU), cpu, cuda, cuda:N or mps."""
    trust_remote_code: bool = False
    """Whether the model's own Python code was allowed to run. Only the command line's --trust-remote-code sets
    it: ``load_config`` overwrites whatever a file or override says, so a config file (or a run dir's saved
    config.yaml, which records the value used) can never grant the permission."""

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str) -> str:
        if not _DEVICE.fullmatch(value):
            raise ValueError("must be auto, cpu, cuda, cuda:N (a GPU index) or mps")
        return value


class DataConfig(_Section):
    train: Annotated[str, IDENTITY] = "builtin"
    """Training data: a file, a saved dataset dir, a hub id, or `builtin`."""
    eval: str | None = "builtin:test"
    """Held-out data for evaluation (None: no evaluation)."""
    format: Annotated[str | None, IDENTITY] = None
    """Override the detected format (messages, prompt_completion, text, alpaca, sharegpt, preference)."""
    split: Annotated[str | None, IDENTITY] = None
    sample_rows: int | None = Field(None, gt=0)
    """Train on a seeded random subset of this many valid rows (None: all)."""
    max_length: Annotated[int, IDENTITY] = Field(512, gt=0)
    overlength: Annotated[Literal["truncate", "drop", "error"], IDENTITY] = "truncate"
    invalid_rows: Annotated[Literal["error", "drop"], IDENTITY] = "error"
    train_on: Annotated[Literal["all", "last"], IDENTITY] = "all"
    reasoning: Annotated[Literal["on", "off"] | None, IDENTITY] = None
    append_eos: bool = False
    """Append the tokenizer's EOS after each trained assistant turn, trained: for templates whose turns end
    with no end-of-turn marker (nothing else teaches the model to stop)."""
    control_tokens: Literal["refuse", "allow"] = "refuse"
    """A message holding a control token (a special token or a marker of the template, e.g. `<|im_end|>`):
    refuse: an invalid row (see invalid_rows); allow: keep it, read as the control token it is."""
    batching: Annotated[Literal["pad", "bucket", "pack"], IDENTITY] = "pad"
    token_budget: Annotated[int | None, IDENTITY] = Field(None, gt=0)
    """Tokens per packed row (batching=pack); defaults to max_length."""


class MethodConfig(_Section):
    name: Annotated[Literal["lora", "qlora", "full"], IDENTITY] = "lora"
    """lora: adapters over the frozen base; qlora: the same over a 4-bit base (see `quant`); full: all weights."""
    objective: Annotated[Literal["sft", "dpo"], IDENTITY] = "sft"
    """sft: next-token loss on the answers; dpo: preference tuning on prompt/chosen/rejected pairs (see `dpo`)."""
    freeze_embeddings: Annotated[bool, IDENTITY] = False
    """Full fine-tuning only: keep the input embeddings (and a tied output head) frozen."""

    @property
    def uses_adapter(self) -> bool:
        return self.name in ("lora", "qlora")


class LoRASection(_Section):
    r: Annotated[int, IDENTITY] = Field(16, gt=0)
    alpha: Annotated[float, IDENTITY] = Field(32.0, gt=0)
    dropout: Annotated[float, IDENTITY] = Field(0.0, ge=0.0, lt=1.0)
    target_modules: Annotated[str | list[str], IDENTITY] = "all-linear"
    """Module names (q_proj, v_proj, ...) or `all-linear`."""
    use_rslora: Annotated[bool, IDENTITY] = False
    """Scale by alpha/sqrt(r) instead of alpha/r."""


class QuantSection(_Section):
    """The 4-bit base of `method.name: qlora` (bitsandbytes)."""

    type: Annotated[Literal["nf4", "fp4"], IDENTITY] = "nf4"
    double_quant: Annotated[bool, IDENTITY] = True
    """Quantize the per-block scales too (8-bit, blocks of 256): about 0.37 bits per parameter less."""
    blocksize: Annotated[Literal[32, 64, 128, 256], IDENTITY] = 64
    compute_dtype: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    """auto: bf16 on CUDA when supported, else fp16 on CUDA, fp32 on CPU."""
    storage: Annotated[Literal["uint8", "bf16", "fp16", "fp32"], IDENTITY] = "uint8"
    """The dtype the packed 4-bit codes are stored in; a float type lets FSDP shard them."""
    skip_modules: Annotated[list[str], IDENTITY] = Field(default_factory=lambda: ["lm_head"])
    """Linear layers kept in full precision (embeddings and norms are never quantized)."""


class DPOSection(_Section):
    """Preference tuning (`method.objective: dpo`); the losses' maths is in `tunesmith.train.preference`."""

    loss: Annotated[Literal["sigmoid", "ipo", "simpo"], IDENTITY] = "sigmoid"
    """sigmoid: DPO, −log σ(β·h) with h the chosen-minus-rejected log-ratio to the reference; ipo: (h − 1/(2β))²
    on per-token-averaged log-ratios; simpo: reference-free, −log σ(β·(mean log-prob margin) − γ)."""
    beta: float = Field(0.1, gt=0)
    """Strength of the pull towards the reference (sigmoid, ipo); the reward scale for simpo (2.0 is typical)."""
    gamma: float = Field(0.5, ge=0)
    """simpo only: the target reward margin γ."""
    sft_weight: float = Field(0.0, ge=0)
    """Weight of an added NLL (SFT) term on the chosen answers, per chosen token; 0 turns it off."""
    reference: Annotated[Literal["auto", "adapters_disabled", "precomputed"], IDENTITY] = "auto"
    """Where π_ref comes from, without a second copy of the weights. adapters_disabled: the same model with its
    LoRA adapters off (LoRA/QLoRA from the base model); precomputed: the starting policy's log-probs, computed
    once before training and cached in the run dir (full fine-tuning, and any run starting from an adapter).
    auto picks adapters_disabled when it is the starting policy, else precomputed. simpo uses no reference."""
    init_adapter: Annotated[str | None, IDENTITY] = None
    """Start from an SFT run's adapter: the run dir or an adapter dir (LoRA/QLoRA only). For full fine-tuning,
    point model.source at the SFT run's model/ dir instead."""
    init_mode: Annotated[Literal["continue", "stack"], IDENTITY] = "continue"
    """continue: train the loaded adapter further (its shape must match `lora`; reference: the SFT model's cached
    log-probs). stack: fold the SFT adapter into the frozen base and train a new adapter (shaped by `lora`) over
    it (reference: adapters disabled, i.e. the SFT model); adapter/ then holds both as one rank-(r₁+r₂) adapter
    for the original base. LoRA only: under QLoRA the folded SFT adapter would be quantized."""


class OptimConfig(_Section):
    name: Annotated[Literal["adamw", "adamw_8bit", "paged_adamw_32bit", "paged_adamw_8bit"], IDENTITY] = "adamw"
    """adamw (torch) or a bitsandbytes AdamW: 8-bit state, paged state (CUDA; plain on CPU), or both."""
    lr: float = Field(2e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[Annotated[float, Field(ge=0, lt=1)], Annotated[float, Field(ge=0, lt=1)]] = (0.9, 0.999)
    """Decay rates of Adam's two moment estimates, each in [0, 1)."""
    eps: float = Field(1e-8, gt=0)
    max_grad_norm: float | None = Field(1.0, gt=0)
    """Clip the global gradient norm; None disables clipping."""


class ScheduleConfig(_Section):
    name: Literal["cosine", "constant"] = "cosine"
    warmup_steps: int | None = Field(None, ge=0)
    warmup_ratio: float = Field(0.05, ge=0.0, le=1.0)
    """Used when warmup_steps is None: a fraction of the total optimizer steps."""
    min_lr_ratio: float = Field(0.0, ge=0.0, le=1.0)


class TrainConfig(_Section):
    epochs: float = Field(1.0, gt=0)
    max_steps: int | None = Field(None, gt=0)
    """Optimizer steps; overrides epochs when set."""
    micro_batch_size: Annotated[int, IDENTITY] = Field(8, gt=0)
    grad_accum: int = Field(1, gt=0)
    """Micro-batches per step on each process. Not an identity key by itself: a resume keeps the global batch
    (micro_batch_size × grad_accum × processes), which may be split over another number of processes."""
    nonfinite: Literal["skip", "abort"] = "skip"
    """What a non-finite loss or gradient does: skip the step (nothing changes) or abort the run."""
    max_bad_steps: int = Field(5, gt=0)
    """This many non-finite steps in a row abort the run whatever the policy."""
    log_every: int = Field(1, gt=0)
    eval_every: int | None = Field(None, gt=0)
    """Evaluate held-out loss every N optimizer steps (always at the end)."""
    checkpoint_every: int | None = Field(50, gt=0)
    keep_checkpoints: int = Field(2, gt=0)
    progress: bool = True
    gradient_checkpointing: bool = False
    """Recompute each decoder block's activations in the backward pass: less memory, ~30% more compute."""
    compile: bool = False
    """Removed: compiling the blocks was slower than eager on the CPU and 22× slower on an H200, recompiling as
    batch shapes change (BENCHMARKS.md); ``true`` is refused with that reason."""
    layout: Literal["auto", "rows", "flat", "varlen", "cache", "plain"] = "auto"
    """How a batch is laid out for the model, chosen once at setup (README "Layouts"); auto picks from the
    device, attention and batching, and summary.json records the choice and why."""
    forward_products: Literal["auto", "exact", "bf16"] = "auto"
    """The training forward's products through frozen weights (each adapted layer's X Wᵀ): exact (the model's
    dtype), or bf16 factors with float32 accumulation, 2-4.8x faster on a CPU with AVX512-BF16 / AMX; every
    evaluation, the adapters' products and the head's logits stay exact. auto: bf16 on such a CPU for supervised
    LoRA over a float32 base, else exact (README "Products through frozen weights", train/products.py)."""
    backward_products: Literal["auto", "exact", "bf16"] = "auto"
    """The backward's products through frozen weights (LoRA's ∂L/∂X = G W, the head's): exact (the model's
    dtype), or bf16 factors with float32 accumulation, about 2x faster on a CPU with AVX512-BF16 / AMX; the
    adapters' own gradients stay exact. auto: bf16 on such a CPU for LoRA over a float32 base, else exact
    (README "Products through frozen weights", train/products.py)."""
    kernels: Literal["torch", "liger"] = "torch"
    """The decoder's RMSNorm, rotary embedding and SwiGLU: the model's own modules (torch), or Liger's fused
    Triton kernels (liger: CUDA, needs the liger-kernel package; fewer kernel launches a step)."""
    graphs: bool | Literal["auto"] = "auto"
    """CUDA graphs: each micro-batch's forward and backward is recorded once per padded shape and replayed, so
    the host no longer launches every kernel. auto: wherever they can run (CUDA, supervised training, one
    process, plain causal attention; with gradient checkpointing too); true: refuse a run where they cannot;
    false: never (README "CUDA graphs")."""
    blas_workspace_mib: int | Literal["auto"] = "auto"
    """cuBLAS's workspace per thread and stream, in MiB (CUDA): auto is 4 under gradient checkpointing (the run
    chose memory over speed) and PyTorch's default otherwise (32 on an H200)."""
    parallel: Literal["auto", "ddp", "fsdp"] = "auto"
    """How several processes (torchrun) share the work: ddp (each holds the whole model) or fsdp (FSDP2: each
    holds a shard of every weight; full fine-tuning only); auto: fsdp for method.name=full, else ddp."""

    @field_validator("blas_workspace_mib")
    @classmethod
    def _workspace_size(cls, value):
        if value != "auto" and value < 0:
            raise ValueError("train.blas_workspace_mib must be auto or a size in MiB ≥ 0")
        return value

    @field_validator("compile")
    @classmethod
    def _compile_removed(cls, value: bool) -> bool:
        if value:
            raise ValueError("train.compile was removed: it measured slower than eager on the CPU and 22x slower "
                             "on an H200 (BENCHMARKS.md); drop the key")
        return value


class EvalConfig(_Section):
    before: bool = True
    """Evaluate the untuned model too, for the before/after comparison."""
    generate: bool = False
    """Also score greedy answers on `data.eval`'s own rows (each row's last assistant turn, or its completion):
    exact match, and for JSON answers valid-JSON rate and per-field accuracy. The built-in task is always scored."""
    task_rows: int = Field(100, ge=0)
    """Held-out rows whose greedy answers are scored (built-in task, or any data with `generate`); 0: none."""
    loss_rows: int | None = Field(None, gt=0)
    """Held-out rows for loss / perplexity (None: all)."""
    batch_size: int = Field(128, gt=0)
    """Most answers generated at once (the engine's batch; the next row joins as an answer ends), and rows per
    held-out loss batch. 128 holds the default recipe's 100 rows in one batch: the base model's 100 answers took
    18.6-21.8 s against 21.6-27.7 s at 64 (2-core CPU, alternating, the same answers). Lower it for long rows of
    a large model on a GPU, where a batch's activations and cache grow with it."""
    max_new_tokens: int = Field(48, gt=0)
    stop_settled: bool = True
    """End a scored answer as soon as no later token can change its score: a JSON answer that does not start
    with the expected `{` / `[`, or whose value is complete and followed by other text; a text answer that has
    left the expected one. The metrics are those of whole answers; the saved prediction is the answer up to
    there. false: every answer runs to its stop token or `max_new_tokens`."""
    report_examples: int = Field(12, ge=0)


class PlanSection(_Section):
    mode: Literal["off", "auto"] = "off"
    """auto: before training, choose the micro-batch, accumulation (the effective batch kept), checkpointing,
    optimizer and CUDA graphs that fit the GPU and train fastest (`tunesmith estimate --fit`). `plan: auto` is
    short for `plan: {mode: auto}`."""
    memory: str | None = None
    """The memory to fit, e.g. 80GiB; None: the GPU's own."""
    margin: float = Field(0.1, ge=0.0, lt=1.0)
    """Share of the memory left free (the estimate's measured error is within ±10%)."""

    @model_validator(mode="before")
    @classmethod
    def _short_form(cls, data):
        return {"mode": data} if isinstance(data, str) else data

    @field_validator("memory")
    @classmethod
    def _memory_size(cls, value: str | None) -> str | None:
        return value if value is None or parse_memory(value) else value


class RunConfig(_Section):
    name: str | None = None
    """The run dir's name under output_dir; None: `<method>-<date>-<time>`, chosen when the run starts."""
    output_dir: str = "runs"
    seed: Annotated[int, IDENTITY] = Field(0, ge=0)
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    method: MethodConfig = Field(default_factory=MethodConfig)
    lora: LoRASection = Field(default_factory=LoRASection)
    quant: QuantSection = Field(default_factory=QuantSection)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    plan: PlanSection = Field(default_factory=PlanSection)
    dpo: DPOSection | None = None
    """Preference tuning options; present exactly when method.objective is dpo (defaults filled in)."""

    @model_validator(mode="before")
    @classmethod
    def _dpo_section_with_objective(cls, data):
        if not isinstance(data, dict):
            return data
        method = data.get("method")
        objective = method.get("objective") if isinstance(method, dict) else getattr(method, "objective", None)
        if objective == "dpo" and data.get("dpo") is None:
            return {**data, "dpo": {}}
        if objective != "dpo" and data.get("dpo") is not None:
            raise ValueError("the dpo section applies only to method.objective=dpo; set method.objective=dpo "
                             "or remove the dpo section")
        return data

    @model_validator(mode="after")
    def _fsdp_for_full_only(self):
        if self.train.parallel == "fsdp" and self.method.name != "full":
            raise ValueError(f"train.parallel=fsdp shards full fine-tuning only; method.name={self.method.name} "
                             "trains data-parallel: set train.parallel=ddp (or auto)")
        return self

    @field_validator("name")
    @classmethod
    def _plain_name(cls, value: str | None) -> str | None:
        if value is not None and (not value or "/" in value or value.startswith(".")):
            raise ValueError("must be a plain directory name")
        if value is not None and len(value.encode()) > MAX_NAME_BYTES:
            raise ValueError(f"is {len(value.encode())} bytes long; a directory name takes at most {MAX_NAME_BYTES}")
        return value

    @property
    def run_dir(self) -> Path:
        if self.name is None:
            raise ValueError("the run has no name yet; call with_run_name() first")
        return Path(self.output_dir) / self.name

    def with_run_name(self) -> RunConfig:
        """A copy whose name is set: the configured one, or the method and the current time."""
        if self.name is not None:
            return self
        prefix = self.method.name if self.method.objective == "sft" else f"{self.method.objective}-{self.method.name}"
        return self.model_copy(update={"name": f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}"})

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def load_config(path: str | Path | None = None, overrides: list[str] = (), *,
                trust_remote_code: bool = False) -> RunConfig:
    """Read ``path`` (or the built-in defaults), apply ``key.sub=value`` overrides, and validate.

    ``trust_remote_code`` is the command line's --trust-remote-code and the only source of
    ``model.trust_remote_code``: a value in the file or the overrides is replaced by it (see ModelConfig)."""
    tree = read_config_file(path) if path is not None else {}
    return resolve_tree(tree, "built-in defaults" if path is None else str(path), overrides, trust_remote_code)


def resolve_tree(tree: dict, origin: str, overrides: list[str], trust_remote_code: bool) -> RunConfig:
    for override in overrides:
        if "=" not in override:
            raise TunesmithError(f"override {override!r} must look like key.sub=value")
        key, raw = override.split("=", 1)
        set_dotted(tree, key.strip(), raw)
    if overrides:
        origin += " with overrides " + " ".join(overrides)
    try:
        config = RunConfig.model_validate(tree)
    except ValidationError as exc:
        raise explain_validation(exc, origin) from None
    if config.model.trust_remote_code and not trust_remote_code:
        print(f"note: model.trust_remote_code in {origin} is ignored; only the --trust-remote-code flag lets a "
              "model run its own code", file=sys.stderr)
    config.model.trust_remote_code = trust_remote_code
    return config


def identity_keys(section: type[BaseModel] = RunConfig, prefix: str = "") -> tuple[str, ...]:
    """The dotted keys of every field marked ``IDENTITY``, walking the sections in declaration order."""
    keys: list[str] = []
    for name, field in section.model_fields.items():
        if IDENTITY in field.metadata:
            keys.append(prefix + name)
        for inner in (field.annotation, *get_args(field.annotation)):  # a section, or an optional one
            if isinstance(inner, type) and issubclass(inner, BaseModel):
                keys += identity_keys(inner, f"{prefix}{name}.")
    return tuple(keys)
