"""``tunesmith train --gpus N``: the same command again, as N processes started by torchrun."""

from __future__ import annotations

import sys

from tunesmith.errors import TunesmithError


def launch_torchrun(args) -> None:
    """``--gpus N``: the same train command, as N processes started by torchrun on this machine."""
    import subprocess

    import torch

    from tunesmith.train.dist import launched_by_torchrun

    if launched_by_torchrun():
        raise TunesmithError("--gpus starts torchrun itself; under torchrun, drop --gpus "
                             "(torchrun's --nproc-per-node sets the number of processes)")
    available = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if available < args.gpus:
        raise TunesmithError(f"--gpus {args.gpus} asks for {args.gpus} CUDA GPUs but this machine has {available}; "
                             f"use --gpus {available} or fewer" if available else
                             f"--gpus {args.gpus} needs CUDA GPUs and this machine has none; to run {args.gpus} "
                             f"processes on the CPU (gloo), start them with torchrun: torchrun --nproc-per-node "
                             f"{args.gpus} -m tunesmith train ... model.device=cpu")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.gpus}",
               "-m", "tunesmith", "train"]
    command += ["--config", args.config] if args.config else []
    command += ["--resume", args.resume] if args.resume else []
    command += ["--trust-remote-code"] if args.trust_remote_code else []
    returncode = subprocess.run(command + ["--", *args.overrides]).returncode
    if returncode:
        raise SystemExit(returncode)  # rank 0 printed the error; torchrun reported which rank failed
