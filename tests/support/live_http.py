"""A real Python ``http.server`` in its own process, and client helpers, for live-capture tests.

Live receivers (``ebpf``, ``live``) see other processes' traffic: the server and the
clients must be separate processes from the test (the ``ebpf`` receiver never traces
its own process). The server is Python's stdlib ``ThreadingHTTPServer`` with a few
routes: ``/big`` (a 200 KB body), ``/upload`` (reads the body, answers its size),
``/missing`` (404), anything else (200, echoes the path). Started on a free loopback
port, stopped by PID.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

from tests.support.capture import free_port, wait_port

__all__ = ["BIG_BODY", "EventCollector", "HttpServer", "ReceiverRunning", "http_server", "run_client"]

#: 200 KB body with a position-dependent pattern, so any misplaced chunk shows.
BIG_SIZE = 200 * 1024
BIG_BODY = bytes((i * 7 + i // 251) & 0xFF for i in range(BIG_SIZE))

_SERVER = r'''
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
BIG = bytes((i * 7 + i // 251) & 0xFF for i in range(BIG_SIZE))

class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *a):
        pass
    def _send(self, code, body, ctype="text/plain"):
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def do_GET(self):
        if self.path == "/big":
            self._send(200, BIG, "application/octet-stream")
        elif self.path == "/missing":
            self._send(404, b"not here\n")
        else:
            self._send(200, b"hello " + self.path.encode() + b"\n")
    def do_POST(self):
        n = int(self.headers.get("Content-Length", "0"))
        left = n
        while left:
            chunk = self.rfile.read(min(left, 65536))
            if not chunk:
                break
            left -= len(chunk)
        self._send(200, b"got " + str(n - left).encode() + b"\n")

ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
'''.replace("BIG_SIZE", str(BIG_SIZE))


@dataclass
class HttpServer:
    port: int
    proc: subprocess.Popen

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@contextlib.contextmanager
def http_server() -> Iterator[HttpServer]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", _SERVER, str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(port)
        yield HttpServer(port, proc)
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def run_client(code: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """Run a Python client in its own process (so live receivers see it); returns it finished."""
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, timeout=timeout, check=True)


class EventCollector:
    """A consumer that keeps every event (thread-safe: receivers call from their own thread)."""

    def __init__(self) -> None:
        self.events: list[Any] = []
        self.lock = threading.Lock()

    def consume_events(self, events: list[Any]) -> None:
        with self.lock:
            self.events.extend(events)


class ReceiverRunning:
    """``with Sub(**config) as r``: a live receiver feeding ``r.sink`` while the block runs.

    Subclasses name the collector and build their receiver in ``make``.
    """

    collector: ClassVar[type[EventCollector]] = EventCollector

    def __init__(self, **cfg: Any) -> None:
        self.sink = self.collector()
        self.rx = self.make(cfg, self.sink)

    def make(self, cfg: dict[str, Any], sink: EventCollector) -> Any:
        raise NotImplementedError

    def __enter__(self) -> ReceiverRunning:
        self.rx.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.rx.shutdown()
