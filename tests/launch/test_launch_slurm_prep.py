"""``python -m launch prep launcher=slurm``: data_prep as a job array plus a merge job on the real Slurm
cluster (``slurm_cluster`` fixture). The merged dataset must equal one uninterrupted local build."""
from __future__ import annotations

from pathlib import Path

import pytest

from data_prep.build import build_from_overrides
from launch.prep import local_commands, prep, split_overrides
from pretrain.config import ConfigError
from tests.data_prep.fingerprint import BASE, fingerprint
from tests.launch.slurm_cluster import launch


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    out = tmp_path_factory.mktemp("one-process") / "data"
    build_from_overrides([f"out_dir={out}", *BASE, "workers.processes=1"])
    return fingerprint(out)


def test_slurm_prep_array_then_merge_equals_one_build(slurm_cluster, reference, tmp_path: Path) -> None:
    out = tmp_path / "data"
    proc = launch(slurm_cluster, "prep", "launcher=slurm", f"launcher.partition={slurm_cluster.partition}",
                  "launcher.nodes=2", "launcher.gpus_per_node=0", "launcher.cpus_per_task=1", "launcher.time=00:15:00",
                  f"out_dir={out}", *BASE, "workers.processes=1", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    array_id, merge_id = proc.stdout.split()
    sdir = out / "slurm"
    assert (sdir / "job_id").read_text().split() == [array_id, merge_id]
    assert "--array=0-1" in (sdir / "array.sbatch").read_text()

    final = slurm_cluster.wait_job(int(merge_id), {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"}, timeout=480)
    tasks = {p.name: p.read_text() for p in sdir.glob(f"{array_id}_*.out")}
    merge_log = launch(slurm_cluster, "logs", str(out), cwd=tmp_path).stdout
    assert final["JobState"] == "COMPLETED", f"{tasks}\n{merge_log}{slurm_cluster.log_tails()}"
    # Each task did its own share: task i of 2 processed units i, i+2, ...
    assert sorted(tasks) == [f"{array_id}_0.out", f"{array_id}_1.out"]
    for i in (0, 1):
        assert f"task {i} of 2" in tasks[f"{array_id}_{i}.out"] and f"worker {i}/2: processed" in tasks[f"{array_id}_{i}.out"]
    assert f"merge job {merge_id}" in merge_log and f"built {out}" in merge_log

    assert fingerprint(out) == reference  # the merged manifest, shards, decisions and tokenizer
    status = launch(slurm_cluster, "status", str(out), cwd=tmp_path).stdout
    assert f"job {array_id}: COMPLETED" in status and f"job {merge_id}: COMPLETED" in status and "run: finished" in status


def test_slurm_prep_failed_tasks_cancel_the_merge(slurm_cluster, tmp_path: Path) -> None:
    """Array tasks that fail (here: no usable interpreter on the node) fail the array; the merge never runs."""
    out = tmp_path / "data"
    proc = launch(slurm_cluster, "prep", "launcher=slurm", f"launcher.partition={slurm_cluster.partition}",
                  "launcher.nodes=2", "launcher.gpus_per_node=0", "launcher.cpus_per_task=1", "launcher.time=00:05:00",
                  "launcher.python=/bin/false", f"out_dir={out}", *BASE, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    array_id, merge_id = proc.stdout.split()
    info = slurm_cluster.wait_job(int(merge_id), {"CANCELLED", "COMPLETED", "FAILED"}, timeout=120)
    assert info["JobState"] == "CANCELLED", info
    assert not (out / "train").exists()
    status = launch(slurm_cluster, "status", str(out), cwd=tmp_path).stdout
    assert f"job {array_id}: FAILED" in status and f"job {merge_id}: CANCELLED" in status and "run: stopped" in status


def test_prep_overrides_split_between_launcher_and_data_prep() -> None:
    mine, rest = split_overrides(["launcher=slurm", "launcher.nodes=4", "+launcher.env.A=b", "out_dir=/d", "filters=wukong"])
    assert mine == ["launcher=slurm", "launcher.nodes=4", "+launcher.env.A=b"] and rest == ["out_dir=/d", "filters=wukong"]
    assert [c[-2:] for c in local_commands(2, ["out_dir=/d"])] == [["workers.rank=0", "workers.world=2"],
                                                                    ["workers.rank=1", "workers.world=2"]]


def test_prep_dry_run_prints_array_and_merge(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert prep(["launcher=slurm", "launcher.nodes=3", "launcher.gpus_per_node=0", f"out_dir={tmp_path / 'd'}"],
                dry_run=True, workdir=tmp_path) == 0
    text = capsys.readouterr().out
    assert "--array=0-2" in text and "workers.rank=$SLURM_ARRAY_TASK_ID workers.world=3" in text
    assert "data_prep merge" in text and f"--output={tmp_path / 'd' / 'slurm'}/%A_%a.out" in text
    assert not (tmp_path / "d").exists()  # a dry run writes nothing


@pytest.mark.parametrize("override, message", [
    ("workers.world=2", "choose the number of workers with launcher.nodes"),
    ("nosuch=1", "nosuch"),
    ("launcher.time=soon", "not a Slurm time"),
])
def test_prep_bad_config_fails_in_one_line(override: str, message: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=message):
        prep(["launcher=slurm", f"out_dir={tmp_path / 'd'}", override], dry_run=True, workdir=tmp_path)
