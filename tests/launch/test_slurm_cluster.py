"""The test Slurm cluster itself: it starts, runs a 2-task job, requeues a running job, cancels it."""
from __future__ import annotations

import time
from pathlib import Path

from tests.launch.slurm_cluster import FINISHED, SlurmCluster


def wait_for_lines(path: Path, count: int, timeout: float = 30.0) -> list[str]:
    """The file's lines once it has at least ``count`` (job output appears after the state changes)."""
    deadline = time.monotonic() + timeout
    while True:
        lines = path.read_text().splitlines() if path.exists() else []
        if len(lines) >= count or time.monotonic() > deadline:
            return lines
        time.sleep(0.1)


def test_slurm_cluster_starts_with_an_idle_node(slurm_cluster: SlurmCluster) -> None:
    assert slurm_cluster.node_state() in {"idle", "mixed", "allocated"}
    partitions = slurm_cluster.run(["sinfo", "-h", "-o", "%P %a"]).stdout.split()
    assert partitions == [f"{slurm_cluster.partition}*", "up"]
    config = slurm_cluster.run(["scontrol", "show", "config"]).stdout
    assert "JobRequeue              = 1" in config


def test_slurm_two_task_job_runs_both_tasks(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    out = tmp_path / "two.out"
    job = slurm_cluster.sbatch("-n", "2", "-o", str(out), "--wrap", "srun hostname")
    info = slurm_cluster.wait_job(job, FINISHED)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", info
    assert wait_for_lines(out, 2) == [slurm_cluster.hostname] * 2


def test_slurm_running_job_is_requeued_then_cancelled(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    out = tmp_path / "requeue.out"
    # Append mode: the second run adds to the first run's output instead of truncating it.
    job = slurm_cluster.sbatch("-n", "1", "--requeue", "--open-mode=append", "-o", str(out),
                               "--wrap", "echo start ${SLURM_RESTART_COUNT:-0}; sleep 600")
    slurm_cluster.wait_job(job, {"RUNNING"})
    assert wait_for_lines(out, 1) == ["start 0"]

    slurm_cluster.run(["scontrol", "requeue", str(job)])
    info = slurm_cluster.wait_job(job, {"RUNNING"}, timeout=45)
    assert info["Restarts"] == "1", info
    starts = [line for line in wait_for_lines(out, 3) if line.startswith("start")]
    assert starts == ["start 0", "start 1"]

    slurm_cluster.run(["scancel", str(job)])
    assert slurm_cluster.wait_job(job, FINISHED)["JobState"] == "CANCELLED"
