"""Dataset builder: raw image-text pairs -> filtered, balanced WebDataset shards for ``pretrain``.

Flow of ``python -m data_prep build`` (``data_prep.build.build``), one direction::

    sources/   candidate samples: uid, encoded image, caption, meta  (or an early ``Rejected``)
      -> filters/   measure each sample, first rejecting filter wins (reason recorded)
      -> split      kept samples go to ``train`` or ``heldout`` by a hash of their uid
      -> shards.py  <out_dir>/<split>/shard-NNNNNN.tar + manifest.json (webdataset, uid order)
      -> decisions.py  <out_dir>/decisions.parquet: one row per input, its fate and measures
      -> tokenizer.py  <out_dir>/tokenizer.model: sentencepiece trained on kept train captions
      -> report.md  the funnel: per source, inputs, rejections per filter, kept per split

``python -m data_prep index DIR`` writes a manifest for shards built elsewhere (e.g. img2dataset).
Config: ``conf/prep.yaml`` validated by ``data_prep.config``. The shard contract (keys, manifest) is described in the project design notes and ``shards.py``.
"""


class PrepError(Exception):
    """A dataset-building problem the user can fix; the message names what is wrong and how to fix it."""
