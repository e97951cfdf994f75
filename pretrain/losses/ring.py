"""The local contrastive loss with column blocks passed around a ring of ranks (mode=ring).

Gather mode builds every rank's (W*B, D) features on every rank. Here rank r only ever holds its
own block of columns and the one visiting it: the blocks travel one hop to the right per step
(r sends to r+1, receives from r-1), and the exchange for the next step is posted before the
current block is computed on, so the transfer overlaps the compute. After W steps every rank has
seen every block, once.

- Forward: the softmax loss folds each block into its rows' online log-sum-exp
  (``online_lse_step``); the sigmoid loss adds each block's sum of log-sigmoids.
- Backward: the blocks go around again, each with a gradient accumulator. At each step a rank
  adds d(its loss)/d(block) to the accumulator that arrived with the block and passes it on; one
  more hop after the last step brings each accumulator home, holding the sum over ranks of
  d(loss_k)/d(block), which is exactly what ``gather_with_grad``'s backward gives in gather mode.

Label smoothing needs the mean of all columns: an all-reduce of a (D,) sum, without gradient
(its gradient, eps/K on every logit, is part of the per-tile dL/dz that goes around the ring).
Per-tile maths comes from chunked.py and sigmoid.py; this file only adds the block plumbing.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

from pretrain.losses.chunked import add_ce_logit_grad, add_tile_grads, online_lse_step
from pretrain.losses.gather import world_info
from pretrain.losses.sigmoid import add_sigmoid_block_grads, sigmoid_block_loss

_ACC_TAG = 1 << 16  # accumulator messages get tags apart from the block messages (tag = step)


class _Ring:
    """This rank's neighbours in ``group`` and non-blocking transfers to and from them."""

    def __init__(self, group: Optional[dist.ProcessGroup]) -> None:
        self.group = group
        self.rank, self.world = world_info(group)
        self.right, self.left = self._global((self.rank + 1) % self.world), self._global((self.rank - 1) % self.world)

    def _global(self, rank: int) -> int:
        return rank if self.group is None else dist.get_global_rank(self.group, rank)

    def send(self, x: torch.Tensor, tag: int) -> dist.Work:
        return dist.isend(x, self.right, group=self.group, tag=tag)

    def recv(self, like: torch.Tensor, tag: int) -> tuple[torch.Tensor, dist.Work]:
        buf = torch.empty_like(like)
        return buf, dist.irecv(buf, self.left, group=self.group, tag=tag)


def ring_visit(cols: torch.Tensor, group: Optional[dist.ProcessGroup],
               visit: Callable[[torch.Tensor, int], Optional[torch.Tensor]], with_grads: bool = False) -> Optional[torch.Tensor]:
    """Call ``visit(block, owner)`` on every rank's (B, D) block of columns, own block first.

    With ``with_grads``, ``visit`` returns d(this rank's loss)/d(block) (B, D); the accumulators
    travel with the blocks and the result is the sum over ranks of the gradients of this rank's
    ``cols``. Holds at most two blocks of features (the current one and the incoming one).
    """
    ring = _Ring(group)
    block = cols.contiguous()  # (B, D) gloo sends contiguous memory only
    acc_send: Optional[dist.Work] = None
    acc: Optional[torch.Tensor] = None
    for step in range(ring.world):
        owner = (ring.rank - step) % ring.world
        pending = []
        if step < ring.world - 1:  # post the next block's exchange first: it overlaps the compute below
            pending.append(ring.send(block, step))
            incoming, work = ring.recv(block, step)
            pending.append(work)
        if with_grads and step > 0:  # what ranks owner .. rank-1 have added to this block so far
            acc_in, acc_recv = ring.recv(block, _ACC_TAG + step - 1)
        grad = visit(block, owner)  # (B, D) or None
        if with_grads:
            if step > 0:
                acc_recv.wait()
                grad += acc_in
            if acc_send is not None:
                acc_send.wait()  # the previous accumulator has left: its buffer may go
            acc = grad
            if ring.world > 1:
                acc_send = ring.send(acc, _ACC_TAG + step)
        for work in pending:
            work.wait()
        if step < ring.world - 1:
            block = incoming
    if not with_grads:
        return None
    if ring.world == 1:
        return acc
    # The return trip: the accumulator of our own block, having visited every rank, comes home.
    total, work = ring.recv(block, _ACC_TAG + ring.world - 1)
    work.wait()
    acc_send.wait()
    return total


class _RingCrossEntropy(torch.autograd.Function):
    """Mean over this rank's rows of the softmax CE against every rank's columns (see module doc)."""

    @staticmethod
    def forward(ctx: Any, rows: torch.Tensor, cols: torch.Tensor, scale: torch.Tensor, eps: float, tile: int,
                group: Optional[dist.ProcessGroup]) -> torch.Tensor:
        rank, world = world_info(group)
        n = rows.shape[0]
        run_max = rows.new_full((n,), -float("inf"))  # (n,) running max of each row's logits
        run_sum = rows.new_zeros(n)  # (n,) running sum of exp(z - run_max)

        def fold(block: torch.Tensor, owner: int) -> None:
            nonlocal run_max, run_sum
            for j in range(0, block.shape[0], tile):
                z = scale * (rows @ block[j : j + tile].T)  # (n, t)
                run_max, run_sum = online_lse_step(run_max, run_sum, z)

        ring_visit(cols, group, fold)
        row_lse = run_max + torch.log(run_sum)  # (n,)
        positive = scale * (rows * cols).sum(dim=1)  # (n,) row i's positive is this rank's column i
        loss = row_lse - (1 - eps) * positive  # (n,)
        if eps:
            col_sum = cols.sum(dim=0)  # (D,)
            if world > 1:
                dist.all_reduce(col_sum, group=group)
            loss = loss - eps * scale * rows @ (col_sum / (world * cols.shape[0]))  # mean logit of each row
        ctx.save_for_backward(rows, cols, scale, row_lse)
        ctx.config = (eps, tile, group)
        return loss.mean()

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[Optional[torch.Tensor], ...]:
        rows, cols, scale, row_lse = ctx.saved_tensors
        eps, tile, group = ctx.config
        rank, world = world_info(group)
        n, b = rows.shape[0], cols.shape[0]
        labels = torch.arange(n, device=rows.device) + rank * b  # (n,) global column of each positive
        grad_rows = torch.zeros_like(rows)  # (n, D)
        grad_scale = rows.new_zeros(())

        def block_grad(block: torch.Tensor, owner: int) -> torch.Tensor:
            nonlocal grad_scale
            grad_block = torch.zeros_like(block)  # (B, D)
            for j in range(0, block.shape[0], tile):
                dots = rows @ block[j : j + tile].T  # (n, t) recomputed
                z = scale * dots  # (n, t)
                g = torch.zeros_like(z)  # (n, t) dL/dz
                add_ce_logit_grad(g, z, row_lse, labels, owner * b + j, 1 / n, eps, world * b)
                g *= grad_out
                grad_scale += add_tile_grads(g, dots, rows, block[j : j + tile], scale, grad_rows, grad_block[j : j + tile])
            return grad_block

        grad_cols = ring_visit(cols, group, block_grad, with_grads=True)
        return grad_rows, grad_cols, grad_scale.reshape(scale.shape), None, None, None


def ring_cross_entropy(rows: torch.Tensor, cols: torch.Tensor, scale: torch.Tensor, label_smoothing: float = 0.0,
                       tile: int = 1024, group: Optional[dist.ProcessGroup] = None) -> torch.Tensor:
    """This rank's rows (B, D) against every rank's cols (B, D each), softmax CE over the W*B
    columns with the positive at this rank's column i, mean over the B rows -> ().

    Equal in value and gradients to ``tiled_cross_entropy(rows, gather_with_grad(cols), scale,
    arange(B) + rank * B, label_smoothing=label_smoothing)``; every rank must pass the same B.
    """
    if rows.shape[0] != cols.shape[0]:
        raise ValueError(f"rows and cols are pairs: got {rows.shape[0]} rows and {cols.shape[0]} cols")
    return _RingCrossEntropy.apply(rows.float(), cols.float(), scale.float(), float(label_smoothing), int(tile), group)


class _RingSigmoidLoss(torch.autograd.Function):
    """SigLIP's loss of this rank's rows against every rank's columns, / B (see module doc)."""

    @staticmethod
    def forward(ctx: Any, rows: torch.Tensor, cols: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor, tile: int,
                group: Optional[dist.ProcessGroup]) -> torch.Tensor:
        rank, _ = world_info(group)
        labels = torch.arange(rows.shape[0], device=rows.device) + rank * cols.shape[0]  # (n,)
        total = rows.new_zeros(())

        def add(block: torch.Tensor, owner: int) -> None:
            nonlocal total
            total = total + sigmoid_block_loss(rows, block, scale, bias, labels, owner * block.shape[0], tile)

        ring_visit(cols, group, add)
        ctx.save_for_backward(rows, cols, scale, bias, labels)
        ctx.config = (tile, group)
        return total / rows.shape[0]

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[Optional[torch.Tensor], ...]:
        rows, cols, scale, bias, labels = ctx.saved_tensors
        tile, group = ctx.config
        grad_rows = torch.zeros_like(rows)  # (n, D)
        grad_scale, grad_bias = rows.new_zeros(()), rows.new_zeros(())

        def block_grad(block: torch.Tensor, owner: int) -> torch.Tensor:
            nonlocal grad_scale, grad_bias
            grad_block, gs, gb = add_sigmoid_block_grads(rows, block, scale, bias, labels, owner * block.shape[0], tile,
                                                         grad_out / rows.shape[0], grad_rows)
            grad_scale, grad_bias = grad_scale + gs, grad_bias + gb
            return grad_block

        grad_cols = ring_visit(cols, group, block_grad, with_grads=True)
        # reshape: a (1,) scale or bias (DeepSpeed cannot broadcast 0-dim parameters) gets a (1,) gradient
        return grad_rows, grad_cols, grad_scale.reshape(scale.shape), grad_bias.reshape(bias.shape), None, None


def ring_sigmoid_loss(img: torch.Tensor, txt: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor, tile: int = 1024,
                      group: Optional[dist.ProcessGroup] = None) -> torch.Tensor:
    """This rank's images (B, D) against every rank's texts (B, D each), SigLIP's loss / B -> ().

    Equal in value and gradients to ``naive_sigmoid_loss(img, gather_with_grad(txt), scale, bias,
    arange(B) + rank * B)``; every rank must pass the same B.
    """
    if img.shape[0] != txt.shape[0]:
        raise ValueError(f"img and txt are pairs: got {img.shape[0]} images and {txt.shape[0]} texts")
    return _RingSigmoidLoss.apply(img.float(), txt.float(), scale.float(), bias.float(), int(tile), group)
