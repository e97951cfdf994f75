"""Slurm: render a readable sbatch script from the config, check it against the cluster, submit, follow.

    python -m launch launcher=slurm experiment=demo launcher.nodes=2 --dry-run   # print the script
    python -m launch launcher=slurm experiment=demo launcher.nodes=2             # submit it
    python -m launch status|cancel|logs [-f] RUN_DIR

A submission leaves ``<run_dir>/slurm/``: ``job.sbatch`` (the script), ``config.yaml`` (the resolved
config), ``job_id`` (one id per line: resubmits append; a requeue keeps its id) and ``<id>.out``.
Inside the job, ``srun`` starts one ``torchrun`` per node; they meet at a c10d rendezvous on the
first node of the allocation. Secrets never enter the script: the job inherits the submitting
shell's environment (``--export=ALL``).
"""
from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from launch.launcher_config import LauncherConfig
from pretrain.config import ConfigError, TrainConfig, to_dict

SIGNAL = "USR1"  # the time-limit warning the trainer listens for


def slurm_dir(run_dir: Path) -> Path:
    return run_dir / "slurm"


def _q(value: str) -> str:
    return shlex.quote(str(value))


def _python(lc: LauncherConfig) -> str:
    if lc.python:
        return lc.python
    # In a container the image's interpreter; outside, this one (the same venv on a shared filesystem).
    return "python" if lc.container_image else sys.executable


def _sbatch(flag: str, comment: str = "") -> str:
    line = f"#SBATCH --{flag}"
    return f"{line:<38s} # {comment}" if comment else line


def sbatch_header(lc: LauncherConfig, run_dir: Path, workdir: Path) -> list[str]:
    """The ``#SBATCH`` block: resources, limits, where the output goes."""
    lines = [_sbatch(f"job-name={lc.job_name or run_dir.name}"),
             _sbatch(f"nodes={lc.nodes}"),
             _sbatch("ntasks-per-node=1", "one torchrun per node; it starts the node's ranks")]
    if lc.gpus_per_node:
        lines.append(_sbatch(f"gpus-per-node={lc.gpus_per_node}"))
    if lc.cpus_per_task:
        lines.append(_sbatch(f"cpus-per-task={lc.cpus_per_task}", "for all the node's ranks and loader workers"))
    else:
        lines.append(_sbatch("exclusive", "whole nodes: every CPU for the ranks and loader workers"))
    if lc.mem is not None:
        lines.append(_sbatch(f"mem={lc.mem}", "per node"))
    for flag, value in (("partition", lc.partition), ("account", lc.account), ("qos", lc.qos)):
        if value:
            lines.append(_sbatch(f"{flag}={value}"))
    lines += [_sbatch(f"time={lc.time}"),
              _sbatch(f"chdir={workdir}", "relative paths in the overrides mean what they meant here"),
              _sbatch(f"output={slurm_dir(run_dir)}/%j.out"),
              _sbatch("open-mode=append", "a requeued job keeps writing to the same log"),
              _sbatch("export=ALL", "secrets (WANDB_API_KEY, ...) come from your shell, never this file")]
    if lc.signal_seconds:
        lines += [_sbatch(f"signal=B:{SIGNAL}@{lc.signal_seconds}", "warn this script before the time limit"),
                  _sbatch("requeue", "preempted or out of time: back to the queue, same job id")]
    return lines


def _exports(title: str, values: dict[str, str]) -> list[str]:
    if not values:
        return []
    return [f"# {title}", *(f"export {k}={_q(v)}" for k, v in sorted(values.items())), ""]


def srun_command(lc: LauncherConfig, workdir: Path, overrides: list[str]) -> list[str]:
    """srun -> (ignore USR1) -> torchrun -> pretrain.train, as one shell command in lines."""
    srun = ["srun", "--nodes=$SLURM_NNODES", "--ntasks-per-node=1", "--ntasks=$SLURM_NNODES",
            '--cpus-per-task="$SLURM_CPUS_ON_NODE"', "--kill-on-bad-exit=1"]
    if lc.container_image:
        mounts = ",".join([f"{workdir}:{workdir}", *lc.container_mounts])
        srun += [f"--container-image={_q(lc.container_image)}", f"--container-mounts={_q(mounts)}",
                 f"--container-workdir={_q(str(workdir))}"]
    # torchrun itself must survive the time-limit signal (its default action would kill it and
    # with it the ranks): it ignores USR1; the ranks inherit that and install their own handler.
    guard = ["bash", "-c", _q('trap "" USR1; exec "$@"'), "torchrun"]
    torchrun = [_q(_python(lc)), "-m", "torch.distributed.run", "--nnodes=$SLURM_NNODES",
                f"--nproc_per_node={lc.ranks_per_node()}", "--rdzv_backend=c10d",
                '--rdzv_endpoint="$HEAD:$PORT"', '--rdzv_id="$SLURM_JOB_ID"']
    train = ["-m", "pretrain.train", *(_q(o) for o in overrides)]
    return [" ".join(srun[:6]), *([" ".join(srun[6:])] if srun[6:] else []), " ".join(guard), " ".join(torchrun), " ".join(train)]


def render_script(cfg: TrainConfig, overrides: list[str], workdir: Optional[Path] = None) -> str:
    """The whole sbatch script for ``cfg`` (launcher=slurm); ``overrides`` go to pretrain.train as given."""
    lc = cfg.launcher
    workdir = (workdir or Path.cwd()).resolve()
    run_dir = (workdir / cfg.run_dir).resolve()
    nproc = lc.ranks_per_node()
    port = str(lc.rdzv_port) if lc.rdzv_port else "$(( 20000 + SLURM_JOB_ID % 20000 ))"
    cmd = srun_command(lc, workdir, overrides)
    lines = ["#!/bin/bash",
             f"# Rendered by `python -m launch` for run {run_dir}",
             f"# {lc.nodes} node(s) x {nproc} rank(s); resolved config: {slurm_dir(run_dir)}/config.yaml",
             "",
             "# --- resources and limits ---",
             *sbatch_header(lc, run_dir, workdir),
             "",
             "set -eu",
             "",
             *_exports("extra environment (launcher.env)", dict(lc.env)),
             *_exports("communication backend settings (launcher.backend_env)", dict(lc.backend_env)),
             "# --- rendezvous: every node's torchrun meets the first node of the allocation ---",
             'HEAD=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)',
             f"PORT={port}",
             "# torchrun would set 1 thread per rank; share the task's CPUs between its ranks instead",
             f"export OMP_NUM_THREADS=${{OMP_NUM_THREADS:-$(( SLURM_CPUS_ON_NODE / {nproc} > 0 ? SLURM_CPUS_ON_NODE / {nproc} : 1 ))}}",
             'echo "job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $SLURM_JOB_NODELIST; rendezvous $HEAD:$PORT"',
             ""]
    if lc.signal_seconds:
        lines += [f"# --- time limit / preemption: Slurm sends {SIGNAL} here {lc.signal_seconds}s before the end;",
                  "# pass it to the ranks (srun forwards it), which checkpoint and requeue the job ---",
                  f'forward() {{ echo "{SIGNAL}: time limit near, telling the ranks"; kill -{SIGNAL} "$SRUN_PID" 2>/dev/null || true; }}',
                  f"trap forward {SIGNAL}",
                  ""]
    lines += ["# --- one torchrun per node, each starting its ranks of pretrain.train ---",
              " \\\n    ".join(cmd) + " &",
              "SRUN_PID=$!",
              "# `wait` returns early when a signal arrives (so the trap runs); wait again for the real exit",
              'while true; do wait "$SRUN_PID" && status=0 || status=$?',
              '  kill -0 "$SRUN_PID" 2>/dev/null || break; done',
              'exit "$status"',
              ""]
    return "\n".join(lines)


# ---- checks against the cluster (only when submitting: --dry-run works without Slurm) ----

def _run(cmd: list[str], env: Optional[dict[str, str]] = None) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, env=env)


def _need(tool: str) -> None:
    if shutil.which(tool) is None:
        raise ConfigError(f"launcher=slurm needs Slurm's `{tool}` on PATH (not found): run this on a login node")


@dataclass
class Partition:
    name: str
    nodes: int  # usable by one job: min(TotalNodes, MaxNodes)
    gpus_per_node: int  # the most any of its nodes has
    cpus_per_node: int


def _gpus(gres: str) -> int:
    """``gpu:8``, ``gpu:a100:4(S:0-1)``, ``gpu:2,shard:8`` -> GPUs of one node (0 for ``(null)``)."""
    total = 0
    for item in gres.split(","):
        m = re.match(r"^gpu(?::[^:()]+)?:(\d+)", item.strip())
        total += int(m.group(1)) if m else 0
    return total


def partition_info(name: Optional[str], env: Optional[dict[str, str]] = None) -> Partition:
    """The partition's size from ``scontrol show partition`` and ``sinfo``; unknown -> ConfigError."""
    proc = _run(["scontrol", "show", "partition", "--oneliner", *([name] if name else [])], env)
    records = [dict(kv.split("=", 1) for kv in line.split() if "=" in kv) for line in proc.stdout.splitlines() if line.strip()]
    if name is None:
        records = [r for r in records if r.get("Default") == "YES"]
        if not records:
            raise ConfigError("launcher.partition is not set and the cluster has no default partition: set one")
    if proc.returncode != 0 or not records:
        known = _run(["sinfo", "--noheader", "--format=%R"], env).stdout.split()
        raise ConfigError(f"launcher.partition={name}: no such partition (this cluster has: {', '.join(sorted(set(known))) or 'none'})")
    rec = records[0]
    part = rec["PartitionName"]
    total = int(rec.get("TotalNodes", "0"))
    max_nodes = rec.get("MaxNodes", "UNLIMITED")
    usable = total if max_nodes == "UNLIMITED" else min(total, int(max_nodes))
    rows = _run(["sinfo", "--noheader", f"--partition={part}", "--format=%G|%c"], env).stdout.splitlines()
    gpus = max((_gpus(r.split("|")[0]) for r in rows if "|" in r), default=0)
    cpus = max((int(r.split("|")[1].rstrip("+")) for r in rows if "|" in r and r.split("|")[1].rstrip("+").isdigit()), default=0)
    return Partition(part, usable, gpus, cpus)


def check_cluster(lc: LauncherConfig, env: Optional[dict[str, str]] = None) -> Partition:
    """Fail before submission, in one line, for what the cluster cannot give this job."""
    for tool in ("sbatch", "scontrol", "sinfo"):
        _need(tool)
    part = partition_info(lc.partition, env)
    where = f"partition {part.name}"
    if lc.nodes > part.nodes:
        raise ConfigError(f"launcher.nodes={lc.nodes} is more than {where} gives one job ({part.nodes} node(s))")
    if lc.gpus_per_node > part.gpus_per_node:
        raise ConfigError(f"launcher.gpus_per_node={lc.gpus_per_node} is more than the {part.gpus_per_node} GPU(s) "
                          f"of a node in {where}" + (" (set launcher.gpus_per_node=0 for a CPU job)" if not part.gpus_per_node else ""))
    if part.cpus_per_node and lc.cpus_per_task > part.cpus_per_node:
        raise ConfigError(f"launcher.cpus_per_task={lc.cpus_per_task} is more than the {part.cpus_per_node} CPU(s) of a node in {where}")
    if lc.container_image:
        check_container(lc.container_image, env)
    return part


def _is_file_image(image: str) -> bool:
    return image.startswith(("/", "./", "../", "~")) or image.endswith((".sqsh", ".squashfs"))


def check_container(image: str, env: Optional[dict[str, str]] = None) -> None:
    """A local image file must exist; pyxis must have added --container-image to srun."""
    if _is_file_image(image) and not Path(image).expanduser().is_file():
        raise ConfigError(f"launcher.container_image={image}: no such image file")
    _need("srun")
    if "--container-image" not in _run(["srun", "--help"], env).stdout:
        raise ConfigError(f"launcher.container_image={image} needs the pyxis plugin, but this cluster's srun "
                          "has no --container-image option (unset launcher.container_image to run without a container)")


# ---- submit and follow ----

def submit(cfg: TrainConfig, overrides: list[str], env: Optional[dict[str, str]] = None) -> int:
    """Check, write job.sbatch + config.yaml, sbatch, record the id. Returns the exit code."""
    from omegaconf import OmegaConf

    check_cluster(cfg.launcher, env)
    script = render_script(cfg, overrides)
    out = slurm_dir(Path(cfg.run_dir).resolve())
    out.mkdir(parents=True, exist_ok=True)  # also where Slurm writes %j.out: it must exist first
    (out / "job.sbatch").write_text(script)
    (out / "config.yaml").write_text(OmegaConf.to_yaml(to_dict(cfg)))
    proc = _run(["sbatch", "--parsable", str(out / "job.sbatch")], env)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr if proc.stderr.strip() else f"sbatch failed with exit code {proc.returncode}\n")
        return proc.returncode
    job_id = proc.stdout.strip().split(";")[0]  # --parsable: "id" or "id;cluster"
    with open(out / "job_id", "a") as f:
        f.write(job_id + "\n")
    print(job_id)
    print(f"submitted job {job_id}: script {out / 'job.sbatch'}, log {out / (job_id + '.out')}", file=sys.stderr)
    return 0


def job_ids(run_dir: Path) -> list[str]:
    path = slurm_dir(run_dir) / "job_id"
    if not path.is_file():
        raise ConfigError(f"{run_dir}: no Slurm job was submitted for this run (no {path})")
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def job_state(job_id: str, env: Optional[dict[str, str]] = None) -> str:
    """PENDING/RUNNING/... from squeue; finished jobs from scontrol while Slurm still remembers them."""
    q = _run(["squeue", "--noheader", "--jobs", job_id, "--format=%T"], env)
    if q.returncode == 0 and q.stdout.strip():
        return q.stdout.split()[0]
    s = _run(["scontrol", "show", "job", "--oneliner", job_id], env)
    m = re.search(r"\bJobState=(\S+)", s.stdout)
    return m.group(1) if m else "UNKNOWN"


ACTIVE = {"PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED", "RESIZING", "SUSPENDED", "REQUEUE_HOLD", "REQUEUE_FED"}


def status(run_dir: Path, env: Optional[dict[str, str]] = None) -> int:
    """One line per recorded job, then the run's state (finished: summary.json exists)."""
    ids = job_ids(run_dir)
    states = {i: job_state(i, env) for i in ids}
    for i in ids:
        print(f"job {i}: {states[i]}")
    latest = states[ids[-1]]
    if latest in ACTIVE:
        run = latest.lower()
    elif (run_dir / "summary.json").is_file():
        run = "finished"
    else:
        run = f"stopped ({latest.lower()}), no summary.json: see `python -m launch logs {run_dir}`"
    print(f"run: {run}")
    return 0


def cancel(run_dir: Path, env: Optional[dict[str, str]] = None) -> int:
    active = [i for i in job_ids(run_dir) if job_state(i, env) in ACTIVE]
    if not active:
        print("nothing to cancel: no job of this run is pending or running")
        return 0
    proc = _run(["scancel", *active], env)
    sys.stderr.write(proc.stderr)
    if proc.returncode == 0:
        print(f"cancelled job(s) {' '.join(active)}")
    return proc.returncode


def logs(run_dir: Path, follow: bool = False) -> int:
    """Print the latest job's output file; ``follow``: keep printing as it grows (tail -F)."""
    path = slurm_dir(run_dir) / f"{job_ids(run_dir)[-1]}.out"
    if follow:
        os.execvp("tail", ["tail", "-n", "+1", "-F", str(path)])
    if not path.is_file():
        print(f"no output yet: {path} (the job may still be pending)", file=sys.stderr)
        return 1
    sys.stdout.write(path.read_text(errors="replace"))
    return 0
