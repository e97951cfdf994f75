"""The build report: the funnel in the terminal, and ``report.md`` with plots under ``report/``.

Plots show what the thresholds did: each histogram stacks kept samples over rejected ones (by any
stage), with the stage's threshold drawn as a line, so a user sees at a glance whether a cut-off
removes a tail or the bulk of the data.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from data_prep.atomic import atomic_write
from data_prep.decisions import (DOWNLOAD_STAGE, SOURCE_STAGE, WRITE_STAGE, FunnelRow, funnel, reason_counts, render_funnel,
                                 render_reasons)
from data_prep.manifest import Manifest
from data_prep.split import SPLITS

REPORT_NAME = "report.md"
PLOTS_DIR = "report"


def _numeric(table: pa.Table, column: str) -> tuple[np.ndarray, np.ndarray] | None:
    """(values, kept mask) of the rows where ``column`` was measured, or None if nowhere."""
    if column not in table.column_names:
        return None
    valid = pc.is_valid(table[column]).to_numpy(zero_copy_only=False)
    if not valid.any():
        return None
    values = table[column].to_numpy(zero_copy_only=False)[valid].astype(np.float64)
    kept = table["kept"].to_numpy(zero_copy_only=False)[valid]
    return values, kept


def _histogram(ax: Any, values: np.ndarray, kept: np.ndarray, title: str, xlabel: str,
               lines: Sequence[tuple[float, str]] = (), log: bool = False) -> None:
    lo, hi = float(values.min()), float(values.max())
    if log and lo > 0:
        bins = np.geomspace(lo, max(hi, lo * 1.01), 40)
        ax.set_xscale("log")
    else:
        bins = np.linspace(lo, hi if hi > lo else lo + 1, 40)
    ax.hist([values[kept], values[~kept]], bins=bins, stacked=True, color=["#2a9d8f", "#e76f51"],
            label=[f"kept ({int(kept.sum())})", f"rejected ({int((~kept).sum())})"])
    for x, label in lines:
        ax.axvline(x, color="black", linestyle="--", linewidth=1)
        ax.annotate(label, (x, ax.get_ylim()[1] * 0.9), rotation=90, ha="right", va="top", fontsize=8)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("samples")
    ax.legend(fontsize=8)


def plot_measures(table: pa.Table, thresholds: dict[str, dict[str, Any]], folder: Path) -> list[Path]:
    """One PNG per available measure (size, aspect, caption length, language, CLIP score)."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on build machines
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    made: list[Path] = []

    def save(fig: Any, name: str) -> None:
        path = folder / name
        fig.tight_layout()
        with atomic_write(path, "wb") as f:
            fig.savefig(f, format="png", dpi=90)
        plt.close(fig)
        made.append(path)

    size = thresholds.get("image_size", {})
    caption = thresholds.get("caption_length", {})
    specs = [
        ("width", "height", "image_size.png", "Image shorter side", "pixels",
         [(size["min_side"], "min_side")] if size.get("min_side") else [], True),
        ("aspect_ratio", None, "aspect_ratio.png", "Aspect ratio (long / short side)", "ratio",
         [(size["max_aspect"], "max_aspect")] if size.get("max_aspect") else [], False),
        ("caption_words", None, "caption_words.png", "Caption length", "words",
         [(v, k) for k, v in caption.items() if k in ("min_words", "max_words") and v is not None], False),
        ("clip_score", None, "clip_score.png", "CLIP score (image-caption cosine)", "cosine",
         [(thresholds["clip_score"]["threshold"], "threshold")] if thresholds.get("clip_score", {}).get("threshold")
         is not None else [], False),
    ]
    for column, other, name, title, xlabel, lines, log in specs:
        got = _numeric(table, column)
        if got is None:
            continue
        values, kept = got
        if other is not None:  # the shorter side: min(width, height) of the rows where both exist
            pair = table.filter(pc.and_(pc.is_valid(table[column]), pc.is_valid(table[other])))
            values = np.minimum(pair[column].to_numpy(), pair[other].to_numpy()).astype(np.float64)
            kept = pair["kept"].to_numpy(zero_copy_only=False)
        fig, ax = plt.subplots(figsize=(6, 3.5))
        _histogram(ax, values, kept, title, xlabel, lines, log and values.min() > 0)
        save(fig, name)
    if "lang" in table.column_names and pc.any(pc.is_valid(table["lang"])).as_py():
        langs = table.filter(pc.is_valid(table["lang"]))
        counts = langs.group_by(["lang", "kept"]).aggregate([("uid", "count")]).to_pylist()
        total: dict[str, int] = {}
        for c in counts:
            total[c["lang"]] = total.get(c["lang"], 0) + c["uid_count"]
        top = sorted(total, key=lambda k: -total[k])[:15]
        kept_n = [sum(c["uid_count"] for c in counts if c["lang"] == lang and c["kept"]) for lang in top]
        rej_n = [total[lang] - k for lang, k in zip(top, kept_n)]
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.bar(top, kept_n, color="#2a9d8f", label="kept")
        ax.bar(top, rej_n, bottom=kept_n, color="#e76f51", label="rejected")
        ax.set_title("Detected caption language (top 15)")
        ax.set_ylabel("samples")
        ax.legend(fontsize=8)
        save(fig, "language.png")
    return made


@dataclass
class Outcome:
    """The funnel of a build, computed once for the terminal and the report."""

    rows: list[FunnelRow]
    funnel_md: str  # source | input | rejected per stage, in run order | kept per split
    reasons_md: str | None  # (source, stage, reason code) counts; None when nothing was rejected


def summarise(table: pa.Table, stages: Sequence[str]) -> Outcome:
    rows = funnel(table)
    order = [SOURCE_STAGE, DOWNLOAD_STAGE, *stages, WRITE_STAGE]
    rejected = any(r.inputs != sum(r.kept.values()) for r in rows)
    return Outcome(rows, render_funnel(rows, order, SPLITS), render_reasons(reason_counts(table)) if rejected else None)


def render_report(out_dir: Path, outcome: Outcome, manifests: dict[str, Manifest],
                  plots: Sequence[Path], summaries: dict[str, dict[str, Any]], seconds: float) -> str:
    lines = [
        f"# Dataset build: {out_dir}", "",
        "## Funnel", "",
        "Inputs per source, samples rejected at each stage in run order (`-source`: unusable input such "
        "as a missing caption; `-download`: the image could not be fetched), and kept samples per split.", "",
        outcome.funnel_md, "",
        "## Rejection reasons", "",
        outcome.reasons_md or "(none)", "",
    ]
    if summaries:
        lines += ["## Global stages", "", *(f"- `{k}`: " + ", ".join(f"{a}={b}" for a, b in v.items())
                                           for k, v in summaries.items() if v), ""]
    lines += ["## Shards", "",
              *(f"- `{split}/`: {m.total_samples} samples in {len(m.shards)} shard(s), {m.total_bytes / 1e6:.1f} MB"
                for split, m in manifests.items()), ""]
    if plots:
        lines += ["## Measures", "", "Kept (green) over rejected (red) samples; dashed lines are thresholds.", "",
                  *(f"![{p.stem}]({p.relative_to(out_dir).as_posix()})" for p in plots), ""]
    lines += [f"Built in {seconds:.1f} s.", ""]
    return "\n".join(lines)


def write_report(out_dir: Path, text: str) -> Path:
    path = out_dir / REPORT_NAME
    with atomic_write(path, "wb") as f:
        f.write(text.encode("utf-8"))
    return path
