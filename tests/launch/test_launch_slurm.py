"""``python -m launch launcher=slurm`` against a real single-node Slurm cluster (``slurm_cluster`` fixture):
submit the demo training as 2 CPU ranks on 1 node, follow it with status/logs, wait for its checkpoint."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from pretrain.checkpoint import complete_checkpoints

REPO = Path(__file__).resolve().parents[2]


def launch(cluster, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**cluster.env, "PYTHONPATH": str(REPO), "WANDB_API_KEY": "wandb-secret-0123456789", "WANDB_MODE": "offline"}
    return subprocess.run([sys.executable, "-m", "launch", *args], cwd=cwd, capture_output=True, text=True, timeout=120, env=env)


def test_slurm_submit_demo_training(slurm_cluster, small_build, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    proc = launch(slurm_cluster, "launcher=slurm", "experiment=demo", f"launcher.partition={slurm_cluster.partition}",
                  "launcher.gpus_per_node=0", "launcher.procs_per_node=2", "launcher.time=00:15:00",
                  f"data.root={small_build.out_dir}", f"run_dir={run_dir}", "size=tiny_test", "steps=4",
                  "optim.warmup_steps=1", "data.batch_size=16", "checkpoint.every=2", "eval.zeroshot.0.limit=200",
                  "wandb.mode=offline", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    job_id = proc.stdout.strip()
    assert job_id.isdigit() and (run_dir / "slurm" / "job_id").read_text() == job_id + "\n"
    assert "wandb-secret" not in (run_dir / "slurm" / "job.sbatch").read_text()

    status = launch(slurm_cluster, "status", str(run_dir), cwd=tmp_path)
    assert status.returncode == 0 and f"job {job_id}: " in status.stdout, status.stderr
    final = slurm_cluster.wait_job(int(job_id), {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"}, timeout=480)
    log = launch(slurm_cluster, "logs", str(run_dir), cwd=tmp_path).stdout
    assert final["JobState"] == "COMPLETED", log[-4000:] + slurm_cluster.log_tails()
    assert f"job {job_id} (restart 0)" in log and "rendezvous" in log

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 4
    assert complete_checkpoints(run_dir / "checkpoints"), "the final checkpoint is written"
    deadline = time.monotonic() + 30  # Slurm may report the job finished a moment after the files land
    while "run: finished" not in (out := launch(slurm_cluster, "status", str(run_dir), cwd=tmp_path).stdout):
        assert time.monotonic() < deadline, out
        time.sleep(1)
    assert "nothing to cancel" in launch(slurm_cluster, "cancel", str(run_dir), cwd=tmp_path).stdout
