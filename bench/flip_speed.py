"""FLIP's saving: image-tower training step time at mask ratio 0, 0.5 and 0.75, one model, one run.

    ./run bench flip_speed [--layers 6] [--batch-size 16] [--warmup 2] [--steps 5] [--repeats 1]
    (or .venv/bin/python bench/flip_speed.py [args])

What one timed step is: forward + backward + AdamW step of FLIP's image side only, the timm ViT
(``model.visual``) + ``visual_proj`` + ``logit_scale``, exactly as ``FLIP.forward`` runs it while
training: ``random_keep`` picks the kept patches, ``encode_kept_patches`` encodes class token +
kept patches (mask 0: ``encode_image``, every patch), then ``ClipLoss`` against fixed caption
embeddings, one per Fashion-MNIST class (the text tower is left out: masking does not change its
cost unless text masking is on, and including it would only dilute the ratio by a constant).

Model (stated, not a preset): 224 px images, 16 px patches (196 patches), ViT 384 wide / 6 layers
/ 6 heads / MLP 4x (a ViT-S/16 at half depth, so the whole run takes a couple of minutes on 2 CPU
cores), embed 256, fp32, batch 16. Mask 0.5 keeps 98 patches, 0.75 keeps 49 (plus the class token).
Inputs: the first ``batch * steps`` real Fashion-MNIST test images
(/usr/share/datasets/fashion-mnist, ``apt-get install dataset-fashion-mnist``), 28 px grey resized
bilinearly to 224 px and repeated to 3 channels; every ratio sees the same images in the same order
and starts from the same weights with a fresh AdamW.

Timing: per ratio, ``--warmup`` steps (allocator and thread-pool warm-up) are not timed, then the
median of ``--steps`` timed steps; with ``--repeats`` > 1 the ratios run again in rotated order and
the median is over all timed steps. CPU by default (all its threads: ``torch.get_num_threads()``),
CUDA when available (``torch.cuda.synchronize()`` around each timed step).

Targets (step time relative to mask 0): 0.5 -> at most 0.55x, 0.75 -> at most 0.35x; FLIP reports
0.50x and 0.33x (Li et al. 2023). The patch embedding, the head and the optimizer step do not
shrink with masking, so a ratio a bit above the token fraction is expected at small sizes.
Last line: ``flip_time_ratio_50: X flip_time_ratio_75: Y``.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.nn.functional as F

from data_prep.sources.fashion_mnist import load_split
from pretrain.config import Arch, FlipConfig, ModelConfig, TextConfig, VisionConfig
from pretrain.losses import ClipLoss
from pretrain.models.flip import FLIP, keep_count, random_keep

FASHION_MNIST = "/usr/share/datasets/fashion-mnist"
RATIOS = (0.0, 0.5, 0.75)
EOS = 3


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
    x = torch.from_numpy(images[:count]).float().div(255)[:, None]  # (count, 1, 28, 28)
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)  # (count, 1, S, S)
    x = ((x - x.mean()) / x.std()).expand(-1, 3, -1, -1).contiguous()  # (count, 3, S, S)
    return x.to(device), torch.from_numpy(labels[:count]).to(device)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_ratio(model: FLIP, state: dict, ratio: float, images: torch.Tensor, labels: torch.Tensor,
               class_text: torch.Tensor, a: argparse.Namespace) -> list[float]:
    """Seconds of each timed training step at mask ``ratio`` (the warm-up steps left out)."""
    model.load_state_dict(state)  # same starting weights for every ratio
    params = [*model.visual.parameters(), *model.visual_proj.parameters(), model.logit_scale]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.1)
    loss_fn = ClipLoss()
    keep = keep_count(model.num_patches, ratio)
    times = []
    for step in range(a.warmup + a.steps):
        batch = slice((step % a.steps) * a.batch_size, (step % a.steps + 1) * a.batch_size)
        x, text = images[batch], class_text[labels[batch]]  # (B, 3, S, S), (B, D)
        sync(images.device)
        t0 = time.perf_counter()
        if keep < model.num_patches:
            idx = random_keep(x.shape[0], model.num_patches, keep, device=x.device)  # (B, K)
            feats = model.encode_kept_patches(x, idx)  # (B, D)
        else:
            feats = model.encode_image(x)  # (B, D)
        loss = loss_fn(feats, text, model.scale())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sync(images.device)
        if step >= a.warmup:
            times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--patch-size", type=int, default=16)
    p.add_argument("--width", type=int, default=384)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per ratio and repeat")
    p.add_argument("--steps", type=int, default=5, help="timed steps per ratio and repeat")
    p.add_argument("--repeats", type=int, default=1, help="rounds over the ratios, order rotated each round")
    a = p.parse_args()
    if a.steps < 1 or a.warmup < 0:
        p.error("need --steps >= 1 and --warmup >= 0")
    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = build(a).to(device).train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    images, labels = load_images(a.batch_size * a.steps, a.image_size, device)
    # Fixed caption embeddings, one per class: the image side's contrastive targets.
    class_text = F.normalize(torch.randn(10, model.cfg.embed_dim, device=device), dim=-1)  # (10, D)
    where = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"torch {torch.__version__} | {where} | fp32 | ViT {a.image_size}px/{a.patch_size}px "
          f"({model.num_patches} patches), width {a.width}, {a.layers} layers, {a.heads} heads | batch {a.batch_size} | "
          f"{a.warmup} warm-up + {a.steps} timed steps per ratio, {a.repeats} repeat(s) | "
          f"load average before: {os.getloadavg()[0]:.2f}", flush=True)
    times: dict[float, list[float]] = {r: [] for r in RATIOS}
    for rep in range(a.repeats):
        order = RATIOS[rep % len(RATIOS):] + RATIOS[:rep % len(RATIOS)]
        for ratio in order:
            t = time_ratio(model, state, ratio, images, labels, class_text, a)
            times[ratio] += t
            print(f"  repeat {rep} mask {ratio:.2f}: median {statistics.median(t) * 1e3:.0f} ms/step", flush=True)
    median = {r: statistics.median(t) for r, t in times.items()}
    print(f"\n{'mask':>5} {'keep tokens':>12} {'ms/step':>9} {'vs mask 0':>10}")
    for r in RATIOS:
        keep = keep_count(model.num_patches, r)
        print(f"{r:>5.2f} {f'{keep}+1':>12} {median[r] * 1e3:>9.1f} {median[r] / median[0.0]:>9.2f}x")
    print(f"flip_time_ratio_50: {median[0.5] / median[0.0]:.2f} flip_time_ratio_75: {median[0.75] / median[0.0]:.2f}")


if __name__ == "__main__":
    main()
