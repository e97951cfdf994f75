"""A NaN loss in a real 2-rank run (``debug.nan_at_steps``: rank 0 only, so the ranks must agree):
a skipped step leaves weights and optimizer exactly as they were and is counted; too many in a row,
or ``nonfinite.action=stop``, end the run with a clear error and the last checkpoint untouched."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch

from launch.config import compose_train_config
from pretrain.checkpoint import complete_checkpoints, step_of
from pretrain.config import ConfigError
from pretrain.engine import consolidated_state_dict
from tests.chaos.train_runs import RANKS, metric_rows, train, uid_rows


def same(a: Any, b: Any) -> bool:
    """Deep equality of checkpoint contents: tensors bit for bit (DeepSpeed's loss scaler objects by their fields)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if hasattr(a, "__dict__"):
        return type(a) is type(b) and same(vars(a), vars(b))
    return a == b


def checkpoint(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step_{step:08d}"


def weights(run_dir: Path, step: int) -> dict[str, torch.Tensor]:
    return consolidated_state_dict(checkpoint(run_dir, step))


def optimizer_files(run_dir: Path, step: int) -> dict[str, Any]:
    files = sorted(checkpoint(run_dir, step).glob("*optim_states.pt"))
    return {f.name: torch.load(f, map_location="cpu", weights_only=False) for f in files}


def test_skipped_steps_leave_no_trace_are_counted_and_a_streak_stops_the_run(small_build, tmp_path: Path) -> None:
    """NaN at steps 3, 6 and 7 with max_consecutive=2: 3 and 6 are skipped, 7 makes two in a row and
    stops. ZeRO-3, bf16 and grad_accum=2 (the NaN is in the first micro-batch): the hardest setup."""
    run = tmp_path / "run"
    proc = train(run, small_build.out_dir, "steps=8", "checkpoint.every=1", "checkpoint.keep=20", "data.log_uids=true",
                 "debug.nan_at_steps=[3,6,7]", "nonfinite.max_consecutive=2",
                 "deepspeed=zero3", "engine.precision=bf16", "engine.grad_accum=2")
    out = proc.stdout[-3000:] + proc.stderr[-6000:]
    assert proc.returncode != 0, out
    assert "non-finite loss on rank(s) 0 at step 3: update skipped" in proc.stderr, out
    assert "non-finite loss on rank(s) 0 at step 6: update skipped" in proc.stderr, out
    for rank in range(RANKS):
        assert (f"rank {rank}: training stopped: non-finite loss on rank(s) 0 at step 7: 2 non-finite steps in a row "
                "(nonfinite.max_consecutive=2), the run has diverged; the last checkpoint (step 6) is untouched") in proc.stderr, out
    assert "exitcode  : 3" in proc.stderr, out  # the ranks' own exit code, not a crash
    assert [step_of(p) for p in complete_checkpoints(run / "checkpoints")] == [1, 2, 3, 4, 5, 6], "nothing saved at the stop"
    assert not (run / "summary.json").exists()

    for skipped in (3, 6):
        assert same(weights(run, skipped - 1), weights(run, skipped)), f"step {skipped} changed the weights"
        assert same(optimizer_files(run, skipped - 1), optimizer_files(run, skipped)), f"step {skipped} changed the optimizer"
    assert not same(weights(run, 3), weights(run, 4)), "the step after a skipped one trains again"
    assert all(torch.isfinite(t).all() for t in weights(run, 6).values())

    counter = {r["step"]: r["train/nonfinite_steps"] for r in metric_rows(run) if "train/nonfinite_steps" in r}
    assert counter[2] == 0 and counter[3] == 1 and counter[5] == 1 and counter[6] == 2
    assert counter[7] == 3, "the stop logs the final count: every injected step"
    for rank in range(RANKS):
        rows = uid_rows(run, rank)
        assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6], "one row per finished step; none for the stop"
        assert [r["step"] for r in rows if r.get("skipped")] == [3, 6]
        assert all(len(r["uids"]) == 2 * 13 for r in rows), "a skipped step still consumes its micro-batches"


def test_stop_exits_with_the_reason_and_keeps_the_last_checkpoint(small_build, tmp_path: Path) -> None:
    run = tmp_path / "run"
    proc = train(run, small_build.out_dir, "steps=6", "checkpoint.every=2", "debug.nan_at_steps=[3]", "nonfinite.action=stop")
    out = proc.stdout[-3000:] + proc.stderr[-6000:]
    assert proc.returncode != 0 and "exitcode  : 3" in proc.stderr, out
    assert ("rank 0: training stopped: non-finite loss on rank(s) 0 at step 3 (nonfinite.action=stop); "
            "the last checkpoint (step 2) is untouched") in proc.stderr, out
    assert "update skipped" not in proc.stderr
    assert [step_of(p) for p in complete_checkpoints(run / "checkpoints")] == [2]
    assert all(torch.isfinite(t).all() for t in weights(run, 2).values())
    last = [r for r in metric_rows(run) if "train/nonfinite_steps" in r][-1]
    assert last["step"] == 3 and last["train/nonfinite_steps"] == 1
    assert not any(math.isnan(r.get("train/loss", 0.0)) for r in metric_rows(run)), "no NaN step was logged as trained"


@pytest.mark.parametrize("override,expected", [
    ("nonfinite.action=ignore", ["nonfinite.action", "ignore", "skip, stop"]),
    ("nonfinite.max_consecutive=0", ["nonfinite.max_consecutive=0", ">= 1"]),
    ("debug.nan_at_steps=[0]", ["debug.nan_at_steps=[0]", ">= 1"]),
    ("launcher.max_restarts=-1", ["launcher.max_restarts=-1", "[0, 100]"]),
])
def test_bad_fault_settings_are_rejected_naming_the_field(override: str, expected: list[str]) -> None:
    """In-process (what ``python -m launch`` and the ranks run first; its one-line output is tested
    in tests/launch/test_local_launch.py)."""
    with pytest.raises(ConfigError) as e:
        compose_train_config([override])
    message = str(e.value)
    assert "\n" not in message
    for fragment in expected:
        assert fragment in message
