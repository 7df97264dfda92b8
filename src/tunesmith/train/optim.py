"""Optimizers by name: torch's AdamW and bitsandbytes' 8-bit and paged AdamW variants.

* ``adamw`` — torch AdamW (its fused implementation), fp32 state (2 × 4 bytes per trained parameter).
* ``adamw_8bit`` — both moments stored in 8 bits with blockwise scales (~2 bytes per parameter);
  tensors under 4096 elements keep 32-bit state, as bitsandbytes does.
* ``paged_adamw_32bit`` / ``paged_adamw_8bit`` — the same state in CUDA unified memory, which the driver
  pages to host RAM under memory pressure instead of failing with out-of-memory. On CPU there is nothing to
  page: bitsandbytes runs them as the plain variants (the run log says so).
"""

from __future__ import annotations

import warnings

import torch

from tunesmith.config import OptimConfig
from tunesmith.quant.bnb import quiet_bitsandbytes_import

BNB_OPTIMIZERS = {"adamw_8bit": "AdamW8bit", "paged_adamw_32bit": "PagedAdamW32bit",
                  "paged_adamw_8bit": "PagedAdamW8bit"}


def build_optimizer(config: OptimConfig, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    kwargs = {"lr": config.lr, "betas": config.betas, "eps": config.eps, "weight_decay": config.weight_decay}
    if config.name == "adamw":
        # torch's fused kernel updates every tensor in one pass; the default per-tensor loop costs 2–3× as long
        # for the few hundred small adapter matrices of a LoRA run (benchmarks/cpu_parts.py, CPU)
        fused = all(p.dtype.is_floating_point and p.device.type in ("cpu", "cuda") for p in params)
        return torch.optim.AdamW(params, **kwargs, fused=fused)
    quiet_bitsandbytes_import()
    import bitsandbytes as bnb

    cls = getattr(bnb.optim, BNB_OPTIMIZERS[config.name])
    if config.name.startswith("paged") and not any(p.is_cuda for p in params):
        print(f"optim.name={config.name}: paging needs CUDA; on CPU its state is ordinary memory")
    # bitsandbytes warns at every state allocation on CPU; the message above says it once
    warnings.filterwarnings("ignore", message="Paged optimizers are not supported on CPU")
    return cls(params, **kwargs)
