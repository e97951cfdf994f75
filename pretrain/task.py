"""Model + loss as one module, so DeepSpeed wraps (and checkpoints) one thing."""
from __future__ import annotations

import torch
from torch import nn

from pretrain.losses import ClipLoss
from pretrain.models import CLIP


class ContrastiveTask(nn.Module):
    def __init__(self, model: CLIP, loss: ClipLoss) -> None:
        super().__init__()
        self.model = model
        self.loss = loss

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        """images (B, 3, H, W), tokens (B, L) -> {"loss": (), "contrastive": (), "logit_scale": ()}."""
        out = self.model(images, tokens)
        contrastive = self.loss(out["image_features"], out["text_features"], out["logit_scale"])
        return {"loss": contrastive, "contrastive": contrastive.detach(), "logit_scale": out["logit_scale"].detach()}
