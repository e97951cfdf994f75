"""Contrastive loss on one GPU: peak memory and time of forward + backward, Triton kernels vs naive.

    .venv/bin/python bench/loss_triton_gpu.py [--batches 32768,65536,131072,262144] [--dim 512]
                                              [--kinds softmax,sigmoid] [--impls naive,triton] [--repeats 3]
                                              [--smoke]

Global batch B at world size 1: one (B, B) problem, image->text and text->image at once (softmax,
w_row = w_col = 0.5, as ContrastiveLoss(local_loss=False) calls it) or SigLIP's sigmoid loss.
Inputs: unit-norm fp32 features (B, D) that require grad, text = image + noise so positives stand
out, logit scale 1/0.07 (and bias -10 for sigmoid). Peak memory is torch.cuda.max_memory_allocated
above what the inputs hold; time is the median over ``--repeats`` runs after one warm-up. The naive
loss holds (B, B) fp32 logits and their gradient (256 GiB at 256k): out-of-memory is reported, not
fatal. Exits with a message where there is no CUDA (except with ``--smoke``).

Output: one row per (kind, batch, impl), then as the last line, for each kind,
``triton_vs_naive_time_<kind>: X (B=N)``: Triton's median time / naive's at N, the largest batch
at which both ran (the naive loss runs out of memory above some batch), or ``n/a`` where there is
none (e.g. ``--impls triton``). Default run: ``triton_vs_naive_time_softmax: X (B=N)
triton_vs_naive_time_sigmoid: Y (B=N)``.

``--smoke``: the same code on CPU, in seconds, to check that the script works, not to measure:
the kernels run in Triton's interpreter (``TRITON_INTERPRET=1``, set by the script before triton
is imported; see tests/pretrain/interpret.py), batches 64 and 96 (one 64-row block; 2 x 2 blocks,
the last ones ragged), D=32, 1 repetition, both kinds and both impls. Peak memory is a CUDA
counter: the rows print it as n/a. ``--smoke`` must be spelled out in full (it is read from the
command line before argparse). Flags given beside it still apply.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable, Optional

if "--smoke" in sys.argv[1:]:
    # Triton fixes interpreted-or-compiled at its first import, for the whole process (see
    # tests/pretrain/interpret.py): the smoke's CPU kernels need the interpreter chosen before
    # anything below may import it.
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import smoke  # noqa: E402

# --smoke: the interpreter runs every kernel program in Python, so its time grows with the tiles: 96 rows
# are 2 x 2 blocks of 64, a ragged last one included (0.2-0.7 s a loss on a 2-core machine, with its
# load; 256 rows, 4 x 4 blocks, took 2.6 s).
SMOKE = {"batches": "64,96", "dim": 32, "repeats": 1}


@dataclass
class Row:
    """One (kind, impl, batch) measurement."""

    kind: str
    impl: str
    batch: int
    ms: Optional[float] = None  # median forward + backward; None: out of memory
    peak_mib: Optional[float] = None  # peak CUDA memory above the inputs; None: out of memory, or CPU

    def text(self) -> str:
        head = f"{self.kind:8s} {self.impl:8s} {self.batch:8d}"
        if self.ms is None:
            return f"{head}  out of memory"
        peak = f"{self.peak_mib:10.1f}" if self.peak_mib is not None else f"{'n/a':>10}"
        return f"{head}  peak {peak} MiB  {self.ms:9.1f} ms"


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


def timed_ms(run: Callable[[], object], device: torch.device) -> float:
    """Milliseconds of ``run()``: CUDA events on the GPU (kernels are asynchronous), wall clock on CPU."""
    if device.type != "cuda":
        t0 = time.perf_counter()
        run()
        return (time.perf_counter() - t0) * 1e3
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    run()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end)


def measure(kind: str, impl: str, batch: int, dim: int, repeats: int, device: torch.device) -> Row:
    """One (kind, impl, batch) row: peak extra memory (CUDA only) and median fwd+bwd time, or out of memory."""
    cuda = device.type == "cuda"
    g = torch.Generator(device=device).manual_seed(0)
    img = F.normalize(torch.randn(batch, dim, device=device, generator=g), dim=-1)  # (B, D)
    txt = F.normalize(img + torch.randn(batch, dim, device=device, generator=g), dim=-1)  # (B, D)
    inputs = [x.requires_grad_() for x in (img, txt, torch.tensor(1 / 0.07, device=device),
                                           torch.tensor(-10.0, device=device))]
    fn, times = loss_fn(kind, impl), []
    if cuda:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    try:
        for step in range(repeats + 1):  # step 0 warms up (compiles the kernels)
            # allow_unused: the softmax loss has no bias, whose gradient is then None (not an error).
            ms = timed_ms(lambda: torch.autograd.grad(fn(*inputs), inputs, allow_unused=True), device)
            if step:
                times.append(ms)
    except torch.OutOfMemoryError:
        return Row(kind, impl, batch)
    finally:
        del inputs
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20 if cuda else None
    return Row(kind, impl, batch, statistics.median(times), peak)


def time_ratio(rows: list[Row], kind: str) -> str:
    """``triton_vs_naive_time_<kind>: X (B=N)``: Triton / naive median time at the largest batch where
    both ran (naive runs out of memory first, so the largest batch asked for rarely has both)."""
    ms = {(r.impl, r.batch): r.ms for r in rows if r.kind == kind and r.ms is not None}
    both = [b for (impl, b) in ms if impl == "triton" and ("naive", b) in ms]
    if not both:
        return f"triton_vs_naive_time_{kind}: n/a"
    b = max(both)
    return f"triton_vs_naive_time_{kind}: {ms['triton', b] / ms['naive', b]:.2f} (B={b})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", default="32768,65536,131072,262144")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--kinds", default="softmax,sigmoid")
    parser.add_argument("--impls", default="naive,triton")
    parser.add_argument("--repeats", type=int, default=3)
    args = smoke.parse_args(parser, SMOKE, "CPU, seconds: tiny batches, kernels in triton's interpreter, "
                                           "peak memory n/a; checks the script works (see the docstring)")
    if args.smoke:
        if os.environ.get("TRITON_INTERPRET") != "1":  # an abbreviation (--smo) escaped the check at the top
            parser.error("spell out --smoke in full: it is read before argparse to start triton's interpreter")
        device = torch.device("cpu")
    elif torch.cuda.is_available():
        device = torch.device("cuda")
    else:
        sys.exit("bench/loss_triton_gpu.py needs a CUDA GPU (the Triton kernels compile for CUDA only; "
                 "--smoke runs them interpreted on CPU)")
    where = torch.cuda.get_device_name() if device.type == "cuda" else "CPU, triton interpreter (smoke)"
    print(f"{where}, D={args.dim}, fp32 features, forward + backward")
    kinds = args.kinds.split(",")
    rows: list[Row] = []
    for kind in kinds:
        for batch in (int(b) for b in args.batches.split(",")):
            for impl in args.impls.split(","):
                rows.append(measure(kind, impl, batch, args.dim, args.repeats, device))
                print(rows[-1].text(), flush=True)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    print(" ".join(time_ratio(rows, kind) for kind in kinds))


if __name__ == "__main__":
    main()
