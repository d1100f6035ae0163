"""HTTP/2 test helpers: a frame builder and a tiny driver standing in for the protocols stage.

The driver does what the stage does for one connection (append each payload
to the direction's LargeBuffer, call ``feed``, and on a ProtocolError count it,
clear the buffer and call ``gap``), so the session can be tested on its own.
Real HTTP/2 bytes come from the ``h2`` library's client and server state
machines (``h2_exchange``); hand-built frames cover what ``h2`` never sends.
"""

from __future__ import annotations

import struct
from typing import Any

import h2.config
import h2.connection
import h2.events
import hpack

from processors.protocols.base import Conn, Perspective
from processors.protocols.errors import ProtocolError
from processors.protocols.http2 import H2Session, Settings
from service.model import Span

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def frame(ftype: int, flags: int, sid: int, payload: bytes = b"") -> bytes:
    n = len(payload)
    return struct.pack(">HBBBI", n >> 8, n & 0xFF, ftype, flags, sid) + payload


def settings(ack: bool = False, **vals: int) -> bytes:
    ids = {"header_table_size": 1, "max_frame_size": 5, "max_concurrent_streams": 3}
    body = b"".join(struct.pack(">HI", ids[k], v) for k, v in vals.items())
    return frame(4, 1 if ack else 0, 0, body)


def grpc_msg(payload: bytes, compressed: int = 0) -> bytes:
    return struct.pack(">BI", compressed, len(payload)) + payload


class Driver:
    """One connection: feed bytes per direction, collect spans and drop reasons."""

    def __init__(self, settings: Settings | None = None, perspective: Perspective = Perspective.PASSIVE,
                 extra: dict[str, Any] | None = None) -> None:
        self.spans: list[Span] = []
        self.drops: list[str] = []
        self.errors: list[ProtocolError] = []
        self.conn = Conn(("t", 1), "10.0.0.1", 40000, "10.0.0.2", 8080, self.spans.append,
                         lambda proto, reason: self.drops.append(reason), perspective=perspective,
                         settings=settings or Settings(), protocol="http2")
        if extra:
            self.conn.extra.update(extra)
        self.session = H2Session(self.conn)

    def feed(self, from_client: bool, data: bytes | bytearray | memoryview, ts: int = 0) -> None:
        buf = self.conn.client_buf if from_client else self.conn.server_buf
        buf.append(data, ts)
        try:
            self.session.feed(from_client, buf, ts)
        except ProtocolError as e:
            self.errors.append(e)
            self.drops.append(e.reason)
            buf.reset()
            self.session.gap(from_client, ts)

    def feed_split(self, from_client: bool, data: bytes, ts: int = 0, step: int = 1) -> None:
        for i in range(0, len(data), step):
            self.feed(from_client, data[i:i + step], ts)

    def close(self, ts: int = 0) -> None:
        self.session.close(ts)


class H2Pair:
    """A real h2 client and server talking in memory; records each side's bytes in order."""

    def __init__(self, header_encoding: str | None = None) -> None:
        cfg = h2.config.H2Configuration
        self.client = h2.connection.H2Connection(cfg(client_side=True, header_encoding=header_encoding))
        self.server = h2.connection.H2Connection(cfg(client_side=False, header_encoding=header_encoding))
        self.log: list[tuple[bool, bytes]] = []  # (from_client, bytes)
        self.client.initiate_connection()
        self.server.initiate_connection()
        self.pump()

    def pump(self) -> list[h2.events.Event]:
        events: list[h2.events.Event] = []
        for _ in range(20):
            c = self.client.data_to_send()
            s = self.server.data_to_send()
            if not c and not s:
                break
            if c:
                self.log.append((True, c))
                events += self.server.receive_data(c)
            if s:
                self.log.append((False, s))
                events += self.client.receive_data(s)
        return events

    def request(self, headers: list[tuple[str, str]], body: bytes = b"", end: bool = True) -> int:
        sid = self.client.get_next_available_stream_id()
        self.client.send_headers(sid, headers, end_stream=end and not body)
        if body:
            self.client.send_data(sid, body, end_stream=end)
        self.pump()
        return sid

    def respond(self, sid: int, headers: list[tuple[str, str]], body: bytes = b"",
                trailers: list[tuple[str, str]] | None = None) -> None:
        self.server.send_headers(sid, headers, end_stream=not body and not trailers)
        if body:
            self.server.send_data(sid, body, end_stream=not trailers)
        if trailers:
            self.server.send_headers(sid, trailers, end_stream=True)
        self.pump()

    def replay(self, drv: Driver, ts0: int = 1000) -> None:
        for i, (fc, data) in enumerate(self.log):
            drv.feed(fc, data, ts0 + i)


def encode_block(headers: list[tuple[bytes, bytes]], encoder: hpack.Encoder | None = None) -> bytes:
    return (encoder or hpack.Encoder()).encode(headers)
