"""LiMoE tower and its router losses on one process (expert parallelism: test_moe_parallel.py)."""
from __future__ import annotations

import math

import pytest
import torch

from pretrain.config import Arch, ModelConfig, MoeConfig, TextConfig, VisionConfig
from pretrain.losses import ContrastiveLoss, MoeAuxLoss
from pretrain.losses.moe_aux import global_entropy, importance_loss, load_balancing_loss, local_entropy_loss
from pretrain.models import build_model
from pretrain.models.limoe import LiMoE, is_moe_layer
from pretrain.models.moe import MoeMlp
from pretrain.task import ContrastiveTask


def config(**moe: float) -> ModelConfig:
    return ModelConfig(
        arch=Arch.limoe, embed_dim=16,
        vision=VisionConfig(image_size=16, patch_size=4, width=32, layers=4, heads=2),
        text=TextConfig(context_length=8, vocab_size=60),
        moe=MoeConfig(num_experts=4, **moe),
    )


def batch(n: int = 6, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, 16, 16, generator=g)  # (B, 3, H, W)
    tokens = torch.randint(4, 60, (n, 8), generator=g)  # (B, L)
    tokens[:, 5] = 3  # eos, then padding
    tokens[:, 6:] = 0
    return images, tokens


def test_shared_layers_with_moe_every_other_layer() -> None:
    model = build_model(config(), eos_id=3)
    assert isinstance(model, LiMoE)
    kinds = [isinstance(b.mlp, MoeMlp) for b in model.blocks]
    assert kinds == [False, True, False, True] == [is_moe_layer(i, 2) for i in range(4)]
    out = model(*batch())
    assert set(out["routing"]) == {"image", "text"}
    assert [s.probs.shape for s in out["routing"]["image"]] == [(6 * 16, 4)] * 2  # 16 patches per image
    assert [s.probs.shape for s in out["routing"]["text"]] == [(6 * 6, 4)] * 2  # up to eos: padding is not routed


def test_every_parameter_gets_a_gradient_through_both_losses() -> None:
    torch.manual_seed(0)
    cfg = config(importance_weight=0.01, load_weight=0.01, local_entropy_weight=0.01, global_entropy_weight=0.01,
                 tau=math.log(4))  # tau at its maximum: the hinge is active, so its gradient flows too
    task = ContrastiveTask(build_model(cfg, eos_id=3), ContrastiveLoss(), MoeAuxLoss(cfg.moe))
    out = task(*batch(8))
    assert out["metrics"]["moe/aux/global_entropy"] > 0
    out["loss"].backward()
    missing = [n for n, p in task.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == [], f"no gradient: {missing}"
    assert task.model.logit_scale.grad.abs().item() > 0


def test_image_and_text_embeddings_and_eval_determinism() -> None:
    model = build_model(config(), eos_id=3).eval()
    images, tokens = batch()
    a, b = model.encode_image(images), model.encode_image(images)
    torch.testing.assert_close(a, b)
    assert a.shape == (6, 16) and torch.allclose(a.norm(dim=-1), torch.ones(6))
    t = model.encode_text(tokens)
    changed = tokens.clone()
    changed[:, 7] = 9  # after eos: causal text never sees it
    torch.testing.assert_close(model.encode_text(changed), t)


def test_aux_loss_is_the_weighted_mean_of_hand_computed_terms() -> None:
    torch.manual_seed(1)
    cfg = config(importance_weight=0.5, load_weight=0.25, local_entropy_weight=2.0, global_entropy_weight=3.0, tau=1.3)
    model = build_model(cfg, eos_id=3)
    routing = model(*batch())["routing"]
    total, metrics = MoeAuxLoss(cfg.moe)(routing)
    pairs = [s for layers in routing.values() for s in layers]
    expected = {
        "importance": sum(importance_loss(s.probs) for s in pairs) / 4,
        "load": sum(load_balancing_loss(s.probs, s.expert_index) for s in pairs) / 4,
        "local_entropy": sum(local_entropy_loss(s.probs) for s in pairs) / 4,
        "global_entropy": sum(torch.clamp(1.3 - global_entropy(s.probs, s.expert_index), min=0) for s in pairs) / 4,
    }
    for name, value in expected.items():
        torch.testing.assert_close(metrics[f"moe/aux/{name}"], value.detach())
    weighted = 0.5 * expected["importance"] + 0.25 * expected["load"] + 2.0 * expected["local_entropy"] + 3.0 * expected["global_entropy"]
    torch.testing.assert_close(total, weighted)
    # Per layer and modality: the assignment shares per expert sum to 1.
    for modality in ("image", "text"):
        for i in range(2):
            shares = sum(metrics[f"moe/layer{i}/{modality}/load_e{e}"] for e in range(4))
            assert shares.item() == pytest.approx(1.0)
            assert 0 <= metrics[f"moe/layer{i}/{modality}/dropped_frac"] <= 1


def test_flops_count_active_experts_only() -> None:
    dense_k1 = build_model(config(top_k=1), eos_id=3).flops_per_sample()
    k2 = build_model(config(top_k=2), eos_id=3).flops_per_sample()
    more_experts = build_model(ModelConfig(**{**config().__dict__, "moe": MoeConfig(num_experts=8)}), eos_id=3).flops_per_sample()
    assert k2 > dense_k1  # a second expert per token costs one more MLP
    assert more_experts - dense_k1 < 0.05 * dense_k1  # more experts: only the router grows


def test_padding_takes_no_slot_and_gets_no_output() -> None:
    """Rows named as real are routed as if alone (when capacity never binds); the others get a zero
    output, no gradient and no place in the statistics."""
    torch.manual_seed(0)
    layer = MoeMlp(dim=8, hidden=16, num_experts=4, capacity_factor=4.0, router_noise_std=0.0)
    x = torch.randn(10, 8, requires_grad=True)
    real = torch.tensor([0, 2, 3, 7])
    out, stats = layer(x, real)
    alone, alone_stats = layer(x[real])
    torch.testing.assert_close(out[real], alone)
    pads = torch.ones(10, dtype=torch.bool)
    pads[real] = False
    assert bool((out[pads] == 0).all())
    assert stats.num_tokens == 4 and int(stats.counts.sum()) == 4
    torch.testing.assert_close(stats.mass, alone_stats.mass)
    out.sum().backward()
    assert bool((x.grad[pads] == 0).all()) and bool((x.grad[real] != 0).any())


def test_limoe_routes_text_up_to_eos_only() -> None:
    model = build_model(config(), eos_id=3).eval()
    images, tokens = batch()
    routed = model(images, tokens)["routing"]["text"]
    changed = tokens.clone()
    changed[:, 6:] = 7  # different padding ids after eos
    again = model(images, changed)["routing"]["text"]
    for a, b in zip(routed, again):
        assert a.num_tokens == 6 * 6  # bos..eos of 6 captions
        torch.testing.assert_close(a.probs, b.probs)


def test_text_tokens_differ_at_the_router_from_initialisation() -> None:
    """The shared layers start with zero biases (timm's ViT init), so what text tokens have in
    common is a small part of the router's input. PyTorch's default Linear init gave 0.63-0.79 here:
    the router then sent every text token to the same expert."""
    for seed in range(3):
        torch.manual_seed(seed)
        model = build_model(config(), eos_id=3).eval()
        inputs: list[torch.Tensor] = []
        for m in model.modules():
            if isinstance(m, MoeMlp):
                m.register_forward_hook(lambda mod, args, out: inputs.append(args[0].reshape(-1, args[0].shape[-1])))
        with torch.no_grad():
            model.encode_text(batch(16, seed)[1])
        for h in inputs:  # (T, W) the router's input
            shared = (h.mean(dim=0).norm() ** 2 / (h.norm(dim=1) ** 2).mean()).item()
            assert shared < 0.4, f"seed {seed}: {shared:.2f} of the text tokens' squared norm is shared"
