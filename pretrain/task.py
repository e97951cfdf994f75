"""Model + loss as one module, so DeepSpeed wraps (and checkpoints) one thing."""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from pretrain.config import Arch, TrainConfig
from pretrain.losses import ContrastiveLoss, MoeAuxLoss
from pretrain.models import ContrastiveModel


class ContrastiveTask(nn.Module):
    def __init__(self, model: ContrastiveModel, loss: ContrastiveLoss, aux: Optional[MoeAuxLoss] = None) -> None:
        super().__init__()
        self.model = model
        self.loss = loss
        self.aux = aux  # router losses, for models that return ``routing`` (LiMoE)

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> dict[str, Any]:
        """images (B, 3, H, W), tokens (B, L) -> {"loss": (), "contrastive": (), "logit_scale": (),
        "metrics": {name: () detached}} where loss = contrastive + weighted auxiliary losses."""
        out = self.model(images, tokens)
        contrastive = self.loss(out["image_features"], out["text_features"], out["logit_scale"])
        loss, metrics = contrastive, {}
        if self.aux is not None and "routing" in out:
            aux_loss, metrics = self.aux(out["routing"])
            loss = loss + aux_loss.to(loss.dtype)
        if self.loss.logit_bias is not None:  # SigLIP's learned bias, logged beside the temperature
            metrics["train/logit_bias"] = self.loss.logit_bias.detach().squeeze(0)
        return {"loss": loss, "contrastive": contrastive.detach(), "logit_scale": out["logit_scale"].detach(), "metrics": metrics}


def build_task(cfg: TrainConfig, model: ContrastiveModel) -> ContrastiveTask:
    aux = MoeAuxLoss(cfg.model.moe) if cfg.model.arch == Arch.limoe else None
    c = cfg.loss
    loss = ContrastiveLoss(c.local_loss, c.label_smoothing, c.impl.value, c.tile, c.kind.value, c.mode.value, c.init_bias)
    return ContrastiveTask(model, loss, aux)
