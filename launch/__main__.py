"""``python -m launch``: start jobs on this machine (Slurm comes in launch/slurm.py, later).

    python -m launch train [--nproc-per-node N|auto] [hydra overrides...]
    python -m launch demo  [hydra overrides...]      # README's main job
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional

from pretrain.config import ConfigError


def main(argv: Optional[list[str]] = None) -> None:
    p = argparse.ArgumentParser(prog="python -m launch", description="Launch training jobs.")
    sub = p.add_subparsers(dest="command", required=True)
    for name, help_ in (("train", "validate the config, then torchrun pretrain.train"),
                        ("demo", "build the demo dataset, train, evaluate, print the summary")):
        s = sub.add_parser(name, help=help_)
        s.add_argument("--nproc-per-node", default="auto", help="ranks on this machine (auto: GPUs, or 2 CPU ranks)")
        s.add_argument("overrides", nargs="*", help="hydra overrides, e.g. steps=100 engine.zero_stage=3")
    args = p.parse_args(argv)

    from launch.config import compose_train_config
    from launch.local import resolve_nproc, run_torchrun

    nproc = resolve_nproc(args.nproc_per_node)
    try:
        if args.command == "demo":
            from launch.demo import run_demo

            sys.exit(run_demo(nproc, args.overrides))
        from pretrain.data.check import check_inputs

        cfg = compose_train_config(args.overrides)
        cfg.check_world(nproc)  # fail here, in one line, before any rank starts
        check_inputs(cfg)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        sys.exit(2)
    sys.exit(run_torchrun(nproc, args.overrides))


if __name__ == "__main__":
    main()
