"""``python -m launch prep``: build a dataset here or as a Slurm job array, with the training's launcher config.

    python -m launch prep [--dry-run] [launcher=slurm] [launcher.KEY=VALUE ...] [data_prep overrides ...]

Overrides whose key is ``launcher`` or ``launcher.*`` configure the launcher (``conf/launcher/``,
exactly as for training); every other override goes to ``python -m data_prep`` (``conf/prep.yaml``).

``launcher=local``: ``launcher.nodes`` workers of ``python -m data_prep build`` here (one by default);
worker 0 merges once every unit is done.

``launcher=slurm``: a job array of ``launcher.nodes`` tasks, each one node (or ``launcher.cpus_per_task``
CPUs of one), runs ``python -m data_prep process`` on its share of the units (task 0 writes the plan
the others wait for). A merge job, held until every task has succeeded (``--dependency=afterok``),
writes the shards, manifests, decisions, tokenizer and report. A preempted task is requeued and skips
the units it had finished; a failed task cancels the merge (``--kill-on-invalid-dep``), and
resubmitting the same command resumes. Everything stays under ``out_dir``: ``<out_dir>/slurm/`` holds
``array.sbatch``, ``merge.sbatch``, ``config.yaml`` (launcher and resolved dataset config), ``job_id``
(array, then merge) and the logs ``<array>_<task>.out``, ``<merge>.out``; ``python -m launch
status|cancel|logs OUT_DIR`` follow it.

CPU-only filters need no GPU: pass ``launcher.gpus_per_node=0`` (``conf/launcher/slurm.yaml`` asks for 8).
"""
from __future__ import annotations

import dataclasses
import os
import shlex
import sys
from pathlib import Path
from typing import Optional

from launch import slurm
from launch.launcher_config import LauncherConfig, LauncherKind
from launch.local import run_agents
from pretrain.config import ConfigError

WORKER_KEYS = ("workers.rank", "workers.world")  # set by the launcher: one worker per array task / local worker


def _key(override: str) -> str:
    return override.lstrip("+~").split("=", 1)[0]


def split_overrides(overrides: list[str]) -> tuple[list[str], list[str]]:
    """``(launcher overrides, data_prep overrides)``."""
    mine = [o for o in overrides if _key(o) == "launcher" or _key(o).startswith("launcher.")]
    return mine, [o for o in overrides if o not in mine]


def compose_launcher(overrides: list[str]) -> LauncherConfig:
    """The launcher config as a training would get it from the same overrides (same files, same checks)."""
    from launch.config import compose_train_config

    return compose_train_config(overrides).launcher


def _prep_config(overrides: list[str]):  # -> data_prep.config.PrepConfig
    from data_prep.config import ConfigError as PrepConfigError
    from data_prep.config import load_config

    taken = [o for o in overrides if _key(o) in WORKER_KEYS]
    if taken:
        raise ConfigError(f"{', '.join(taken)}: the launcher sets each worker's share; choose the number of workers "
                          "with launcher.nodes=N instead")
    try:
        return load_config(overrides)
    except PrepConfigError as e:
        raise ConfigError(str(e)) from e


def _script(lc: LauncherConfig, out_dir: Path, workdir: Path, about: list[str], sbatch: list[str],
            echo: str, phase: list[str]) -> str:
    """One sbatch script: what it is, one task's resources plus ``sbatch`` lines, then one data_prep phase."""
    srun = ["srun", "--ntasks=1", *slurm.container_flags(lc, workdir)]
    return "\n".join(["#!/bin/bash",
                      f"# Rendered by `python -m launch prep` for dataset {out_dir}",
                      *about,
                      "",
                      "# --- resources and limits, per task ---",
                      *slurm.resource_lines(lc, out_dir.name, workdir, nodes=1),
                      *sbatch,
                      "",
                      "set -eu",
                      *slurm.export_lines("extra environment (launcher.env)", dict(lc.env)),
                      # Progress bars redraw with carriage returns; in a log file one line every 30 s reads better.
                      "export TQDM_MININTERVAL=${TQDM_MININTERVAL:-30}",
                      f'echo "{echo}, restart ${{SLURM_RESTART_COUNT:-0}}, on $(hostname)"',
                      " ".join([*srun, shlex.quote(slurm.node_python(lc)), "-m", "data_prep", *phase]),
                      ""])


def render_scripts(lc: LauncherConfig, overrides: list[str], out_dir: Path, workdir: Path) -> dict[str, str]:
    """``{"array.sbatch": ..., "merge.sbatch": ...}`` for ``overrides`` (data_prep's, passed on as given)."""
    sdir = slurm.slurm_dir(out_dir)
    args = " ".join(shlex.quote(o) for o in overrides)
    tasks = lc.nodes
    array = _script(lc, out_dir, workdir,
                    [f"# {tasks} array task(s), each one worker of `data_prep process`; then merge.sbatch (held until all succeed)"],
                    [slurm.sbatch_line(f"array=0-{tasks - 1}", "task i processes units i, i+N, i+2N, ..."),
                     slurm.sbatch_line(f"output={sdir}/%A_%a.out"),
                     slurm.sbatch_line("requeue", "preempted: back to the queue; finished units are skipped")],
                    "task $SLURM_ARRAY_TASK_ID of $SLURM_ARRAY_TASK_COUNT, job $SLURM_JOB_ID",
                    ["process", args, f"workers.rank=$SLURM_ARRAY_TASK_ID workers.world={tasks}"])
    merge = _script(lc, out_dir, workdir,
                    ["# The merge: shards, manifests, decisions, tokenizer and report from every task's units",
                     "# (submitted with --dependency=afterok:<array job> --kill-on-invalid-dep=yes)"],
                    [slurm.sbatch_line(f"output={sdir}/%j.out"),
                     slurm.sbatch_line("requeue", "preempted: back to the queue; the merge starts over")],
                    "merge job $SLURM_JOB_ID", ["merge", args])
    return {"array.sbatch": array, "merge.sbatch": merge}


def submit(lc: LauncherConfig, overrides: list[str], cfg, workdir: Path, env: Optional[dict[str, str]] = None) -> int:
    """Check the partition, write the scripts and config, submit the array then the merge behind it."""
    from omegaconf import OmegaConf

    from data_prep.config import to_dict

    slurm.check_cluster(dataclasses.replace(lc, nodes=1), env)  # each task is one node; the array may queue
    out_dir = (workdir / cfg.out_dir).resolve()
    config = {"launcher": dataclasses.asdict(lc), "prep": to_dict(cfg)}
    config["launcher"]["kind"] = lc.kind.value
    out = slurm.write_job_files(out_dir, {**render_scripts(lc, overrides, out_dir, workdir),
                                          "config.yaml": OmegaConf.to_yaml(config)})
    array_id = slurm.sbatch(out / "array.sbatch", env=env)
    if array_id is None:
        return 1
    merge_id = slurm.sbatch(out / "merge.sbatch", f"--dependency=afterok:{array_id}", "--kill-on-invalid-dep=yes", env=env)
    if merge_id is None:
        print(f"the array (job {array_id}) is queued but the merge was not: submit it once this is fixed with\n"
              f"  sbatch --dependency=afterok:{array_id} --kill-on-invalid-dep=yes {out / 'merge.sbatch'}", file=sys.stderr)
        return 1
    print(f"{array_id} {merge_id}")
    print(f"submitted array {array_id} ({lc.nodes} task(s)) and merge {merge_id}: scripts and logs in {out}; "
          f"follow with `python -m launch status {out_dir}`", file=sys.stderr)
    return 0


def local_commands(workers: int, overrides: list[str]) -> list[list[str]]:
    """One ``data_prep build`` per local worker (worker 0 merges once every unit is done)."""
    base = [sys.executable, "-m", "data_prep", "build", *overrides]
    if workers == 1:
        return [base]
    return [[*base, f"workers.rank={r}", f"workers.world={workers}"] for r in range(workers)]


def prep(overrides: list[str], dry_run: bool = False, workdir: Optional[Path] = None) -> int:
    """``python -m launch prep``: validate both configs, then build here or submit to Slurm."""
    launcher_overrides, prep_overrides = split_overrides(overrides)
    lc = compose_launcher(launcher_overrides)
    cfg = _prep_config(prep_overrides)  # fail here, in one line, before anything is submitted
    workdir = (workdir or Path.cwd()).resolve()
    if lc.kind == LauncherKind.local:
        commands = local_commands(lc.nodes, prep_overrides)
        if dry_run:
            print("\n".join(shlex.join(c) for c in commands))
            return 0
        # As torchrun agents: a failing worker stops the others (worker 0 would otherwise wait for its units).
        return run_agents(commands, dict(os.environ))
    if dry_run:
        scripts = render_scripts(lc, prep_overrides, (workdir / cfg.out_dir).resolve(), workdir)
        sys.stdout.write(scripts["array.sbatch"] + "\n# ===== merge.sbatch =====\n" + scripts["merge.sbatch"])
        return 0
    return submit(lc, prep_overrides, cfg, workdir)
