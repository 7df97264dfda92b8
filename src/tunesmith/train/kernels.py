"""Which kernels compute the decoder's position-wise parts on a GPU: PyTorch's, or Liger's fused Triton kernels.

``train.kernels``:

    torch   the model's own modules (every device; the reference)
    liger   Liger's fused RMSNorm, rotary embedding and SwiGLU (the ``liger-kernel`` package, CUDA only): one
            kernel where the model's modules launch several (RMSNorm alone is an fp32 round trip, a mean, a
            rsqrt and two products), so a step launches fewer kernels and the GPU waits less on the host

Only these three are taken from Liger: the loss stays tunesmith's own head + cross-entropy at the trained
positions (``train.head``), which Liger's fused linear cross-entropy would replace by one over every position.
The kernels are installed once, before the first step, on the model instance (its norms and MLPs); Liger's
rotary function replaces the model family's module-level one, for the whole process. The math is the same
(Liger's kernels are tested against these modules by their authors; BENCHMARKS.md records the loss curves
side by side); what a run used is recorded in ``summary.json`` under ``"kernels"``.
"""

from __future__ import annotations

import importlib.util
import os

import torch

from tunesmith.errors import TunesmithError

LIGER_PARTS = {"rope": True, "rms_norm": True, "swiglu": True, "cross_entropy": False,
               "fused_linear_cross_entropy": False}


def check_kernels(requested: str, model, device: torch.device) -> None:
    """Refuse a kernel choice this model or device cannot run, before the run dir is made."""
    if requested == "torch":  # the config allows only torch and liger
        return
    if device.type != "cuda":
        raise TunesmithError(f"train.kernels=liger needs a CUDA GPU (Liger's kernels are Triton); this run is on "
                             f"{device.type}: use train.kernels=torch")
    if importlib.util.find_spec("liger_kernel") is None:
        raise TunesmithError("train.kernels=liger needs the liger-kernel package: pip install liger-kernel "
                             "(or use train.kernels=torch)")
    from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN

    model_type = getattr(model.config, "model_type", None)
    if model_type not in MODEL_TYPE_TO_APPLY_LIGER_FN:
        raise TunesmithError(f"Liger has no kernels for model type {model_type!r}; use train.kernels=torch")


def install_kernels(model, requested: str) -> dict:
    """Put the chosen kernels into ``model`` (once); returns what ``summary.json`` records."""
    if requested == "torch":
        return {"name": "torch"}
    from liger_kernel.transformers.monkey_patch import _apply_liger_kernel_to_instance

    _apply_liger_kernel_to_instance(model=model, **LIGER_PARTS)
    return {"name": "liger", "parts": [part for part, on in LIGER_PARTS.items() if on]}


LEAN_BLAS_WORKSPACE_MIB = 4
"""cuBLAS's workspace under gradient checkpointing (``train.blas_workspace_mib=auto``): a training step holds two
(the forward's thread and the backward's), each PyTorch's default size unless set; what the smaller size saves
and costs is in BENCHMARKS.md."""


def set_blas_workspace(train, device_available: bool | None = None) -> dict:
    """Size cuBLAS's workspace for this process (``train.blas_workspace_mib``) before its first matrix product;
    returns what was done (``summary.json``'s ``"blas_workspace"``). ``auto``: ``LEAN_BLAS_WORKSPACE_MIB`` when the
    run checkpoints (it chose memory over speed), else PyTorch's default. A ``CUBLAS_WORKSPACE_CONFIG`` the user
    set in the environment wins over ``auto``."""
    requested = train.blas_workspace_mib
    cuda = torch.cuda.is_available() if device_available is None else device_available
    if not cuda:
        return {"mib": None, "reason": "no CUDA device"}
    if requested == "auto":
        if not train.gradient_checkpointing:
            return {"mib": None, "reason": "auto without gradient checkpointing: PyTorch's default"}
        if "CUBLAS_WORKSPACE_CONFIG" in os.environ:
            return {"mib": None, "reason": f"CUBLAS_WORKSPACE_CONFIG={os.environ['CUBLAS_WORKSPACE_CONFIG']} "
                                           "from the environment"}
        mib = LEAN_BLAS_WORKSPACE_MIB
    else:
        mib = int(requested)
    setter = getattr(torch._C, "_cuda_setCublasWorkspaceSize", None)
    if setter is not None:  # PyTorch ≥ 2.12: takes effect for workspaces made from now on
        setter(mib * 2 ** 20)
    else:  # read once, at the process's first cuBLAS call
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = f":{mib * 1024}:1"
    release_blas_workspaces()  # workspaces made before (another run in this process) are made again at the new size
    how = "auto under gradient checkpointing" if requested == "auto" else "train.blas_workspace_mib"
    return {"mib": mib, "reason": how}


def release_blas_workspaces() -> None:
    """Free cuBLAS's workspaces; the next matrix product on a stream makes its own, at the size set now."""
    release = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)
    if release is not None and torch.cuda.is_initialized():
        torch.cuda.synchronize()
        release()
