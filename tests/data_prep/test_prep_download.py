"""Downloader against a real local HTTP server serving real Tux Paint stamps, and its fault routes."""
from __future__ import annotations

import io
import time
from pathlib import Path
from typing import Iterator

import pytest
from PIL import Image

from data_prep.download import DownloadConfig, Downloader, Fetched, guess_ext, robots_forbid, sniff_ext
from tests import stamps as stamps_on_disk
from tests.data_prep.image_server import ImageServer

STAMPS = stamps_on_disk.ROOT
pytestmark = pytest.mark.skipif(not STAMPS.is_dir(), reason="apt-get install tuxpaint-stamps-default")

# Short timeouts and backoffs keep the fault tests fast; retries off unless a test is about them.
FAST = dict(timeout=0.3, retries=0, backoff=0.01)


@pytest.fixture(scope="module")
def server() -> Iterator[ImageServer]:
    with ImageServer(STAMPS) as srv:
        yield srv


@pytest.fixture(scope="module")
def stamps() -> list[Path]:
    """40 real PNG stamps from several categories (evenly spaced in path order)."""
    every = [s.path for s in stamps_on_disk.all_stamps()]
    return every[:: max(1, len(every) // 40)][:40]


def fetch(url: str, **cfg: object) -> Fetched:
    with Downloader(DownloadConfig(**{**FAST, **cfg})) as d:
        return d.fetch(url)


@pytest.mark.parametrize("field,value", [
    ("threads", 0), ("timeout", 0), ("retries", -1), ("backoff", -0.5), ("max_bytes", 0),
    ("max_redirects", -1), ("allowed_types", "image/"), ("allowed_types", [""]), ("user_agent", " "),
])
def test_config_rejects_bad_values_naming_the_field(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=rf"^{field}: "):
        DownloadConfig(**{field: value})


def test_real_stamps_come_back_byte_exact(server: ImageServer, stamps: list[Path]) -> None:
    with Downloader(DownloadConfig(threads=8)) as d:
        got = d.fetch_many([server.img_url(p) for p in stamps])
    for path, res in zip(stamps, got):
        assert res.reason is None and res.ok, (path, res.reason)
        assert res.data == path.read_bytes()
        assert (res.ext, res.status, res.content_type, res.retryable) == ("png", 200, "image/png", False)
        assert res.seconds > 0


def test_order_kept_and_connections_reused_across_many_concurrent_urls(
        server: ImageServer, stamps: list[Path]) -> None:
    # 400 URLs interleaving real files and 404s: every result must sit at its URL's index.
    urls = [server.img_url(stamps[i % len(stamps)]) if i % 7 else server.url(f"/img/missing-{i}.png")
            for i in range(400)]
    before = server.connections
    with Downloader(DownloadConfig(threads=16)) as d:
        got = d.fetch_many(urls)
    assert len(got) == len(urls)
    for i, res in enumerate(got):
        if i % 7:
            assert res.data == stamps[i % len(stamps)].read_bytes()
        else:
            assert res.reason == "http_404: Not Found" and res.data is None
    # keep-alive (drained 404 bodies included): about one connection per thread, not per request
    assert server.connections - before <= 2 * 16


@pytest.mark.parametrize("path,code,retryable,cfg", [
    ("/fault/404", "http_404", False, {}),
    ("/fault/403", "http_403", False, {}),
    ("/fault/500", "http_500", True, {}),
    ("/fault/503", "http_503", True, {}),
    ("/fault/429", "http_429", True, {}),
    ("/fault/truncated", "truncated", True, {}),
    ("/fault/html", "wrong_type", False, {}),
    ("/fault/html?type=application/octet-stream", "wrong_type", False, {}),  # generic label, HTML body
    ("/fault/redirect-loop", "redirect_loop", False, {}),
    ("/fault/redirect?to=/fault/404", "http_404", False, {}),
    ("/fault/noai", "robots_noai", False, {}),
    ("/fault/noai?tag=otherbot:%20noimageai", "robots_noai", False, {}),
    ("/fault/noai?tag=googlebot:%20noindex,%20nofollow", None, False, {}),
    ("/fault/huge", "too_large", False, {"max_bytes": 1_000_000}),
    ("/fault/huge?declare=0&bytes=3000000", "too_large", False, {"max_bytes": 1_000_000}),
    ("/fault/slow?seconds=2", "timeout", True, {}),
    ("/fault/slow?seconds=2&where=body", "timeout", True, {}),
])
def test_fault_routes_give_their_reason_code(server: ImageServer, path: str, code: str | None,
                                             retryable: bool, cfg: dict) -> None:
    res = fetch(server.url(path), **cfg)
    assert (res.reason.split(":")[0] if res.reason else None) == code, res.reason
    assert res.retryable is retryable
    assert (res.data is None) is (code is not None)
    assert res.seconds < 1.5  # timeouts give up after cfg.timeout, oversized bodies are not read


def test_a_read_timeout_in_the_middle_of_the_body_still_reports_the_status(server: ImageServer) -> None:
    res = fetch(server.url("/fault/slow?seconds=2&where=body"))
    assert (res.status, res.content_type) == (200, "image/png")


def test_retryable_failures_are_retried_with_exponential_backoff(server: ImageServer) -> None:
    before = server.hits["/fault/500"]
    res = fetch(server.url("/fault/500"), retries=2, backoff=0.1)
    assert res.reason == "http_500: Internal Server Error" and res.retryable
    assert server.hits["/fault/500"] - before == 3  # one try + two retries
    assert res.seconds >= 0.1 + 0.2  # waits of backoff, then 2 x backoff


def test_final_failures_are_not_retried(server: ImageServer) -> None:
    before = server.hits["/fault/404"]
    res = fetch(server.url("/fault/404"), retries=3, backoff=0.5)
    assert res.reason.startswith("http_404") and not res.retryable
    assert server.hits["/fault/404"] - before == 1 and res.seconds < 0.5


def test_flaky_route_succeeds_within_the_retries(server: ImageServer) -> None:
    ok = fetch(server.url("/fault/flaky?key=a&fails=2"), retries=2)
    assert ok.ok and ok.data == server.default_bytes and ok.ext == "png"
    # one failure more than the retries allow: the last failure is reported, as retryable
    bad = fetch(server.url("/fault/flaky?key=b&fails=3&status=429"), retries=2)
    assert bad.reason == "http_429: Too Many Requests" and bad.retryable and bad.status == 429


def test_redirects_are_followed_to_the_image(server: ImageServer, stamps: list[Path]) -> None:
    target = server.img_url(stamps[3]).split(str(server.port), 1)[1]
    res = fetch(server.url(f"/fault/redirect?to={target}"))
    assert res.ok and res.data == stamps[3].read_bytes()
    assert fetch(server.url(f"/fault/redirect?to={target}"), max_redirects=0).reason.startswith("redirect_loop")
    # a redirect cannot send the downloader to another scheme (e.g. read local files)
    assert fetch(server.url("/fault/redirect?to=file:///etc/hostname")).reason.startswith("bad_url")


def test_huge_undeclared_body_is_abandoned_early(server: ImageServer) -> None:
    before = server.huge_sent
    t0 = time.perf_counter()
    res = fetch(server.url("/fault/huge?declare=0&bytes=1000000000"), max_bytes=1_000_000)
    assert res.reason.startswith("too_large")
    while server.huge_sent == before and time.perf_counter() - t0 < 2:
        time.sleep(0.02)  # the server records what it sent once it notices the closed connection
    # only socket buffers beyond max_bytes went out, not the announced gigabyte
    assert 0 < server.huge_sent - before < 64_000_000
    assert time.perf_counter() - t0 < 3


def test_robots_and_type_checks_can_be_switched_off(server: ImageServer) -> None:
    noai = fetch(server.url("/fault/noai"), respect_robots=False)
    assert noai.ok and noai.data == server.default_bytes
    html = fetch(server.url("/fault/html"), allowed_types=[])
    assert html.ok and html.data.startswith(b"<!doctype html>") and html.ext == ""
    assert fetch(server.url("/fault/as?type=image/png"), allowed_types=["image/jpeg"]).reason == "wrong_type: image/png"


def test_generic_or_missing_content_type_is_judged_by_magic_bytes(server: ImageServer) -> None:
    for path, ctype in [("/fault/as?type=application/octet-stream", "application/octet-stream"),
                        ("/fault/as", None)]:
        res = fetch(server.url(path))
        assert res.ok and res.data == server.default_bytes
        assert (res.ext, res.content_type) == ("png", ctype)


def test_empty_body_is_fetched_not_judged(server: ImageServer) -> None:
    res = fetch(server.url("/fault/empty"))
    assert res.ok and res.data == b""  # the image stage rejects empty files, recording why
    assert res.ext == "png"  # no magic bytes: the content-type decides


def test_local_paths_and_file_urls(stamps: list[Path], tmp_path: Path) -> None:
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    urls = [str(stamps[0]), stamps[1].as_uri(), str(tmp_path / "nope.png"), (tmp_path / "nope.png").as_uri(),
            str(empty), str(tmp_path), "file://otherhost/etc/hostname"]
    with Downloader(DownloadConfig(**FAST)) as d:
        got = d.fetch_many(urls)
    assert got[0].data == stamps[0].read_bytes() and got[0].ext == "png"
    assert got[1].data == stamps[1].read_bytes() and got[1].ext == "png"
    assert [g.reason.split(":")[0] for g in got[2:4]] == ["missing_file", "missing_file"]
    assert got[4].ok and got[4].data == b""
    assert got[5].reason.startswith("missing_file")  # a directory is no file
    assert got[6].reason.startswith("bad_url")
    assert not any(g.retryable for g in got)
    assert fetch(str(stamps[0]), max_bytes=100).reason.startswith("too_large")


def test_bad_urls_never_raise(server: ImageServer) -> None:
    urls = ["", "ftp://example.com/a.png", "http://", "http://[::1/x", "http://exa mple.com/a.png",
            "javascript://alert(1)", None, server.url("/fault/redirect?to=http://%5B::1/")]
    with Downloader(DownloadConfig(**FAST)) as d:
        got = d.fetch_many(urls)  # type: ignore[arg-type]  (None: a null cell in a URL column)
    assert [g.reason.split(":")[0] for g in got] == ["bad_url"] * len(urls)
    assert not any(g.retryable or g.data for g in got)


def test_refused_connection_is_a_retryable_connection_error() -> None:
    with ImageServer(STAMPS) as srv:
        url = srv.url("/img/x.png")
    res = fetch(url)  # the server is closed: nothing listens on its port any more
    assert res.reason.startswith("connection_error") and res.retryable and res.status is None


@pytest.mark.parametrize("fmt,ext", [("JPEG", "jpg"), ("WEBP", "webp"), ("GIF", "gif"), ("BMP", "bmp"),
                                     ("TIFF", "tiff"), ("PNG", "png")])
def test_ext_comes_from_magic_bytes_before_the_label(stamps: list[Path], tmp_path: Path,
                                                     fmt: str, ext: str) -> None:
    # a real stamp re-encoded, saved under a misleading .png name (served as image/png)
    buf = io.BytesIO()
    Image.open(stamps[5]).convert("RGB").save(buf, fmt)
    (tmp_path / "mislabelled.png").write_bytes(buf.getvalue())
    with ImageServer(tmp_path) as srv:
        res = fetch(srv.img_url("mislabelled.png"))
    assert res.ok and res.content_type == "image/png" and res.ext == ext
    assert sniff_ext(buf.getvalue()) == ext


def test_guess_ext_falls_back_to_content_type_then_url_suffix() -> None:
    assert guess_ext(b"not an image", "image/jpeg", "http://h/a.png") == "jpg"
    assert guess_ext(b"not an image", "application/octet-stream", "http://h/a.JPEG?x=1") == "jpg"
    assert guess_ext(None, None, "/data/a.tif") == "tiff"
    assert guess_ext(b"BM", None, "http://h/noext") == ""  # two bytes are too weak a BMP signature


@pytest.mark.parametrize("tag,forbidden", [
    ("noai", True), ("NoImageAI", True), ("otherbot: noai", True), ("noindex, noai", True),
    ("googlebot: noindex, nofollow", False), ("noarchive", False), ("all", False), (None, False),
])
def test_robots_forbid(tag: str | None, forbidden: bool) -> None:
    assert robots_forbid(tag) is forbidden

