"""The learning-rate schedule and FLIP's unmasked phase, as functions of the step."""
from __future__ import annotations

import math

import pytest

from pretrain.config import Arch, FlipConfig, ModelConfig, OptimConfig, TrainConfig
from pretrain.schedule import lr_multiplier, masking_enabled, unmasked_from


def config(arch: Arch = Arch.clip, steps: int = 100, warmup: int = 10, unmasked: float = 0.0) -> TrainConfig:
    return TrainConfig(steps=steps, optim=OptimConfig(warmup_steps=warmup, min_lr_ratio=0.1),
                       model=ModelConfig(arch=arch, flip=FlipConfig(mask_ratio=0.5, unmasked_fraction=unmasked, unmasked_lr_scale=0.2)))


def test_warmup_then_cosine_to_min_ratio() -> None:
    cfg = config()
    assert lr_multiplier(cfg, 0) == pytest.approx(0.1)  # the first step already learns
    assert lr_multiplier(cfg, 9) == pytest.approx(1.0)
    assert lr_multiplier(cfg, 10) == pytest.approx(1.0)
    mid = 10 + 45  # half-way through the decay
    assert lr_multiplier(cfg, mid) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_multiplier(cfg, 100) == pytest.approx(0.1)
    values = [lr_multiplier(cfg, s) for s in range(10, 100)]
    assert values == sorted(values, reverse=True)


def test_flip_runs_both_phases_in_one_schedule() -> None:
    cfg = config(Arch.flip, unmasked=0.1)
    assert unmasked_from(cfg) == 90
    assert masking_enabled(cfg, 89) and not masking_enabled(cfg, 90)
    plain = config(Arch.flip)  # the same run without phase 2
    assert lr_multiplier(cfg, 89) == lr_multiplier(plain, 89)
    assert lr_multiplier(cfg, 95) == pytest.approx(0.2 * lr_multiplier(plain, 95))


def test_other_architectures_never_unmask_or_rescale() -> None:
    cfg = config(Arch.clip, unmasked=0.1)
    assert unmasked_from(cfg) == 100
    assert all(masking_enabled(cfg, s) for s in range(100))
    assert lr_multiplier(cfg, 95) == lr_multiplier(config(Arch.clip), 95)


def test_short_runs_keep_at_least_one_unmasked_step() -> None:
    assert unmasked_from(config(Arch.flip, steps=5, warmup=1, unmasked=0.01)) == 4
