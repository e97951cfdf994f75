"""``--smoke`` for the benchmark scripts: their own code path at tiny sizes, in seconds.

A smoke run checks that a benchmark still runs end to end (its table, its checks, its last line),
not what it measures: its numbers mean nothing. Each script states its smoke values (batch, widths,
layers, repeats) and what its smoke leaves out (a reference system that lives in its own venv under
``.bench/``: a smoke never installs anything). Imported as ``smoke``: the scripts are run as files
(``.venv/bin/python bench/NAME.py``), so bench/ is ``sys.path[0]``.
"""
from __future__ import annotations

import argparse
from typing import Any, Mapping, Optional, Sequence

SKIPPED = "n/a (smoke: reference not run)"  # the last line's value where the smoke left the reference out


def parse_args(parser: argparse.ArgumentParser, smoke_values: Mapping[str, Any], smoke_help: str,
               argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Add ``--smoke`` to ``parser`` and parse. With ``--smoke``, ``smoke_values`` (argument dest ->
    value) replace the parser's defaults, so the run takes the normal path with smoke sizes, and a
    flag given on the command line still wins (``--smoke --dim 64``)."""
    parser.add_argument("--smoke", action="store_true", help=smoke_help)
    args = parser.parse_args(argv)
    # A misspelt dest would be set on the namespace and silently ignored by the script.
    unknown = sorted(set(smoke_values) - set(vars(args)))
    if unknown:
        raise ValueError(f"smoke values for unknown arguments: {unknown}")
    if args.smoke:
        parser.set_defaults(**smoke_values)
        args = parser.parse_args(argv)
    return args
