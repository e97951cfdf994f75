"""Dataset-building throughput: data_prep vs img2dataset, same URLs, same resize and output, one run.

    .venv/bin/python bench/prep_throughput.py [--urls 8000] [--photo-urls 1000] [--repeats 3] [--skip-install]
    .venv/bin/python bench/prep_throughput.py --smoke   # seconds: data_prep and filter-only, no img2dataset

Download benchmark. URL tables (parquet, columns url/caption) of real images are served by
``tests/data_prep/image_server.py`` (threaded HTTP/1.1, keep-alive) on 127.0.0.1, started in its own
process so neither client's process tree pays for it. Two lists:

- clip art (the headline, ``--urls``): every Tux Paint stamp PNG (``tuxpaint-stamps-default``) and
  every OpenClipart PNG (``openclipart-png``, used when installed) of at most 4 Mpx (the 20 larger
  ones, up to 623 Mpx, would measure one decompression bomb, not throughput), shuffled with a fixed
  seed. Captions: the stamp's English line, the clip-art's file name. Nearly all have transparency.
- photos (``--photo-urls``, 0 to skip): the 19 Tux Paint template JPEGs (604-1296 px photos, most
  of them progressive), as a check on opaque JPEG photos, what web crawls mostly hold.

Past a pool's size a list repeats with a distinct query string per copy (``?copy=N``) so every URL
differs. Every file is read once before timing (page cache warm for both systems).

Both systems fetch the same list with the same settings: ``--processes`` worker processes x
``--threads`` download threads, shards of ``--per-shard`` URLs (img2dataset's input shards and
data_prep's units alike, so both spread the list over the processes the same way), shorter side to
``--size`` keeping the aspect ratio (``keep_ratio``), never enlarging (img2dataset's
``--resize_only_if_bigger True``, data_prep's default ``only_if_bigger``), JPEG quality 95 (both
defaults), WebDataset tars out, request timeout 10 s. Every image must be re-encoded (the PNGs
become JPEGs; the photos are all larger than the default 256 px), so both systems download,
decode, composite transparency on white, resize where needed and encode every image: the same work
per sample (the outputs have the same sizes, and pixels that differ only by resampling filter and
rounding).
data_prep runs ``filters=none`` (no stage, as img2dataset) and decodes every image it writes.
img2dataset (PyPI ``img2dataset==1.47.0``, pinned below) runs from its own venv under .bench/
(created if missing) with the extras data_prep has no counterpart for switched off (EXIF
extraction, sha256 of each image, W&B): less work for img2dataset, so the ratio is conservative.
data_prep runs the full ``python -m data_prep build``: besides the shards it writes
decisions.parquet, trains the sentencepiece tokenizer and writes report.md with plots, work that
img2dataset does not do, also inside the timed window.

Measurement: each system is one subprocess, timed from start to exit (interpreter start, imports
and process spawning included). samples/s per core = samples written / wall seconds / processes.
Successes are counted on both sides from what was written (img2dataset: its per-shard stats
``successes``, checked against the images in its tars; data_prep: its manifests) and must agree,
else the run measured nothing comparable and the script fails. Also printed: CPU milliseconds per
sample of each client's process tree (getrusage of reaped children), steadier than wall time on a
shared machine, the server's CPU seconds during each run, and the peak summed RSS of the client
process tree (psutil, every 0.1 s). With ``--repeats`` > 1 the systems alternate order; the run
with the median samples/s per core of each is reported.

Left as each system is: img2dataset downloads with ``urllib`` (a new TCP connection per image),
data_prep with pooled keep-alive ``requests`` sessions: against one local host that saves the server
a connect per image (its CPU per run is printed), a gain that shrinks on the web, where URLs spread
over many hosts. img2dataset composites transparency in float64 NumPy and resamples with OpenCV's
INTER_AREA; data_prep composites with Pillow and resamples with its own filters. Both
overlap downloads with processing (img2dataset: results in completion order; data_prep: the
downloads of ``download.prefetch`` later batches run while a batch is processed). The
server shares the machine's cores with the client being measured (on a 2-core machine its CPU time
is a real part of the wall time of both).

Filter-only benchmark. Every stage of the presets conf/filters/{wukong,laion,datacomp_basic,align}
.yaml, each distinct stage once (options from the first preset naming it; stages that need no image
first, as in the presets), measured through the stage API (``measure_batch`` over batches of 256,
``reject_reason``, and ``global_reasons`` over the whole set for global stages) on the first
``--filter-samples`` clip-art images, read from disk (no download), in one process with torch at 1
thread; samples/s per core = samples / CPU seconds of that process (other load on the machine does
not count). Every sample goes through every stage (no early rejection), the worst case; the decode
is charged to the first stage that needs the image; one-time costs (model load, lazy imports) are
left out, as a worker pays them once. The laion preset's ``clip_score`` needs a model: an untrained
``tiny_test`` CLIP (conf/size/tiny_test.yaml, random weights, a tokenizer trained on the captions)
exported in ``pretrain.export``'s layout; throughput does not depend on the weights. It is reported
alone too.

Smoke (``--smoke``): checks the benchmark still runs, in seconds; measures nothing. Tiny sizes
(SMOKE below: 32 clip-art URLs, no photo list, Tux Paint stamps only, 1 repeat, 16 filter-only
samples; flags given explicitly still win), data_prep only: img2dataset is neither installed nor
run. Outputs under .bench/prep_throughput_smoke/ (removed unless ``--keep``); the last line is
``ratio_vs_img2dataset: n/a (smoke: reference not run)``.

Last line: ``ratio_vs_img2dataset: X`` (data_prep / img2dataset samples/s per core, clip-art list).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

# bench/, this file's folder, is sys.path[0]: its modules import as top-level ones.
import smoke
from train_throughput import PeakRss  # same sampler as the training benchmark

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / ".bench"
OUT = BENCH / "prep_throughput"
OUT_SMOKE = BENCH / "prep_throughput_smoke"  # apart from OUT: a smoke never deletes a kept real run
I2D_VENV = BENCH / "img2dataset-venv"
I2D_BIN = I2D_VENV / "bin" / "img2dataset"
I2D_PACKAGES = ["img2dataset==1.47.0"]  # resolves as is on Python 3.11 (opencv-python-headless, albumentations 1.4)
SERVE_ROOT = Path("/usr/share")  # holds both image folders: one server for both
TUXPAINT = SERVE_ROOT / "tuxpaint" / "stamps"
OPENCLIPART = SERVE_ROOT / "openclipart" / "png"
PHOTOS = SERVE_ROOT / "tuxpaint" / "templates"
MAX_PIXELS = 4_000_000
PRESETS = ("wukong", "laion", "datacomp_basic", "align")
# --smoke's argument values: enough to run every step of our side once (a build on both processes,
# a filter-only batch), small enough for seconds. No photo list: it would be a second build through
# the same code, as long as the first. Tux Paint only: OpenClipart's 8k files would add seconds of
# header and page-cache reads that check nothing more.
SMOKE = {"urls": 32, "photo_urls": 0, "repeats": 1, "filter_samples": 16, "no_openclipart": True}
# Nothing may reach the internet: no W&B, no albumentations update check, no proxies.
QUIET_ENV = {"WANDB_MODE": "disabled", "NO_ALBUMENTATIONS_UPDATE": "1", "HF_HUB_OFFLINE": "1"}


@dataclass
class Run:
    system: str
    samples: int
    wall_s: float
    cpu_s: float  # client process tree, user + system
    server_cpu_s: float
    peak_rss_mib: float
    processes: int

    @property
    def per_core(self) -> float:
        return self.samples / self.wall_s / self.processes

    @property
    def cpu_ms(self) -> float:
        return 1000 * self.cpu_s / max(self.samples, 1)


# --- inputs -----------------------------------------------------------------------------------------

def image_pool(use_openclipart: bool) -> list[tuple[Path, str]]:
    """``(file, caption)`` of every usable PNG, in a fixed order."""
    from data_prep.sources.tuxpaint import caption_file, read_caption

    pool = []
    for png in sorted(TUXPAINT.rglob("*.png")):
        txt = caption_file(png)
        caption = read_caption(txt) if txt else ""
        pool.append((png, caption or png.stem.replace("_", " ")))
    if use_openclipart:
        for png in sorted(OPENCLIPART.rglob("*.png")):
            pool.append((png, png.stem.rstrip("0123456789").strip("_").replace("_", " ")))
    usable, limit = [], Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None  # headers only here, and the cap is ours
    try:
        for path, caption in pool:
            with Image.open(path) as im:
                if im.size[0] * im.size[1] <= MAX_PIXELS:
                    usable.append((path, caption))
    finally:
        Image.MAX_IMAGE_PIXELS = limit
    random.Random(0).shuffle(usable)
    return usable


def photo_pool() -> list[tuple[Path, str]]:
    """``(file, caption)`` of the Tux Paint template photos (JPEG)."""
    return [(jpg, jpg.stem.replace("_", " ")) for jpg in sorted(PHOTOS.glob("*.jpg"))]


def write_url_table(pool: list[tuple[Path, str]], n: int, base: str, path: Path) -> None:
    """``n`` URLs cycling through ``pool``; copies after the first carry ``?copy=K`` (distinct URLs)."""
    urls, captions = [], []
    for i in range(n):
        file, caption = pool[i % len(pool)]
        copy = i // len(pool)
        urls.append(base + "img/" + quote(file.relative_to(SERVE_ROOT).as_posix()) + (f"?copy={copy}" if copy else ""))
        captions.append(caption)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"url": urls, "caption": captions}), path)


def start_server() -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-m", "tests.data_prep.image_server", str(SERVE_ROOT)], cwd=ROOT,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    base = proc.stdout.readline().strip()
    if not base.startswith("http://127.0.0.1:"):
        proc.kill()
        sys.exit(f"the image server did not start (printed {base!r})")
    return proc, base


# --- the two systems ------------------------------------------------------------------------------

def ensure_img2dataset(skip_install: bool) -> None:
    if I2D_BIN.exists() and skip_install:
        return
    if not I2D_BIN.exists():
        subprocess.run([sys.executable, "-m", "venv", str(I2D_VENV)], check=True)
    subprocess.run([str(I2D_VENV / "bin" / "python"), "-m", "pip", "install", "-q", *I2D_PACKAGES], check=True)


def img2dataset_version() -> str:
    out = subprocess.run([str(I2D_VENV / "bin" / "pip"), "show", "img2dataset"], capture_output=True, text=True)
    return out.stdout.split("Version: ")[1].split()[0]


def run_measured(cmd: list[str], log: Path, server: psutil.Process) -> tuple[float, float, float, float]:
    """Run ``cmd``; return (wall s, client tree CPU s, server CPU s, peak tree RSS MiB)."""
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    env.update(QUIET_ENV)
    log.parent.mkdir(parents=True, exist_ok=True)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)  # the server is not reaped yet: not counted
    s0 = sum(server.cpu_times()[:2])
    with open(log, "w") as out:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
        sampler = PeakRss(proc.pid)
        code = proc.wait()
        wall, peak = time.perf_counter() - t0, sampler.stop()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if code != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-40:])
        sys.exit(f"{Path(cmd[0]).name} ... failed with exit code {code}; the end of {log}:\n{tail}")
    return wall, cpu, sum(server.cpu_times()[:2]) - s0, peak


def tar_images(folder: Path) -> int:
    n = 0
    for tar in folder.rglob("*.tar"):
        with tarfile.open(tar) as t:
            n += sum(1 for m in t if m.name.endswith(".jpg"))
    return n


def run_img2dataset(a: argparse.Namespace, table: Path, out: Path, server: psutil.Process) -> Run:
    folder = out / "img2dataset"
    cmd = [str(I2D_BIN), "--url_list", str(table), "--input_format", "parquet", "--url_col", "url",
           "--caption_col", "caption", "--output_format", "webdataset", "--output_folder", str(folder),
           "--image_size", str(a.size), "--resize_mode", "keep_ratio", "--resize_only_if_bigger", "True",
           "--encode_format", "jpg", "--encode_quality", "95", "--processes_count", str(a.processes),
           "--thread_count", str(a.threads), "--number_sample_per_shard", str(a.per_shard), "--timeout", "10",
           "--retries", "0", "--extract_exif", "False", "--compute_hash", "None", "--enable_wandb", "False",
           "--distributor", "multiprocessing"]
    wall, cpu, server_cpu, peak = run_measured(cmd, out / "img2dataset.log", server)
    stats = [json.loads(p.read_text()) for p in folder.glob("*_stats.json")]
    successes = sum(s["successes"] for s in stats)
    in_tars = tar_images(folder)
    if successes != in_tars:
        sys.exit(f"img2dataset reports {successes} successes but its tars hold {in_tars} images: see {folder}")
    return Run("img2dataset", successes, wall, cpu, server_cpu, peak, a.processes)


def run_data_prep(a: argparse.Namespace, table: Path, out: Path, server: psutil.Process) -> Run:
    folder = out / "data_prep"
    cmd = [sys.executable, "-m", "data_prep", "build", f"out_dir={folder}", "filters=none",
           "~sources.fashion_mnist", "~sources.tuxpaint", "+sources.bench.type=table", f"+sources.bench.root={table}",
           f"resize.size={a.size}", "resize.mode=keep_ratio", "resize.format=jpg",  # quality: default 95
           f"download.threads={a.threads}", "download.timeout=10", f"workers.processes={a.processes}",
           f"unit_size={a.per_shard}", f"samples_per_shard={a.per_shard}"]
    wall, cpu, server_cpu, peak = run_measured(cmd, out / "data_prep.log", server)
    written = sum(json.loads(m.read_text())["total_samples"] for m in folder.glob("*/manifest.json"))
    return Run("data_prep (ours)", written, wall, cpu, server_cpu, peak, a.processes)


def median_run(runs: list[Run]) -> Run:
    """The run with the median samples/s per core (the lower middle one for an even count)."""
    return sorted(runs, key=lambda r: r.per_core)[(len(runs) - 1) // 2]


# --- filter-only ------------------------------------------------------------------------------------

def tiny_clip_export(captions: list[str], out: Path) -> Path:
    """An untrained ``tiny_test`` CLIP in ``pretrain.export``'s layout: model.safetensors, config.yaml,
    tokenizer.model (trained on ``captions``)."""
    import torch
    from omegaconf import OmegaConf
    from safetensors.torch import save_file

    from data_prep.tokenizer import train_tokenizer
    from pretrain.config import ModelConfig, TrainConfig, to_dict
    from pretrain.data.tokenizer import Tokenizer
    from pretrain.models import CLIP

    out.mkdir(parents=True, exist_ok=True)
    # conf/size/ holds the sizes (its files are model's package); the architecture is ModelConfig's
    # default, clip, what conf/model/clip.yaml sets.
    model = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig),
                                                OmegaConf.load(ROOT / "conf" / "size" / "tiny_test.yaml")))
    tokenizer = Tokenizer(train_tokenizer(captions, out, vocab_size=1000), model.text.context_length)
    model.text.vocab_size = tokenizer.vocab_size
    cfg = TrainConfig(model=model)
    torch.manual_seed(0)
    weights = CLIP(cfg.model, eos_id=tokenizer.eos_id).state_dict()
    save_file({k: v.contiguous() for k, v in weights.items()}, str(out / "model.safetensors"))
    (out / "config.yaml").write_text(OmegaConf.to_yaml(to_dict(cfg)))
    return out


def preset_stages(export: Path) -> list[tuple[str, Any]]:
    """Every distinct stage of the presets, ``(name, options)``, options from the first preset that
    names it; stages that need no image first (as the presets order them), then in preset order."""
    from data_prep.config import load_config
    from data_prep.filters import FILTERS

    clip = [f"filters.clip_score.checkpoint={export}", "+filters.clip_score.device=cpu",
            "+filters.clip_score.threads=1"]
    stages: dict[str, Any] = {}
    for preset in PRESETS:
        cfg = load_config([f"filters={preset}", *(clip if preset == "laion" else [])])
        for name, options in cfg.filters.items():
            stages.setdefault(name, options)
    return sorted(stages.items(), key=lambda kv: FILTERS[kv[0]].needs_image)  # stable: keeps preset order


def time_stages(stages: list[tuple[str, Any]], pool: list[tuple[Path, str]], batch_size: int) -> dict[str, float]:
    """CPU seconds of this process (one core: torch at 1 thread) each stage takes over every sample
    (measure_batch + reject_reason, and global_reasons over the whole set for global stages); CPU
    time, not wall time, so other load on the machine does not count."""
    from data_prep.decisions import rows_table, schema
    from data_prep.filters import Reject, make_filter
    from data_prep.sources import Sample
    from data_prep.worker import measure_columns

    filters = [make_filter(name, options) for name, options in stages]
    samples = [Sample(uid=f"{i:08d}", source="bench", source_id=str(i), image=path.read_bytes(), image_ext="png",
                      caption=caption, meta={}) for i, (path, caption) in enumerate(pool)]
    rows: list[dict[str, Any]] = [{"uid": s.uid, "source": s.source} for s in samples]
    seconds = dict.fromkeys((f.name for f in filters), 0.0)
    for f in filters:  # one-time costs (the CLIP model, imagehash's scipy import) are per worker: untimed
        f.measure_batch(samples[:1])
    samples[0].decoded = None
    for start in range(0, len(samples), batch_size):
        batch = samples[start: start + batch_size]
        for f in filters:
            t0 = time.process_time()
            for row, result in zip(rows[start:], f.measure_batch(batch)):
                if not isinstance(result, Reject):
                    row.update(result)
                    if not f.is_global:
                        f.reject_reason(result)
            seconds[f.name] += time.process_time() - t0
        for s in batch:
            s.decoded = None  # as the worker does: pixels live for one batch
    table = rows_table(rows, schema(measure_columns(filters)))
    alive = [True] * len(rows)  # every sample reaches every stage: the worst case
    for f in filters:
        if f.is_global:
            t0 = time.process_time()
            f.global_reasons(table.select(["uid", "source", *f.measure_types]), np.asarray(alive))
            seconds[f.name] += time.process_time() - t0
        f.close()
    return seconds


def filter_only(pool: list[tuple[Path, str]], n: int, batch_size: int, out: Path) -> None:
    import torch

    torch.set_num_threads(1)
    export = tiny_clip_export([c for _, c in pool], out / "tiny_clip_export")
    stages = preset_stages(export)
    seconds = time_stages(stages, pool[:n], batch_size)
    total = sum(seconds.values())
    clip = seconds.get("clip_score", 0.0)
    print(f"\nfilter-only: every stage of {', '.join(PRESETS)} (each once), {n} local samples, 1 process, "
          f"torch 1 thread, CPU time; every sample through every stage; decode charged to the first image stage")
    print(f"{'stage':<20} {'samples/s/core':>15} {'ms/sample':>10}")
    for name, s in seconds.items():
        print(f"{name:<20} {n / s:>15.1f} {1000 * s / n:>10.3f}")
    print(f"filter_only_all_presets: {n / total:.1f} samples/s per core "
          f"(without clip_score: {n / (total - clip):.1f}; clip_score alone: {n / clip:.1f})")


def compare(a: argparse.Namespace, tables: dict[str, tuple[Path, int]], server: psutil.Process,
            out_root: Path) -> dict[str, list[Run]]:
    """Both systems (data_prep only with ``--smoke``) on every list, ``--repeats`` times, alternating
    which goes first; runs by ``"<list>/<system>"``."""
    runs: dict[str, list[Run]] = {}
    systems = ("data_prep",) if a.smoke else ("data_prep", "img2dataset")
    for i in range(a.repeats):
        for label, (table, n) in tables.items():
            # A short list still gives every process a shard.
            opts = argparse.Namespace(**{**vars(a), "per_shard": min(a.per_shard, -(-n // a.processes))})
            for system in (systems if i % 2 == 0 else systems[::-1]):
                out = out_root / f"{label.split()[0]}-rep{i}"
                r = (run_data_prep if system == "data_prep" else run_img2dataset)(opts, table, out, server)
                runs.setdefault(f"{label}/{r.system}", []).append(r)
                print(f"  rep {i} {label}, {r.system}: {r.samples}/{n} samples in {r.wall_s:.1f} s, "
                      f"{r.per_core:.1f} samples/s/core, {r.cpu_ms:.2f} CPU ms/sample, server {r.server_cpu_s:.1f} "
                      f"CPU s, {r.peak_rss_mib:.0f} MiB", flush=True)
                if not a.keep:
                    subprocess.run(["rm", "-rf", str(out / system)], check=True)
        for label, (table, n) in tables.items():
            got = [r.samples for k, rs in runs.items() if k.startswith(label + "/") for r in rs]
            if min(got) < 0.98 * n or max(got) - min(got) > 0.005 * n:
                sys.exit(f"{label}: written samples differ or too many failed ({min(got)}..{max(got)} of {n}): "
                         f"see the logs under {out_root}")
    return runs


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--urls", type=int, default=8000, help="URLs of the clip-art list (the headline)")
    p.add_argument("--photo-urls", type=int, default=1000, help="URLs of the photo list (0: skip it)")
    p.add_argument("--size", type=int, default=256, help="resize: shorter side (keep_ratio)")
    p.add_argument("--processes", type=int, default=2, help="worker processes of each system")
    p.add_argument("--threads", type=int, default=16, help="download threads per process, each system")
    p.add_argument("--per-shard", type=int, default=1000,
                   help="URLs per img2dataset input shard and data_prep unit (at most a list's share per process)")
    p.add_argument("--repeats", type=int, default=1, help="runs per system, alternating order")
    p.add_argument("--filter-samples", type=int, default=2000, help="samples of the filter-only benchmark (0: skip it)")
    p.add_argument("--no-openclipart", action="store_true", help="Tux Paint stamps only in the clip-art list")
    p.add_argument("--skip-install", action="store_true", help="use the img2dataset venv as it is if present")
    p.add_argument("--keep", action="store_true",
                   help="keep run outputs under .bench/prep_throughput/ (--smoke: .bench/prep_throughput_smoke/)")
    return smoke.parse_args(p, SMOKE, "seconds: data_prep and filter-only at tiny sizes (32 clip-art URLs, no photos, "
                            "1 repeat, 16 filter samples, Tux Paint only; explicit flags win), img2dataset not "
                            "installed or run",
                            argv)


def main() -> None:
    a = parse_args()
    out_root = OUT_SMOKE if a.smoke else OUT
    if not TUXPAINT.is_dir():
        sys.exit(f"{TUXPAINT} is missing: apt-get install tuxpaint-stamps-default")
    use_openclipart = not a.no_openclipart and OPENCLIPART.is_dir()
    if not a.no_openclipart and not use_openclipart:
        print(f"note: {OPENCLIPART} is missing (apt-get install openclipart-png for 8k more images): "
              "Tux Paint stamps only", flush=True)
    if a.photo_urls and not PHOTOS.is_dir():
        print(f"note: {PHOTOS} is missing (apt-get install tuxpaint-data): no photo list", flush=True)
        a.photo_urls = 0
    if a.smoke:
        print("smoke: img2dataset (the reference) not installed or run; data_prep side only, tiny sizes", flush=True)
    else:
        ensure_img2dataset(a.skip_install)
    subprocess.run(["rm", "-rf", str(out_root)], check=True)  # fresh outputs: nothing to resume
    pools = {"clip art": image_pool(use_openclipart), "photos": photo_pool() if a.photo_urls else []}
    for path, _ in pools["clip art"] + pools["photos"]:
        path.read_bytes()  # page cache warm for whichever system runs first
    version = "not run (smoke)" if a.smoke else img2dataset_version()
    server_proc, base = start_server()
    try:
        tables = {}
        for label, n in (("clip art", a.urls), ("photos", a.photo_urls)):
            if n:
                tables[label] = (out_root / f"{label.split()[0]}.parquet", n)
                write_url_table(pools[label], n, base, tables[label][0])
        print(f"img2dataset {version} | clip art: {a.urls} URLs of {len(pools['clip art'])} PNGs "
              f"({'Tux Paint + OpenClipart' if use_openclipart else 'Tux Paint'}); photos: {a.photo_urls} URLs of "
              f"{len(pools['photos'])} JPEGs | server {base} (own process) | {a.processes} processes x {a.threads} "
              f"threads, <= {a.per_shard} URLs/shard | keep_ratio {a.size} px, jpg q95, webdataset | {os.cpu_count()} "
              f"cores, load average before: {os.getloadavg()[0]:.2f}", flush=True)
        runs = compare(a, tables, psutil.Process(server_proc.pid), out_root)
    finally:
        server_proc.terminate()
        server_proc.wait()
    if a.filter_samples:
        filter_only(pools["clip art"], min(a.filter_samples, len(pools["clip art"])), 256, out_root)
    if not a.keep:
        subprocess.run(["rm", "-rf", str(out_root)], check=True)
    best = {k: median_run(v) for k, v in runs.items()}
    print(f"\n{'list':<9} {'system':<18} {'samples':>8} {'wall s':>7} {'samples/s/core':>15} {'CPU ms/sample':>14} "
          f"{'server CPU s':>13} {'peak RSS MiB':>13}")
    for key, r in best.items():
        print(f"{key.split('/')[0]:<9} {r.system:<18} {r.samples:>8d} {r.wall_s:>7.1f} {r.per_core:>15.1f} "
              f"{r.cpu_ms:>14.2f} {r.server_cpu_s:>13.1f} {r.peak_rss_mib:>13.0f}")
    ratio = {label: best[f"{label}/data_prep (ours)"].per_core / best[f"{label}/img2dataset"].per_core
             for label in tables if not a.smoke}
    if "photos" in ratio:
        print(f"photos ratio (data_prep / img2dataset samples/s per core): {ratio['photos']:.2f}")
    print(f"ratio_vs_img2dataset: {smoke.SKIPPED if a.smoke else format(ratio['clip art'], '.2f')}")


if __name__ == "__main__":
    main()
