"""FLIP: the image encoder sees exactly the kept patches, eval never masks, gradients reach every
parameter, text masking keeps eos and prefers real tokens, FLOPs follow the kept token count."""
from __future__ import annotations

from typing import Any

import pytest
import torch

from pretrain.config import Arch, FlipConfig, ModelConfig, TextConfig, VisionConfig
from pretrain.losses import ContrastiveLoss
from pretrain.models import CLIP, build_model
from pretrain.models.base import transformer_flops
from pretrain.models.flip import FLIP, keep_count, random_keep, random_text_keep
from pretrain.task import ContrastiveTask

EOS = 3


def flip_config(mask_ratio: float = 0.75, text_mask_ratio: float = 0.0, image_size: int = 32,
                patch_size: int = 4) -> ModelConfig:
    return ModelConfig(
        arch=Arch.flip, embed_dim=32,
        vision=VisionConfig(image_size=image_size, patch_size=patch_size, width=32, layers=2, heads=2),
        text=TextConfig(context_length=16, vocab_size=100, width=32, layers=2, heads=2),
        flip=FlipConfig(mask_ratio=mask_ratio, text_mask_ratio=text_mask_ratio),
    )


def captions(batch: int, length: int = 16) -> torch.Tensor:
    """bos, pieces, eos, pads: eos at 2..length-1, so some rows are short and some fill the context."""
    t = torch.randint(4, 100, (batch, length))  # (B, L)
    t[:, 0] = 2
    ends = torch.linspace(2, length - 1, batch).round().long()  # (B,)
    t[torch.arange(batch), ends] = EOS
    t[torch.arange(length)[None, :] > ends[:, None]] = 0
    return t


class BlockInput:
    """Records what enters the image tower's first block."""

    def __init__(self, model: FLIP) -> None:
        self.seen: list[torch.Tensor] = []
        model.visual.blocks[0].register_forward_pre_hook(lambda _m, args: self.seen.append(args[0].detach()))


def embedded_tokens(model: FLIP, images: torch.Tensor) -> torch.Tensor:
    """Every token as the unmasked path feeds it to the blocks: (B, 1+N, W), class token first."""
    v = model.visual
    with torch.no_grad():
        return v.norm_pre(v._pos_embed(v.patch_embed(images)))


def test_encoder_sees_exactly_the_chosen_patches_at_their_own_positions() -> None:
    torch.manual_seed(0)
    model = FLIP(flip_config(mask_ratio=0.75), eos_id=EOS)
    images = torch.randn(3, 3, 32, 32)  # (B, 3, H, W)
    keep = model.image_keep
    assert (model.num_patches, keep) == (64, 16)
    idx = random_keep(3, 64, keep, generator=torch.Generator().manual_seed(1))  # (B, K)
    assert idx.shape == (3, keep) and all(len(set(row.tolist())) == keep for row in idx)
    hook = BlockInput(model)
    model.encode_kept_patches(images, idx)
    full = embedded_tokens(model, images)  # (B, 65, W)
    expected = torch.cat([full[:, :1], full[torch.arange(3)[:, None], 1 + idx]], dim=1)  # (B, 1+K, W)
    assert hook.seen[0].shape == (3, 1 + keep, 32)
    # Same values, not merely the same shape: a position embedding added after the selection
    # (pos_embed[:1+K]) or a dropped class token would fail here.
    torch.testing.assert_close(hook.seen[0], expected)


def test_training_forward_encodes_a_random_subset_of_distinct_patches() -> None:
    torch.manual_seed(0)
    model = FLIP(flip_config(mask_ratio=0.5), eos_id=EOS).train()
    images = torch.randn(4, 3, 32, 32)
    hook = BlockInput(model)
    model(images, captions(4))
    seen, full = hook.seen[0], embedded_tokens(model, images)  # (B, 1+32, W), (B, 65, W)
    assert seen.shape == (4, 33, 32)
    torch.testing.assert_close(seen[:, 0], full[:, 0])  # class token kept, first
    # Match every kept token to the patch it came from: each is one real patch, no patch twice.
    dist = torch.cdist(seen[:, 1:], full[:, 1:], compute_mode="donot_use_mm_for_euclid_dist")  # (B, 32, 64)
    assert torch.all(dist.min(dim=-1).values < 1e-4)
    chosen = dist.argmin(dim=-1)  # (B, 32)
    assert all(len(set(row.tolist())) == 32 for row in chosen)
    assert len({tuple(row.tolist()) for row in chosen}) == 4  # per-sample subsets, not one shared mask


@pytest.mark.parametrize("image_size,patch_size,ratio,keep", [
    (32, 4, 0.5, 32), (32, 4, 0.75, 16),
    (28, 4, 0.5, 25), (28, 4, 0.75, 12),  # 49 patches: 49 - round(24.5) and 49 - round(36.75)
    (24, 8, 0.5, 5), (24, 8, 0.75, 2),  # 9 patches
    (40, 8, 0.5, 13), (40, 8, 0.75, 6),  # 25 patches
])
def test_keep_count_is_exact(image_size: int, patch_size: int, ratio: float, keep: int) -> None:
    model = FLIP(flip_config(ratio, image_size=image_size, patch_size=patch_size), eos_id=EOS).train()
    assert model.image_keep == keep == keep_count(model.num_patches, ratio)
    hook = BlockInput(model)
    model(torch.randn(2, 3, image_size, image_size), captions(2))
    assert hook.seen[0].shape[1] == 1 + keep


def test_keep_count_never_drops_everything() -> None:
    assert keep_count(4, 0.99) == 1 and keep_count(196, 0.0) == 196


def twins(cfg: ModelConfig) -> tuple[FLIP, CLIP]:
    flip = FLIP(cfg, eos_id=EOS)
    clip = CLIP(cfg, eos_id=EOS)
    clip.load_state_dict(flip.state_dict())
    return flip, clip


def test_eval_never_masks_and_matches_clip() -> None:
    torch.manual_seed(0)
    flip, clip = twins(flip_config(mask_ratio=0.75, text_mask_ratio=0.5))
    images, tokens = torch.randn(4, 3, 32, 32), captions(4)
    flip.train()  # encode_image is the evaluation path: unmasked even in training mode
    torch.testing.assert_close(flip.encode_image(images), clip.encode_image(images), rtol=0, atol=0)
    flip.eval()
    clip.eval()
    with torch.no_grad():
        a, b, ref = flip(images, tokens), flip(images, tokens), clip(images, tokens)
    for key in ("image_features", "text_features"):
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
        torch.testing.assert_close(a[key], ref[key], rtol=0, atol=0)


def test_training_masks_randomly_until_masking_is_switched_off() -> None:
    torch.manual_seed(0)
    flip, clip = twins(flip_config(mask_ratio=0.5))
    flip.train()
    clip.train()
    images, tokens = torch.randn(4, 3, 32, 32), captions(4)
    with torch.no_grad():
        a, b = flip(images, tokens), flip(images, tokens)
        assert not torch.allclose(a["image_features"], b["image_features"], atol=1e-4)
        flip.set_masking(False)
        unmasked, ref = flip(images, tokens), clip(images, tokens)
    torch.testing.assert_close(unmasked["image_features"], ref["image_features"], rtol=0, atol=0)
    torch.testing.assert_close(unmasked["text_features"], ref["text_features"], rtol=0, atol=0)


def test_every_parameter_gets_a_gradient_through_the_masked_forward() -> None:
    torch.manual_seed(0)
    task = ContrastiveTask(build_model(flip_config(mask_ratio=0.75, text_mask_ratio=0.5), eos_id=EOS), ContrastiveLoss())
    assert isinstance(task.model, FLIP)
    task.train()
    out = task(torch.randn(6, 3, 32, 32), captions(6))
    out["loss"].backward()
    missing = [n for n, p in task.named_parameters() if p.grad is None or not torch.any(p.grad != 0)]
    assert not missing, f"parameters without gradient: {missing}"
    assert task.model.logit_scale.grad is not None


def test_text_keep_holds_eos_then_real_tokens_then_pads() -> None:
    tokens = torch.tensor([
        [2, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, EOS, 0],  # 15 real positions
        [2, 10, 11, EOS, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],  # 4 real positions
        [2, 10, 11, 12, 13, 14, 15, EOS, 0, 0, 0, 0, 0, 0, 0, 0],  # 8 real positions
    ])
    K = keep_count(16, 0.5)
    subsets = set()
    for seed in range(20):
        kept = random_text_keep(tokens, EOS, K, generator=torch.Generator().manual_seed(seed))  # (3, K)
        assert kept.shape == (3, K) and torch.all(kept[:, 1:] > kept[:, :-1])  # original order
        assert 14 in kept[0] and bool(torch.all(kept[0] <= 14))  # a random 7 of the 14 others
        assert kept[1].tolist()[:4] == [0, 1, 2, 3]  # every real token; pads only fill the rest
        assert kept[2].tolist() == list(range(8))  # exactly K real tokens: all of them, no pad
        subsets.add(tuple(kept[0].tolist()))
    assert len(subsets) > 10  # random among the real tokens, not a fixed prefix


def test_masked_text_uses_original_positions() -> None:
    """Keeping every real token (dropping only pads) must not change the embedding: the tower got
    the kept tokens at their original positions and still pooled at eos."""
    torch.manual_seed(0)
    model = FLIP(flip_config(text_mask_ratio=0.5), eos_id=EOS).train()
    tokens = captions(4)[:2]  # eos at 2 and 6: at most 7 real positions, all kept
    kept = random_text_keep(tokens, EOS, keep_count(16, 0.5))
    calls: list[dict[str, Any]] = []
    model.text.register_forward_pre_hook(lambda _m, args, kwargs: calls.append(kwargs), with_kwargs=True)
    masked = model.encode_masked_text(tokens, kept)
    assert torch.equal(calls[0]["positions"], kept)
    torch.testing.assert_close(masked, model.encode_text(tokens), atol=1e-5, rtol=1e-5)


def test_flops_count_the_tokens_training_runs() -> None:
    cfg = flip_config(mask_ratio=0.75, text_mask_ratio=0.5)
    flip, clip = twins(cfg)
    v, t = cfg.vision, cfg.text
    expected = (clip.flops_per_sample()
                - transformer_flops(65, v.width, v.layers, v.mlp_ratio) + transformer_flops(17, v.width, v.layers, v.mlp_ratio)
                - transformer_flops(16, t.width, t.layers, t.mlp_ratio) + transformer_flops(8, t.width, t.layers, t.mlp_ratio))
    assert flip.flops_per_sample() == pytest.approx(expected)
    flip.set_masking(False)
    assert flip.flops_per_sample() == clip.flops_per_sample()
