"""CLIP: a ViT and a causal text transformer, two linear projections into a shared space."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pretrain.config import ModelConfig
from pretrain.models.base import ContrastiveModel, transformer_flops
from pretrain.models.text import TextTransformer
from pretrain.models.vision import build_vision_tower


class CLIP(ContrastiveModel):
    def __init__(self, cfg: ModelConfig, eos_id: int) -> None:
        super().__init__(cfg)
        self.visual = build_vision_tower(cfg.vision)
        self.text = TextTransformer(cfg.text, eos_id)
        self.visual_proj = nn.Linear(cfg.vision.width, cfg.embed_dim, bias=False)
        self.text_proj = nn.Linear(cfg.text.width, cfg.embed_dim, bias=False)
        nn.init.normal_(self.visual_proj.weight, std=cfg.vision.width**-0.5)
        nn.init.normal_(self.text_proj.weight, std=cfg.text.width**-0.5)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, H, W) -> unit-norm embeddings (B, D)."""
        return F.normalize(self.visual_proj(self.visual(images)), dim=-1)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B, L) -> unit-norm embeddings (B, D)."""
        return F.normalize(self.text_proj(self.text(tokens)), dim=-1)

    def flops_per_sample(self) -> float:
        """Forward FLOPs for one (image, caption) pair; training costs ~3x this."""
        v, t = self.cfg.vision, self.cfg.text
        patches = (v.image_size // v.patch_size) ** 2
        vision = patches * 2 * 3 * v.patch_size**2 * v.width + transformer_flops(patches + 1, v.width, v.layers, v.mlp_ratio)
        text = transformer_flops(t.context_length, t.width, t.layers, t.mlp_ratio)
        heads = 2 * self.cfg.embed_dim * (v.width + t.width)
        return float(vision + text + heads)
