"""AMQP: 0-9-1 (RabbitMQ's own protocol, ``v091.py``) and 1.0 (OASIS, ``v10.py``), one protocol
``amqp`` of the stage (base.py's contract) whose two versions share nothing on the wire but the
port and the first four bytes of the protocol header.

The version is told by the first bytes a side sent: the protocol header ``AMQP 0 0-9-1``
(``AMQP\\x00\\x00\\x09\\x01``) or ``AMQP 0 1.0.0`` / ``AMQP 3 1.0.0`` (SASL), or, joined after the
headers, a frame's shape: a 0-9-1 frame starts with its type (1, 2, 3 or 8), a 1.0 frame with
its 32-bit size (a first byte of 0 below 16 MiB). ``detect`` asks both modules; ``Session`` is
the version's session itself when the bytes it is fed first are buffered at its making (the
stage's usual case), else a small dispatcher that builds the version's session at its first
bytes and hands it ``feed``/``feed_whole``/``gap``/``skip_gap``/``close`` as its own
attributes, so the stage calls the version's methods directly afterwards (no extra call a
segment).
"""

from __future__ import annotations

from typing import Any, ClassVar

from processors.protocols import base
from processors.protocols.base import Conn, Detection
from service.largebuf import LargeBuffer

from . import v091, v10
from .v091 import NAME, Settings

__all__ = ["NAME", "DEFAULT_PORTS", "Settings", "detect", "ambiguous_role", "Session"]

#: 5672 (AMQP, both versions), 5671 (AMQPS: seen in plaintext through the eBPF TLS probes).
DEFAULT_PORTS = frozenset({5672, 5671})


def _is10(head: Any) -> bool | None:
    """True for 1.0's bytes, False for 0-9-1's, None while the header's sixth byte is to come;
    ``head``: a side's first bytes (at least one; six are enough), a view or a segment."""
    first = head[0]
    if first == 0x41:  # 'A': AMQP\x00\x00 (0-9-1), AMQP\x01\x01 (0-9), AMQP\x00\x01, \x02, \x03 (1.0)
        if len(head) < 6:
            return None
        return head[4] in (0x02, 0x03) or (head[4] == 0 and head[5] == 1)
    return first == 0


def _version(buf: LargeBuffer) -> bool | None:
    """_is10 of a side's buffered first bytes, where a 0 first byte (1.0's frame size) may also
    be the end of a 0-9-1 header whose start the capture missed (``\\x00\\x00\\x09\\x01``): told
    apart by the 0-9-1 frame that follows it (v091.header_tail); None while too few bytes."""
    n = len(buf)
    is10 = _is10(buf.view_at(0, 6 if n >= 6 else n))
    if is10 and buf.u8_at(0) == 0:
        k = v091.header_tail(buf)
        if k:
            return None if k < 0 else False
    return is10


def detect(buf: LargeBuffer, from_client: bool | None) -> Detection:
    n = len(buf)
    if not n:
        return Detection.NEED_MORE
    head = buf.view_at(0, 8 if n >= 8 else n)  # one read: the first byte, or a whole header
    first = head[0]
    if first == 0:
        return v10.detect(buf, from_client)
    if first == 0x41:
        # A whole 0-9-1 header from a client (a connection's usual first bytes): v091.detect's
        # answer, from that read.
        if n >= 8 and from_client is not False and head in v091._HEADERS_OK:
            return Detection.REQUEST
        a = v091.detect(buf, from_client)
        return a if a != Detection.NO else v10.detect(buf, from_client)
    return v091.detect(buf, from_client)


def ambiguous_role(buf: LargeBuffer) -> bool:
    if len(buf) and buf.u8_at(0) == 0:
        return v10.ambiguous_role(buf)
    return v091.ambiguous_role(buf)


class Session(base.Session):
    """Chooses the version at the first bytes and becomes it (see the module's docstring)."""

    protocol: ClassVar[str] = NAME

    def __new__(cls, conn: Conn) -> Any:
        """The version's own session when the bytes it will be fed first are known already:
        the stage builds a session once one side's buffered bytes were detected, and with the
        other side's buffer empty those are fed first. Else (both sides buffered, too few
        bytes, no bytes) this dispatcher, which chooses at its first feed."""
        a, b = conn.client_buf._len, conn.server_buf._len
        if (a == 0) != (b == 0):
            is10 = _version(conn.client_buf) if a else _is10(conn.server_buf.view_at(0, 6 if b >= 6 else b))
            if is10 is False:
                return v091.Session(conn)
            if is10:
                return v10.Session(conn)
        return super().__new__(cls)

    def __init__(self, conn: Conn) -> None:
        super().__init__(conn)
        self.impl: base.Session | None = None

    def _become(self, is10: bool) -> base.Session:
        impl = (v10 if is10 else v091).Session(self.conn)
        self.impl = impl
        self.feed = impl.feed  # type: ignore[method-assign]
        self.gap = impl.gap  # type: ignore[method-assign]
        self.skip_gap = impl.skip_gap  # type: ignore[method-assign]
        self.close = impl.close  # type: ignore[method-assign]
        self.feed_whole = impl.feed_whole  # type: ignore[method-assign]  # None for a version without one
        return impl

    def feed(self, from_client: bool, buf: LargeBuffer, ts_ns: int) -> None:
        if not len(buf):
            return
        is10 = _version(buf) if from_client else _is10(buf.view_at(0, min(len(buf), 6)))
        if is10 is None:
            buf.want = len(buf) + 1 if len(buf) >= 6 else 6
            return
        self._become(is10).feed(from_client, buf, ts_ns)

    def feed_whole(self, from_client: bool, data: Any, ts_ns: int) -> bool:  # type: ignore[override]
        """The connection's first segment, in place when the version has a ``feed_whole`` (it
        was always buffered: a short connection's first message is a third of its frames)."""
        is10 = _is10(data) if len(data) else None
        if is10 is None or (is10 and from_client and data[0] == 0):
            # buffered: ``feed`` waits for the header's sixth byte, or tells a 0-9-1 header's
            # end from 1.0's frame size (_version)
            return False
        whole = self._become(is10).feed_whole
        return whole(from_client, data, ts_ns) if whole is not None else False

    def __getattr__(self, name: str) -> Any:
        impl = self.__dict__.get("impl")
        if impl is None:
            raise AttributeError(name)
        return getattr(impl, name)
