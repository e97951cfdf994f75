"""Running ``python -m data_prep build`` as a child process and SIGKILLing it at chosen moments
(the resume tests and the chaos suite's random kills share these)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

from tests.data_prep.fingerprint import BASE

POLL_S = 0.01


def start(out: Path, *extra: str) -> subprocess.Popen:
    """A build of the BASE dataset into ``out``, in its own process group (its workers included)."""
    cmd = [sys.executable, "-m", "data_prep", "build", f"out_dir={out}", *BASE, *extra]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "TQDM_DISABLE": "1"}, start_new_session=True)


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the build and every process it started (a crash, an OOM kill, a node lost)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:  # already gone, group included
        pass
    proc.wait()


def kill_when(proc: subprocess.Popen, ready: Callable[[], bool], timeout: float = 120) -> bool:
    """SIGKILL ``proc``'s process group as soon as ``ready()``; False if the build ended first."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            return False
        if ready():
            kill_group(proc)
            return True
        time.sleep(POLL_S)
    kill_group(proc)
    raise AssertionError("build neither finished nor reached the kill point in time")


def done_units(out: Path) -> int:
    return len(list((out / ".work" / "units").glob("*/DONE")))
