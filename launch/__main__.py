"""``python -m launch``: one command for this machine (torchrun) and for Slurm (sbatch), same config.

    python -m launch [train] [--dry-run] [--nproc-per-node N|auto] [hydra overrides...]
        launcher=local (default): validate, then torchrun here (launcher.nodes=N: N torchrun agents
        here, to run multi-node code paths); launcher=slurm: validate, check the partition, write
        <run_dir>/slurm/job.sbatch and submit it (--dry-run: print it, write nothing)
    python -m launch demo  [hydra overrides...]        # README's main job
    python -m launch prep  [--dry-run] [launcher=slurm launcher.nodes=N ...] [data_prep overrides...]
        build a dataset: here (launcher.nodes local workers), or as a Slurm array of N tasks + a merge job
    python -m launch status|cancel RUN_DIR             # a Slurm run's (or dataset's out_dir) job(s)
    python -m launch logs [-f] RUN_DIR                 # the latest job's output
"""
from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import Optional

from pretrain.config import ConfigError

COMMANDS = ("train", "demo", "prep", "status", "cancel", "logs")


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m launch", description="Launch training jobs here (torchrun) or on Slurm.")
    sub = p.add_subparsers(dest="command", required=True)
    for name, help_ in (("train", "validate the config, then torchrun here or submit to Slurm (the default command)"),
                        ("demo", "build the demo dataset, train, evaluate, print the summary")):
        s = sub.add_parser(name, help=help_)
        s.add_argument("--nproc-per-node", default="auto",
                       help="ranks per node (auto: launcher.procs_per_node: one per GPU, or 2 CPU ranks here)")
        if name == "train":
            s.add_argument("--dry-run", action="store_true", help="print the sbatch script / torchrun command; write nothing")
        s.add_argument("overrides", nargs="*", help="hydra overrides, e.g. launcher=slurm steps=100 engine.zero_stage=3")
    s = sub.add_parser("prep", help="build a dataset (python -m data_prep) here or as a Slurm job array plus a merge job")
    s.add_argument("--dry-run", action="store_true", help="print the sbatch scripts / local commands; write nothing")
    s.add_argument("overrides", nargs="*", help="launcher.* overrides for the launcher, the rest for data_prep, "
                                                "e.g. launcher=slurm launcher.nodes=8 out_dir=/data/ds filters=laion")
    for name, help_ in (("status", "state of the run's Slurm job(s)"), ("cancel", "scancel the run's pending/running job(s)"),
                        ("logs", "print the latest job's output file")):
        s = sub.add_parser(name, help=help_)
        if name == "logs":
            s.add_argument("-f", "--follow", action="store_true", help="keep printing as the log grows")
        s.add_argument("run_dir", type=Path)
    # The overrides-only form (`python -m launch launcher=slurm experiment=demo`) means `train`.
    if not argv or (argv[0] not in COMMANDS and argv[0] not in ("-h", "--help")):
        argv = ["train", *argv]
    return p.parse_args(argv)


def train(args: argparse.Namespace) -> int:
    """Compose and validate the config, then run torchrun here or submit to Slurm."""
    from launch.config import compose_train_config
    from launch.launcher_config import LauncherKind
    from launch.local import agent_commands, resolve_nproc, run_torchrun
    from pretrain.data.check import check_inputs

    overrides = list(args.overrides)
    if args.nproc_per_node != "auto":  # the flag is a shorthand for the config field
        overrides.append(f"launcher.procs_per_node={args.nproc_per_node}")
    cfg = compose_train_config(overrides)
    lc = cfg.launcher
    if lc.kind == LauncherKind.local:
        # launcher.nodes > 1: that many torchrun agents here, meeting through a c10d rendezvous.
        nproc = resolve_nproc(lc.procs_per_node)
        cfg.check_world(lc.nodes * nproc)  # fail here, in one line, before any rank starts
        check_inputs(cfg)
        if args.dry_run:  # one line per agent
            print("\n".join(shlex.join(c) for c in agent_commands(lc.nodes, nproc, overrides, rdzv_port=lc.rdzv_port,
                                                                       max_restarts=lc.max_restarts)))
            return 0
        return run_torchrun(nproc, overrides, nodes=lc.nodes, rdzv_port=lc.rdzv_port, max_restarts=lc.max_restarts)

    from launch import slurm

    world = lc.nodes * lc.ranks_per_node()
    if lc.gpus_per_node == 0:
        cfg.check_world(world)  # CPU ranks: the same rules as here
    elif world % cfg.model.moe.ep_size:  # GPU ranks: the Triton checks hold there, not on this login node
        raise ConfigError(f"model.moe.ep_size={cfg.model.moe.ep_size} must divide the world size {world} (ranks)")
    if not lc.container_image:  # inside an image the paths are the container's
        check_inputs(cfg)
    if args.dry_run:
        sys.stdout.write(slurm.render_script(cfg, overrides))
        return 0
    return slurm.submit(cfg, overrides)


def main(argv: Optional[list[str]] = None) -> None:
    args = parse(sys.argv[1:] if argv is None else list(argv))
    try:
        if args.command == "train":
            sys.exit(train(args))
        if args.command == "prep":
            from launch.prep import prep

            sys.exit(prep(args.overrides, dry_run=args.dry_run))
        if args.command == "demo":
            from launch.demo import run_demo
            from launch.local import resolve_nproc

            sys.exit(run_demo(resolve_nproc(args.nproc_per_node), args.overrides))
        from launch import slurm

        if args.command == "status":
            sys.exit(slurm.status(args.run_dir))
        if args.command == "cancel":
            sys.exit(slurm.cancel(args.run_dir))
        sys.exit(slurm.logs(args.run_dir, follow=args.follow))
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
