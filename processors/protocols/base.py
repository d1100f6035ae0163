"""The contract every protocol module under ``processors/protocols/`` follows.

A protocol module is sans-IO (as h11): it sees bytes and time, never sockets.
It exports, at module level:

``NAME``            the protocol's name in config and metrics (``"http"``, ``"kafka"``).
``DEFAULT_PORTS``   a ``frozenset`` of ports tried first (a hint, never required).
``Settings``        a ``ProtocolSettings`` subclass: the protocol's options under
                    ``processors: protocols: <NAME>:`` (defaults, ``extra="forbid"``).
``detect(buf, from_client)``
                    look at the first bytes one side sent and return a ``Detection``:
                    ``REQUEST`` (they are a request, so the sender is the client),
                    ``RESPONSE`` (the sender is the server), ``NEED_MORE`` or ``NO``.
                    ``from_client`` is True/False when the receiver knows the roles,
                    None when it does not. Must be cheap and strict: random bytes
                    must not be taken for the protocol.
``Session``         a ``Session`` subclass: per-connection state, built as
                    ``Session(conn)`` once the protocol is detected.

The protocols processor keeps, per connection, one ``LargeBuffer`` for each
direction holding the bytes not consumed yet (``conn.client_buf``,
``conn.server_buf``). It appends each payload (no copy) and calls
``session.feed(from_client, buf, ts_ns)``. ``feed`` parses every complete
message at the front of ``buf`` and ``buf.release(n)``s what it consumed,
leaving an incomplete tail for the next call. A large body it does not need is
consumed as it arrives (release and remember how much is left to skip), so
memory stays bounded whatever the declared length.

Spans are built with ``conn.span(...)`` and emitted with ``conn.emit(span)``.
Bad input raises a ``ProtocolError`` (processors/protocols/errors.py); the
processor counts it, clears the buffers and calls ``session.gap`` so the
session resynchronises (or drops the connection after repeated errors).
"""

from __future__ import annotations

from collections.abc import Callable
from enum import IntEnum
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel, ConfigDict

from service.largebuf import LargeBuffer
from service.model import AttrValue, Resource, Span, SpanEvent, SpanKind, StatusCode, parse_traceparent

if TYPE_CHECKING:
    pass

__all__ = ["Detection", "Perspective", "ProtocolSettings", "Conn", "Session"]


class Detection(IntEnum):
    NO = 0
    NEED_MORE = 1
    REQUEST = 2
    RESPONSE = 3


class Perspective(IntEnum):
    """Whose view a span takes (design.md §3, "Perspective")."""

    PASSIVE = 0  #: a capture on the wire: one span per exchange, protocol's default kind
    CLIENT = 1   #: eBPF, the traced process is the client: CLIENT / PRODUCER / CONSUMER spans
    SERVER = 2   #: eBPF, the traced process is the server: SERVER spans


class ProtocolSettings(BaseModel):
    """Options every protocol has; subclasses add their own."""

    model_config = ConfigDict(extra="forbid")

    #: Extra ports to try this protocol first on (detection still checks content).
    ports: list[int] = []


class Conn:
    """What a protocol session knows of its connection, and how it emits spans."""

    __slots__ = (
        "_drop",
        "client_addr",
        "client_buf",
        "client_port",
        "comm",
        "conn_id",
        "emit",
        "extra",
        "perspective",
        "pid",
        "protocol",
        "resource",
        "server_addr",
        "server_buf",
        "server_port",
        "settings",
    )

    def __init__(
        self,
        conn_id: Any,
        client_addr: str,
        client_port: int,
        server_addr: str,
        server_port: int,
        emit: Callable[[Span], None],
        drop: Callable[[str, str], None] | None = None,
        perspective: Perspective = Perspective.PASSIVE,
        resource: Resource | None = None,
        settings: ProtocolSettings | None = None,
        protocol: str = "",
        pid: int | None = None,
        comm: str | None = None,
    ) -> None:
        self.conn_id = conn_id
        self.client_addr = client_addr
        self.client_port = client_port
        self.server_addr = server_addr
        self.server_port = server_port
        self.perspective = perspective
        self.resource = resource
        self.settings = settings
        self.client_buf = LargeBuffer()
        self.server_buf = LargeBuffer()
        #: Emit a finished span: the stage's callback itself, not a method wrapping it
        #: (one Python call fewer per span). Replace it with ``set_emit``.
        self.emit: Callable[[Span], None] = emit
        self._drop = drop
        self.protocol = protocol
        self.pid = pid
        self.comm = comm
        self.extra: dict[str, Any] = {}

    def set_emit(self, emit: Callable[[Span], None]) -> None:
        """Route this connection's spans elsewhere (the stage does when a protocol switches)."""
        self.emit = emit

    def drop(self, reason: str) -> None:
        """Count a message this session gave up on (``wirespan_parser_messages{result=reason}``)."""
        if self._drop is not None:
            self._drop(self.protocol, reason)

    def span(
        self,
        name: str,
        kind: SpanKind,
        start_ns: int,
        end_ns: int,
        attributes: dict[str, AttrValue],
        traceparent: bytes | bytearray | memoryview | str | None = None,
        status_code: StatusCode = StatusCode.UNSET,
        status_message: str = "",
        events: list[SpanEvent] | None = None,
    ) -> Span:
        """Build a span with the connection's addresses, resource and trace context.

        Server spans get ``client.address``/``client.port`` and ``server.port``;
        client-side spans get ``server.address``/``server.port`` (OTel semconv).
        A valid ``traceparent`` makes the span a child of the caller's span.
        """
        if kind == SpanKind.SERVER:
            attributes.setdefault("server.address", self.server_addr)
            attributes.setdefault("server.port", self.server_port)
            attributes.setdefault("client.address", self.client_addr)
            attributes.setdefault("client.port", self.client_port)
        else:
            attributes.setdefault("server.address", self.server_addr)
            attributes.setdefault("server.port", self.server_port)
        trace_id = None
        parent = b""
        flags = 1
        if traceparent is not None:
            tp = parse_traceparent(traceparent)
            if tp is not None:
                trace_id, parent, flags = tp
        if end_ns < start_ns:
            end_ns = start_ns
        # Positional: this runs once per span, and keywords cost a third of the call.
        return Span(name, kind, start_ns, end_ns, attributes, self.resource, trace_id, None, parent,
                    status_code, status_message, events, "", flags)

    def kind_for(self, passive: SpanKind, client_side: SpanKind = SpanKind.CLIENT) -> SpanKind:
        """The span kind for this perspective.

        ``passive`` is the protocol's kind for a wire capture (SERVER for HTTP,
        CLIENT for databases, PRODUCER/CONSUMER for messaging); ``client_side`` is
        what the calling process's span is (CLIENT, PRODUCER or CONSUMER).
        """
        p = self.perspective
        if p == Perspective.PASSIVE:
            return passive
        if p == Perspective.SERVER:
            return SpanKind.SERVER
        return client_side


class Session:
    """Per-connection parser state. Subclasses implement ``feed``; ``gap``/``close`` as needed."""

    protocol: ClassVar[str] = ""
    #: Optional ``feed_whole(from_client, data, ts_ns) -> bool``: parse ``data`` (one
    #: segment, while this direction's buffer is empty) without buffering it, when it
    #: holds exactly whole messages; return False, having changed nothing, to have it
    #: buffered and ``feed`` called as usual. For the common small exchange only.
    feed_whole: ClassVar[Any] = None

    def __init__(self, conn: Conn) -> None:
        self.conn = conn

    def feed(self, from_client: bool, buf: LargeBuffer, ts_ns: int) -> None:
        """Parse the complete messages at the front of ``buf`` and release them."""
        raise NotImplementedError

    def skip_gap(self, from_client: bool, nbytes: int, ts_ns: int) -> bool:
        """``nbytes`` of this direction were lost (a capture cap, a full ring, a missing
        segment) and the buffer before them was fully consumed. A session that can step
        over them without losing its place (inside a body of known length) does so and
        returns True; then nothing is cleared. The default returns False: the stage
        clears the buffer and calls ``gap``.
        """
        return False

    def gap(self, from_client: bool, ts_ns: int) -> None:
        """Bytes of this direction were lost and its buffer was cleared: resync.

        The default forgets requests in flight (their responses cannot be paired
        reliably any more).
        """

    def close(self, ts_ns: int, reset: bool = False) -> None:
        """The connection ended: emit what is complete (e.g. a body delimited by close)."""
