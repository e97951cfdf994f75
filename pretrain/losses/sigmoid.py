"""SigLIP's pairwise sigmoid loss (Zhai et al. 2023): every (image, text) pair is its own binary
classification, positive for the matching pair and negative for all others.

For rows R (n, D), columns C (m, D), scale s and bias b, the logits are z = s R C^T + b and

    loss = -1/n * sum_{i,j} log sigmoid(y_ij z_ij),   y_ij = +1 if j == row_labels[i] else -1,

summed over the pairs and divided by the number of rows, as SigLIP normalises by the batch. Its
gradient is dL/dz_ij = (sigmoid(z_ij) - [j == row_labels[i]]) / n. There is no normalisation over
a row or column, so no log-sum-exp and no second direction: one pass over the pairs is the loss.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def naive_sigmoid_loss(rows: torch.Tensor, cols: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor,
                       row_labels: torch.Tensor, tile: int = 0) -> torch.Tensor:
    """The plain reference: rows (n, D), cols (m, D), scale (), bias (), row_labels (n,) -> loss ().

    Materialises the (n, m) logits; ``tile`` is accepted for a uniform signature and ignored.
    """
    z = scale.float() * rows.float() @ cols.float().T + bias.float()  # (n, m)
    sign = -torch.ones_like(z)  # (n, m) y_ij
    sign[torch.arange(rows.shape[0], device=z.device), row_labels] = 1.0
    return -F.logsigmoid(sign * z).sum() / rows.shape[0]
