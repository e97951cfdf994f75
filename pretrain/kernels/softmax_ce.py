"""Softmax cross-entropy over s * R C^T as Triton kernels: :func:`triton_cross_entropy`.

The same algorithm and signature as :func:`pretrain.losses.chunked.tiled_cross_entropy`, split
where the maths splits. With eps the label smoothing, the loss of one row is

    CE_i = lse_i - (1 - eps) z[i, y_i] - eps * mean_j z[i, j],

so only lse_i needs a pass over the tiles; the rest is linear in z: two dot products that torch
computes, and differentiates, outside the kernels (as chunked.py does). The kernel part is

    f(R, C, s) = w_row * mean_i lse_row_i + w_col * mean_j lse_col_j,
    df/dz_ij   = w_row / n * softmax_row(z)_ij + w_col / m * softmax_col(z)_ij,

computed by :mod:`pretrain.kernels.common`: forward, one row-block pass per direction for the
log-sum-exps (the column one on the transposed problem); backward, the tiles recomputed once for
dR (over row blocks) and once for dC (over column blocks), with d(scale) from per-row partials.
Memory is O(n + m) besides the inputs and their gradients.
"""
from __future__ import annotations

from typing import Any, Optional

import torch

from pretrain.kernels.common import SOFTMAX, Blocks, block_sizes, require_cuda, row_grad, row_reduce


class _LogSumExpTerms(torch.autograd.Function):
    """w_row * mean(row log-sum-exps) + w_col * mean(column log-sum-exps) of z = s R C^T."""

    @staticmethod
    def forward(ctx: Any, rows: torch.Tensor, cols: torch.Tensor, scale: torch.Tensor, w_row: float, w_col: float,
                blocks: Blocks) -> torch.Tensor:
        row_lse = row_reduce(SOFTMAX, rows, cols, scale, scale, blocks) if w_row else None  # (n,)
        col_lse = row_reduce(SOFTMAX, cols, rows, scale, scale, blocks) if w_col else None  # (m,)
        loss = rows.new_zeros(())
        if row_lse is not None:
            loss = loss + w_row * row_lse.mean()
        if col_lse is not None:
            loss = loss + w_col * col_lse.mean()
        ctx.save_for_backward(rows, cols, scale, row_lse, col_lse)
        ctx.config = (w_row, w_col, blocks)
        return loss

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[Optional[torch.Tensor], ...]:
        rows, cols, scale, row_lse, col_lse = ctx.saved_tensors
        w_row, w_col, blocks = ctx.config
        n, m = rows.shape[0], cols.shape[0]
        # dR = s * P @ C and dC = s * P^T @ R: the same kernel, roles swapped.
        acc_rows, part_x, _ = row_grad(SOFTMAX, rows, cols, scale, scale, row_lse, col_lse, w_row / n, w_col / m,
                                       True, blocks)  # (n, D), (n,)
        acc_cols, _, _ = row_grad(SOFTMAX, cols, rows, scale, scale, col_lse, row_lse, w_col / m, w_row / n,
                                  False, blocks)  # (m, D)
        factor = scale * grad_out  # () kept on the device: no host sync
        return acc_rows * factor, acc_cols * factor, part_x.sum() * grad_out, None, None, None


def _linear_terms(rows: torch.Tensor, cols: torch.Tensor, scale: torch.Tensor, labels: torch.Tensor,
                  eps: float) -> torch.Tensor:
    """mean_i [(1 - eps) z[i, labels_i] + eps * mean_j z[i, j]] for z = s R C^T, in plain torch."""
    positive = scale * (rows * cols[labels]).sum(dim=1)  # (n,) z[i, y_i]
    mean_logit = scale * rows @ cols.mean(dim=0)  # (n,) mean_j z[i, j]
    return ((1 - eps) * positive + eps * mean_logit).mean()


def triton_cross_entropy(rows: torch.Tensor, cols: torch.Tensor, scale: torch.Tensor, row_labels: torch.Tensor,
                         col_labels: Optional[torch.Tensor] = None, w_row: float = 1.0, w_col: float = 0.0,
                         label_smoothing: float = 0.0, tile: int = 1024) -> torch.Tensor:
    """w_row * CE(s R C^T, row_labels) + w_col * CE((s R C^T)^T, col_labels) with fused kernels.

    rows (n, D), cols (m, D), scale () -> loss (); fp32 inside whatever the input dtype (grads flow
    back through ``.float()`` in the input dtype). ``tile`` caps the kernels' row/column block
    (16..64; the kernels' registers, not memory, set the block, so the default 1024 means 64).
    """
    if w_col and col_labels is None:
        raise ValueError("the column direction needs col_labels")
    require_cuda(rows, cols, scale)
    rows, cols, scale = rows.float().contiguous(), cols.float().contiguous(), scale.float()
    w_row, w_col, eps = float(w_row), float(w_col), float(label_smoothing)
    loss = _LogSumExpTerms.apply(rows, cols, scale, w_row, w_col, block_sizes(rows.shape[1], tile))
    if w_row:
        loss = loss - w_row * _linear_terms(rows, cols, scale, row_labels, eps)
    if w_col:
        loss = loss - w_col * _linear_terms(cols, rows, scale, col_labels, eps)
    return loss
