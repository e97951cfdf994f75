"""End to end: torchrun with 2 real ranks over gloo, DeepSpeed, real shards, W&B offline files.

Each run starts real processes (~20 s of imports and start-up), so the scenarios are few and each
checks several things.
"""
from __future__ import annotations

import glob
import json
import re
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from launch.local import rank_env, torchrun_command
from pretrain.export import export_checkpoint, load_exported
from pretrain.monitor import read_metrics
from tests.pretrain.stores import S3_ROOT, SECRET

TIMEOUT = 420


def train(run_dir: Path, data: Path | str, *extra: str, nproc: int = 2, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    overrides = [
        f"run_dir={run_dir}", f"data.root={data}", "size=tiny_test", "data.batch_size=16", "data.num_workers=1",
        "log_every=1", "optim.warmup_steps=2", "eval.zeroshot.0.limit=300", "wandb.mode=offline", *extra,
    ]
    proc = subprocess.run(torchrun_command(nproc, overrides), env={**rank_env(nproc), **(env or {})}, capture_output=True,
                          text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, f"training failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def wandb_records(path: str) -> list:
    """Records of an offline ``.wandb`` file: W&B's LevelDB-style log (7-byte header, 32 KiB
    blocks, 7-byte record headers: crc32, length, type FULL=1 FIRST=2 MIDDLE=3 LAST=4) of
    protobuf ``Record`` messages. wandb 0.31 ships no Python reader, hence these lines."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, partial, out = Path(path).read_bytes(), 7, b"", []
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # block trailer too small for a header: padding
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == 0:
            break
        partial = chunk if kind in (1, 2) else partial + chunk
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(partial)
            out.append(record)
    return out


def wandb_runs(run_dir: Path) -> list[tuple[str, set[str]]]:
    """(run id, metric keys logged to history) of each offline run under run_dir, oldest first."""
    runs = []
    for f in sorted(glob.glob(str(run_dir / "wandb" / "offline-run-*" / "run-*.wandb"))):
        records = wandb_records(f)
        run_id = next(r.run.run_id for r in records if r.WhichOneof("record_type") == "run")
        # keys with "/" are stored split, as nested_key
        keys = {i.key or "/".join(i.nested_key) for r in records if r.WhichOneof("record_type") == "history" for i in r.history.item}
        runs.append((run_id, keys))
    return runs


REQUIRED_METRICS = {
    "train/loss", "train/lr", "train/logit_scale", "train/samples_per_sec", "train/tflops", "train/mfu",
    "train/grad_norm", "data/wait_frac", "eval/zeroshot/fashion_mnist/top1", "eval/zeroshot/fashion_mnist/top5",
    "eval/retrieval/tuxpaint/image_to_text_r1", "eval/retrieval/tuxpaint/text_to_image_r10",
}


def test_resume_is_exact_and_wandb_continues_the_run(small_build, s3, tmp_path) -> None:
    """ZeRO-2, 2 ranks: 8 steps straight from local disk == 4 steps, stop, resume, 4 steps with the
    same dataset read from an S3-API server (same losses every step, same final weights); W&B
    offline files hold the metrics; the resumed run keeps its W&B id; no credential is written."""
    common = ["steps=8", "checkpoint.every=4", "eval.every=4", "deepspeed=zero2"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    train(straight, small_build.out_dir, *common)
    stopped = train(split, S3_ROOT, *common, "stop_at=4", env=s3.env)
    assert not (split / "summary.json").exists(), "a stopped run has no final summary"
    resumed = train(split, S3_ROOT, *common, env=s3.env)
    assert "resumed from" in resumed.stderr + resumed.stdout
    logs = stopped.stdout + stopped.stderr + resumed.stdout + resumed.stderr
    written = logs + "".join(p.read_text(errors="replace") for p in split.rglob("*") if p.is_file() and p.stat().st_size < 5 << 20)
    assert SECRET not in written, "a credential was written to a log, a config or W&B"

    a, b = read_metrics(straight), read_metrics(split)
    assert sorted(s for s in a if "train/loss" in a[s]) == list(range(1, 9))
    for step in range(1, 9):
        assert b[step]["train/loss"] == pytest.approx(a[step]["train/loss"], rel=1e-5, abs=1e-6), f"step {step}"
        assert b[step]["train/lr"] == pytest.approx(a[step]["train/lr"])
    wa = load_file(str(export_checkpoint(straight, tmp_path / "export_a") / "model.safetensors"))
    wb = load_file(str(export_checkpoint(split, tmp_path / "export_b") / "model.safetensors"))
    for name, tensor in wa.items():
        torch.testing.assert_close(wb[name], tensor, rtol=1e-5, atol=1e-6, msg=f"weight {name}")

    summary = json.loads((straight / "summary.json").read_text())
    for key in ("eval/zeroshot/fashion_mnist/top1", "eval/retrieval/tuxpaint/image_to_text_r1",
                "eval/retrieval/tuxpaint/text_to_image_r1", "train/samples_per_sec", "steps"):
        assert key in summary, key
    assert summary["steps"] == 8
    from_s3 = json.loads((split / "summary.json").read_text())  # the held-out split read from S3: same scores
    for key in ("eval/retrieval/tuxpaint/image_to_text_r1", "eval/retrieval/tuxpaint/text_to_image_r5"):
        assert from_s3[key] == pytest.approx(summary[key]), key

    ((run_id, keys),) = wandb_runs(straight)
    assert REQUIRED_METRICS <= keys, f"missing in W&B history: {REQUIRED_METRICS - keys}"
    first, second = wandb_runs(split)
    assert first[0] == second[0], "the resumed run continues the same W&B run"


def test_zero3_bf16_with_accumulation_trains_exports_and_evaluates(small_build, tmp_path) -> None:
    """ZeRO-3 + bf16 + 2 accumulation micro-steps: trains, loss finite; the export loads without
    DeepSpeed and the standalone evaluator runs on it."""
    run = tmp_path / "run"
    train(run, small_build.out_dir, "steps=4", "deepspeed=zero3", "engine.precision=bf16", "engine.grad_accum=2")
    m = read_metrics(run)
    assert all(torch.isfinite(torch.tensor(m[s]["train/loss"])) for s in range(1, 5))
    export = export_checkpoint(run, tmp_path / "export")
    model = load_exported(export).model
    assert all(p.dtype == torch.float32 for p in model.parameters()), "exported as fp32 master weights"
    out = tmp_path / "eval.json"
    proc = subprocess.run([sys.executable, "-m", "pretrain.evaluate", str(export), "--out", str(out)],
                          capture_output=True, text=True, timeout=TIMEOUT, env=rank_env(1))
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert 0.0 <= result["eval/zeroshot/fashion_mnist/top1"] <= 1.0
    assert "eval/retrieval/tuxpaint/text_to_image_r5" in result


SCALE_SETTINGS = ["engine.overlap_comm=true", "engine.contiguous_gradients=false", "engine.reduce_bucket_size=100000",
                  "engine.allgather_bucket_size=100000", "checkpoint.every=100", "checkpoint.every_minutes=1e-6"]


@pytest.mark.parametrize("stage,extra", [(0, []), (1, SCALE_SETTINGS)])
def test_other_zero_stages_train(small_build, tmp_path, stage: int, extra: list[str]) -> None:
    """ZeRO-1 also with the settings tuned at scale, and a wall-time checkpoint cadence so short that
    every step saves (checkpoint.every alone would save only the final step)."""
    run = tmp_path / "run"
    proc = train(run, small_build.out_dir, "steps=3", f"deepspeed=zero{stage}", "eval.zeroshot=[]", "eval.retrieval=[]", *extra)
    assert json.loads((run / "summary.json").read_text())["steps"] == 3
    saved = [int(s) for s in re.findall(r"checkpoint \S*step_(\d+) \(", proc.stdout + proc.stderr)]
    assert saved == ([1, 2, 3] if extra else [3])
