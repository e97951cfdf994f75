"""The contrastive loss: CLIP/ALIGN softmax or SigLIP sigmoid, over features from every rank.

One module, three choices:
- ``kind``: ``softmax`` (symmetric InfoNCE, optional label smoothing) or ``sigmoid`` (SigLIP,
  with a learnable bias held by this module);
- ``impl``: how the (rows x columns) similarity is computed: ``naive`` materialises it (the
  reference), ``chunked`` tiles it in PyTorch (O(rows x tile) memory), ``triton`` runs the same
  tiles as fused GPU kernels, ``auto`` picks triton for CUDA tensors and chunked otherwise;
- ``mode``: ``gather`` all-gathers the features with their gradient; ``ring`` passes feature
  blocks from rank to rank, so that no rank ever holds every feature (local loss only).

Gradient averaging across data-parallel ranks (DeepSpeed divides the summed gradient by W) turns
the per-rank losses into the loss of the global batch: in local-loss mode each rank's loss is the
mean over its own B rows, so the mean over ranks is the mean over all W*B rows; in full mode
every rank computes the same global loss and the gather's backward sums W identical copies,
which the 1/W average cancels.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from pretrain.losses.chunked import tiled_cross_entropy
from pretrain.losses.gather import gather_with_grad, world_info
from pretrain.losses.sigmoid import naive_sigmoid_loss

KINDS = ("softmax", "sigmoid")
IMPLS = ("naive", "chunked", "triton", "auto")
MODES = ("gather", "ring")


def naive_cross_entropy(rows: torch.Tensor, cols: torch.Tensor, scale: torch.Tensor, row_labels: torch.Tensor,
                        col_labels: torch.Tensor | None = None, w_row: float = 1.0, w_col: float = 0.0,
                        label_smoothing: float = 0.0, tile: int = 0) -> torch.Tensor:
    """The plain reference of :func:`~pretrain.losses.chunked.tiled_cross_entropy` (same
    signature; ``tile`` ignored): materialises the (n, m) logits."""
    z = scale.float() * rows.float() @ cols.float().T  # (n, m)
    loss = w_row * F.cross_entropy(z, row_labels, label_smoothing=label_smoothing) if w_row else z.new_zeros(())
    if w_col:
        loss = loss + w_col * F.cross_entropy(z.T, col_labels, label_smoothing=label_smoothing)
    return loss


def cross_entropy_fn(impl: str) -> Callable[..., torch.Tensor]:
    """The softmax cross-entropy of ``impl`` (naive, chunked or triton), one signature for all."""
    if impl == "triton":
        from pretrain.kernels.softmax_ce import triton_cross_entropy  # imports triton: only when asked

        return triton_cross_entropy
    return {"naive": naive_cross_entropy, "chunked": tiled_cross_entropy}[impl]


def sigmoid_fn(impl: str) -> Callable[..., torch.Tensor]:
    """SigLIP's loss of ``impl``: (rows, cols, scale, bias, row_labels, tile) -> ()."""
    if impl == "triton":
        from pretrain.kernels.sigmoid import triton_sigmoid_loss

        return triton_sigmoid_loss
    if impl == "chunked":
        from pretrain.losses.sigmoid import tiled_sigmoid_loss

        return tiled_sigmoid_loss
    return naive_sigmoid_loss


class ContrastiveLoss(nn.Module):
    def __init__(self, local_loss: bool = True, label_smoothing: float = 0.0, impl: str = "naive", tile: int = 1024,
                 kind: str = "softmax", mode: str = "gather", init_bias: float = -10.0) -> None:
        super().__init__()
        for name, value, allowed in (("kind", kind, KINDS), ("impl", impl, IMPLS), ("mode", mode, MODES)):
            if value not in allowed:
                raise ValueError(f"{name}={value!r}: choose one of {', '.join(allowed)}")
        if mode == "ring" and not local_loss:
            raise ValueError("mode='ring' needs local_loss=True: the full loss needs every feature on every rank")
        if kind == "sigmoid" and label_smoothing:
            raise ValueError("label_smoothing applies to the softmax loss only")
        self.local_loss = local_loss
        # ALIGN smooths the one-hot targets (0.1): captions are noisy and near-duplicate pairs in
        # a batch are not true negatives.
        self.label_smoothing = label_smoothing
        self.impl, self.tile, self.kind, self.mode = impl, tile, kind, mode
        # SigLIP's bias starts at -10 so that the many negatives do not swamp the first steps
        # (with scale 10, every logit starts near -10 and the loss near its optimum for negatives).
        # (1,), not (): DeepSpeed's parameter broadcast views every parameter as bytes, which a
        # 0-dim tensor cannot do (logit_scale is (1,) for the same reason).
        self.logit_bias = nn.Parameter(torch.full((1,), float(init_bias))) if kind == "sigmoid" else None

    def resolved_impl(self, x: torch.Tensor) -> str:
        """``auto`` -> triton on CUDA tensors, chunked elsewhere; otherwise ``impl`` as given."""
        if self.impl != "auto":
            return self.impl
        return "triton" if x.is_cuda else "chunked"

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
        """image_features, text_features (B, D) unit-norm on this rank; logit_scale () -> loss ()."""
        # Softmax over thousands of columns: do it in fp32 even when the towers run in bf16.
        img, txt, scale = image_features.float(), text_features.float(), logit_scale.float()
        rank, world = world_info()
        impl, tile = self.resolved_impl(img), self.tile
        if self.mode == "ring" and world > 1:
            return self._ring(img, txt, scale)
        labels = torch.arange(img.shape[0], device=img.device) + rank * img.shape[0]  # (B,) positives in the gathered batch
        if self.kind == "sigmoid":
            loss_fn = sigmoid_fn(impl)
            bias = self.logit_bias.float().squeeze(0)  # ()
            if self.local_loss:  # this rank's images against every text: each pair counted once
                return loss_fn(img, gather_with_grad(txt), scale, bias, labels, tile)
            all_labels = torch.arange(world * img.shape[0], device=img.device)
            return loss_fn(gather_with_grad(img), gather_with_grad(txt), scale, bias, all_labels, tile)
        eps, ce = self.label_smoothing, cross_entropy_fn(impl)
        all_img, all_txt = gather_with_grad(img), gather_with_grad(txt)  # (W*B, D) each
        # On one rank the two local matrices are one matrix and its transpose: the full path
        # below computes it once instead of twice.
        if self.local_loss and world > 1:  # two (B, W*B) matrices: this rank's images vs all texts, and back
            i2t = ce(img, all_txt, scale, labels, label_smoothing=eps, tile=tile)
            t2i = ce(txt, all_img, scale, labels, label_smoothing=eps, tile=tile)
            return (i2t + t2i) / 2
        # One (W*B, W*B) matrix: its rows give image->text and its columns text->image (one pass
        # over the tiles for the chunked and triton kernels).
        all_labels = torch.arange(all_img.shape[0], device=img.device)  # (W*B,)
        return ce(all_img, all_txt, scale, all_labels, all_labels, w_row=0.5, w_col=0.5, label_smoothing=eps, tile=tile)

    def _ring(self, img: torch.Tensor, txt: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """Local loss with the other ranks' features visiting block by block (see ring.py)."""
        from pretrain.losses.ring import ring_cross_entropy, ring_sigmoid_loss

        if self.kind == "sigmoid":
            return ring_sigmoid_loss(img, txt, scale, self.logit_bias.float().squeeze(0), self.tile)
        eps = self.label_smoothing
        return (ring_cross_entropy(img, txt, scale, eps, self.tile) + ring_cross_entropy(txt, img, scale, eps, self.tile)) / 2
