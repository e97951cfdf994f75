"""FLIP (Li et al. 2023, "Scaling Language-Image Pre-training via Masking"): CLIP that, while
training, encodes only a random subset of each image's patches (and optionally of each caption's
positions). Fewer tokens per image make a step cheaper, so more pairs fit in the same compute.

- The kept count is fixed per batch (``keep_count``), so every image in a batch has the same
  sequence length and shapes stay static (no padding, no ragged attention).
- Positional embeddings are added before the selection: a kept patch still knows where it was.
- The class token is always kept: it is what the CLIP head pools.
- No reconstruction and no decoder: the contrastive loss is the only objective.
- Evaluation (``encode_image``/``encode_text``, or ``model.eval()``) never masks, and neither does
  training after ``set_masking(False)`` (FLIP's unmasked tuning phase).
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from timm.models import checkpoint_seq

from pretrain.config import ModelConfig
from pretrain.models.base import transformer_flops
from pretrain.models.clip import CLIP


def keep_count(total: int, mask_ratio: float) -> int:
    """How many of ``total`` positions survive masking ``mask_ratio`` of them (at least one)."""
    return max(1, total - round(total * mask_ratio))


def random_keep(batch: int, num_patches: int, keep: int, generator: Optional[torch.Generator] = None,
                device: Optional[torch.device] = None) -> torch.Tensor:
    """A uniformly random subset of ``keep`` patch indices per sample -> (B, keep) int64, ascending.

    Argsort of uniform noise gives every subset the same chance; sorting the kept indices only
    makes the kept sequence follow raster order (attention does not care, debugging does).
    """
    noise = torch.rand(batch, num_patches, generator=generator, device=device)  # (B, N)
    return noise.argsort(dim=1)[:, :keep].sort(dim=1).values  # (B, keep)


def random_text_keep(tokens: torch.Tensor, eos_id: int, keep: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Caption positions to keep -> (B, keep) int64, ascending (original order).

    The eos position is always kept (the causal tower pools there); then a random subset of the
    real tokens (bos and caption pieces, before eos); pad positions (after eos) only fill what is
    left, so short captions lose padding first, as FLIP's text masking prefers.
    """
    B, L = tokens.shape
    positions = torch.arange(L, device=tokens.device)  # (L,)
    eos_pos = (tokens == eos_id).int().argmax(dim=-1)  # (B,)
    real = positions[None, :] <= eos_pos[:, None]  # (B, L)
    # Scores in disjoint bands: pads [0, 1) < real tokens [1, 2) < eos 3, random within a band.
    score = torch.rand(B, L, generator=generator, device=tokens.device) + real.float()  # (B, L)
    score = score.scatter(1, eos_pos[:, None], 3.0)  # (B, L)
    return score.topk(keep, dim=1).indices.sort(dim=1).values  # (B, keep)


class FLIP(CLIP):
    def __init__(self, cfg: ModelConfig, eos_id: int) -> None:
        super().__init__(cfg, eos_id)
        self.mask_ratio = cfg.flip.mask_ratio
        self.text_mask_ratio = cfg.flip.text_mask_ratio
        self.num_patches = self.visual.patch_embed.num_patches
        self.image_keep = keep_count(self.num_patches, self.mask_ratio)
        self.masking = True

    def set_masking(self, enabled: bool) -> None:
        self.masking = enabled

    def encode_kept_patches(self, images: torch.Tensor, keep_idx: torch.Tensor) -> torch.Tensor:
        """images (B, 3, H, W), keep_idx (B, K) patch indices in [0, N) -> unit-norm (B, D), from the
        class token plus the K kept patches; the order of timm's ``forward_features`` + head, with
        the selection between the positional embedding and ``norm_pre``."""
        v = self.visual
        x = v._pos_embed(v.patch_embed(images))  # (B, P+N, W), P prefix tokens (the class token)
        prefix = v.num_prefix_tokens
        idx = (keep_idx + prefix)[..., None].expand(-1, -1, x.shape[-1])  # (B, K, W)
        x = torch.cat([x[:, :prefix], x.gather(1, idx)], dim=1)  # (B, P+K, W)
        x = v.norm_pre(v.patch_drop(x))  # (B, P+K, W)
        x = checkpoint_seq(v.blocks, x) if v.grad_checkpointing else v.blocks(x)  # (B, P+K, W)
        x = v.forward_head(v.norm(x))  # (B, W): the class token
        return F.normalize(self.visual_proj(x), dim=-1)  # (B, D)

    def encode_masked_text(self, tokens: torch.Tensor, keep_pos: torch.Tensor) -> torch.Tensor:
        """tokens (B, L), keep_pos (B, K) ascending positions including eos -> unit-norm (B, D); each
        kept token keeps its original position embedding."""
        kept = tokens.gather(1, keep_pos)  # (B, K)
        return F.normalize(self.text_proj(self.text(kept, positions=keep_pos)), dim=-1)  # (B, D)

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> dict[str, Any]:
        if not (self.training and self.masking):
            return super().forward(images, tokens)
        if self.image_keep < self.num_patches:
            keep_idx = random_keep(images.shape[0], self.num_patches, self.image_keep, device=images.device)  # (B, K)
            image_features = self.encode_kept_patches(images, keep_idx)  # (B, D)
        else:
            image_features = self.encode_image(images)  # (B, D)
        text_keep = keep_count(tokens.shape[1], self.text_mask_ratio)
        if text_keep < tokens.shape[1]:
            keep_pos = random_text_keep(tokens, self.text.eos_id, text_keep)  # (B, K)
            text_features = self.encode_masked_text(tokens, keep_pos)  # (B, D)
        else:
            text_features = self.encode_text(tokens)  # (B, D)
        return {"image_features": image_features, "text_features": text_features, "logit_scale": self.scale()}

    def flops_per_sample(self) -> float:
        """Forward FLOPs of one pair as training runs it: with masking on, the image tower's blocks
        see keep + 1 tokens (the patch embedding still runs on every patch, before the selection)
        and the text tower K positions; with masking off, CLIP's count."""
        full = super().flops_per_sample()
        if not self.masking:
            return full
        v, t = self.cfg.vision, self.cfg.text
        vision_saved = (transformer_flops(self.num_patches + 1, v.width, v.layers, v.mlp_ratio)
                        - transformer_flops(self.image_keep + 1, v.width, v.layers, v.mlp_ratio))
        text_keep = keep_count(t.context_length, self.text_mask_ratio)
        text_saved = (transformer_flops(t.context_length, t.width, t.layers, t.mlp_ratio)
                      - transformer_flops(text_keep, t.width, t.layers, t.mlp_ratio))
        return float(full - vision_saved - text_saved)
