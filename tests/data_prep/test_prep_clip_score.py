"""clip_score stage: scores from a tiny CLIP trained here on real Fashion-MNIST pairs, batch/sample
agreement, threshold and top-fraction judging, clear errors for bad exports, and the bootstrap
(train on the unfiltered set, export, score, filter, retrain) through the real trainer and builder."""
from __future__ import annotations

import dataclasses
import json
import math
import pickle
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import save_file

from data_prep import PrepError
from data_prep.build import build_from_overrides
from data_prep.config import ConfigError, load_config
from data_prep.filters import FILTERS, Reject, apply_filters
from data_prep.filters.clip_score import ClipScoreConfig, ClipScoreFilter, keep_count
from data_prep.images import decode
from data_prep.sources import Sample
from data_prep.sources.fashion_mnist import FashionMnist, FashionMnistConfig
from data_prep.tokenizer import train_tokenizer
from launch.local import rank_env
from pretrain.config import ModelConfig, TextConfig, TrainConfig, VisionConfig, to_dict
from pretrain.data.tokenizer import Tokenizer
from pretrain.data.transforms import image_transform, to_rgb
from pretrain.export import export_checkpoint
from pretrain.losses.contrastive import ContrastiveLoss
from pretrain.models import CLIP

TRAIN, HELDOUT = (0, 400), (400, 560)  # Fashion-MNIST train-split indices


def fmnist(start: int, stop: int) -> list[Sample]:
    return list(FashionMnist(FashionMnistConfig(limit=stop)).iter_range(start, stop))


@pytest.fixture(scope="module")
def export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny CLIP trained for a few seconds on 400 real pairs, saved in ``pretrain.export``'s layout
    (the bootstrap test below goes through the real trainer and exporter instead)."""
    out = tmp_path_factory.mktemp("export")
    samples = fmnist(*TRAIN)
    tokenizer = Tokenizer(train_tokenizer([s.caption for s in samples], out, vocab_size=1000), context_length=32)
    vision = VisionConfig(image_size=32, patch_size=8, width=64, layers=2, heads=2)
    text = TextConfig(context_length=32, vocab_size=tokenizer.vocab_size, width=64, layers=2, heads=2)
    cfg = TrainConfig(model=ModelConfig(embed_dim=32, vision=vision, text=text))
    torch.manual_seed(0)
    model, loss_fn = CLIP(cfg.model, eos_id=tokenizer.eos_id), ContrastiveLoss()
    transform = image_transform(32)
    images = torch.stack([transform(to_rgb(decode(s))) for s in samples])  # (N, 3, 32, 32)
    tokens = tokenizer([s.caption for s in samples])  # (N, 32)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(80):
        idx = torch.randperm(len(samples), generator=gen)[:64]
        loss = loss_fn(**model(images[idx], tokens[idx]))
        opt.zero_grad()
        loss.backward()
        opt.step()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "model.safetensors"))
    (out / "config.yaml").write_text(OmegaConf.to_yaml(to_dict(cfg)))
    return out


@pytest.fixture(scope="module")
def heldout() -> list[Sample]:
    return fmnist(*HELDOUT)


def stage(export: Path, **options) -> ClipScoreFilter:
    return ClipScoreFilter(ClipScoreConfig(checkpoint=str(export), device="cpu", **options))


def mismatched(samples: list[Sample]) -> list[Sample]:
    """Each image with the caption of the next sample of another class."""
    out = []
    for i, s in enumerate(samples):
        other = next(o for o in samples[i + 1:] + samples[:i] if o.meta["label"] != s.meta["label"])
        out.append(dataclasses.replace(s, caption=other.caption, decoded=None))
    return out


def test_stage_is_registered_and_needs_the_image():
    assert FILTERS["clip_score"] is ClipScoreFilter and ClipScoreFilter.needs_image
    assert ClipScoreFilter.measure_types == {"clip_score": float}


def test_matching_pairs_score_higher_than_mismatched(export, heldout):
    f = stage(export)
    match = np.array([m["clip_score"] for m in f.measure_batch(heldout)])
    other = np.array([m["clip_score"] for m in f.measure_batch(mismatched(heldout))])
    assert np.all(np.abs(match) <= 1.0 + 1e-5) and np.all(np.abs(other) <= 1.0 + 1e-5)
    assert match.mean() > other.mean() + 0.1, (match.mean(), other.mean())
    assert (match > other).mean() > 0.7  # per image: its own caption beats a wrong one
    f.close()


def test_measure_batch_equals_measure_and_rejects_unreadable_samples(export, heldout):
    good = [dataclasses.replace(s, decoded=None) for s in heldout[:10]]  # not decoded yet
    bad = {
        2: (dataclasses.replace(good[2], image=good[2].image[:60]), "decode_error: "),  # truncated PNG
        5: (dataclasses.replace(good[5], image=b""), "empty_file: "),
        6: (dataclasses.replace(good[6], image=None), "no_image: "),
        8: (dataclasses.replace(good[8], caption=b"caf\xe9".decode("utf-8", "surrogateescape")), "caption_not_utf8: "),
    }
    samples = [bad[i][0] if i in bad else s for i, s in enumerate(good)]
    f = stage(export, batch_size=3)  # several forwards, some with rejected slots
    batched = f.measure_batch(samples)
    assert len(batched) == len(samples)
    for i, (s, b) in enumerate(zip(samples, batched)):
        if i in bad:
            assert isinstance(b, Reject) and str(b).startswith(bad[i][1]), (i, b)
            with pytest.raises(Reject, match=f"^{bad[i][1]}"):
                f.measure(s)
        else:
            assert b["clip_score"] == pytest.approx(f.measure(s)["clip_score"], abs=1e-5)


def test_threshold_mode_judges_each_sample(export, heldout):
    f = stage(export, threshold=0.3)
    assert not f.is_global and f.summary == {"threshold": 0.3}
    assert f.reject_reason({"clip_score": 0.3}) is None
    assert f.reject_reason({"clip_score": 0.2134}) == "low_clip_score: 0.213 < threshold 0.3"
    assert f.reject_reason({"clip_score": 0.29996}) == "low_clip_score: 0.29996 < threshold 0.3"
    assert f.reject_reason({"clip_score": math.nan}).startswith("bad_clip_score: ")
    # Through the shared first-rejection-wins path: a wrong caption fails, the right one passes.
    right, wrong = heldout[0], mismatched(heldout)[0]
    assert apply_filters([f], right).kept
    v = apply_filters([stage(export, threshold=0.5)], wrong)
    assert v.filter == "clip_score" and v.reason.startswith("low_clip_score: ") and "clip_score" in v.measures


def scores_table(scores: list[float | None], uids: list[str] | None = None) -> pa.Table:
    uids = uids or [f"{i:032x}" for i in range(len(scores))]
    return pa.table({"uid": uids, "source": ["s"] * len(scores), "clip_score": pa.array(scores, pa.float64())})


@pytest.mark.parametrize("fraction, n, k", [(0.3, 10, 3), (0.3, 7, 3), (0.5, 3, 2), (0.01, 5, 1), (1.0, 9, 9),
                                            (0.7, 10, 7), (0.3, 0, 0), (0.29, 100, 29), (0.3, 10**9 + 1, 300000001)])
def test_keep_count_is_the_exact_ceiling(fraction, n, k):
    assert keep_count(n, fraction) == k


def test_top_fraction_keeps_the_best_alive_rows(export):
    rng = np.random.default_rng(0)
    scores = np.round(rng.uniform(-0.2, 0.6, 40), 2)  # 2 decimals: many ties
    scores[[3, 11, 17]] = 0.9  # best scores, but dead: they must neither count nor be kept
    alive = np.ones(40, bool)
    alive[[3, 11, 17, 20]] = False
    f = stage(export, mode="top_fraction", top_fraction=0.3)
    assert f.is_global and f.reject_reason({"clip_score": -1.0}) is None  # judged only in the merge
    reasons = f.global_reasons(scores_table(scores.tolist()), alive)
    kept = [i for i in range(40) if alive[i] and reasons[i] is None]
    assert all(reasons[i] is None for i in np.flatnonzero(~alive))
    assert len(kept) == math.ceil(0.3 * 36) == 11
    t = f.summary["threshold"]
    assert t == min(scores[kept]) and all(scores[i] <= t for i in range(40) if alive[i] and i not in kept)
    low = next(i for i in range(40) if alive[i] and scores[i] < t)
    assert reasons[low] == f"low_clip_score: {scores[low]:.3f} < top-30% threshold {t:.3f}"


def test_top_fraction_breaks_ties_by_uid_whatever_the_row_order(export):
    f = stage(export, mode="top_fraction", top_fraction=0.5)
    uids = [f"{i:032x}" for i in (7, 1, 5, 3, 2, 6)]
    scores = [0.4, 0.4, 0.4, 0.4, 0.1, 0.9]  # keep 3: 0.9 and two of the four 0.4s
    first = f.global_reasons(scores_table(scores, uids), np.ones(6, bool))
    kept = {u for u, r in zip(uids, first) if r is None}
    assert kept == {f"{6:032x}", f"{1:032x}", f"{3:032x}"}
    assert first[0] == "low_clip_score: 0.400 ties the top-50% threshold; cut by uid order"
    perm = [5, 2, 0, 4, 1, 3]
    again = f.global_reasons(scores_table([scores[i] for i in perm], [uids[i] for i in perm]), np.ones(6, bool))
    assert {uids[i] for i, r in zip(perm, again) if r is None} == kept


def test_top_fraction_rejects_alive_rows_without_a_score(export):
    f = stage(export, mode="top_fraction", top_fraction=1.0)
    reasons = f.global_reasons(scores_table([0.2, None, 0.1, None]), np.array([True, True, True, False]))
    assert reasons == [None, "no_clip_score: not measured or non-finite", None, None]
    assert f.global_reasons(scores_table([None]), np.array([False])) == [None]
    assert f.summary == {"threshold": None}  # nothing alive: no cut


@pytest.mark.parametrize("options, message", [
    ([], "checkpoint: required; set it to an export folder made by `python -m pretrain.export"),
    (["mode=top_k"], "mode: 'top_k' is not one of threshold, top_fraction"),
    (["top_fraction=0"], r"top_fraction: 0.0 must be in \(0, 1\]"),
    (["threshold=1.5"], "threshold: 1.5 is not a cosine similarity"),
    (["device=tpu"], "device: 'tpu' is not one of auto, cpu, cuda"),
    (["batch_size=0"], "batch_size: 0 must be >= 1"),
])
def test_bad_options_fail_at_config_time(options, message):
    checkpoint = ["checkpoint=/x"] if options else []
    overrides = [f"+filters.clip_score.{o}" for o in [*checkpoint, *options]] or ["+filters.clip_score={}"]
    with pytest.raises(ConfigError, match=f"^filters.clip_score: {message}"):
        load_config(overrides)


def test_missing_or_incomplete_export_fails_at_construction_naming_the_file(export, tmp_path):
    with pytest.raises(PrepError, match=r"does not exist.*python -m pretrain\.export"):
        stage(tmp_path / "nowhere")
    partial = tmp_path / "partial"
    partial.mkdir()
    for name in ("config.yaml", "tokenizer.model"):
        (partial / name).write_bytes((export / name).read_bytes())
    with pytest.raises(PrepError, match=r"is not an export: model\.safetensors is missing; make one with "
                                        r"`python -m pretrain\.export RUN_DIR --out"):
        stage(partial)
    (partial / "checkpoints").mkdir()  # a training run's folder, not its export
    with pytest.raises(PrepError, match=r"model\.safetensors is missing; this is a training run or checkpoint: "
                                        r"export it with `python -m pretrain\.export .*partial --out EXPORT_DIR`"):
        stage(partial)


def test_open_clip_model_needs_the_package_and_a_weights_file(tmp_path):
    try:
        import open_clip  # noqa: F401
    except ImportError:
        with pytest.raises(PrepError, match="needs the open_clip package .*pip install open_clip_torch"):
            stage(tmp_path, open_clip_model="ViT-B-32")
        return
    with pytest.raises(PrepError, match="is not a file; with open_clip_model"):
        stage(tmp_path, open_clip_model="ViT-B-32")


@pytest.mark.gpu
def test_cuda_bf16_scores_agree_with_cpu(export, heldout):
    cpu = stage(export).measure_batch(heldout)
    gpu = ClipScoreFilter(ClipScoreConfig(checkpoint=str(export), device="cuda")).measure_batch(heldout)
    assert [g["clip_score"] for g in gpu] == pytest.approx([c["clip_score"] for c in cpu], abs=0.03)


def test_pickled_stage_leaves_its_model_behind_and_reloads(export, heldout):
    f = stage(export)
    before = f.measure(heldout[0])["clip_score"]
    state = pickle.dumps(f)
    assert len(state) < 10_000, "the model must not travel to worker processes"
    assert pickle.loads(state).measure(heldout[0])["clip_score"] == pytest.approx(before, abs=1e-6)


def train(run_dir: Path, data: Path, steps: int) -> list[float]:
    """The real trainer, one process on the CPU, without evals; returns the logged losses."""
    overrides = [f"run_dir={run_dir}", f"data.root={data}", "size=tiny_test", f"steps={steps}",
                 "data.batch_size=32", "data.num_workers=0", "log_every=1", "optim.warmup_steps=3",
                 "deepspeed=zero0", "eval.zeroshot=[]", "eval.retrieval=[]", "wandb.mode=disabled"]
    proc = subprocess.run([sys.executable, "-m", "pretrain.train", *overrides], env=rank_env(1),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"training failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["train/loss"] for r in rows if "train/loss" in r]


def shard_samples(split_dir: Path) -> dict[str, dict]:
    """uid -> {"json": metadata, "txt": caption, image ext: bytes} of every sample in a split's shards."""
    out: dict[str, dict] = {}
    for tar in sorted(split_dir.glob("shard-*.tar")):
        with tarfile.open(tar) as t:
            for m in t.getmembers():
                uid, ext = m.name.split(".", 1)
                out.setdefault(uid, {})[ext] = t.extractfile(m).read()
    for s in out.values():
        s["json"] = json.loads(s["json"])
    return out


def test_bootstrap_train_export_score_filter_retrain(small_build, small_overrides, tmp_path):
    """The issue's bootstrap: a CLIP trained on the unfiltered demo set scores that set; the build
    keeps the best-scoring half; training resumes on the filtered set."""
    losses = train(tmp_path / "run0", small_build.out_dir, steps=30)
    assert len(losses) == 30 and all(math.isfinite(x) for x in losses)
    export = export_checkpoint(tmp_path / "run0", tmp_path / "export")

    out = tmp_path / "filtered"
    build_from_overrides([f"out_dir={out}", *small_overrides, f"+filters.clip_score.checkpoint={export}",
                          "+filters.clip_score.mode=top_fraction", "+filters.clip_score.top_fraction=0.5"])
    rows = pq.read_table(out / "decisions.parquet").to_pylist()
    # Alive at the clip stage: every row the earlier stages (source, caption, image checks) let through.
    alive = [r for r in rows if r["filter"] in (None, "clip_score")]
    kept = {r["uid"]: r["clip_score"] for r in alive if r["kept"]}
    cut = [r for r in alive if not r["kept"]]
    assert len(alive) > 200 and all(r["clip_score"] is not None for r in alive)
    assert len(kept) == math.ceil(len(alive) / 2)
    assert min(kept.values()) >= max(r["clip_score"] for r in cut)
    assert all(re.fullmatch(r"low_clip_score: -?\d\.\d+ (< top-50% threshold -?\d\.\d+|ties the top-50% .*)",
                            r["reason"]) for r in cut), {r["reason"] for r in cut}
    assert all(r["kept"] == (r["uid"] in kept) for r in rows)

    shards = {**shard_samples(out / "train"), **shard_samples(out / "heldout")}
    assert set(shards) == set(kept)
    assert all(s["json"]["clip_score"] == pytest.approx(kept[uid]) for uid, s in shards.items())
    # The recorded score is the model's score of the image and caption the shard actually holds.
    f = ClipScoreFilter(ClipScoreConfig(checkpoint=str(export), device="cpu"))
    for uid in sorted(shards)[:8]:
        s = shards[uid]
        ext = next(k for k in s if k not in ("json", "txt"))
        sample = Sample(uid, "x", uid, s[ext], ext, s["txt"].decode("utf-8"))
        assert f.measure(sample)["clip_score"] == pytest.approx(s["json"]["clip_score"], abs=1e-4)

    retrain = train(tmp_path / "run1", out, steps=4)
    assert len(retrain) == 4 and all(math.isfinite(x) for x in retrain)
