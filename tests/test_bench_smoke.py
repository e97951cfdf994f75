"""Every benchmark still runs: each ``bench/*.py`` script in its ``--smoke`` mode (tiny sizes, no
reference system installed), so a change that breaks a benchmark fails here, not months later when
someone needs its numbers. Found by listing bench/: a new script without ``--smoke`` fails too.

The smokes are mostly interpreter start-up and imports, so they run two at a time (one fixture
runs them all; each script's test then reports its own result)."""
from __future__ import annotations

import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from launch.local import rank_env

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(p.stem for p in (ROOT / "bench").glob("*.py") if 'if __name__ == "__main__"' in p.read_text())
NEEDS_DATA = {"train_throughput", "gpu_check"}  # they train: a dataset written by data_prep (--data)


def test_the_benchmarks_are_found() -> None:
    assert {"train_throughput", "prep_throughput", "gpu_check", "resume_cost"} <= set(SCRIPTS)


@pytest.fixture(scope="module")
def smokes(small_build) -> dict[str, subprocess.CompletedProcess]:
    def run(script: str) -> subprocess.CompletedProcess:
        args = [sys.executable, f"bench/{script}.py", "--smoke"]
        if script in NEEDS_DATA:
            args += ["--data", str(small_build.out_dir)]
        # Each of the two at a time gets one core's share (rank_env(2)'s threads per process).
        return subprocess.run(args, cwd=ROOT, env=rank_env(2), capture_output=True, text=True, timeout=600)

    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(zip(SCRIPTS, pool.map(run, SCRIPTS)))


@pytest.mark.parametrize("script", SCRIPTS)
def test_benchmark_smoke_runs_and_prints_its_last_line(script: str, smokes: dict[str, subprocess.CompletedProcess]) -> None:
    proc = smokes[script]
    assert proc.returncode == 0, f"{script} --smoke failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    last = proc.stdout.strip().splitlines()[-1]
    assert re.match(r"^[\w=.-]+: \S", last), f"{script}: the last line must be its 'key: value' summary, got {last!r}"
