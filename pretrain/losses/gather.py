"""What crosses ranks in the contrastive loss: features, gathered with their gradient."""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.distributed as dist


def world_info(group: Optional[dist.ProcessGroup] = None) -> tuple[int, int]:
    """(rank, world size) in ``group``; (0, 1) outside a distributed run."""
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


class _AllGatherWithGrad(torch.autograd.Function):
    """Forward: concatenate every rank's rows. Backward: each rank's loss depends on all gathered
    rows, so the gradient of rank r's rows is the SUM over ranks of d(loss_k)/d(rows_r): an
    all-reduce of the full gradient, then this rank's slice (a reduce-scatter, written with
    all_reduce because gloo has no reduce_scatter)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Optional[dist.ProcessGroup]) -> torch.Tensor:
        rank, world = world_info(group)
        ctx.group, ctx.rank, ctx.rows = group, rank, x.shape[0]
        out = x.new_empty((world * x.shape[0], *x.shape[1:]))  # (W*B, ...)
        dist.all_gather_single(out, x.contiguous(), group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        grad = grad.contiguous()  # (W*B, ...)
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows], None  # (B, ...)


def gather_with_grad(x: torch.Tensor, group: Optional[dist.ProcessGroup] = None) -> torch.Tensor:
    """(B, ...) on each rank -> (W*B, ...) rank-major on every rank, differentiable."""
    if world_info(group)[1] == 1:
        return x
    return _AllGatherWithGrad.apply(x, group)


class _AllReduceSumWithGrad(torch.autograd.Function):
    """Forward: the sum over ranks. Backward: every rank's loss depends on that sum, so the
    gradient reaching this rank's input is the sum over ranks of the incoming gradients."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Optional[dist.ProcessGroup]) -> torch.Tensor:
        ctx.group = group
        out = x.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        grad = grad.clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad, None


def all_reduce_sum_with_grad(x: torch.Tensor, group: Optional[dist.ProcessGroup] = None) -> torch.Tensor:
    """Sum of ``x`` over ranks, differentiable; ``x`` itself outside a distributed run."""
    if world_info(group)[1] == 1:
        return x
    return _AllReduceSumWithGrad.apply(x, group)


@torch.no_grad()
def gather_no_grad(x: torch.Tensor, group: Optional[dist.ProcessGroup] = None) -> torch.Tensor:
    """(B, ...) -> (W*B, ...) without autograd; every rank must pass the same B (evaluation)."""
    rank, world = world_info(group)
    if world == 1:
        return x
    out = x.new_empty((world * x.shape[0], *x.shape[1:]))
    dist.all_gather_single(out, x.contiguous(), group=group)
    return out
