"""Zero-shot classification and image-text retrieval, during training and on exported models.

In a distributed run every rank encodes an equal slice of each eval set and the features are
all-gathered, so evaluation costs 1/W of the work per rank and also works under ZeRO-3 (where every
rank must run the same forward calls). Metric names follow DESIGN.md:
``eval/zeroshot/<set>/top1|top5`` and ``eval/retrieval/<set>/{image_to_text,text_to_image}_r{1,5,10}``.

Standalone: ``python -m pretrain.evaluate EXPORT_DIR`` (see ``--help``).
"""
from __future__ import annotations

import argparse
import json
import logging
import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
from PIL import Image

from data_prep import storage
from data_prep.manifest import load_manifest
from data_prep.sources import fashion_mnist
from pretrain.config import EvalConfig, RetrievalSet, ZeroShotSet
from pretrain.data.shard_samples import parse_sample, read_tar
from pretrain.data.tokenizer import Tokenizer
from pretrain.losses import gather_no_grad, world_info
from pretrain.models import ContrastiveModel

log = logging.getLogger(__name__)


@dataclass
class ZeroShotData:
    images: torch.Tensor  # (N, 3, H, W) preprocessed
    labels: torch.Tensor  # (N,)
    classnames: list[str]
    templates: list[str]


@dataclass
class RetrievalData:
    images: torch.Tensor  # (N, 3, H, W) preprocessed; image i pairs with caption i
    captions: list[str]


def load_zeroshot(spec: ZeroShotSet, transform: Callable[[Image.Image], torch.Tensor]) -> ZeroShotData:
    if spec.name != "fashion_mnist":
        raise ValueError(f"eval.zeroshot: unknown set {spec.name!r}; known: fashion_mnist")
    images, labels = fashion_mnist.load_split(spec.root, "test")  # (N, 28, 28) uint8, (N,)
    if spec.limit is not None:
        images, labels = images[: spec.limit], labels[: spec.limit]
    pixels = torch.stack([transform(Image.fromarray(im).convert("RGB")) for im in images])
    return ZeroShotData(pixels, torch.as_tensor(labels), list(fashion_mnist.CLASSNAMES), list(fashion_mnist.TEMPLATES))


def load_retrieval(spec: RetrievalSet, transform: Callable[[Image.Image], torch.Tensor]) -> RetrievalData:
    manifest = load_manifest(spec.data)
    images, captions, skipped = [], [], 0

    def on_error(message: str) -> None:
        log.warning("eval %s: %s", spec.name, message)

    for shard in manifest.shards:
        for raw in read_tar(manifest.shard_path(shard), 0, shard.samples, on_error, shard.bytes):
            try:
                image, caption, _ = parse_sample(raw, transform)
            except ValueError as e:
                skipped += 1
                on_error(str(e))
                continue
            images.append(image)
            captions.append(caption)
    if not images:
        raise ValueError(f"eval.retrieval {spec.name}: no usable sample in {storage.redact(manifest.root)}")
    if skipped:
        log.warning("eval %s: skipped %d corrupt samples", spec.name, skipped)
    return RetrievalData(torch.stack(images), captions)


@torch.no_grad()
def encode_sharded(encode: Callable[[torch.Tensor], torch.Tensor], inputs: torch.Tensor, batch_size: int) -> torch.Tensor:
    """encode over rows of ``inputs`` (N, ...), split evenly across ranks -> (N, D) on every rank."""
    rank, world = world_info()
    n = inputs.shape[0]
    per = math.ceil(n / world)
    idx = torch.arange(rank * per, (rank + 1) * per).clamp(max=n - 1)  # pad by repeating the last row
    local = torch.cat([encode(inputs[idx[i : i + batch_size]]) for i in range(0, per, batch_size)])  # (per, D)
    return gather_no_grad(local.float().contiguous())[:n]  # (N, D)


class Evaluator:
    """Holds the preprocessed eval sets; ``run(model)`` returns the eval/* metrics."""

    def __init__(self, cfg: EvalConfig, tokenizer: Tokenizer, transform: Callable[[Image.Image], torch.Tensor]) -> None:
        self.cfg, self.tokenizer = cfg, tokenizer
        self.zeroshot = {s.name: load_zeroshot(s, transform) for s in cfg.zeroshot}
        self.retrieval = {s.name: load_retrieval(s, transform) for s in cfg.retrieval}

    @torch.no_grad()
    def run(self, model: ContrastiveModel, device: torch.device, dtype: torch.dtype, limit: Optional[int] = None) -> dict[str, float]:
        was_training = model.training
        model.eval()
        images_fn = lambda x: model.encode_image(x.to(device, dtype))  # noqa: E731
        text_fn = lambda t: model.encode_text(t.to(device))  # noqa: E731
        metrics: dict[str, float] = {}
        for name, data in self.zeroshot.items():
            n = data.images.shape[0] if limit is None else min(limit, data.images.shape[0])
            classifier = zeroshot_classifier(text_fn, self.tokenizer, data.classnames, data.templates)  # (C, D)
            feats = encode_sharded(images_fn, data.images[:n], self.cfg.batch_size)  # (n, D)
            for k, v in topk_accuracy(feats @ classifier.T, data.labels[:n], (1, 5)).items():
                metrics[f"eval/zeroshot/{name}/{k}"] = v
        for name, data in self.retrieval.items():
            img = encode_sharded(images_fn, data.images, self.cfg.batch_size)  # (N, D)
            txt = encode_sharded(text_fn, self.tokenizer(data.captions), self.cfg.batch_size)  # (N, D)
            for k, v in retrieval_recall(img @ txt.T).items():
                metrics[f"eval/retrieval/{name}/{k}"] = v
        model.train(was_training)
        return metrics


def zeroshot_classifier(encode_text: Callable[[torch.Tensor], torch.Tensor], tokenizer: Tokenizer,
                        classnames: Sequence[str], templates: Sequence[str]) -> torch.Tensor:
    """One unit vector per class: the normalised mean of its prompts' embeddings -> (C, D)."""
    texts = [t.format(c) for c in classnames for t in templates]
    emb = encode_sharded(encode_text, tokenizer(texts), 1024)  # (C*T, D)
    emb = emb.view(len(classnames), len(templates), -1).mean(dim=1)  # (C, D)
    return torch.nn.functional.normalize(emb, dim=-1)


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, ks: Sequence[int]) -> dict[str, float]:
    """logits (N, C), labels (N,) -> {"top1": .., "top5": ..}."""
    top = logits.topk(max(ks), dim=-1).indices  # (N, kmax)
    hit = top == labels.to(top.device)[:, None]  # (N, kmax); the labels were loaded on the host
    return {f"top{k}": hit[:, :k].any(dim=-1).float().mean().item() for k in ks}


def retrieval_recall(sim: torch.Tensor, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """sim (N, N) image x text, pair i <-> i -> recall@k in both directions."""
    target = torch.arange(sim.shape[0], device=sim.device)
    out = {}
    for direction, s in (("image_to_text", sim), ("text_to_image", sim.T)):
        # rank of the true match: how many candidates score strictly higher
        rank = (s > s[target, target][:, None]).sum(dim=-1)  # (N,)
        for k in ks:
            out[f"{direction}_r{k}"] = (rank < k).float().mean().item()
    return out


def main(argv: Optional[list[str]] = None) -> None:
    from pretrain.export import load_exported  # late: keeps the training import path light

    p = argparse.ArgumentParser(prog="python -m pretrain.evaluate", description="Evaluate an exported model.")
    p.add_argument("export_dir", help="folder written by `python -m pretrain.export`")
    p.add_argument("--fashion-mnist", default=None, help="Fashion-MNIST root (default: the training config's)")
    p.add_argument("--retrieval", default=None, help="held-out split manifest for tuxpaint retrieval (default: the training config's)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--out", default=None, help="also write the metrics to this JSON file")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    exported = load_exported(args.export_dir)
    cfg = exported.config.eval
    cfg.batch_size = args.batch_size
    if args.fashion_mnist:
        cfg.zeroshot = [ZeroShotSet(root=args.fashion_mnist)]
    if args.retrieval:
        cfg.retrieval = [RetrievalSet(data=args.retrieval)]
    for s in cfg.zeroshot:
        s.limit = None
    evaluator = Evaluator(cfg, exported.tokenizer, exported.transform)
    metrics = evaluator.run(exported.model, torch.device("cpu"), torch.float32)
    for k, v in sorted(metrics.items()):
        print(f"{k:55s} {v:.4f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(metrics, f, indent=1)


if __name__ == "__main__":
    main()
