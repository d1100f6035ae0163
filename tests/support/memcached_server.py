"""A real memcached on a free loopback port (binary-only or text-only), stopped by PID."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
from collections.abc import Iterator

from tests.support.capture import free_port, wait_port
from tests.support.proc import stop

MEMCACHED = shutil.which("memcached") or "/usr/bin/memcached"


@contextlib.contextmanager
def memcached(protocol: str = "binary") -> Iterator[int]:
    """``protocol``: ``binary`` or ``ascii`` (memcached's ``-B``)."""
    port = free_port()
    proc = subprocess.Popen([MEMCACHED, "-B", protocol, "-p", str(port), "-l", "127.0.0.1", "-U", "0",
                             "-u", "root", "-m", "64"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(port)
        yield port
    finally:
        stop(proc)
