"""SigLIP's pairwise sigmoid loss (Zhai et al. 2023): every (image, text) pair is its own binary
classification, positive for the matching pair and negative for all others.

For rows R (n, D), columns C (m, D), scale s and bias b, the logits are z = s R C^T + b and

    loss = -1/n * sum_{i,j} log sigmoid(y_ij z_ij),   y_ij = +1 if j == row_labels[i] else -1,

summed over the pairs and divided by the number of rows, as SigLIP normalises by the batch. Its
gradient is dL/dz_ij = (sigmoid(z_ij) - [j == row_labels[i]]) / n. There is no normalisation over
a row or column, so no log-sum-exp and no second direction: one pass over the pairs is the loss.

:func:`tiled_sigmoid_loss` visits the columns in tiles (memory O(n x tile)) and recomputes them in
the backward; its block-level helpers also serve the ring loss (ring.py), one block per rank.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F

from pretrain.losses.chunked import add_tile_grads


def naive_sigmoid_loss(rows: torch.Tensor, cols: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor,
                       row_labels: torch.Tensor, tile: int = 0) -> torch.Tensor:
    """The plain reference: rows (n, D), cols (m, D), scale (), bias (), row_labels (n,) -> loss ().

    Materialises the (n, m) logits; ``tile`` is accepted for a uniform signature and ignored.
    """
    z = scale.float() * rows.float() @ cols.float().T + bias.float()  # (n, m)
    sign = -torch.ones_like(z)  # (n, m) y_ij
    sign[torch.arange(rows.shape[0], device=z.device), row_labels] = 1.0
    return -F.logsigmoid(sign * z).sum() / rows.shape[0]


def _positives(row_labels: torch.Tensor, start: int, width: int) -> torch.Tensor:
    """(n, t) bool: pair (i, j) of the columns [start, start + width) is positive."""
    cols = torch.arange(start, start + width, device=row_labels.device)  # (t,)
    return row_labels[:, None] == cols[None, :]


def sigmoid_block_loss(rows: torch.Tensor, block: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor,
                       row_labels: torch.Tensor, start: int, tile: int) -> torch.Tensor:
    """sum_ij -log sigmoid(y_ij z_ij) over rows (n, D) against one block (m, D) of columns whose
    global ids start at ``start``, tile by tile: () unnormalised, memory O(n x tile)."""
    total = rows.new_zeros(())
    for j in range(0, block.shape[0], tile):
        z = scale * (rows @ block[j : j + tile].T) + bias  # (n, t)
        sign = _positives(row_labels, start + j, z.shape[1]).to(z.dtype) * 2 - 1  # (n, t) y_ij
        total = total - F.logsigmoid(sign * z).sum()
    return total


def add_sigmoid_block_grads(rows: torch.Tensor, block: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor,
                            row_labels: torch.Tensor, start: int, tile: int, coef: torch.Tensor,
                            grad_rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of coef * :func:`sigmoid_block_loss`, recomputing each tile.

    Adds into grad_rows (n, D) in place; returns (grad_block (m, D), grad_scale (), grad_bias ()).
    """
    grad_block = torch.zeros_like(block)  # (m, D)
    grad_scale, grad_bias = rows.new_zeros(()), rows.new_zeros(())
    for j in range(0, block.shape[0], tile):
        dots = rows @ block[j : j + tile].T  # (n, t)
        z = scale * dots + bias  # (n, t)
        g = coef * (torch.sigmoid(z) - _positives(row_labels, start + j, z.shape[1]).to(z.dtype))  # (n, t) dL/dz
        grad_scale += add_tile_grads(g, dots, rows, block[j : j + tile], scale, grad_rows, grad_block[j : j + tile])
        grad_bias += g.sum()
    return grad_block, grad_scale, grad_bias


class _TiledSigmoidLoss(torch.autograd.Function):
    """:func:`sigmoid_block_loss` over all columns / n; the backward recomputes the tiles."""

    @staticmethod
    def forward(ctx: Any, rows: torch.Tensor, cols: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor,
                row_labels: torch.Tensor, tile: int) -> torch.Tensor:
        ctx.save_for_backward(rows, cols, scale, bias, row_labels)
        ctx.tile = tile
        return sigmoid_block_loss(rows, cols, scale, bias, row_labels, 0, tile) / rows.shape[0]

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[Optional[torch.Tensor], ...]:
        rows, cols, scale, bias, row_labels = ctx.saved_tensors
        grad_rows = torch.zeros_like(rows)  # (n, D)
        grad_cols, grad_scale, grad_bias = add_sigmoid_block_grads(
            rows, cols, scale, bias, row_labels, 0, ctx.tile, grad_out / rows.shape[0], grad_rows)
        # reshape: a (1,) scale or bias (DeepSpeed cannot broadcast 0-dim parameters) gets a (1,) gradient
        return grad_rows, grad_cols, grad_scale.reshape(scale.shape), grad_bias.reshape(bias.shape), None, None


def tiled_sigmoid_loss(rows: torch.Tensor, cols: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor,
                       row_labels: torch.Tensor, tile: int = 1024) -> torch.Tensor:
    """:func:`naive_sigmoid_loss` tiled over columns: rows (n, D), cols (m, D), scale (), bias (),
    row_labels (n,) -> loss (); fp32 inside whatever the input dtype, memory O(n x tile)."""
    return _TiledSigmoidLoss.apply(rows.float(), cols.float(), scale.float(), bias.float(), row_labels, int(tile))
