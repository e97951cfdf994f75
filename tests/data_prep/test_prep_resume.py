"""Resumable and distributed builds: killed at several points, or split over two workers, the final
shards, manifests and decisions are byte-identical to one uninterrupted run."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from data_prep.build import build_from_overrides
from tests.data_prep.fingerprint import BASE, fingerprint
from tests.data_prep.kill import done_units, kill_when, start


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[str, object]:
    out = tmp_path_factory.mktemp("uninterrupted") / "data"
    build_from_overrides([f"out_dir={out}", *BASE, "workers.processes=1"])
    return fingerprint(out)


def test_killed_at_several_points_resumes_to_identical_output(reference, tmp_path):
    out = tmp_path / "data"
    points = [
        ("while planning/early units", lambda: (out / ".work" / "plan.json").exists()),
        ("after 3 units", lambda: done_units(out) >= 3),
        ("after 8 units", lambda: done_units(out) >= 8),
        ("during the merge", lambda: (out / "train").exists()),
    ]
    killed = []
    for name, ready in points:
        proc = start(out, "workers.processes=1")
        if kill_when(proc, ready):
            killed.append(name)
            assert not (out / "report.md").exists(), f"killed {name} but the build had already finished"
    assert len(killed) >= 3, f"only killed at {killed}: the build ran faster than the test could interrupt it"
    proc = start(out, "workers.processes=1")
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert fingerprint(out) == reference


def test_two_workers_then_merge_equal_one_process(reference, tmp_path):
    """Two machines' worth of workers (as a Slurm array would run them), each on its share of the
    units with 2 local processes; worker 0 waits for worker 1's units and merges."""
    out = tmp_path / "data"
    procs = [start(out, f"workers.rank={r}", "workers.world=2", "workers.processes=2") for r in (1, 0)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    assert fingerprint(out) == reference
    plan = json.loads((out / ".work" / "plan.json").read_text())
    assert len(plan["units"]) >= 12 and len({u["source"] for u in plan["units"]}) == 2


@pytest.mark.parametrize("env, expected", [
    ({}, (0, 1)),
    ({"RANK": "3", "WORLD_SIZE": "4"}, (3, 4)),  # torchrun
    ({"SLURM_ARRAY_TASK_ID": "12", "SLURM_ARRAY_TASK_MIN": "10", "SLURM_ARRAY_TASK_COUNT": "3"}, (2, 3)),  # --array=10-12
])
def test_worker_share_comes_from_torchrun_or_slurm_array(monkeypatch, env, expected):
    from data_prep.build import worker_rank
    from data_prep.config import load_config

    for k in ("RANK", "WORLD_SIZE", "SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_MIN", "SLURM_ARRAY_TASK_COUNT"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert worker_rank(load_config([])) == expected
    assert worker_rank(load_config(["workers.rank=1", "workers.world=2"])) == (1, 2)  # the config wins


def test_plan_process_merge_phases_equal_one_build(reference, tmp_path):
    """The job-array flow: ``plan`` once, ``process`` per task (here two, in turn), then ``merge``."""
    out = tmp_path / "data"
    common = [f"out_dir={out}", *BASE, "workers.processes=1"]
    steps = [["plan"], ["process", "workers.rank=1", "workers.world=2"], ["merge"],
             ["process", "workers.rank=0", "workers.world=2"], ["merge"]]
    results = []
    for phase, *extra in steps:
        results.append(subprocess.run([sys.executable, "-m", "data_prep", phase, *common, *extra],
                                      capture_output=True, text=True, timeout=300,
                                      env={**os.environ, "TQDM_DISABLE": "1"}))
        if len(results) == 3:  # the early merge is refused and writes nothing
            assert not (out / "train").exists() and not (out / "decisions.parquet").exists()
    assert [r.returncode for r in results] == [0, 0, 2, 0, 0], [r.stderr for r in results]
    assert "units are not done" in results[2].stderr and "run the remaining workers" in results[2].stderr
    assert fingerprint(out) == reference
