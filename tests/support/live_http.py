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


# -- one client dripping a request a byte a segment while others make normal requests ------
_DRIP_CLIENT = r'''
import socket, sys
port, n = int(sys.argv[1]), int(sys.argv[2])
s = socket.create_connection(("127.0.0.1", port))
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
# The request line itself dripped: before the stage knows the protocol (the costly case).
head = b"GET /drip?q=" + b"d" * n + b" HTTP/1.1\r\nHost: x\r\n\r\n"
for i in range(len(head)):
    s.send(head[i:i + 1])
resp = b""
while b"\r\n\r\n" not in resp or not resp.endswith(b"\n"):
    c = s.recv(65536)
    if not c:
        break
    resp += c
assert resp.startswith(b"HTTP/1.1 200"), resp[:100]
'''

_NORMAL_CLIENT = r'''
import http.client, sys
port, n = int(sys.argv[1]), int(sys.argv[2])
c = http.client.HTTPConnection("127.0.0.1", port)
for i in range(n):
    c.request("GET", f"/n/{i}")
    r = c.getresponse()
    assert r.status == 200 and r.read() == f"hello /n/{i}\n".encode()
'''


class SpanSink:
    def __init__(self) -> None:
        self.spans: list[Any] = []
        self.lock = threading.Lock()

    def consume_spans(self, spans: list[Any]) -> None:
        with self.lock:
            self.spans.extend(spans)

    def paths(self) -> list[str]:
        with self.lock:
            return [str(s.attributes.get("url.path")) for s in self.spans]


def drip_beside_normal_traffic(make_receiver: Any, drip_bytes: int = 28_000, normal: int = 300) -> dict[str, Any]:
    """Run the scenario of issue 20's live finding (one client dripping 28 KB a byte a segment
    pegged a core and cost the node most of its spans) through ``make_receiver(server, next)``
    feeding a real protocols stage; returns what arrived, for the caller's assertions."""
    from processors.protocols.processor import ProtocolsProcessor
    from tests.support.capture import wait_until

    sink = SpanSink()
    stage = ProtocolsProcessor("protocols", {"enabled": ["http"]}, sink)
    with http_server() as srv:
        rx = make_receiver(srv, stage)
        rx.start()
        try:
            drip = subprocess.Popen([sys.executable, "-c", _DRIP_CLIENT, str(srv.port), str(drip_bytes)],
                                    stderr=subprocess.PIPE)
            run_client(_NORMAL_CLIENT, str(srv.port), str(normal), timeout=120)
            _, err = drip.communicate(timeout=120)
            assert drip.returncode == 0, err

            def done() -> bool:
                p = sink.paths()
                return "/drip" in p and sum(x.startswith("/n/") for x in p) >= normal

            wait_until(done, timeout=30)
        finally:
            rx.shutdown()
            stage.shutdown()
    paths = sink.paths()
    return {"normal": sorted({p for p in paths if p.startswith("/n/")}), "drip": paths.count("/drip"),
            "receiver_drops": dict(getattr(rx, "stats", {}).get("drops", {})), "stage_drops": stage.stats["drops"]}
