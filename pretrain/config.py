"""Typed training config: these dataclasses are the schema, ``conf/*.yaml`` only gives values.

The schema is registered in hydra's ConfigStore as ``train_schema``; ``conf/train.yaml`` lists it
first in its defaults, so every YAML value and command-line override is type-checked by OmegaConf
(``engine.precision=fp8`` fails naming the field and the allowed values). Cross-field rules live in
``__post_init__`` and run when :func:`to_config` turns the DictConfig into these objects.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from launch.launcher_config import LauncherConfig


class ConfigError(ValueError):
    """A config value breaks a rule; the message names the field and what is allowed."""


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


class Precision(str, Enum):
    fp32 = "fp32"
    bf16 = "bf16"


class Arch(str, Enum):
    clip = "clip"  # ViT + causal text transformer (Radford et al. 2021)
    align = "align"  # EfficientNet + bidirectional [CLS] text encoder (Jia et al. 2021)
    flip = "flip"  # CLIP that encodes a random subset of patches while training (Li et al. 2023)
    limoe = "limoe"  # one shared transformer with MoE layers for both modalities (Mustafa et al. 2022)


class OptimizerName(str, Enum):
    adamw = "adamw"
    lamb = "lamb"  # layer-wise adaptive AdamW (You et al. 2020), ALIGN's large-batch optimizer


class LossImpl(str, Enum):
    naive = "naive"  # materialises the logits: the reference
    chunked = "chunked"  # tiles over columns, O(rows x tile) memory (pretrain/losses/chunked.py)
    triton = "triton"  # the same tiles as fused Triton kernels (CUDA; TRITON_INTERPRET=1 on CPU for tests)
    auto = "auto"  # triton on CUDA, chunked otherwise


class LossKind(str, Enum):
    softmax = "softmax"  # CLIP / ALIGN symmetric InfoNCE
    sigmoid = "sigmoid"  # SigLIP pairwise sigmoid with a learnable bias (Zhai et al. 2023)


class LossMode(str, Enum):
    gather = "gather"  # all-gather the features with their gradient
    ring = "ring"  # feature blocks travel rank to rank, overlapped with the tiles (local loss only)


class Offload(str, Enum):
    none = "none"
    cpu = "cpu"  # host memory (DeepSpeed's ZeRO-Offload)
    nvme = "nvme"  # local NVMe files under engine.nvme_path (ZeRO-Infinity)


class RouterImpl(str, Enum):
    torch = "torch"  # the PyTorch reference (pretrain/models/moe.py)
    triton = "triton"  # one Triton kernel: softmax, top-k, BPR positions, partial sums (pretrain/kernels/router.py)
    auto = "auto"  # triton on CUDA, torch otherwise


class NonfiniteAction(str, Enum):
    skip = "skip"  # drop the step's update (weights and optimizer untouched) and go on
    stop = "stop"  # end the run with an error; the last checkpoint is left as it is


class WandbMode(str, Enum):
    auto = "auto"  # online when WANDB_API_KEY is set, else offline
    offline = "offline"
    online = "online"
    disabled = "disabled"


@dataclass
class VisionConfig:
    image_size: int = 32
    patch_size: int = 4
    width: int = 64
    layers: int = 2
    heads: int = 2
    mlp_ratio: float = 4.0
    # A timm CNN for convolutional image towers (ALIGN: efficientnet_b0..b7); the ViT fields
    # above other than image_size do not apply to it.
    timm_model: str = "test_efficientnet"

    def __post_init__(self) -> None:
        _check(self.image_size >= 1, f"model.vision.image_size={self.image_size} must be >= 1")


@dataclass
class TextConfig:
    context_length: int = 16
    vocab_size: int = 0  # 0: taken from the tokenizer at build time
    width: int = 64
    layers: int = 2
    heads: int = 2
    mlp_ratio: float = 4.0

    def __post_init__(self) -> None:
        _check(self.context_length >= 3, f"model.text.context_length={self.context_length} must be >= 3 (bos, a token, eos)")
        _check(self.width % self.heads == 0, f"model.text.heads={self.heads} must divide model.text.width={self.width}")


@dataclass
class FlipConfig:
    """FLIP's masking (``model=flip`` sets mask_ratio 0.5); ignored by the other architectures."""

    mask_ratio: float = 0.0  # fraction of image patches dropped while training; eval never masks
    text_mask_ratio: float = 0.0  # fraction of caption positions dropped while training (eos always kept)
    # Phase 2, the last fraction of the run: no masking at lr * unmasked_lr_scale (FLIP's
    # unmasked tuning, which closes most of the gap to an unmasked model at a small cost).
    unmasked_fraction: float = 0.0
    unmasked_lr_scale: float = 0.1

    def __post_init__(self) -> None:
        _check(0 <= self.mask_ratio < 1, f"model.flip.mask_ratio={self.mask_ratio} must be in [0, 1)")
        _check(0 <= self.text_mask_ratio < 1, f"model.flip.text_mask_ratio={self.text_mask_ratio} must be in [0, 1)")
        _check(0 <= self.unmasked_fraction < 1, f"model.flip.unmasked_fraction={self.unmasked_fraction} must be in [0, 1)")
        _check(0 < self.unmasked_lr_scale <= 1, f"model.flip.unmasked_lr_scale={self.unmasked_lr_scale} must be in (0, 1]")


@dataclass
class MoeConfig:
    """LiMoE's experts (``model=limoe``); ignored by the other architectures."""

    num_experts: int = 8
    top_k: int = 1
    capacity_factor: float = 1.0  # slots per expert = ceil(capacity_factor * top_k * tokens / experts)
    every: int = 2  # every N-th layer's MLP is an MoE (the last of each group of N); 1: all
    # Std of the Gaussian noise on the router logits in training; null: 1/num_experts, V-MoE's and
    # LIMoE's choice. While the router is nearly flat the noise decides near-ties per token, so a
    # modality's tokens do not all follow the one offset they share; 0 turns it off.
    router_noise_std: Optional[float] = None
    router_impl: RouterImpl = RouterImpl.auto
    # Expert parallelism: experts are split over groups of ep_size ranks and tokens travel to them
    # by all-to-all; must divide num_experts and the world size.
    ep_size: int = 1
    # Auxiliary loss weights (0 turns one off) and LIMoE's global-entropy threshold tau in nats.
    importance_weight: float = 0.0
    load_weight: float = 0.01
    local_entropy_weight: float = 0.01
    global_entropy_weight: float = 0.01
    tau: float = 1.0  # keeps each modality spread over at least ~e^tau experts

    def __post_init__(self) -> None:
        _check(self.num_experts >= 1, f"model.moe.num_experts={self.num_experts} must be >= 1")
        _check(1 <= self.top_k <= self.num_experts,
               f"model.moe.top_k={self.top_k} must be between 1 and model.moe.num_experts={self.num_experts}")
        _check(self.capacity_factor > 0, f"model.moe.capacity_factor={self.capacity_factor} must be > 0")
        _check(self.every >= 1, f"model.moe.every={self.every} must be >= 1")
        _check(self.ep_size >= 1 and self.num_experts % self.ep_size == 0,
               f"model.moe.ep_size={self.ep_size} must divide model.moe.num_experts={self.num_experts}")
        _check(0 <= self.tau <= math.log(self.num_experts),
               f"model.moe.tau={self.tau} must be in [0, log(num_experts)={math.log(self.num_experts):.3f}]")
        for name in ("importance_weight", "load_weight", "local_entropy_weight", "global_entropy_weight"):
            _check(getattr(self, name) >= 0, f"model.moe.{name}={getattr(self, name)} must be >= 0")
        _check(self.router_noise_std is None or self.router_noise_std >= 0,
               f"model.moe.router_noise_std={self.router_noise_std} must be >= 0 (or null for 1/num_experts)")

    @property
    def noise_std(self) -> float:
        """The router noise std in effect: ``router_noise_std``, or 1/num_experts when unset."""
        return 1.0 / self.num_experts if self.router_noise_std is None else self.router_noise_std


@dataclass
class ModelConfig:
    arch: Arch = Arch.clip
    name: str = "tiny_test"  # the size preset (conf/size/)
    # ALIGN with embed_dim 0: the image embedding is the CNN's pooled features, as in the paper.
    embed_dim: int = 32
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    init_logit_scale: float = math.log(1 / 0.07)
    max_logit_scale: float = math.log(100)  # CLIP's cap on the learned temperature
    flip: FlipConfig = field(default_factory=FlipConfig)
    moe: MoeConfig = field(default_factory=MoeConfig)

    def __post_init__(self) -> None:
        _check(self.init_logit_scale <= self.max_logit_scale,
               f"model.init_logit_scale={self.init_logit_scale} exceeds model.max_logit_scale={self.max_logit_scale}")
        _check(self.embed_dim >= 0, f"model.embed_dim={self.embed_dim} must be >= 0")
        _check(self.embed_dim > 0 or self.arch == Arch.align,
               f"model.embed_dim=0 is only allowed for model=align (the CNN's width); model={self.arch.value} needs a size")
        if self.arch != Arch.align:  # ViT patches; ALIGN's CNN takes any image size
            v = self.vision
            _check(v.image_size % v.patch_size == 0,
                   f"model.vision.patch_size={v.patch_size} must divide model.vision.image_size={v.image_size}")
            _check(v.width % v.heads == 0, f"model.vision.heads={v.heads} must divide model.vision.width={v.width}")
        _check(self.arch == Arch.limoe or self.moe.ep_size == 1,
               f"model.moe.ep_size={self.moe.ep_size} needs model=limoe (model={self.arch.value} has no experts)")


@dataclass
class DataConfig:
    # A folder written by `python -m data_prep build`: a local path, s3://, gs://, http(s):// or a
    # pipe: command template (data_prep/storage.py); credentials come from the environment, never from here.
    root: str = "runs/demo/data"
    train: str = "${data.root}/train"  # a manifest.json or the folder holding one
    tokenizer: str = "${data.root}/tokenizer.model"  # sentencepiece model (pad=0 unk=1 bos=2 eos=3)
    batch_size: int = 64  # per rank, per micro-step
    num_workers: int = 1  # loader processes per rank; 0 reads in the training process
    shuffle_buffer: int = 2000
    seed: int = 0
    # Per-rank log of the sample uids each step trained on: <run_dir>/uids/rank_XXXXX.jsonl, one
    # line per step. On resume it is cut back to the checkpoint's step, so it lists exactly the
    # samples whose gradient reached the model (audits, the chaos tests). Off by default.
    log_uids: bool = False

    def __post_init__(self) -> None:
        _check(self.batch_size >= 1, f"data.batch_size={self.batch_size} must be >= 1")
        _check(self.num_workers >= 0, f"data.num_workers={self.num_workers} must be >= 0")
        _check(self.shuffle_buffer >= 0, f"data.shuffle_buffer={self.shuffle_buffer} must be >= 0")


@dataclass
class LossConfig:
    # local_loss: each rank scores its own rows against all gathered columns (labels offset by
    # rank): O(B x W*B) logits per rank instead of O(W*B x W*B), same gradients.
    local_loss: bool = True
    label_smoothing: float = 0.0  # ALIGN uses 0.1
    kind: LossKind = LossKind.softmax
    impl: LossImpl = LossImpl.auto
    mode: LossMode = LossMode.gather
    tile: int = 1024  # columns per tile of the chunked loss
    init_bias: float = -10.0  # SigLIP's learnable logit bias at step 0 (sigmoid only)

    def __post_init__(self) -> None:
        _check(0 <= self.label_smoothing < 1, f"loss.label_smoothing={self.label_smoothing} must be in [0, 1)")
        _check(self.tile >= 1, f"loss.tile={self.tile} must be >= 1")
        _check(not (self.mode == LossMode.ring and not self.local_loss),
               "loss.mode=ring needs loss.local_loss=true (the full loss needs every feature on every rank)")
        _check(not (self.kind == LossKind.sigmoid and self.label_smoothing),
               "loss.label_smoothing applies to loss.kind=softmax only; set it to 0 for sigmoid")


@dataclass
class OptimConfig:
    name: OptimizerName = OptimizerName.adamw
    lr: float = 1e-3
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.98
    eps: float = 1e-6
    warmup_steps: int = 50
    min_lr_ratio: float = 0.0  # cosine decays to lr * min_lr_ratio

    def __post_init__(self) -> None:
        _check(self.lr > 0, f"optim.lr={self.lr} must be > 0")
        _check(0 <= self.min_lr_ratio <= 1, f"optim.min_lr_ratio={self.min_lr_ratio} must be in [0, 1]")
        _check(self.warmup_steps >= 0, f"optim.warmup_steps={self.warmup_steps} must be >= 0")


@dataclass
class EngineConfig:
    zero_stage: int = 2
    precision: Precision = Precision.fp32
    grad_clip: float = 1.0  # 0 disables clipping
    # Gradient accumulation multiplies the samples per optimizer step but NOT the negatives: the
    # contrastive loss of each micro-step only sees the W x batch_size samples of that micro-step.
    grad_accum: int = 1
    backend: str = "auto"  # auto: nccl with CUDA, gloo on CPU
    # Peak dense TFLOP/s of one device, for train/mfu. None: a known GPU's datasheet figure, or on
    # CPU a matmul measured at start-up (so CPU MFU is relative to what this machine achieves).
    peak_tflops: Optional[float] = None
    # ZeRO's communication, as DeepSpeed's zero_optimization names them; None keeps DeepSpeed's default.
    overlap_comm: Optional[bool] = None  # reduce gradients while the backward pass still runs
    contiguous_gradients: Optional[bool] = None  # copy gradients into one buffer as they are produced
    reduce_bucket_size: Optional[int] = None  # elements per gradient reduction
    allgather_bucket_size: Optional[int] = None  # elements per parameter all-gather (ZeRO-1/2)
    offload_optimizer: Offload = Offload.none  # optimizer state and step on the host or NVMe (ZeRO >= 1)
    offload_param: Offload = Offload.none  # parameters on the host or NVMe (ZeRO-3)
    nvme_path: Optional[str] = None  # a fast local folder, for the nvme offloads

    def __post_init__(self) -> None:
        _check(self.zero_stage in (0, 1, 2, 3), f"engine.zero_stage={self.zero_stage} is not allowed: choose 0, 1, 2 or 3")
        for name in ("reduce_bucket_size", "allgather_bucket_size"):
            value = getattr(self, name)
            _check(value is None or value >= 1, f"engine.{name}={value} must be >= 1 (elements), or null for DeepSpeed's default")
        _check(self.offload_optimizer == Offload.none or self.zero_stage >= 1,
               f"engine.offload_optimizer={self.offload_optimizer.value} needs engine.zero_stage >= 1 (ZeRO-Offload "
               "partitions the optimizer state first)")
        _check(self.offload_param == Offload.none or self.zero_stage == 3,
               f"engine.offload_param={self.offload_param.value} needs engine.zero_stage=3 (only stage 3 partitions parameters)")
        nvme = Offload.nvme in (self.offload_optimizer, self.offload_param)
        _check(not nvme or bool(self.nvme_path),
               "an nvme offload needs engine.nvme_path: a folder on a local NVMe drive (e.g. /local_nvme/deepspeed)")
        _check(self.grad_accum >= 1, f"engine.grad_accum={self.grad_accum} must be >= 1")
        _check(self.grad_clip >= 0, f"engine.grad_clip={self.grad_clip} must be >= 0")
        _check(self.backend in ("auto", "nccl", "gloo"), f"engine.backend={self.backend!r} is not allowed: choose auto, nccl or gloo")


@dataclass
class CheckpointConfig:
    every: int = 100  # steps; a final checkpoint is always written
    keep: int = 2  # newest complete checkpoints kept; older ones are deleted
    resume: str = "auto"  # auto: newest complete checkpoint in run_dir if any | none | a checkpoint path
    # Also save once this many minutes of wall time have passed since the last save (rank 0's
    # clock decides for all): bounds the work lost to a failure whatever the step time. None: off.
    every_minutes: Optional[float] = None

    def __post_init__(self) -> None:
        _check(self.every >= 1, f"checkpoint.every={self.every} must be >= 1")
        _check(self.every_minutes is None or self.every_minutes > 0,
               f"checkpoint.every_minutes={self.every_minutes} must be > 0, or null to save by steps only")
        _check(self.keep >= 1, f"checkpoint.keep={self.keep} must be >= 1")


@dataclass
class NonfiniteConfig:
    """What a step whose loss is NaN or inf on any rank does (all ranks decide together)."""

    action: NonfiniteAction = NonfiniteAction.skip
    # skip: after this many non-finite steps in a row the run stops anyway (it has diverged).
    max_consecutive: int = 10

    def __post_init__(self) -> None:
        _check(self.max_consecutive >= 1, f"nonfinite.max_consecutive={self.max_consecutive} must be >= 1")


@dataclass
class DebugConfig:
    """Fault injection for the reliability tests (tests/chaos); leave empty in real runs."""

    # Steps (1-based, as logged) whose loss rank 0 turns into NaN before the finiteness check.
    # Only rank 0: the other ranks must learn of it through the check's all_reduce.
    nan_at_steps: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        _check(all(s >= 1 for s in self.nan_at_steps), f"debug.nan_at_steps={self.nan_at_steps}: steps are >= 1")


@dataclass
class WandbConfig:
    mode: WandbMode = WandbMode.auto
    project: str = "clipforge"
    entity: Optional[str] = None
    name: Optional[str] = None


@dataclass
class ZeroShotSet:
    name: str = "fashion_mnist"
    root: str = "/usr/share/datasets/fashion-mnist"
    limit: Optional[int] = None  # first N test images (periodic evals use eval.periodic_limit)


@dataclass
class RetrievalSet:
    name: str = "tuxpaint"
    data: str = "${data.root}/heldout"  # manifest of a held-out split


@dataclass
class EvalConfig:
    every: int = 0  # steps between periodic evals; 0: only at the end
    batch_size: int = 256
    periodic_limit: Optional[int] = 2000  # zero-shot images used by periodic evals (the final uses all)
    zeroshot: list[ZeroShotSet] = field(default_factory=lambda: [ZeroShotSet()])
    retrieval: list[RetrievalSet] = field(default_factory=lambda: [RetrievalSet()])


@dataclass
class TrainConfig:
    run_dir: str = "runs/demo/train"
    steps: int = 100  # optimizer steps of the whole schedule (warmup + cosine)
    # End THIS run after step N with a checkpoint (the schedule still spans `steps`); a later run
    # with the same run_dir resumes. For jobs with a time limit shorter than the schedule.
    stop_at: Optional[int] = None
    seed: int = 0
    log_every: int = 10
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    nonfinite: NonfiniteConfig = field(default_factory=NonfiniteConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    # How `python -m launch` starts the run (torchrun here or Slurm); the trainer ignores it.
    launcher: LauncherConfig = field(default_factory=LauncherConfig)

    def __post_init__(self) -> None:
        _check(self.steps >= 1, f"steps={self.steps} must be >= 1")
        _check(self.log_every >= 1, f"log_every={self.log_every} must be >= 1")
        _check(self.stop_at is None or 1 <= self.stop_at <= self.steps,
               f"stop_at={self.stop_at} must be between 1 and steps={self.steps}")
        _check(self.optim.warmup_steps <= self.steps,
               f"optim.warmup_steps={self.optim.warmup_steps} exceeds steps={self.steps}")
        _check(self.engine.offload_optimizer == Offload.none or self.optim.name == OptimizerName.adamw,
               f"engine.offload_optimizer={self.engine.offload_optimizer.value} needs optim.name=adamw (DeepSpeed's "
               f"offloaded step is its CPU Adam; {self.optim.name.value} has none)")

    def check_world(self, world_size: int) -> None:
        """Rules that need the number of ranks or the machine (known at launch, before any rank starts)."""
        _check(world_size % self.model.moe.ep_size == 0,
               f"model.moe.ep_size={self.model.moe.ep_size} must divide the world size {world_size} (ranks)")
        import torch  # here, not at the top: the config schema stays importable without torch's start-up cost

        # Compiled Triton kernels need a GPU; TRITON_INTERPRET=1 runs them on CPU (slowly: tests only).
        kernels_run = torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"
        _check(kernels_run or self.loss.impl != LossImpl.triton,
               "loss.impl=triton needs a CUDA GPU (none visible); use loss.impl=auto (chunked on CPU) or chunked")
        _check(kernels_run or self.model.moe.router_impl != RouterImpl.triton,
               "model.moe.router_impl=triton needs a CUDA GPU (none visible); use auto or torch")


def register_configs() -> None:
    ConfigStore.instance().store(name="train_schema", node=TrainConfig)


def to_config(cfg: DictConfig) -> TrainConfig:
    """Instantiate the typed config (running every ``__post_init__`` check)."""
    obj = OmegaConf.to_object(cfg)
    assert isinstance(obj, TrainConfig), f"expected a TrainConfig, got {type(obj).__name__}"
    return obj


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain, JSON/YAML-ready dict of a config (enums as their values)."""
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True, enum_to_str=True)  # type: ignore[return-value]


register_configs()
