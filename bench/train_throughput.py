"""Training throughput and peak memory: this framework vs OpenCLIP, same CLIP, same data, one run.

    .venv/bin/python bench/train_throughput.py [--steps 60] [--warmup 10] [--repeats 1]
    .venv/bin/python bench/train_throughput.py --smoke [--data DATA_ROOT]   # seconds: ours only

Both systems train the demo CLIP (conf/size/demo.yaml: 28 px images, 4 px patches, ViT 128 wide /
4 layers / 4 heads, text context 16, 128 wide / 2 layers / 2 heads, embed 128) in fp32 on CPU: 2
ranks started by torchrun over gloo, OMP_NUM_THREADS=1 per rank, 1 data loader worker per rank,
per-rank batch 128, on the same WebDataset shards (runs/demo/data/train, built if missing). OpenCLIP
(``open_clip_train.main`` of PyPI ``open-clip-torch``, pinned below) runs from its own venv under
.bench/, created if missing, through a small shim (in SHIM below) that registers a model config JSON of the same
sizes with ``open_clip.add_model_config``. Optimizer settings match too (AdamW lr 2e-3, betas
0.9/0.98, eps 1e-6, wd 0.1, grad clip 1.0, linear warm-up then cosine, local loss with features
gathered with their gradient), and so does the raw-sample shuffle buffer (5000, OpenCLIP's fixed size).

Throughput: both run the same number of optimizer steps; the first ``--warmup`` steps (start-up,
loader fill, allocator warm-up) are excluded and samples/s is (samples of the remaining steps) /
(wall time those steps took, data waits included) on rank 0. Ours: ``log_every=warmup`` and the
``train/samples_per_sec`` intervals of metrics.jsonl after the first. OpenCLIP: it logs every step
(``--log-every-n-steps 1``) and each line's samples/s is global batch / that step's time, so the
window's rate is the harmonic mean of the lines after the warm-up steps. Evals are off for both;
periodic checkpoints are off; each saves its final checkpoint after the timed window.

Peak memory: the peak of the summed RSS of the whole process tree (torchrun, ranks, loader workers)
sampled with psutil every 0.1 s over the whole run, start-up and final checkpoint included.

Differences left on purpose (what each system is): ours trains with DeepSpeed ZeRO-2 (the demo's
engine), OpenCLIP with DDP; OpenCLIP's text vocabulary is its BPE tokenizer's 49408 (ours: the demo
sentencepiece's), which changes the token embedding table's size (memory, optimizer state), not the
FLOPs; each tokenizes and decodes images its own way (same sizes out).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

import smoke
from launch.local import torchrun_command

ROOT = Path(__file__).resolve().parents[1]
SMOKE = {"steps": 3, "warmup": 1, "batch_size": 8, "repeats": 1, "shuffle_buffer": 64}  # --smoke: ours only
BENCH = ROOT / ".bench"
OC_VENV = BENCH / "openclip-venv"
OC_PYTHON = OC_VENV / "bin" / "python"
# open_clip_train's own deps (its [training] extra minus transformers, unused without an HF tower).
OC_PACKAGES = ["open-clip-torch==3.3.0", "webdataset>=0.2.5,<=0.2.86", "pandas", "fsspec"]
OC_MODEL = "clipforge-demo"
DATA = ROOT / "runs" / "demo" / "data"
NPROC = 2
# argv: model config dir, JSON file of open_clip_train arguments (a file because torchrun's parser
# would take "--logs" for its own "--logs-specs"). open_clip_train passes device_ids=[device] to DDP,
# which torch rejects for a CPU module: the shim drops device_ids (what torch wants on CPU).
SHIM = '''import json, sys
import torch, open_clip
from open_clip_train import main
DDP = torch.nn.parallel.DistributedDataParallel
torch.nn.parallel.DistributedDataParallel = lambda module, device_ids=None, **kw: DDP(module, **kw)
open_clip.add_model_config(sys.argv[1])
main.main(json.load(open(sys.argv[2])))
'''


@dataclass
class Run:
    system: str
    samples_per_sec: float
    peak_rss_mib: float
    steps_measured: int
    wall_s: float


class PeakRss:
    """Samples the summed RSS of a process and all its descendants in a background thread."""

    def __init__(self, pid: int, every: float = 0.1) -> None:
        self.root, self.every, self.peak = psutil.Process(pid), every, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            total = 0
            try:
                procs = [self.root, *self.root.children(recursive=True)]
            except psutil.Error:
                procs = []
            for p in procs:
                try:
                    total += p.memory_info().rss
                except psutil.Error:
                    pass  # exited between listing and reading
            self.peak = max(self.peak, total)
            self._stop.wait(self.every)

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return self.peak / 2**20


def run_measured(cmd: list[str], cwd: Path, log: Path, threads: int) -> tuple[float, float]:
    """Run ``cmd`` (output to ``log``); return (wall seconds, peak tree RSS in MiB)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as out:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
        sampler = PeakRss(proc.pid)
        code = proc.wait()
        wall, peak = time.perf_counter() - t0, sampler.stop()
    if code != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-40:])
        sys.exit(f"{cmd[0]} ... failed with exit code {code}; the end of {log}:\n{tail}")
    return wall, peak


def ensure_data(root: Path) -> Path:
    """The train split under ``root``; the demo dataset is built when it is the missing default."""
    if not (root / "train" / "manifest.json").exists():
        if root != DATA:
            sys.exit(f"--data {root}: no train/manifest.json; give a folder written by `python -m data_prep build`")
        subprocess.run([sys.executable, "-m", "data_prep", "build"], cwd=ROOT, check=True)
    return root / "train"


def ensure_openclip(skip_install: bool) -> None:
    if OC_PYTHON.exists() and skip_install:
        return
    if not OC_PYTHON.exists():
        subprocess.run([sys.executable, "-m", "venv", str(OC_VENV)], check=True)
    subprocess.run([str(OC_PYTHON), "-m", "pip", "install", "-q", *OC_PACKAGES], check=True)


def openclip_version() -> str:
    out = subprocess.run([str(OC_PYTHON), "-c", "import open_clip; print(open_clip.__version__)"],
                         capture_output=True, text=True, check=True)
    return out.stdout.strip()


def model_sizes() -> dict[str, Any]:
    """conf/size/demo.yaml, read with OmegaConf (same file ours trains with experiment=demo)."""
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "size" / "demo.yaml"))  # type: ignore[return-value]


def run_ours(a: argparse.Namespace, out: Path) -> Run:
    run_dir = out / "ours"
    overrides = [
        "experiment=demo", f"run_dir={run_dir}", f"data.root={a.data}", f"steps={a.steps}", f"log_every={a.warmup}",
        f"data.batch_size={a.batch_size}", "data.num_workers=1", f"data.shuffle_buffer={a.shuffle_buffer}",
        "engine.precision=fp32", "engine.backend=gloo", f"optim.warmup_steps={a.warmup}",
        "wandb.mode=disabled", "eval.every=0", "eval.zeroshot=[]", "eval.retrieval=[]",
        f"checkpoint.every={a.steps + 1}", "checkpoint.resume=none",
    ]
    wall, peak = run_measured(torchrun_command(NPROC, overrides), ROOT, run_dir / "stdout.log", a.threads)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "train/samples_per_sec" in r]  # the final eval logs a row too
    samples = seconds = 0.0
    prev = 0
    for r in rows:
        n = (r["step"] - prev) * a.batch_size * NPROC
        if prev >= a.warmup:  # interval lies wholly after the warm-up steps
            samples, seconds = samples + n, seconds + n / r["train/samples_per_sec"]
        prev = r["step"]
    return Run("clipforge (ours)", samples / seconds, peak, int(samples) // (a.batch_size * NPROC), wall)


OC_LINE = re.compile(r"Train Epoch: \d+ \[\s*(\d+)/\d+ .*?Batch \(t\): [\d.]+, ([\d.eE+-]+)/s,")


def run_openclip(a: argparse.Namespace, train: Path, out: Path) -> Run:
    run_dir = out / "openclip"
    m = model_sizes()
    v, t = m["vision"], m["text"]
    config = {"embed_dim": m["embed_dim"],
              "vision_cfg": {"image_size": v["image_size"], "patch_size": v["patch_size"], "width": v["width"],
                             "layers": v["layers"], "head_width": v["width"] // v["heads"]},
              "text_cfg": {"context_length": t["context_length"], "vocab_size": 49408, "width": t["width"],
                           "heads": t["heads"], "layers": t["layers"]}}
    (run_dir / "models").mkdir(parents=True, exist_ok=True)
    (run_dir / "models" / f"{OC_MODEL}.json").write_text(json.dumps(config, indent=1))
    (run_dir / "shim.py").write_text(SHIM)
    shards = "::".join(str(train / s["name"]) for s in json.loads((train / "manifest.json").read_text())["shards"])
    global_batch = a.batch_size * NPROC
    args = [
        "--train-data", shards, "--dataset-type", "webdataset", "--train-num-samples", str(a.steps * global_batch),
        "--epochs", "1", "--batch-size", str(a.batch_size), "--workers", "1", "--model", OC_MODEL,
        "--precision", "fp32", "--device", "cpu", "--dist-backend", "gloo", "--report-to", "none",
        "--lr", "2e-3", "--beta1", "0.9", "--beta2", "0.98", "--eps", "1e-6", "--wd", "0.1",
        "--grad-clip-norm", "1.0", "--warmup", str(a.warmup), "--local-loss", "--gather-with-grad",
        "--zeroshot-frequency", "0", "--val-frequency", "0", "--save-frequency", "0",
        "--log-every-n-steps", "1", "--logs", str(run_dir / "logs"), "--name", "bench", "--seed", "0",
    ]
    (run_dir / "args.json").write_text(json.dumps(args, indent=1))
    cmd = [str(OC_PYTHON), "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={NPROC}",
           str(run_dir / "shim.py"), str(run_dir / "models"), str(run_dir / "args.json")]
    log = run_dir / "stdout.log"
    wall, peak = run_measured(cmd, run_dir, log, a.threads)
    step_seconds = [global_batch / float(rate) for n, rate in OC_LINE.findall(log.read_text())
                    if int(n) // global_batch > a.warmup]
    if len(step_seconds) != a.steps - a.warmup:
        sys.exit(f"parsed {len(step_seconds)} OpenCLIP steps after warm-up, expected {a.steps - a.warmup}: see {log}")
    return Run("OpenCLIP", len(step_seconds) * global_batch / sum(step_seconds), peak, len(step_seconds), wall)


def median_run(runs: list[Run]) -> Run:
    return Run(runs[0].system, statistics.median(r.samples_per_sec for r in runs), max(r.peak_rss_mib for r in runs),
               runs[0].steps_measured, statistics.median(r.wall_s for r in runs))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=60, help="optimizer steps per system")
    p.add_argument("--warmup", type=int, default=10, help="first steps left out of the measurement")
    p.add_argument("--batch-size", type=int, default=128, help="per rank")
    p.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS per rank")
    p.add_argument("--shuffle-buffer", type=int, default=5000, help="ours; OpenCLIP's is fixed at 5000")
    p.add_argument("--repeats", type=int, default=1, help="runs per system, alternating order; medians reported")
    p.add_argument("--skip-install", action="store_true", help="use the OpenCLIP venv as it is if present")
    p.add_argument("--keep", action="store_true", help="keep run outputs under .bench/train_throughput/")
    p.add_argument("--data", type=Path, default=DATA, help="dataset root (train/ under it); default: the demo's, built if missing")
    a = smoke.parse_args(p, SMOKE, "seconds, checks the script works: ours only (no OpenCLIP install), 3 steps of batch 8")
    if not 1 <= a.warmup < a.steps:
        p.error("need 1 <= --warmup < --steps")
    a.data = a.data.resolve()
    train = ensure_data(a.data)
    if not a.smoke:
        ensure_openclip(a.skip_install)
    out = BENCH / ("train_throughput_smoke" if a.smoke else "train_throughput")
    subprocess.run(["rm", "-rf", str(out)], check=True)  # fresh run dirs: no resume, no stale logs
    version = "not run (--smoke)" if a.smoke else openclip_version()
    print(f"open-clip-torch {version} | {NPROC} ranks x {a.threads} thread(s), gloo, fp32, batch "
          f"{a.batch_size}/rank, 1 loader worker/rank | {a.steps} steps, first {a.warmup} not timed | "
          f"load average before: {os.getloadavg()[0]:.2f}", flush=True)
    print("OpenCLIP text vocab: 49408 (its BPE tokenizer): a larger embedding table, same FLOPs", flush=True)
    ours: list[Run] = []
    theirs: list[Run] = []
    systems = ("ours",) if a.smoke else ("ours", "openclip")
    for i in range(a.repeats):
        for name in (systems if i % 2 == 0 else systems[::-1]):
            rep = out / f"rep{i}"
            r = run_ours(a, rep) if name == "ours" else run_openclip(a, train, rep)
            (ours if name == "ours" else theirs).append(r)
            print(f"  rep {i} {r.system}: {r.samples_per_sec:.1f} samples/s, {r.peak_rss_mib:.0f} MiB", flush=True)
    if not a.keep:
        subprocess.run(["rm", "-rf", str(out)], check=True)
    rows = [median_run(runs) for runs in (ours, theirs) if runs]
    print(f"\n{'system':<18} {'samples/s':>10} {'peak RSS MiB':>13} {'steps measured':>15} {'wall s':>8}")
    for r in rows:
        print(f"{r.system:<18} {r.samples_per_sec:>10.1f} {r.peak_rss_mib:>13.0f} {r.steps_measured:>15d} {r.wall_s:>8.1f}")
    ratio = f"{rows[0].samples_per_sec / rows[1].samples_per_sec:.2f}" if len(rows) == 2 else smoke.SKIPPED
    print(f"ratio_vs_openclip: {ratio}")


if __name__ == "__main__":
    main()
