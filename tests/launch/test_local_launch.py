"""``python -m launch``: configs rejected before any rank starts; the demo flow end to end (small)."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from launch.local import rank_env, resolve_nproc, torchrun_command


def launch(*args: str, cwd: Path, timeout: float = 420) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "launch", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=rank_env(2))


@pytest.mark.parametrize("override,expected", [
    ("engine.precision=fp8", ["engine.precision", "fp8", "fp32, bf16"]),
    ("engine.zero_stage=7", ["engine.zero_stage=7", "0, 1, 2 or 3"]),
    ("size=vit_b17", ["size/vit_b17", "vit_b16"]),
    ("model=clipp", ["model/clipp", "limoe"]),
    ("model.flip.mask_ratio=1.0", ["model.flip.mask_ratio=1.0", "[0, 1)"]),
    ("model.moe.top_k=9", ["model.moe.top_k=9", "model.moe.num_experts=8"]),
    ("model.moe.ep_size=3", ["model.moe.ep_size=3", "must divide model.moe.num_experts=8"]),
    ("model.moe.ep_size=4", ["model.moe.ep_size=4", "needs model=limoe"]),
    ("model=limoe model.moe.ep_size=4", ["model.moe.ep_size=4", "world size 2"]),
    ("loss.mode=ring loss.local_loss=false", ["loss.mode=ring", "loss.local_loss=true"]),
    ("loss.kind=sigmoid loss.label_smoothing=0.1", ["loss.label_smoothing", "loss.kind=softmax"]),
    ("loss.impl=fused", ["loss.impl", "fused", "triton"]),
    ("data.root=/no/such/dataset", ["/no/such/dataset"]),
])
def test_bad_config_fails_before_any_work_with_one_line(tmp_path: Path, override: str, expected: list[str]) -> None:
    t0 = time.monotonic()
    proc = launch("train", *override.split(), cwd=tmp_path)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("config error:"), proc.stderr
    for fragment in expected:
        assert fragment in lines[0]
    assert list(tmp_path.iterdir()) == [], "nothing may be written for a rejected config"
    assert time.monotonic() - t0 < 60, "no rank may start"


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the Triton kernels can run")
@pytest.mark.parametrize("override", ["loss.impl=triton", "model=limoe model.moe.router_impl=triton"])
def test_triton_kernels_without_a_gpu_fail_before_any_work(tmp_path: Path, override: str) -> None:
    proc = launch("train", *override.split(), cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [proc.stderr.strip()], proc.stderr
    assert "needs a CUDA GPU" in proc.stderr and override.split()[-1].split("=")[0] in proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_torchrun_command_and_rank_count() -> None:
    cmd = torchrun_command(2, ["steps=3"])
    assert cmd[1:3] == ["-m", "torch.distributed.run"] and "--nproc_per_node=2" in cmd
    assert cmd[-3:] == ["-m", "pretrain.train", "steps=3"]
    assert resolve_nproc("3") == 3 and resolve_nproc("auto") >= 1
    assert rank_env(2)["OMP_NUM_THREADS"].isdigit()


def test_demo_flow_trains_exports_and_prints_the_summary(small_build, tmp_path: Path) -> None:
    """The README's main job, shrunk: the prebuilt small dataset is reused, 6 steps of tiny_test, and
    trained as two local nodes of one rank (two torchrun agents) so the multi-node demo runs too."""
    run_dir = tmp_path / "run"
    proc = launch("demo", "--nproc-per-node", "1", "launcher.nodes=2", f"run_dir={run_dir}", f"data.root={small_build.out_dir}",
                  "size=tiny_test", "steps=6", "optim.warmup_steps=1", "eval.every=0", "checkpoint.every=3",
                  "data.batch_size=16", "eval.zeroshot.0.limit=300", "wandb.mode=offline", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "reusing the dataset" in proc.stdout and "training on 2 node(s) x 1 rank(s)" in proc.stdout
    assert "Fashion-MNIST zero-shot top-1" in proc.stdout and "training samples/s" in proc.stdout
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 6
    assert (run_dir / "export" / "model.safetensors").is_file()
