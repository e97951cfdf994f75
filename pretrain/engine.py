"""DeepSpeed, and nothing else imports it: config -> ds_config -> initialize; checkpoint consolidation.

Runs on CPU over gloo (this repository's CI: ZeRO 0-3, fp32 or bf16, 2 ranks under torchrun) and on
CUDA over NCCL with the same code; the backend and device follow what the machine has.
"""
from __future__ import annotations

import contextlib
import glob
import importlib
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import deepspeed
import torch
from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine
import torch.distributed as dist
from torch import nn

from pretrain.checkpoint import COMPLETE, CheckpointError, WriteLog, safe_load, verify_checkpoint
from pretrain.config import EngineConfig, Offload, OptimizerName, Precision, TrainConfig
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


def rank_mean(values: Sequence[float | torch.Tensor], device: torch.device) -> list[float]:
    """The mean over ranks of each value (floats or 0-dim tensors), in one all-reduce.

    The packed tensor is built on the compute device: NCCL takes CUDA tensors only, and stacking
    the device tensors there also makes one host sync instead of one per value.
    """
    packed = torch.stack([torch.as_tensor(v, device=device).detach().to(torch.float64).reshape(()) for v in values])  # (V,)
    dist.all_reduce(packed)
    return (packed / dist.get_world_size()).tolist()


def ds_config(cfg: TrainConfig) -> dict[str, Any]:
    """The DeepSpeed JSON config for a training config (AdamW is DeepSpeed's; LAMB is given to
    :func:`initialize` as a client optimizer, and the schedule is ours: see ``schedule.py``)."""
    o, e = cfg.optim, cfg.engine
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": cfg.data.batch_size,
        "gradient_accumulation_steps": e.grad_accum,
        "gradient_clipping": e.grad_clip,
        "zero_optimization": zero_config(e),
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


def zero_config(e: EngineConfig) -> dict[str, Any]:
    """DeepSpeed's ``zero_optimization`` section: the stage, and the knobs set in ``engine``."""
    zero: dict[str, Any] = {"stage": e.zero_stage}
    for key in ("overlap_comm", "contiguous_gradients", "reduce_bucket_size", "allgather_bucket_size"):
        if getattr(e, key) is not None:
            zero[key] = getattr(e, key)
    for key in ("offload_optimizer", "offload_param"):
        where: Offload = getattr(e, key)
        if where != Offload.none:
            # Pinned host buffers: the copies to and from the GPU run asynchronously.
            zero[key] = {"device": where.value, "pin_memory": True,
                         **({"nvme_path": e.nvme_path} if where == Offload.nvme else {})}
    return zero


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
    use_safe_checkpoint_engine(engine)
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


# -- checkpoint files: DeepSpeed's reads without pickle's code execution, its write errors agreed ----
def deepspeed_safe_globals() -> list[Any]:
    """The classes DeepSpeed's checkpoints hold besides tensors and plain containers (found by
    torch.serialization.get_unsafe_globals_in_checkpoint on ZeRO 0-3, fp32/bf16, AdamW/LAMB
    checkpoints of deepspeed 0.19): all plain data records, none runs code when rebuilt."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler  # the (static, unused in bf16/fp32) loss scale
    from deepspeed.runtime.zero.config import ZeroStageEnum  # an int enum
    from deepspeed.utils.tensor_fragment import fragment_address  # a dataclass of two ints

    return [LossScaler, ZeroStageEnum, fragment_address]


class SafeCheckpointEngine(TorchCheckpointEngine):
    """DeepSpeed's torch.save/torch.load checkpoint engine, with two changes:

    - ``load`` is :func:`pretrain.checkpoint.safe_load` (weights_only=True + the allow-list above),
      so ``engine.load_checkpoint`` never unpickles arbitrary objects;
    - a failed write (full disk, I/O error) is recorded in ``write_log`` instead of raised, so every
      rank finishes DeepSpeed's save and its collectives; ``Checkpointer.save`` then makes all
      ranks raise the same CheckpointError. (Raised on one rank mid-save, the others would wait for
      it in a collective until the timeout.)
    """

    def __init__(self, config_params: Any = None) -> None:
        super().__init__(config_params)
        self.write_log = WriteLog()
        self.allow = deepspeed_safe_globals()

    def makedirs(self, path: str, exist_ok: bool = False) -> None:
        try:
            os.makedirs(path, exist_ok=exist_ok)
        except OSError as e:
            self.write_log.fail(path, e)

    def save(self, state_dict: dict[str, Any], path: str) -> None:
        self.write_log.write(Path(path), lambda f: torch.save(state_dict, f, _use_new_zipfile_serialization=self.zipfile_serialization))

    def load(self, path: str, map_location: Any = None) -> Any:
        return safe_load(path, allow=self.allow, map_location=map_location)


def use_safe_checkpoint_engine(engine: Engine) -> None:
    """Swap the engine's checkpoint engine for :class:`SafeCheckpointEngine` (ds_config never asks
    for DeepSpeed's other engines: fast/decoupled writers, Nebula, DataStates)."""
    current = engine.checkpoint_engine
    if type(current) is not TorchCheckpointEngine:
        raise RuntimeError(f"DeepSpeed chose checkpoint engine {type(current).__name__}; only TorchCheckpointEngine "
                           "can be made safe (remove checkpoint writer/datastates options from the DeepSpeed config)")
    engine.checkpoint_engine = SafeCheckpointEngine(engine._config)
    # DeepSpeed also copies its zero_to_fp32.py scripts beside the tags, i.e. into .incoming/, which
    # the next save wipes (export uses consolidated_state_dict). That copy bypasses the checkpoint
    # engine, so on a full disk it would raise on rank 0 alone: skip it.
    engine._copy_recovery_script = lambda save_path: None


@contextlib.contextmanager
def _weights_only_torch_load(allow: list[Any]) -> Iterator[None]:
    """zero_to_fp32 calls ``torch.load(..., weights_only=False)`` itself; while this is active every
    torch.load in the process is :func:`safe_load`. Only for export (one process, one thread)."""
    original = torch.load

    def load(f: Any, map_location: Any = None, weights_only: Optional[bool] = None, **kwargs: Any) -> Any:
        return safe_load(f, allow=allow, map_location=map_location, **kwargs)

    torch.load = load  # type: ignore[assignment]
    try:
        yield
    finally:
        torch.load = original  # type: ignore[assignment]


def consolidated_state_dict(checkpoint_dir: str | os.PathLike) -> dict[str, torch.Tensor]:
    """fp32 weights of the wrapped module from a DeepSpeed checkpoint folder (one tag), on CPU,
    without a process group: ZeRO 1-3 from the partitioned fp32 master copies, stage 0 from the
    module states file. Every file is read with weights_only=True; a damaged checkpoint (a file
    shorter than ``COMPLETE`` recorded) raises CheckpointError."""
    ckpt = Path(checkpoint_dir)
    problem = verify_checkpoint(ckpt) if (ckpt / COMPLETE).is_file() else None
    if problem is not None:
        raise CheckpointError(f"checkpoint {ckpt} is damaged: {problem}; export another checkpoint")
    allow = deepspeed_safe_globals()
    if glob.glob(str(ckpt / "*zero_pp_rank_*optim_states.pt")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        with _weights_only_torch_load(allow):
            state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name)
    else:
        files = sorted(ckpt.glob("mp_rank_*_model_states.pt"))
        if not files:
            raise FileNotFoundError(f"no DeepSpeed model states in {ckpt}")
        state = safe_load(files[0], allow=allow)["module"]
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
