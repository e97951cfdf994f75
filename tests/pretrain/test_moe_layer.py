"""MoE layer and its auxiliary losses: shapes and maths on synthetic tensors."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pretrain.losses.moe_aux import (
    global_entropy,
    global_entropy_loss,
    importance_loss,
    load_balancing_loss,
    local_entropy_loss,
    router_entropy,
)
from pretrain.models.moe import MoeMlp, expert_capacity


def _naive_moe(layer: MoeMlp, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token loop reference, sharing only the weights with the layer: x (T, D) -> (out, kept)."""
    T, _ = x.shape
    k, E = layer.top_k, layer.num_experts
    probs = torch.softmax(x @ layer.router.weight.T, dim=-1)  # (T, E)
    gates, idx = probs.topk(k, dim=-1)  # (T, k)
    capacity = min(expert_capacity(T, E, k, layer.capacity_factor), T)
    # Batch Priority Routing: round j places every token's j-th choice, best top gate first.
    order = sorted(range(T), key=lambda t: -gates[t, 0].item())
    used = [0] * E
    kept = torch.zeros(T, k, dtype=torch.bool)
    for j in range(k):
        for t in order:
            e = idx[t, j].item()
            if used[e] < capacity:
                used[e] += 1
                kept[t, j] = True
    out = torch.zeros_like(x)
    for t in range(T):
        for j in range(k):
            if kept[t, j]:
                e = idx[t, j].item()
                h = F.gelu(x[t] @ layer.w1[e] + layer.b1[e])
                out[t] += gates[t, j] * (h @ layer.w2[e] + layer.b2[e])
    return out, kept


@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("capacity_factor", [0.5, 4.0])
def test_matches_per_token_loop(top_k: int, capacity_factor: float) -> None:
    torch.manual_seed(0)
    layer = MoeMlp(dim=8, hidden=16, num_experts=4, top_k=top_k, capacity_factor=capacity_factor)
    torch.nn.init.normal_(layer.router.weight)  # a sharp router, so experts really overflow
    x = torch.randn(3, 10, 8)  # (B, N, D)
    out, stats = layer(x)
    ref, ref_kept = _naive_moe(layer, x.reshape(-1, 8))
    assert out.shape == x.shape
    assert torch.equal(stats.kept, ref_kept)
    torch.testing.assert_close(out.reshape(-1, 8), ref, rtol=1e-5, atol=1e-6)
    overflowed = not bool(stats.kept.all())
    assert overflowed == (capacity_factor < 1)
    # Never more kept assignments on an expert than it has slots.
    per_expert = torch.bincount(stats.expert_index[stats.kept], minlength=4)
    assert int(per_expert.max()) <= stats.capacity


@pytest.mark.parametrize("top_k", [1, 2])
def test_gradients_match_per_token_loop(top_k: int) -> None:
    """The layer's hand-written dispatch/combine backward against autograd through the loop."""
    torch.manual_seed(0)
    layer = MoeMlp(dim=8, hidden=16, num_experts=4, top_k=top_k, capacity_factor=0.75)
    torch.nn.init.normal_(layer.router.weight)
    x = torch.randn(30, 8, requires_grad=True)
    probe = torch.randn(30, 8)
    out, stats = layer(x)
    assert not stats.kept.all()
    (out * probe).sum().backward()
    got = {"x": x.grad.clone(), **{n: p.grad.clone() for n, p in layer.named_parameters()}}
    x.grad, _ = None, layer.zero_grad()
    ref, _ = _naive_moe(layer, x)
    (ref * probe).sum().backward()
    want = {"x": x.grad, **{n: p.grad for n, p in layer.named_parameters()}}
    for name, g in want.items():
        torch.testing.assert_close(got[name], g, rtol=1e-4, atol=1e-6, msg=name)


def test_flat_input_and_stats_shapes() -> None:
    torch.manual_seed(0)
    layer = MoeMlp(dim=8, hidden=16, num_experts=4, top_k=2)
    out, stats = layer(torch.randn(12, 8))  # (T, D)
    assert out.shape == (12, 8)
    assert stats.probs.shape == (12, 4) and stats.expert_index.shape == (12, 2) and stats.kept.shape == (12, 2)
    assert stats.load.shape == (4,) and math.isclose(stats.load.sum().item(), 1.0, rel_tol=1e-6)
    assert 0.0 <= stats.dropped_frac.item() <= 1.0


def test_every_parameter_gets_a_gradient() -> None:
    torch.manual_seed(0)
    layer = MoeMlp(dim=8, hidden=16, num_experts=4, top_k=2, capacity_factor=2.0)
    out, stats = layer(torch.randn(2, 16, 8))
    loss = out.square().mean() + load_balancing_loss(stats.probs, stats.expert_index) + importance_loss(stats.probs)
    loss.backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_batch_priority_routing_keeps_highest_gates() -> None:
    # Router logits (x0, 0): every token with x0 > 0 picks expert 0 with gate sigmoid(x0), so the
    # gate order is the x0 order, which is shuffled relative to the batch order on purpose.
    layer = MoeMlp(dim=2, hidden=4, num_experts=2, top_k=1, capacity_factor=1.0)
    with torch.no_grad():
        layer.router.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 0.0]]))
    x0 = torch.tensor([0.5, 3.0, 1.0, 2.5, 0.1, 2.0, 1.5, 0.3])
    x = torch.stack([x0, torch.zeros(8)], dim=1)  # (T=8, D=2)
    out, stats = layer(x)
    assert stats.capacity == 4  # ceil(1.0 * 1 * 8 / 2)
    assert bool((stats.expert_index[:, 0] == 0).all())
    kept_tokens = set(stats.kept[:, 0].nonzero().flatten().tolist())
    assert kept_tokens == {1, 3, 5, 6}  # x0 = 3.0, 2.5, 2.0, 1.5: the four highest gates
    assert stats.dropped_frac.item() == 0.5
    assert bool((out[[0, 2, 4, 7]] == 0).all())  # dropped tokens pass through with zero output
    assert bool((out[[1, 3, 5, 6]] != 0).any(dim=-1).all())


@pytest.mark.parametrize(
    ("T", "E", "k", "cf", "expected"),
    [(10, 4, 2, 1.0, 5), (10, 3, 1, 1.25, 5), (8, 2, 1, 1.0, 4), (7, 4, 1, 0.5, 1), (16, 4, 2, 2.0, 16)],
)
def test_capacity_formula(T: int, E: int, k: int, cf: float, expected: int) -> None:
    assert expert_capacity(T, E, k, cf) == expected


def test_bad_arguments_raise() -> None:
    with pytest.raises(ValueError, match="top_k"):
        MoeMlp(4, 8, num_experts=2, top_k=3)
    with pytest.raises(ValueError, match="capacity_factor"):
        MoeMlp(4, 8, num_experts=2, capacity_factor=0.0)


# 4 tokens, 2 experts. Column sums (importance) 2.6 and 1.4; mean routing distribution (0.65, 0.35).
PROBS = torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7], [0.8, 0.2]])


def test_importance_loss_by_hand() -> None:
    # importance (2.6, 1.4): mean 2.0, population std 0.6 -> CV^2 = (0.6 / 2.0)^2 = 0.09
    assert importance_loss(PROBS).item() == pytest.approx(0.09, abs=1e-6)


def test_load_balancing_loss_by_hand() -> None:
    # top-1 experts (0, 0, 1, 0): f = (0.75, 0.25), P = (0.65, 0.35)
    # 2 * (0.75 * 0.65 + 0.25 * 0.35) = 2 * 0.575 = 1.15
    top1 = PROBS.argmax(dim=-1, keepdim=True)  # (4, 1)
    assert load_balancing_loss(PROBS, top1).item() == pytest.approx(1.15, abs=1e-6)
    # top-2 with 2 experts sends every token to both: f = (0.5, 0.5) -> 2 * 0.5 * (0.65 + 0.35) = 1
    top2 = PROBS.topk(2, dim=-1).indices  # (4, 2)
    assert load_balancing_loss(PROBS, top2).item() == pytest.approx(1.0, abs=1e-6)


def test_local_entropy_by_hand() -> None:
    # H(.9,.1) = 0.3250830, H(.6,.4) = 0.6730117, H(.3,.7) = 0.6108643, H(.8,.2) = 0.5004024
    # mean = 2.1093614 / 4 = 0.5273403
    assert local_entropy_loss(PROBS).item() == pytest.approx(0.5273403, abs=1e-6)


TOP1 = PROBS.argmax(dim=-1, keepdim=True)  # (4, 1): experts 0, 0, 1, 0


def test_global_entropy_and_hinge_by_hand() -> None:
    # Where the tokens went: shares (0.75, 0.25); H = 0.75 ln(4/3) + 0.25 ln 4 = 0.5623351.
    assert global_entropy(PROBS, TOP1).item() == pytest.approx(0.5623351, abs=1e-6)
    # LIMoE's quantity, of the mean probabilities (0.65, 0.35): 0.6474466.
    assert router_entropy(PROBS).item() == pytest.approx(0.6474466, abs=1e-6)
    assert global_entropy_loss(PROBS, TOP1, tau=0.5).item() == 0.0  # above tau: no penalty
    assert global_entropy_loss(PROBS, TOP1, tau=0.6).item() == pytest.approx(0.6 - 0.5623351, abs=1e-6)


def test_global_entropy_gradient_flows_through_the_mean_probabilities() -> None:
    # d(tau - H)/d(probs[t, e]) = log(share_e) / T: each expert's share, not its probability, sets
    # the push, and the +1 of d(-x log x) cancels because every token's probabilities sum to 1.
    probs = PROBS.clone().requires_grad_()
    global_entropy_loss(probs, TOP1, tau=0.6).backward()
    expected = torch.log(torch.tensor([0.75, 0.25])).expand(4, 2) / 4
    torch.testing.assert_close(probs.grad, expected)
    logits = torch.randn(16, 4, requires_grad=True)
    index = logits.argmax(dim=-1, keepdim=True)
    global_entropy_loss(logits.softmax(dim=-1), index, tau=0.0).backward()  # tau below any entropy: flat
    assert logits.grad is not None and bool((logits.grad == 0).all())
    logits.grad = None
    global_entropy_loss(logits.softmax(dim=-1), index, tau=math.log(4) + 1.0).backward()  # above any: pushes
    assert logits.grad.abs().sum() > 0


def test_a_collapse_under_a_flat_router_is_seen_and_pushed_back() -> None:
    """The weakness the assignment entropy fixes: logits that differ by a small offset shared by
    every token put all tokens on one expert while the mean probabilities stay nearly uniform, so
    LIMoE's entropy of the mean probabilities sits near log E and its thresholded loss is zero."""
    torch.manual_seed(0)
    logits = (0.01 * torch.randn(64, 4) + torch.tensor([0.05, 0.0, 0.0, 0.0])).requires_grad_()  # (T, E)
    probs = logits.softmax(dim=-1)
    index = probs.argmax(dim=-1, keepdim=True)
    assert bool((index == 0).all())  # every token on expert 0
    assert router_entropy(probs).item() > 0.99 * math.log(4)  # ... yet the mean distribution is flat
    assert torch.clamp(0.7 - router_entropy(probs), min=0).item() == 0.0  # LIMoE's form: no signal
    loss = global_entropy_loss(probs, index, tau=0.7)
    assert loss.item() == pytest.approx(0.7)  # assignment entropy 0
    loss.backward()
    # Descent lowers expert 0's logit and raises the idle experts', for every token.
    assert bool((logits.grad[:, 0] > 0).all()) and bool((logits.grad[:, 1:] < 0).all())


def test_uniform_router_maximises_router_entropy() -> None:
    torch.manual_seed(0)
    layer = MoeMlp(dim=8, hidden=16, num_experts=4)
    with torch.no_grad():
        layer.router.weight.zero_()
    _, stats = layer(torch.randn(20, 8))
    assert router_entropy(stats.probs).item() == pytest.approx(math.log(4), abs=1e-6)
    for _ in range(5):
        skewed = torch.randn(20, 4).mul(3).softmax(dim=-1)
        assert router_entropy(skewed).item() < math.log(4)
        assert global_entropy(skewed, skewed.argmax(dim=-1, keepdim=True)).item() <= math.log(4) + 1e-6


def test_reduce_fn_sums_statistics_across_ranks() -> None:
    # Two simulated ranks with different token counts: the reduced entropies must be those of all
    # 7 tokens, not the mean of the two per-rank entropies.
    torch.manual_seed(0)
    probs = torch.randn(7, 3).mul(2).softmax(dim=-1)
    index = probs.argmax(dim=-1, keepdim=True)
    rank1 = probs[4:]
    counts1 = torch.bincount(index[4:].reshape(-1), minlength=3).float()
    rank1_stats = torch.cat([rank1.sum(dim=0), counts1, torch.tensor([3.0])])  # what rank 1 contributes
    reduced = global_entropy(probs[:4], index[:4], reduce_fn=lambda s: s + rank1_stats)
    assert reduced.item() == pytest.approx(global_entropy(probs, index).item(), abs=1e-6)
    assert reduced.item() != pytest.approx(global_entropy(probs[:4], index[:4]).item(), abs=1e-3)
    reduced = router_entropy(probs[:4], reduce_fn=lambda s: s + rank1_stats)
    assert reduced.item() == pytest.approx(router_entropy(probs).item(), abs=1e-6)


def test_router_noise_only_in_training() -> None:
    torch.manual_seed(0)
    layer = MoeMlp(dim=8, hidden=16, num_experts=4, router_noise_std=0.5)
    x = torch.randn(10, 8)
    layer.eval()
    torch.testing.assert_close(layer(x)[1].probs, layer(x)[1].probs)
    layer.train()
    assert not torch.allclose(layer(x)[1].probs, layer(x)[1].probs)
