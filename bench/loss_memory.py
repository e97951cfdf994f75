"""Contrastive-loss memory: peak memory and time of forward + backward at global batch 4k, 16k, 64k,
OpenCLIP's ``ClipLoss`` vs ours (naive and chunked), one run, same inputs.

    ./run bench loss_memory [--batches 4096,16384,65536] [--dim 512] [--tile 1024] [--repeats 5]
                            [--limit-gib 20] [--threads N] [--systems openclip,naive,chunked] [--smoke]
    (``./run bench NAME`` runs bench/NAME.py with the venv; ``.venv/bin/python bench/loss_memory.py``
    works too.)

Systems, all fp32 on CPU, one process, world size 1 (no process group: the gather is the identity,
so the global batch is the local batch):
- OpenCLIP: ``open_clip.loss.ClipLoss()`` of PyPI ``open-clip-torch==3.3.0``, run by the python of its
  own venv (.bench/openclip-venv, created if missing); at world size 1 it builds both (B, B) logit
  matrices, image->text and text->image, and takes ``F.cross_entropy`` of each;
- ours naive: ``pretrain.losses.ContrastiveLoss(local_loss=True, impl="naive")``, the plain reference;
- ours chunked: ``ContrastiveLoss(local_loss=True, impl="chunked", tile=--tile)``: the logits visited
  in (tile x tile) blocks, online log-sum-exps of rows and columns in one forward pass, blocks
  recomputed in backward, never (B, B). Tile 1024 by default, the config's default (``loss.tile``).
  At world size 1 the local loss's two matrices are one matrix and its transpose, so both of ours
  compute it once (OpenCLIP computes both).

Inputs (synthetic on purpose: this measures shapes and maths, not a model): image features = rows of
a seeded standard normal (B, D) made unit-norm, text features = unit-norm(image + same-size noise) so
that the positives stand out as in a trained model; both require grad, as tower outputs do;
``logit_scale`` = 1/0.07 (CLIP's initial value), a scalar that requires grad. Every system's child
builds them from the same seed with the same torch version (2.14.1 in both venvs) and reports a
digest of them; the run stops if two systems saw different inputs.

Each (system, batch) runs in its own subprocess whose address space is capped with
``RLIMIT_AS`` (``--limit-gib``, lowered to what the machine has free if that is less), so an
allocation that does not fit raises inside the child (reported as "does not fit in N GiB") instead
of pushing the machine out of memory. The cap counts the whole process, torch's ~3.5 GiB of mapped
libraries included.

Measured in the child:
- time: forward + backward (loss, then ``loss.backward()``; gradients set to None before each
  repetition so every one allocates its own), wall clock, median of the repetitions. One warm-up
  forward + backward first (thread pool, lazy initialisation), at min(B, 4096) rows of the same
  inputs so that the 64k runs are not paid twice. Repetitions: ``--repeats`` at the smallest batch,
  fewer as the cost grows with B^2 (ceil(repeats x (smallest / B)^2): 5, 1, 1 by default).
- peak memory, per repetition: freed heap memory is handed back to the OS (glibc ``malloc_trim``,
  so the baseline is live data only: it otherwise varied by +-80 MiB with whatever malloc happened
  to keep), then the kernel's resident-set high-water mark (VmHWM in /proc/self/status) is reset
  (``echo 5 > /proc/self/clear_refs``) right before the loss module is built, after the inputs exist
  and the warm-up is done; peak = VmHWM after forward + backward - RSS at the reset; reported: the
  largest over the repetitions. That is exact (no sampling gap) and counts everything the loss
  allocates: logits or tiles, softmax buffers, and the (B, D) feature gradients it returns (2 x
  B x D x 4 bytes: 64 MiB at 16k, a floor for any loss). Where clear_refs is unavailable a thread
  samples RSS every 2 ms instead. It is the process's real footprint, malloc included (ours
  chunked's 4 MiB blocks come from malloc's heap, OpenCLIP's (B, B) matrices are mmapped).

Correctness check: at the smallest batch (4k by default) the loss of ours chunked, ours naive and
OpenCLIP must agree to 1e-4 relative, which shows all three compute the same loss.

Output: a table (system, batch, peak MiB, median seconds, or "does not fit in N GiB"), then the
targets: at 16k, peak memory OpenCLIP / ours chunked >= 30x; at 64k, ours chunked peak < 2 GB
(2e9 bytes) while OpenCLIP does not fit in 20 GiB; at 4k, time ours chunked / ours naive <= 1.3x.
Last line: ``memory_ratio_vs_openclip_16k: X`` (OpenCLIP peak / ours chunked peak at 16k; ``n/a``
where that was not measured).
Runtime: about 10 minutes on a quiet 2-core CPU, most of it ours chunked at 64k (every block is
computed in forward and again in backward) and the first 16 GiB logit matrix that OpenCLIP and
ours naive fill at 64k before the second one fails to fit. Threads: torch's default (one per core)
unless ``--threads``. Timings on a shared machine are noisy; memory is not.

``--smoke``: the same run at tiny sizes, to check that the script works, not to measure (about
10 s on 2 cores, most of it the two children importing torch): batch 1024 only, D=32, tile 256 (so
ours chunked still visits 4 x 4 blocks), 1 repetition; ours naive and ours chunked, each in its own
capped child, their input digests compared, then the table. OpenCLIP is never run, whatever
``--systems`` says (its venv may not exist, and a smoke installs nothing): a line says so, the loss
check says it was skipped, and the last line is ``memory_ratio_vs_openclip_16k: n/a (smoke:
reference not run)``. The 4k, 16k and 64k target lines need those batches, so they are not printed.
Flags given beside ``--smoke`` still apply (``--smoke --batches 4096`` adds the 4k time line).
"""
from __future__ import annotations

import argparse
import ctypes
import json
import math
import os
import re
import resource
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import smoke

ROOT = Path(__file__).resolve().parents[1]
OC_VENV = ROOT / ".bench" / "openclip-venv"
OC_PYTHON = OC_VENV / "bin" / "python"
OC_PACKAGE = "open-clip-torch==3.3.0"
SYSTEMS = ("openclip", "naive", "chunked")
LABELS = {"openclip": "OpenCLIP ClipLoss", "naive": "ours naive", "chunked": "ours chunked"}
WARMUP_ROWS = 4096
LOSS_RTOL = 1e-4
GiB, MiB = 2**30, 2**20
RESULT = "RESULT "  # prefix of the child's one JSON line, so stray library output cannot be mistaken for it
# --smoke: one small batch and 1 repetition, so that each child's time is its torch import (B=4096 took
# ~7 s more on a loaded 2-core machine); a tile below B so that ours chunked really tiles.
SMOKE = {"batches": "1024", "dim": 32, "tile": 256, "repeats": 1}


# ----------------------------------------------------------------------------------------------- child
# Runs under either venv's python: stdlib + torch at import time; open_clip or pretrain only inside
# the function of its system.

def _status_kib(field: str) -> int:
    return int(re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M).group(1))


def _trim_heap() -> None:
    """Give freed heap memory back to the OS (glibc ``malloc_trim``), so that the baseline is the live
    data only: otherwise memory freed by an earlier repetition stays resident in malloc's free lists
    by chance, raises the baseline and hides that much of the next peak (seen: +-80 MiB at 16k)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: nothing to trim, the measurement is only less repeatable


class PeakMeter:
    """Peak resident memory from ``start()`` on: the kernel's VmHWM, reset at ``start()`` through
    /proc/self/clear_refs (exact); where that cannot be written, a thread sampling RSS every 2 ms."""

    def __init__(self) -> None:
        self.method = "VmHWM"
        self._samples: Optional[threading.Thread] = None
        self._stop = threading.Event()
        self._peak = 0
        self._exact = True

    @staticmethod
    def rss() -> int:
        try:
            return _status_kib("VmRSS") * 1024
        except OSError:
            import psutil  # only where /proc is missing

            return psutil.Process().memory_info().rss

    def start(self) -> int:
        """Begin (again); returns the baseline RSS in bytes."""
        _trim_heap()
        if self._exact:
            try:
                Path("/proc/self/clear_refs").write_text("5")  # 5: reset the peak RSS to the current RSS
                base = _status_kib("VmRSS") * 1024
                if _status_kib("VmHWM") * 1024 <= base + MiB:  # the reset took effect
                    return base
            except OSError:
                pass
            self._exact, self.method = False, "RSS sampled every 2 ms"
        base = self._peak = self.rss()
        self._stop = threading.Event()
        self._samples = threading.Thread(target=self._sample, daemon=True)
        self._samples.start()
        return base

    def _sample(self) -> None:
        while not self._stop.wait(0.002):
            self._peak = max(self._peak, self.rss())

    def peak(self) -> int:
        """Peak RSS in bytes since ``start()``."""
        if self._exact:
            return _status_kib("VmHWM") * 1024
        self._stop.set()
        self._samples.join()
        return max(self._peak, self.rss())


def make_inputs(batch: int, dim: int, seed: int) -> tuple[Any, Any, Any]:
    """(B, D) unit-norm image and text features and logit_scale (), all requiring grad."""
    import torch
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(seed)
    raw = torch.randn(batch, dim, generator=g)  # (B, D)
    img = F.normalize(raw, dim=1)  # (B, D)
    # Text = image + noise of the same size: positives score clearly above negatives, as after training.
    txt = F.normalize(raw + torch.randn(batch, dim, generator=g), dim=1)  # (B, D)
    del raw
    scale = torch.tensor(1 / 0.07)  # CLIP's initial exp(logit_scale)
    return img.requires_grad_(), txt.requires_grad_(), scale.requires_grad_()


def build_loss(system: str, tile: int) -> tuple[Callable[..., Any], str]:
    """The system's loss module and its version string."""
    if system == "openclip":
        import open_clip
        from open_clip.loss import ClipLoss as OpenClipLoss

        return OpenClipLoss(), f"open-clip-torch {open_clip.__version__}"
    sys.path.insert(0, str(ROOT))  # the venv has it installed editable; this also covers a plain checkout
    from pretrain.losses import ContrastiveLoss

    return ContrastiveLoss(local_loss=True, impl=system, tile=tile), "pretrain (this checkout)"


def child(system: str, batch: int, dim: int, tile: int, repeats: int, limit_bytes: int, seed: int,
          threads: int) -> dict[str, Any]:
    # Cap the address space first: a (B, B) matrix that does not fit must raise here, not swap.
    resource.setrlimit(resource.RLIMIT_AS, (limit_bytes, limit_bytes))
    import torch

    if threads > 0:
        torch.set_num_threads(threads)
    out: dict[str, Any] = {"system": system, "batch": batch, "torch": torch.__version__,
                           "threads": torch.get_num_threads()}
    try:
        img, txt, scale = make_inputs(batch, dim, seed)
        out["digest"] = [float(img.detach().double().sum()), float(txt.detach().double().sum())]
        loss_fn, out["version"] = build_loss(system, tile)
        # Warm-up on the first rows (views would share .grad bookkeeping with the full tensors; copies don't).
        w = [t[:WARMUP_ROWS].detach().clone().requires_grad_() for t in (img, txt)]
        loss_fn(w[0], w[1], scale).backward()
        del w, loss_fn
        scale.grad = None
        meter = PeakMeter()
        seconds: list[float] = []
        peaks: list[float] = []
        bases: list[float] = []
        loss_value = 0.0
        for _ in range(repeats):
            # Feature gradients are outputs of the backward: each repetition allocates its own.
            img.grad = txt.grad = scale.grad = None
            base = meter.start()  # per repetition: the peak is that of one forward + backward
            loss_fn, _ = build_loss(system, tile)  # after the baseline, as a training step builds its loss
            t0 = time.perf_counter()
            loss = loss_fn(img, txt, scale)
            loss.backward()
            seconds.append(time.perf_counter() - t0)
            peaks.append((meter.peak() - base) / MiB)
            bases.append(base / MiB)
            loss_value = float(loss.detach())
            del loss, loss_fn
        # The largest repetition's peak: what a training step must have room for.
        out.update(fits=True, peak_mib=max(peaks), peaks_mib=peaks, baseline_mib=bases, seconds=seconds,
                   loss=loss_value, scale_grad=float(scale.grad), peak_method=meter.method)
    except (RuntimeError, MemoryError) as e:  # torch's CPU allocator raises RuntimeError when mmap fails
        text = str(e).splitlines()[0] if str(e) else type(e).__name__
        if isinstance(e, MemoryError) or "allocate" in text.lower() or "memory" in text.lower():
            out.update(fits=False, error=text[:300])
        else:
            raise
    return out


# ---------------------------------------------------------------------------------------------- parent

@dataclass
class Result:
    system: str
    batch: int
    fits: bool
    limit_gib: float
    peak_mib: float = math.nan
    seconds: float = math.nan
    loss: float = math.nan
    note: str = ""


def ensure_openclip() -> None:
    """Create the OpenCLIP venv if missing (pip may take torch from the local index; it must be 2.14.1)."""
    if OC_PYTHON.exists():
        return
    subprocess.run(["python3", "-m", "venv", str(OC_VENV)], check=True)
    subprocess.run([str(OC_PYTHON), "-m", "pip", "install", "-q", OC_PACKAGE], check=True)


def available_bytes() -> int:
    try:
        return _status_kib_meminfo("MemAvailable") * 1024
    except OSError:
        import psutil

        return psutil.virtual_memory().available


def _status_kib_meminfo(field: str) -> int:
    return int(re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/meminfo").read_text(), re.M).group(1))


def repeats_for(batch: int, smallest: int, repeats: int) -> int:
    # Cost grows with B^2, and so do the repetitions' savings: keeps the run within minutes.
    return max(1, math.ceil(repeats * (smallest / batch) ** 2))


def run_child(system: str, batch: int, a: argparse.Namespace, repeats: int, limit_bytes: int) -> tuple[Result, dict[str, Any]]:
    python = str(OC_PYTHON) if system == "openclip" else sys.executable
    cmd = [python, str(Path(__file__).resolve()), "--child", system, "--batches", str(batch), "--dim", str(a.dim),
           "--tile", str(a.tile), "--repeats", str(repeats), "--limit-bytes", str(limit_bytes), "--seed", str(a.seed),
           "--threads", str(a.threads)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT)]
    if proc.returncode != 0 or not lines:
        # A crash below Python's level (e.g. a thread that cannot get its stack) is reported, not hidden.
        tail = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
        return Result(system, batch, False, limit_bytes / GiB, note=f"child failed (exit {proc.returncode}): {tail[:300]}"), {}
    d = json.loads(lines[-1][len(RESULT):])
    if not d["fits"]:
        return Result(system, batch, False, limit_bytes / GiB, note=d["error"]), d
    return Result(system, batch, True, limit_bytes / GiB, d["peak_mib"], statistics.median(d["seconds"]), d["loss"]), d


def gib_text(gib: float) -> str:
    """20.0 -> "20", 4.25 -> "4.2": the cap as a person would write it."""
    return f"{gib:.1f}".rstrip("0").rstrip(".")


def find(results: list[Result], system: str, batch: int) -> Optional[Result]:
    return next((r for r in results if r.system == system and r.batch == batch), None)


def systems_to_run(requested: str, is_smoke: bool) -> list[str]:
    """The systems of ``--systems`` in table order; a smoke leaves OpenCLIP out (printed), since its
    venv may not exist and a smoke never creates it."""
    systems = [s for s in SYSTEMS if s in requested.split(",")]
    if is_smoke and "openclip" in systems:
        systems.remove("openclip")
        print(f"{LABELS['openclip']}: skipped (smoke: the reference runs from its own venv "
              f"{OC_VENV.relative_to(ROOT)}, which a smoke never creates or runs)", flush=True)
    return systems


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batches", default="4096,16384,65536", help="global batch sizes, comma-separated")
    p.add_argument("--dim", type=int, default=512, help="embedding dimension D")
    p.add_argument("--tile", type=int, default=1024, help="ours chunked: columns per tile")
    p.add_argument("--repeats", type=int, default=5, help="timed repetitions at the smallest batch (fewer above)")
    p.add_argument("--limit-gib", type=float, default=20.0, help="address-space cap of each measurement")
    p.add_argument("--systems", default=",".join(SYSTEMS), help="subset of " + ",".join(SYSTEMS))
    p.add_argument("--threads", type=int, default=0, help="torch threads per measurement; 0: torch's default")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--child", choices=SYSTEMS, help=argparse.SUPPRESS)
    p.add_argument("--limit-bytes", type=int, help=argparse.SUPPRESS)
    a = smoke.parse_args(p, SMOKE, "seconds, checks the script works: B=1024, D=32, 1 repetition, ours only "
                                   "(OpenCLIP skipped, nothing installed); see the docstring")
    batches = sorted(int(b) for b in a.batches.split(","))
    if a.child:
        print(RESULT + json.dumps(child(a.child, batches[0], a.dim, a.tile, a.repeats, a.limit_bytes, a.seed,
                                         a.threads)), flush=True)
        return
    systems = systems_to_run(a.systems, a.smoke)
    if "openclip" in systems:
        ensure_openclip()

    print(f"contrastive loss forward+backward | D={a.dim} fp32 CPU, world size 1 | ours chunked tile {a.tile} | "
          f"repeats {', '.join(f'{b}: {repeats_for(b, batches[0], a.repeats)}' for b in batches)} | "
          f"{os.cpu_count()} cores, load average before: {os.getloadavg()[0]:.2f}", flush=True)
    results: list[Result] = []
    details: list[dict[str, Any]] = []
    t_start = time.perf_counter()
    for batch in batches:
        for system in systems:
            # Never promise a child more than the machine has free (a CI job may be running beside us).
            limit = int(min(a.limit_gib * GiB, available_bytes() - GiB))
            r, d = run_child(system, batch, a, repeats_for(batch, batches[0], a.repeats), limit)
            results.append(r)
            details.append(d)
            spread = (f" (repetitions {min(d['peaks_mib']):.0f}-{max(d['peaks_mib']):.0f} MiB)"
                      if r.fits and len(d["peaks_mib"]) > 1 else "")
            status = (f"{r.peak_mib:.0f} MiB{spread}, {r.seconds:.2f} s, loss {r.loss:.6f}" if r.fits
                      else f"does not fit in {gib_text(r.limit_gib)} GiB ({r.note})")
            print(f"  {LABELS[system]:<18} B={batch:<6} {status}", flush=True)

    versions = sorted({f"{d['version']}, torch {d['torch']}, {d['threads']} threads" for d in details if "version" in d})
    print("versions: " + " | ".join(versions))
    methods = sorted({d["peak_method"] for d in details if d.get("fits")})
    print(f"peak memory method: {', '.join(methods)}; wall time of the whole run {time.perf_counter() - t_start:.0f} s")
    digests = {json.dumps(d["digest"]) for d in details if "digest" in d and d["batch"] == batches[0]}
    if len(digests) > 1:
        sys.exit(f"systems saw different inputs at B={batches[0]}: digests {digests}")

    print(f"\n{'system':<18} {'batch':>6} {'peak MiB':>10} {'seconds':>9}  loss")
    for r in results:
        if r.fits:
            print(f"{LABELS[r.system]:<18} {r.batch:>6} {r.peak_mib:>10.1f} {r.seconds:>9.3f}  {r.loss:.6f}")
        else:
            print(f"{LABELS[r.system]:<18} {r.batch:>6} {'does not fit in ' + gib_text(r.limit_gib) + ' GiB':>20}")

    b0 = batches[0]
    oc, ch, nv = (find(results, s, b0) for s in ("openclip", "chunked", "naive"))
    if oc and ch and oc.fits and ch.fits:
        rel = abs(ch.loss - oc.loss) / abs(oc.loss)
        rel_n = abs(nv.loss - oc.loss) / abs(oc.loss) if nv and nv.fits else math.nan
        ok = rel <= LOSS_RTOL and not rel_n > LOSS_RTOL
        print(f"\nloss check at {b0}: OpenCLIP {oc.loss:.6f}, ours chunked {ch.loss:.6f} (rel diff {rel:.1e}), "
              f"ours naive {nv.loss if nv and nv.fits else math.nan:.6f} (rel diff {rel_n:.1e}): "
              f"{'same loss' if ok else 'MISMATCH'} (tolerance {LOSS_RTOL:g})")
        if not ok:
            sys.exit("loss mismatch: the systems do not compute the same loss")
    else:
        print(f"\nloss check at {b0}: skipped (needs OpenCLIP and ours chunked to fit)")

    ratio_16k = math.nan
    oc16, ch16, nv16 = (find(results, s, 16384) for s in ("openclip", "chunked", "naive"))
    if oc16 and ch16 and oc16.fits and ch16.fits:
        ratio_16k = oc16.peak_mib / ch16.peak_mib
        extra = f"; ours naive {nv16.peak_mib:.0f} MiB" if nv16 and nv16.fits else ""
        print(f"16k: peak memory OpenCLIP {oc16.peak_mib:.0f} MiB / ours chunked {ch16.peak_mib:.0f} MiB = "
              f"{ratio_16k:.1f}x (target >= 30x: {'met' if ratio_16k >= 30 else 'NOT met'}){extra}")
    ch64, oc64 = find(results, "chunked", 65536), find(results, "openclip", 65536)
    if ch64:
        if ch64.fits:
            print(f"64k: ours chunked peak {ch64.peak_mib:.0f} MiB = {ch64.peak_mib * MiB / 1e9:.2f} GB (target < 2 GB: "
                  f"{'met' if ch64.peak_mib * MiB < 2e9 else 'NOT met'}), {ch64.seconds:.0f} s")
        else:
            print(f"64k: ours chunked does not fit in {gib_text(ch64.limit_gib)} GiB (target < 2 GB: NOT met)")
    if oc64:
        print(f"64k: OpenCLIP {'fits in ' if oc64.fits else 'does not fit in '}{gib_text(oc64.limit_gib)} GiB"
              + (f" ({oc64.peak_mib:.0f} MiB)" if oc64.fits else f" ({oc64.note})"))
    ch4, nv4 = find(results, "chunked", 4096), find(results, "naive", 4096)
    if ch4 and nv4 and ch4.fits and nv4.fits:
        t = ch4.seconds / nv4.seconds
        print(f"4k: time ours chunked / ours naive = {ch4.seconds:.3f} / {nv4.seconds:.3f} s = {t:.2f}x "
              f"(target <= 1.3x: {'met' if t <= 1.3 else 'NOT met'})")
    print(f"memory_ratio_vs_openclip_16k: {ratio_16k:.1f}" if not math.isnan(ratio_16k)
          else f"memory_ratio_vs_openclip_16k: {smoke.SKIPPED if a.smoke else 'n/a'}")


if __name__ == "__main__":
    main()
