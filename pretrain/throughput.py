"""Samples/s, achieved TFLOP/s per device and MFU (model FLOPs utilisation).

MFU = achieved model TFLOP/s per device / peak TFLOP/s per device. On a known GPU the peak is its
dense datasheet figure for the training precision; on CPU no datasheet applies, so the peak is an
fp32 matmul measured at start-up with the threads this process has: CPU MFU then says how close the
model's step gets to the best this machine's BLAS does.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

# Dense (no sparsity) TFLOP/s per GPU from NVIDIA datasheets: (bf16 tensor core, tf32/fp32 tensor core).
GPU_PEAK_TFLOPS: dict[str, tuple[float, float]] = {
    "H200": (989.0, 494.0),
    "H100": (989.0, 494.0),
    "A100": (312.0, 156.0),
    "L40S": (362.0, 183.0),
    "A10G": (70.0, 35.0),
    "L4": (121.0, 60.0),
}


def measured_matmul_tflops(size: int = 1024, repeats: int = 24) -> float:
    """TFLOP/s of an fp32 (size x size) matmul on the CPU, best of ``repeats``."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b  # warm-up: thread pool and caches
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * size**3 / best / 1e12


def device_peak_tflops(device: torch.device, bf16: bool) -> float:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, (peak_bf16, peak_fp32) in GPU_PEAK_TFLOPS.items():
            if key in name:
                return peak_bf16 if bf16 else peak_fp32
        raise ValueError(f"no datasheet peak for GPU {name!r}: set engine.peak_tflops")
    return measured_matmul_tflops()


@dataclass
class Throughput:
    """Turns (samples, seconds) over an interval into the ``train/*`` speed metrics."""

    train_flops_per_sample: float  # forward + backward, ~3x the forward
    peak_tflops: float  # per device
    world_size: int

    def metrics(self, samples: int, seconds: float) -> dict[str, float]:
        samples_per_sec = samples / max(seconds, 1e-9)
        tflops = samples_per_sec * self.train_flops_per_sample / self.world_size / 1e12  # per device
        return {
            "train/samples_per_sec": samples_per_sec,
            "train/tflops": tflops,
            "train/mfu": tflops / self.peak_tflops,
        }
