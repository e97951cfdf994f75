"""Softmax contrastive loss (CLIP, ALIGN) over features gathered from every rank.

Gradient averaging across data-parallel ranks (DeepSpeed divides the summed gradient by W) turns
the per-rank losses into the loss of the global batch: in local-loss mode each rank's loss is the
mean over its own B rows, so the mean over ranks is the mean over all W*B rows; in full mode
every rank computes the same global loss and the gather's backward sums W identical copies,
which the 1/W average cancels.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pretrain.losses.gather import gather_with_grad, world_info


class ClipLoss(nn.Module):
    def __init__(self, local_loss: bool = True, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.local_loss = local_loss
        # ALIGN smooths the one-hot targets (0.1): captions are noisy and near-duplicate pairs in
        # a batch are not true negatives.
        self.label_smoothing = label_smoothing

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
        """image_features, text_features (B, D) unit-norm on this rank; logit_scale () -> loss ()."""
        # Softmax over thousands of columns: do it in fp32 even when the towers run in bf16.
        img, txt, scale = image_features.float(), text_features.float(), logit_scale.float()
        rank, _ = world_info()
        all_img = gather_with_grad(img)  # (W*B, D)
        all_txt = gather_with_grad(txt)  # (W*B, D)
        if self.local_loss:
            logits_per_image = scale * img @ all_txt.T  # (B, W*B)
            logits_per_text = scale * txt @ all_img.T  # (B, W*B)
            labels = torch.arange(img.shape[0], device=img.device) + rank * img.shape[0]  # (B,)
        else:
            logits_per_image = scale * all_img @ all_txt.T  # (W*B, W*B)
            logits_per_text = logits_per_image.T
            labels = torch.arange(all_img.shape[0], device=img.device)  # (W*B,)
        eps = self.label_smoothing
        return (F.cross_entropy(logits_per_image, labels, label_smoothing=eps)
                + F.cross_entropy(logits_per_text, labels, label_smoothing=eps)) / 2
