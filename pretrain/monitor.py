"""Metrics out: W&B on rank 0 (offline unless a key is set) plus ``metrics.jsonl``; others no-op.

(Named ``monitor`` rather than ``logging`` so it never shadows the standard library's module.)
A resumed run passes the W&B run id saved in its checkpoint, so W&B continues the same run.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional, Protocol

from pretrain.config import WandbConfig, WandbMode


class Monitor(Protocol):
    run_id: Optional[str]

    def log(self, metrics: dict[str, float], step: int) -> None: ...

    def summary(self, metrics: dict[str, Any]) -> None: ...

    def close(self, finished: bool = True) -> None: ...


class NullMonitor:
    """What ranks other than 0 get: every call does nothing."""

    run_id: Optional[str] = None

    def log(self, metrics: dict[str, float], step: int) -> None:
        pass

    def summary(self, metrics: dict[str, Any]) -> None:
        pass

    def close(self, finished: bool = True) -> None:
        pass


def resolve_mode(mode: WandbMode) -> str:
    if mode == WandbMode.auto:
        return "online" if os.environ.get("WANDB_API_KEY") else "offline"
    return mode.value


class WandbMonitor:
    def __init__(self, cfg: WandbConfig, run_dir: Path, config: dict[str, Any], run_id: Optional[str]) -> None:
        os.environ.setdefault("WANDB_SILENT", "true")
        import wandb  # imported here: ranks > 0 never pay its start-up

        run_dir.mkdir(parents=True, exist_ok=True)
        self._run = wandb.init(
            project=cfg.project, entity=cfg.entity, name=cfg.name, dir=str(run_dir), config=config,
            mode=resolve_mode(cfg.mode), id=run_id, resume="allow",  # id None: wandb makes a new one
        )
        self.run_id: Optional[str] = self._run.id
        self._jsonl = open(run_dir / "metrics.jsonl", "a", buffering=1)  # line-buffered: tail -f works

    def log(self, metrics: dict[str, float], step: int) -> None:
        self._run.log(metrics, step=step)
        self._jsonl.write(json.dumps({"step": step, **metrics}) + "\n")

    def summary(self, metrics: dict[str, Any]) -> None:
        for k, v in metrics.items():
            self._run.summary[k] = v

    def close(self, finished: bool = True) -> None:
        self._jsonl.close()
        self._run.finish(exit_code=0 if finished else 1)  # a failed run shows as failed in W&B


def make_monitor(cfg: WandbConfig, run_dir: Path, config: dict[str, Any], run_id: Optional[str], is_main: bool) -> Monitor:
    return WandbMonitor(cfg, run_dir, config, run_id) if is_main else NullMonitor()


def read_metrics(run_dir: Path) -> dict[int, dict[str, Any]]:
    """``run_dir/metrics.jsonl`` as step -> every metric logged at that step (a step's train and
    eval rows merged; a resumed run's appended rows overwrite the ones they repeat)."""
    steps: dict[int, dict[str, Any]] = {}
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        steps.setdefault(row.pop("step"), {}).update(row)
    return steps
