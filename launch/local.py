"""Run training on this machine with torchrun: one process per GPU, or N CPU ranks over gloo."""
from __future__ import annotations

import os
import subprocess
import sys
from typing import Optional

import torch


def resolve_nproc(nproc: str) -> int:
    """``auto``: one rank per GPU; on CPU two ranks (data parallel over gloo) when >= 2 cores."""
    if nproc != "auto":
        return int(nproc)
    if torch.cuda.is_available():
        return torch.cuda.device_count()
    return 2 if (os.cpu_count() or 1) >= 2 else 1


def torchrun_command(nproc: int, overrides: list[str], module: str = "pretrain.train") -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", module, *overrides]


def rank_env(nproc: int) -> dict[str, str]:
    """Each CPU rank gets an equal share of the cores (torchrun would otherwise force 1 thread)."""
    env = dict(os.environ)
    if not torch.cuda.is_available():
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    return env


def run_torchrun(nproc: int, overrides: list[str], timeout: Optional[float] = None) -> int:
    """Start the ranks, wait, and return torchrun's exit code."""
    return subprocess.run(torchrun_command(nproc, overrides), env=rank_env(nproc), timeout=timeout).returncode
