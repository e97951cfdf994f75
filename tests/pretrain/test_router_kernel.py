"""The Triton MoE router against its PyTorch reference (pretrain/kernels/router.py).

On CPU the kernel runs under the Triton interpreter in a child process (see
tests/pretrain/interpret.py). Sizes are small and blocks are 8 or 16 tokens, so the interpreter
walks several blocks, with T not a multiple of them.
"""
from __future__ import annotations

import math

import pytest
import torch

from pretrain.config import MoeConfig
from pretrain.kernels.common import INTERPRETED
from pretrain.kernels.router import Routing, bpr_positions, resolve_impl, route, route_reference, route_triton
from pretrain.losses import MoeAuxLoss
from pretrain.models.moe import MoeMlp
from tests.pretrain.interpret import compiled, interpreted, run_interpreted

FLOAT_FIELDS = ("probs", "gates", "mass", "entropy")
EXACT_FIELDS = ("expert_index", "position", "tokens", "assignments")


def test_kernel_cases_under_the_interpreter() -> None:
    run_interpreted(__file__)


def assert_same_routing(got: Routing, want: Routing) -> None:
    for name in FLOAT_FIELDS:
        torch.testing.assert_close(getattr(got, name), getattr(want, name), rtol=1e-5, atol=1e-6, msg=name)
    for name in EXACT_FIELDS:
        g, w = getattr(got, name), getattr(want, name)
        assert g.dtype == w.dtype and torch.equal(g, w), f"{name}: {g} != {w}"


def differentiable_sum(r: Routing, seed: int) -> torch.Tensor:
    """A random linear function of every differentiable output, so each one's gradient counts."""
    g = torch.Generator().manual_seed(seed)
    parts = [r.probs, r.gates, r.mass, r.entropy]
    return sum((t * torch.randn(t.shape, generator=g).to(t.device)).sum() for t in parts)


def check_against_reference(logits: torch.Tensor, k: int, groups: torch.Tensor | None, G: int, block_t: int) -> None:
    """Forward outputs equal, and d(logits) of every differentiable output equal."""
    a = logits.clone().requires_grad_()
    b = logits.clone().requires_grad_()
    got = route_triton(a, k, groups, G, block_t=block_t)
    want = route_reference(b, k, groups, G)
    assert_same_routing(got, want)
    differentiable_sum(got, 1).backward()
    differentiable_sum(want, 1).backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    ("T", "E", "k", "G", "block_t"),
    [
        (37, 8, 2, 2, 16),  # T not a multiple of the block, 2 interleaved groups
        (1, 8, 1, 1, 16),  # one token
        (1, 5, 2, 1, 8),
        (29, 5, 1, 1, 8),  # E not a power of two, top-1
        (30, 5, 2, 2, 8),
        (20, 6, 3, 3, 8),  # k and G not powers of two either
    ],
)
@interpreted
def test_triton_router_equals_reference(T: int, E: int, k: int, G: int, block_t: int) -> None:
    g = torch.Generator().manual_seed(T * 100 + E * 10 + k)
    logits = 2 * torch.randn(T, E, generator=g)  # (T, E)
    groups = torch.arange(T) % G if G > 1 else None  # interleaved modalities
    check_against_reference(logits, k, groups, G, block_t)


@interpreted
@pytest.mark.parametrize("k", [1, 2])
def test_exact_ties_keep_token_order(k: int) -> None:
    # 36 tokens that are copies of 4 distinct ones: every top gate ties with 8 others, across
    # blocks, so only the stable tie rule (equal gates keep token order) decides the slots.
    g = torch.Generator().manual_seed(k)
    logits = torch.randn(4, 8, generator=g)[torch.randint(0, 4, (36,), generator=g)]  # (36, 8)
    groups = torch.randint(0, 2, (36,), generator=g)
    check_against_reference(logits, k, groups, 2, block_t=8)
    # The reference itself against the definition, one assignment at a time.
    r = route_reference(logits, k, groups, 2)
    top, idx = r.gates[:, 0], r.expert_index
    for t in range(36):
        before_t = (top > top[t]) | ((top == top[t]) & (torch.arange(36) < t))  # (36,) higher priority
        for j in range(k):
            e = idx[t, j]
            expected = int((idx[:, :j] == e).sum()) + int(((idx[:, j] == e) & before_t).sum())
            assert int(r.position[t, j]) == expected


def test_reference_group_sums_by_definition() -> None:
    torch.manual_seed(0)
    logits = torch.randn(23, 5)
    groups = torch.randint(0, 3, (23,))
    r = route_reference(logits, 2, groups, 3)
    for g in range(3):
        p = r.probs[groups == g]
        torch.testing.assert_close(r.mass[g], p.sum(dim=0))
        torch.testing.assert_close(r.entropy[g], -(p * p.log()).sum())
        assert int(r.tokens[g]) == len(p)
        assert torch.equal(r.assignments[g], torch.bincount(r.expert_index[groups == g].reshape(-1), minlength=5))
    # Equal probabilities within a token go to the lower expert index (uniform router).
    assert torch.equal(route_reference(torch.zeros(3, 4), 2).expert_index, torch.tensor([[0, 1]] * 3))


@interpreted
@pytest.mark.parametrize("k", [1, 2])
def test_moe_layer_triton_router_equals_torch_router(k: int) -> None:
    # capacity 0.5 with a router that prefers expert 0: demand exceeds capacity, BPR decides.
    layers = {}
    for impl in ("torch", "triton"):
        torch.manual_seed(0)
        layers[impl] = MoeMlp(dim=8, hidden=16, num_experts=5, top_k=k, capacity_factor=0.5, router_impl=impl)
        with torch.no_grad():
            layers[impl].router.weight.normal_()
            layers[impl].router.weight[0] += 0.5
    x = torch.randn(2, 19, 8)  # (B, N, D), T = 38
    probe = torch.randn(2, 19, 8)
    aux = MoeAuxLoss(MoeConfig(num_experts=5, top_k=k, importance_weight=1.0, load_weight=1.0, local_entropy_weight=1.0,
                               global_entropy_weight=1.0, tau=math.log(5)), reduce_fn=None)
    results = {}
    for impl, layer in layers.items():
        xi = x.clone().requires_grad_()
        out, stats = layer(xi)
        loss, metrics = aux({"image": [stats]})
        ((out * probe).sum() + loss).backward()
        results[impl] = (out, stats, metrics, xi.grad, {n: p.grad for n, p in layer.named_parameters()})
    (out_t, st_t, m_t, gx_t, gp_t), (out_k, st_k, m_k, gx_k, gp_k) = results["torch"], results["triton"]
    assert not st_t.kept.all()  # overflow happened
    assert torch.equal(st_k.kept, st_t.kept) and torch.equal(st_k.expert_index, st_t.expert_index)
    assert torch.equal(st_k.counts, st_t.counts)
    torch.testing.assert_close(out_k, out_t, rtol=1e-5, atol=1e-6)
    for name in m_t:
        torch.testing.assert_close(m_k[name], m_t[name], rtol=1e-5, atol=1e-6, msg=name)
    torch.testing.assert_close(gx_k, gx_t, rtol=1e-4, atol=1e-6)
    for name, grad in gp_t.items():
        torch.testing.assert_close(gp_k[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_impl_choice_and_errors() -> None:
    assert resolve_impl("auto", torch.device("cpu")) == "torch"
    assert resolve_impl("torch", torch.device("cuda")) == "torch"
    with pytest.raises(ValueError, match="router impl"):
        resolve_impl("cuda", torch.device("cpu"))
    with pytest.raises(ValueError, match="router_impl"):
        MoeMlp(4, 8, num_experts=2, router_impl="fast")
    if not INTERPRETED:
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
            route(torch.randn(4, 3), 1, impl="triton")


@compiled
@pytest.mark.parametrize("k", [1, 2])
def test_kernel_compiles_for_h100_without_a_gpu(k: int) -> None:
    """Type-checks and lowers the real (non-interpreted) kernel down to an sm_90 cubin, so the
    compiled path is checked on machines with no GPU, where the gpu test below is skipped."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from pretrain.kernels import router

    pointers = {"logits_ptr": "*fp32", "group_ptr": "*i32", "probs_ptr": "*fp32", "gates_ptr": "*fp32",
                "index_ptr": "*i64", "position_ptr": "*i64", "mass_ptr": "*fp32", "tokens_ptr": "*i64",
                "entropy_ptr": "*fp32", "assign_ptr": "*i64"}
    constants = {"K": k, "BLOCK_T": 32, "BLOCK_E": 8, "BLOCK_K": k, "BLOCK_G": 2}
    signature = {**pointers, "T": "i32", "E": "i32", "G": "i32", **{name: "constexpr" for name in constants}}
    binary = triton.compile(ASTSource(router._router_kernel, signature, constexprs=constants), target=GPUTarget("cuda", 90, 32))
    assert binary.asm["cubin"]


@pytest.mark.gpu
def test_triton_router_on_cuda_at_limoe_size() -> None:
    """LiMoE-B/16 image call: T = 16 x 197 = 3152 tokens, E = 8, top-2, both modalities' ids."""
    torch.manual_seed(0)
    T, E, k = 3152, 8, 2
    logits = torch.randn(T, E, device="cuda")
    logits[:100] = logits[100:200]  # exact ties across blocks
    groups = (torch.arange(T, device="cuda") % 3 == 0).long()
    a = logits.clone().requires_grad_()
    b = logits.clone().requires_grad_()
    got = route_triton(a, k, groups, 2)
    want = route_reference(b, k, groups, 2)
    for name in FLOAT_FIELDS:
        torch.testing.assert_close(getattr(got, name), getattr(want, name), rtol=1e-5, atol=1e-5, msg=name)
    # GPU exp and torch's softmax may differ in the last bit, which can swap two experts whose
    # probabilities are within an ulp; allow that and nothing else.
    differ = (got.expert_index != want.expert_index).any(dim=-1)  # (T,)
    sorted_probs = want.probs.sort(dim=-1, descending=True).values  # (T, E)
    near_tie = (sorted_probs[:, :k + 1].diff(dim=-1).abs() < 1e-6).any(dim=-1)  # (T,)
    assert not (differ & ~near_tie).any()
    # Slots: exactly the BPR order of the kernel's own gates (ulp-close top gates of two distinct
    # tokens could order differently under torch's softmax; the order rule is what is checked).
    assert torch.equal(got.position, bpr_positions(got.gates[:, 0], got.expert_index, E))
    if not differ.any():
        assert torch.equal(got.assignments, want.assignments)
    assert torch.equal(got.tokens, want.tokens)
    differentiable_sum(got, 1).backward()
    differentiable_sum(want, 1).backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5)
