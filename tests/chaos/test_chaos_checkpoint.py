"""Checkpoint faults on real 2-rank torchrun runs (gloo, tiny_test, the session dataset): a SIGKILL of
every process while a checkpoint is being written, and a damaged newest checkpoint. The newest
complete checkpoint is never damaged by a crash, damaged ones are found and skipped, and an
explicitly chosen damaged checkpoint is refused in one line."""
from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import psutil
import pytest
import torch

from launch.local import rank_env, torchrun_command
from pretrain.checkpoint import (COMPLETE, INCOMING, CheckpointError, complete_checkpoints, resolve_resume, safe_load, step_of,
                                 verify_checkpoint)

RANKS = 2
TIMEOUT = 300


def overrides(run_dir: Path, data: Path, *extra: str) -> list[str]:
    """Tiny and quick: no evaluation, no W&B (its background process would only cost time here)."""
    return [f"run_dir={run_dir}", f"data.root={data}", "size=tiny_test", "data.batch_size=16", "data.num_workers=1",
            "log_every=1", "optim.warmup_steps=1", "eval.every=0", "eval.zeroshot=[]", "eval.retrieval=[]",
            "wandb.mode=disabled", *extra]


def train(run_dir: Path, data: Path, *extra: str) -> subprocess.CompletedProcess:
    """One 2-rank run to its end; a failure is returned, not raised (some tests expect one)."""
    cmd = torchrun_command(RANKS, overrides(run_dir, data, *extra))
    return subprocess.run(cmd, env=rank_env(RANKS), capture_output=True, text=True, timeout=TIMEOUT)


def logged_steps(run_dir: Path) -> list[int]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in rows if "train/loss" in r]


def wait_until(done: Callable[[], object], proc: subprocess.Popen, log: Path, poll: float) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not done():
        assert proc.poll() is None, f"training ended early:\n{log.read_text()[-4000:]}"
        assert time.monotonic() < deadline, f"timed out:\n{log.read_text()[-4000:]}"
        time.sleep(poll)


def rank_pids(torchrun: subprocess.Popen) -> list[int]:
    """torchrun's worker processes (each leads its own session, with its data loader workers)."""
    found = []
    for child in psutil.Process(torchrun.pid).children(recursive=True):
        try:
            if "RANK" in child.environ() and "pretrain.train" in " ".join(child.cmdline()) and child.pid == os.getpgid(child.pid):
                found.append(child.pid)
        except (psutil.AccessDenied, psutil.NoSuchProcess, ProcessLookupError):
            continue
    return found


def kill_everything(torchrun: subprocess.Popen, ranks: list[int]) -> None:
    """SIGKILL, as a node failure would: the ranks' process groups first (the files stop changing
    at once), then torchrun's (it was started in its own session)."""
    for pid in ranks:
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:
        os.killpg(torchrun.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    torchrun.wait(timeout=60)


STEPS = 10
EXTRA = (f"steps={STEPS}", "checkpoint.every=2", "checkpoint.keep=10")


@dataclass
class KilledRun:
    run_dir: Path
    complete: list[Path]  # complete checkpoints when everything was dead, oldest first
    debris: list[str]  # tags in checkpoints/.incoming then: the save the kill interrupted


@pytest.fixture(scope="module")
def killed_run(small_build, tmp_path_factory: pytest.TempPathFactory) -> KilledRun:
    """A 10-step run SIGKILLed (every process) while writing its third checkpoint (step 6): polled
    every 2 ms for DeepSpeed's tag folder in .incoming, so the kill lands mid-save; the tests copy it."""
    run_dir = tmp_path_factory.mktemp("killed") / "run"
    root, log = run_dir / "checkpoints", run_dir.parent / "killed.log"
    cmd = torchrun_command(RANKS, overrides(run_dir, small_build.out_dir, *EXTRA))
    with open(log, "w") as out, subprocess.Popen(cmd, env=rank_env(RANKS), stdout=out, stderr=subprocess.STDOUT,
                                                 start_new_session=True) as proc:
        try:
            wait_until(lambda: len(complete_checkpoints(root)) >= 2, proc, log, poll=0.05)  # steps 2 and 4
            ranks = rank_pids(proc)
            assert len(ranks) == RANKS, ranks
            wait_until(lambda: any((root / INCOMING).glob("step_*")), proc, log, poll=0.002)  # step 6's save began
            kill_everything(proc, ranks)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    debris = sorted(p.name for p in (root / INCOMING).glob("step_*"))
    print(f"killed mid-save: debris {debris}, complete {[p.name for p in complete_checkpoints(root)]}")
    return KilledRun(run_dir, complete_checkpoints(root), debris)


def copy_run(run: KilledRun, tmp_path: Path) -> tuple[Path, list[Path]]:
    """A private copy of the killed run and its complete checkpoints."""
    run_dir = tmp_path / "run"
    shutil.copytree(run.run_dir, run_dir)
    return run_dir, [run_dir / "checkpoints" / c.name for c in run.complete]


def test_sigkill_during_a_save_resumes_from_the_newest_complete_checkpoint(killed_run: KilledRun, small_build,
                                                                          tmp_path: Path) -> None:
    # The kill may land before or (rarely) after the save's rename: either way every complete
    # checkpoint is whole, and the interrupted tag is not published.
    assert len(killed_run.complete) >= 2
    assert all(verify_checkpoint(c) is None for c in killed_run.complete), [verify_checkpoint(c) for c in killed_run.complete]
    assert not set(killed_run.debris) & {c.name for c in killed_run.complete}, "a tag is written or published, never both"

    run_dir, complete = copy_run(killed_run, tmp_path)
    newest = complete[-1]
    rerun = train(run_dir, small_build.out_dir, *EXTRA)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-5000:]
    assert f"resumed from {newest} at step {step_of(newest)}" in rerun.stderr
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == STEPS
    assert logged_steps(run_dir)[-(STEPS - step_of(newest)):] == list(range(step_of(newest) + 1, STEPS + 1))
    assert not any((run_dir / "checkpoints" / INCOMING).glob("step_*")), "the next save cleared the killed save's debris"
    assert all(verify_checkpoint(c) is None for c in complete_checkpoints(run_dir / "checkpoints"))


def truncate_half(path: Path) -> int:
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.truncate(size // 2)
    return size


def test_damaged_newest_checkpoint_is_skipped_with_a_warning(killed_run: KilledRun, small_build, tmp_path: Path) -> None:
    run_dir, complete = copy_run(killed_run, tmp_path)
    damaged, previous = complete[-1], complete[-2]
    written = truncate_half(damaged / "zero_pp_rank_1_mp_rank_00_optim_states.pt")  # a DeepSpeed file of rank 1

    proc = train(run_dir, small_build.out_dir, *EXTRA)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    warning = (f"checkpoint {damaged} is damaged: zero_pp_rank_1_mp_rank_00_optim_states.pt has {written // 2} bytes, "
               f"{written} were written (truncated); falling back to the previous complete checkpoint")
    assert proc.stderr.count(warning) == 1, proc.stderr[-5000:]  # decided once (rank 0), for every rank
    assert f"resumed from {previous} at step {step_of(previous)}" in proc.stderr
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == STEPS
    assert logged_steps(run_dir)[-(STEPS - step_of(previous)):] == list(range(step_of(previous) + 1, STEPS + 1))
    assert verify_checkpoint(damaged) is None, "the re-save of that step replaced the damaged folder"


def test_explicit_resume_of_a_damaged_checkpoint_fails_in_one_line(killed_run: KilledRun, small_build, tmp_path: Path) -> None:
    """No fallback when the user named the checkpoint: the config check refuses it before any work
    (one process is enough: it fails before joining a process group)."""
    run_dir, complete = copy_run(killed_run, tmp_path)
    chosen = complete[-1]
    written = truncate_half(chosen / "rank_00001.pt")
    proc = subprocess.run([sys.executable, "-m", "pretrain.train", *overrides(run_dir, small_build.out_dir),
                           f"checkpoint.resume={chosen}"], env=rank_env(1), capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("config error:")]
    assert errors == [f"config error: checkpoint.resume={chosen} is damaged: rank_00001.pt has {written // 2} bytes, "
                      f"{written} were written (truncated); choose another checkpoint (resume=auto skips damaged ones)"]
    assert "Traceback" not in proc.stderr


# -- verification rules, on folders made by hand ---------------------------------------------------------
def fake_checkpoint(root: Path, step: int, files: dict[str, bytes], listed: bool = True) -> Path:
    path = root / f"step_{step:08d}"
    path.mkdir(parents=True)
    for name, content in files.items():
        (path / name).write_bytes(content)
    meta = {"step": step, "world_size": 1}
    if listed:
        meta["files"] = {name: len(content) for name, content in files.items()}
    (path / COMPLETE).write_text(json.dumps(meta))
    return path


def test_verification_finds_missing_and_changed_files(tmp_path: Path) -> None:
    path = fake_checkpoint(tmp_path, 1, {"a.pt": b"x" * 10, "b.pt": b"y" * 10, "rank_00000.pt": b"z"})
    assert verify_checkpoint(path) is None
    (path / "a.pt").unlink()
    (path / "b.pt").write_bytes(b"y" * 11)
    assert verify_checkpoint(path) == "a.pt is missing; b.pt has 11 bytes, 10 were written (changed since it was written)"
    (path / COMPLETE).write_text("{not json")
    assert verify_checkpoint(path).startswith(f"its {COMPLETE} file is unreadable")


def test_auto_falls_back_but_fails_when_every_checkpoint_is_damaged(tmp_path: Path, caplog) -> None:
    old = fake_checkpoint(tmp_path, 1, {"m.pt": b"1234"})
    new = fake_checkpoint(tmp_path, 2, {"m.pt": b"1234"})
    (new / "m.pt").write_bytes(b"12")
    with caplog.at_level(logging.WARNING, logger="pretrain.checkpoint"):
        assert resolve_resume("auto", tmp_path) == old
    assert f"checkpoint {new} is damaged: m.pt has 2 bytes, 4 were written (truncated)" in caplog.text
    (old / "m.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match="every checkpoint under .* is damaged .*checkpoint.resume=none"):
        resolve_resume("auto", tmp_path)
    with pytest.raises(CheckpointError, match=r"checkpoint.resume=.*step_00000002 is damaged: m.pt has 2 bytes"):
        resolve_resume(str(new), tmp_path)


def test_checkpoints_without_a_file_list_still_resume_unverified(tmp_path: Path, caplog) -> None:
    """Written before COMPLETE listed the files: nothing to check against; said in a debug line."""
    legacy = fake_checkpoint(tmp_path, 3, {"m.pt": b"1234"}, listed=False)
    (legacy / "m.pt").write_bytes(b"12")  # undetectable without the list
    with caplog.at_level(logging.DEBUG, logger="pretrain.checkpoint"):
        assert resolve_resume("auto", tmp_path) == legacy
    assert "has no file list (written by an older version): its files cannot be verified" in caplog.text
    torch.save({"w": torch.zeros(1000)}, legacy / "m.pt")
    truncate_half(legacy / "m.pt")  # then loading is what finds the damage, and says so
    with pytest.raises(CheckpointError, match=r"cannot read .*m.pt: .* \(a truncated or overwritten file reads like this\)"):
        safe_load(legacy / "m.pt")
