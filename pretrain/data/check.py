"""Fail fast, before any rank starts, when the configured data or tokenizer is not usable."""
from __future__ import annotations

from pathlib import Path

from data_prep.manifest import ManifestError, load_manifest
from pretrain.config import ConfigError, TrainConfig


def check_inputs(cfg: TrainConfig) -> None:
    """Raise ConfigError naming the field and the path when an input is missing or empty."""
    try:
        load_manifest(cfg.data.train)
        for spec in cfg.eval.retrieval:
            load_manifest(spec.data)
    except ManifestError as e:
        raise ConfigError(f"{e} (data.root={cfg.data.root})") from e
    if not Path(cfg.data.tokenizer).is_file():
        raise ConfigError(f"data.tokenizer={cfg.data.tokenizer}: no such file (`python -m data_prep build` trains it)")
    for spec in cfg.eval.zeroshot:
        if not Path(spec.root).is_dir():
            raise ConfigError(f"eval.zeroshot {spec.name}: no such folder {spec.root} (apt-get install dataset-fashion-mnist)")
