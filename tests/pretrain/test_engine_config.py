"""The DeepSpeed settings people tune at scale pass through typed config into DeepSpeed's own parser;
impossible combinations are one clear line before any rank starts."""
from __future__ import annotations

import pytest
from deepspeed.runtime.config import DeepSpeedConfig

from launch.config import compose_train_config
from pretrain.config import ConfigError
from pretrain.engine import ds_config


def test_defaults_leave_deepspeed_its_own_defaults() -> None:
    assert ds_config(compose_train_config([]))["zero_optimization"] == {"stage": 2}


def test_every_zero_setting_reaches_deepspeed() -> None:
    cfg = compose_train_config([
        "deepspeed=zero3", "engine.overlap_comm=true", "engine.contiguous_gradients=false",
        "engine.reduce_bucket_size=123456", "engine.allgather_bucket_size=654321",
        "engine.offload_optimizer=cpu", "engine.offload_param=nvme", "engine.nvme_path=/local_nvme/ds",
    ])
    zero = DeepSpeedConfig(ds_config(cfg)).zero_config  # DeepSpeed's parser: rejects unknown keys
    assert zero.stage == 3 and zero.overlap_comm is True and zero.contiguous_gradients is False
    assert zero.reduce_bucket_size == 123456 and zero.allgather_bucket_size == 654321
    assert zero.offload_optimizer.device == "cpu" and zero.offload_optimizer.pin_memory
    assert zero.offload_param.device == "nvme" and str(zero.offload_param.nvme_path) == "/local_nvme/ds"


@pytest.mark.parametrize("overrides,expected", [
    (["engine.reduce_bucket_size=0"], ["engine.reduce_bucket_size=0", ">= 1"]),
    (["deepspeed=zero0", "engine.offload_optimizer=cpu"], ["engine.offload_optimizer=cpu", "zero_stage >= 1"]),
    (["engine.offload_param=cpu"], ["engine.offload_param=cpu", "zero_stage=3"]),
    (["engine.offload_optimizer=nvme"], ["nvme", "engine.nvme_path"]),
    (["engine.offload_optimizer=cpu", "optim.name=lamb"], ["offload_optimizer=cpu", "optim.name=adamw"]),
    (["engine.offload_optimizer=gpu"], ["engine.offload_optimizer", "gpu"]),
    (["checkpoint.every_minutes=0"], ["checkpoint.every_minutes=0", "> 0"]),
])
def test_impossible_settings_are_one_clear_line(overrides: list[str], expected: list[str]) -> None:
    with pytest.raises(ConfigError) as e:
        compose_train_config(overrides)
    message = str(e.value)
    assert "\n" not in message.strip()
    for fragment in expected:
        assert fragment in message, message
