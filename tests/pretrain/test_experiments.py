"""Every architecture trains through the main job's pipeline: ``experiment=<name>`` on 2 CPU
ranks (torchrun, gloo, DeepSpeed), real shards, evaluation, export. Few steps: each run is a
real multi-process start (~20 s)."""
from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import pytest
import torch

from data_prep.build import build_from_overrides
from launch.local import rank_env, torchrun_command
from pretrain.export import export_checkpoint, load_exported
from pretrain.monitor import read_metrics
from tests import stamps

TIMEOUT = 480


def run_experiment(run_dir: Path, data: Path, experiment: str, *extra: str) -> dict[int, dict]:
    overrides = [f"experiment={experiment}", f"run_dir={run_dir}", f"data.root={data}", "data.batch_size=16",
                 "log_every=1", "optim.warmup_steps=1", "eval.every=0", "eval.zeroshot.0.limit=300",
                 "wandb.mode=offline", *extra]
    proc = subprocess.run(torchrun_command(2, overrides), env=rank_env(2), capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, f"{experiment} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return read_metrics(run_dir)


def check_trained_and_evaluated(run_dir: Path, steps: dict[int, dict], arch: str) -> None:
    last = steps[max(steps)]
    assert all(math.isfinite(s["train/loss"]) for s in steps.values() if "train/loss" in s)
    assert "eval/zeroshot/fashion_mnist/top1" in last and "eval/retrieval/tuxpaint/image_to_text_r1" in last
    summary = json.loads((run_dir / "summary.json").read_text())
    exported = load_exported(export_checkpoint(run_dir, run_dir / "export"))
    assert exported.config.model.arch.value == arch
    assert summary["steps"] == max(steps)


def test_align_trains_with_lamb_and_label_smoothing(small_build, tmp_path: Path) -> None:
    run = tmp_path / "align"
    steps = run_experiment(run, small_build.out_dir, "align", "size=tiny_test", "steps=4")
    check_trained_and_evaluated(run, steps, "align")
    assert steps[1]["train/logit_scale"] == pytest.approx(1.0, abs=0.05)  # temperature starts at 1.0
    config = (run / "config.yaml").read_text()
    assert "name: lamb" in config and "label_smoothing: 0.1" in config


def test_flip_runs_masked_then_unmasked_phase_in_one_command(small_build, tmp_path: Path) -> None:
    run = tmp_path / "flip"
    steps = run_experiment(run, small_build.out_dir, "flip", "size=tiny_test", "steps=6", "model.flip.unmasked_fraction=0.34",
                           "model.flip.text_mask_ratio=0.25")
    check_trained_and_evaluated(run, steps, "flip")
    assert [steps[s]["train/mask_ratio"] for s in range(1, 7)] == [0.5] * 4 + [0.0] * 2
    # Phase 2 runs at a tenth of the cosine schedule's learning rate.
    lr = {s: steps[s]["train/lr"] for s in steps}
    assert lr[5] < 0.2 * lr[3]


LIMOE_TAU = 0.7  # conf/experiment/limoe.yaml: each modality keeps ~2 of the 4 experts busy


@pytest.fixture(scope="module")
def other_build(tmp_path_factory: pytest.TempPathFactory, small_stamps: stamps.StampTree,
                small_overrides: list[str]) -> Path:
    """The small build's recipe on other data: its stamps start at the middle top-level folder on
    disk instead of the first, and the build's seed (unit order, split) differs."""
    folders = stamps.categories()
    middle = folders[len(folders) // 2]
    start = next(i for i, s in enumerate(stamps.all_stamps()) if s.rel.startswith(f"{middle}/"))
    tree = stamps.make_stamp_tree(tmp_path_factory.mktemp("other_stamps"), len(small_stamps.plain), start)
    out = tmp_path_factory.mktemp("other_prep") / "data"
    overrides = [o for o in small_overrides if not o.startswith("sources.tuxpaint.root=")]
    build_from_overrides([f"out_dir={out}", *overrides, f"sources.tuxpaint.root={tree.root}", "seed=1"])
    return out


def spread_failures(steps: dict[int, dict], tau: float) -> list[str]:
    """What says a modality collapsed onto few experts in a LiMoE run with 4 experts in 2 layers:
    the mean over steps of the entropy of where its tokens went (this rank's, and every rank's)
    below ``tau``, or one expert taking 90% of its tokens in any of the last 10 steps."""
    logged = [s for s in steps.values() if "train/loss" in s]
    failures = []
    for layer in (0, 1):
        for modality in ("image", "text"):
            prefix = f"moe/layer{layer}/{modality}"
            for name in ("usage_entropy", "global_entropy"):
                mean = sum(s[f"{prefix}/{name}"] for s in logged) / len(logged)
                if mean < tau:
                    failures.append(f"{prefix}: mean {name} {mean:.2f} < tau {tau}")
            top_share = max(max(s[f"{prefix}/load_e{e}"] for e in range(4)) for s in logged[-10:])
            if top_share >= 0.9:
                failures.append(f"{prefix}: one expert took {top_share:.0%} of the tokens")
    return failures


@pytest.mark.parametrize("data", ["small", "other"])
def test_limoe_expert_parallel_keeps_every_modality_spread_over_experts(small_build, other_build, tmp_path: Path,
                                                                       data: str) -> None:
    """The demo-sized LiMoE, experts split over the 2 ranks (ep_size=2) under ZeRO-2, 40 steps of
    real data, on two data sets and orders: neither modality collapses onto one expert. The global
    entropy loss is a hinge, so the entropy may dip below tau for a few steps before it acts."""
    run = tmp_path / "limoe"
    root, seeds = (small_build.out_dir, []) if data == "small" else (other_build, ["seed=1", "data.seed=1"])
    steps = run_experiment(run, root, "limoe", "steps=40", "model.moe.ep_size=2", *seeds)
    check_trained_and_evaluated(run, steps, "limoe")
    assert spread_failures(steps, LIMOE_TAU) == []
    logged = [s for s in steps.values() if "train/loss" in s]
    assert "moe/aux/load" in logged[-1] and "moe/aux/global_entropy" in logged[-1]
    assert "moe/layer0/text/router_entropy" in logged[-1]


def test_limoe_without_the_global_entropy_loss_collapses_a_modality(small_build, tmp_path: Path) -> None:
    """The control of the test above: the same run with the global entropy loss off. The local
    entropy loss alone makes tokens commit, and a modality commits to few experts; the check fails."""
    steps = run_experiment(tmp_path / "limoe", small_build.out_dir, "limoe", "steps=40", "model.moe.ep_size=2",
                           "model.moe.global_entropy_weight=0", "eval.zeroshot=[]", "eval.retrieval=[]")
    failures = spread_failures(steps, LIMOE_TAU)
    assert any("mean usage_entropy" in f for f in failures), failures


def test_expert_parallel_training_matches_plain_data_parallel_under_zero3(small_build, tmp_path: Path) -> None:
    """Through the whole engine (ZeRO-3 partitions every weight, experts included; the optimizer
    steps): ep_size=2 follows the same loss curve as ep_size=1."""
    common = ["size=tiny_test", "steps=4", "deepspeed=zero3", "eval.zeroshot=[]", "eval.retrieval=[]"]
    losses = {}
    for ep in (1, 2):
        steps = run_experiment(tmp_path / f"ep{ep}", small_build.out_dir, "limoe", *common, f"model.moe.ep_size={ep}")
        losses[ep] = [steps[s]["train/loss"] for s in range(1, 5)]
    assert losses[2] == pytest.approx(losses[1], rel=1e-4)
    assert len(set(losses[1])) == 4  # the weights moved: four different losses


@pytest.mark.parametrize("experiment,extra", [
    # FLIP: random masks of both modalities, and the stop falls just before the unmasked phase.
    ("flip", ["model.flip.unmasked_fraction=0.25", "model.flip.text_mask_ratio=0.25"]),
    # ALIGN: LAMB's state, and BatchNorm statistics that each rank would otherwise keep its own of.
    ("align", []),
])
def test_resume_is_exact(small_build, tmp_path: Path, experiment: str, extra: list[str]) -> None:
    """8 steps straight == 5 steps, stop, resume, 3 steps: the same loss at every step and the
    same exported weights and buffers."""
    common = ["size=tiny_test", "steps=8", "checkpoint.every=100", "eval.zeroshot.0.limit=200", *extra]
    straight = run_experiment(tmp_path / "straight", small_build.out_dir, experiment, *common)
    run_experiment(tmp_path / "split", small_build.out_dir, experiment, *common, "stop_at=5")
    split = run_experiment(tmp_path / "split", small_build.out_dir, experiment, *common)
    for step in range(1, 9):
        assert split[step]["train/loss"] == pytest.approx(straight[step]["train/loss"], rel=1e-5, abs=1e-6), f"step {step}"
    if experiment == "flip":
        assert [split[s]["train/mask_ratio"] for s in range(1, 9)] == [0.5] * 6 + [0.0] * 2
    for key in ("eval/zeroshot/fashion_mnist/top1", "eval/retrieval/tuxpaint/text_to_image_r10"):
        assert split[8][key] == pytest.approx(straight[8][key])
    a = load_exported(export_checkpoint(tmp_path / "straight", tmp_path / "export_a")).model.state_dict()
    b = load_exported(export_checkpoint(tmp_path / "split", tmp_path / "export_b")).model.state_dict()
    for name, tensor in a.items():
        torch.testing.assert_close(b[name], tensor, rtol=1e-5, atol=1e-6, msg=name)


def test_loss_implementations_and_ring_mode_train_the_same(small_build, tmp_path: Path) -> None:
    """12 steps of CLIP on 2 ranks: the tiled loss (tiles smaller than the global batch of 32),
    gathered or passed around the ring, gives the naive loss's value at every step."""
    common = ["size=tiny_test", "steps=12", "log_every=1", "eval.zeroshot=[]", "eval.retrieval=[]", "loss.tile=7"]
    variants = {"naive": ["loss.impl=naive"], "chunked": ["loss.impl=chunked"], "ring": ["loss.impl=chunked", "loss.mode=ring"]}
    runs = {name: run_experiment(tmp_path / name, small_build.out_dir, "demo", *common, *extra) for name, extra in variants.items()}
    for step in range(1, 13):
        for name in ("chunked", "ring"):
            assert runs[name][step]["train/loss"] == pytest.approx(runs["naive"][step]["train/loss"], rel=1e-4), (name, step)


def test_siglip_trains_its_bias_with_the_ring(small_build, tmp_path: Path) -> None:
    """experiment=siglip: the sigmoid loss, temperature from 10 and bias from -10, both learned;
    the ring mode follows the gather mode step for step."""
    common = ["size=tiny_test", "steps=6", "loss.tile=5"]
    gather = run_experiment(tmp_path / "gather", small_build.out_dir, "siglip", *common)
    check_trained_and_evaluated(tmp_path / "gather", gather, "clip")
    assert gather[1]["train/logit_scale"] == pytest.approx(10.0, rel=0.02)
    assert gather[1]["train/logit_bias"] == pytest.approx(-10.0, abs=0.05)
    assert gather[6]["train/logit_bias"] != gather[1]["train/logit_bias"]  # the bias is a trained parameter
    assert "kind: sigmoid" in (tmp_path / "gather" / "config.yaml").read_text()
    ring = run_experiment(tmp_path / "ring", small_build.out_dir, "siglip", *common, "loss.mode=ring", "eval.zeroshot=[]",
                          "eval.retrieval=[]")
    for step in range(1, 7):
        assert ring[step]["train/loss"] == pytest.approx(gather[step]["train/loss"], rel=1e-4), step
        assert ring[step]["train/logit_bias"] == pytest.approx(gather[step]["train/logit_bias"], rel=1e-4), step
