"""The two tile kernels that both contrastive losses are made of, and how they are launched.

Both losses look at the logits z = s * A B^T (+ bias) of rows A (n_a, D) against rows B (n_b, D),
one (BLOCK_A, BLOCK_B) tile at a time, never the whole (n_a, n_b) matrix:

- :func:`row_reduce` reduces each row of z over all of B: its log-sum-exp (softmax) or its sum
  of softplus(z) (sigmoid), (n_a,);
- :func:`row_grad` recomputes the tiles, turns each into P = dL/dz (up to the terms that are
  linear in z, which the callers leave to torch autograd) and accumulates P @ B, (n_a, D), with
  optional per-row sums of P * x and P (x = A B^T) for the gradients of the scale and bias.

The column direction is the row direction of the transposed problem (z^T = s * B A^T), so each
kernel is launched twice with A and B swapped rather than written twice: the column log-sum-exp
costs a second pass over the tiles, but keeps the extra memory O(n + m) (one (n/BLOCK, m) buffer
of per-block column partials would be gigabytes at a 256k batch).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl
from triton import knobs

# Read at the moment triton reads it to decide how @triton.jit below decorates the kernels (the
# mode must also match the one triton.language was imported in; see the package docstring).
INTERPRETED = bool(knobs.runtime.interpret)

SOFTMAX, SIGMOID = 0, 1

# fp32 tiles on tensor cores: plain tf32 rounds the features to 10 mantissa bits, which at a
# logit scale of 100 moves logits by ~1e-2; tf32x3 (three tf32 products) recovers fp32 accuracy
# at a third of tf32's speed, still far above the non-tensor-core "ieee" path.
DOT_PRECISION = "tf32x3"


def require_cuda(*tensors: torch.Tensor) -> None:
    """Compiled kernels read device memory: refuse CPU tensors unless triton interprets on CPU."""
    if INTERPRETED or all(t.is_cuda for t in tensors):
        return
    raise RuntimeError("loss.impl=triton needs CUDA tensors (or TRITON_INTERPRET=1 to test on CPU); "
                       "use loss.impl=auto or chunked")


@dataclass(frozen=True)
class Blocks:
    """Tile sizes: rows of A and B per tile, the D chunk of each dot, the D slice of a gradient."""

    a: int
    b: int
    k: int
    d: int


def _pow2_floor(x: int) -> int:
    return 1 << (max(int(x), 1).bit_length() - 1)


def block_sizes(dim: int, tile: int = 0) -> Blocks:
    """Tile sizes for features of size ``dim``; ``tile`` > 0 caps the row/column block (tests use 16).

    tl.dot needs every side >= 16. The gradient keeps a (BLOCK_A, d) fp32 accumulator in
    registers, so d is capped (256 at the default block): a larger D is split over a second grid
    axis, each slice recomputing the logits (the price of D > 256 is one more pass per slice).
    """
    cap = max(16, min(64, _pow2_floor(tile))) if tile > 0 else 64
    return Blocks(a=cap, b=cap, k=min(32, cap), d=min(max(16, triton.next_power_of_2(dim)), 4 * cap))


@triton.jit
def _dot_tile(a_ptr, b_ptr, offs_a, offs_b, n_a, n_b, dim, stride_a, stride_b,
              BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    """x = A[offs_a] @ B[offs_b]^T in fp32, (BLOCK_A, BLOCK_B), over D in chunks; zero outside."""
    x = tl.zeros((BLOCK_A, BLOCK_B), dtype=tl.float32)
    for k0 in range(0, dim, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(a_ptr + offs_a[:, None] * stride_a + offs_k[None, :],
                    mask=(offs_a[:, None] < n_a) & (offs_k[None, :] < dim), other=0.0).to(tl.float32)
        b = tl.load(b_ptr + offs_b[:, None] * stride_b + offs_k[None, :],
                    mask=(offs_b[:, None] < n_b) & (offs_k[None, :] < dim), other=0.0).to(tl.float32)
        x += tl.dot(a, tl.trans(b), input_precision=PRECISION)
    return x


@triton.jit
def _softplus(z):
    """log(1 + e^z) without overflow; log1p of a small e^-|z| kept exact (SigLIP's many negatives
    sit near z = -10, where a plain log(1 + u) would lose three digits)."""
    u = tl.exp(-tl.abs(z))
    w = 1.0 + u
    d = w - 1.0  # u as rounded into w: log(w) * u / d corrects log(w) for that rounding (Goldberg)
    log1p_u = tl.where(d == 0.0, u, tl.log(w) * (u / tl.where(d == 0.0, 1.0, d)))
    return tl.maximum(z, 0.0) + log1p_u


@triton.jit
def _row_reduce_kernel(a_ptr, b_ptr, out_ptr, scale_ptr, bias_ptr, n_a, n_b, dim, stride_a, stride_b,
                       KIND: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr,
                       PRECISION: tl.constexpr):
    """out[i] = logsumexp_j z_ij (SOFTMAX) or sum_j softplus(z_ij) (SIGMOID); one program per row block."""
    offs_a = tl.program_id(0) * BLOCK_A + tl.arange(0, BLOCK_A)
    scale = tl.load(scale_ptr).to(tl.float32)
    bias = tl.load(bias_ptr).to(tl.float32)
    run_max = tl.full((BLOCK_A,), -float("inf"), tl.float32)  # running max (softmax only)
    run_sum = tl.zeros((BLOCK_A,), tl.float32)  # sum of exp(z - run_max), or of softplus(z)
    for b0 in range(0, n_b, BLOCK_B):
        offs_b = b0 + tl.arange(0, BLOCK_B)
        x = _dot_tile(a_ptr, b_ptr, offs_a, offs_b, n_a, n_b, dim, stride_a, stride_b, BLOCK_A, BLOCK_B, BLOCK_K, PRECISION)
        valid_b = (offs_b < n_b)[None, :]
        if KIND == 0:
            z = tl.where(valid_b, scale * x, -float("inf"))  # (BLOCK_A, BLOCK_B)
            new_max = tl.maximum(run_max, tl.max(z, axis=1))  # finite: every block has a real column
            run_sum = run_sum * tl.exp(run_max - new_max) + tl.sum(tl.exp(z - new_max[:, None]), axis=1)
            run_max = new_max
        else:
            run_sum += tl.sum(tl.where(valid_b, _softplus(scale * x + bias), 0.0), axis=1)
    if KIND == 0:
        out = run_max + tl.log(run_sum)
    else:
        out = run_sum
    tl.store(out_ptr + offs_a, out, mask=offs_a < n_a)


@triton.jit
def _row_grad_kernel(a_ptr, b_ptr, lse_a_ptr, lse_b_ptr, grad_ptr, part_x_ptr, part_1_ptr, scale_ptr, bias_ptr,
                     n_a, n_b, dim, stride_a, stride_b, stride_g, w_a, w_b,
                     KIND: tl.constexpr, USE_A: tl.constexpr, USE_B: tl.constexpr, PARTIALS: tl.constexpr,
                     BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
                     PRECISION: tl.constexpr):
    """grad[i, d-slice] = sum_j P_ij B[j, d-slice], P = dL/dz without its linear part:

    SOFTMAX: P = w_a softmax over the row (USE_A) + w_b softmax over the column (USE_B);
    SIGMOID: P = w_a sigmoid(z). Grid (row blocks, D slices); the D-slice-0 programs also write
    per-row sums of P * x and of P (PARTIALS), reduced in torch: no atomics, so the scale's
    gradient is deterministic.
    """
    pid_a, pid_d = tl.program_id(0), tl.program_id(1)
    offs_a = pid_a * BLOCK_A + tl.arange(0, BLOCK_A)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    valid_a = offs_a < n_a
    scale = tl.load(scale_ptr).to(tl.float32)
    bias = tl.load(bias_ptr).to(tl.float32)
    if USE_A:
        lse_a = tl.load(lse_a_ptr + offs_a, mask=valid_a, other=0.0)  # (BLOCK_A,)
    acc = tl.zeros((BLOCK_A, BLOCK_D), tl.float32)
    part_x = tl.zeros((BLOCK_A,), tl.float32)
    part_1 = tl.zeros((BLOCK_A,), tl.float32)
    for b0 in range(0, n_b, BLOCK_B):
        offs_b = b0 + tl.arange(0, BLOCK_B)
        valid_b = offs_b < n_b
        x = _dot_tile(a_ptr, b_ptr, offs_a, offs_b, n_a, n_b, dim, stride_a, stride_b, BLOCK_A, BLOCK_B, BLOCK_K, PRECISION)
        p = tl.zeros((BLOCK_A, BLOCK_B), tl.float32)
        if KIND == 0:
            if USE_A:
                p += w_a * tl.exp(scale * x - lse_a[:, None])
            if USE_B:
                lse_b = tl.load(lse_b_ptr + offs_b, mask=valid_b, other=0.0)  # (BLOCK_B,)
                p += w_b * tl.exp(scale * x - lse_b[None, :])
        else:
            p += w_a * tl.sigmoid(scale * x + bias)
        p = tl.where(valid_a[:, None] & valid_b[None, :], p, 0.0)  # padding rows/columns contribute nothing
        b_slice = tl.load(b_ptr + offs_b[:, None] * stride_b + offs_d[None, :],
                          mask=valid_b[:, None] & (offs_d[None, :] < dim), other=0.0).to(tl.float32)
        acc += tl.dot(p, b_slice, input_precision=PRECISION)  # (BLOCK_A, BLOCK_D)
        if PARTIALS:
            part_x += tl.sum(p * x, axis=1)
            part_1 += tl.sum(p, axis=1)
    tl.store(grad_ptr + offs_a[:, None] * stride_g + offs_d[None, :], acc,
             mask=valid_a[:, None] & (offs_d[None, :] < dim))
    if PARTIALS:
        first = valid_a & (pid_d == 0)
        tl.store(part_x_ptr + offs_a, part_x, mask=first)
        tl.store(part_1_ptr + offs_a, part_1, mask=first)


def _num_warps(blocks: Blocks) -> int:
    return 8 if blocks.a * blocks.d >= 64 * 128 else 4


def row_reduce(kind: int, a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor,
               blocks: Blocks) -> torch.Tensor:
    """a (n_a, D), b (n_b, D) contiguous; scale (), bias () -> (n_a,) fp32 row log-sum-exp or softplus sum."""
    n_a, dim = a.shape
    out = torch.empty(n_a, device=a.device, dtype=torch.float32)  # (n_a,)
    _row_reduce_kernel[(triton.cdiv(n_a, blocks.a),)](
        a, b, out, scale, bias, n_a, b.shape[0], dim, a.stride(0), b.stride(0),
        KIND=kind, BLOCK_A=blocks.a, BLOCK_B=blocks.b, BLOCK_K=blocks.k, PRECISION=DOT_PRECISION,
        num_warps=_num_warps(blocks))
    return out


def row_grad(kind: int, a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor,
             lse_a: Optional[torch.Tensor], lse_b: Optional[torch.Tensor], w_a: float, w_b: float,
             partials: bool, blocks: Blocks) -> tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """sum_j P_ij b_j, (n_a, D) fp32, and with ``partials`` the per-row sums of P * x and P, (n_a,) each.

    For SOFTMAX, ``lse_a`` / ``lse_b`` (None: that direction is absent) are the row / column
    log-sum-exps; SIGMOID uses neither. The caller multiplies by the scale and the incoming gradient.
    """
    n_a, dim = a.shape
    grad = torch.empty(n_a, dim, device=a.device, dtype=torch.float32)  # (n_a, D)
    part_x = torch.empty(n_a, device=a.device, dtype=torch.float32) if partials else grad  # (n_a,)
    part_1 = torch.empty(n_a, device=a.device, dtype=torch.float32) if partials else grad  # (n_a,)
    unused = scale  # any valid pointer for the arguments a constexpr flag switches off
    _row_grad_kernel[(triton.cdiv(n_a, blocks.a), triton.cdiv(dim, blocks.d))](
        a, b, unused if lse_a is None else lse_a, unused if lse_b is None else lse_b, grad, part_x, part_1,
        scale, bias, n_a, b.shape[0], dim, a.stride(0), b.stride(0), grad.stride(0), float(w_a), float(w_b),
        KIND=kind, USE_A=lse_a is not None, USE_B=lse_b is not None, PARTIALS=partials,
        BLOCK_A=blocks.a, BLOCK_B=blocks.b, BLOCK_K=blocks.k, BLOCK_D=blocks.d, PRECISION=DOT_PRECISION,
        num_warps=_num_warps(blocks))
    return grad, (part_x if partials else None), (part_1 if partials else None)
