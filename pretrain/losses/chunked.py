"""Tiled softmax cross-entropy over a similarity matrix that is never held whole.

For rows R (n, D), columns C (m, D) and a scale s, the logits are z = s * R C^T (n, m). The plain
loss materialises z and its gradient: O(n x m) memory, which at a large global batch is what
limits the batch (Inf-CL, Lin et al. 2024). Here z is visited in (tile x tile) blocks:

- forward, in one pass over the blocks: each row's and each column's log-sum-exp is accumulated
  online (running max and sum), so both directions of the contrastive loss come out of the same
  pass; only the (n,) and (m,) log-sum-exps are saved;
- backward recomputes each block's logits and turns them into dL/dz for that block, which is
  used at once for dR, dC and ds.

Memory is O(tile^2) besides the inputs and their gradients, instead of O(n x m); the result equals
the plain loss up to float rounding.
Label smoothing (ALIGN) is included: the smoothed target puts 1 - eps on the positive and eps/K
on each of the K classes, so each term needs only the positive logit and the sum of a row's (or
a column's) logits, which are dot products with a summed matrix, no tile needed.
"""
from __future__ import annotations

from typing import Any, Optional

import torch


def _tiles(m: int, tile: int) -> range:
    return range(0, m, tile)


# Per-tile maths, shared with the ring loss (ring.py), which visits the columns block by block.


def online_lse_step(run_max: torch.Tensor, run_sum: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold a tile of logits z (n, t) into each row's running (max, sum of exp(z - max)), both (n,).

    Start from (-inf, 0); the row's log-sum-exp is then ``run_max + log(run_sum)``.
    """
    new_max = torch.maximum(run_max, z.max(dim=1).values)  # (n,)
    run_sum = run_sum * torch.exp(run_max - new_max) + torch.exp(z - new_max[:, None]).sum(dim=1)
    return new_max, run_sum


def add_ce_logit_grad(g: torch.Tensor, z: torch.Tensor, lse: torch.Tensor, labels: torch.Tensor, start: int,
                      coef: float, eps: float, num_classes: int) -> None:
    """g += coef * (softmax - smoothed one-hot target) on one tile, in place.

    z, g (n, t): the logits of n samples for classes [start, start + t) out of ``num_classes``;
    lse (n,) each sample's log-sum-exp over all its classes; labels (n,) global class ids. The
    smoothed target is 1 - eps + eps/K on the label and eps/K elsewhere. ``g`` may be a view (the
    column direction passes transposes).
    """
    width = z.shape[1]
    g += coef * (torch.exp(z - lse[:, None]) - eps / num_classes)
    hit = (labels >= start) & (labels < start + width)  # samples whose label is in this tile
    g[torch.arange(z.shape[0], device=z.device)[hit], labels[hit] - start] -= coef * (1 - eps)


def add_tile_grads(g: torch.Tensor, dots: torch.Tensor, rows: torch.Tensor, cols_tile: torch.Tensor, scale: torch.Tensor,
                   grad_rows: torch.Tensor, grad_cols_tile: torch.Tensor) -> torch.Tensor:
    """Chain dL/dz (n, t) through z = scale * dots (+ bias), dots = rows @ cols_tile^T.

    Adds into grad_rows (n, D) and grad_cols_tile (t, D) in place; returns this tile's dL/dscale.
    """
    grad_rows += scale * g @ cols_tile  # (n, D)
    grad_cols_tile += scale * g.T @ rows  # (t, D)
    return (g * dots).sum()


class _TiledCrossEntropy(torch.autograd.Function):
    """loss = w_row * row-direction CE + w_col * column-direction CE (see :func:`tiled_cross_entropy`)."""

    @staticmethod
    def forward(ctx: Any, rows: torch.Tensor, cols: torch.Tensor, scale: torch.Tensor, row_labels: torch.Tensor,
                col_labels: Optional[torch.Tensor], w_row: float, w_col: float, eps: float, tile: int) -> torch.Tensor:
        n, m = rows.shape[0], cols.shape[0]
        row_lse = rows.new_empty(n)  # (n,)
        col_max = rows.new_full((m,), -float("inf"))  # (m,) running max of each column's logits
        col_sum = rows.new_zeros(m)  # (m,) running sum of exp(z - col_max)
        for i in _tiles(n, tile):
            row_max = rows.new_full((min(tile, n - i),), -float("inf"))  # (r,) running max of each row's logits
            row_sum = torch.zeros_like(row_max)  # (r,) running sum of exp(z - row_max)
            for j in _tiles(m, tile):
                z = scale * (rows[i : i + tile] @ cols[j : j + tile].T)  # (r, t) rounded as the backward recomputes it
                row_max, row_sum = online_lse_step(row_max, row_sum, z)
                if w_col:  # the same tile, read down its columns
                    col_max[j : j + tile], col_sum[j : j + tile] = online_lse_step(col_max[j : j + tile], col_sum[j : j + tile], z.T)
            row_lse[i : i + tile] = row_max + torch.log(row_sum)
        col_lse = col_max + torch.log(col_sum) if w_col else None  # (m,)

        loss = rows.new_zeros(())
        if w_row:
            positive = scale * (rows * cols[row_labels]).sum(dim=1)  # (n,) z[i, y_i]
            mean_logit = scale * rows @ cols.mean(dim=0)  # (n,) mean_j z[i, j]
            loss = loss + w_row * (row_lse - (1 - eps) * positive - eps * mean_logit).mean()
        if w_col:
            positive = scale * (cols * rows[col_labels]).sum(dim=1)  # (m,) z[x_j, j]
            mean_logit = scale * cols @ rows.mean(dim=0)  # (m,) mean_i z[i, j]
            loss = loss + w_col * (col_lse - (1 - eps) * positive - eps * mean_logit).mean()
        ctx.save_for_backward(rows, cols, scale, row_labels, row_lse,
                              col_labels if w_col else None, col_lse if w_col else None)
        ctx.config = (w_row, w_col, eps, tile)
        return loss

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[Optional[torch.Tensor], ...]:
        rows, cols, scale, row_labels, row_lse, col_labels, col_lse = ctx.saved_tensors
        w_row, w_col, eps, tile = ctx.config
        n, m = rows.shape[0], cols.shape[0]
        grad_rows = torch.zeros_like(rows)  # (n, D)
        grad_cols = torch.zeros_like(cols)  # (m, D)
        grad_scale = rows.new_zeros(())
        for i in _tiles(n, tile):
            r = slice(i, i + tile)
            for j in _tiles(m, tile):
                c = slice(j, j + tile)
                dots = rows[r] @ cols[c].T  # (r, t) recomputed
                z = scale * dots  # (r, t)
                g = torch.zeros_like(z)  # (r, t) dL/dz on this tile
                if w_row:  # each row is a sample over the m columns
                    add_ce_logit_grad(g, z, row_lse[r], row_labels[r], j, w_row / n, eps, m)
                if w_col:  # each column is a sample over the n rows
                    add_ce_logit_grad(g.T, z.T, col_lse[c], col_labels[c], i, w_col / m, eps, n)
                g *= grad_out
                grad_scale += add_tile_grads(g, dots, rows[r], cols[c], scale, grad_rows[r], grad_cols[c])
        return grad_rows, grad_cols, grad_scale, None, None, None, None, None, None


def tiled_cross_entropy(rows: torch.Tensor, cols: torch.Tensor, scale: torch.Tensor, row_labels: torch.Tensor,
                        col_labels: Optional[torch.Tensor] = None, w_row: float = 1.0, w_col: float = 0.0,
                        label_smoothing: float = 0.0, tile: int = 1024) -> torch.Tensor:
    """w_row * CE(s R C^T, row_labels) + w_col * CE((s R C^T)^T, col_labels), in (tile x tile) blocks.

    rows (n, D), cols (m, D), scale () -> loss (); fp32 inside whatever the input dtype. Each CE is
    the mean over its rows (columns) of a softmax cross-entropy with ``label_smoothing``, as
    ``F.cross_entropy`` computes it; memory O(tile^2) besides the gradients.
    """
    if w_col and col_labels is None:
        raise ValueError("the column direction needs col_labels")
    return _TiledCrossEntropy.apply(rows.float(), cols.float(), scale.float(), row_labels, col_labels,
                                    float(w_row), float(w_col), float(label_smoothing), int(tile))
