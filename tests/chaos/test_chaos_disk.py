"""Disk faults on real filesystems (small tmpfs mounts: root only; skipped elsewhere, failed under
CI=true). An unwritable or full run_dir / out_dir fails before any work in one line; a disk that
fills up during a checkpoint save fails the save on every rank with an error naming the checkpoint,
publishes nothing, and leaves the previous complete checkpoint intact and loadable."""
from __future__ import annotations

import contextlib
import errno
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest

from launch.local import rank_env
from pretrain.checkpoint import INCOMING, complete_checkpoints, safe_load, verify_checkpoint
from tests.chaos.test_chaos_checkpoint import RANKS, overrides, train


def cannot(reason: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI must run the disk tests: {reason}", pytrace=False)
    pytest.skip(reason)


@contextlib.contextmanager
def tmpfs(path: Path, size: str, read_only: bool = False) -> Iterator[Path]:
    """A real filesystem of ``size`` at ``path`` for the test's duration."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        cannot("mounting a small tmpfs (a real full or read-only filesystem) needs root and mount(8)")
    path.mkdir(parents=True, exist_ok=True)
    options = f"size={size}" + (",ro" if read_only else "")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True, text=True)
    if mounted.returncode != 0:
        cannot(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)  # lazy: a straggler cannot block the cleanup


def fill(folder: Path) -> None:
    """Write zeros until the filesystem is full."""
    fd = os.open(folder / "filler", os.O_WRONLY | os.O_CREAT)
    try:
        while True:
            os.write(fd, bytes(1 << 16))
    except OSError as e:
        assert e.errno == errno.ENOSPC, e
    finally:
        os.close(fd)


@pytest.mark.parametrize("fault", ["read-only", "full"])
def test_unwritable_run_dir_fails_before_any_work(fault: str, small_build, tmp_path: Path) -> None:
    with tmpfs(tmp_path / "mnt", "256k", read_only=fault == "read-only") as mnt:
        if fault == "full":
            fill(mnt)
        run_dir = mnt / "run"
        proc = subprocess.run([sys.executable, "-m", "pretrain.train", *overrides(run_dir, small_build.out_dir)],
                              env=rank_env(1), capture_output=True, text=True, timeout=120)
    why = "Read-only file system" if fault == "read-only" else "No space left on device"
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
    assert errors == [f"config error: run_dir={run_dir}: cannot write there ({why}); set run_dir to a folder you can write to"]
    assert "training" not in proc.stderr, "failed before any rank built a model"


def test_unwritable_data_prep_out_dir_fails_in_one_line(tmp_path: Path) -> None:
    """A path under a regular file (any user), then a read-only filesystem (root)."""
    (tmp_path / "a_file").write_text("")
    cases = [(tmp_path / "a_file" / "data", f"{tmp_path / 'a_file'} is a file, not a folder")]

    def build(out_dir: Path) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "data_prep", "build", f"out_dir={out_dir}"],
                              capture_output=True, text=True, timeout=120)

    for out_dir, why in cases:
        proc = build(out_dir)
        assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
            f"error: out_dir={out_dir}: cannot write there ({why}); set out_dir to a folder you can write to"], proc.stderr
    with tmpfs(tmp_path / "ro", "64k", read_only=True) as mnt:
        proc = build(mnt / "data")
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        f"error: out_dir={mnt / 'data'}: cannot write there (Read-only file system); set out_dir to a folder you can write to"]


def test_disk_full_during_a_checkpoint_save(small_build, tmp_path: Path) -> None:
    """6 MB: the run's files and its first checkpoint (~4.1 MB of tiny_test, ZeRO-2) fit, the second
    does not. Both ranks raise the same error; nothing is published; step 2 stays loadable."""
    with tmpfs(tmp_path / "disk", "6m") as disk:
        run_dir = disk / "run"
        root = run_dir / "checkpoints"
        proc = train(run_dir, small_build.out_dir, "steps=6", "checkpoint.every=2", "checkpoint.keep=2")
        assert proc.returncode != 0, "the save of step 4 cannot fit"
        error = next((line for line in proc.stderr.splitlines() if "CheckpointError: " in line), None)
        assert error is not None, proc.stderr[-5000:]
        message = error.split("CheckpointError: ", 1)[1]
        assert message.startswith(f"checkpoint {root / 'step_00000004'} could not be written: rank "), message
        assert "MB free on that filesystem" in message
        assert message.endswith(f"Nothing was published: the newest complete checkpoint is still {root / 'step_00000002'}, "
                                f"which resume=auto uses; free space or fix {root} and start again"), message
        assert proc.stderr.count(message) == RANKS, "every rank raised the same error: none hangs in a collective"
        assert "less than one checkpoint" in proc.stderr, "the save before warned that the next one would not fit"

        assert [c.name for c in complete_checkpoints(root)] == ["step_00000002"]
        assert not any((root / INCOMING).iterdir()), "the failed save's partial files were removed (space freed)"
        good = root / "step_00000002"
        assert verify_checkpoint(good) is None
        from pretrain.engine import consolidated_state_dict

        assert consolidated_state_dict(good), "the previous checkpoint still exports (all its DeepSpeed files load)"
        for rank in range(RANKS):
            assert set(safe_load(good / f"rank_{rank:05d}.pt")) == {"data", "rng"}
