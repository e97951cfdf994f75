"""A real HTTP server on 127.0.0.1 for download tests and benchmarks: real image files plus fault routes.

    with ImageServer("/usr/share/tuxpaint/stamps") as srv:
        srv.img_url("animals/cat.png")       # the file's bytes, right Content-Type and Content-Length
        srv.url("/fault/404")                # faults, see ``_Handler`` for the full list

Standalone (a benchmark wants the server in its own process, off the client's GIL):
``python -m tests.data_prep.image_server /usr/share/tuxpaint/stamps --port 8000``.

HTTP/1.1 with keep-alive, Nagle off and a deep accept backlog, so a many-threaded client is served at
thousands of requests per second instead of stalling on delayed ACKs or dropped SYNs.
"""
from __future__ import annotations

import argparse
import collections
import functools
import mimetypes
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, quote, unquote, urlsplit

_CHUNK = 1 << 16


class _Server(ThreadingHTTPServer):
    daemon_threads = True  # a client holding a keep-alive connection must not block close()
    request_queue_size = 1024  # the default 5 drops SYNs under a burst of new connections (1 s stalls)

    def __init__(self, addr: tuple[str, int], root: Path, default_image: bytes, default_type: str) -> None:
        super().__init__(addr, _Handler)
        self.root = root
        self.default_image = default_image
        self.default_type = default_type
        self.lock = threading.Lock()
        self.hits: collections.Counter[str] = collections.Counter()  # route path -> requests
        self.flaky_left: dict[str, int] = {}  # flaky key -> failures still to give
        self.connections = 0
        self.huge_sent = 0  # body bytes /fault/huge managed to send before the client hung up
        # Path checks and disk reads cost more than the rest of a request: cache recent files.
        self.read = functools.lru_cache(maxsize=2048)(self._read)

    def _read(self, rel: str) -> tuple[bytes, str] | None:
        """Bytes and content-type of the file ``rel`` under the root; None if it is not a file in it."""
        target = (self.root / rel).resolve()
        if not target.is_relative_to(self.root) or not target.is_file():
            return None
        return target.read_bytes(), mimetypes.guess_type(target.name)[0] or "application/octet-stream"

    def handle_error(self, request, client_address) -> None:  # noqa: ANN001 (socketserver's signature)
        pass  # clients abandoning huge/truncated bodies is the point of several routes; stay quiet


class _Handler(BaseHTTPRequestHandler):
    """Routes (query parameters in brackets):

    /img/<relative path>       a file under the root
    /fault/<status>            that status, e.g. /fault/404, /fault/500, /fault/429
    /fault/flaky[key,fails,status]  ``status`` (503) for the first ``fails`` (2) requests of ``key``, then the image
    /fault/slow[seconds,where] sleep before the headers (where=headers) or halfway through the body (where=body)
    /fault/truncated           Content-Length of the whole image, half of it sent, connection closed
    /fault/html[type]          an HTML page (Content-Type ``type``, default text/html)
    /fault/as[type]            the image with Content-Type ``type`` ("" = no Content-Type header)
    /fault/empty               200, image/png, zero bytes
    /fault/redirect-loop       302 to itself
    /fault/redirect[to]        302 to the path ``to``
    /fault/noai[tag]           the image with ``X-Robots-Tag: tag`` (default noai)
    /fault/huge[bytes,declare] ``bytes`` (100 MB) of zeros as image/png; declare=0 omits Content-Length
    """

    protocol_version = "HTTP/1.1"  # keep-alive: clients reuse connections as they would on the web
    disable_nagle_algorithm = True  # headers and body are two writes: no 40 ms delayed-ACK stall
    server: _Server

    def setup(self) -> None:
        super().setup()
        with self.server.lock:
            self.server.connections += 1

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (stdlib's name)
        pass  # quiet: thousands of requests per test

    def do_GET(self) -> None:  # noqa: N802 (stdlib's name)
        parts = urlsplit(self.path)
        path = unquote(parts.path)
        q = {k: v[-1] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
        with self.server.lock:
            self.server.hits[path] += 1
        try:
            if path.startswith("/img/"):
                self._file(path[len("/img/"):])
            elif path.startswith("/fault/"):
                self._fault(path[len("/fault/"):], q)
            else:
                self._send(404, b"not found", "text/plain")
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    def _send(self, status: int, body: bytes, ctype: str | None, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        if ctype:
            self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def _image(self, ctype: str | None = None, headers: dict[str, str] | None = None) -> None:
        srv = self.server
        self._send(200, srv.default_image, srv.default_type if ctype is None else ctype, headers)

    def _file(self, rel: str) -> None:
        found = self.server.read(rel)
        if found is None:
            self._send(404, b"no such file", "text/plain")
        else:
            self._send(200, *found)

    def _fault(self, kind: str, q: dict[str, str]) -> None:
        srv = self.server
        if kind.isdigit():
            self._send(int(kind), f"fault {kind}".encode(), "text/plain")
        elif kind == "flaky":
            key, fails = q.get("key", ""), int(q.get("fails", "2"))
            with srv.lock:
                left = srv.flaky_left.setdefault(key, fails)
                srv.flaky_left[key] = max(left - 1, 0)
            if left > 0:
                self._send(int(q.get("status", "503")), b"try again", "text/plain")
            else:
                self._image()
        elif kind == "slow":
            seconds = float(q.get("seconds", "1"))
            if q.get("where", "headers") == "headers":
                time.sleep(seconds)
                self._image()
            else:
                self._slow_body(seconds)
        elif kind == "truncated":
            self.send_response(200)
            self.send_header("Content-Type", srv.default_type)
            self.send_header("Content-Length", str(len(srv.default_image)))
            self.end_headers()
            self.wfile.write(srv.default_image[: len(srv.default_image) // 2])
            self.close_connection = True
        elif kind == "html":
            self._send(200, b"<!doctype html><html><body>not an image</body></html>",
                       q.get("type", "text/html; charset=utf-8"))
        elif kind == "as":
            self._image(ctype=q.get("type", ""))
        elif kind == "empty":
            self._send(200, b"", "image/png")
        elif kind == "redirect-loop":
            self._send(302, b"", None, {"Location": "/fault/redirect-loop"})
        elif kind == "redirect":
            self._send(302, b"", None, {"Location": q.get("to", "/")})
        elif kind == "noai":
            self._image(headers={"X-Robots-Tag": q.get("tag", "noai")})
        elif kind == "huge":
            self._huge(int(q.get("bytes", str(100_000_000))), q.get("declare", "1") != "0")
        else:
            self._send(404, f"unknown fault {kind}".encode(), "text/plain")

    def _slow_body(self, seconds: float) -> None:
        body = self.server.default_image
        self.send_response(200)
        self.send_header("Content-Type", self.server.default_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body[: len(body) // 2])
        time.sleep(seconds)
        self.wfile.write(body[len(body) // 2:])

    def _huge(self, n: int, declare: bool) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        if declare:
            self.send_header("Content-Length", str(n))
        else:  # the body then ends when the connection closes (HTTP/1.1 without length or chunking)
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        zeros = bytes(_CHUNK)
        sent = 0
        try:
            while sent < n:
                k = min(_CHUNK, n - sent)
                self.wfile.write(zeros[:k])
                sent += k
        finally:
            with self.server.lock:
                self.server.huge_sent += sent


class ImageServer:
    """Serves ``root`` under ``/img/`` and the fault routes on 127.0.0.1 from a background thread.

    ``default_image`` (a path relative to ``root``; default: the first PNG under it) is the valid
    image behind the fault routes that succeed (flaky, slow, noai, as, truncated)."""

    def __init__(self, root: str | Path, default_image: str | None = None, port: int = 0) -> None:
        self.root = Path(root).resolve()
        if default_image is None:
            first = next(iter(sorted(self.root.rglob("*.png"))), None)
            if first is None:
                raise FileNotFoundError(f"no PNG under {self.root} to serve from the fault routes")
            default_image = str(first.relative_to(self.root))
        self.default_image = default_image
        image = (self.root / default_image).read_bytes()
        ctype = mimetypes.guess_type(default_image)[0] or "application/octet-stream"
        self._server = _Server(("127.0.0.1", port), self.root, image, ctype)
        self.port: int = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="image-server", daemon=True)
        self._thread.start()

    @property
    def default_bytes(self) -> bytes:
        """The bytes the succeeding fault routes serve."""
        return self._server.default_image

    @property
    def hits(self) -> collections.Counter[str]:
        """Requests per route path (e.g. ``/fault/flaky``) so far."""
        return self._server.hits

    @property
    def connections(self) -> int:
        """TCP connections accepted so far (keep-alive reuse keeps this low)."""
        return self._server.connections

    @property
    def huge_sent(self) -> int:
        """Body bytes ``/fault/huge`` wrote before its clients hung up."""
        return self._server.huge_sent

    def url(self, path: str) -> str:
        """Absolute URL of a server path such as ``/fault/404`` or ``/img/animals/cat.png``."""
        return f"http://127.0.0.1:{self.port}/{path.lstrip('/')}"

    def img_url(self, rel: str | Path) -> str:
        """URL of the file ``rel`` (relative to ``root``, or absolute inside it)."""
        p = Path(rel)
        if p.is_absolute():
            p = p.resolve().relative_to(self.root)
        return self.url("/img/" + quote(p.as_posix()))

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()

    def __enter__(self) -> ImageServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def main() -> None:
    ap = argparse.ArgumentParser(description="Serve image files and fault routes on 127.0.0.1.")
    ap.add_argument("root", help="directory served under /img/")
    ap.add_argument("--port", type=int, default=0, help="0 = any free port")
    args = ap.parse_args()
    with ImageServer(args.root, port=args.port) as srv:
        print(srv.url("/"), flush=True)
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
