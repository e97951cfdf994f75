"""Fail fast, before any rank starts, when the configured data or tokenizer is not usable."""
from __future__ import annotations

from pathlib import Path

from data_prep import storage
from data_prep.manifest import ManifestError, load_manifest
from pretrain.data.tokenizer import Tokenizer
from pretrain.config import ConfigError, TrainConfig


def check_inputs(cfg: TrainConfig) -> None:
    """Raise ConfigError naming the field and the path when an input is missing or empty."""
    try:
        load_manifest(cfg.data.train)
        for spec in cfg.eval.retrieval:
            load_manifest(spec.data)
    except ManifestError as e:
        raise ConfigError(f"{e} (data.root={storage.redact(cfg.data.root)})") from e
    try:
        Tokenizer(cfg.data.tokenizer, cfg.model.text.context_length)
    except (OSError, ValueError, RuntimeError) as e:  # RuntimeError: sentencepiece's for a file that is no model
        raise ConfigError(f"data.tokenizer={storage.redact(cfg.data.tokenizer)}: {e}") from e
    for spec in cfg.eval.zeroshot:
        if not Path(spec.root).is_dir():
            raise ConfigError(f"eval.zeroshot {spec.name}: no such folder {spec.root} (apt-get install dataset-fashion-mnist)")
