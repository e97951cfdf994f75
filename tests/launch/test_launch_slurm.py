"""``python -m launch launcher=slurm`` against a real single-node Slurm cluster (``slurm_cluster`` fixture):
submit the demo training as 2 CPU ranks on 1 node, follow it with status/logs, wait for its checkpoint."""
from __future__ import annotations

import json
import re
import time
from pathlib import Path

from pretrain.checkpoint import complete_checkpoints, step_of
from tests.launch.slurm_cluster import launch

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


# ---- preemption: a requeued job resumes from its checkpoint (pretrain/preemption.py) ----

PREEMPT_STEPS = 40
FINISHED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"}


def submit_training(cluster, small_build, tmp_path: Path) -> tuple[Path, int]:
    """A 2-rank CPU training long enough to be interrupted; returns (run_dir, job id)."""
    run_dir = tmp_path / "run"
    proc = launch(cluster, "launcher=slurm", "experiment=demo", f"launcher.partition={cluster.partition}",
                  "launcher.gpus_per_node=0", "launcher.procs_per_node=2", "launcher.time=00:15:00",
                  f"data.root={small_build.out_dir}", f"run_dir={run_dir}", "size=tiny_test", f"steps={PREEMPT_STEPS}",
                  "optim.warmup_steps=1", "data.batch_size=16", "log_every=1", "checkpoint.every=5", "checkpoint.keep=10",
                  "eval.every=0", "eval.zeroshot.0.limit=200", "wandb.mode=offline", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    return run_dir, int(proc.stdout.strip())


def wait_mid_training(cluster, run_dir: Path, job_id: int) -> int:
    """Wait until the first periodic checkpoint exists (the job is mid-training); its step."""
    deadline = time.monotonic() + 180
    while not (found := complete_checkpoints(run_dir / "checkpoints")):
        state = cluster.job(job_id)["JobState"]
        job_log = "".join(p.read_text(errors="replace")[-4000:] for p in (run_dir / "slurm").glob("*.out"))
        assert state in {"PENDING", "RUNNING", "CONFIGURING"} and time.monotonic() < deadline, state + job_log + cluster.log_tails()
        time.sleep(0.2)
    return step_of(found[-1])


def logged_steps(run_dir: Path) -> list[int]:
    """Every step that logged a training loss, in file order (a step trained twice shows twice)."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in rows if "train/loss" in r]


def check_resumed(cluster, run_dir: Path, job_id: int) -> tuple[str, int]:
    """The job finished after one restart, resumed from a checkpoint, wrote the full step count and
    kept one W&B run. Returns (the job's log, the step it resumed from)."""
    final = cluster.wait_job(job_id, FINISHED, timeout=300)
    log = (run_dir / "slurm" / f"{job_id}.out").read_text(errors="replace")
    assert final["JobState"] == "COMPLETED", log[-5000:] + cluster.log_tails()
    assert int(final["Restarts"]) == 1 and f"job {job_id} (restart 1)" in log, log[-5000:]
    resumed = re.search(r"resumed from \S+ at step (\d+)", log)
    assert resumed, log[-5000:]
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == PREEMPT_STEPS
    # W&B (offline): one run directory per attempt, both with the run id from the checkpoint.
    runs = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and len({r.name.rsplit("-", 1)[-1] for r in runs}) == 1, runs
    return log, int(resumed.group(1))


def test_slurm_requeue_mid_training_resumes_from_checkpoint(slurm_cluster, small_build, tmp_path: Path) -> None:
    """``scontrol requeue`` of a running job: Slurm SIGTERMs it (the ranks checkpoint if they can
    within KillWait) and starts it again; it resumes from its newest checkpoint and finishes."""
    run_dir, job_id = submit_training(slurm_cluster, small_build, tmp_path)
    before = wait_mid_training(slurm_cluster, run_dir, job_id)
    slurm_cluster.run(["scontrol", "requeue", str(job_id)])
    log, resumed = check_resumed(slurm_cluster, run_dir, job_id)
    assert resumed >= before
    steps = logged_steps(run_dir)
    # First attempt: 1..k, k >= the checkpoint (k == it when the ranks saved on Slurm's SIGTERM within
    # KillWait); then the resumed attempt re-runs from the checkpoint to the end.
    restart = next((i for i in range(1, len(steps)) if steps[i] <= steps[i - 1]), resumed)
    first = steps[:restart]
    assert first == list(range(1, len(first) + 1)) and len(first) >= resumed, steps
    assert steps[len(first):] == list(range(resumed + 1, PREEMPT_STEPS + 1)), steps


def test_slurm_time_limit_signal_checkpoints_and_requeues(slurm_cluster, small_build, tmp_path: Path) -> None:
    """The time-limit warning as Slurm sends it (USR1 to the batch shell, like ``--signal=B:USR1``):
    the script's trap passes it to srun, the ranks checkpoint at the step they are at, rank 0
    requeues the job, and the restart resumes there: every step trained exactly once."""
    run_dir, job_id = submit_training(slurm_cluster, small_build, tmp_path)
    wait_mid_training(slurm_cluster, run_dir, job_id)
    slurm_cluster.run(["scancel", "--signal=USR1", "--batch", str(job_id)])
    log, resumed = check_resumed(slurm_cluster, run_dir, job_id)
    assert "USR1: time limit near" in log and "preemption: SIGUSR1 at step" in log, log[-5000:]
    assert f"requeued Slurm job {job_id}" in log, log[-5000:]
    assert resumed % 5 != 0 or f"step_{resumed:08d}" in log  # the signal's step, saved on the signal
    assert logged_steps(run_dir) == list(range(1, PREEMPT_STEPS + 1)), "no step lost or trained twice"
