"""The README's main job: build the demo dataset, train with torchrun + DeepSpeed, export, summarise."""
from __future__ import annotations

import json
import time
from pathlib import Path

from launch.config import compose_train_config
from launch.launcher_config import LauncherKind
from launch.local import run_torchrun
from pretrain.config import ConfigError

REPORTED = [
    ("eval/zeroshot/fashion_mnist/top1", "Fashion-MNIST zero-shot top-1 (chance 0.10)"),
    ("eval/zeroshot/fashion_mnist/top5", "Fashion-MNIST zero-shot top-5"),
    ("eval/retrieval/tuxpaint/image_to_text_r1", "Tux Paint image->text R@1"),
    ("eval/retrieval/tuxpaint/text_to_image_r1", "Tux Paint text->image R@1"),
    ("eval/retrieval/tuxpaint/image_to_text_r10", "Tux Paint image->text R@10"),
    ("train/samples_per_sec", "training samples/s"),
    ("steps", "optimizer steps"),
]


def ensure_dataset(data_dir: Path) -> None:
    if (data_dir / "train" / "manifest.json").exists() and (data_dir / "tokenizer.model").exists():
        print(f"reusing the dataset in {data_dir} (delete it to rebuild)")
        return
    from data_prep.build import build_from_overrides

    build_from_overrides([f"out_dir={data_dir}"])


def print_summary(summary: dict, seconds: float, run_dir: Path) -> None:
    print(f"\n{'metric':48s} value")
    print("-" * 60)
    for key, label in REPORTED:
        if key in summary:
            value = summary[key]
            print(f"{label:48s} {value:.4g}" if isinstance(value, float) else f"{label:48s} {value}")
    print("-" * 60)
    print(f"{'wall time (dataset + training + eval)':48s} {seconds / 60:.1f} min")
    print(f"run folder: {run_dir}  (summary.json, metrics.jsonl, checkpoints/, export/, wandb/)")


def run_demo(nproc: int, overrides: list[str]) -> int:
    t0 = time.time()
    overrides = ["experiment=demo", *overrides]
    if not any(o.startswith("run_dir=") for o in overrides):  # a fresh run each time, never a resume
        overrides.append(f"run_dir=runs/demo/train-{time.strftime('%Y%m%d-%H%M%S')}")
    cfg = compose_train_config(overrides)
    lc = cfg.launcher
    if lc.kind != LauncherKind.local:
        raise ConfigError("the demo runs on this machine: submit the training to Slurm with "
                          "`python -m launch launcher=slurm experiment=demo ...` (and the dataset with `python -m launch prep`)")
    cfg.check_world(lc.nodes * nproc)
    run_dir = Path(cfg.run_dir)
    print("== [1/3] dataset")
    ensure_dataset(Path(cfg.data.root))
    print(f"== [2/3] training on {lc.nodes} node(s) x {nproc} rank(s)")
    rc = run_torchrun(nproc, overrides, nodes=lc.nodes, rdzv_port=lc.rdzv_port, max_restarts=lc.max_restarts)
    if rc != 0:
        print(f"training failed (exit code {rc})")
        return rc
    print("== [3/3] export")
    from pretrain.export import export_checkpoint

    export_checkpoint(run_dir, run_dir / "export")
    summary = json.loads((run_dir / "summary.json").read_text())
    print_summary(summary, time.time() - t0, run_dir)
    return 0
