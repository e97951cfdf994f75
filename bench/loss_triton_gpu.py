"""Contrastive loss on one GPU: peak memory and time of forward + backward, Triton kernels vs naive.

    .venv/bin/python bench/loss_triton_gpu.py [--batches 32768,65536,131072,262144] [--dim 512]
                                              [--kinds softmax,sigmoid] [--impls naive,triton] [--repeats 3]

Global batch B at world size 1: one (B, B) problem, image->text and text->image at once (softmax,
w_row = w_col = 0.5, as ContrastiveLoss(local_loss=False) calls it) or SigLIP's sigmoid loss.
Inputs: unit-norm fp32 features (B, D) that require grad, text = image + noise so positives stand
out, logit scale 1/0.07 (and bias -10 for sigmoid). Peak memory is torch.cuda.max_memory_allocated
above what the inputs hold; time is the median over ``--repeats`` runs after one warm-up. The naive
loss holds (B, B) fp32 logits and their gradient (256 GiB at 256k): out-of-memory is reported, not
fatal. Exits with a message where there is no CUDA.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from typing import Callable

import torch
import torch.nn.functional as F


def loss_fn(kind: str, impl: str) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """(img, txt, scale, bias) -> loss () for one (kind, impl)."""
    from pretrain.losses.contrastive import cross_entropy_fn, sigmoid_fn

    if kind == "softmax":
        ce = cross_entropy_fn(impl)
        return lambda i, t, s, b: ce(i, t, s, labels(i), labels(i), 0.5, 0.5)
    sig = sigmoid_fn(impl)
    return lambda i, t, s, b: sig(i, t, s, b, labels(i))


def labels(x: torch.Tensor) -> torch.Tensor:
    return torch.arange(x.shape[0], device=x.device)  # (B,) the diagonal pairs


def measure(kind: str, impl: str, batch: int, dim: int, repeats: int) -> str:
    """One (kind, impl, batch) row: peak extra memory and median fwd+bwd time, or why it failed."""
    g = torch.Generator(device="cuda").manual_seed(0)
    img = F.normalize(torch.randn(batch, dim, device="cuda", generator=g), dim=-1)  # (B, D)
    txt = F.normalize(img + torch.randn(batch, dim, device="cuda", generator=g), dim=-1)  # (B, D)
    inputs = [x.requires_grad_() for x in (img, txt, torch.tensor(1 / 0.07, device="cuda"),
                                           torch.tensor(-10.0, device="cuda"))]
    fn, times = loss_fn(kind, impl), []
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    try:
        for step in range(repeats + 1):  # step 0 warms up (compiles the kernels)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            torch.autograd.grad(fn(*inputs), inputs)
            end.record()
            torch.cuda.synchronize()
            if step:
                times.append(start.elapsed_time(end))
    except torch.OutOfMemoryError:
        return f"{kind:8s} {impl:8s} {batch:8d}  out of memory"
    finally:
        del inputs
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    return f"{kind:8s} {impl:8s} {batch:8d}  peak {peak:10.1f} MiB  {statistics.median(times):9.1f} ms"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", default="32768,65536,131072,262144")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--kinds", default="softmax,sigmoid")
    parser.add_argument("--impls", default="naive,triton")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/loss_triton_gpu.py needs a CUDA GPU (the Triton kernels compile for CUDA only)")
    print(f"{torch.cuda.get_device_name()}, D={args.dim}, fp32 features, forward + backward")
    for kind in args.kinds.split(","):
        for batch in (int(b) for b in args.batches.split(",")):
            for impl in args.impls.split(","):
                print(measure(kind, impl, batch, args.dim, args.repeats), flush=True)
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
