"""ALIGN (Jia et al. 2021): an EfficientNet and a BERT-style bidirectional text encoder.

The image embedding is the CNN's globally average-pooled features, with no projection (the paper's
choice, ``model.embed_dim=0``); a positive ``embed_dim`` adds a bias-free linear projection, for
smaller shared spaces. The text side is pooled at [CLS] and mapped to the image width by a fully
connected layer with linear activation. Both are L2-normalised and compared with one learned
temperature, initialised at 1.0 (``init_logit_scale=0``) by the config.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Optional

import timm
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from pretrain.config import ModelConfig
from pretrain.models.base import ContrastiveModel, transformer_flops
from pretrain.models.text import TextTransformer


def build_cnn(timm_model: str) -> nn.Module:
    """A timm CNN returning globally average-pooled features (B, num_features), no classifier."""
    return timm.create_model(timm_model, pretrained=False, num_classes=0, global_pool="avg")


@lru_cache(maxsize=None)
def cnn_flops(timm_model: str, image_size: int) -> float:
    """Forward FLOPs of one image through ``timm_model``, counted (convolutions and matmuls) rather
    than derived from a formula, since EfficientNet's compound scaling makes one unwieldy.

    Measured on a fresh copy on the meta device: shapes only, so it costs no compute, leaves the
    real tower's batch-norm statistics alone and works when its weights are sharded (ZeRO-3).
    """
    with torch.device("meta"):
        cnn = build_cnn(timm_model).eval()
        image = torch.empty(1, 3, image_size, image_size)  # (1, 3, H, W)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        cnn(image)
    return float(counter.get_total_flops())


class ALIGN(ContrastiveModel):
    def __init__(self, cfg: ModelConfig, eos_id: int) -> None:
        super().__init__(cfg)
        self.visual = build_cnn(cfg.vision.timm_model)
        cnn_width = self.visual.num_features
        self.embed_dim = cfg.embed_dim or cnn_width
        self.visual_proj: Optional[nn.Linear] = None
        if cfg.embed_dim:
            self.visual_proj = nn.Linear(cnn_width, cfg.embed_dim, bias=False)
            nn.init.normal_(self.visual_proj.weight, std=cnn_width**-0.5)
        self.text = TextTransformer(cfg.text, eos_id, causal=False)
        self.text_proj = nn.Linear(cfg.text.width, self.embed_dim)
        nn.init.normal_(self.text_proj.weight, std=cfg.text.width**-0.5)
        nn.init.zeros_(self.text_proj.bias)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, H, W) -> unit-norm embeddings (B, D)."""
        x = self.visual(images)  # (B, num_features)
        if self.visual_proj is not None:
            x = self.visual_proj(x)  # (B, D)
        return F.normalize(x, dim=-1)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B, L), bos at index 0 and pad=0 after eos -> unit-norm embeddings (B, D)."""
        return F.normalize(self.text_proj(self.text(tokens)), dim=-1)

    def flops_per_sample(self) -> float:
        """Forward FLOPs for one (image, caption) pair; training costs ~3x this."""
        v, t = self.cfg.vision, self.cfg.text
        vision = cnn_flops(v.timm_model, v.image_size)
        if self.visual_proj is not None:
            vision += 2 * self.visual.num_features * self.embed_dim
        text = transformer_flops(t.context_length, t.width, t.layers, t.mlp_ratio) + 2 * t.width * self.embed_dim
        return float(vision + text)
