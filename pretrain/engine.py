"""DeepSpeed, and nothing else imports it: config -> ds_config -> initialize; checkpoint consolidation.

Runs on CPU over gloo (this repository's CI: ZeRO 0-3, fp32 or bf16, 2 ranks under torchrun) and on
CUDA over NCCL with the same code; the backend and device follow what the machine has.
"""
from __future__ import annotations

import glob
import importlib
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import deepspeed
import torch
import torch.distributed as dist
from torch import nn

from pretrain.config import OptimizerName, Precision, TrainConfig
from pretrain.models import param_groups
from pretrain.models.moe import MoeMlp
from pretrain.schedule import lr_multiplier

Engine = deepspeed.DeepSpeedEngine


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _skip_cpu_shm_op() -> None:
    """On CPU, DeepSpeed JIT-compiles a shared-memory C++ op when its comm backend starts (about
    30 s and a compiler on a fresh machine). It only serves ``inference_all_reduce`` (DeepSpeed
    inference), never training's collectives, which go through torch.distributed/gloo."""
    # importlib: the attribute deepspeed.comm.torch is the torch package that deepspeed.comm imports
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None


def init_distributed(backend: str = "auto") -> DistInfo:
    """Join the process group torchrun describes (or a 1-process group when run directly)."""
    if "RANK" not in os.environ:  # plain `python -m pretrain.train`: a world of one
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT", str(_free_port())))
    cuda = torch.cuda.is_available()
    if backend == "auto":
        backend = "nccl" if cuda else "gloo"
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if cuda:
        torch.cuda.set_device(local_rank)
    else:
        _skip_cpu_shm_op()
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend=backend, verbose=False)
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device)


def ds_config(cfg: TrainConfig) -> dict[str, Any]:
    """The DeepSpeed JSON config for a training config (AdamW is DeepSpeed's; LAMB is given to
    :func:`initialize` as a client optimizer, and the schedule is ours: see ``schedule.py``)."""
    o, e = cfg.optim, cfg.engine
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": cfg.data.batch_size,
        "gradient_accumulation_steps": e.grad_accum,
        "gradient_clipping": e.grad_clip,
        "zero_optimization": {"stage": e.zero_stage},
        "bf16": {"enabled": e.precision == Precision.bf16},
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": o.lr, "betas": [o.beta1, o.beta2], "eps": o.eps, "weight_decay": o.weight_decay,
                # torch's AdamW on CPU; on CUDA DeepSpeed's fused Adam kernel.
                "torch_adam": not torch.cuda.is_available(), "adam_w_mode": True,
            },
        },
        "steps_per_print": 2**31 - 1,  # the trainer logs; keep DeepSpeed's own step prints quiet
        "wall_clock_breakdown": False,
    }
    if o.name == OptimizerName.lamb:
        del config["optimizer"]
        # ZeRO partitions any torch optimizer's state; DeepSpeed only asks to be told it is one
        # it has not tested.
        config["zero_allow_untested_optimizer"] = True
    return config


def _lamb(groups: list[dict], cfg: TrainConfig) -> torch.optim.Optimizer:
    """timm's LAMB (maintained, device-agnostic; DeepSpeed's FusedLamb needs a CUDA build)."""
    from timm.optim import Lamb

    o = cfg.optim
    return Lamb(groups, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, weight_decay=o.weight_decay)


def initialize(task: nn.Module, cfg: TrainConfig) -> Engine:
    """Wrap ``task`` (model + loss) in a DeepSpeed engine with the optimizer and the schedule."""
    groups = param_groups(task, cfg.optim.weight_decay)
    optimizer = _lamb(groups, cfg) if cfg.optim.name == OptimizerName.lamb else None
    # Step i (0-based) runs at lr * lr_multiplier(i): LambdaLR applies factor(0) on construction
    # and DeepSpeed steps it once per optimizer step. Its state (last step) is in every checkpoint.
    schedule = lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_multiplier(cfg, step))  # noqa: E731
    engine, _, _, _ = deepspeed.initialize(model=task, model_parameters=groups, optimizer=optimizer,
                                           lr_scheduler=schedule, config=ds_config(cfg))
    return engine


class _AllToAllExchange:
    """DeepSpeed's differentiable all-to-all over one expert-parallel group (see MoeMlp)."""

    def __init__(self, group: dist.ProcessGroup) -> None:
        from deepspeed.moe.sharded_moe import _AllToAll

        self._all_to_all = _AllToAll
        self.group = group
        self.size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self._all_to_all.apply(self.group, x)


def enable_expert_parallel(model: nn.Module, ep_size: int) -> int:
    """Split every MoE layer's experts over groups of ``ep_size`` ranks; returns the layer count.

    DeepSpeed makes the process groups (``ep_size`` consecutive ranks share one copy of the E
    experts; rank r of a group computes experts [r*E/ep, (r+1)*E/ep)) and its all-to-all moves
    each token to the rank computing its expert and back. Expert weights stay ordinary
    data-parallel parameters (ZeRO partitions them like any other; stage 3 their weights too): a
    rank's gradient for an expert it does not compute is zero, so the data-parallel mean equals
    the gradient of the same model trained without expert parallelism.
    """
    layers = [m for m in model.modules() if isinstance(m, MoeMlp)]
    if ep_size == 1 or not layers:
        return len(layers)
    from deepspeed.utils import groups

    groups._create_expert_and_data_parallel(ep_size)
    exchange = _AllToAllExchange(groups._get_expert_parallel_group(f"ep_size_{ep_size}"))
    for layer in layers:
        layer.set_exchange(exchange)
    return len(layers)


def compute_dtype(cfg: TrainConfig) -> torch.dtype:
    """dtype of the engine's module weights, hence of the inputs it must be fed."""
    return torch.bfloat16 if cfg.engine.precision == Precision.bf16 else torch.float32


def consolidated_state_dict(checkpoint_dir: str | os.PathLike) -> dict[str, torch.Tensor]:
    """fp32 weights of the wrapped module from a DeepSpeed checkpoint folder (one tag), on CPU,
    without a process group: ZeRO 1-3 from the partitioned fp32 master copies, stage 0 from the
    module states file."""
    ckpt = Path(checkpoint_dir)
    if glob.glob(str(ckpt / "*zero_pp_rank_*optim_states.pt")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name)
    else:
        files = sorted(ckpt.glob("mp_rank_*_model_states.pt"))
        if not files:
            raise FileNotFoundError(f"no DeepSpeed model states in {ckpt}")
        state = torch.load(files[0], map_location="cpu", weights_only=False)["module"]
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
