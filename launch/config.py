"""Compose and validate a training config exactly as ``pretrain.train`` will, before launching it."""
from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException

from data_prep.config import hydra_error_message
from pretrain.config import ConfigError, TrainConfig, to_config

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


def compose_train_config(overrides: list[str]) -> TrainConfig:
    """hydra overrides -> validated TrainConfig; raises ConfigError with one readable message."""
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
            return to_config(compose(config_name="train", overrides=list(overrides)))
    except (HydraException, OmegaConfBaseException) as e:
        raise ConfigError(hydra_error_message(e)) from e
