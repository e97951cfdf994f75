"""Triton kernels on CPU: run a test file's kernel cases in a child process under the interpreter.

Triton 3.8 reads ``TRITON_INTERPRET`` whenever ``triton.jit`` runs, and that includes Triton's own
library (``tl.zeros``, ``tl.sum``, ...) at ``import triton``: the mode is fixed for the whole
process by the first import, and compiled and interpreted kernels cannot share a process. Setting
the variable inside the suite's process would be too late (and would leak into every kernel
imported after it). So a kernel test file marks its CPU cases ``interpreted`` (they run only in
a process that interprets) and has one test that calls :func:`run_interpreted` to run the file
again in a child pytest with ``TRITON_INTERPRET=1``. ``TRITON_INTERPRET=1 pytest FILE`` runs
the cases directly.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pretrain.kernels.common import INTERPRETED

interpreted = pytest.mark.skipif(not INTERPRETED, reason="kernel case on CPU: runs in the TRITON_INTERPRET=1 child process")
compiled = pytest.mark.skipif(INTERPRETED, reason="needs compiled kernels (this process interprets)")
ROOT = Path(__file__).resolve().parents[2]


def run_interpreted(test_file: str, timeout: int = 600) -> None:
    """Run the ``interpreted`` tests of ``test_file`` in a child pytest under the interpreter;
    fails if any of them fails or is skipped there."""
    if INTERPRETED:
        pytest.skip("this process interprets: the kernel cases ran in it")
    child = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not gpu", str(Path(test_file).resolve())],
        cwd=ROOT, env={**os.environ, "TRITON_INTERPRET": "1"}, capture_output=True, text=True, timeout=timeout,
    )
    assert child.returncode == 0, child.stdout[-6000:] + child.stderr[-2000:]
    summary = child.stdout.strip().splitlines()[-1]  # e.g. "19 passed, 3 skipped in 9.9s"
    assert " passed" in summary, child.stdout[-3000:]
