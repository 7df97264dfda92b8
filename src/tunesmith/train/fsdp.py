"""Full fine-tuning sharded over several processes with PyTorch's FSDP2 (``fully_shard``).

Each decoder block is its own FSDP unit (its weights gathered just before it runs, freed after), and the
``TrainingModule`` is the root unit: its forward is the micro-batch loss, so the root's pre-forward gathers
what no block owns — the embeddings, the final norm and the output head, which the loss reads directly for
the fused cross-entropy (with tied embeddings, one parameter serves both). Between steps every process holds
only its shard of each weight, gradient and optimizer moment.

Gradients are SUMMED over processes (the loss is already divided by the step's token count over every
process, as under DDP, ``dist.sum_gradients``): the reduce-scatter runs as a plain sum (divide factor 1) on
every unit. Each micro-batch reduce-scatters its gradients into the shards (no ``no_sync``: accumulating whole
unsharded gradients would cost the memory sharding saves).

Checkpoints and the final ``model/`` stay in the one-process format: weights and optimizer state are gathered
to rank 0 as full tensors (``torch.distributed.checkpoint.state_dict``) and written as safetensors by rank 0;
a resume hands rank 0's full tensors to every shard. ``torch.distributed.checkpoint``'s own files are not
used: its ``.metadata`` is a pickle, and nothing here is loaded with pickle.
"""

from __future__ import annotations

import sys

import torch

from tunesmith.errors import TunesmithError
from tunesmith.train.dist import SharedError, World

# PyTorch's FSDP2 and distributed-checkpoint modules are imported where a sharded run uses them: importing them costs
# about 0.8 s, which every command would otherwise pay (a model holds shards only once fully_shard has run, so a
# process that never imported them holds none).


def _options(**flags):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **flags)


def _is_dtensor(tensor) -> bool:
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(tensor, module.DTensor)


def parallel_for(config, world: World) -> str:
    """How this run spreads over its processes: ``single`` (one process), ``ddp`` or ``fsdp``
    (``train.parallel``; ``auto``: FSDP2 for full fine-tuning, DDP for LoRA / QLoRA, whose frozen base is
    replicated and whose adapters are small)."""
    if not world.distributed:
        return "single"
    parallel = config.train.parallel if config.train.parallel != "auto" else (
        "fsdp" if config.method.name == "full" else "ddp")
    if parallel == "fsdp":
        check_fsdp_config(config, world)
    return parallel


def check_fsdp_config(config, world: World) -> None:
    """What an FSDP2 run with several processes cannot do yet, refused before the first step.

    Evaluation during training runs on rank 0 alone, but a sharded model's forward needs every process (each
    holds a shard of every block). The evaluation before training runs before the model is sharded, the one
    after on the gathered model."""
    if config.train.eval_every and config.data.eval:
        raise SharedError(f"train.parallel=fsdp on {world.size} processes cannot evaluate during training (a "
                          "sharded model runs on every process, evaluation on rank 0): set train.eval_every=null "
                          "(held-out metrics come before and after training), or train.parallel=ddp if the "
                          "model fits one GPU")


def shard(module: torch.nn.Module, decoder_layers: list[torch.nn.Module], device: torch.device,
          dtype: torch.dtype) -> torch.nn.Module:
    """``module`` (the ``TrainingModule``) as an FSDP2 root over one unit per decoder block, in place.

    On CUDA the blocks compute in ``dtype`` and reduce gradients in fp32; on the CPU everything stays fp32."""
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

    policy = (MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32) if device.type == "cuda"
              else MixedPrecisionPolicy())
    for layer in decoder_layers:
        fully_shard(layer, mp_policy=policy)
    fully_shard(module, mp_policy=policy)
    for unit in module.modules():
        if isinstance(unit, FSDPModule):
            # a plain SUM: no division by the number of processes, and no pre-scaled sum (gloo has none)
            unit.set_gradient_divide_factor(1.0)
            unit.set_force_sum_reduction_for_comms(True)
    return module


def sharded(model: torch.nn.Module) -> bool:
    """Whether ``model``'s weights are FSDP2 shards (``DTensor``s)."""
    return any(_is_dtensor(p) for p in model.parameters())


def clip_gradients(params: list[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
    """``clip_grad_norm_`` over plain or sharded gradients; the norm as a plain tensor. Over shards the norm is
    reduced over every process (a replicated ``DTensor``, whose local value is the whole norm)."""
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    return norm.to_local() if _is_dtensor(norm) else norm


def gather_weights(model: torch.nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
    """The full weights ``names`` on rank 0's CPU ({} elsewhere). Every process must call it."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    full = get_model_state_dict(model, options=_options(cpu_offload=True))
    return {name: full[name] for name in names} if full else {}


def gather_optimizer(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer's full state on rank 0's CPU ({} elsewhere), in ``optimizer.state_dict()``'s own form
    (parameters numbered in the optimizer's order), so a one-process run reads it. Every process must call it."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    full = get_optimizer_state_dict(model, optimizer, options=_options(cpu_offload=True))
    if not full:
        return {}
    number = {name: i for i, name in enumerate(n for group in full["param_groups"] for n in group["params"])}
    return {"state": {number[name]: value for name, value in full["state"].items()},
            "param_groups": [{**group, "params": [number[n] for n in group["params"]]}
                             for group in full["param_groups"]]}


def load_weights(model: torch.nn.Module, weights: dict[str, torch.Tensor], world: World) -> None:
    """Rank 0's full ``weights`` into every process's shards (the caller checked the names: tied weights are
    saved once, so the load is not strict)."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    set_model_state_dict(model, weights if world.main else {},
                         options=_options(broadcast_from_rank0=True, strict=False))


def load_optimizer(model: torch.nn.Module, optimizer: torch.optim.Optimizer, saved: dict, world: World) -> None:
    """``optimizer.state_dict()``-form ``saved`` (rank 0's, parameters numbered in the optimizer's order) into
    every process's shards of the optimizer state."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    names = {id(p): name for name, p in model.named_parameters()}
    order = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    full = {}
    if world.main:
        if len(order) != sum(len(group["params"]) for group in saved["param_groups"]):
            raise TunesmithError("the checkpoint's optimizer state does not match the trained parameters")
        full = {"state": {order[i]: value for i, value in saved["state"].items()},
                "param_groups": [{**group, "params": [order[i] for i in group["params"]]}
                                 for group in saved["param_groups"]]}
    set_optimizer_state_dict(model, optimizer, full, options=_options(broadcast_from_rank0=True))


def gathered_model(model: torch.nn.Module, world: World, device: torch.device) -> torch.nn.Module:
    """After training: rank 0's plain copy of the sharded ``model`` with its full trained weights (what
    ``model/`` is saved from and evaluated with); the other ranks keep ``model``. Every process must call it.

    The copy is built from ``model``'s class and config on the meta device and takes the gathered tensors;
    the buffers no state dict holds (rotary tables) are copied over, and tied embeddings are tied again."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    full = get_model_state_dict(model, options=_options(cpu_offload=True))
    if not world.main:
        return model
    with torch.device("meta"):
        plain = type(model)(model.config)  # only blocks are FSDP units: the model keeps its own class
    plain.load_state_dict(full, assign=True)
    for name, buffer in model.named_buffers():
        owner, _, leaf = name.rpartition(".")
        if name not in full:
            plain.get_submodule(owner).register_buffer(leaf, buffer.detach().cpu().clone(), persistent=False)
    plain.tie_weights()
    return plain.to(device).eval()
