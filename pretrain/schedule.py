"""The learning-rate schedule and FLIP's two phases, as pure functions of the optimizer step.

Phase 1 is linear warmup then cosine decay to ``lr * min_lr_ratio`` over ``steps``. FLIP's
unmasked tuning (``model.flip.unmasked_fraction`` f > 0) is the last f of the run: masking off
and the learning rate times ``unmasked_lr_scale``. Both depend only on the step, so a resumed run
lands in the same phase at the same learning rate without any saved schedule state.
"""
from __future__ import annotations

import math

from pretrain.config import Arch, TrainConfig


def unmasked_from(cfg: TrainConfig) -> int:
    """First step of the unmasked phase; ``cfg.steps`` when there is none."""
    f = cfg.model.flip
    if cfg.model.arch != Arch.flip or f.unmasked_fraction == 0:
        return cfg.steps
    return cfg.steps - max(1, round(f.unmasked_fraction * cfg.steps))


def masking_enabled(cfg: TrainConfig, step: int) -> bool:
    """Whether the optimizer step ``step`` (0-based) trains masked; always, without a phase 2."""
    first = unmasked_from(cfg)
    return first == cfg.steps or step < first


def lr_multiplier(cfg: TrainConfig, step: int) -> float:
    """Learning rate of optimizer step ``step`` (0-based) as a fraction of ``optim.lr``."""
    o = cfg.optim
    if step < o.warmup_steps:
        factor = (step + 1) / o.warmup_steps
    else:
        span = max(1, cfg.steps - o.warmup_steps)
        progress = min(1.0, (step - o.warmup_steps) / span)
        factor = o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    if not masking_enabled(cfg, step):
        factor *= cfg.model.flip.unmasked_lr_scale
    return factor
