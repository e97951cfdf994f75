"""Tables of (url, caption) rows: parquet, CSV, TSV or JSONL, each optionally gzipped (LAION/CC style).

The table is never loaded whole (a 100M-row table must not spike memory): ``plan`` streams it once
and cuts it into chunk files ``work_dir/<label>/chunk-NNNNNN.parquet`` of at most ``unit_size`` rows;
``read`` turns one chunk into samples whose image is fetched later from ``url``.

Chunk columns: ``row`` (the 0-based index among parseable rows: ``source_id``; for a bad row, its
1-based line number in a JSONL file or record number in a CSV file, the header being record 1),
``url`` and ``caption`` as raw UTF-8 bytes (so undecodable bytes survive as surrogates and the
caption stage rejects them by name; a url that is not UTF-8 is rejected as ``bad_url``), ``meta``
(the ``keep_columns`` as one JSON object, since CSV/JSONL give no stable column types) and
``bad_row`` (why a row could not be parsed; null for good rows).

Damage never crashes a build: a file that is not a readable table at all is a ``SourceError``
naming it; a table damaged part-way (cut gzip, corrupt row group, unterminated quote) keeps the rows
before the damage plus one ``bad_row`` saying the rest was skipped. Known limit: in CSV/TSV, a row
with the wrong number of fields *and* bytes that are not UTF-8 cannot be handed to pyarrow's
invalid-row callback, so it counts as such damage (in the first 64 KiB: a ``SourceError`` naming
the row; later: the rest of the table is skipped).
"""
from __future__ import annotations

import contextlib
import gzip
import json
import os
import re
import shutil
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.json as pjson
import pyarrow.parquet as pq
from tqdm import tqdm

from data_prep.atomic import atomic_write
from data_prep.sources.base import REQUIRED_META, Rejected, Sample, Source, SourceConfig, SourceError, is_text, text_id

FORMATS = ("auto", "parquet", "csv", "tsv", "jsonl")
_SUFFIX_FORMAT = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv", ".tsv": "tsv", ".tab": "tsv",
                  ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl"}
CHUNK_SCHEMA = pa.schema([("row", pa.int64()), ("url", pa.binary()), ("caption", pa.binary()),
                          ("meta", pa.string()), ("bad_row", pa.string())])
_BATCH_ROWS = 8192  # rows per record batch while streaming: bounds memory, independent of table size
# JSON nesting beyond which a block skips pyarrow's parser: it recurses per level and a line of
# 100k "[" overflows the C stack (the process dies); json.loads raises RecursionError instead.
MAX_JSON_DEPTH = 1000
_OPENERS_ONLY = bytes.maketrans(b"{", b"[")  # with _NOT_OPENERS deleted: "[" per opener, "\n" per line
_NOT_OPENERS = bytes(b for b in range(256) if b not in b"[{\n")
_UNREADABLE = (pa.ArrowInvalid, OSError, EOFError, zlib.error)  # a damaged or foreign file, or a cut download
_URL_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")  # http(s)://, file://, s3://: left as given
Batches = Iterator[pa.RecordBatch]  # in CHUNK_SCHEMA


@dataclass
class TableConfig(SourceConfig):
    format: str = "auto"  # auto: from the suffix (.parquet/.csv/.tsv/.jsonl, optionally + .gz)
    url_col: str = "url"  # http(s) URL, file:// URL or local path (relative: to the table's folder)
    caption_col: str = "caption"
    keep_columns: list[str] = field(default_factory=list)  # copied into each sample's meta

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.format not in FORMATS:
            raise ValueError(f"format: {self.format!r} is not a table format; allowed: {', '.join(FORMATS)}")
        for opt in ("url_col", "caption_col"):
            if not getattr(self, opt):
                raise ValueError(f"{opt}: must name a column of the table, got an empty string")
        clash = sorted(set(self.keep_columns) & set(REQUIRED_META))
        if clash:
            raise ValueError(f"keep_columns: {clash} would overwrite the sample's own meta keys "
                             f"{list(REQUIRED_META)}; keep any other column")


def table_format(path: Path, fmt: str = "auto") -> tuple[str, bool]:
    """``(format, gzipped)`` of a table file: ``fmt`` unless "auto", else from the file's suffixes."""
    gz = path.suffix.lower() == ".gz"
    if fmt != "auto":
        return fmt, gz
    inner = Path(path.stem).suffix.lower() if gz else path.suffix.lower()
    if inner not in _SUFFIX_FORMAT:
        raise SourceError(f"{path}: cannot tell the table format from the suffix {inner or '(none)'!r}; "
                          f"set format to one of {', '.join(FORMATS[1:])}")
    return _SUFFIX_FORMAT[inner], gz


def resolve_url(value: str, table_dir: Path) -> str:
    """URLs with a scheme are kept as given; a local path becomes absolute, relative to ``table_dir``."""
    if _URL_SCHEME.match(value):
        return value
    return os.path.abspath(table_dir / value)


def _utf8(text: str) -> bytes:
    """Bytes of a str that may hold surrogates (undecodable input bytes or JSON ``\\udXXX`` escapes)."""
    try:
        return text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogatepass")


def _jsonable(value: Any) -> Any:
    """JSON stand-in for kept values json cannot write (bytes from CSV, dates and decimals from parquet)."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return value.isoformat() if hasattr(value, "isoformat") else str(value)


def _meta_json(rows: list[dict[str, Any]]) -> list[str | None]:
    return [json.dumps(r, default=_jsonable) if r else None for r in rows]


def _as_binary(col: pa.Array | pa.ChunkedArray) -> pa.Array:
    if not (pa.types.is_binary(col.type) or pa.types.is_large_binary(col.type)
            or pa.types.is_string(col.type) or pa.types.is_large_string(col.type)):
        col = col.cast(pa.string())  # a numeric caption column: its text
    return col.cast(pa.binary())


def _chunk_batch(first_row: int, url: pa.Array, caption: pa.Array, meta: list[str | None]) -> pa.RecordBatch:
    n = len(url)
    return pa.record_batch([pa.array(range(first_row, first_row + n), pa.int64()), url, caption,
                            pa.array(meta, pa.string()), pa.nulls(n, pa.string())], schema=CHUNK_SCHEMA)


def _good(batch: pa.RecordBatch, cfg: TableConfig, first_row: int) -> pa.RecordBatch:
    """A parsed batch of the table (any column types) in CHUNK_SCHEMA."""
    keep = cfg.keep_columns
    if keep:  # a JSONL block may lack a key altogether: kept as null like a missing value
        have = [k for k in keep if k in batch.schema.names]
        meta = _meta_json([{**dict.fromkeys(keep), **r} for r in batch.select(have).to_pylist()])
    else:
        meta = [None] * batch.num_rows
    return _chunk_batch(first_row, _as_binary(batch.column(cfg.url_col)), _as_binary(batch.column(cfg.caption_col)), meta)


def _bad(bad: list[tuple[int, str]]) -> pa.RecordBatch:
    """Rows that could not be parsed: ``(1-based record number, reason)``."""
    n = len(bad)
    return pa.record_batch([pa.array([b[0] for b in bad], pa.int64()), pa.nulls(n, pa.binary()),
                            pa.nulls(n, pa.binary()), pa.nulls(n, pa.string()),
                            pa.array([b[1] for b in bad], pa.string())], schema=CHUNK_SCHEMA)


def _check_columns(have: list[str], cfg: TableConfig, where: Path) -> None:
    for opt in ("url_col", "caption_col"):
        col = getattr(cfg, opt)
        if col not in have:
            raise SourceError(f"{where}: no column {col!r} (option {opt}); the table has columns {have}; "
                              f"set {opt} to one of them")
    missing = [c for c in cfg.keep_columns if c not in have]
    if missing:
        raise SourceError(f"{where}: keep_columns {missing} are not in the table; it has columns {have}")


def _read_parquet(path: Path, cfg: TableConfig) -> Batches:
    try:
        pf = pq.ParquetFile(path)
    except _UNREADABLE as e:
        raise SourceError(f"{path}: not a readable parquet table ({type(e).__name__}: {e}); check the file "
                          "or set format to the table's real format") from e
    _check_columns(pf.schema_arrow.names, cfg, path)
    cols = list(dict.fromkeys([cfg.url_col, cfg.caption_col, *cfg.keep_columns]))
    row = 0
    try:
        for batch in pf.iter_batches(batch_size=_BATCH_ROWS, columns=cols):
            yield _good(batch, cfg, row)
            row += batch.num_rows
    except _UNREADABLE as e:  # a damaged row group: what came before it is still good
        yield _bad([(-1, f"bad_row: unreadable after {row} rows, rest of the table skipped: {type(e).__name__}: {e}")])


def _read_csv(path: Path, cfg: TableConfig, delimiter: str) -> Batches:
    # TSV has no quoting (IANA text/tab-separated-values): a caption may start with a quote.
    parse = dict(delimiter=delimiter, quote_char='"' if delimiter == "," else False, newlines_in_values=delimiter == ",")
    try:  # the header (and a first block to infer from), for the column check
        head = pcsv.open_csv(str(path), read_options=pcsv.ReadOptions(use_threads=False, block_size=1 << 16),
                             parse_options=pcsv.ParseOptions(**parse, invalid_row_handler=lambda r: "skip"))
    except _UNREADABLE as e:
        raise SourceError(f"{path}: not a readable {'CSV' if delimiter == ',' else 'TSV'} table: {e}") from e
    _check_columns(head.schema.names, cfg, path)
    bad: list[tuple[int, str]] = []

    def on_invalid(r: pcsv.InvalidRow) -> str:  # wrong number of fields: record it, keep reading
        number = r.number if r.number is not None else -1
        bad.append((number, f"bad_row: {r.actual_columns} fields where the header has {r.expected_columns}"))
        return "skip"

    cols = list(dict.fromkeys([cfg.url_col, cfg.caption_col, *cfg.keep_columns]))
    row = 0
    try:  # opening parses the first block too, which may hold damage the smaller head block did not
        reader = pcsv.open_csv(
            str(path), read_options=pcsv.ReadOptions(use_threads=False, block_size=1 << 20),
            parse_options=pcsv.ParseOptions(**parse, invalid_row_handler=on_invalid),
            # Everything as bytes: no type guessed from the first block can fail on a later one, and
            # invalid UTF-8 does not abort the stream.
            convert_options=pcsv.ConvertOptions(include_columns=cols, column_types={c: pa.binary() for c in cols}))
        for batch in reader:
            yield _good(batch, cfg, row)
            row += batch.num_rows
            yield _bad(bad)
            bad.clear()
    except _UNREADABLE as e:  # e.g. an unterminated quote or a damaged gzip: nothing after it can be trusted
        bad.append((-1, f"bad_row: unreadable after {row} rows, rest of the table skipped: {e}"))
    yield _bad(bad)


def _jsonl_blocks(f: Any, size: int = 8 << 20) -> Iterator[tuple[int, bytes]]:
    """``(number of its first line, block)``: the file in blocks of whole lines. Read in small
    pieces so that when a gzip stream turns out damaged, the whole lines before the damage still come."""
    line, buf = 1, bytearray()

    def cut() -> tuple[int, bytes]:
        nonlocal line
        end = buf.rfind(b"\n") + 1
        block = bytes(buf[:end])
        del buf[:end]
        line += block.count(b"\n")
        return line - block.count(b"\n"), block

    try:
        while piece := f.read1(1 << 20):
            buf += piece
            if len(buf) >= size and b"\n" in buf:
                yield cut()
    except (EOFError, OSError, zlib.error):
        if b"\n" in buf:
            yield cut()
        raise
    if buf:
        buf += b"\n"  # a last line without its newline
        yield cut()


def _may_nest_deeply(block: bytes) -> bool:
    """True when some line of ``block`` opens ``MAX_JSON_DEPTH`` brackets or braces (an upper bound
    on its nesting), found at C speed: the openers of each line are kept, as "[", the rest dropped."""
    return b"[" * MAX_JSON_DEPTH in block.translate(_OPENERS_ONLY, _NOT_OPENERS)


def _jsonl_fast(block: bytes, cfg: TableConfig) -> pa.Table | None:
    """The block parsed by pyarrow, or None when some line needs the careful path: pyarrow fails a
    whole block on one bad line, silently replaces invalid UTF-8, which must reach the caption stage,
    and crashes the process on very deep nesting."""
    if _may_nest_deeply(block):
        return None
    try:
        block.decode("utf-8")
        schema = pa.schema([(cfg.url_col, pa.string()), (cfg.caption_col, pa.string())])
        return pjson.read_json(pa.py_buffer(block), read_options=pjson.ReadOptions(use_threads=False, block_size=len(block) + 1),
                               parse_options=pjson.ParseOptions(explicit_schema=schema))
    except (UnicodeDecodeError, pa.ArrowInvalid):
        return None


def _jsonl_careful(block: bytes, first_line: int, first_row: int, cfg: TableConfig
                   ) -> tuple[list[pa.RecordBatch], list[tuple[int, str]]]:
    """The block line by line: good records in CHUNK_SCHEMA and ``(line, reason)`` of the bad lines."""
    good: list[dict[str, Any]] = []
    bad: list[tuple[int, str]] = []
    for number, line in enumerate(block.split(b"\n"), first_line):
        if not line.strip():
            continue
        try:
            rec = json.loads(line.decode("utf-8", "surrogateescape"))
        except ValueError as e:
            bad.append((number, f"bad_row: line {number} is not JSON: {e}"))
            continue
        except RecursionError:
            bad.append((number, f"bad_row: line {number} is JSON nested too deeply"))
            continue
        if not isinstance(rec, dict):
            bad.append((number, f"bad_row: line {number} is a JSON {type(rec).__name__}, not an object"))
            continue
        good.append(rec)

    def text(col: str) -> pa.Array:  # text or nothing; bytes keep undecodable input
        return pa.array([_utf8(r[col]) if isinstance(r.get(col), str) else None for r in good], pa.binary())

    meta = _meta_json([{k: r.get(k) for k in cfg.keep_columns} for r in good]) if cfg.keep_columns else [None] * len(good)
    return [_chunk_batch(first_row, text(cfg.url_col), text(cfg.caption_col), meta)], bad


def _first_keys(block: bytes) -> list[str] | None:
    """Keys of the first JSON object in ``block`` (None if it has none)."""
    for line in block.split(b"\n"):
        with contextlib.suppress(ValueError, RecursionError):
            rec = json.loads(line.decode("utf-8", "surrogateescape"))
            if isinstance(rec, dict):
                return list(rec)
    return None


def _read_jsonl(path: Path, cfg: TableConfig, gz: bool) -> Batches:
    # In blocks through pyarrow (fast), falling back to json.loads line by line for a block pyarrow
    # cannot take, so that each bad line becomes one ``bad_row`` instead of failing the table.
    row, checked, last = 0, False, 0
    opener: Callable[..., Any] = gzip.open if gz else open
    with opener(path, "rb") as f:
        try:
            for number, block in _jsonl_blocks(f):
                last = number + block.count(b"\n") - 1
                if not checked and (keys := _first_keys(block)) is not None:
                    _check_columns(keys, cfg, path)  # JSONL has no header: the first record's keys
                    checked = True
                table = _jsonl_fast(block, cfg)
                if table is None:
                    batches, bad = _jsonl_careful(block, number, row, cfg)
                else:
                    batches, bad = table.to_batches(_BATCH_ROWS), []
                for batch in batches:
                    yield batch if table is None else _good(batch, cfg, row)
                    row += batch.num_rows
                yield _bad(bad)
        except _UNREADABLE as e:  # truncated or corrupt gzip
            yield _bad([(last + 1, f"bad_row: unreadable after line {last}, rest of the table skipped: {e}")])


class _ChunkWriter:
    """Writes batches into ``chunk-NNNNNN.parquet`` files of at most ``unit_size`` rows, each atomically."""

    def __init__(self, folder: Path, unit_size: int) -> None:
        self.folder, self.unit_size = folder, unit_size
        self.names: list[str] = []
        self._stack: contextlib.ExitStack | None = None
        self._writer: pq.ParquetWriter | None = None
        self._rows = 0

    def write(self, batch: pa.RecordBatch) -> None:
        while batch.num_rows:
            if self._writer is None:
                self.names.append(f"chunk-{len(self.names):06d}.parquet")
                self._stack = contextlib.ExitStack()
                f = self._stack.enter_context(atomic_write(self.folder / self.names[-1]))
                self._writer = pq.ParquetWriter(f, CHUNK_SCHEMA)
                self._rows = 0
            take = min(batch.num_rows, self.unit_size - self._rows)
            self._writer.write_batch(batch.slice(0, take))
            self._rows += take
            batch = batch.slice(take)
            if self._rows == self.unit_size:
                self.close()

    def close(self) -> None:
        if self._writer is not None and self._stack is not None:
            self._writer.close()
            self._stack.close()  # fsync + rename into place
        self._writer = self._stack = None

    def abort(self, exc: BaseException) -> None:
        """Drop the chunk being written (its temp file); finished chunks stay."""
        if self._writer is not None:
            with contextlib.suppress(Exception):
                self._writer.close()
        if self._stack is not None:
            self._stack.__exit__(type(exc), exc, exc.__traceback__)
        self._writer = self._stack = None


class Table(Source):
    name = "table"
    Config = TableConfig

    def __init__(self, cfg: TableConfig, name: str | None = None) -> None:
        super().__init__(cfg, name)
        self.format, self.gzipped = table_format(self.root, cfg.format)
        self.table_dir = Path(os.path.abspath(self.root)).parent

    def batches(self, work_dir: Path) -> Batches:
        """The table as CHUNK_SCHEMA batches, streamed (a gzipped parquet is first unpacked into ``work_dir``)."""
        cfg = self.cfg
        if self.format == "parquet":
            path = self.root
            if self.gzipped:  # parquet needs random access: unpack once, streaming, beside the chunks
                path = work_dir / self.label / "input.parquet"
                try:
                    with gzip.open(self.root, "rb") as src, atomic_write(path) as dst:
                        shutil.copyfileobj(src, dst, 1 << 20)
                except _UNREADABLE as e:  # a cut or corrupt download: parquet needs the whole file
                    raise SourceError(f"{self.root}: cannot unpack the gzipped parquet table ({type(e).__name__}: {e}); "
                                      "download it again") from e
            return _read_parquet(path, cfg)
        if self.format == "jsonl":
            return _read_jsonl(self.root, cfg, self.gzipped)
        return _read_csv(self.root, cfg, "," if self.format == "csv" else "\t")

    def _fingerprint(self, unit_size: int) -> dict[str, Any]:
        st = self.root.stat()
        c = self.cfg
        return {"version": 1, "table": os.path.abspath(self.root), "size": st.st_size, "mtime_ns": st.st_mtime_ns,
                "format": self.format, "url_col": c.url_col, "caption_col": c.caption_col,
                "keep_columns": list(c.keep_columns), "limit": c.limit, "unit_size": unit_size}

    def plan(self, work_dir: Path, unit_size: int) -> list[str]:
        """Stream the table once into chunk files; a re-plan of the same table and options reuses them."""
        folder = Path(work_dir) / self.label
        done = folder / "plan.json"
        want = self._fingerprint(unit_size)
        with contextlib.suppress(OSError, ValueError, KeyError):
            old = json.loads(done.read_text())
            if old["fingerprint"] == want and all((folder / u).exists() for u in old["units"]):
                return list(old["units"])
        done.unlink(missing_ok=True)
        writer = _ChunkWriter(folder, unit_size)
        left = self.cfg.limit
        bar = tqdm(desc=f"plan {self.label}", unit="row", unit_scale=True, disable=None)
        try:
            for batch in self.batches(Path(work_dir)):
                bar.update(batch.num_rows if left is None else min(batch.num_rows, left))
                if left is not None:
                    batch = batch.slice(0, left)
                    left -= batch.num_rows
                writer.write(batch)
                if left == 0:
                    break
            writer.close()
        except BaseException as e:
            writer.abort(e)
            raise
        finally:
            bar.close()
        for stale in set(p.name for p in folder.glob("chunk-*.parquet")) - set(writer.names):
            (folder / stale).unlink()  # from an earlier plan with other options
        with atomic_write(done, "w") as f:
            json.dump({"fingerprint": want, "units": writer.names}, f)
        return writer.names

    def read(self, unit: str, work_dir: Path) -> Iterator[Sample | Rejected]:
        """The rows of one chunk written by ``plan``."""
        pf = pq.ParquetFile(Path(work_dir) / self.label / unit)
        for batch in pf.iter_batches(batch_size=_BATCH_ROWS):
            for r in batch.to_pylist():
                yield self._item(r)

    def _item(self, r: dict[str, Any]) -> Sample | Rejected:
        if r["bad_row"] is not None:
            source_id = f"bad_row:{r['row']}"
            return Rejected(uid=self.uid(source_id), source=self.label, source_id=source_id, reason=r["bad_row"])
        source_id = str(r["row"])
        uid = self.uid(source_id)
        url = (r["url"] or b"").decode("utf-8", "surrogateescape").strip()
        if not url:
            return Rejected(uid=uid, source=self.label, source_id=source_id, reason="no_url")
        if not is_text(url):  # the decisions table (and the shard json) store the url as UTF-8 text
            return Rejected(uid=uid, source=self.label, source_id=source_id,
                            reason=f"bad_url: {text_id(url)[:100]!r} is not UTF-8 text")
        if r["caption"] is None:
            return Rejected(uid=uid, source=self.label, source_id=source_id, reason="no_caption")
        meta: dict[str, Any] = dict.fromkeys(REQUIRED_META)
        if r["meta"]:
            meta.update(json.loads(r["meta"]))
        return Sample(uid=uid, source=self.label, source_id=source_id, image=None, image_ext="",
                      caption=r["caption"].decode("utf-8", "surrogateescape"), meta=meta,
                      url=resolve_url(url, self.table_dir))
