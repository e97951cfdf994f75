"""CLIP score stage: cosine similarity of each image with its caption, from a CLIP-style model.

The model is one exported by this framework (``python -m pretrain.export``: the bootstrap trains on
the unfiltered set, exports, scores, filters and retrains) or, when ``open_clip`` is installed, a
local open_clip model (``open_clip_model`` names the architecture, ``checkpoint`` its weights file).

Two ways to judge the score:

- ``threshold``: a fixed cut, per sample (LAION keeps >= 0.28 with ViT-B/32, >= 0.3 with L/14);
- ``top_fraction``: keep the best ``top_fraction`` of the samples alive at this stage, over the
  whole dataset (DataComp's "CLIP score top 30%"). The workers only measure; the merge cuts.

Either way ``summary["threshold"]`` holds the cut used, for the report's plots.
"""
from __future__ import annotations

import contextlib
import math
import multiprocessing
import os
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence

import numpy as np
import pyarrow as pa

from data_prep import PrepError
from data_prep.filters.base import Filter, Measures, Reject
from data_prep.images import decode
from data_prep.sources.base import DECODE_ERRORS, Sample

if TYPE_CHECKING:  # torch is imported when the model loads, not when filters are discovered
    import torch
    from PIL import Image

MODES = ("threshold", "top_fraction")
DEVICES = ("auto", "cpu", "cuda")
WHERE = "filters.clip_score"
EXPORT_FILES = ("model.safetensors", "config.yaml", "tokenizer.model")  # pretrain.export's layout


@dataclass
class ClipScoreConfig:
    checkpoint: str = ""  # export folder (python -m pretrain.export), or open_clip weights file
    mode: str = "threshold"  # threshold | top_fraction
    threshold: float = 0.28  # threshold mode: keep cosine >= this (LAION: 0.28 B/32, 0.3 L/14)
    top_fraction: float = 0.3  # top_fraction mode: keep this share of alive samples (DataComp: 0.3)
    batch_size: int = 256  # images per model forward
    device: str = "auto"  # auto (cuda when available) | cpu | cuda
    open_clip_model: Optional[str] = None  # an open_clip architecture, e.g. ViT-B-32; needs open_clip
    threads: int = 0  # torch CPU threads per process; 0: 1 in builder workers, torch's default otherwise

    def __post_init__(self) -> None:
        if not str(self.checkpoint).strip():
            raise ValueError("checkpoint: required; set it to an export folder made by "
                             "`python -m pretrain.export RUN_DIR --out EXPORT_DIR` (or an open_clip weights "
                             "file with open_clip_model)")
        if self.mode not in MODES:
            raise ValueError(f"mode: {self.mode!r} is not one of {', '.join(MODES)}")
        if self.device not in DEVICES:
            raise ValueError(f"device: {self.device!r} is not one of {', '.join(DEVICES)}")
        if not -1.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold: {self.threshold} is not a cosine similarity; allowed: -1 to 1")
        if not 0.0 < self.top_fraction <= 1.0:
            raise ValueError(f"top_fraction: {self.top_fraction} must be in (0, 1] (0.3 keeps the best 30%)")
        if self.batch_size < 1:
            raise ValueError(f"batch_size: {self.batch_size} must be >= 1")
        if self.threads < 0:
            raise ValueError(f"threads: {self.threads} must be >= 0 (0: automatic)")
        if self.open_clip_model is not None and not self.open_clip_model.strip():
            raise ValueError("open_clip_model: empty; give an open_clip architecture name or null")


@dataclass
class Scorer:
    """What scoring needs from either kind of model: towers, tokenizer, image preprocessing."""

    model: Any  # has encode_image((B, 3, H, W)) and encode_text((B, L)) -> (B, D)
    tokenize: Callable[[list[str]], "torch.Tensor"]  # captions -> ids (B, L)
    transform: Callable[["Image.Image"], "torch.Tensor"]  # RGB image -> (3, H, W)
    device: "torch.device"
    input_size: int = 224  # the model's square input side: what a reduced decode must still cover


def input_need(size: tuple[int, int], input_size: int) -> tuple[int, int]:
    """The smallest decode of an image of ``size`` that still fills the model's input: the image is
    padded square, so its longer side must stay >= ``input_size`` (a ``images.SizeNeed``)."""
    k = min(1.0, input_size / max(size))
    return math.ceil(size[0] * k), math.ceil(size[1] * k)


class ClipScoreFilter(Filter):
    name = "clip_score"
    Config = ClipScoreConfig
    measure_types = {"clip_score": float}
    needs_image = True

    def __init__(self, cfg: ClipScoreConfig) -> None:
        super().__init__(cfg)
        check_model_files(cfg)  # cheap; the model itself loads on first use, in each worker
        self._scorer: Scorer | None = None
        # The cut the report draws: known now in threshold mode, set by global_reasons otherwise.
        self.summary: dict[str, Any] = {"threshold": cfg.threshold} if cfg.mode == "threshold" else {}

    @property
    def is_global(self) -> bool:
        return self.cfg.mode == "top_fraction"

    # -- measuring (workers) --------------------------------------------------------------------
    def measure(self, sample: Sample) -> Measures:
        (result,) = self.measure_batch([sample])
        if isinstance(result, Reject):
            raise result
        return result

    def measure_batch(self, samples: Sequence[Sample]) -> list[Measures | Reject]:
        """One model forward per ``batch_size`` samples; unreadable ones come back as ``Reject``."""
        scorer = self._load()
        out: list[Measures | Reject] = []
        for start in range(0, len(samples), self.cfg.batch_size):
            out.extend(self._measure_chunk(scorer, samples[start: start + self.cfg.batch_size]))
        return out

    def _measure_chunk(self, scorer: Scorer, samples: Sequence[Sample]) -> list[Measures | Reject]:
        import torch

        from pretrain.data.transforms import to_rgb  # transparency on white, square pad: as in training

        out: list[Measures | Reject | None] = [None] * len(samples)
        pixels, tokens, rows = [], [], []
        for i, sample in enumerate(samples):
            try:
                # The cached decode may have been reduced for resize-on-write; not below the model's input.
                image = decode(sample, need=lambda wh: input_need(wh, scorer.input_size))
                try:
                    px = scorer.transform(to_rgb(image))  # (3, H, W)
                except DECODE_ERRORS as e:  # e.g. a mode PIL cannot convert to RGB
                    raise Reject(f"decode_error: {type(e).__name__}: {e}") from e
                try:  # checked here: tokenizers fail on lone surrogates with unrelated errors
                    sample.caption.encode("utf-8")
                except UnicodeEncodeError as e:  # the source's bytes were not UTF-8
                    raise Reject(f"caption_not_utf8: undecodable bytes at position {e.start} "
                                 f"in {sample.caption[:40]!r}") from e
                ids = scorer.tokenize([sample.caption])[0]  # (L,)
            except Reject as e:
                out[i] = e
                continue
            pixels.append(px)
            tokens.append(ids)
            rows.append(i)
        if rows:
            scores = self._score(scorer, torch.stack(pixels), torch.stack(tokens))
            for i, score in zip(rows, scores):
                out[i] = {"clip_score": score}
        return out  # type: ignore[return-value]  # every slot is filled

    def _score(self, scorer: Scorer, pixels: "torch.Tensor", tokens: "torch.Tensor") -> list[float]:
        """Cosine similarity of pixels (B, 3, H, W) with tokens (B, L) -> B floats."""
        import torch
        import torch.nn.functional as F

        dev = scorer.device
        # bf16 autocast on CUDA only (the CPU's bf16 matmuls are slower than fp32 ones).
        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda" else contextlib.nullcontext()
        with torch.inference_mode(), autocast:
            image = scorer.model.encode_image(pixels.to(dev, non_blocking=True))  # (B, D)
            text = scorer.model.encode_text(tokens.to(dev, non_blocking=True))  # (B, D)
            # Normalising again is a no-op for our exports and needed for open_clip's raw features.
            sims = F.cosine_similarity(image.float(), text.float(), dim=-1)  # (B,)
        return sims.cpu().tolist()

    def _load(self) -> Scorer:
        """The model, loaded once per process on first use (workers each load their own)."""
        if self._scorer is None:
            import torch

            set_threads(self.cfg.threads)
            if self.cfg.device == "cuda" and not torch.cuda.is_available():
                raise PrepError(f"{WHERE}.device=cuda but CUDA is not available here; use auto or cpu")
            use_cuda = self.cfg.device == "cuda" or (self.cfg.device == "auto" and torch.cuda.is_available())
            device = torch.device("cuda" if use_cuda else "cpu")
            load = load_open_clip if self.cfg.open_clip_model else load_export
            self._scorer = load(self.cfg, device)
        return self._scorer

    # -- judging --------------------------------------------------------------------------------
    def reject_reason(self, measures: Measures) -> str | None:
        """Threshold mode: reject below the fixed cut (top_fraction mode judges in ``global_reasons``)."""
        score = measures["clip_score"]
        if self.is_global:
            return None
        if not math.isfinite(score):
            return f"bad_clip_score: {score} (the model gives non-finite embeddings)"
        if score >= self.cfg.threshold:
            return None
        return f"low_clip_score: {_pair(score, self.cfg.threshold)[0]} < threshold {self.cfg.threshold:g}"

    def global_reasons(self, table: pa.Table, alive: np.ndarray) -> list[str | None]:
        """Keep the best ``ceil(top_fraction * n)`` of the n alive rows by score; equal scores at the
        cut are broken by uid (deterministic whatever the number of workers or the build order)."""
        scores = table.column("clip_score").to_numpy(zero_copy_only=False).astype(np.float64)  # null -> nan
        alive = np.asarray(alive, dtype=bool)
        reasons: list[str | None] = [None] * table.num_rows
        for i in np.flatnonzero(alive & ~np.isfinite(scores)):
            reasons[i] = "no_clip_score: not measured or non-finite"
        rows = np.flatnonzero(alive & np.isfinite(scores))
        k = keep_count(len(rows), self.cfg.top_fraction)
        if k == 0:
            self.summary = {"threshold": None}
            return reasons
        s = scores[rows]
        t = float(np.partition(s, len(s) - k)[len(s) - k])  # the k-th largest score: the cut
        # Rows strictly above the cut are kept; of those equal to it, the lowest uids fill the rest.
        tied = rows[s == t]
        uids = table.column("uid").take(pa.array(tied)).to_pylist()
        need = k - int(np.count_nonzero(s > t))
        losers = {int(r) for _, r in sorted(zip(uids, tied))[need:]}
        pct = f"top-{self.cfg.top_fraction * 100:g}%"
        for r, score in zip(rows, s):
            if score < t:
                a, b = _pair(float(score), t)
                reasons[r] = f"low_clip_score: {a} < {pct} threshold {b}"
            elif int(r) in losers:
                reasons[r] = f"low_clip_score: {t:.3f} ties the {pct} threshold; cut by uid order"
        self.summary = {"threshold": t}
        return reasons

    def close(self) -> None:
        if self._scorer is not None:
            on_cuda = self._scorer.device.type == "cuda"
            self._scorer = None
            if on_cuda:
                import torch

                torch.cuda.empty_cache()

    def __getstate__(self) -> dict[str, Any]:
        # A stage sent to a worker process travels without its model; the worker loads its own.
        return {**self.__dict__, "_scorer": None}


def keep_count(n: int, fraction: float) -> int:
    """``ceil(fraction * n)``, exact for decimal fractions (0.3 * 10 is 3, not 4 as in floats)."""
    f = Fraction(repr(float(fraction)))
    return min(n, -(-n * f.numerator // f.denominator))


def _pair(score: float, cut: float) -> tuple[str, str]:
    """Both numbers with 3 decimals, or more when 3 would print a score below the cut as equal."""
    digits = 3
    while digits < 9 and f"{score:.{digits}f}" == f"{cut:.{digits}f}":
        digits += 1
    return f"{score:.{digits}f}", f"{cut:.{digits}f}"


def check_model_files(cfg: ClipScoreConfig) -> None:
    """Fail at construction, before any work, when ``checkpoint`` cannot be what the mode needs."""
    path = Path(cfg.checkpoint)
    if cfg.open_clip_model:
        try:
            import open_clip  # noqa: F401
        except ImportError:
            raise PrepError(f"{WHERE}.open_clip_model={cfg.open_clip_model} needs the open_clip package "
                            "(`pip install open_clip_torch`), or unset it to use an export of this framework") from None
        if not path.is_file():
            raise PrepError(f"{WHERE}.checkpoint: {path} is not a file; with open_clip_model it must be "
                            "the model's local weights file (.pt, .bin or .safetensors)")
        return
    make = f"make one with `python -m pretrain.export RUN_DIR --out {path}`"
    if (path / "checkpoints").is_dir() or path.parent.name == "checkpoints":  # a common mix-up
        make = (f"this is a training run or checkpoint: export it with `python -m pretrain.export {path} "
                f"--out EXPORT_DIR` and set {WHERE}.checkpoint=EXPORT_DIR")
    if not path.is_dir():
        raise PrepError(f"{WHERE}.checkpoint: {path} does not exist; it must be an export folder: {make}")
    for name in EXPORT_FILES:
        if not (path / name).is_file():
            raise PrepError(f"{WHERE}.checkpoint: {path} is not an export: {name} is missing; {make}")


def load_export(cfg: ClipScoreConfig, device: "torch.device") -> Scorer:
    from pretrain.export import load_exported

    exported = load_exported(cfg.checkpoint)
    return Scorer(exported.model.to(device).eval(), exported.tokenizer, exported.transform, device,
                  exported.config.model.vision.image_size)


def load_open_clip(cfg: ClipScoreConfig, device: "torch.device") -> Scorer:
    import open_clip

    # ``pretrained`` is a local file (checked at construction), so nothing is downloaded.
    model, _, preprocess = open_clip.create_model_and_transforms(cfg.open_clip_model, pretrained=cfg.checkpoint)
    return Scorer(model.to(device).eval(), open_clip.get_tokenizer(cfg.open_clip_model), preprocess, device)


def set_threads(requested: int) -> None:
    """Torch's CPU threads for scoring. The builder already runs one worker process per core, so a
    worker scoring on all cores would oversubscribe them: workers use 1 thread unless told otherwise
    (``threads``, or OMP_NUM_THREADS, which torch follows by itself); the main process keeps torch's default."""
    import torch

    if requested > 0:
        torch.set_num_threads(requested)
    elif not os.environ.get("OMP_NUM_THREADS") and multiprocessing.parent_process() is not None:
        torch.set_num_threads(1)
