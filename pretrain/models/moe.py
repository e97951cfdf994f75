"""Mixture-of-experts MLP with top-k routing and Batch Priority Routing (V-MoE, LIMoE).

A plain ``nn.Module`` that knows nothing about ranks. Expert parallelism is one hook: the engine
may give the layer an *exchange* (a differentiable all-to-all over P ranks); the layer then
computes only its E/P experts, over the slots that every rank of its group filled for them.

Routing, for T tokens and E experts:
1. the router gives softmax probabilities (T, E); each token picks its top-k experts, and the
   chosen probabilities are its gates (not renormalised, as in V-MoE/LIMoE, so the router learns
   how much of the expert output to let through);
2. every expert has C = ceil(capacity_factor * k * T / E) slots;
3. Batch Priority Routing: slots are filled first with every token's 1st choice, then every 2nd
   choice, ..., and within each round tokens go in order of their top gate (highest first), so
   on overflow the tokens the router is most sure about keep their place rather than the ones
   that happen to come first in the batch;
4. an assignment past its expert's capacity is dropped; a token with no kept assignment gets a
   zero output and is carried by the block's residual connection.

Padding is not routed: given the rows that hold real tokens, the layer routes only those (they
alone fill slots and enter the statistics, as DeepSpeed's ``used_token`` mask does), and padding
rows get a zero output. The capacity still counts every row, so the slot shapes are the same on
every rank of an expert-parallel group whatever its captions' lengths.

Steps 1-3 are :func:`pretrain.kernels.router.route` (PyTorch, or one Triton kernel on CUDA), which
also returns the sums the auxiliary losses need; router noise is added before it, in PyTorch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from pretrain.kernels.router import IMPLS, Routing
from pretrain.kernels.router import route as route_logits


def expert_capacity(num_tokens: int, num_experts: int, top_k: int, capacity_factor: float) -> int:
    """Slots per expert: C = ceil(capacity_factor * k * T / E)."""
    return math.ceil(capacity_factor * top_k * num_tokens / num_experts)


@dataclass
class RoutingStats:
    """What one MoE call decided, for the auxiliary losses and the ``moe/*`` metrics."""

    probs: torch.Tensor  # (T, E) fp32 router softmax; carries the router's gradient for aux losses
    expert_index: torch.Tensor  # (T, k) int64, the k chosen experts, best first
    kept: torch.Tensor  # (T, k) bool, whether that assignment got a capacity slot
    load: torch.Tensor  # (E,) fraction of the T*k assignments routed to each expert (pre-capacity)
    dropped_frac: torch.Tensor  # () fraction of tokens with no kept assignment (zero MLP output)
    capacity: int  # slots per expert in this call: C, capped at the call's rows
    # Sums over the call's T tokens from the router, so the aux losses need not reread probs:
    mass: torch.Tensor  # (E,) fp32 sum of probs over tokens, differentiable
    entropy_sum: torch.Tensor  # () fp32 sum of per-token routing entropies (nats), differentiable
    counts: torch.Tensor  # (E,) int64 top-k assignments per expert (pre-capacity)

    @property
    def num_tokens(self) -> int:
        """T, the tokens of this call."""
        return self.probs.shape[0]


class _RowLookup(torch.autograd.Function):
    """y = [x; 0][index] (a zero row appended at len(x)), when the rows of x are each read by
    exactly ``reads`` entries of ``index`` or none, as ``inverse`` lists: entries
    [i*reads, (i+1)*reads) of ``inverse`` are the rows of y that read row i (len(y) for none).
    The gradient is then a lookup too, instead of an index_add into a zero tensor."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, index: torch.Tensor, inverse: torch.Tensor, reads: int) -> torch.Tensor:
        ctx.save_for_backward(inverse)
        ctx.rows, ctx.reads = x.shape[0], reads
        return torch.cat([x, x.new_zeros(1, x.shape[1])]).index_select(0, index)  # (len(index), D)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        (inverse,) = ctx.saved_tensors
        padded = torch.cat([grad, grad.new_zeros(1, grad.shape[1])])  # (len(index) + 1, D)
        per_read = padded.index_select(0, inverse)  # (rows * reads, D)
        return per_read.view(ctx.rows, ctx.reads, -1).sum(dim=1), None, None, None


class Exchange(Protocol):
    """A differentiable all-to-all over the ``size`` ranks that share one set of experts."""

    size: int  # ranks in the expert-parallel group
    rank: int  # this rank's index in it

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """(size, ...) where chunk i goes to rank i -> (size, ...) where chunk j came from rank j."""
        ...


class MoeMlp(nn.Module):
    """E Linear-GELU-Linear experts behind a top-k router; drop-in for a transformer block's MLP.

    Input (B, N, D) or (T, D); returns (output of the same shape, RoutingStats over T = B*N).
    """

    def __init__(
        self,
        dim: int,
        hidden: int,
        num_experts: int,
        top_k: int = 1,
        capacity_factor: float = 1.0,
        router_noise_std: float = 0.0,
        router_impl: str = "auto",
    ) -> None:
        super().__init__()
        if router_impl not in IMPLS:
            raise ValueError(f"router_impl={router_impl!r} must be one of {IMPLS}")
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k={top_k} must be in [1, num_experts={num_experts}]")
        if capacity_factor <= 0:
            raise ValueError(f"capacity_factor={capacity_factor} must be positive")
        self.num_experts = num_experts
        self.top_k = top_k
        self.capacity_factor = capacity_factor
        # V-MoE adds Gaussian noise (std 1/E there) to the router logits in training so that
        # near-tied tokens explore other experts; 0 turns it off.
        self.router_noise_std = router_noise_std
        # "torch" | "triton" | "auto" (the Triton kernel on CUDA, PyTorch elsewhere).
        self.router_impl = router_impl
        self.router = nn.Linear(dim, num_experts, bias=False)
        # Stacked so one batched matmul runs every expert over its (C, D) slot block.
        self.w1 = nn.Parameter(torch.empty(num_experts, dim, hidden))
        self.b1 = nn.Parameter(torch.zeros(num_experts, hidden))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden, dim))
        self.b2 = nn.Parameter(torch.zeros(num_experts, dim))
        # Same scale as nn.Linear's default per expert (uniform with bound 1/sqrt(fan_in)).
        nn.init.uniform_(self.w1, -(dim**-0.5), dim**-0.5)
        nn.init.uniform_(self.w2, -(hidden**-0.5), hidden**-0.5)
        # Small router init keeps the early softmax near uniform, so no expert wins by accident.
        nn.init.normal_(self.router.weight, std=0.02)
        self.exchange: Optional[Exchange] = None

    def set_exchange(self, exchange: Optional[Exchange]) -> None:
        """Compute only this rank's E/P experts, trading slots with the group (None: all local).

        Every rank of the group must call the layer with the same number of tokens (the capacity,
        hence the exchanged shapes, follows from it), as data-parallel training does.
        """
        if exchange is not None and self.num_experts % exchange.size:
            raise ValueError(f"{self.num_experts} experts cannot be split over {exchange.size} ranks")
        self.exchange = exchange

    def _experts(self, h: torch.Tensor, first: int, last: int) -> torch.Tensor:
        """Experts [first, last) over their slot blocks: (last-first, S, D) -> same shape."""
        w1, b1, w2, b2 = self.w1, self.b1, self.w2, self.b2
        if (first, last) != (0, self.num_experts):
            # Slice only under expert parallelism: a slice's backward writes a full-size zero
            # gradient every step (measured: ~5% of the layer's time at B/16 sizes on CPU).
            w1, b1, w2, b2 = w1[first:last], b1[first:last], w2[first:last], b2[first:last]
        # baddbmm: the bias add fused into the matmul, no (e, S, H) temporary for it.
        h = F.gelu(torch.baddbmm(b1.unsqueeze(1), h, w1))  # (e, S, H)
        return torch.baddbmm(b2.unsqueeze(1), h, w2)  # (e, S, D)

    def run_experts(self, slots: torch.Tensor) -> torch.Tensor:
        """slots (E, C, D) of this rank's tokens -> expert outputs (E, C, D)."""
        E, C, D = slots.shape
        if self.exchange is None:
            return self._experts(slots, 0, E)
        P, r = self.exchange.size, self.exchange.rank
        local = E // P
        # Chunk p of (P, E/P, C, D) holds the slots of the experts rank p computes: send it there.
        received = self.exchange(slots.reshape(P, local, C, D))  # (P, E/P, C, D) chunk j from rank j
        h = received.transpose(0, 1).reshape(local, P * C, D)  # (E/P, P*C, D)
        h = self._experts(h, r * local, (r + 1) * local)  # (E/P, P*C, D)
        h = h.reshape(local, P, C, D).transpose(0, 1).contiguous()  # (P, E/P, C, D) chunk j for rank j
        return self.exchange(h).reshape(E, C, D)  # chunk p: rank p's experts on our slots

    def route(self, x: torch.Tensor) -> Routing:
        """x (T, D) -> :class:`~pretrain.kernels.router.Routing` of the T tokens, one group."""
        # Softmax over experts in fp32: in bf16 close gates tie and the BPR order becomes noise.
        logits = self.router(x).float()  # (T, E)
        if self.training and self.router_noise_std > 0:
            logits = logits + torch.randn_like(logits) * self.router_noise_std
        return route_logits(logits, self.top_k, impl=self.router_impl)

    def forward(self, x: torch.Tensor, real: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, RoutingStats]:
        """x (B, N, D) or (R, D); ``real`` (T,) int64: the rows of x.reshape(-1, D) that hold real
        tokens (None: all). Returns (output of x's shape, RoutingStats over the T routed tokens)."""
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # (R, D)
        rows = x.shape[0]
        if real is not None:
            x = x.index_select(0, real)  # (T, D) the padding rows stay out of routing
        T, D = x.shape
        E, k = self.num_experts, self.top_k
        r = self.route(x)
        gates, expert_index, position = r.gates, r.expert_index, r.position  # (T, k) each
        capacity = expert_capacity(rows, E, k, self.capacity_factor)
        # An expert can receive at most one assignment per row (top-k picks distinct experts), so
        # slots beyond that would only ever be empty.
        slots_per_expert = min(capacity, rows)
        kept = position < slots_per_expert  # (T, k)

        # Index dispatch: assignment (token t, choice j) owns row e*C + c of a flat (E*C, D) slot
        # buffer, or the zero row E*C when it was dropped. Memory is O(E*C*D), not a dense
        # (T, E, C) one-hot, and since each row has at most one owner both directions are
        # plain row lookups (see _RowLookup).
        S = slots_per_expert
        slot = torch.where(kept, expert_index * S + position, E * S).reshape(-1)  # (T*k,)
        owner = torch.full((E * S + 1,), T * k, dtype=torch.long, device=x.device)  # T*k: no owner
        owner[slot] = torch.arange(T * k, device=x.device)
        owner = owner[: E * S]  # (E*S,), row E*S only collected the dropped assignments
        source = torch.div(owner, k, rounding_mode="floor")  # (E*S,) token of each slot, T if empty
        buffer = _RowLookup.apply(x, source, slot, k)  # (E*S, D); empty slots are zero
        h = self.run_experts(buffer.view(E, S, D))  # (E, C, D)
        # Empty slots hold expert(0) != 0, but no assignment reads them.
        routed = _RowLookup.apply(h.reshape(E * S, D), slot, owner, 1)  # (T*k, D), dropped: zero
        out = (routed.view(T, k, D) * gates.unsqueeze(-1).to(routed.dtype)).sum(dim=1)  # (T, D)

        with torch.no_grad():
            load = r.assignments[0].float() / (T * k)  # (E,)
            dropped_frac = (~kept.any(dim=-1)).float().mean()  # ()
        stats = RoutingStats(r.probs, expert_index, kept, load, dropped_frac, slots_per_expert,
                             mass=r.mass[0], entropy_sum=r.entropy[0], counts=r.assignments[0])
        if real is not None:
            out = out.new_zeros(rows, D).index_copy(0, real, out)  # (R, D) padding rows: zero
        return out.view(shape), stats
