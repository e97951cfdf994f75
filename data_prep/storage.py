"""Where datasets live: local folders, object stores, web servers and commands, behind one API.

Every reader of shards and manifests (the training stream, the evaluator, ``data_prep``) opens,
lists and names locations through this module, so a location is one string that may be:

- a local path: ``/data/laion/train``;
- ``s3://bucket/prefix`` (s3fs). Credentials and the endpoint come from the usual AWS environment
  and files: ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY`` or ``AWS_PROFILE`` (``~/.aws/``), and
  ``AWS_ENDPOINT_URL`` for an S3-compatible store (MinIO, Ceph, R2);
- ``gs://bucket/prefix`` (gcsfs, when installed: ``pip install gcsfs``; application-default
  credentials);
- ``http(s)://host/path`` (read only; sizes are not listed, so they are checked as shards open);
- ``pipe:COMMAND`` (webdataset's convention, read only): COMMAND, with ``{}`` replaced by a file
  name, writes that file to stdout, e.g. ``pipe:aws s3 cp s3://bucket/train/{} -``.

Credentials never belong in a location; :func:`redact` strips ``user:password@`` and query strings
(pre-signed URLs) from every location this project logs.
"""
from __future__ import annotations

import contextlib
import os
import re
import shlex
import stat
import subprocess
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Iterator, Optional, Union

Location = Union[str, Path]  # a Path for local data, a str URL otherwise

URL_SCHEMES = ("s3://", "gs://", "gcs://", "http://", "https://")
PIPE = "pipe:"
# Bounded waits: a stalled connection is an error (retried by the reader), never a hang.
CONNECT_TIMEOUT_S, READ_TIMEOUT_S = 30, 60


def is_remote(loc: Location) -> bool:
    s = str(loc)
    return s.startswith(URL_SCHEMES) or s.startswith(PIPE)


def join(root: Location, name: str) -> Location:
    if not is_remote(root):
        return Path(root) / name
    s = str(root)
    if s.startswith(PIPE):  # a command template: the file name goes where {} stands
        if "{}" not in s:
            raise ValueError(f"{redact(s)}: a pipe: location needs {{}} where the file name goes, e.g. "
                             "'pipe:aws s3 cp s3://bucket/train/{} -'")
        return s.replace("{}", name)
    return s.rstrip("/") + "/" + name


def redact(loc: Location) -> str:
    """The location as logged: no ``user:password@``, no query string (signatures, tokens)."""
    s = re.sub(r"(?<=://)[^/@\s]*@", "", str(loc))
    return re.sub(r"\?\S*", "?…", s)


def _fs(url: str) -> Any:
    import fsspec

    protocol = url.split("://", 1)[0]
    if protocol in ("http", "https"):
        import aiohttp

        timeout = aiohttp.ClientTimeout(total=None, sock_connect=CONNECT_TIMEOUT_S, sock_read=READ_TIMEOUT_S)
        return fsspec.filesystem(protocol, client_kwargs={"timeout": timeout})
    if protocol == "s3":
        return fsspec.filesystem("s3", config_kwargs={"connect_timeout": CONNECT_TIMEOUT_S, "read_timeout": READ_TIMEOUT_S,
                                                      "retries": {"max_attempts": 3}})
    try:
        return fsspec.filesystem(protocol)
    except ImportError as e:
        raise OSError(f"{redact(url)}: {protocol}:// needs a package not installed here ({e}); for gs:// run "
                      "`pip install gcsfs`") from e


@contextlib.contextmanager
def open_read(loc: Location) -> Iterator[BinaryIO]:
    """A binary stream of the file at ``loc``. Its ``size`` attribute (or a local ``fstat``) is read
    without another request where the store reports it; raises OSError naming the location."""
    s = str(loc)
    if not is_remote(s):
        with open(s, "rb") as f:
            yield f
        return
    if s.startswith(PIPE):
        with _pipe(s[len(PIPE):]) as f:
            yield f
        return
    # HTTP: one streamed GET per file (servers need not support ranges). Object stores: 8 MiB range
    # reads with read-ahead, so a shard streams in a few dozen requests.
    block_size = 0 if s.startswith(("http://", "https://")) else 8 << 20
    try:
        f = _fs(s).open(s, "rb", block_size=block_size)
    except Exception as e:  # noqa: BLE001: the store's own error types vary by library
        raise OSError(describe_error(s, e)) from e
    with f:
        yield f


@contextlib.contextmanager
def _pipe(command: str) -> Iterator[BinaryIO]:
    # stderr to a file, not a pipe: a chatty command filling an unread pipe would block forever.
    with tempfile.TemporaryFile() as errors:
        proc = subprocess.Popen(shlex.split(command), stdout=subprocess.PIPE, stderr=errors)
        assert proc.stdout is not None
        try:
            yield proc.stdout  # type: ignore[misc]
        finally:
            proc.stdout.close()
            try:
                code = proc.wait(timeout=READ_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                code = proc.wait()
            errors.seek(0)
            err = errors.read().decode(errors="replace").strip()
    if code not in (0, -13):  # -13: SIGPIPE, the reader stopped early on purpose
        raise OSError(f"pipe: `{command}` exited with code {code}: {err[-300:]}")


def read_bytes(loc: Location) -> bytes:
    with open_read(loc) as f:
        return f.read()


def size_of(f: BinaryIO) -> Optional[int]:
    """Size of an open stream, when known without another request (local files, fsspec files)."""
    size = getattr(f, "size", None)
    if isinstance(size, int):
        return size
    try:
        st = os.fstat(f.fileno())
    except (OSError, AttributeError, ValueError):
        return None
    return st.st_size if stat.S_ISREG(st.st_mode) else None  # a pipe's size says nothing


def list_sizes(root: Location) -> Optional[dict[str, int]]:
    """File name -> size of the files directly under ``root``: one directory listing locally, one
    request per 1000 objects on S3/GCS. None where a store cannot list (HTTP, pipe:): the sizes are
    then checked as each file opens."""
    s = str(root)
    if not is_remote(s):
        with os.scandir(s) as entries:
            return {e.name: e.stat().st_size for e in entries if e.is_file()}
    if not s.startswith(("s3://", "gs://", "gcs://")):
        return None
    try:
        listing = _fs(s).ls(s.rstrip("/"), detail=True, refresh=True)
    except Exception as e:  # noqa: BLE001
        raise OSError(describe_error(s, e)) from e
    return {item["name"].rsplit("/", 1)[-1]: int(item["size"]) for item in listing if item.get("type") == "file"}


def describe_error(loc: str, e: BaseException) -> str:
    """One line: the (redacted) location, what went wrong and what to do."""
    where, text, name = redact(loc), str(e), type(e).__name__
    chain = [e]  # libraries wrap the cause (fsspec's HTTP turns a refused connection into a FileNotFoundError)
    while chain[-1].__cause__ or chain[-1].__context__:
        chain.append(chain[-1].__cause__ or chain[-1].__context__)  # type: ignore[arg-type]
    if any(isinstance(c, ConnectionError) or "Connect" in type(c).__name__ or "Cannot connect" in str(c) for c in chain):
        return f"{where}: cannot reach the store ({type(chain[-1]).__name__}): check the network and AWS_ENDPOINT_URL"
    if name == "NoCredentialsError" or "Unable to locate credentials" in text:
        return (f"{where}: no credentials found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) "
                "in the environment or ~/.aws/credentials")
    if isinstance(e, PermissionError) or "403" in text or "AccessDenied" in text or "Forbidden" in text:
        return f"{where}: access denied (403): the credentials in use may not read it; check them and the bucket's policy"
    if isinstance(e, FileNotFoundError) or "404" in text or "NoSuchBucket" in text or "does not exist" in text:
        return f"{where}: does not exist (404): check the bucket and prefix"
    return f"{where}: {name}: {redact(text)[:300]}"
