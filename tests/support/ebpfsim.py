"""Processes talking over loopback as the ``ebpf`` receiver shows them, fed to one protocols
stage: each process's view of a socket is its own connection with pid, tid and ``egress``,
so tests and benchmarks can play any interleaving of requests, threads and processes
exactly (trace assembly: tests/test_assembly.py, bench/soak_assembly.py).
"""

from __future__ import annotations

import itertools

from processors.protocols.processor import ProtocolsProcessor
from service.model import EventKind, Span, SpanKind, TcpEvent
from service.telemetry import TRACE_UNATTRIBUTED

__all__ = ["OK", "TP", "Link", "Sink", "World", "get", "rget"]

TP = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


class Sink:
    def __init__(self) -> None:
        self.spans: list[Span] = []

    def consume_spans(self, spans: list[Span]) -> None:
        self.spans.extend(spans)

    def one(self, pid: int, name_part: str, kind: SpanKind | None = None) -> Span:
        got = [s for s in self.spans if s.resource.attributes.get("process.pid") == pid and name_part in
               (s.name + " " + str(s.attributes.get("url.path", "")) + " " + str(s.attributes.get("db.query.text", "")))
               and (kind is None or s.kind == kind)]
        assert len(got) == 1, (pid, name_part, [(s.name, s.attributes) for s in self.spans])
        return got[0]


class World:
    """Processes talking over loopback, seen by one eBPF receiver feeding one stage."""

    def __init__(self, **cfg: object) -> None:
        self.sink = Sink()
        self.stage = ProtocolsProcessor("protocols", {"enabled": ["http", "redis"], **cfg}, self.sink)
        self.ts = itertools.count(1_000_000, 1000)
        self.ports = itertools.count(41000)

    def connect(self, client: tuple[int, str], server: tuple[int, str], port: int) -> Link:
        return Link(self, client, server, ("127.0.0.1", next(self.ports)), ("127.0.0.1", port))

    def feed(self, *evs: TcpEvent) -> None:
        self.stage.consume_events(list(evs))

    def unattributed(self, reason: str) -> float:
        return TRACE_UNATTRIBUTED.labels(processor="protocols", reason=reason)._value.get()


class Link:
    """One TCP connection between two processes; either end may be untraced (``pid`` None)."""

    def __init__(self, w: World, client: tuple[int, str], server: tuple[int, str], caddr: tuple, saddr: tuple):
        self.w, self.client, self.server, self.caddr, self.saddr = w, client, server, caddr, saddr
        self.sock = next(w.ports)

    def _ev(self, proc: tuple[int, str], tid: int, data: bytes, from_client: bool, egress: bool,
            ts: int, kind: EventKind = EventKind.DATA) -> TcpEvent:
        src, dst = (self.caddr, self.saddr) if from_client else (self.saddr, self.caddr)
        return TcpEvent(kind, (proc[0], self.sock), src[0], src[1], dst[0], dst[1], ts,
                        memoryview(data) if data else None, 0, from_client, egress, proc[0], tid, proc[1])

    def send(self, tid: int, data: bytes) -> None:
        """The client process's thread ``tid`` sends ``data``; the server process reads it."""
        ts = next(self.w.ts)
        evs = []
        if self.client[0] is not None:
            evs.append(self._ev(self.client, tid, data, True, True, ts))
        self.pending_read = data
        self.w.feed(*evs)

    def read(self, tid: int) -> None:
        """The server process's thread ``tid`` reads what the client sent."""
        data = self.pending_read
        if self.server[0] is not None:
            self.w.feed(self._ev(self.server, tid, data, True, False, next(self.w.ts)))

    def call(self, ctid: int, stid: int, data: bytes) -> None:
        self.send(ctid, data)
        self.read(stid)

    def answer(self, stid: int, ctid: int, data: bytes) -> None:
        ts = next(self.w.ts)
        evs = []
        if self.server[0] is not None:
            evs.append(self._ev(self.server, stid, data, False, True, ts))
        if self.client[0] is not None:
            evs.append(self._ev(self.client, ctid, data, False, False, next(self.w.ts)))
        self.w.feed(*evs)

    def close(self) -> None:
        ts = next(self.w.ts)
        evs = []
        for proc, egress in ((self.client, True), (self.server, False)):
            if proc[0] is not None:
                evs.append(self._ev(proc, 0, b"", True, egress, ts, EventKind.CLOSE))
                evs.append(self._ev(proc, 0, b"", False, not egress, ts, EventKind.CLOSE))
        self.w.feed(*evs)


def get(path: str, tp: str | None = None) -> bytes:
    extra = f"traceparent: {tp}\r\n" if tp else ""
    return f"GET {path} HTTP/1.1\r\nHost: x\r\n{extra}\r\n".encode()


OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


def rget(key: str) -> bytes:
    return f"*2\r\n$3\r\nGET\r\n${len(key)}\r\n{key}\r\n".encode()
