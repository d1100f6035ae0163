"""Record real loopback traffic with tcpdump, for replay-based tests.

Every protocol's real-server test does the same thing: start a server on a free
loopback port, run a real client while ``tcpdump -i lo`` records, then replay the
capture through wirespan and assert the spans. This module is that one recorder.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

__all__ = ["free_port", "tcpdump", "wait_port", "wait_until", "TCPDUMP"]

TCPDUMP = shutil.which("tcpdump") or "/usr/bin/tcpdump"


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (the kernel picks it)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_port(port: int, host: str = "127.0.0.1", timeout: float = 20.0) -> None:
    """Block until something accepts connections on ``host:port``."""
    deadline = time.monotonic() + timeout
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    while True:
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.settimeout(0.5)
            try:
                s.connect((host, port))
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"nothing listening on {host}:{port} after {timeout}s")
                time.sleep(0.05)


def wait_until(pred: Callable[[], object], timeout: float = 5.0, interval: float = 0.05) -> bool:
    """Poll ``pred`` until it is true or ``timeout`` passes; its last answer, as a bool."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(interval)
    return bool(pred())


def _drained(path: Path, quiet: float = 0.25, timeout: float = 10.0) -> None:
    """Wait until tcpdump has written what the kernel holds for it: the file has not grown for ``quiet`` s.

    SIGINT stops tcpdump's loop at once; packets still in its kernel ring are never written.
    A fixed pause lost a test's last reply once on a loaded CI machine (tshark missed a 200).
    """
    deadline = time.monotonic() + timeout
    size, still = -1, time.monotonic()
    time.sleep(0.1)
    while time.monotonic() < deadline:
        now = path.stat().st_size if path.exists() else 0
        if now != size:
            size, still = now, time.monotonic()
        elif time.monotonic() - still >= quiet:
            return
        time.sleep(0.05)


@contextlib.contextmanager
def tcpdump(ports: int | list[int], path: str | os.PathLike[str] | None = None, iface: str = "lo",
            snaplen: int = 262144, pcapng: bool = False, udp: bool = False) -> Iterator[Path]:
    """Record TCP (and UDP too with ``udp``) on ``ports`` while the block runs; yields the capture's path.

    Waits until tcpdump says it is listening before the block starts, and after
    the block lets the last packets in (until the file stops growing) before
    stopping it with SIGINT (which makes tcpdump flush); a kernel drop it then
    reports is printed, for the test's failure output. ``-U`` writes each packet as it comes, so nothing is
    lost if the test dies.
    """
    if isinstance(ports, int):
        ports = [ports]
    if path is None:
        d = tempfile.mkdtemp(prefix="wirespan-cap-")
        path = Path(d) / ("capture.pcapng" if pcapng else "capture.pcap")
    path = Path(path)
    flt = " or ".join(f"{'' if udp else 'tcp '}port {p}" for p in ports)
    # --immediate-mode: without it packets wait in the kernel ring for up to the 1 s
    # block timeout and the last ones of a short test are lost at SIGINT.
    # -B: a 32 MiB kernel buffer, so a burst of 64 KiB loopback segments is not dropped.
    cmd = [TCPDUMP, "-i", iface, "--immediate-mode", "-B", "32768", "-U", "-s", str(snaplen),
           "-w", str(path), "-Z", "root"]
    if not pcapng:
        cmd[1:1] = ["--time-stamp-precision=nano"]
    cmd.append(flt)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        assert proc.stderr is not None
        deadline = time.monotonic() + 10
        seen = ""
        os.set_blocking(proc.stderr.fileno(), False)
        while "listening on" not in seen:
            try:
                chunk = os.read(proc.stderr.fileno(), 4096)
            except BlockingIOError:
                chunk = b""
            seen += chunk.decode(errors="replace")
            if "listening on" in seen:
                break
            if proc.poll() is not None:
                raise RuntimeError(f"tcpdump exited: {seen}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"tcpdump did not start: {seen}")
            time.sleep(0.02)
        yield path
        _drained(path)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        with contextlib.suppress(OSError, ValueError):
            assert proc.stderr is not None
            tail = proc.stderr.read() or b""
            m = re.search(rb"(\d+) packets? dropped by kernel", tail)
            if m and int(m.group(1)):
                print(f"tcpdump: {m.group(1).decode()} packets dropped by kernel ({path})", file=sys.stderr)
