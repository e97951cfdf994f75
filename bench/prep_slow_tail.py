"""Slow-tail check of data_prep's download overlap: 2000 URLs of real Tux Paint stamps from a local
server, 1% of which answer only after 2 s, built with ``download.prefetch=0`` (fetch a batch, then
process it) and ``=3`` (later batches download while one is processed). One process, 16 threads,
whole command timed (about 5 s of it is start-up).

    .venv/bin/python bench/prep_slow_tail.py
"""
import os
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.data_prep.image_server import ImageServer  # noqa: E402 (after the path set-up)

TMP = Path(__file__).resolve().parent.parent / ".bench" / "slow_tail"
TMP.mkdir(parents=True, exist_ok=True)
root = Path("/usr/share/tuxpaint/stamps")
pngs = sorted(root.rglob("*.png"))[:1000]
with ImageServer(root) as srv:
    rows = []
    for i in range(2000):
        if i % 100 == 50:
            rows.append({"url": srv.url(f"/fault/slow?seconds=2&n={i}"), "caption": "slow one"})
        else:
            rows.append({"url": srv.img_url(pngs[i % len(pngs)].relative_to(root)) + f"?c={i}", "caption": "a stamp"})
    pq.write_table(pa.Table.from_pylist(rows), str(TMP / "slow.parquet"))
    for pf in (0, 3):
        out = str(TMP / f"out_{pf}")
        subprocess.run(["rm", "-rf", out])
        t = time.time()
        subprocess.run([sys.executable, "-m", "data_prep", "build", f"out_dir={out}", "~sources.fashion_mnist", "~sources.tuxpaint",
                        "+sources.w.type=table", f"+sources.w.root={TMP / 'slow.parquet'}", "filters=none", "workers.processes=1",
                        "resize.size=64", "resize.format=jpg", "download.threads=16", f"download.prefetch={pf}", "unit_size=1000",
                        "tokenizer.vocab_size=50"], check=True, capture_output=True, env={**os.environ, "TQDM_DISABLE": "1"})
        print(f"prefetch={pf}: {time.time() - t:.1f} s wall for 2000 URLs (20 answer after 2 s)", flush=True)
