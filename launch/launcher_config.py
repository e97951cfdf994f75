"""How a run is started: ``launcher=local`` (torchrun here) or ``launcher=slurm`` (sbatch + srun + torchrun).

The schema is the ``launcher`` field of ``pretrain.config.TrainConfig`` (so ``launcher=slurm`` is a
hydra group like ``model=``); ``conf/launcher/*.yaml`` give the values. The trainer ignores it.
This module imports nothing from ``pretrain`` at import time: ``pretrain.config`` imports it.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import Enum
from typing import Optional

# Slurm's --time forms: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S.
_TIME = re.compile(r"^(\d+|\d+:\d{1,2}|\d+:\d{1,2}:\d{1,2}|\d+-\d{1,2}(:\d{1,2}){0,2})$")
_MEM = re.compile(r"^\d+[KMGT]?$")  # --mem per node; 0 asks for all of a node's memory
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# Names that hold credentials: they reach the job through the environment (--export=ALL), never
# through the script or the saved config, which other people can read.
_SECRET = re.compile(r"(KEY|TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIAL)", re.IGNORECASE)
BACKEND_PREFIXES = ("NCCL_", "GLOO_", "TORCH_NCCL_", "TORCH_GLOO_", "TORCH_DISTRIBUTED_")


class LauncherKind(str, Enum):
    local = "local"  # torchrun on this machine
    slurm = "slurm"  # sbatch a script: srun starts one torchrun per node


def _check(ok: bool, message: str) -> None:
    if not ok:
        from pretrain.config import ConfigError  # lazy: pretrain.config imports this module

        raise ConfigError(message)


@dataclass
class LauncherConfig:
    kind: LauncherKind = LauncherKind.local
    nodes: int = 1
    # Ranks per node: auto is one per GPU (gpus_per_node > 0), else on Slurm one, locally two CPU ranks.
    procs_per_node: str = "auto"
    gpus_per_node: int = 0
    # CPUs for the node's one srun task (all its ranks and their loader workers); 0: whole nodes (--exclusive).
    cpus_per_task: int = 0
    partition: Optional[str] = None  # None: the cluster's default partition
    account: Optional[str] = None
    qos: Optional[str] = None
    time: str = "04:00:00"
    mem: Optional[str] = None  # per node, e.g. 256G; 0: all of it; None: the partition's default
    job_name: Optional[str] = None  # None: the run directory's name
    # pyxis/enroot: an image (docker://..., nvcr.io#..., or a .sqsh file) the ranks run in; the
    # submit directory is mounted at the same path, these are added (SRC:DST[:FLAGS]).
    container_image: Optional[str] = None
    container_mounts: list[str] = field(default_factory=list)
    python: Optional[str] = None  # interpreter on the nodes; None: this one, or `python` in a container
    env: dict[str, str] = field(default_factory=dict)  # extra environment (no secrets: see above)
    backend_env: dict[str, str] = field(default_factory=dict)  # NCCL_*/GLOO_* settings, e.g. NCCL_DEBUG: INFO
    # Seconds before the time limit at which the ranks get SIGUSR1 (checkpoint, then requeue); 0: none.
    signal_seconds: int = 120
    rdzv_port: int = 0  # torchrun's c10d rendezvous port on the first node; 0: derived from the job id
    # torchrun's --max-restarts: when a rank dies (OOM kill, a lost GPU, a crash), torchrun stops the
    # others and starts them all again this many times; they resume from the last checkpoint.
    # 0: the first failure ends the run (Slurm's requeue or a resubmit resumes it the same way).
    max_restarts: int = 0

    def __post_init__(self) -> None:
        _check(self.nodes >= 1, f"launcher.nodes={self.nodes} must be >= 1")
        _check(self.procs_per_node == "auto" or (self.procs_per_node.isdigit() and int(self.procs_per_node) >= 1),
               f"launcher.procs_per_node={self.procs_per_node!r} must be auto or an integer >= 1")
        _check(self.gpus_per_node >= 0, f"launcher.gpus_per_node={self.gpus_per_node} must be >= 0")
        _check(self.cpus_per_task >= 0, f"launcher.cpus_per_task={self.cpus_per_task} must be >= 0 (0: whole nodes)")
        _check(bool(_TIME.match(self.time)),
               f"launcher.time={self.time!r} is not a Slurm time: use HH:MM:SS, D-HH:MM:SS or minutes")
        _check(self.mem is None or bool(_MEM.match(self.mem)),
               f"launcher.mem={self.mem!r} must be a size such as 64G, 512000M or 0 (all of a node's memory)")
        _check(0 <= self.signal_seconds <= 3600, f"launcher.signal_seconds={self.signal_seconds} must be in [0, 3600]")
        _check(0 <= self.max_restarts <= 100, f"launcher.max_restarts={self.max_restarts} must be in [0, 100]")
        _check(self.rdzv_port == 0 or 1024 <= self.rdzv_port <= 65535,
               f"launcher.rdzv_port={self.rdzv_port} must be 0 (from the job id) or in [1024, 65535]")
        for section, names in (("env", self.env), ("backend_env", self.backend_env)):
            for name in names:
                _check(bool(_ENV_NAME.match(name)), f"launcher.{section}.{name}: not a valid environment variable name")
                _check(not _SECRET.search(name),
                       f"launcher.{section}.{name} looks like a secret: export it in your shell instead "
                       "(the job inherits the environment; the script and saved config never hold it)")
        for name in self.backend_env:
            _check(name.startswith(BACKEND_PREFIXES),
                   f"launcher.backend_env.{name}: only {', '.join(p + '*' for p in BACKEND_PREFIXES)} belong here; "
                   "put other variables in launcher.env")
        if self.procs_per_node != "auto" and self.gpus_per_node > 0:
            _check(int(self.procs_per_node) <= self.gpus_per_node,
                   f"launcher.procs_per_node={self.procs_per_node} exceeds launcher.gpus_per_node={self.gpus_per_node} "
                   "(one rank per GPU)")
        _check(self.container_image is None or self.kind == LauncherKind.slurm,
               "launcher.container_image needs launcher=slurm (pyxis runs the ranks in the image)")

    def ranks_per_node(self) -> int:
        """Resolved ``procs_per_node`` for a Slurm node (the local launcher resolves auto itself)."""
        if self.procs_per_node != "auto":
            return int(self.procs_per_node)
        return self.gpus_per_node if self.gpus_per_node > 0 else 1
