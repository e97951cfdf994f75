"""Image tower: timm's VisionTransformer, sized by :class:`~pretrain.config.VisionConfig`."""
from __future__ import annotations

from timm.models.vision_transformer import VisionTransformer

from pretrain.config import VisionConfig


def build_vision_tower(cfg: VisionConfig) -> VisionTransformer:
    """A ViT returning the final-norm class token, (B, width); the CLIP head projects it."""
    return VisionTransformer(
        img_size=cfg.image_size,
        patch_size=cfg.patch_size,
        num_classes=0,  # no classifier head: forward() returns pooled features
        global_pool="token",
        embed_dim=cfg.width,
        depth=cfg.layers,
        num_heads=cfg.heads,
        mlp_ratio=cfg.mlp_ratio,
        pre_norm=True,  # CLIP's ViT: LayerNorm before the blocks, bias-free patch embedding
    )
