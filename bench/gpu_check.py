"""The GPU path in one prepared run (``./run gpu-check``): tests, every experiment, kernels, MFU; one table.

    ./run gpu-check [--data DATA_ROOT] [--steps 30]     # on one CUDA GPU, under 8 minutes
    .venv/bin/python bench/gpu_check.py --smoke --data DATA_ROOT   # CPU, seconds: the plumbing only

What it runs, in order, each a row of the table:

1. ``pytest -m gpu``: the tests marked ``gpu`` (skipped everywhere else).
2. Every ``conf/experiment/*.yaml`` trained for ``--steps`` steps under torchrun, 1 process, with the
   backend the machine has (NCCL on CUDA), bf16, evaluation at the end (retrieval on the data's
   held-out split; Fashion-MNIST zero-shot where its Debian package is installed): the path a new
   GPU user takes, where a host tensor in a collective or an eval op fails (tests/pretrain/
   test_device_placement.py checks the same on CPU with a stand-in accelerator).
3. The Triton kernels against their PyTorch references at 16k and 64k: the softmax and sigmoid
   contrastive losses (loss and both feature gradients, fp32 features) and the MoE router
   (64k tokens x 32 experts, top-2, 4 groups: expert choices, slots, gates, logit gradients).
4. MFU of ``size=vit_b16`` CLIP in bf16 (weights and inputs bf16, as DeepSpeed's bf16 mode holds
   them): forward + backward on one GPU, model FLOPs (``flops_per_sample``) over the datasheet peak
   (``pretrain.throughput``). Synthetic inputs: this measures the model, not the loader.

The last line is ``gpu_check: N/M ok``. Record the table in BENCHMARKS.md with the machine.

``--smoke`` runs the same code on CPU at tiny sizes (no pytest, one experiment for 2 steps over gloo,
kernels under ``TRITON_INTERPRET=1`` at 96 rows and 64 tokens, MFU of ``size=tiny_test``) so the
suite keeps the script working.

On a machine without package registries (the lent GPU machines), run it with a Python that has
this project's requirements (e.g. carried wheels on PYTHONPATH) and a dataset built elsewhere
(``--data``: a folder written by ``python -m data_prep build``).
"""
from __future__ import annotations

import os
import sys

if "--smoke" in sys.argv:  # the interpreter must be chosen before triton is first imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Callable  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script: the project's packages without an install

import smoke  # noqa: E402
from launch.local import rank_env, torchrun_command  # noqa: E402

DATA = ROOT / "runs" / "demo" / "data"
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


@dataclass
class Row:
    check: str
    ok: bool
    detail: str
    seconds: float


def timed(check: str, fn: Callable[[], tuple[bool, str]]) -> Row:
    """Run one check; an exception is a failed row, not the end of the table."""
    t0 = time.perf_counter()
    try:
        ok, detail = fn()
    except Exception as e:  # noqa: BLE001: every failure is reported in the table
        ok, detail = False, f"{type(e).__name__}: {e}"[:300]
    return Row(check, ok, detail, time.perf_counter() - t0)


# -- 1. the gpu tests ------------------------------------------------------------------------------
def gpu_tests() -> tuple[bool, str]:
    proc = subprocess.run([sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "tests"],
                          cwd=ROOT, capture_output=True, text=True)
    counts = dict((k, int(n)) for n, k in re.findall(r"(\d+) (passed|failed|skipped|error|deselected)", proc.stdout))
    ok = proc.returncode in (0, 5) and not counts.get("failed") and not counts.get("error")
    return ok, ", ".join(f"{n} {k}" for k, n in counts.items()) or proc.stdout.strip()[-200:]


# -- 2. every experiment ---------------------------------------------------------------------------
def experiments() -> list[str]:
    return sorted(p.stem for p in (ROOT / "conf" / "experiment").glob("*.yaml"))


def train(experiment: str, data: Path, steps: int, out: Path, smoke: bool) -> tuple[bool, str]:
    run_dir = out / experiment
    overrides = [f"experiment={experiment}", f"run_dir={run_dir}", f"data.root={data}", f"steps={steps}",
                 f"log_every={max(1, steps // 3)}", f"optim.warmup_steps={max(1, steps // 10)}", "engine.precision=bf16",
                 "wandb.mode=disabled", "eval.every=0", f"checkpoint.every={steps + 1}", "checkpoint.resume=none"]
    if smoke:
        overrides += ["size=tiny_test", "data.batch_size=8", "eval.zeroshot.0.limit=100"]
    if not FASHION_MNIST.is_dir():
        overrides.append("eval.zeroshot=[]")
    proc = subprocess.run(torchrun_command(1, overrides), cwd=ROOT, env=rank_env(1), capture_output=True, text=True)
    if proc.returncode != 0:
        return False, f"exit {proc.returncode}: " + (proc.stderr or proc.stdout).strip().splitlines()[-1][:250]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in rows if "train/loss" in r][-1]
    final = json.loads((run_dir / "summary.json").read_text())
    evals = {k.split("/", 2)[-1]: v for k, v in final.items() if k.endswith(("top1", "image_to_text_r1"))}
    ok = math.isfinite(last["train/loss"]) and bool(evals)
    return ok, (f"loss {last['train/loss']:.3f} | {last['train/samples_per_sec']:.0f} samples/s | "
                f"mfu {100 * last['train/mfu']:.1f}% | " + " ".join(f"{k} {v:.3f}" for k, v in sorted(evals.items())))


# -- 3. the kernels against their references -------------------------------------------------------
def features(batch: int, dim: int, device: torch.device) -> list[torch.Tensor]:
    """Unit-norm image and text features (text = image + noise: positives stand out), scale, bias."""
    g = torch.Generator(device=device).manual_seed(0)
    img = F.normalize(torch.randn(batch, dim, device=device, generator=g), dim=-1)  # (B, D)
    txt = F.normalize(img + torch.randn(batch, dim, device=device, generator=g), dim=-1)  # (B, D)
    scalars = [torch.tensor(1 / 0.07, device=device), torch.tensor(-10.0, device=device)]
    return [x.requires_grad_() for x in (img, txt, *scalars)]


def loss_kernel(kind: str, batch: int, dim: int, device: torch.device) -> tuple[bool, str]:
    """Triton vs naive: the loss and the gradient of both feature sets, relative to their size."""
    from pretrain.losses.contrastive import cross_entropy_fn, sigmoid_fn

    def run(impl: str) -> tuple[torch.Tensor, list[torch.Tensor], float]:
        inputs = features(batch, dim, device)
        img, txt, scale, bias = inputs
        labels = torch.arange(batch, device=device)  # (B,) the diagonal pairs
        t0 = time.perf_counter()
        if kind == "softmax":
            loss = cross_entropy_fn(impl)(img, txt, scale, labels, labels, 0.5, 0.5)
        else:
            loss = sigmoid_fn(impl)(img, txt, scale, bias, labels)
        grads = torch.autograd.grad(loss, [img, txt])
        if device.type == "cuda":
            torch.cuda.synchronize()
        return loss.detach(), [g.detach() for g in grads], time.perf_counter() - t0

    run("triton")  # compiles the kernels: not timed
    loss_t, grads_t, sec_t = run("triton")
    loss_n, grads_n, sec_n = run("naive")
    loss_err = abs(loss_t.item() - loss_n.item()) / max(abs(loss_n.item()), 1e-12)
    grad_err = max(((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item() for a, b in zip(grads_t, grads_n))
    ok = loss_err < 1e-4 and grad_err < 1e-3
    return ok, (f"rel err loss {loss_err:.1e} grad {grad_err:.1e} | "
                f"{1e3 * sec_t:.1f} ms vs naive {1e3 * sec_n:.1f} ms")


def router_kernel(tokens: int, experts: int, device: torch.device) -> tuple[bool, str]:
    from pretrain.kernels.router import route_reference, route_triton

    g = torch.Generator(device=device).manual_seed(0)
    logits = torch.randn(tokens, experts, device=device, generator=g)  # (T, E)
    groups = torch.randint(0, 4, (tokens,), device=device, generator=g)  # (T,)
    probe = torch.randn(tokens, 2, device=device, generator=g)  # (T, k) weights the gates' gradient
    out = {}
    for name, fn in (("triton", route_triton), ("torch", route_reference)):
        x = logits.clone().requires_grad_()
        r = fn(x, 2, groups, 4)
        (r.gates * probe).sum().backward()
        out[name] = (r, x.grad)
    (rt, gt), (rr, gr) = out["triton"], out["torch"]
    same_index = (rt.expert_index == rr.expert_index).float().mean().item()
    same_slot = (rt.position == rr.position).float().mean().item()
    gate_err = (rt.gates - rr.gates).abs().max().item()
    grad_err = ((gt - gr).abs().max() / gr.abs().max()).item()
    ok = same_index == 1.0 and same_slot == 1.0 and gate_err < 1e-5 and grad_err < 1e-4
    return ok, f"same expert {100 * same_index:.2f}% slot {100 * same_slot:.2f}% | gate err {gate_err:.1e} grad {grad_err:.1e}"


# -- 4. MFU ----------------------------------------------------------------------------------------
def mfu(size: str, batch: int, device: torch.device, steps: int) -> tuple[bool, str]:
    from launch.config import compose_train_config
    from pretrain.models import build_model
    from pretrain.task import build_task
    from pretrain.throughput import device_peak_tflops

    cfg = compose_train_config([f"size={size}", "model=clip"])
    cfg.model.text.vocab_size = 49408  # OpenAI CLIP's BPE vocabulary: the published model's table
    dtype = torch.bfloat16
    task = build_task(cfg, build_model(cfg.model, eos_id=3)).to(device, dtype)
    n = cfg.model.vision.image_size
    images = torch.randn(batch, 3, n, n, device=device, dtype=dtype)  # (B, 3, H, W)
    tokens = torch.randint(4, 49408, (batch, cfg.model.text.context_length), device=device)  # (B, L)
    tokens[:, -1] = 3  # eos

    def step() -> None:
        task(images, tokens)["loss"].backward()
        task.zero_grad(set_to_none=True)

    for _ in range(2):  # warm-up: kernels chosen, allocator filled
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - t0) / steps
    achieved = 3 * task.model.flops_per_sample() * batch / seconds / 1e12  # TFLOP/s: forward + backward
    peak = device_peak_tflops(device, bf16=True)
    return True, f"{100 * achieved / peak:.1f}% ({achieved:.1f} of {peak:.1f} TFLOP/s) at batch {batch}, {1e3 * seconds:.0f} ms/step"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", type=Path, default=DATA, help="dataset root for the training runs (train/, heldout/, tokenizer)")
    p.add_argument("--steps", type=int, default=30, help="training steps per experiment")
    a = smoke.parse_args(p, {}, "CPU, seconds, checks the script works: tiny sizes, one experiment, kernels interpreted")
    cuda = torch.cuda.is_available()
    if not cuda and not a.smoke:
        sys.exit("gpu-check needs a CUDA GPU (use --smoke to check the script on CPU)")
    device = torch.device("cuda" if cuda else "cpu")
    name = torch.cuda.get_device_name() if cuda else "CPU (smoke)"
    print(f"gpu-check on {name} | torch {torch.__version__} | data {a.data}", flush=True)
    steps = 2 if a.smoke else a.steps
    big = (96,) if a.smoke else (16384, 65536)  # rows of the loss checks (smoke: not a tile multiple)
    # The smoke leaves the suite's own gpu tests to the suite (it is run by it).
    rows = [Row("gpu tests", True, "not run (smoke)", 0.0) if a.smoke else timed("gpu tests", gpu_tests)]
    with tempfile.TemporaryDirectory(prefix="gpu_check-") as tmp:
        if not (a.data / "train" / "manifest.json").is_file():
            rows.append(Row("train experiments", False, f"no dataset at {a.data}: build one (python -m data_prep build) "
                            "and pass --data", 0.0))
        else:
            for exp in (["demo"] if a.smoke else experiments()):
                rows.append(timed(f"train {exp} ({steps} steps, bf16)", lambda e=exp: train(e, a.data.resolve(), steps, Path(tmp), a.smoke)))
    for kind in ("softmax", "sigmoid"):
        for b in big:
            rows.append(timed(f"triton {kind} loss {b}", lambda k=kind, b=b: loss_kernel(k, b, 32 if a.smoke else 512, device)))
    tokens = 64 if a.smoke else 65536
    rows.append(timed(f"triton router {tokens}x32 top-2", lambda: router_kernel(tokens, 32, device)))
    size, batch = ("tiny_test", 8) if a.smoke else ("vit_b16", 128)
    rows.append(timed(f"mfu {size} clip bf16", lambda: mfu(size, batch, device, 2 if a.smoke else 10)))

    width = max(len(r.check) for r in rows)
    print(f"\n{'check':<{width}}  {'result':<6}  {'s':>6}  detail")
    for r in rows:
        print(f"{r.check:<{width}}  {'ok' if r.ok else 'FAIL':<6}  {r.seconds:>6.1f}  {r.detail}")
    print(f"gpu_check: {sum(r.ok for r in rows)}/{len(rows)} ok")
    sys.exit(0 if all(r.ok for r in rows) else 1)


if __name__ == "__main__":
    main()
