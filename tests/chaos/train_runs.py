"""What the chaos tests share: a small real 2-rank torchrun run of tiny_test on the session dataset."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

from launch.local import rank_env, torchrun_command
from pretrain.data.uid_log import read_uid_log, uid_log_path

RANKS = 2


def overrides(run_dir: Path, data: Path, *extra: str, batch_size: int = 13) -> list[str]:
    return [f"run_dir={run_dir}", f"data.root={data}", "size=tiny_test", f"data.batch_size={batch_size}", "log_every=1",
            "optim.warmup_steps=1", "eval.zeroshot.0.limit=100", "wandb.mode=offline", *extra]


def train(run_dir: Path, data: Path, *extra: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """One run to its end (a failure is returned, not raised: some tests expect one)."""
    cmd = torchrun_command(RANKS, overrides(run_dir, data, *extra))
    return subprocess.run(cmd, env=rank_env(RANKS), capture_output=True, text=True, timeout=timeout)


def metric_rows(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def uid_rows(run_dir: Path, rank: int) -> list[dict[str, Any]]:
    return read_uid_log(uid_log_path(run_dir, rank))
