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

from pretrain.losses.chunked import tiled_cross_entropy
from pretrain.losses.gather import gather_with_grad, world_info


class ClipLoss(nn.Module):
    def __init__(self, local_loss: bool = True, label_smoothing: float = 0.0, impl: str = "naive", tile: int = 1024) -> None:
        super().__init__()
        if impl not in ("naive", "chunked"):
            raise ValueError(f"impl={impl!r}: choose naive or chunked")
        self.local_loss = local_loss
        # ALIGN smooths the one-hot targets (0.1): captions are noisy and near-duplicate pairs in
        # a batch are not true negatives.
        self.label_smoothing = label_smoothing
        self.impl, self.tile = impl, tile

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
        """image_features, text_features (B, D) unit-norm on this rank; logit_scale () -> loss ()."""
        # Softmax over thousands of columns: do it in fp32 even when the towers run in bf16.
        img, txt, scale = image_features.float(), text_features.float(), logit_scale.float()
        rank, _ = world_info()
        all_img = gather_with_grad(img)  # (W*B, D)
        all_txt = gather_with_grad(txt)  # (W*B, D)
        if self.impl == "chunked":
            return self._chunked(img, txt, all_img, all_txt, scale, rank)
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

    def _chunked(self, img: torch.Tensor, txt: torch.Tensor, all_img: torch.Tensor, all_txt: torch.Tensor,
                 scale: torch.Tensor, rank: int) -> torch.Tensor:
        """The same loss without materialising the logits (see chunked.py)."""
        eps, tile = self.label_smoothing, self.tile
        if self.local_loss:  # two (B, W*B) matrices: this rank's images vs all texts, and back
            labels = torch.arange(img.shape[0], device=img.device) + rank * img.shape[0]  # (B,)
            i2t = tiled_cross_entropy(img, all_txt, scale, labels, label_smoothing=eps, tile=tile)
            t2i = tiled_cross_entropy(txt, all_img, scale, labels, label_smoothing=eps, tile=tile)
            return (i2t + t2i) / 2
        # One (W*B, W*B) matrix: its rows give image->text and its columns text->image, in one pass.
        labels = torch.arange(all_img.shape[0], device=img.device)  # (W*B,)
        return tiled_cross_entropy(all_img, all_txt, scale, labels, labels, w_row=0.5, w_col=0.5,
                                   label_smoothing=eps, tile=tile)
