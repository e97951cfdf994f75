"""Multi-node on one machine: two torchrun agents (one CPU rank each, gloo) meet through a c10d
rendezvous on 127.0.0.1, train the tiny demo model, and resume exactly.

Run as a module (``python -m tests.launch.test_local_multinode <overrides>``) this file is a rank
probe: it prints what torchrun told the rank about its node, then runs ``pretrain.train``. The
tests start the ranks through it to see that the agents really were separate nodes.
"""
from __future__ import annotations

import json
import os
import re
import runpy
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from launch.local import agent_commands, rank_env, run_agents, run_torchrun
from pretrain.export import export_checkpoint, load_exported
from pretrain.monitor import read_metrics

TIMEOUT = 300
PROBE = "tests.launch.test_local_multinode"
PROBE_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE", "TORCHELASTIC_RUN_ID")
TWO_AGENTS = ["launcher.nodes=2", "launcher.procs_per_node=1"]


def common(run_dir: Path, data: Path) -> list[str]:
    """The demo config shrunk to seconds: 6 steps of tiny_test, 16 samples per rank, checkpoints at 3 and 6."""
    return ["experiment=demo", f"run_dir={run_dir}", f"data.root={data}", "size=tiny_test", "data.batch_size=16", "steps=6",
            "checkpoint.every=3", "eval.every=0", "eval.zeroshot.0.limit=200", "log_every=1", "optim.warmup_steps=1",
            "wandb.mode=offline", *TWO_AGENTS]


def run_probed(overrides: list[str], log: Path) -> list[dict]:
    """Two agents through the launcher's own function, every rank behind the probe; what each rank saw."""
    with log.open("w") as out:
        rc = run_torchrun(1, overrides, TIMEOUT, nodes=2, module=PROBE, stdout=out, stderr=subprocess.STDOUT)
    text = log.read_text()
    assert rc == 0, text[-5000:]
    return [json.loads(m) for m in re.findall(r"^rank-probe (\{.*\})$", text, re.MULTILINE)]


@pytest.fixture(scope="module")
def straight(small_build, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The uninterrupted run, through the command line a user types."""
    run_dir = tmp_path_factory.mktemp("multinode") / "straight"
    proc = subprocess.run([sys.executable, "-m", "launch", "train", *common(run_dir, small_build.out_dir)],
                          capture_output=True, text=True, timeout=TIMEOUT, env=rank_env(2))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "on 2 rank(s)" in proc.stderr + proc.stdout
    return run_dir


def test_agent_commands_meet_on_one_c10d_endpoint() -> None:
    cmds = agent_commands(2, 1, ["steps=3"])
    assert len(cmds) == 2 and cmds[0] == cmds[1]  # identical agents; c10d hands out the node ranks
    for flag in ("--nnodes=2", "--rdzv_backend=c10d", "--nproc_per_node=1"):
        assert flag in cmds[0]
    endpoint = next(a for a in cmds[0] if a.startswith("--rdzv_endpoint="))
    assert endpoint.startswith("--rdzv_endpoint=127.0.0.1:") and int(endpoint.rsplit(":", 1)[1]) > 0
    assert cmds[0][-3:] == ["-m", "pretrain.train", "steps=3"]
    # Two runs never share a rendezvous; a configured port is used as given.
    assert agent_commands(2, 1, [])[0] != agent_commands(2, 1, [])[0]
    assert "--rdzv_endpoint=127.0.0.1:29555" in agent_commands(2, 1, [], rdzv_port=29555)[0]
    assert agent_commands(1, 2, [])[0][3] == "--standalone"
    assert rank_env(4)["OMP_NUM_THREADS"] == os.environ.get("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // 4)))


def test_a_failing_agent_stops_the_others() -> None:
    """Node 1's agent dies at once: node 0's agent, left waiting in the rendezvous (for up to
    torchrun's 600 s join timeout), is stopped and the failure's exit code comes back."""
    good = agent_commands(2, 1, ["steps=1"])[0]
    t0 = time.monotonic()
    rc = run_agents([good, [sys.executable, "-c", "import sys; sys.exit(3)"]], rank_env(2), timeout=120,
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert rc == 3 and time.monotonic() - t0 < 30


def test_two_agents_train_as_two_nodes(straight: Path) -> None:
    summary = json.loads((straight / "summary.json").read_text())
    assert summary["steps"] == 6
    assert summary["samples"] == 6 * 2 * 16  # world size 2: both nodes' ranks fed each step
    steps = read_metrics(straight)
    assert sorted(s for s in steps if "train/loss" in steps[s]) == list(range(1, 7))
    assert "eval/zeroshot/fashion_mnist/top1" in steps[6]
    assert (straight / "checkpoints" / "step_00000003").is_dir() and (straight / "checkpoints" / "step_00000006").is_dir()


def test_two_agents_resume_exactly(small_build, straight: Path, tmp_path: Path) -> None:
    """Stop at step 3, rerun: it resumes from the step-3 checkpoint and follows the uninterrupted
    run loss for loss, to the same exported weights. The ranks run behind the probe, which shows
    each was on its own node (agent) with node ranks 0 and 1."""
    split = tmp_path / "split"
    seen = run_probed([*common(split, small_build.out_dir), "stop_at=3"], tmp_path / "first.log")
    assert sorted(int(s["GROUP_RANK"]) for s in seen) == [0, 1]
    assert sorted(int(s["RANK"]) for s in seen) == [0, 1]
    assert all(s["LOCAL_RANK"] == "0" and s["LOCAL_WORLD_SIZE"] == "1" and s["WORLD_SIZE"] == "2"
               and s["GROUP_WORLD_SIZE"] == "2" for s in seen)
    assert len({s["agent_pid"] for s in seen}) == 2, "each rank must be the child of its own torchrun agent"
    assert len({s["TORCHELASTIC_RUN_ID"] for s in seen}) == 1  # ...meeting in one rendezvous
    assert max(read_metrics(split)) == 3

    run_probed(common(split, small_build.out_dir), tmp_path / "second.log")
    assert "resumed from" in (tmp_path / "second.log").read_text() and "step_00000003" in (tmp_path / "second.log").read_text()
    a, b = read_metrics(straight), read_metrics(split)
    for step in range(1, 7):
        assert b[step]["train/loss"] == pytest.approx(a[step]["train/loss"], rel=1e-5, abs=1e-6), f"step {step}"
    assert json.loads((split / "summary.json").read_text())["samples"] == 6 * 2 * 16
    wa = load_exported(export_checkpoint(straight, tmp_path / "export_a")).model.state_dict()
    wb = load_exported(export_checkpoint(split, tmp_path / "export_b")).model.state_dict()
    assert wa.keys() == wb.keys()
    for name, tensor in wa.items():
        torch.testing.assert_close(wb[name], tensor, rtol=1e-5, atol=1e-6, msg=name)


if __name__ == "__main__":  # the rank probe (see the module docstring)
    info = {k: os.environ.get(k) for k in PROBE_ENV} | {"agent_pid": os.getppid()}
    print("rank-probe " + json.dumps(info), flush=True)
    runpy.run_module("pretrain.train", run_name="__main__", alter_sys=True)
