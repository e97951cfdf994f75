"""SigLIP's pairwise sigmoid loss as Triton kernels: :func:`triton_sigmoid_loss`.

Same semantics as :func:`pretrain.losses.sigmoid.naive_sigmoid_loss`. Since -log sigmoid(-z) =
softplus(z) and -log sigmoid(z) = softplus(z) - z,

    loss = 1/n * sum_{i,j} softplus(z_ij) - 1/n * sum_i z[i, y_i],   z = s R C^T + b,

so the kernels only sum softplus over every pair (gradient sigmoid(z) / n), and the positive
logits, a dot product per row, are left to torch autograd. Forward: one pass over the tiles,
per-row sums; backward: the tiles recomputed for dR (with per-row partials for d(scale) and
d(bias)) and again, roles swapped, for dC. See :mod:`pretrain.kernels.common`.
"""
from __future__ import annotations

from typing import Any, Optional

import torch

from pretrain.kernels.common import SIGMOID, Blocks, block_sizes, require_cuda, row_grad, row_reduce


class _SoftplusSum(torch.autograd.Function):
    """1/n * sum_{i,j} softplus(s * r_i . c_j + b)."""

    @staticmethod
    def forward(ctx: Any, rows: torch.Tensor, cols: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor,
                blocks: Blocks) -> torch.Tensor:
        per_row = row_reduce(SIGMOID, rows, cols, scale, bias, blocks)  # (n,)
        ctx.save_for_backward(rows, cols, scale, bias)
        ctx.blocks = blocks
        return per_row.sum() / rows.shape[0]

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[Optional[torch.Tensor], ...]:
        rows, cols, scale, bias = ctx.saved_tensors
        w = 1.0 / rows.shape[0]  # dL/dz = sigmoid(z) / n
        acc_rows, part_x, part_1 = row_grad(SIGMOID, rows, cols, scale, bias, None, None, w, 0.0, True, ctx.blocks)
        acc_cols, _, _ = row_grad(SIGMOID, cols, rows, scale, bias, None, None, w, 0.0, False, ctx.blocks)
        factor = scale * grad_out  # ()
        return acc_rows * factor, acc_cols * factor, part_x.sum() * grad_out, part_1.sum() * grad_out, None


def triton_sigmoid_loss(rows: torch.Tensor, cols: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor,
                        row_labels: torch.Tensor, tile: int = 0) -> torch.Tensor:
    """rows (n, D), cols (m, D), scale (), bias (), row_labels (n,) -> loss (), fp32 inside.

    ``tile`` > 0 caps the kernels' row/column block (16..64); 0 takes the default (64).
    """
    require_cuda(rows, cols, scale, bias)
    rows, cols = rows.float().contiguous(), cols.float().contiguous()
    scale, bias = scale.float(), bias.float()
    loss = _SoftplusSum.apply(rows, cols, scale, bias, block_sizes(rows.shape[1], tile))
    positive = scale * (rows * cols[row_labels]).sum(dim=1) + bias  # (n,) z[i, y_i]
    return loss - positive.sum() / rows.shape[0]
