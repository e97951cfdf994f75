"""Stop safely when the job is about to end: checkpoint at the current step, then requeue (Slurm).

Which signal means what:

- ``SIGUSR1``: the time-limit warning (``#SBATCH --signal=B:USR1@N``: Slurm signals the batch
  shell, whose trap passes it to ``srun``, which signals every process of the step on every node).
  Also what a user sends a local run (``kill -USR1 <pid of any rank>``) to stop it resumably.
  The trainer checkpoints, and under Slurm rank 0 runs ``scontrol requeue $SLURM_JOB_ID``: the
  job goes back to the queue with the same id and resumes from that checkpoint.
- ``SIGTERM``: the job is being ended by someone else (``scontrol requeue``, preemption,
  ``scancel``, torchrun stopping its workers), with a grace period (Slurm's KillWait/GraceTime,
  torchrun's 30 s) before SIGKILL. The trainer checkpoints if it can but never requeues: whoever
  sent it already decided the job's fate (a cancelled job must stay cancelled). Repeats are only
  recorded: under Slurm each rank gets SIGTERM twice (from slurmstepd and from torchrun stopping
  its workers), and a rank that never reaches a step boundary (blocked in a collective) is ended
  by the SIGKILL that both senders always follow with.

A handler only sets a flag (it may run in the middle of a collective); the ranks act on it together
at a step boundary, after an all_reduce(MAX) of the flag, so a signal that reaches one rank (or the
ranks of one node a moment earlier) stops all of them at the same step.

Ranks started by the Slurm script inherit "ignore USR1" from the torchrun guard;
``signal.signal`` replaces that with the handler.

Data-loader workers get both signals too (Slurm signals every process of the step; so does
``kill -TERM -<pgid>``), and PyTorch's worker handler lets a SIGTERM from anyone but the parent
kill the worker: the rank would then fail on its next batch instead of checkpointing.
:func:`shield_worker` (the loader's ``worker_init_fn``) makes workers ignore them. They still end
with their rank: the rank shuts them down when it closes its loader, and a worker exits by itself
when it sees its parent gone (PyTorch's watchdog, within ~5 s), SIGKILL included.
"""
from __future__ import annotations

import logging
import os
import signal
import subprocess
from types import FrameType
from typing import Optional

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

REQUEUE_SIGNALS = (signal.SIGUSR1,)  # checkpoint, then requeue the Slurm job
STOP_SIGNALS = (signal.SIGTERM,)  # checkpoint only: the sender decides what happens next


class Preemption:
    """The signal flag and the collective decision to stop. Install once per rank."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.received: Optional[signal.Signals] = None  # the first signal received on this rank
        self.requeue = False  # after stop_requested() said yes: whether the job should requeue
        self._previous: dict[int, object] = {}

    def install(self) -> None:
        for sig in (*REQUEUE_SIGNALS, *STOP_SIGNALS):
            self._previous[sig] = signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        self._previous.clear()

    def _handle(self, signum: int, frame: Optional[FrameType]) -> None:
        sig = signal.Signals(signum)
        if self.received is None or sig in STOP_SIGNALS:  # a stop outranks a requeue warning
            self.received = sig

    def stop_requested(self) -> bool:
        """Collective (every rank, at the same step): did any rank get a signal?

        One all_reduce of two ints: max over ranks of (any signal, a stop signal). Measured ~0.19 ms
        on 2 gloo ranks on one 2-core host (tiny_test steps take ~50 ms), and the step already
        synchronises with the host (the loss is read every step), so it runs every step: a warning
        never waits for a slower cadence."""
        local = torch.tensor([self.received is not None, self.received in STOP_SIGNALS], dtype=torch.int32, device=self.device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(local, op=dist.ReduceOp.MAX)
        any_signal, stop = (bool(v) for v in local.tolist())
        self.requeue = any_signal and not stop
        return any_signal


def shield_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: the worker ignores the stop/requeue signals its rank handles."""
    for sig in (*REQUEUE_SIGNALS, *STOP_SIGNALS):
        signal.signal(sig, signal.SIG_IGN)


def slurm_job_id() -> Optional[str]:
    return os.environ.get("SLURM_JOB_ID")


def requeue_job(job_id: str) -> bool:
    """``scontrol requeue``: the job (this one) is killed and goes back to the queue with its id.
    Called after the checkpoint and the process group's shutdown: the kill that follows hits ranks
    that have nothing left to lose."""
    try:
        proc = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        log.error("could not requeue Slurm job %s: %s; resubmit it (it resumes from the checkpoint)", job_id, e)
        return False
    if proc.returncode != 0:
        log.error("scontrol requeue %s failed (%s); resubmit the job (it resumes from the checkpoint)",
                  job_id, proc.stderr.strip() or f"exit code {proc.returncode}")
        return False
    log.info("requeued Slurm job %s: it resumes from the checkpoint when it starts again", job_id)
    return True
