"""A tiny driver that feeds a database protocol Session directly, for unit tests.

It plays the protocols stage's part (append a payload, call ``feed``, on a
``ProtocolError`` count it, clear that direction and call ``gap``) without
detection or a receiver, so a parser can be tested byte by byte. ``pcap_script``
turns a real capture into per-connection (from_client, payload, ts) lists with
the real pcap receiver, to re-feed recorded traffic in any chunking.
"""

from __future__ import annotations

import os
from collections import Counter
from types import ModuleType
from typing import Any

from processors.protocols.base import Conn, ProtocolSettings
from processors.protocols.errors import ProtocolError
from service.model import Span
from tests.support.driver import peak_allocation

__all__ = ["Driver", "pcap_script"]


class Driver:
    def __init__(self, mod: ModuleType, settings: ProtocolSettings | None = None, port: int = 5432) -> None:
        self.mod = mod
        self.spans: list[Span] = []
        self.drops: Counter[str] = Counter()
        self.errors: list[ProtocolError] = []
        self.conn = Conn("c1", "127.0.0.1", 40000, "127.0.0.1", port, self.spans.append,
                         lambda proto, reason: self.drops.update([reason]),
                         settings=settings, protocol=mod.NAME)
        self.session = mod.Session(self.conn)
        self.ts = 1_000_000_000

    def feed(self, from_client: bool, data: bytes, chunk: int | None = None) -> None:
        buf = self.conn.client_buf if from_client else self.conn.server_buf
        step = chunk or max(len(data), 1)
        for i in range(0, len(data), step):
            self.ts += 1000
            buf.append(data[i:i + step], self.ts)
            try:
                self.session.feed(from_client, buf, self.ts)
            except ProtocolError as e:
                self.errors.append(e)
                self.drops.update([e.reason])
                buf.reset()
                self.session.gap(from_client, self.ts)

    def exchange_peak(self, request: bytes, reply: bytes, chunk: int = 8192) -> int:
        """Peak allocation (``peak_allocation``) while ``request`` and its ``reply`` are fed,
        the reply in ``chunk``-byte pieces cut beforehand, so the test's own slices do not count."""
        chunks = [reply[i:i + chunk] for i in range(0, len(reply), chunk)]
        srv = self.conn.server_buf

        def run() -> None:
            self.feed(True, request)
            for c in chunks:
                srv.append(c, 0)
                self.session.feed(False, srv, 0)

        return peak_allocation(run)

    def run(self, script: list[tuple[bool, bytes]], chunk: int | None = None) -> list[Span]:
        for from_client, data in script:
            self.feed(from_client, data, chunk)
        return self.spans

    def close(self) -> None:
        self.session.close(self.ts)

    def buffered(self) -> int:
        return len(self.conn.client_buf) + len(self.conn.server_buf)


def pcap_script(path: str | os.PathLike[str], server_port: int | None = None) -> list[list[tuple[bool, bytes]]]:
    """Per connection, the payloads of a capture in order as (from_client, bytes)."""
    from receivers.pcap import PcapReceiver

    conns: dict[Any, list[tuple[bool, bytes]]] = {}

    class _Sink:
        def consume_events(self, events: list[Any]) -> None:
            for e in events:
                if e.payload is None or len(e.payload) == 0:
                    continue
                if server_port is not None:
                    client = e.dport == server_port
                else:
                    client = bool(e.client_is_src)
                conns.setdefault(e.conn_id, []).append((client, bytes(e.payload)))

    r = PcapReceiver("pcap", {"path": str(path), "progress": False}, _Sink())
    r.start()
    try:
        r.wait(60)
    finally:
        r.shutdown()
    return list(conns.values())
