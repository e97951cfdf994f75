"""CLIP: two towers, two linear projections into a shared space, and a learned temperature."""
from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import nn

from pretrain.config import ModelConfig
from pretrain.models.text import TextTransformer
from pretrain.models.vision import build_vision_tower


class CLIP(nn.Module):
    def __init__(self, cfg: ModelConfig, eos_id: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.visual = build_vision_tower(cfg.vision)
        self.text = TextTransformer(cfg.text, eos_id)
        self.visual_proj = nn.Linear(cfg.vision.width, cfg.embed_dim, bias=False)
        self.text_proj = nn.Linear(cfg.text.width, cfg.embed_dim, bias=False)
        nn.init.normal_(self.visual_proj.weight, std=cfg.vision.width**-0.5)
        nn.init.normal_(self.text_proj.weight, std=cfg.text.width**-0.5)
        # Stored as log(scale) so the optimiser works on an unconstrained value; shape (1,) because
        # DeepSpeed's parameter broadcast views each tensor as bytes, which a 0-dim tensor cannot do.
        self.logit_scale = nn.Parameter(torch.full((1,), cfg.init_logit_scale))
        self.max_logit_scale = cfg.max_logit_scale

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, H, W) -> unit-norm embeddings (B, D)."""
        return F.normalize(self.visual_proj(self.visual(images)), dim=-1)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B, L) -> unit-norm embeddings (B, D)."""
        return F.normalize(self.text_proj(self.text(tokens)), dim=-1)

    def scale(self) -> torch.Tensor:
        """exp(logit_scale), capped at 100 in the forward pass: a cap inside the graph stays
        correct under ZeRO, where an in-place clamp of the module weight after the optimizer step
        would be overwritten from the fp32 master copy."""
        return self.logit_scale.clamp(max=self.max_logit_scale).exp().squeeze(0)  # ()

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        return {
            "image_features": self.encode_image(images),  # (B, D)
            "text_features": self.encode_text(tokens),  # (B, D)
            "logit_scale": self.scale(),  # ()
        }

    def flops_per_sample(self) -> float:
        """Forward FLOPs for one (image, caption) pair; training costs ~3x this."""
        v, t = self.cfg.vision, self.cfg.text
        patches = (v.image_size // v.patch_size) ** 2
        vision = patches * 2 * 3 * v.patch_size**2 * v.width + _transformer_flops(patches + 1, v.width, v.layers, v.mlp_ratio)
        text = _transformer_flops(t.context_length, t.width, t.layers, t.mlp_ratio)
        heads = 2 * self.cfg.embed_dim * (v.width + t.width)
        return float(vision + text + heads)


def _transformer_flops(tokens: int, width: int, layers: int, mlp_ratio: float) -> float:
    # Per token and layer: qkv + out projections 4W^2, MLP 2rW^2 (x2 for multiply-add), plus the
    # attention scores and the weighted sum, 2 * 2 * T * W.
    dense = 2 * (4 + 2 * mlp_ratio) * width**2
    attention = 4 * tokens * width
    return layers * tokens * (dense + attention)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: decay tensors of 2+ dims (weights, embeddings); norm gains, biases and the
    temperature stay undecayed, as in CLIP."""
    decay, no_decay = [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


__all__ = ["CLIP", "param_groups"]
