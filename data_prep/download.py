"""Concurrent image fetching for the builder's workers: HTTP(S), file:// URLs and local paths.

A worker hands ``Downloader.fetch_many`` a batch of URLs (hundreds) and gets one ``Fetched`` per URL,
in input order. Nothing raises for a bad URL: every failure becomes a reason ``"code: detail"`` with a
short stable code (counted by the report) and a ``retryable`` flag (transient failures worth another
try in a later run). Codes: ``http_<status>``, ``timeout``, ``connection_error``, ``ssl_error``,
``truncated``, ``too_large``, ``wrong_type``, ``redirect_loop``, ``robots_noai``, ``bad_url``,
``bad_encoding``, ``missing_file``, ``not_a_file``, ``read_error``, ``error`` (anything unexpected).

Speed comes from reusing connections: one ``requests.Session`` per thread (sessions are not
thread-safe), each keeping its keep-alive connections in an adapter pool; error bodies are drained
so their connection can be reused too. Bodies are streamed and abandoned past ``max_bytes``.
"""
from __future__ import annotations

import http.cookiejar
import os
import re
import stat
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Sequence
from urllib.parse import unquote, urlsplit
from urllib.request import getproxies, url2pathname

import requests
import urllib3
from requests.adapters import HTTPAdapter
from requests.models import PreparedRequest

_CHUNK = 1 << 18  # streaming read size: big enough that a typical image is one or two reads
_DRAIN = 1 << 16  # error bodies up to this size are read so the connection stays reusable
_RETRY_STATUS = frozenset({408, 429})  # plus every 5xx
_NOAI = frozenset({"noai", "noimageai"})
# Servers often label images generically; for these the magic bytes decide whether it is an image.
_GENERIC_TYPES = frozenset({"", "application/octet-stream", "binary/octet-stream", "application/binary"})
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")

# What a request can raise for one bad URL or server; anything else is a bug and reported as ``error``.
_ERRORS = (requests.exceptions.RequestException, urllib3.exceptions.LocationParseError, ValueError)
_BAD_URL = (requests.exceptions.InvalidURL, requests.exceptions.MissingSchema, requests.exceptions.InvalidSchema,
            requests.exceptions.URLRequired, urllib3.exceptions.LocationParseError,
            ValueError)  # urllib.parse's own complaints, e.g. "Invalid IPv6 URL" in a redirect
EXT_MIME = {"jpg": "image/jpeg", "png": "image/png", "webp": "image/webp", "gif": "image/gif",
            "bmp": "image/bmp", "tiff": "image/tiff"}
_MIME_EXT = {**{m: e for e, m in EXT_MIME.items()}, "image/jpg": "jpg", "image/pjpeg": "jpg",
             "image/x-ms-bmp": "bmp", "image/x-bmp": "bmp", "image/tif": "tiff"}
_SUFFIX_EXT = {"jpg": "jpg", "jpeg": "jpg", "jpe": "jpg", "png": "png", "webp": "webp", "gif": "gif",
               "bmp": "bmp", "tif": "tiff", "tiff": "tiff"}


@dataclass
class DownloadConfig:
    """The ``download:`` block of ``conf/prep.yaml``."""

    threads: int = 32  # concurrent requests per worker process
    timeout: float = 10.0  # seconds, per request (connect and each read)
    retries: int = 2  # extra attempts for retryable failures, with exponential backoff
    backoff: float = 0.5  # seconds before the first retry, doubled each time
    max_bytes: int = 20_000_000  # larger bodies are abandoned (the body is streamed, reading stops early)
    allowed_types: list[str] = field(default_factory=lambda: ["image/"])  # content-type prefixes; [] = any
    respect_robots: bool = True  # skip responses whose X-Robots-Tag says noai / noimageai (any scope)
    max_redirects: int = 5
    user_agent: str = "clipforge-data-prep/0.1"
    prefetch: int = 3  # later batches whose downloads run while a worker processes the current one

    def __post_init__(self) -> None:
        checks = [
            ("threads", self.threads >= 1, "must be >= 1"),
            ("timeout", self.timeout > 0, "must be > 0 seconds"),
            ("retries", self.retries >= 0, "must be >= 0"),
            ("backoff", self.backoff >= 0, "must be >= 0 seconds"),
            ("max_bytes", self.max_bytes >= 1, "must be >= 1"),
            ("max_redirects", self.max_redirects >= 0, "must be >= 0"),
            ("prefetch", self.prefetch >= 0, "must be >= 0 batches"),
        ]
        for name, ok, allowed in checks:
            if not ok:
                raise ValueError(f"{name}: got {getattr(self, name)}, {allowed}")
        if isinstance(self.allowed_types, str) or not all(
                isinstance(t, str) and t for t in self.allowed_types):
            raise ValueError(f"allowed_types: got {self.allowed_types!r}, must be a list of non-empty "
                             "content-type prefixes such as ['image/'] ([] = any type)")
        self.allowed_types = [t.strip().lower() for t in self.allowed_types]
        if not isinstance(self.user_agent, str) or not self.user_agent.strip():
            raise ValueError(f"user_agent: got {self.user_agent!r}, must be a non-empty string")


@dataclass(slots=True)
class Fetched:
    """One URL's outcome: ``data`` when ``reason`` is None, else why not."""

    data: bytes | None  # body when ok
    ext: str  # "jpg" | "png" | "webp" | "gif" | "bmp" | "tiff" | "": magic bytes, else content-type, else URL
    reason: str | None  # None when ok, else "code: detail"
    retryable: bool  # transient failure worth retrying in a later run
    status: int | None  # final HTTP status (None for local files and failures before a response)
    content_type: str | None  # media type without parameters, lower case
    seconds: float  # wall time of the fetch, retries included

    @property
    def ok(self) -> bool:
        return self.reason is None


def sniff_ext(head: bytes) -> str:
    """Image extension from a file's magic bytes, "" when it is none of the known formats."""
    if head.startswith(b"\xff\xd8\xff"):
        return "jpg"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    if head[:4] in (b"II*\x00", b"MM\x00*"):
        return "tiff"
    if head[:2] == b"BM" and len(head) >= 26:  # "BM" alone is too weak: also require a plausible header
        return "bmp"
    return ""


def guess_ext(data: bytes | None, content_type: str | None, url: str) -> str:
    """The shard member extension: magic bytes first (servers mislabel), then content-type, then URL suffix."""
    ext = sniff_ext(data[:32]) if data else ""
    if not ext and content_type:
        ext = _MIME_EXT.get(content_type, "")
    if not ext:
        path = urlsplit(url).path if _SCHEME.match(url) else url
        ext = _SUFFIX_EXT.get(path.rsplit(".", 1)[-1].lower(), "") if "." in path else ""
    return ext


def robots_forbid(tag: str | None) -> bool:
    """True when an X-Robots-Tag value carries noai/noimageai, bare or scoped to any user agent
    ("noai", "otherbot: noai, noimageai"); several headers arrive joined by commas."""
    if not tag:
        return False
    return any(tok in _NOAI for tok in re.split(r"[\s,:;]+", tag.lower()))


def _fail(reason: str, retryable: bool = False, status: int | None = None, content_type: str | None = None) -> Fetched:
    return Fetched(None, "", reason, retryable, status, content_type, 0.0)


class Downloader:
    """Fetches URLs concurrently with ``cfg.threads`` threads; use as a context manager or ``close()``."""

    def __init__(self, cfg: DownloadConfig) -> None:
        self.cfg = cfg
        self._local = threading.local()
        self._sessions: list[requests.Session] = []
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=cfg.threads, thread_name_prefix="download")
        # Reading proxy/netrc/CA settings from the environment on every request costs as much as a
        # local request; read them once here and switch the per-request lookup off when there are none.
        self._env_proxies = bool(getproxies())
        self._verify: bool | str = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE") or True
        self._headers = {**requests.utils.default_headers(), "User-Agent": cfg.user_agent,
                         "Accept": "image/*,*/*;q=0.8"}

    def __enter__(self) -> Downloader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def submit(self, url: str) -> Future:
        """``fetch(url)`` queued on the download threads; the future's result is a ``Fetched``."""
        return self._pool.submit(self.fetch, url)

    def fetch_many(self, urls: Sequence[str]) -> list[Fetched]:
        """``fetch`` of every URL, concurrently; results in input order."""
        return list(self._pool.map(self.fetch, urls))

    def fetch(self, url: str) -> Fetched:
        """One URL, retrying retryable failures ``cfg.retries`` times with exponential backoff."""
        t0 = time.perf_counter()
        attempt = 0
        while True:
            try:
                res = self._fetch_once(url)
            except Exception as e:  # never let one odd URL take down a batch
                res = _fail(f"error: {type(e).__name__}: {e}")
            if res.reason is None or not res.retryable or attempt >= self.cfg.retries:
                break
            time.sleep(self.cfg.backoff * 2 ** attempt)
            attempt += 1
        res.seconds = time.perf_counter() - t0
        return res

    def close(self) -> None:
        """Stop the threads and close every session's connections."""
        self._pool.shutdown(wait=True)
        with self._lock:
            for s in self._sessions:
                s.close()
            self._sessions.clear()

    # -- one attempt ---------------------------------------------------------------------------

    def _fetch_once(self, url: str) -> Fetched:
        if not isinstance(url, str) or not url.strip():
            return _fail(f"bad_url: {url!r}")
        m = _SCHEME.match(url)
        scheme = m.group(1).lower() if m else ""
        if scheme in ("http", "https"):
            return self._fetch_http(url)
        if scheme == "file":
            parts = urlsplit(url)
            if parts.netloc not in ("", "localhost"):
                return _fail(f"bad_url: file URL on another host: {url}")
            return self._read_file(url2pathname(unquote(parts.path)), url)
        if scheme:
            return _fail(f"bad_url: unsupported scheme {scheme!r}")
        return self._read_file(url, url)

    def _read_file(self, path: str, url: str) -> Fetched:
        try:
            # Regular files only, checked before open: opening a FIFO blocks until someone writes to
            # it, and reading /dev/zero never ends (a table row may name any path).
            mode = os.stat(path).st_mode
            if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):  # a folder fails below, as missing_file
                return _fail(f"not_a_file: {path} is not a regular file (a FIFO, device or socket)")
            with open(path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size > self.cfg.max_bytes:
                    return _fail(f"too_large: {size} bytes > max_bytes {self.cfg.max_bytes}")
                data = f.read()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as e:
            return _fail(f"missing_file: {e.strerror}: {path}")
        except (OSError, ValueError) as e:  # permissions, I/O errors, NUL in the path
            return _fail(f"read_error: {type(e).__name__}: {e}")
        return Fetched(data, guess_ext(data, None, url), None, False, None, None, 0.0)

    def _session(self) -> requests.Session:
        s = getattr(self._local, "session", None)
        if s is None:
            s = requests.Session()
            # One thread issues one request at a time, but it may talk to many hosts: keep a pool per
            # host for up to ``threads`` hosts. Retries are ours (with reason codes), not urllib3's.
            adapter = HTTPAdapter(pool_connections=self.cfg.threads, pool_maxsize=self.cfg.threads, max_retries=0)
            s.mount("http://", adapter)
            s.mount("https://", adapter)
            s.max_redirects = self.cfg.max_redirects
            # No cookies: image fetches need none, and a jar filled by thousands of hosts only grows.
            s.cookies.set_policy(http.cookiejar.DefaultCookiePolicy(allowed_domains=[]))
            s.trust_env = self._env_proxies
            s.verify = self._verify
            self._local.session = s
            with self._lock:
                self._sessions.append(s)
        return s

    def _fetch_http(self, url: str) -> Fetched:
        timeout = (self.cfg.timeout, self.cfg.timeout)
        resp: requests.Response | None = None
        try:
            # A hand-prepared request skips Session.request's per-call merging of settings, about a
            # fifth of the client's CPU per request; the session still follows redirects and proxies.
            req = PreparedRequest()
            req.prepare(method="GET", url=url, headers=self._headers)
            resp = self._session().send(req, stream=True, timeout=timeout)
            with resp:
                return self._read_response(resp, url)
        except _ERRORS as e:
            reason, retryable = self._classify(e)
            if resp is None:  # failed before any response (or in redirects)
                return _fail(reason, retryable)
            return _fail(reason, retryable, resp.status_code, _media_type(resp) or None)

    def _classify(self, e: Exception) -> tuple[str, bool]:
        """Reason and retryability of an exception raised while requesting or reading a body."""
        if isinstance(e, requests.exceptions.TooManyRedirects):
            return f"redirect_loop: more than {self.cfg.max_redirects} redirects", False
        if isinstance(e, requests.exceptions.Timeout):  # before ConnectionError: ConnectTimeout is both
            return f"timeout: {_short(e)}", True
        if isinstance(e, requests.exceptions.SSLError):  # a bad certificate does not heal by retrying
            return f"ssl_error: {_short(e)}", False
        if isinstance(e, requests.exceptions.ConnectionError):
            # iter_content reports a read timeout in the body as a ConnectionError wrapping urllib3's
            if e.args and isinstance(e.args[0], urllib3.exceptions.ReadTimeoutError):
                return f"timeout: {_short(e)}", True
            return f"connection_error: {_short(e)}", True
        if isinstance(e, requests.exceptions.ChunkedEncodingError):  # connection broken mid-body
            return f"truncated: {_short(e)}", True
        if isinstance(e, requests.exceptions.ContentDecodingError):
            return f"bad_encoding: {_short(e)}", False
        if isinstance(e, _BAD_URL):
            return f"bad_url: {_short(e)}", False
        return f"error: {type(e).__name__}: {_short(e)}", False

    def _read_response(self, resp: requests.Response, url: str) -> Fetched:
        cfg = self.cfg
        status = resp.status_code
        ctype = _media_type(resp)
        if not 200 <= status < 300:
            _drain(resp)
            return _fail(f"http_{status}: {resp.reason}", status in _RETRY_STATUS or status >= 500,
                         status, ctype or None)
        if cfg.respect_robots and robots_forbid(resp.headers.get("X-Robots-Tag")):
            return _fail(f"robots_noai: X-Robots-Tag {resp.headers['X-Robots-Tag']}", False, status, ctype or None)
        generic = ctype in _GENERIC_TYPES
        if cfg.allowed_types and not generic and not ctype.startswith(tuple(cfg.allowed_types)):
            return _fail(f"wrong_type: {ctype}", False, status, ctype)
        length = _content_length(resp)
        if length is not None and length > cfg.max_bytes:
            return _fail(f"too_large: Content-Length {length} > max_bytes {cfg.max_bytes}", False, status, ctype)

        chunks: list[bytes] = []
        n = 0
        for chunk in resp.iter_content(chunk_size=_CHUNK):
            n += len(chunk)
            if n > cfg.max_bytes:  # no or lying Content-Length: stop reading, drop the connection
                return _fail(f"too_large: body > max_bytes {cfg.max_bytes}", False, status, ctype or None)
            chunks.append(chunk)
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        # urllib3 2 raises on a short body (caught as ChunkedEncodingError); urllib3 1.x, which requests
        # still accepts, does not. Only comparable when not content-decoded (gzip changes the length).
        if length is not None and n < length and not resp.headers.get("Content-Encoding"):
            return _fail(f"truncated: {n} of {length} bytes", True, status, ctype or None)

        ext = guess_ext(data, ctype, resp.url or url)
        if cfg.allowed_types and generic and not EXT_MIME.get(ext, "").startswith(tuple(cfg.allowed_types)):
            return _fail(f"wrong_type: {ctype or 'no content-type'}, body is not a known image",
                         False, status, ctype or None)
        return Fetched(data, ext, None, False, status, ctype or None, 0.0)


def _media_type(resp: requests.Response) -> str:
    return resp.headers.get("Content-Type", "").split(";", 1)[0].strip().lower()


def _content_length(resp: requests.Response) -> int | None:
    try:
        return int(resp.headers["Content-Length"])
    except (KeyError, ValueError):
        return None


def _drain(resp: requests.Response) -> None:
    """Read a small error body so its keep-alive connection returns to the pool (else it is closed)."""
    length = _content_length(resp)
    if length is not None and length <= _DRAIN:
        try:
            for _ in resp.iter_content(chunk_size=_DRAIN):
                pass
        except requests.exceptions.RequestException:
            pass


def _short(e: BaseException) -> str:
    """The innermost useful message: requests nests urllib3's errors (and those their causes) in args."""
    inner = e
    while True:
        nested = [a for a in inner.args if isinstance(a, BaseException)]
        if not nested:
            break
        inner = nested[-1]
    reason = getattr(inner, "reason", None)
    return str(reason if isinstance(reason, BaseException) else inner)[:200]
