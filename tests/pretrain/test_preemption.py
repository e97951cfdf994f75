"""Signals stop training safely: ``kill -USR1`` of one rank of a local 2-rank torchrun run, or
SIGTERM to every process of both ranks (loader workers included, as Slurm sends it), makes both
ranks checkpoint at the current step and exit 0; a rerun resumes there and finishes with every
step trained exactly once."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
import torch

from torch.utils.data import DataLoader, IterableDataset

from launch.local import rank_env, torchrun_command
from pretrain.checkpoint import complete_checkpoints, step_of
from pretrain.preemption import Preemption, shield_worker

STEPS = 40


def overrides(run_dir: Path, data: Path) -> list[str]:
    return [f"run_dir={run_dir}", f"data.root={data}", "size=tiny_test", f"steps={STEPS}", "data.batch_size=16",
            "log_every=1", "optim.warmup_steps=1", "eval.every=0", "eval.zeroshot.0.limit=200",
            "checkpoint.every=5", "checkpoint.keep=10", "wandb.mode=offline"]


def logged_steps(run_dir: Path) -> list[int]:
    """Every step that logged a training loss, in file order (a repeated step shows twice)."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in rows if "train/loss" in r]


def rank_pids(torchrun: subprocess.Popen) -> dict[int, int]:
    """RANK -> pid of torchrun's worker processes (its direct children; each leads its own session,
    which holds its loader workers)."""
    found = {}
    for child in psutil.Process(torchrun.pid).children():
        try:
            env = child.environ()
        except (psutil.AccessDenied, psutil.NoSuchProcess):
            continue
        if "RANK" in env and "pretrain.train" in " ".join(child.cmdline()):
            found[int(env["RANK"])] = child.pid
    return found


def signal_like_slurm(pids: dict[int, int], sig: signal.Signals) -> None:
    """``sig`` to every process of every rank, as slurmstepd does: each rank's process group."""
    for pid in pids.values():
        assert os.getpgid(pid) == pid, "torchrun starts each rank in its own session"
        group = [c for c in psutil.Process(pid).children(recursive=True) if os.getpgid(c.pid) == pid]
        assert any("pt_data_worker" in c.name() or "pretrain.train" in " ".join(c.cmdline()) for c in group), \
            "the group holds the rank's loader workers"
    for pid in pids.values():
        os.killpg(pid, sig)


@pytest.mark.parametrize("how", ["usr1_one_rank", "term_every_process"])
def test_signal_checkpoints_at_the_step_and_a_rerun_resumes(small_build, tmp_path: Path, how: str) -> None:
    run_dir = tmp_path / "run"
    cmd = torchrun_command(2, overrides(run_dir, small_build.out_dir))
    log = tmp_path / "out.log"  # a file, not a pipe: nobody reads a pipe while this test waits
    with open(log, "w") as sink, subprocess.Popen(cmd, env=rank_env(2), stdout=sink, stderr=subprocess.STDOUT) as proc:
        deadline = time.monotonic() + 240
        while not complete_checkpoints(run_dir / "checkpoints"):  # mid-training, past the first periodic save
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-4000:]
            time.sleep(0.2)
        pids = rank_pids(proc)
        assert set(pids) == {0, 1}, pids
        if how == "usr1_one_rank":
            os.kill(pids[1], signal.SIGUSR1)  # one rank only: the all_reduce stops both at the same step
        else:
            # Workers ignore it (pretrain.preemption.shield_worker); before that they died and the
            # rank failed on its next batch instead of checkpointing.
            signal_like_slurm(pids, signal.SIGTERM)
        proc.wait(timeout=240)
    out = log.read_text()
    assert proc.returncode == 0, out[-5000:]
    if how == "usr1_one_rank":
        assert "rank1] preemption: SIGUSR1 at step" in out, out[-5000:]
        assert "rank0] preemption: a signal on another rank at step" in out, out[-5000:]
    else:
        assert "preemption: SIGTERM at step" in out and "DataLoader worker" not in out, out[-5000:]
        assert "rank0] preemption:" in out and "rank1] preemption:" in out, out[-5000:]
    stopped = step_of(complete_checkpoints(run_dir / "checkpoints")[-1])
    assert 5 <= stopped < STEPS and not (run_dir / "summary.json").exists()
    assert logged_steps(run_dir) == list(range(1, stopped + 1)), "the checkpoint is the step the signal stopped at"

    rerun = subprocess.run(cmd, env=rank_env(2), capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-5000:]
    assert f"resumed from {run_dir / 'checkpoints' / f'step_{stopped:08d}'} at step {stopped}" in rerun.stderr
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == STEPS
    assert logged_steps(run_dir) == list(range(1, STEPS + 1)), "no step lost or trained twice"


def test_flag_is_agreed_and_a_stop_outranks_a_requeue_warning() -> None:
    """Single process: the handler only records the signal; SIGTERM (someone else ends the job)
    wins over USR1 (requeue), so a cancelled job is never requeued by the trainer."""
    pre = Preemption(torch.device("cpu"))
    pre.install()
    try:
        assert not pre.stop_requested()
        os.kill(os.getpid(), signal.SIGUSR1)
        assert pre.stop_requested() and pre.requeue
        os.kill(os.getpid(), signal.SIGTERM)
        assert pre.stop_requested() and not pre.requeue
        assert pre.received == signal.SIGTERM
    finally:
        pre.uninstall()
    assert signal.getsignal(signal.SIGTERM) is not pre._handle


@pytest.mark.parametrize("sig", [signal.SIGUSR1])
def test_handler_replaces_an_inherited_ignore(sig: signal.Signals) -> None:
    """The Slurm script starts torchrun (and so the ranks) with USR1 ignored: installing must
    replace that, or the time-limit warning would never reach the trainer."""
    previous = signal.signal(sig, signal.SIG_IGN)
    try:
        pre = Preemption(torch.device("cpu"))
        pre.install()
        os.kill(os.getpid(), sig)
        assert pre.received == sig
        pre.uninstall()
        assert signal.getsignal(sig) == signal.SIG_IGN
    finally:
        signal.signal(sig, previous)


class SignalsItself(IterableDataset):
    """A loader worker that sends itself what Slurm sends every process, then yields its pid."""

    def __iter__(self):
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            os.kill(os.getpid(), sig)
        yield os.getpid()


def test_loader_workers_ignore_the_stop_and_requeue_signals() -> None:
    """PyTorch's worker handler lets a SIGTERM from anyone but the parent kill the worker, and
    USR1's default action kills; the shield (the trainer's worker_init_fn) makes both harmless."""
    loader = DataLoader(SignalsItself(), batch_size=None, num_workers=1, worker_init_fn=shield_worker)
    (worker,) = list(loader)
    assert worker != os.getpid()
