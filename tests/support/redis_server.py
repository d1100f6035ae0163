"""A real redis-server on a free loopback port in a temporary directory, stopped by PID."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import tempfile
from collections.abc import Iterator

from tests.support.capture import free_port, wait_port
from tests.support.proc import stop

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"


@contextlib.contextmanager
def redis_server() -> Iterator[int]:
    """Yields the port of a fresh redis-server (no persistence, loopback only)."""
    d = tempfile.mkdtemp(prefix="wirespan-redis-")
    port = free_port()
    proc = subprocess.Popen(
        [REDIS_SERVER, "--port", str(port), "--bind", "127.0.0.1", "--dir", d, "--save", "",
         "--appendonly", "no", "--daemonize", "no", "--protected-mode", "no"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(port)
        yield port
    finally:
        stop(proc)
        shutil.rmtree(d, ignore_errors=True)
