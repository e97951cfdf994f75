"""MoE router: softmax, top-k, Batch Priority Routing slots and per-group loss statistics.

One function, :func:`route`, with two implementations that give identical results:

- ``torch``: the reference (and the CPU path), a handful of PyTorch ops;
- ``triton``: one Triton kernel launch (forward) inside an autograd Function whose backward is a
  few elementwise PyTorch ops through the softmax.

What routing means, for T tokens, E experts and top-k (see :mod:`pretrain.models.moe`):

1. ``probs`` = softmax of the fp32 router logits (T, E);
2. each token takes its k most probable experts, best first (``expert_index``), and their
   probabilities as ``gates``; equal probabilities go to the lower expert index (the same on
   every device, unlike ``torch.topk`` whose tie order is unspecified);
3. Batch Priority Routing: tokens are ranked by their top gate, highest first, equal gates in
   token order; the slot ``position`` of assignment (token t, choice j) at its expert is the
   number of assignments that go to that expert before it when slots are filled choice-major:
   every 1st choice in priority order, then every 2nd choice, and so on. Positions count over
   every token of the call, whatever its group: one call fills one set of expert slots.

Tokens carry a group id in [0, G) (LiMoE: the modality). Per group the router also returns what
the auxiliary losses (:mod:`pretrain.losses.moe_aux`) need, so they never reread ``probs``:
probability mass per expert (G, E), token count (G,), summed per-token routing entropy (G,) and
top-k assignments per expert (G, E).

Kernel design. BPR needs a global order, and a kernel's blocks cannot wait for each other, so the
kernel never sorts: the priority of token t is a count, #{u : gate_u > gate_t or (gate_u == gate_t
and u < t)}, and so is its slot at expert e for choice j,
#{assignments (u, j') to e with j' < j} + #{u : choice j of u is e and u has priority over t}.
Program p owns token block p and walks over every token block u, recomputing u's softmax and top-k
from the logits (E is small, so this costs about as much as loading them) and counting. That is
O(T^2 k) compares, all independent: at T ~ 3000 (a LiMoE-B/16 call) a few million, microseconds
on a GPU, and still one launch with no global memory round trip for the order. A sort-based
kernel would need a global sort (several launches or a cooperative grid) for the same result.
Every program sees block u through the same code on the same data, so all of them agree
bit-for-bit on every gate and the counts are consistent. The walk starts at the program's own
block, whose routing the program keeps and writes, so the softmax/top-k code exists once.
The per-group sums are accumulated by every program over the same walk order and written by
program 0 only: deterministic, no atomics (the redundant work is O(T G E) per program, small next
to the compares).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

import triton
import triton.language as tl

from pretrain.kernels.common import INTERPRETED

IMPLS = ("torch", "triton", "auto")


@dataclass
class Routing:
    """What the router decided for T tokens in G groups (k: top-k, E: experts)."""

    probs: torch.Tensor  # (T, E) fp32 softmax of the router logits, differentiable
    gates: torch.Tensor  # (T, k) fp32 probabilities of the chosen experts, best first, differentiable
    expert_index: torch.Tensor  # (T, k) int64 chosen experts, best first
    position: torch.Tensor  # (T, k) int64 slot of each assignment at its expert, in BPR fill order
    mass: torch.Tensor  # (G, E) fp32 sum of probs over each group's tokens, differentiable
    tokens: torch.Tensor  # (G,) int64 tokens per group
    entropy: torch.Tensor  # (G,) fp32 sum over each group's tokens of their routing entropy (nats), differentiable
    assignments: torch.Tensor  # (G, E) int64 top-k assignments per expert (before capacity)


def _check(logits: torch.Tensor, top_k: int, groups: Optional[torch.Tensor], num_groups: int) -> None:
    if logits.dim() != 2:
        raise ValueError(f"router logits must be (tokens, experts), got shape {tuple(logits.shape)}")
    if not 1 <= top_k <= logits.shape[1]:
        raise ValueError(f"top_k={top_k} must be in [1, num_experts={logits.shape[1]}]")
    if num_groups < 1:
        raise ValueError(f"num_groups={num_groups} must be >= 1")
    if groups is not None and groups.shape != logits.shape[:1]:
        raise ValueError(f"groups must be ({logits.shape[0]},), got shape {tuple(groups.shape)}")


def _groups_or_zeros(logits: torch.Tensor, groups: Optional[torch.Tensor]) -> torch.Tensor:
    if groups is None:
        return torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
    return groups.long()


def bpr_positions(top_gate: torch.Tensor, expert_index: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Batch Priority Routing slots: top gate (T,), chosen experts (T, k) -> position (T, k).

    The slot of an assignment is the number of assignments filled before it at the same expert,
    filling choice-major (every 1st choice, then every 2nd, ...) in order of the top gate.
    """
    # Stable, so equal top gates keep token order: deterministic, and what the kernel counts.
    order = torch.sort(top_gate, descending=True, stable=True).indices  # (T,)
    top_k = expert_index.shape[1]
    fill = expert_index[order].T.reshape(-1)  # (k*T,) all 1st choices by priority, then all 2nd, ...
    one_hot = torch.nn.functional.one_hot(fill, num_experts)  # (k*T, E)
    # Slot of each assignment = how many earlier assignments went to the same expert.
    pos_fill = ((one_hot.cumsum(dim=0) - 1) * one_hot).sum(dim=-1)  # (k*T,)
    position = torch.empty_like(expert_index)  # (T, k)
    position[order] = pos_fill.view(top_k, -1).T
    return position


def route_reference(
    logits: torch.Tensor, top_k: int, groups: Optional[torch.Tensor] = None, num_groups: int = 1
) -> Routing:
    """PyTorch routing: logits (T, E) -> :class:`Routing`; ``groups`` (T,) ids in [0, G), None: all 0."""
    _check(logits, top_k, groups, num_groups)
    T, E = logits.shape
    group = _groups_or_zeros(logits, groups)  # (T,)
    probs = logits.float().softmax(dim=-1)  # (T, E)
    # A stable descending sort, not topk: equal probabilities go to the lower expert index, a rule
    # the Triton kernel can follow (topk's tie order is unspecified and differs CPU vs CUDA).
    expert_index = probs.detach().sort(dim=-1, descending=True, stable=True).indices[:, :top_k]  # (T, k)
    gates = probs.gather(1, expert_index)  # (T, k)
    position = bpr_positions(gates[:, 0].detach(), expert_index, E)  # (T, k)

    token_entropy = -torch.special.xlogy(probs, probs).sum(dim=-1)  # (T,), 0 log 0 = 0
    mass = probs.new_zeros(num_groups, E).index_add(0, group, probs)  # (G, E)
    entropy = probs.new_zeros(num_groups).index_add(0, group, token_entropy)  # (G,)
    tokens = torch.bincount(group, minlength=num_groups)  # (G,)
    flat = (group.unsqueeze(1) * E + expert_index).reshape(-1)  # (T*k,) group-major expert id
    assignments = torch.bincount(flat, minlength=num_groups * E).view(num_groups, E)  # (G, E)
    return Routing(probs, gates, expert_index, position, mass, tokens, entropy, assignments)


@triton.jit
def _router_kernel(
    logits_ptr,  # (T, E) fp32, contiguous
    group_ptr,  # (T,) int32 group ids
    probs_ptr,  # out (T, E) fp32
    gates_ptr,  # out (T, K) fp32
    index_ptr,  # out (T, K) int64
    position_ptr,  # out (T, K) int64
    mass_ptr,  # out (G, E) fp32, written by program 0
    tokens_ptr,  # out (G,) int64, program 0
    entropy_ptr,  # out (G,) fp32, program 0
    assign_ptr,  # out (G, E) int64, program 0
    T,
    E,
    G,
    K: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_G: tl.constexpr,
):
    """Program p routes token block p (see the module docstring)."""
    pid = tl.program_id(0)
    num_blocks = tl.cdiv(T, BLOCK_T)
    lanes = tl.arange(0, BLOCK_T)  # (BT,)
    cols = tl.arange(0, BLOCK_E)  # (BE,)
    col_ok = cols < E
    choices = tl.arange(0, BLOCK_K)  # (BK,)
    choice_ok = choices < K
    group_ids = tl.arange(0, BLOCK_G)  # (BG,)
    own_rows = pid * BLOCK_T + lanes  # (BT,)

    own_gate = tl.zeros([BLOCK_T], dtype=tl.float32)  # top gate of our tokens
    own_index = tl.zeros([BLOCK_T, BLOCK_K], dtype=tl.int32)  # their chosen experts
    ahead = tl.zeros([BLOCK_T, BLOCK_K], dtype=tl.int32)  # same choice, same expert, higher priority
    per_choice = tl.zeros([BLOCK_K, BLOCK_E], dtype=tl.int32)  # all tokens: choice j -> expert e
    mass = tl.zeros([BLOCK_G, BLOCK_E], dtype=tl.float32)
    entropy = tl.zeros([BLOCK_G], dtype=tl.float32)
    tokens = tl.zeros([BLOCK_G], dtype=tl.int32)
    assign = tl.zeros([BLOCK_G, BLOCK_E], dtype=tl.int32)

    for step in range(0, num_blocks):
        first = step == 0  # the walk starts at our own block
        rows = ((pid + step) % num_blocks) * BLOCK_T + lanes  # (BU,), BU == BT
        row_ok = rows < T
        x = tl.load(logits_ptr + rows[:, None] * E + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        x = tl.where(col_ok[None, :], x, float("-inf"))  # (BU, BE) padded experts get probability 0
        ex = tl.exp(x - tl.max(x, axis=1)[:, None])
        p = ex / tl.sum(ex, axis=1)[:, None]  # (BU, BE)

        # Top-k, best first, ties to the lower expert index; -1 keeps padded experts below any
        # real probability (an underflowed 0 included).
        remaining = tl.where(col_ok[None, :], p, -1.0)  # (BU, BE)
        gates = tl.zeros([BLOCK_T, BLOCK_K], dtype=tl.float32)
        index = tl.zeros([BLOCK_T, BLOCK_K], dtype=tl.int32)
        chosen = tl.zeros([BLOCK_T, BLOCK_E], dtype=tl.int32)  # 1 where the token picked the expert
        for j in tl.static_range(K):
            best = tl.max(remaining, axis=1)  # (BU,)
            arg = tl.min(tl.where(remaining == best[:, None], cols[None, :], BLOCK_E), axis=1)  # (BU,)
            gates = tl.where(choices[None, :] == j, best[:, None], gates)
            index = tl.where(choices[None, :] == j, arg[:, None], index)
            pick = cols[None, :] == arg[:, None]  # (BU, BE)
            chosen = tl.where(pick, 1, chosen)
            remaining = tl.where(pick, -2.0, remaining)
        top = tl.max(p, axis=1)  # (BU,) == gates[:, 0]

        if first:
            own_gate = top
            own_index = index
            out = rows[:, None] * E + cols[None, :]
            tl.store(probs_ptr + out, p, mask=row_ok[:, None] & col_ok[None, :])
            kout = rows[:, None] * K + choices[None, :]
            kmask = row_ok[:, None] & choice_ok[None, :]
            tl.store(gates_ptr + kout, gates, mask=kmask)
            tl.store(index_ptr + kout, index.to(tl.int64), mask=kmask)

        # Choice-round counts over every token, for the rounds before each choice.
        assigned = (index[:, :, None] == cols[None, None, :]) & (row_ok[:, None, None] & choice_ok[None, :, None])
        per_choice += tl.sum(assigned.to(tl.int32), axis=0)  # (BK, BE)
        # Tokens u of this block that come before our token t in the same round.
        higher = (top[None, :] > own_gate[:, None]) | ((top[None, :] == own_gate[:, None]) & (rows[None, :] < own_rows[:, None]))
        higher = higher & row_ok[None, :]  # (BT, BU)
        same = own_index[:, None, :] == index[None, :, :]  # (BT, BU, BK)
        ahead += tl.sum((same & higher[:, :, None]).to(tl.int32), axis=1)  # (BT, BK)

        # Per-group sums over this block (only program 0's are stored).
        group = tl.load(group_ptr + rows, mask=row_ok, other=-1)  # (BU,)
        member = group[:, None] == group_ids[None, :]  # (BU, BG), padded rows in no group
        member_f = member.to(tl.float32)
        mass += tl.sum(member_f[:, :, None] * p[:, None, :], axis=0)  # (BG, BE)
        plogp = tl.where(p > 0, p * tl.log(tl.where(p > 0, p, 1.0)), 0.0)  # (BU, BE), 0 log 0 = 0
        token_entropy = -tl.sum(plogp, axis=1)  # (BU,)
        entropy += tl.sum(member_f * token_entropy[:, None], axis=0)  # (BG,)
        tokens += tl.sum(member.to(tl.int32), axis=0)  # (BG,)
        assign += tl.sum(member.to(tl.int32)[:, :, None] * chosen[:, None, :], axis=0)  # (BG, BE)

    # Assignments of earlier rounds to each expert: before[j, e] = sum_{j' < j} per_choice[j', e].
    earlier = (choices[None, :, None] < choices[:, None, None]).to(tl.int32)  # (BK j, BK j', 1)
    before = tl.sum(earlier * per_choice[None, :, :], axis=1)  # (BK, BE)
    at_expert = (own_index[:, :, None] == cols[None, None, :]).to(tl.int32)  # (BT, BK, BE)
    position = ahead + tl.sum(at_expert * before[None, :, :], axis=2)  # (BT, BK)
    own_ok = own_rows < T
    kout = own_rows[:, None] * K + choices[None, :]
    tl.store(position_ptr + kout, position.to(tl.int64), mask=own_ok[:, None] & choice_ok[None, :])

    lead = pid == 0
    group_ok = group_ids < G
    gout = group_ids[:, None] * E + cols[None, :]
    gmask = group_ok[:, None] & col_ok[None, :] & lead
    tl.store(mass_ptr + gout, mass, mask=gmask)
    tl.store(assign_ptr + gout, assign.to(tl.int64), mask=gmask)
    tl.store(tokens_ptr + group_ids, tokens.to(tl.int64), mask=group_ok & lead)
    tl.store(entropy_ptr + group_ids, entropy, mask=group_ok & lead)


def triton_available(device: torch.device) -> bool:
    """Whether the kernel can run on tensors of ``device``: CUDA, or any device under the interpreter."""
    return device.type == "cuda" or INTERPRETED


def _next_pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _launch(
    logits: torch.Tensor, group: torch.Tensor, top_k: int, num_groups: int, block_t: int
) -> tuple[torch.Tensor, ...]:
    """Run the kernel: logits (T, E) fp32, group (T,) int32 -> the eight Routing tensors."""
    T, E = logits.shape
    dev = logits.device
    probs = torch.empty(T, E, dtype=torch.float32, device=dev)
    gates = torch.empty(T, top_k, dtype=torch.float32, device=dev)
    index = torch.empty(T, top_k, dtype=torch.long, device=dev)
    position = torch.empty(T, top_k, dtype=torch.long, device=dev)
    mass = torch.zeros(num_groups, E, dtype=torch.float32, device=dev)
    tokens = torch.zeros(num_groups, dtype=torch.long, device=dev)
    entropy = torch.zeros(num_groups, dtype=torch.float32, device=dev)
    assignments = torch.zeros(num_groups, E, dtype=torch.long, device=dev)
    if T > 0:
        grid = (triton.cdiv(T, block_t),)
        _router_kernel[grid](
            logits, group, probs, gates, index, position, mass, tokens, entropy, assignments,
            T, E, num_groups,
            K=top_k, BLOCK_T=block_t, BLOCK_E=_next_pow2(E), BLOCK_K=_next_pow2(top_k), BLOCK_G=_next_pow2(num_groups),
        )
    return probs, gates, index, position, mass, tokens, entropy, assignments


class _TritonRouter(torch.autograd.Function):
    """Forward: the kernel. Backward: through the softmax, for every differentiable output."""

    @staticmethod
    def forward(
        ctx: Any, logits: torch.Tensor, group: torch.Tensor, top_k: int, num_groups: int, block_t: int
    ) -> tuple[torch.Tensor, ...]:
        out = _launch(logits.float().contiguous(), group.to(torch.int32).contiguous(), top_k, num_groups, block_t)
        probs, _, index, position, _, tokens, _, assignments = out
        ctx.save_for_backward(probs, index, group)
        ctx.mark_non_differentiable(index, position, tokens, assignments)
        ctx.set_materialize_grads(False)
        ctx.logits_dtype = logits.dtype
        return out

    @staticmethod
    def backward(
        ctx: Any, d_probs: Optional[torch.Tensor], d_gates: Optional[torch.Tensor], _i: Any, _p: Any,
        d_mass: Optional[torch.Tensor], _t: Any, d_entropy: Optional[torch.Tensor], _a: Any,
    ) -> tuple[Optional[torch.Tensor], None, None, None, None]:
        probs, index, group = ctx.saved_tensors
        # d loss / d probs from every output that is a function of probs.
        d_p = torch.zeros_like(probs) if d_probs is None else d_probs.float().clone()  # (T, E)
        if d_gates is not None:
            d_p.scatter_add_(1, index, d_gates.float())  # gates = probs.gather(1, index)
        if d_mass is not None:
            d_p += d_mass.float().index_select(0, group.long())  # mass[g] = sum of its tokens' probs
        if d_entropy is not None:
            # d(-p log p)/dp = -(log p + 1); where p underflowed to 0 the softmax Jacobian's factor
            # p makes the term vanish, so use 0 there rather than inf * 0.
            d_h = torch.where(probs > 0, -(torch.log(probs.clamp_min(torch.finfo(probs.dtype).tiny)) + 1), 0.0)
            d_p += d_entropy.float().index_select(0, group.long()).unsqueeze(1) * d_h
        # Softmax Jacobian: d logits = p * (d_p - <d_p, p>).
        d_logits = probs * (d_p - (d_p * probs).sum(dim=-1, keepdim=True))  # (T, E)
        return d_logits.to(ctx.logits_dtype), None, None, None, None


def route_triton(
    logits: torch.Tensor, top_k: int, groups: Optional[torch.Tensor] = None, num_groups: int = 1, block_t: int = 32
) -> Routing:
    """The Triton router, same contract as :func:`route_reference`; ``block_t`` tokens per program."""
    _check(logits, top_k, groups, num_groups)
    if not triton_available(logits.device):
        raise RuntimeError("the Triton router needs triton and CUDA tensors, or for CPU tensors the interpreter "
                           "(TRITON_INTERPRET=1 in the environment before triton is first imported)")
    if block_t < 1 or block_t & (block_t - 1):
        raise ValueError(f"block_t={block_t} must be a power of two")
    group = _groups_or_zeros(logits, groups)
    return Routing(*_TritonRouter.apply(logits, group, top_k, num_groups, block_t))


def resolve_impl(impl: str, device: torch.device) -> str:
    """"torch" | "triton" | "auto" -> the implementation to run on ``device`` (auto: triton on CUDA)."""
    if impl not in IMPLS:
        raise ValueError(f"router impl {impl!r} must be one of {IMPLS}")
    if impl == "auto":
        return "triton" if device.type == "cuda" else "torch"
    return impl


def route(
    logits: torch.Tensor, top_k: int, groups: Optional[torch.Tensor] = None, num_groups: int = 1, impl: str = "auto"
) -> Routing:
    """Route T tokens: router logits (T, E) -> :class:`Routing`, by ``impl`` (see :func:`resolve_impl`).

    ``groups`` (T,) holds each token's group id in [0, ``num_groups``) (None: one group).
    """
    if resolve_impl(impl, logits.device) == "triton":
        return route_triton(logits, top_k, groups, num_groups)
    return route_reference(logits, top_k, groups, num_groups)
