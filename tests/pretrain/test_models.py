"""Towers: shapes, gradients reaching every parameter, presets matching the published CLIP sizes."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from pretrain.config import ModelConfig
from pretrain.losses import ContrastiveLoss
from pretrain.models import CLIP, param_groups
from pretrain.task import ContrastiveTask

CONF = Path(__file__).resolve().parents[2] / "conf" / "size"


def preset(name: str, vocab_size: int) -> ModelConfig:
    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), OmegaConf.load(CONF / f"{name}.yaml")))
    cfg.text.vocab_size = vocab_size
    return cfg


def tokens_with_eos(batch: int, length: int, vocab: int, eos: int = 3) -> torch.Tensor:
    t = torch.randint(4, vocab, (batch, length))  # (B, L)
    ends = torch.randint(2, length, (batch,))
    t[torch.arange(batch), ends] = eos
    t[torch.arange(length)[None, :] > ends[:, None]] = 0  # pad after eos
    return t


def test_every_parameter_gets_a_gradient() -> None:
    torch.manual_seed(0)
    cfg = preset("tiny_test", vocab_size=100)
    task = ContrastiveTask(CLIP(cfg, eos_id=3), ContrastiveLoss())
    images = torch.randn(6, 3, 32, 32)  # (B, 3, H, W)
    out = task(images, tokens_with_eos(6, cfg.text.context_length, 100))
    assert out["loss"].ndim == 0 and torch.isfinite(out["loss"])
    out["loss"].backward()
    missing = [n for n, p in task.named_parameters() if p.grad is None or not torch.any(p.grad != 0)]
    assert not missing, f"parameters without gradient: {missing}"
    assert task.model.logit_scale.grad is not None


def test_embeddings_are_unit_norm_and_shaped() -> None:
    cfg = preset("tiny_test", vocab_size=100)
    model = CLIP(cfg, eos_id=3)
    out = model(torch.randn(4, 3, 32, 32), tokens_with_eos(4, cfg.text.context_length, 100))
    assert out["image_features"].shape == (4, cfg.embed_dim) == out["text_features"].shape
    assert torch.allclose(out["image_features"].norm(dim=-1), torch.ones(4), atol=1e-5)
    assert torch.allclose(out["text_features"].norm(dim=-1), torch.ones(4), atol=1e-5)


def test_text_pooling_ignores_tokens_after_eos() -> None:
    """Causal attention + pooling at eos: whatever follows eos cannot change the embedding."""
    torch.manual_seed(0)
    cfg = preset("tiny_test", vocab_size=100)
    model = CLIP(cfg, eos_id=3).eval()
    a = torch.tensor([[2, 10, 11, 3, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]])
    b = a.clone()
    b[0, 4:] = torch.randint(4, 100, (12,))
    assert torch.allclose(model.encode_text(a), model.encode_text(b), atol=1e-6)
    c = a.clone()
    c[0, 1] = 12  # but a token before eos does
    assert not torch.allclose(model.encode_text(a), model.encode_text(c), atol=1e-4)


def test_logit_scale_is_capped_at_100() -> None:
    model = CLIP(preset("tiny_test", vocab_size=100), eos_id=3)
    with torch.no_grad():
        model.logit_scale.fill_(10.0)
    assert model.scale().item() == pytest.approx(100.0)
    with torch.no_grad():
        model.logit_scale.fill_(math.log(1 / 0.07))
    assert model.scale().item() == pytest.approx(1 / 0.07, rel=1e-5)


# Parameter counts and forward GFLOPs that OpenCLIP publishes for these architectures (vocab 49408).
@pytest.mark.parametrize("name,params_m,gflops", [
    ("vit_b16", 149.62, 41.09),
    ("vit_l14", 427.62, 175.33),
    ("vit_h14", 986.11, 381.68),
])
def test_presets_match_published_sizes(name: str, params_m: float, gflops: float) -> None:
    with torch.device("meta"):  # shapes only: no memory for a billion parameters
        model = CLIP(preset(name, vocab_size=49408), eos_id=3)
    assert sum(p.numel() for p in model.parameters()) / 1e6 == pytest.approx(params_m, abs=0.01)
    assert model.flops_per_sample() / 1e9 == pytest.approx(gflops, abs=0.01)


def test_param_groups_leave_gains_biases_and_temperature_undecayed() -> None:
    model = CLIP(preset("tiny_test", vocab_size=100), eos_id=3)
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    undecayed = {id(p) for p in no_decay["params"]}
    assert id(model.logit_scale) in undecayed
    assert all(p.ndim < 2 for p in no_decay["params"]) and all(p.ndim >= 2 for p in decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


@pytest.mark.parametrize("arch", ["clip", "align", "flip", "limoe"])
@pytest.mark.parametrize("size", ["tiny_test", "demo", "vit_b16", "vit_l14", "vit_h14"])
def test_every_architecture_builds_at_every_size(arch: str, size: str) -> None:
    """``model=<arch> size=<size>`` composes through hydra, validates and builds (shapes only)."""
    from hydra import compose, initialize_config_dir

    from pretrain.config import to_config
    from pretrain.models import build_model

    with initialize_config_dir(config_dir=str(CONF.parent), version_base=None):
        cfg = to_config(compose("train", overrides=[f"model={arch}", f"size={size}"])).model
    cfg.text.vocab_size = 49408
    with torch.device("meta"):
        model = build_model(cfg, eos_id=3)
    assert cfg.arch.value == arch and cfg.name == size
    assert model.flops_per_sample() > 0
    params = sum(p.numel() for p in model.parameters())
    if arch == "flip":  # same weights as CLIP; masking only cuts the training FLOPs
        with torch.device("meta"):
            clip = CLIP(cfg, eos_id=3)
        assert params == sum(p.numel() for p in clip.parameters())
        assert model.flops_per_sample() < clip.flops_per_sample()
    if arch == "limoe":  # E experts in every other layer of the shared trunk
        v, m = cfg.vision, cfg.moe
        expert = 2 * v.width * int(v.width * v.mlp_ratio) + int(v.width * v.mlp_ratio) + v.width
        experts = sum(p.numel() for n, p in model.named_parameters() if n.split(".")[-1] in ("w1", "b1", "w2", "b2"))
        assert experts == (v.layers // m.every) * m.num_experts * expert
