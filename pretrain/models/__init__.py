"""Towers: plain ``nn.Module``s that know nothing about ranks or DeepSpeed.

``model=`` picks the architecture (``conf/model/``: clip, align, flip, limoe) and ``size=`` its size
(``conf/size/``: ``tiny_test`` for tests, ``demo`` for the CPU demo, ``vit_b16``, ``vit_l14``,
``vit_h14``). :func:`build_model` is the one place that maps the config to a class.
"""
from __future__ import annotations

from pretrain.config import Arch, ModelConfig
from pretrain.models.base import ContrastiveModel, param_groups
from pretrain.models.clip import CLIP


def build_model(cfg: ModelConfig, eos_id: int) -> ContrastiveModel:
    """The tower pair of ``cfg.arch``; ``cfg.text.vocab_size`` must be set (from the tokenizer)."""
    if cfg.arch == Arch.clip:
        return CLIP(cfg, eos_id)
    if cfg.arch == Arch.align:
        from pretrain.models.align import ALIGN

        return ALIGN(cfg, eos_id)
    if cfg.arch == Arch.flip:
        from pretrain.models.flip import FLIP

        return FLIP(cfg, eos_id)
    if cfg.arch == Arch.limoe:
        from pretrain.models.limoe import LiMoE

        return LiMoE(cfg, eos_id)
    raise ValueError(f"model.arch={cfg.arch!r}: unknown architecture")


__all__ = ["CLIP", "ContrastiveModel", "build_model", "param_groups"]
