"""FLIP's saving: image-tower training step time at mask ratio 0, 0.5 and 0.75, one model, one run.

    ./run bench flip_speed [--layers 12] [--batch-size 16] [--warmup 2] [--steps 8] [--threads 1] [--smoke]
    (./run bench NAME runs bench/NAME.py with the venv; or .venv/bin/python bench/flip_speed.py)

What one timed step is: forward + backward + AdamW step of FLIP's image side only, the timm ViT
(``model.visual``) + ``visual_proj`` + ``logit_scale``, exactly as ``FLIP.forward`` runs it while
training: ``random_keep`` picks the kept patches, ``encode_kept_patches`` encodes class token +
kept patches (mask 0: ``encode_image``, every patch), then ``ContrastiveLoss`` against fixed caption
embeddings, one per Fashion-MNIST class (the text tower is left out: masking does not change its
cost unless text masking is on, and including it would only dilute the ratio by a constant).

Model (stated, not a preset): ViT-S/16 as timm builds it with CLIP's pre-norm: 224 px images, 16 px
patches (196 patches), 384 wide / 12 layers / 6 heads / MLP 4x, embed 256, fp32, batch 16 (about
two minutes in all on one CPU core). Mask 0.5 keeps 98 patches, 0.75 keeps 49 (plus the class token).
Inputs: the first ``batch * steps`` real Fashion-MNIST test images
(/usr/share/datasets/fashion-mnist, ``apt-get install dataset-fashion-mnist``), 28 px grey resized
bilinearly to 224 px and repeated to 3 channels; every ratio sees the same images in the same order
and each ratio trains its own copy of the model (same starting weights) with its own AdamW.

Timing: the three ratios take turns, one step each, order rotated every round, so a busy neighbour
on a shared machine slows all three alike rather than whichever happened to be running. The first
``--warmup`` rounds (allocator and thread-pool warm-up) are not timed; each ratio's time is the
median of its ``--steps`` timed steps (min-max printed beside it). CUDA when available
(``torch.cuda.synchronize()`` around each timed step), else CPU with ``--threads`` threads, 1 by
default: on the 2-core development machines, shared with other jobs, two OpenMP threads stall
whenever a neighbour holds one core (every parallel region waits for its slowest thread), which
made single steps vary 3-4x; one thread gave steps within a few percent of each other.

Targets (step time relative to mask 0): 0.5 -> at most 0.55x, 0.75 -> at most 0.35x; FLIP reports
0.50x and 0.33x (Li et al. 2023). The encoder's token fractions are 99/197 = 0.50 and 50/197 =
0.25; attention's quadratic part shrinks faster than that, while the patch embedding (it runs on
every patch, before the selection), the projection and the AdamW step do not shrink at all.
Last line: ``flip_time_ratio_50: X flip_time_ratio_75: Y``.

``--smoke``: the same run at tiny sizes, to check that the script works, not to measure (about 10 s
on one core, nearly all of it importing torch and timm): 32 px images, 8 px patches (16 patches:
mask 0.5 keeps 8, 0.75 keeps 4), width 32, 1 layer, 2 heads, batch 4, 1 warm-up and 1 timed round,
on the same real Fashion-MNIST images; its ratios mean nothing. Flags given beside ``--smoke`` still
apply.
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import time

import torch
import torch.nn.functional as F

import smoke
from data_prep.sources.fashion_mnist import load_split
from pretrain.config import Arch, FlipConfig, ModelConfig, TextConfig, VisionConfig
from pretrain.losses import ContrastiveLoss
from pretrain.models.flip import FLIP, keep_count, random_keep

FASHION_MNIST = "/usr/share/datasets/fashion-mnist"
RATIOS = (0.0, 0.5, 0.75)
EOS = 3
# --smoke: every ratio still drops patches (16 patches); a warm-up round so that the rotation and the
# untimed branch run too.
SMOKE = {"image_size": 32, "patch_size": 8, "width": 32, "layers": 1, "heads": 2, "batch_size": 4, "warmup": 1,
         "steps": 1}


def build(a: argparse.Namespace) -> FLIP:
    # The text tower is built (FLIP owns one) but never run or optimised here: keep it tiny.
    cfg = ModelConfig(
        arch=Arch.flip, name="flip_speed", embed_dim=256,
        vision=VisionConfig(image_size=a.image_size, patch_size=a.patch_size, width=a.width, layers=a.layers,
                            heads=a.heads),
        text=TextConfig(context_length=8, vocab_size=16, width=16, layers=1, heads=1),
        flip=FlipConfig(mask_ratio=0.5),
    )
    return FLIP(cfg, eos_id=EOS)


def load_images(count: int, size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``count`` Fashion-MNIST test images -> (count, 3, size, size) normalised, labels (count,)."""
    images, labels = load_split(FASHION_MNIST, "test")
    x = torch.from_numpy(images[:count].copy()).float().div(255)[:, None]  # (count, 1, 28, 28)
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)  # (count, 1, S, S)
    x = ((x - x.mean()) / x.std()).expand(-1, 3, -1, -1).contiguous()  # (count, 3, S, S)
    return x.to(device), torch.from_numpy(labels[:count].copy()).to(device)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


class Run:
    """One mask ratio's own copy of the model (same starting weights) and its own AdamW."""

    def __init__(self, model: FLIP, ratio: float) -> None:
        self.model, self.ratio = model, ratio
        self.keep = keep_count(model.num_patches, ratio)
        params = [*model.visual.parameters(), *model.visual_proj.parameters(), model.logit_scale]
        self.opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.1)
        self.loss_fn = ContrastiveLoss()
        self.times: list[float] = []

    def step(self, x: torch.Tensor, text: torch.Tensor) -> float:
        """One training step on images x (B, 3, S, S) against caption embeddings text (B, D) -> seconds."""
        m = self.model
        sync(x.device)
        t0 = time.perf_counter()
        if self.keep < m.num_patches:
            idx = random_keep(x.shape[0], m.num_patches, self.keep, device=x.device)  # (B, K)
            feats = m.encode_kept_patches(x, idx)  # (B, D)
        else:
            feats = m.encode_image(x)  # (B, D)
        loss = self.loss_fn(feats, text, m.scale())
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        sync(x.device)
        return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--patch-size", type=int, default=16)
    p.add_argument("--width", type=int, default=384)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per ratio")
    p.add_argument("--steps", type=int, default=8, help="timed steps per ratio")
    p.add_argument("--threads", type=int, default=1, help="CPU threads (torch.set_num_threads); 0: torch's default")
    a = smoke.parse_args(p, SMOKE, "seconds, checks the script works: 32 px ViT, 1 layer, batch 4, 1 round; "
                                   "see the docstring")
    if a.steps < 1 or a.warmup < 0:
        p.error("need --steps >= 1 and --warmup >= 0")
    if a.threads and not torch.cuda.is_available():
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = build(a).to(device).train()
    images, labels = load_images(a.batch_size * a.steps, a.image_size, device)
    # Fixed caption embeddings, one per class: the image side's contrastive targets.
    class_text = F.normalize(torch.randn(10, model.cfg.embed_dim, device=device), dim=-1)  # (10, D)
    where = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"torch {torch.__version__} | {where} | fp32 | ViT {a.image_size}px/{a.patch_size}px "
          f"({model.num_patches} patches), width {a.width}, {a.layers} layers, {a.heads} heads | batch {a.batch_size} | "
          f"{a.warmup} warm-up + {a.steps} timed steps per ratio, interleaved | "
          f"load average before: {os.getloadavg()[0]:.2f}", flush=True)
    runs = [Run(copy.deepcopy(model), r) for r in RATIOS]
    # Interleaved: step i of every ratio runs back to back (order rotated each step), so a noisy
    # neighbour on a shared machine slows all ratios alike instead of whichever ran at that moment.
    for i in range(a.warmup + a.steps):
        batch = slice((i % a.steps) * a.batch_size, (i % a.steps + 1) * a.batch_size)
        x, text = images[batch], class_text[labels[batch]]  # (B, 3, S, S), (B, D)
        for run in runs[i % 3:] + runs[:i % 3]:
            seconds = run.step(x, text)
            if i >= a.warmup:
                run.times.append(seconds)
    median = {run.ratio: statistics.median(run.times) for run in runs}
    spread = {run.ratio: (min(run.times), max(run.times)) for run in runs}
    print(f"\n{'mask':>5} {'keep tokens':>12} {'ms/step':>9} {'min-max ms':>13} {'vs mask 0':>10}")
    for r in RATIOS:
        keep = keep_count(model.num_patches, r)
        lo, hi = spread[r]
        print(f"{r:>5.2f} {f'{keep}+1':>12} {median[r] * 1e3:>9.1f} {f'{lo * 1e3:.0f}-{hi * 1e3:.0f}':>13} "
              f"{median[r] / median[0.0]:>9.2f}x")
    print(f"flip_time_ratio_50: {median[0.5] / median[0.0]:.2f} flip_time_ratio_75: {median[0.75] / median[0.0]:.2f}")


if __name__ == "__main__":
    main()
