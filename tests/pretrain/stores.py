"""Real remote stores on 127.0.0.1 for the data tests: an S3-API server (moto's server mode, the one
s3fs tests itself against) and a plain HTTP file server with faults.

Both serve copies of a dataset written by ``data_prep``; the environment a process needs to reach
the S3 server (endpoint and credentials, read by botocore as a user's own would be) is
:attr:`S3Store.env`.
"""
from __future__ import annotations

import collections
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

# A secret no log, config or metric may ever show (the tests grep for it).
SECRET = "clipforge-test-secret-9f3c2b"
S3_ROOT = "s3://clipforge-data/small"  # where the s3 fixture (tests/pretrain/conftest.py) puts the small build


class S3Store:
    """A moto S3 server in this process; ``put_tree`` uploads a local folder under a prefix."""

    def __init__(self) -> None:
        from moto.server import ThreadedMotoServer

        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self.server.start()
        host, port = self.server.get_host_and_port()
        self.endpoint = f"http://{host}:{port}"
        self.env = {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": "clipforge-test",
                    "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_DEFAULT_REGION": "us-east-1"}

    def filesystem(self):  # noqa: ANN201: s3fs.S3FileSystem
        import s3fs

        return s3fs.S3FileSystem(key=self.env["AWS_ACCESS_KEY_ID"], secret=SECRET, endpoint_url=self.endpoint,
                                 skip_instance_cache=True)

    def put_tree(self, local: Path, url: str) -> None:
        fs = self.filesystem()
        bucket = url.removeprefix("s3://").split("/", 1)[0]
        if not fs.exists(bucket):
            fs.mkdir(bucket)
        for path in sorted(local.rglob("*")):
            if path.is_file():
                fs.put_file(str(path), f"{url.rstrip('/')}/{path.relative_to(local).as_posix()}")

    def close(self) -> None:
        self.server.stop()


class _Handler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (stdlib's name)
        pass

    def do_GET(self) -> None:  # noqa: N802 (stdlib's name)
        server: HttpStore = self.server.store  # type: ignore[attr-defined]
        name = self.path.lstrip("/")
        with server.lock:
            server.hits[name] += 1
            cut = server.cuts.get(name)
            if cut is not None and cut[1] > 0:
                server.cuts[name] = (cut[0], cut[1] - 1)
        if name in server.forbidden:
            self.send_error(403, "Forbidden")
            return
        if cut is not None and cut[1] > 0:
            return self._cut(name, cut[0])
        super().do_GET()

    def _cut(self, name: str, after: int) -> None:
        """Declare the whole file, send ``after`` bytes, then drop the connection."""
        data = (Path(self.directory) / name).read_bytes()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data[:after])
        self.wfile.flush()
        self.close_connection = True
        self.connection.shutdown(2)


class HttpStore:
    """Serves ``root`` on 127.0.0.1; ``cut(name, after, times)`` drops the next ``times`` downloads
    of ``name`` after ``after`` bytes; ``hits`` counts GET requests per file name."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.lock = threading.Lock()
        self.hits: collections.Counter[str] = collections.Counter()
        self.cuts: dict[str, tuple[int, int]] = {}
        self.forbidden: set[str] = set()  # file names answered with 403
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), partial(_Handler, directory=str(root)))
        self.httpd.daemon_threads = True
        self.httpd.store = self  # type: ignore[attr-defined]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def cut(self, name: str, after: int, times: int) -> None:
        with self.lock:
            self.cuts[name] = (after, times)

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
