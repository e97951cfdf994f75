"""Slow-tail check of data_prep's download overlap: 2000 URLs of real Tux Paint stamps from a local
server, 1% of which answer only after 2 s, built with ``download.prefetch=0`` (fetch a batch, then
process it) and ``=3`` (later batches download while one is processed). One process, 16 threads,
whole command timed (about 5 s of it is start-up). data_prep only: there is no reference system.

    .venv/bin/python bench/prep_slow_tail.py [--urls 2000] [--slow-every 100]
    .venv/bin/python bench/prep_slow_tail.py --smoke   # seconds: checks the script still runs

Smoke (``--smoke``): the same two builds at tiny sizes (SMOKE below: 40 URLs, every 20th slow, so 2
slow ones; flags given explicitly still win); measures nothing. Outputs under .bench/slow_tail_smoke/
instead of .bench/slow_tail/ (both kept, each build's folder replaced by the next run).

Last line: ``prefetch=3: X s wall for N URLs (K answer after 2 s)``.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

import smoke  # bench/, this file's folder, is sys.path[0]

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.data_prep.image_server import ImageServer  # noqa: E402 (after the path set-up)

BENCH = Path(__file__).resolve().parent.parent / ".bench"
ROOT = Path("/usr/share/tuxpaint/stamps")
SLOW_SECONDS = 2
# --smoke's argument values: a few dozen URLs, still with slow ones, so both builds run every step.
SMOKE = {"urls": 40, "slow_every": 20}


def url_rows(srv: ImageServer, n: int, slow_every: int) -> list[dict[str, str]]:
    """``n`` rows (url, caption): every ``slow_every``-th (from the middle of the first block) answers
    after SLOW_SECONDS, the rest cycle through the first 1000 stamps with a distinct query each."""
    pngs = sorted(ROOT.rglob("*.png"))[:1000]
    rows = []
    for i in range(n):
        if i % slow_every == slow_every // 2:
            rows.append({"url": srv.url(f"/fault/slow?seconds={SLOW_SECONDS}&n={i}"), "caption": "slow one"})
        else:
            rows.append({"url": srv.img_url(pngs[i % len(pngs)].relative_to(ROOT)) + f"?c={i}", "caption": "a stamp"})
    return rows


def build_seconds(table: Path, out: Path, prefetch: int) -> float:
    """Wall seconds of one whole ``python -m data_prep build`` of ``table`` into ``out`` (replaced)."""
    subprocess.run(["rm", "-rf", str(out)])
    t = time.time()
    subprocess.run([sys.executable, "-m", "data_prep", "build", f"out_dir={out}", "~sources.fashion_mnist", "~sources.tuxpaint",
                    "+sources.w.type=table", f"+sources.w.root={table}", "filters=none", "workers.processes=1",
                    "resize.size=64", "resize.format=jpg", "download.threads=16", f"download.prefetch={prefetch}", "unit_size=1000",
                    "tokenizer.vocab_size=50"], check=True, capture_output=True, env={**os.environ, "TQDM_DISABLE": "1"})
    return time.time() - t


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))  # first paragraph
    p.add_argument("--urls", type=int, default=2000, help="URLs in the list")
    p.add_argument("--slow-every", type=int, default=100, help=f"one URL in this many answers after {SLOW_SECONDS} s")
    return smoke.parse_args(p, SMOKE, "seconds: 40 URLs, every 20th slow (explicit flags win); outputs under "
                            ".bench/slow_tail_smoke/", argv)


def main() -> None:
    a = parse_args()
    tmp = BENCH / ("slow_tail_smoke" if a.smoke else "slow_tail")
    tmp.mkdir(parents=True, exist_ok=True)
    table = tmp / "slow.parquet"
    with ImageServer(ROOT) as srv:
        rows = url_rows(srv, a.urls, a.slow_every)
        slow = sum(r["caption"] == "slow one" for r in rows)
        pq.write_table(pa.Table.from_pylist(rows), str(table))
        for pf in (0, 3):
            seconds = build_seconds(table, tmp / f"out_{pf}", pf)
            print(f"prefetch={pf}: {seconds:.1f} s wall for {a.urls} URLs ({slow} answer after {SLOW_SECONDS} s)",
                  flush=True)


if __name__ == "__main__":
    main()
