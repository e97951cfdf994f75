"""Towers: plain ``nn.Module``s that know nothing about ranks or DeepSpeed.

Sizes come from named presets in ``conf/model/*.yaml`` (``tiny_test`` for tests, ``demo`` for the CPU
demo, ``vit_b16``, ``vit_l14``, ``vit_h14``).
"""
from pretrain.models.clip import CLIP, param_groups

__all__ = ["CLIP", "param_groups"]
