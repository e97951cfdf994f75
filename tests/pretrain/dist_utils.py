"""Helpers for tests that spawn real gloo ranks; light to import, since every spawned rank
re-imports the test module that uses them."""
from __future__ import annotations

import socket


def free_port() -> int:
    """A TCP port free on localhost now, for MASTER_PORT."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
