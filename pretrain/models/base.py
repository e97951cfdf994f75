"""What every tower pair shares: the learned temperature, the forward contract, AdamW groups.

Contract (the trainer, the evaluator, the export and data_prep's CLIP score rely on it):
- ``encode_image(images (B, 3, H, W)) -> (B, D)`` and ``encode_text(tokens (B, L)) -> (B, D)``,
  unit-norm; never masked, so evaluation is deterministic;
- ``forward(images, tokens) -> dict`` with ``image_features`` (B, D), ``text_features`` (B, D) and
  ``logit_scale`` (); a model with experts adds ``routing``: modality -> one
  :class:`~pretrain.models.moe.RoutingStats` per MoE layer, for the auxiliary losses;
- ``flops_per_sample()``: forward FLOPs of one (image, caption) pair, for ``train/mfu``;
- ``set_masking(enabled)``: FLIP turns patch masking off for its unmasked phase; others ignore it.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from pretrain.config import ModelConfig


class ContrastiveModel(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        # Stored as log(scale) so the optimiser works on an unconstrained value; shape (1,) because
        # DeepSpeed's parameter broadcast views each tensor as bytes, which a 0-dim tensor cannot do.
        self.logit_scale = nn.Parameter(torch.full((1,), cfg.init_logit_scale))
        self.max_logit_scale = cfg.max_logit_scale

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def flops_per_sample(self) -> float:
        raise NotImplementedError

    def set_masking(self, enabled: bool) -> None:
        """Only FLIP masks; the others have nothing to switch."""

    def scale(self) -> torch.Tensor:
        """exp(logit_scale), capped in the forward pass: a cap inside the graph stays correct under
        ZeRO, where an in-place clamp of the module weight after the optimizer step would be
        overwritten from the fp32 master copy."""
        return self.logit_scale.clamp(max=self.max_logit_scale).exp().squeeze(0)  # ()

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> dict[str, Any]:
        return {
            "image_features": self.encode_image(images),  # (B, D)
            "text_features": self.encode_text(tokens),  # (B, D)
            "logit_scale": self.scale(),  # ()
        }


def transformer_flops(tokens: int, width: int, layers: int, mlp_ratio: float) -> float:
    """Forward FLOPs of a pre-norm transformer over ``tokens`` positions."""
    # Per token and layer: qkv + out projections 4W^2, MLP 2rW^2 (x2 for multiply-add), plus the
    # attention scores and the weighted sum, 2 * 2 * T * W.
    dense = 2 * (4 + 2 * mlp_ratio) * width**2
    attention = 4 * tokens * width
    return layers * tokens * (dense + attention)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Optimizer groups: decay tensors of 2+ dims (weights, embeddings); norm gains, biases and the
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
