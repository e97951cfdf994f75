"""Command line: ``python -m data_prep build [key=value ...]`` and ``python -m data_prep index DIR``."""
from __future__ import annotations

import argparse
import sys

from omegaconf import OmegaConf

from data_prep import PrepError
from data_prep.manifest import ManifestError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m data_prep", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="build the dataset described by conf/prep.yaml + overrides")
    b.add_argument("overrides", nargs="*", help="hydra overrides, e.g. out_dir=/tmp/data sources.tuxpaint.limit=100")
    b.add_argument("--cfg", action="store_true", help="print the resolved config and exit")
    i = sub.add_parser("index", help="write manifest.json for existing shards (e.g. from img2dataset)")
    i.add_argument("dir", help="folder holding the *.tar shards")
    i.add_argument("--split", default="train", help="split name recorded in the manifest (default: train)")
    i.add_argument("--force", action="store_true", help="replace an existing manifest.json")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "build":
            from data_prep.config import load_config, to_dict

            cfg = load_config(args.overrides)  # validated before anything heavy is imported or done
            if args.cfg:
                print(OmegaConf.to_yaml(to_dict(cfg)), end="")
                return 0
            from data_prep.build import build

            build(cfg)
        else:
            from data_prep.index import write_index

            m = write_index(args.dir, split=args.split, force=args.force)
            print(f"indexed {len(m.shards)} shards, {m.total_samples} samples -> {m.root / 'manifest.json'}")
    except (PrepError, ManifestError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
