"""ALIGN: EfficientNet + bidirectional [CLS] text encoder, temperature 1.0, label-smoothed loss;
and the text tower's two forms (causal for CLIP, bidirectional for ALIGN) and position ids."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pretrain.config import Arch, ModelConfig, TextConfig, VisionConfig
from pretrain.losses import ContrastiveLoss
from pretrain.models import build_model
from pretrain.models.align import ALIGN
from pretrain.models.text import TextTransformer
from pretrain.task import ContrastiveTask

EOS = 3


def align_config(embed_dim: int = 0, timm_model: str = "test_efficientnet", image_size: int = 32) -> ModelConfig:
    return ModelConfig(
        arch=Arch.align,
        embed_dim=embed_dim,
        init_logit_scale=0.0,
        vision=VisionConfig(image_size=image_size, patch_size=4, timm_model=timm_model),
        text=TextConfig(context_length=16, vocab_size=100, width=32, layers=2, heads=2),
    )


def captions(batch: int, length: int = 16, vocab: int = 100) -> torch.Tensor:
    """bos, random pieces, eos at a random place, then pad: (B, L) like the tokenizer writes."""
    t = torch.randint(4, vocab, (batch, length))  # (B, L)
    t[:, 0] = 2
    ends = torch.randint(2, length, (batch,))
    t[torch.arange(batch), ends] = EOS
    t[torch.arange(length)[None, :] > ends[:, None]] = 0
    return t


def test_build_model_picks_align() -> None:
    assert isinstance(build_model(align_config(), eos_id=EOS), ALIGN)


def test_every_parameter_gets_a_gradient_with_label_smoothing() -> None:
    torch.manual_seed(0)
    task = ContrastiveTask(ALIGN(align_config(), eos_id=EOS), ContrastiveLoss(label_smoothing=0.1))
    out = task(torch.randn(6, 3, 32, 32), captions(6))
    assert out["loss"].ndim == 0 and torch.isfinite(out["loss"])
    out["loss"].backward()
    missing = [n for n, p in task.named_parameters() if p.grad is None or not torch.any(p.grad != 0)]
    assert not missing, f"parameters without gradient: {missing}"
    assert task.model.logit_scale.grad is not None and task.model.logit_scale.grad.abs().item() > 0


def test_temperature_starts_at_one() -> None:
    model = ALIGN(align_config(), eos_id=EOS)
    assert model.scale().item() == 1.0


def test_embedding_width_is_the_cnn_width_unless_projected() -> None:
    torch.manual_seed(0)
    images, tokens = torch.randn(3, 3, 32, 32), captions(3)
    plain = ALIGN(align_config(embed_dim=0), eos_id=EOS)
    out = plain(images, tokens)
    assert plain.visual.num_features == 256  # test_efficientnet's head width
    assert out["image_features"].shape == (3, 256) == out["text_features"].shape
    assert torch.allclose(out["image_features"].norm(dim=-1), torch.ones(3), atol=1e-5)
    assert torch.allclose(out["text_features"].norm(dim=-1), torch.ones(3), atol=1e-5)
    projected = ALIGN(align_config(embed_dim=24), eos_id=EOS)
    out = projected(images, tokens)
    assert out["image_features"].shape == (3, 24) == out["text_features"].shape


def test_text_encoder_is_bidirectional_but_clip_stays_causal() -> None:
    torch.manual_seed(0)
    cfg = align_config().text
    a = torch.tensor([[2, 10, 11, 12, 13, EOS, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]])
    b = a.clone()
    b[0, 3] = 40  # after position 1, i.e. after [CLS] and the first piece
    bert = TextTransformer(cfg, EOS, causal=False).eval()
    assert not torch.allclose(bert(a), bert(b), atol=1e-4)  # [CLS] sees the whole caption
    clip = TextTransformer(cfg, EOS).eval()  # the default is CLIP's causal encoder
    c = a.clone()
    c[0, 6:] = torch.randint(4, 100, (10,))  # change only what follows eos
    assert torch.allclose(clip(a), clip(c), atol=1e-6)
    assert not torch.allclose(clip(a), clip(b), atol=1e-4)  # but a change before eos counts


def test_padding_is_never_attended() -> None:
    """A caption padded to 16 encodes as the same ids cut to 12: pad keys are masked out."""
    torch.manual_seed(0)
    model = ALIGN(align_config(), eos_id=EOS).eval()
    full = torch.tensor([[2, 17, 18, 19, 20, 21, 22, EOS, 0, 0, 0, 0, 0, 0, 0, 0],
                         [2, 30, 31, EOS, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]])
    assert torch.allclose(model.encode_text(full), model.encode_text(full[:, :12]), atol=1e-5)
    # Without the mask the pad tokens would be attended and the two would differ.
    unmasked = full.clone()
    unmasked[unmasked == 0] = 5
    assert not torch.allclose(model.encode_text(unmasked), model.encode_text(unmasked[:, :12]), atol=1e-4)


def test_label_smoothed_loss_matches_hand_computed_cross_entropy() -> None:
    torch.manual_seed(0)
    B, D, eps, scale = 5, 8, 0.1, torch.tensor(10.0)
    img = F.normalize(torch.randn(B, D), dim=-1)  # (B, D)
    # Captions near their images, so the softmax is peaked and smoothing visibly moves the loss.
    txt = F.normalize(img + 0.3 * torch.randn(B, D), dim=-1)  # (B, D)
    logits = scale * img @ txt.T  # (B, B) image i against caption j
    # Smoothed targets: 1 - eps on the true pair, and eps spread evenly over all B columns.
    targets = (1 - eps) * torch.eye(B) + eps / B  # (B, B)
    image_to_text = -(targets * F.log_softmax(logits, dim=1)).sum(dim=1).mean()
    text_to_image = -(targets * F.log_softmax(logits.T, dim=1)).sum(dim=1).mean()
    expected = (image_to_text + text_to_image) / 2
    assert ContrastiveLoss(label_smoothing=eps)(img, txt, scale).item() == pytest.approx(expected.item(), rel=1e-6)
    assert ContrastiveLoss()(img, txt, scale).item() < 0.9 * expected.item()  # smoothing is not a no-op


def test_positions_select_the_original_positional_embeddings() -> None:
    torch.manual_seed(0)
    text = TextTransformer(align_config().text, EOS).eval()
    tokens = torch.tensor([[2, 10, 11, 12, 13, 14, EOS, 0, 0, 0, 0, 0, 0, 0, 0, 0],
                           [2, 20, 21, EOS, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]])
    assert torch.allclose(text(tokens), text(tokens, positions=torch.arange(16).expand(2, 16)), atol=1e-6)
    # FLIP-style subset: bos, two pieces, eos, kept in order with their original position ids.
    keep = torch.tensor([[0, 2, 4, 6], [0, 1, 2, 3]])  # (B, K)
    subset = tokens.gather(1, keep)  # (B, K)
    out = text(subset, positions=keep)
    assert out.shape == (2, 32)
    renumbered = text(subset)  # as if the kept tokens sat at 0..K-1
    assert not torch.allclose(out[0], renumbered[0], atol=1e-4)
    assert torch.allclose(out[1], renumbered[1], atol=1e-6)  # row 1 kept exactly 0..3


def test_flops_count_the_cnn_and_the_projections() -> None:
    """EfficientNet-B0 at 224 px is 0.39 GMACs (Tan & Le 2019), i.e. ~0.78 forward GFLOPs."""
    with torch.device("meta"):
        plain = ALIGN(align_config(timm_model="efficientnet_b0", image_size=224), eos_id=EOS)
        projected = ALIGN(align_config(embed_dim=24, timm_model="efficientnet_b0", image_size=224), eos_id=EOS)
    assert plain.flops_per_sample() / 1e9 == pytest.approx(0.78, rel=0.03)
    t = plain.cfg.text
    # The projection changes only the heads: image 1280 -> 24 added, text 32 -> 1280 becomes 32 -> 24.
    assert projected.flops_per_sample() - plain.flops_per_sample() == pytest.approx(
        2 * 1280 * 24 + 2 * t.width * (24 - 1280))
