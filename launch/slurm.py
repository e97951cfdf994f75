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


def node_python(lc: LauncherConfig) -> str:
    if lc.python:
        return lc.python
    # In a container the image's interpreter; outside, this one (the same venv on a shared filesystem).
    return "python" if lc.container_image else sys.executable


def sbatch_line(flag: str, comment: str = "") -> str:
    line = f"#SBATCH --{flag}"
    return f"{line:<38s} # {comment}" if comment else line


def resource_lines(lc: LauncherConfig, name: str, workdir: Path, nodes: int) -> list[str]:
    """The ``#SBATCH`` resources and limits of one job (training: all its nodes; a data_prep array: one task)."""
    lines = [sbatch_line(f"job-name={lc.job_name or name}"),
             sbatch_line(f"nodes={nodes}"),
             sbatch_line("ntasks-per-node=1", "one task per node: torchrun, or one data_prep worker")]
    if lc.gpus_per_node:
        lines.append(sbatch_line(f"gpus-per-node={lc.gpus_per_node}"))
    if lc.cpus_per_task:
        lines.append(sbatch_line(f"cpus-per-task={lc.cpus_per_task}", "for all the node's ranks or processes"))
    else:
        lines.append(sbatch_line("exclusive", "whole nodes: every CPU for the ranks / processes"))
    if lc.mem is not None:
        lines.append(sbatch_line(f"mem={lc.mem}", "per node"))
    for flag, value in (("partition", lc.partition), ("account", lc.account), ("qos", lc.qos)):
        if value:
            lines.append(sbatch_line(f"{flag}={value}"))
    return lines + [sbatch_line(f"time={lc.time}"),
                    sbatch_line(f"chdir={workdir}", "relative paths in the overrides mean what they meant here"),
                    sbatch_line("open-mode=append", "a requeued job keeps writing to the same log"),
                    sbatch_line("export=ALL", "secrets (WANDB_API_KEY, ...) come from your shell, never this file")]


def sbatch_header(lc: LauncherConfig, run_dir: Path, workdir: Path) -> list[str]:
    """The training job's ``#SBATCH`` block: resources, limits, where the output goes, the warning signal."""
    lines = [*resource_lines(lc, run_dir.name, workdir, lc.nodes), sbatch_line(f"output={slurm_dir(run_dir)}/%j.out")]
    if lc.signal_seconds:
        lines += [sbatch_line(f"signal=B:{SIGNAL}@{lc.signal_seconds}", "warn this script before the time limit"),
                  sbatch_line("requeue", "preempted or out of time: back to the queue, same job id")]
    return lines


def container_flags(lc: LauncherConfig, workdir: Path) -> list[str]:
    """srun's pyxis options: the image, the submit directory mounted at its own path, extra mounts."""
    if not lc.container_image:
        return []
    mounts = ",".join([f"{workdir}:{workdir}", *lc.container_mounts])
    return [f"--container-image={_q(lc.container_image)}", f"--container-mounts={_q(mounts)}",
            f"--container-workdir={_q(str(workdir))}"]


def export_lines(title: str, values: dict[str, str]) -> list[str]:
    if not values:
        return []
    return [f"# {title}", *(f"export {k}={_q(v)}" for k, v in sorted(values.items())), ""]


def srun_command(lc: LauncherConfig, workdir: Path, overrides: list[str]) -> list[str]:
    """srun -> (ignore USR1) -> torchrun -> pretrain.train, as one shell command in lines."""
    srun = ["srun", "--nodes=$SLURM_NNODES", "--ntasks-per-node=1", "--ntasks=$SLURM_NNODES",
            '--cpus-per-task="$SLURM_CPUS_ON_NODE"', "--kill-on-bad-exit=1"]
    srun += container_flags(lc, workdir)
    # torchrun itself must survive the time-limit signal (its default action would kill it and
    # with it the ranks): it ignores USR1; the ranks inherit that and install their own handler.
    guard = ["bash", "-c", _q('trap "" USR1; exec "$@"'), "torchrun"]
    torchrun = [_q(node_python(lc)), "-m", "torch.distributed.run", "--nnodes=$SLURM_NNODES",
                f"--nproc_per_node={lc.ranks_per_node()}", "--rdzv_backend=c10d",
                '--rdzv_endpoint="$HEAD:$PORT"', '--rdzv_id="$SLURM_JOB_ID"']
    if lc.max_restarts:  # a failed rank restarts every rank from the last checkpoint, within this allocation
        torchrun.append(f"--max-restarts={lc.max_restarts}")
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
             *export_lines("extra environment (launcher.env)", dict(lc.env)),
             *export_lines("communication backend settings (launcher.backend_env)", dict(lc.backend_env)),
             "# --- rendezvous: every node's torchrun meets the first node of the allocation ---",
             'HEAD=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)',
             f"PORT={port}",
             "# torchrun would set 1 thread per rank; share the task's CPUs between its ranks instead",
             f"export OMP_NUM_THREADS=${{OMP_NUM_THREADS:-$(( SLURM_CPUS_ON_NODE / {nproc} > 0 ? SLURM_CPUS_ON_NODE / {nproc} : 1 ))}}",
             "# a fresh rendezvous store per torchrun restart (launcher.max_restarts; pytorch/pytorch#135712)",
             "export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}",
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
    out = write_job_files(Path(cfg.run_dir).resolve(), {"job.sbatch": render_script(cfg, overrides),
                                                        "config.yaml": OmegaConf.to_yaml(to_dict(cfg))})
    job_id = sbatch(out / "job.sbatch", env=env)
    if job_id is None:
        return 1
    print(job_id)
    print(f"submitted job {job_id}: script {out / 'job.sbatch'}, log {out / (job_id + '.out')}", file=sys.stderr)
    return 0


def write_job_files(run_dir: Path, files: dict[str, str]) -> Path:
    """Write ``files`` into ``<run_dir>/slurm/`` (also where Slurm writes the logs: it must exist first)."""
    out = slurm_dir(run_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (out / name).write_text(text)
    return out


def sbatch(script: Path, *options: str, env: Optional[dict[str, str]] = None) -> Optional[str]:
    """Submit ``script`` (``options`` before it, e.g. a dependency); record the id in ``job_id`` beside it.
    Returns the id, or None after showing sbatch's error verbatim."""
    proc = _run(["sbatch", "--parsable", *options, str(script)], env)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr if proc.stderr.strip() else f"sbatch failed with exit code {proc.returncode}\n")
        return None
    job_id = proc.stdout.strip().split(";")[0]  # --parsable: "id" or "id;cluster"
    with open(script.parent / "job_id", "a") as f:
        f.write(job_id + "\n")
    return job_id


def job_ids(run_dir: Path) -> list[str]:
    path = slurm_dir(run_dir) / "job_id"
    if not path.is_file():
        raise ConfigError(f"{run_dir}: no Slurm job was submitted for this run (no {path})")
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def job_state(job_id: str, env: Optional[dict[str, str]] = None) -> str:
    """PENDING/RUNNING/... from squeue; finished jobs from scontrol while Slurm still remembers them.
    A job array (one id, several tasks) reads as its liveliest task, else its worst outcome."""
    q = _run(["squeue", "--noheader", "--jobs", job_id, "--format=%T"], env)
    states = q.stdout.split() if q.returncode == 0 else []
    if not states:
        s = _run(["scontrol", "show", "job", "--oneliner", job_id], env)
        states = re.findall(r"\bJobState=(\S+)", s.stdout)
    if not states:
        return "UNKNOWN"
    for wanted in ("RUNNING", *sorted(ACTIVE)):
        if wanted in states:
            return wanted
    return next((st for st in states if st != "COMPLETED"), "COMPLETED")


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
    elif (run_dir / "summary.json").is_file() or (run_dir / "report.md").is_file():  # a training / a dataset
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


def log_files(run_dir: Path) -> list[Path]:
    """The newest job's output that exists: ``<id>.out``, or an array's ``<id>_<task>.out`` files
    (a pending merge job has none yet, so its array's logs are shown)."""
    out = slurm_dir(run_dir)
    for job_id in reversed(job_ids(run_dir)):
        files = [out / f"{job_id}.out"] if (out / f"{job_id}.out").is_file() else \
            sorted(out.glob(f"{job_id}_*.out"), key=lambda p: int(p.stem.split("_")[1]))
        if files:
            return files
    return []


def logs(run_dir: Path, follow: bool = False) -> int:
    """Print the latest job's output file(s); ``follow``: keep printing as they grow (tail -F)."""
    files = log_files(run_dir)
    if follow:
        paths = files or [slurm_dir(run_dir) / f"{job_ids(run_dir)[-1]}.out"]
        os.execvp("tail", ["tail", "-n", "+1", "-F", *map(str, paths)])
    if not files:
        print(f"no output yet in {slurm_dir(run_dir)} (the job may still be pending)", file=sys.stderr)
        return 1
    for path in files:
        if len(files) > 1:
            print(f"==> {path.name} <==")
        sys.stdout.write(path.read_text(errors="replace"))
    return 0
