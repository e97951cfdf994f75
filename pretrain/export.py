"""Export a checkpoint to ``model.safetensors`` + ``config.yaml`` + ``tokenizer.model``.

The export loads with :func:`load_exported` and plain PyTorch, no DeepSpeed and no process group:
for evaluation, and for CLIP-score filtering in data_prep.

    python -m pretrain.export runs/demo/train            # newest complete checkpoint of a run
    python -m pretrain.export runs/demo/train/checkpoints/step_00000300 --out runs/demo/export
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
from omegaconf import OmegaConf
from PIL import Image
from safetensors.torch import load_file, save_file

from data_prep.atomic import atomic_write
from pretrain.checkpoint import COMPLETE, complete_checkpoints
from pretrain.config import TrainConfig, to_config
from pretrain.data.tokenizer import Tokenizer
from pretrain.data.transforms import image_transform
from pretrain.models import ContrastiveModel, build_model

CONFIG_FILE = "config.yaml"
TOKENIZER_FILE = "tokenizer.model"
WEIGHTS_FILE = "model.safetensors"


def load_config(path: str | Path) -> TrainConfig:
    """A saved ``config.yaml`` -> validated TrainConfig."""
    merged = OmegaConf.merge(OmegaConf.structured(TrainConfig), OmegaConf.load(path))
    return to_config(merged)


def find_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder, or a run folder (its newest complete checkpoint)."""
    path = Path(path)
    if (path / COMPLETE).is_file():
        return path
    found = complete_checkpoints(path / "checkpoints")
    if not found:
        raise FileNotFoundError(f"{path} is neither a complete checkpoint nor a run folder with one")
    return found[-1]


def export_checkpoint(checkpoint: str | Path, out_dir: str | Path) -> Path:
    from pretrain.engine import consolidated_state_dict  # the only path that needs DeepSpeed

    ckpt, out = find_checkpoint(checkpoint), Path(out_dir)
    state = consolidated_state_dict(ckpt)
    weights = {k.removeprefix("model."): v.contiguous() for k, v in state.items() if k.startswith("model.")}
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".{WEIGHTS_FILE}.tmp"
    save_file(weights, str(tmp), metadata={"format": "pt", "checkpoint": ckpt.name})
    tmp.replace(out / WEIGHTS_FILE)
    for name in (CONFIG_FILE, TOKENIZER_FILE):
        with atomic_write(out / name) as f:
            f.write((ckpt / name).read_bytes())
    return out


@dataclass
class Exported:
    model: ContrastiveModel
    tokenizer: Tokenizer
    config: TrainConfig
    transform: Callable[[Image.Image], torch.Tensor]


def load_exported(path: str | Path) -> Exported:
    path = Path(path)
    for name in (WEIGHTS_FILE, CONFIG_FILE, TOKENIZER_FILE):
        if not (path / name).is_file():
            raise FileNotFoundError(f"{path} is not an export: {name} is missing (create one with `python -m pretrain.export`)")
    cfg = load_config(path / CONFIG_FILE)
    tokenizer = Tokenizer(path / TOKENIZER_FILE, cfg.model.text.context_length)
    model = build_model(cfg.model, eos_id=tokenizer.eos_id)
    model.load_state_dict(load_file(str(path / WEIGHTS_FILE)), strict=True)
    model.eval()
    return Exported(model, tokenizer, cfg, image_transform(cfg.model.vision.image_size))


def main(argv: Optional[list[str]] = None) -> None:
    p = argparse.ArgumentParser(prog="python -m pretrain.export", description=__doc__.splitlines()[0])
    p.add_argument("checkpoint", help="a checkpoint folder or a run folder")
    p.add_argument("--out", default=None, help="output folder (default: <run_dir>/export)")
    args = p.parse_args(argv)
    ckpt = find_checkpoint(args.checkpoint)
    out = Path(args.out) if args.out else ckpt.parent.parent / "export"
    export_checkpoint(ckpt, out)
    print(f"exported {ckpt} -> {out}")


if __name__ == "__main__":
    main()
