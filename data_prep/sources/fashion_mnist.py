"""Fashion-MNIST (``apt-get install dataset-fashion-mnist``): 28x28 grayscale clothes, 10 classes.

Only the ``train`` split feeds the builder; ``t10k`` is the zero-shot benchmark, which the trainer's
evaluator reads with ``load_split`` and prompts with the same ``CLASSNAMES`` and ``TEMPLATES`` used
here for training captions, so training and evaluation wordings agree.
"""
from __future__ import annotations

import gzip
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image

from data_prep.sources.base import Sample, Source, SourceConfig, SourceError

# Label order of the dataset (package README), worded as a caption would say them.
CLASSNAMES: list[str] = [
    "t-shirt or top", "trouser", "pullover", "dress", "coat",
    "sandal", "shirt", "sneaker", "bag", "ankle boot",
]

# Caption templates for training and zero-shot prompts for evaluation: keep them one list.
TEMPLATES: list[str] = [
    "a photo of a {}.",
    "a black and white photo of a {}.",
    "a low resolution photo of the {}.",
    "a photo of the {}.",
    "a grayscale photo of a {}.",
    "a small photo of a {}.",
    "a close-up photo of a {}.",
    "a product photo of a {}.",
]

_SPLIT_PREFIX = {"train": "train", "t10k": "t10k", "test": "t10k"}
_IDX_MAGIC = {"images": 0x00000803, "labels": 0x00000801}  # uint8 data, 3 dims / 1 dim


def _read_idx(path: Path, kind: str) -> np.ndarray:
    """Decode one gzipped IDX file (big-endian header: magic, then one uint32 per dimension)."""
    if not path.exists():
        raise SourceError(f"Fashion-MNIST file missing: {path} (apt-get install dataset-fashion-mnist)")
    raw = gzip.decompress(path.read_bytes())
    magic = int.from_bytes(raw[:4], "big")
    if magic != _IDX_MAGIC[kind]:
        raise SourceError(f"{path}: not an IDX {kind} file (magic {magic:#010x}, expected {_IDX_MAGIC[kind]:#010x})")
    ndim = magic & 0xFF
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise SourceError(f"{path}: header says {dims} but holds {data.size} values (truncated file?)")
    return data.reshape(dims)


def load_split(root: str | Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Images ``uint8 (N, 28, 28)`` and labels ``int64 (N,)`` of ``split`` ("train", or "t10k"/"test")."""
    if split not in _SPLIT_PREFIX:
        raise ValueError(f"unknown Fashion-MNIST split {split!r}; allowed: {sorted(_SPLIT_PREFIX)}")
    prefix = Path(root) / _SPLIT_PREFIX[split]
    images = _read_idx(Path(f"{prefix}-images-idx3-ubyte.gz"), "images")
    labels = _read_idx(Path(f"{prefix}-labels-idx1-ubyte.gz"), "labels").astype(np.int64)
    if len(images) != len(labels):
        raise SourceError(f"{prefix}-*: {len(images)} images but {len(labels)} labels")
    return images, labels


def caption_for(uid: str, label: int) -> str:
    """The training caption of one sample: a template picked by its uid, so it never changes between runs."""
    return TEMPLATES[int(uid, 16) % len(TEMPLATES)].format(CLASSNAMES[label])


@dataclass
class FashionMnistConfig(SourceConfig):
    root: str = "/usr/share/datasets/fashion-mnist"
    heldout_fraction: float = 0.0  # its real benchmark is the t10k split, read by the evaluator


class FashionMnist(Source):
    name = "fashion_mnist"
    Config = FashionMnistConfig
    debian_package = "dataset-fashion-mnist"
    split = "train"  # never t10k: that is the zero-shot benchmark

    def __init__(self, cfg: FashionMnistConfig, name: str | None = None) -> None:
        super().__init__(cfg, name)
        self.images, self.labels = load_split(self.root, self.split)

    def __len__(self) -> int:
        return self._limited(len(self.labels))

    def iter_range(self, start: int, stop: int) -> Iterator[Sample]:
        for i in range(start, stop):
            source_id = f"{self.split}/{i}"
            uid = self.uid(source_id)
            label = int(self.labels[i])
            buf = io.BytesIO()
            Image.fromarray(self.images[i]).save(buf, format="PNG")
            yield Sample(
                uid=uid, source=self.label, source_id=source_id, image=buf.getvalue(), image_ext="png",
                caption=caption_for(uid, label),
                meta={"width": 28, "height": 28, "original_width": 28, "original_height": 28, "lang": "en",
                      "label": label, "classname": CLASSNAMES[label]},
            )
