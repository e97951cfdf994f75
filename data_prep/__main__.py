"""Command line of the dataset builder.

``python -m data_prep build [key=value ...]``    everything: plan, this worker's units, merge (worker 0)
``python -m data_prep plan [key=value ...]``     only list the units (run once before a job array)
``python -m data_prep process [key=value ...]``  only this worker's units (``workers.rank/world`` or env)
``python -m data_prep merge [key=value ...]``    only the merge, once every unit is done
``python -m data_prep index DIR``                a manifest for shards built elsewhere (img2dataset)

Overrides are hydra's (``conf/prep.yaml``); ``--cfg`` prints the resolved config.
"""
from __future__ import annotations

import argparse
import sys
import time

from omegaconf import OmegaConf

from data_prep import PrepError
from data_prep.manifest import ManifestError

PHASES = ("build", "plan", "process", "merge")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m data_prep", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    for phase in PHASES:
        b = sub.add_parser(phase, help=f"{phase} (see below)")
        b.add_argument("overrides", nargs="*", help="hydra overrides, e.g. out_dir=/tmp/data filters=wukong")
        b.add_argument("--cfg", action="store_true", help="print the resolved config and exit")
    i = sub.add_parser("index", help="write manifest.json for existing shards (e.g. from img2dataset)")
    i.add_argument("dir", help="folder holding the *.tar shards")
    i.add_argument("--split", default="train", help="split name recorded in the manifest (default: train)")
    i.add_argument("--force", action="store_true", help="replace an existing manifest.json")
    i.add_argument("--samples-only", action="store_true",
                   help="keep an existing manifest.json and add the shards' sample offset indexes (O(1) resume)")
    return p


def run_phase(phase: str, overrides: list[str], show_cfg: bool) -> None:
    from data_prep.config import load_config, to_dict

    cfg = load_config(overrides)  # validated before anything heavy is imported or done
    if show_cfg:
        print(OmegaConf.to_yaml(to_dict(cfg)), end="")
        return
    from data_prep import build as b

    if phase == "build":
        b.build(cfg)
        return
    plan, rank, world = b.prepare(cfg)
    if phase == "plan":
        print(f"planned {len(plan.units)} units in {cfg.out_dir}/.work/plan.json")
    elif phase == "process":
        mine = plan.mine(rank, world)
        executor, counter = b.open_pool(cfg, len(mine))
        try:
            done = b.process(cfg, plan, mine, (executor, counter))
        finally:
            if executor is not None:
                executor.shutdown()
        print(f"worker {rank}/{world}: processed {len(done)} units")
    else:
        b.merge(cfg, plan, time.perf_counter())


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command in PHASES:
            run_phase(args.command, args.overrides, args.cfg)
        else:
            from data_prep.index import write_index

            m = write_index(args.dir, split=args.split, force=args.force, samples_only=args.samples_only)
            print(f"indexed {len(m.shards)} shards, {m.total_samples} samples -> {m.root / 'manifest.json'}")
    except (PrepError, ManifestError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
