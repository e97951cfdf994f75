"""Run training on this machine with torchrun: one process per GPU, or N CPU ranks over gloo.

One node (``launcher.nodes=1``): a single ``torchrun --standalone``.

Several nodes on this one machine (``launcher.nodes=N``, for testing multi-node code paths for real):
N torchrun agents, each with its own ``procs_per_node`` ranks, meet through a c10d rendezvous on
127.0.0.1 exactly as agents on N hosts would meet on the first host. Each rank sees the
``GROUP_RANK`` (node rank), ``LOCAL_RANK`` and ``LOCAL_WORLD_SIZE`` of its own agent, so per-node
code runs as it would on a cluster. Note that with c10d torchrun assigns node ranks in the order
the agents join (``--node_rank`` is only used by the static rendezvous); agents are identical, so
which one becomes node 0 does not change what any global rank computes.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from typing import IO, Optional, Union

import torch

RDZV_HOST = "127.0.0.1"
# Seconds an agent gets to stop its ranks after SIGTERM before it is killed.
_TERMINATE_GRACE = 15.0

Output = Union[None, int, IO[str], IO[bytes]]  # what subprocess accepts for stdout/stderr


def resolve_nproc(nproc: str) -> int:
    """``auto``: one rank per GPU; on CPU two ranks (data parallel over gloo) when >= 2 cores."""
    if nproc != "auto":
        return int(nproc)
    if torch.cuda.is_available():
        return torch.cuda.device_count()
    return 2 if (os.cpu_count() or 1) >= 2 else 1


def free_port() -> int:
    """A TCP port nobody listens on right now (the rendezvous store binds it moments later)."""
    with socket.socket() as s:
        s.bind((RDZV_HOST, 0))
        return s.getsockname()[1]


def torchrun_command(nproc: int, overrides: list[str], module: str = "pretrain.train", *, nodes: int = 1,
                     rdzv_endpoint: Optional[str] = None, rdzv_id: Optional[str] = None, max_restarts: int = 0) -> list[str]:
    """The torchrun command of one agent: standalone for one node, else a c10d rendezvous member.
    ``max_restarts`` (``launcher.max_restarts``): times torchrun restarts the ranks after one fails."""
    if nodes == 1:
        rdzv = ["--standalone"]
    else:
        if rdzv_endpoint is None or rdzv_id is None:
            raise ValueError("a multi-node torchrun needs rdzv_endpoint and rdzv_id")
        # No --node_rank: c10d ignores it (and warns); node ranks come from the join order.
        rdzv = [f"--nnodes={nodes}", "--rdzv_backend=c10d", f"--rdzv_endpoint={rdzv_endpoint}", f"--rdzv_id={rdzv_id}"]
    restarts = [f"--max-restarts={max_restarts}"] if max_restarts else []
    return [sys.executable, "-m", "torch.distributed.run", *rdzv, *restarts, f"--nproc_per_node={nproc}", "-m", module, *overrides]


def agent_commands(nodes: int, nproc: int, overrides: list[str], module: str = "pretrain.train", rdzv_port: int = 0,
                   rdzv_id: Optional[str] = None, max_restarts: int = 0) -> list[list[str]]:
    """One torchrun command per node of this machine: all the same, meeting on 127.0.0.1:<rdzv_port>.

    ``rdzv_port`` 0 picks a free port; ``rdzv_id`` None a fresh id, so two local runs never join
    each other's rendezvous."""
    if nodes == 1:
        return [torchrun_command(nproc, overrides, module, max_restarts=max_restarts)]
    endpoint = f"{RDZV_HOST}:{rdzv_port or free_port()}"
    rdzv_id = rdzv_id or f"local-{uuid.uuid4().hex[:12]}"
    return [torchrun_command(nproc, overrides, module, nodes=nodes, rdzv_endpoint=endpoint, rdzv_id=rdzv_id,
                             max_restarts=max_restarts) for _ in range(nodes)]


def rank_env(nproc: int) -> dict[str, str]:
    """Each CPU rank gets an equal share of the cores (torchrun would otherwise force 1 thread).

    ``nproc`` is every rank on this machine: all agents' ranks together when several run here."""
    env = dict(os.environ)
    # torchrun shares its rendezvous TCPStore with the ranks' process group by default, and keys
    # from before a restart (launcher.max_restarts) survive in it: restarted ranks may read a dead
    # peer's address and fail to connect (pytorch/pytorch#135712). One fresh store per attempt.
    env.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    if not torch.cuda.is_available():
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    return env


def _stop(agents: list[subprocess.Popen]) -> None:
    """SIGTERM the agents still running (each stops its ranks), then SIGKILL what outlives the grace."""
    running = [a for a in agents if a.poll() is None]
    for a in running:
        a.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + _TERMINATE_GRACE
    for a in running:
        try:
            a.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            # The agent's own process group holds its ranks: kill them with it, or they would keep
            # waiting in a collective for a peer that is gone.
            os.killpg(a.pid, signal.SIGKILL)
            a.wait()


def run_agents(commands: list[list[str]], env: dict[str, str], timeout: Optional[float] = None,
               stdout: Output = None, stderr: Output = None) -> int:
    """Start the agents together and wait for all: 0, or the first non-zero exit code seen.

    When one agent fails the others are stopped at once: their ranks would otherwise wait in the
    next collective (or the rendezvous) for a peer that never comes. A ``timeout`` stops them all
    and raises :class:`subprocess.TimeoutExpired`, as :func:`subprocess.run` does."""
    # Each agent leads its own process group so _stop can reach the ranks it started (and a Ctrl-C
    # reaches only this launcher, which then stops the agents in order).
    agents = [subprocess.Popen(cmd, env=env, stdout=stdout, stderr=stderr, start_new_session=True) for cmd in commands]
    deadline = None if timeout is None else time.monotonic() + timeout
    on_main = threading.current_thread() is threading.main_thread()  # only there can handlers be set
    previous = None
    if on_main:
        # A SIGTERM to the launcher (kill, a scheduler) must reach the agents too: make it an
        # exception so the finally below runs.
        previous = signal.signal(signal.SIGTERM, _raise_exit)
    try:
        while True:
            codes = [a.poll() for a in agents]
            failed = [c for c in codes if c not in (None, 0)]
            if failed:
                _stop(agents)
                return failed[0]
            if all(c == 0 for c in codes):
                return 0
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(commands[0], timeout or 0)
            time.sleep(0.2)
    finally:  # timeout, Ctrl-C, SIGTERM or an error here: no agent may outlive the launcher
        _stop(agents)
        if on_main:
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


def _raise_exit(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def run_torchrun(nproc: int, overrides: list[str], timeout: Optional[float] = None, *, nodes: int = 1, rdzv_port: int = 0,
                 module: str = "pretrain.train", stdout: Output = None, stderr: Output = None, max_restarts: int = 0) -> int:
    """Start ``nodes`` torchrun agents of ``nproc`` ranks each here, wait, and return the exit code."""
    commands = agent_commands(nodes, nproc, overrides, module, rdzv_port, max_restarts=max_restarts)
    return run_agents(commands, rank_env(nodes * nproc), timeout, stdout, stderr)
