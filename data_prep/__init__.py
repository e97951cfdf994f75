"""Dataset builder: raw image-text pairs -> filtered, balanced WebDataset shards for ``pretrain``.

Flow of ``python -m data_prep build`` (``data_prep.build.build``), one direction::

    sources/    tables (parquet/CSV/TSV/JSONL of URLs or paths), image folders, WebDataset shards,
                the real local sets (fashion_mnist, tuxpaint); each split into units of work
      plan.py     <out_dir>/.work/plan.json: every unit, interleaved across sources, config fingerprint
      worker.py   per unit, in parallel (processes, machines): batches of samples through the stages
                  in config order, fetching images (download.py) only when an image stage needs them;
                  kept samples re-encoded (resize.py) into the unit's tar; one decision row per input
      filters/    per-sample stages judge at once; global stages (caption frequency, duplicates,
                  CLIP top-k%) only measure here...
      merge.py    ...and are judged here over every worker's measures; kept samples are copied into
                  <out_dir>/<split>/shard-NNNNNN.tar + manifest.json, decisions.parquet is written
      tokenizer.py  <out_dir>/tokenizer.model: sentencepiece trained on kept train captions
      report.py   the funnel in the terminal, report.md with plots under report/

A killed build resumes unit by unit and publishes byte-identical shards; ``retry_failed=true``
re-fetches only transient download failures. ``python -m data_prep index DIR`` writes a manifest
for shards built elsewhere (e.g. img2dataset). Config: ``conf/prep.yaml`` and ``conf/filters/``,
validated by ``data_prep.config``.
"""


class PrepError(Exception):
    """A dataset-building problem the user can fix; the message names what is wrong and how to fix it."""
