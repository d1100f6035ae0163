"""AMQP 0-9-1 (RabbitMQ): spans for publishes, deliveries, gets, settlements, queue.declare,
and channel and connection errors.

Contract: processors/protocols/base.py (the package, ``amqp/__init__.py``, picks this module or
``v10.py`` by the first bytes). The wire (AMQP 0-9-1 specification §4.2): after the
client's protocol header ``AMQP\\x00\\x00\\x09\\x01`` both sides send frames

    type (1: method, 2: content header, 3: content body, 8: heartbeat) | channel u16 |
    size u32 | payload | 0xCE

A method frame's payload is ``class-id u16, method-id u16`` and the method's arguments; a
message is a ``basic.publish`` / ``basic.deliver`` / ``basic.get-ok`` / ``basic.return``
method, then a content header (``class-id, weight, body-size u64, property flags,
properties``), then body frames until ``body-size`` bytes came. Frames of other channels may
come between a message's frames. Method and header frames are read whole, in place (they are
small: bounded by ``MAX_FRAME``); body frames, of any size, are stepped over as they arrive
and released, never copied. Of the properties only ``message-id``, ``correlation-id`` and a
``traceparent`` in the ``headers`` table are kept; of ``connection.start-ok`` only the
client's ``connection_name`` (its credentials are never read).

Spans: ``basic.publish`` -> PRODUCER ``publish {exchange}`` (``amq.default`` for the default
exchange in the name, an empty `messaging.destination.name` as the conventions say), ending when its
body is sent or, on a channel in confirm mode, at the broker's
``basic.ack`` / ``basic.nack`` (an error); ``basic.deliver`` -> CONSUMER ``process {queue}``
(the queue of its consumer tag, from ``basic.consume``), ``basic.get`` -> CONSUMER
``receive {queue}`` ending at ``get-ok``'s body or ``get-empty``; a client's ``basic.ack``,
``nack`` and ``reject`` -> CLIENT ``ack {queue}`` / ... (operation type ``settle``);
``queue.declare`` -> CLIENT ``queue.declare {queue}`` at ``declare-ok``. A ``channel.close``
or ``connection.close`` from the broker with an error code fails the synchronous request
pending on that channel, or the publish it names (``class-id 60, method-id 40``), or else is
an ERROR span of its own; a ``basic.return`` (unroutable) fails the publish it returns.
"""

from __future__ import annotations

import struct
from typing import Any, ClassVar

from processors.protocols.base import Conn, Detection, PendingMap, Perspective, ProtocolSettings, Session
from processors.protocols.errors import LimitExceeded, Malformed
from service.largebuf import BufferBoundsError, LargeBuffer
from service.model import SpanKind, StatusCode
from service.speedups import load as _load_speedup

#: The C frame walk (_frames.c: feed_whole's common case), None when disabled or not built:
#: the pure-Python path below then does the same work.
_C = _load_speedup("processors.protocols.amqp._frames")

NAME = "amqp"
DEFAULT_PORTS = frozenset({5672})

PROTOCOL_HEADER = b"AMQP\x00\x00\x09\x01"
#: Also taken for the header: AMQP 0-9 (RabbitMQ answers both as 0-9-1).
_HEADERS_OK = (PROTOCOL_HEADER, b"AMQP\x01\x01\x00\x09")
METHOD, HEADER, BODY, HEARTBEAT = 1, 2, 3, 8
FRAME_END = 0xCE
#: Method and content-header frames larger than this are refused (RabbitMQ's default
#: frame_max is 128 KiB; a method frame near it is a huge argument table).
MAX_FRAME = 1024 * 1024
#: A body frame may be as large as the negotiated frame_max (2^32-1 at most); it is skipped.
MAX_BODY_FRAME = 0xFFFFFFFF
#: The largest size of each frame type (the octet's 256 values) feed_whole takes: -1 for an
#: unknown type, MAX_FRAME for those read whole, MAX_BODY_FRAME for a body (any u32).
_SIZE_LIMIT = tuple(MAX_FRAME if t in (METHOD, HEADER, HEARTBEAT) else MAX_BODY_FRAME if t == BODY else -1
                    for t in range(256))
#: Channels tracked per connection: RabbitMQ's default channel_max is 2047 (the wire allows
#: 65535; a connection opening more is refused, LimitExceeded, rather than costing ~30 MB).
MAX_CHANNELS = 2048
#: Consumer tags remembered per channel (tag -> queue), oldest forgotten first: 2048 channels of
#: 64 stay within a few MB for one hostile connection.
MAX_CONSUMERS = 64
#: Bytes of a name (exchange, queue, routing key) kept for a span: a shortstr is <= 255.
MAX_NAME = 255

_FRAME = struct.Struct(">BHI")
_CM = struct.Struct(">HH")
_FRAME_CM = struct.Struct(">BHIHH")  # a method frame's header and class and method ids
_U16 = struct.Struct(">H").unpack_from
_U32 = struct.Struct(">I").unpack_from
_U64 = struct.Struct(">Q").unpack_from

# Reply codes (AMQP 0-9-1 §1.9, constants) -> error.type.
_REPLY = {
    311: "CONTENT_TOO_LARGE", 312: "NO_ROUTE", 313: "NO_CONSUMERS", 320: "CONNECTION_FORCED",
    402: "INVALID_PATH", 403: "ACCESS_REFUSED", 404: "NOT_FOUND", 405: "RESOURCE_LOCKED",
    406: "PRECONDITION_FAILED", 501: "FRAME_ERROR", 502: "SYNTAX_ERROR", 503: "COMMAND_INVALID",
    504: "CHANNEL_ERROR", 505: "UNEXPECTED_FRAME", 506: "RESOURCE_ERROR", 530: "NOT_ALLOWED",
    540: "NOT_IMPLEMENTED", 541: "INTERNAL_ERROR",
}

# (class, method) -> (name, sender): "c" client, "s" server, "b" both. The complete 0-9-1
# method table plus RabbitMQ's extensions (exchange.bind, confirm, basic.nack, connection.blocked).
_METHODS: dict[tuple[int, int], tuple[str, str]] = {
    (10, 10): ("connection.start", "s"), (10, 11): ("connection.start-ok", "c"),
    (10, 20): ("connection.secure", "s"), (10, 21): ("connection.secure-ok", "c"),
    (10, 30): ("connection.tune", "s"), (10, 31): ("connection.tune-ok", "c"),
    (10, 40): ("connection.open", "c"), (10, 41): ("connection.open-ok", "s"),
    (10, 50): ("connection.close", "b"), (10, 51): ("connection.close-ok", "b"),
    (10, 60): ("connection.blocked", "s"), (10, 61): ("connection.unblocked", "s"),
    (10, 70): ("connection.update-secret", "s"), (10, 71): ("connection.update-secret-ok", "c"),
    (20, 10): ("channel.open", "c"), (20, 11): ("channel.open-ok", "s"),
    (20, 20): ("channel.flow", "b"), (20, 21): ("channel.flow-ok", "b"),
    (20, 40): ("channel.close", "b"), (20, 41): ("channel.close-ok", "b"),
    (40, 10): ("exchange.declare", "c"), (40, 11): ("exchange.declare-ok", "s"),
    (40, 20): ("exchange.delete", "c"), (40, 21): ("exchange.delete-ok", "s"),
    (40, 30): ("exchange.bind", "c"), (40, 31): ("exchange.bind-ok", "s"),
    (40, 40): ("exchange.unbind", "c"), (40, 51): ("exchange.unbind-ok", "s"),
    (50, 10): ("queue.declare", "c"), (50, 11): ("queue.declare-ok", "s"),
    (50, 20): ("queue.bind", "c"), (50, 21): ("queue.bind-ok", "s"),
    (50, 30): ("queue.purge", "c"), (50, 31): ("queue.purge-ok", "s"),
    (50, 40): ("queue.delete", "c"), (50, 41): ("queue.delete-ok", "s"),
    (50, 50): ("queue.unbind", "c"), (50, 51): ("queue.unbind-ok", "s"),
    (60, 10): ("basic.qos", "c"), (60, 11): ("basic.qos-ok", "s"),
    (60, 20): ("basic.consume", "c"), (60, 21): ("basic.consume-ok", "s"),
    (60, 30): ("basic.cancel", "b"), (60, 31): ("basic.cancel-ok", "b"),
    (60, 40): ("basic.publish", "c"), (60, 50): ("basic.return", "s"),
    (60, 60): ("basic.deliver", "s"), (60, 70): ("basic.get", "c"),
    (60, 71): ("basic.get-ok", "s"), (60, 72): ("basic.get-empty", "s"),
    (60, 80): ("basic.ack", "b"), (60, 90): ("basic.reject", "c"),
    (60, 100): ("basic.recover-async", "c"), (60, 110): ("basic.recover", "c"),
    (60, 111): ("basic.recover-ok", "s"), (60, 120): ("basic.nack", "b"),
    (85, 10): ("confirm.select", "c"), (85, 11): ("confirm.select-ok", "s"),
    (90, 10): ("tx.select", "c"), (90, 11): ("tx.select-ok", "s"),
    (90, 20): ("tx.commit", "c"), (90, 21): ("tx.commit-ok", "s"),
    (90, 30): ("tx.rollback", "c"), (90, 31): ("tx.rollback-ok", "s"),
}
#: Synchronous client requests: each is answered by the method after it (``-ok``) or refused by
#: a close. ``connection.open`` is not among them: from start-ok to open-ok the login is pending.
_SYNC = {(20, 10), (20, 40), (40, 10), (40, 20), (40, 30), (40, 40), (50, 10), (50, 20),
         (50, 30), (50, 40), (50, 50), (60, 10), (60, 20), (60, 30), (60, 70), (60, 110), (85, 10),
         (90, 10), (90, 20), (90, 30)}
_ANSWERS = {(c, m + 1) for c, m in _SYNC} | {(40, 51), (60, 72)}
_CONTENT = {(60, 40), (60, 50), (60, 60), (60, 71)}  # methods followed by a content header
_CM_AT = _CM.unpack_from  # (class-id, method-id): the method tables' key as it is
_WANT_NAME = (b"connection_name",)
_SETTLE_NAMES = {(60, 80): "ack", (60, 120): "nack", (60, 90): "reject"}
#: Requests whose first argument (after a reserved u16) is a queue / an exchange name.
_QUEUE_FIRST = frozenset({(50, 10), (50, 20), (50, 30), (50, 40), (50, 50), (60, 20), (60, 70)})
_EXCHANGE_FIRST = frozenset({(40, 10), (40, 20)})
#: An answer -> the request it answers (the method before it).
_ASKED = {cm: (cm[0], cm[1] - 1) for cm in _ANSWERS}
_TAG_BIT = struct.Struct(">QB").unpack_from  # a delivery tag and the octet of bits after it
_CONTENT_HEADER = struct.Struct(">HHQH").unpack_from  # class-id, weight, body-size, property flags
_WANT_TP = (b"traceparent",)
_PUBLISH, _DELIVER = (60, 40), (60, 60)
#: _frames.walk's record kinds beyond the frame types (METHOD, HEADER, BODY): decoded methods.
_K_PUBLISH, _K_DELIVER, _K_SETTLE, _K_START_OK, _K_PUBLISH_MESSAGE, _K_DELIVER_MESSAGE = 4, 5, 6, 7, 9, 10
_K_NO_SPAN = 11  # a run of methods whose handler is _no_span, on one channel


class Settings(ProtocolSettings):
    #: Spans for the client's basic.ack / basic.nack / basic.reject (one per settlement).
    trace_settlements: bool = True
    #: Spans for every synchronous request (exchange.declare, queue.bind, basic.consume, ...),
    #: not only queue.declare; a failed one always gets a span.
    trace_all_methods: bool = False


# ---------------------------------------------------------------------------
# reading helpers (absolute offsets in a LargeBuffer, bounded by ``end``)
# ---------------------------------------------------------------------------
def _shortstr(v: memoryview, off: int, end: int) -> tuple[str, int]:
    if off >= end:
        raise Malformed(NAME, "truncated", off)
    nxt = off + 1 + v[off]
    if nxt > end:
        raise Malformed(NAME, "truncated", off, "shortstr overruns the frame")
    # str() decodes the view itself: no bytes copy first (<= 255 bytes either way).
    return str(v[off + 1:nxt], "utf-8", "replace"), nxt


def _skip_shortstr(v: memoryview, off: int, end: int) -> int:
    if off >= end:
        raise Malformed(NAME, "truncated", off)
    nxt = off + 1 + v[off]
    if nxt > end:
        raise Malformed(NAME, "truncated", off)
    return nxt


#: Field-value type -> fixed size (RabbitMQ's table, as pika and the errata use it).
_FIXED = {0x74: 1, 0x62: 1, 0x42: 1, 0x73: 2, 0x75: 2, 0x49: 4, 0x69: 4, 0x6C: 8, 0x4C: 8,
          0x66: 4, 0x64: 8, 0x44: 5, 0x54: 8, 0x56: 0}
_LONG = frozenset(b"SxAF")  # u32 length then that many bytes
#: The key lengths of each ``want`` of _table_get (the module's own few tuples).
_WANT_LENS: dict[tuple[bytes, ...], frozenset[int]] = {}


def _table_get(v: memoryview, off: int, end: int, want: tuple[bytes, ...]) -> tuple[dict[bytes, str], int]:
    """A field table at ``off``: the long-string values of the keys in ``want`` (lower-cased
    match), and the offset after the table. Other values are stepped over by size."""
    if off + 4 > end:
        raise Malformed(NAME, "truncated", off)
    tend = off + 4 + _U32(v, off)[0]
    if tend > end:
        raise Malformed(NAME, "truncated", off, "table overruns the frame")
    p = off + 4
    out: dict[bytes, str] = {}
    # Only a key as long as a wanted one is read and lower-cased (the others cannot match).
    lens = _WANT_LENS.get(want)
    if lens is None:
        lens = _WANT_LENS[want] = frozenset(len(k) for k in want if len(k) <= 32)
    while p < tend:
        klen = v[p]
        tpos = p + 1 + klen  # the value's type octet
        if tpos >= tend:
            raise Malformed(NAME, "bad_table", p)
        t = v[tpos]
        p = tpos + 1
        if t == 0x53:  # 'S', the usual value (a header's), first: not a fixed size
            if p + 4 > tend:
                raise Malformed(NAME, "bad_table", p)
            n = _U32(v, p)[0]
            if klen in lens and n <= 1024:
                key = v[tpos - klen:tpos].tobytes().lower()
                if key in want:
                    out[key] = str(v[p + 4:p + 4 + n], "utf-8", "replace") if p + 4 + n <= tend else ""
            p += 4 + n
        elif (size := _FIXED.get(t)) is not None:
            p += size
        elif t in _LONG:
            if p + 4 > tend:
                raise Malformed(NAME, "bad_table", p)
            p += 4 + _U32(v, p)[0]
        else:
            raise Malformed(NAME, "bad_field_type", p - 1, f"{t:#x}")
        if p > tend:
            raise Malformed(NAME, "bad_table", p)
    return out, tend


def _read_header(v: memoryview, p: int, end: int) -> tuple[int, str | None, str | None, str | None]:
    """A content header's payload at ``p`` (to ``end``): body size, correlation-id, message-id
    (None: absent) and the ``headers`` table's traceparent (None: absent)."""
    if end - p < 14:
        raise Malformed(NAME, "bad_content_header", p)
    cls, _weight, body, flags = _CONTENT_HEADER(v, p)
    if cls != 60:
        raise Malformed(NAME, "bad_content_header", p)
    q = p + 14
    f = flags
    while f & 1:  # more flag words follow (only bits 15..2 are defined for basic)
        if q + 2 > end:
            raise Malformed(NAME, "truncated", q)
        f = _U16(v, q)[0]
        q += 2
    corr = mid = tp = None
    # basic properties, in flag order (§1.8.2): shortstr unless noted. Only the bits set are
    # visited, highest first (bits 1 and 0 are not properties).
    f = flags & 0xFFFC
    while f:
        bit = f.bit_length() - 1
        f ^= 1 << bit
        if bit == 13:  # headers (table)
            got, q = _table_get(v, q, end, _WANT_TP)
            tp = got.get(b"traceparent")
        elif bit in (12, 11):  # delivery-mode, priority (octets)
            q += 1
        elif bit == 6:  # timestamp (u64)
            q += 8
        elif bit == 10:  # correlation-id
            corr, q = _shortstr(v, q, end)
        elif bit == 7:  # message-id
            mid, q = _shortstr(v, q, end)
        else:
            q = _skip_shortstr(v, q, end)
        if q > end:
            raise Malformed(NAME, "truncated", q)
    return body, corr, mid, tp


#: A protocol header's proper ends (1-7 bytes), longest first: what a client's first bytes are
#: when the capture (or the receiver) began inside its header, which the client may send in pieces.
_HEADER_TAILS = tuple(sorted({h[i:] for h in _HEADERS_OK for i in range(1, 8)}, key=len, reverse=True))


def _frame_at(buf: LargeBuffer, p: int) -> int:
    """1: a whole, well-formed method, header, body or heartbeat frame begins at ``p``; 0: none
    can; -1: too few bytes yet to tell."""
    n = len(buf) - p
    if n < 1:
        return -1
    if buf.u8_at(p) not in (METHOD, HEADER, BODY, HEARTBEAT):
        return 0
    if n < 7:
        return -1
    size = buf.u32be_at(p + 3)
    if size > MAX_FRAME:
        return 0
    if n < 8 + size:
        return -1
    return 1 if buf.u8_at(p + 7 + size) == FRAME_END else 0


def header_tail(buf: LargeBuffer) -> int:
    """How many of a client's first bytes are the end of a protocol header whose start was not
    seen (the capture began inside it): k > 0 when they are one of its ends and a whole frame
    follows them while none begins at the start; 0 when not; -1 when too few bytes to tell.
    Without this the connection's every later frame was read k bytes off, and it was lost."""
    if _frame_at(buf, 0) > 0:
        return 0  # a frame at the start: the connection's frames, not a header's end
    head = buf.bytes_at(0, min(len(buf), 7))  # <= 7 bytes: a small copy, once a connection
    wait = False
    for t in _HEADER_TAILS:
        k = len(t)
        if head[:k] != t[:len(head)]:
            continue
        if len(head) < k:  # may still be this end
            wait = True
            continue
        r = _frame_at(buf, k)
        if r > 0:
            return k
        wait = wait or r < 0
    return -1 if wait and len(buf) < 8 + MAX_FRAME else 0


# ---------------------------------------------------------------------------
# detection
# ---------------------------------------------------------------------------
def detect(buf: LargeBuffer, from_client: bool | None) -> Detection:
    n = len(buf)
    if n == 0:
        return Detection.NEED_MORE
    if buf.u8_at(0) == 0x41:  # 'A': the protocol header
        if from_client is False:
            return Detection.NO
        if n >= 8:  # the whole header: one comparison
            return Detection.REQUEST if buf.bytes_at(0, 8) in _HEADERS_OK else Detection.NO
        got = buf.bytes_at(0, n)
        return Detection.NEED_MORE if any(h.startswith(got) for h in _HEADERS_OK) else Detection.NO
    if buf.u8_at(0) != METHOD:
        return Detection.NO
    if n < 11:
        return Detection.NEED_MORE
    _, channel, size, c, m = _FRAME_CM.unpack(buf.bytes_at(0, 11))
    cm = (c, m)
    info = _METHODS.get(cm)
    if info is None or size < 4 or size > 64 * 1024:
        return Detection.NO
    sender = info[1]
    if cm == (10, 10):  # connection.start: channel 0, version 0-9
        if channel != 0 or from_client is True:
            return Detection.NO
        if n < 13:
            return Detection.NEED_MORE
        if buf.u8_at(11) != 0 or buf.u8_at(12) != 9:
            return Detection.NO
    elif (channel == 0) != (cm[0] == 10):  # connection methods on channel 0, the others not
        return Detection.NO
    if (sender == "c" and from_client is False) or (sender == "s" and from_client is True):
        return Detection.NO
    if n < 7 + size + 1:
        return Detection.NEED_MORE
    if buf.u8_at(7 + size) != FRAME_END:
        return Detection.NO
    if sender == "c":
        return Detection.REQUEST
    if sender == "s":
        return Detection.RESPONSE
    return Detection.REQUEST if from_client is not False else Detection.RESPONSE


def ambiguous_role(buf: LargeBuffer) -> bool:
    """Methods either side sends (basic.ack, channel.close, ...): a connection joined on one
    takes its roles from the ports (base.py)."""
    if len(buf) < 11 or buf.u8_at(0) != METHOD:
        return False
    info = _METHODS.get((buf.u16be_at(7), buf.u16be_at(9)))
    return info is not None and info[1] == "b"


# ---------------------------------------------------------------------------
# session
# ---------------------------------------------------------------------------
def _op_traceparent(op: _Op) -> Any:
    return op.traceparent


#: (A module constant: an enum member looked up on its class costs a Python-level lookup.)
_PASSIVE = Perspective.PASSIVE

#: Session.unconfirmed before a connection's first confirm-mode publish (never written).
_NONE_UNCONFIRMED: dict[tuple[int, int], Any] = {}


class _Op:
    """An operation becoming a span: a message (its content still arriving) or a request."""

    __slots__ = ("attrs", "body", "kind", "method", "name", "start_ts", "traced", "traceparent")

    def __init__(self, method: tuple[int, int], name: str, kind: SpanKind, start_ts: int, attrs: dict[str, Any],
                 traced: bool = True) -> None:
        self.method = method
        self.name = name
        self.kind = kind
        self.start_ts = start_ts
        self.attrs = attrs
        self.traceparent: str | None = None
        self.body = 0  # body bytes still to come
        self.traced = traced


class _Channel:
    __slots__ = ("confirm", "confirm_low", "confirm_next", "consumers", "content", "get_queue", "last_exchange",
                 "last_queue", "sync_head", "sync_tail")

    def __init__(self) -> None:
        self.content: list[_Op | None] = [None, None]  # per direction (from server, from client)
        self.confirm = False
        self.confirm_next = 1
        self.confirm_low = 1
        self.consumers: dict[str, str] = {}  # consumer tag -> queue
        # The queue of the last basic.get-ok: its message's settlement is named by it (a
        # settlement carries only a delivery tag, and a get has no consumer to name it by).
        self.get_queue = ""
        self.last_exchange = ""
        self.last_queue = ""
        self.sync_head = self.sync_tail = 0  # this channel's requests in Session.sync


class _Dir:
    __slots__ = ("end", "first", "header", "skip", "skip_ch")

    def __init__(self) -> None:
        self.first = True    # nothing read yet: a client's first bytes may be the protocol header
        self.header = False  # the protocol header is being read
        self.skip = 0        # body-frame bytes still to step over
        self.skip_ch = 0     # the channel of that body frame
        self.end = False     # its frame-end octet is still to come


def _message_fields(a: dict[str, Any], body: int, corr: str | None, mid: str | None) -> None:
    """A message's content-header fields as span attributes: the buffered path (_properties) and
    the whole publish and delivery (_published, _delivered) write the same ones."""
    a["messaging.message.body.size"] = body
    if corr is not None:
        a["messaging.message.conversation_id"] = corr
    if mid is not None:
        a["messaging.message.id"] = mid


class Session(Session):  # type: ignore[no-redef]
    protocol: ClassVar[str] = NAME
    #: The span kinds of a connection's perspective: these for a capture (Conn.kind_for's
    #: PASSIVE), else set by __init__ (three attributes fewer to set a connection).
    k_client: SpanKind = SpanKind.CLIENT
    k_producer: SpanKind = SpanKind.PRODUCER
    k_consumer: SpanKind = SpanKind.CONSUMER

    def __init__(self, conn: Conn) -> None:
        self.conn = conn  # base.Session.__init__'s one line, without the call (once a connection)
        settings = conn.settings  # (the exact class first: a pydantic isinstance is a Python call)
        self.settings: Settings = settings if type(settings) is Settings or isinstance(settings, Settings) \
            else Settings()
        self.dirs = (_Dir(), _Dir())
        self.channels: dict[int, _Channel] = {}
        self.client_name: str | None = None
        #: Synchronous requests awaiting their -ok, by (channel, number): answered in order on
        #: each channel (a client normally waits for each; one that does not is still paired).
        self.sync: dict[tuple[int, int], _Op] = PendingMap(conn, traceparent=_op_traceparent)
        #: Confirm-mode publishes awaiting basic.ack/nack, by (channel, sequence number): made at
        #: the first (most connections never select confirms), the shared empty dict until then
        #: (read only: entries are added by _content_done alone). Made after ``sync``, it is
        #: still the connection's second store.
        self.unconfirmed: dict[tuple[int, int], _Op] = _NONE_UNCONFIRMED
        #: From start-ok until open-ok, start-ok's time: a refusal is a failed connect (its _Op is
        #: built only then, by _close: most logins succeed).
        self.login: int | None = None
        # The span kinds of this connection's perspective (fixed): looked up once, not a span.
        if conn.perspective is not _PASSIVE:  # a capture keeps the class's kinds
            kind = conn.kind_for
            self.k_client = kind(SpanKind.CLIENT)
            self.k_producer = kind(SpanKind.PRODUCER, SpanKind.PRODUCER)
            self.k_consumer = kind(SpanKind.CONSUMER, SpanKind.CONSUMER)

    def _ch(self, channel: int) -> _Channel:
        ch = self.channels.get(channel)
        if ch is None:
            if len(self.channels) >= MAX_CHANNELS:
                raise LimitExceeded(NAME, "too_many_channels", 0)
            ch = self.channels[channel] = _Channel()
        return ch

    # -- framing ------------------------------------------------------------
    def feed(self, from_client: bool, buf: LargeBuffer, ts_ns: int) -> None:
        # The frames are walked with a cursor and released once at the end (a release per
        # frame re-sliced the buffer's chunk list each time). Offsets in errors are from the
        # start of the frame at fault, as when each frame was released before the next.
        d = self.dirs[from_client]
        off = 0
        want = 0
        try:
            while True:
                n = len(buf) - off
                if d.skip:
                    take = min(d.skip, n)
                    if take:
                        off += take
                        n -= take
                        d.skip -= take
                        self._body_bytes(from_client, d.skip_ch, take, ts_ns, final=False)
                    if d.skip:
                        return
                if d.end:
                    if not n:
                        return
                    if buf.u8_at(off) != FRAME_END:
                        d.end = False
                        raise Malformed(NAME, "bad_frame_end", 0)
                    off += 1
                    n -= 1
                    d.end = False
                    self._body_bytes(from_client, d.skip_ch, 0, ts_ns, final=True)
                if d.first and n:
                    if from_client and buf.u8_at(off) != 0x41 and off == 0:
                        k = header_tail(buf)  # joined inside the protocol header?
                        if k < 0:
                            want = n + 1
                            return
                        off += k
                        n -= k
                    d.first = False
                    d.header = from_client and n > 0 and buf.u8_at(off) == 0x41  # 'A'
                if d.header:
                    if n < 8:
                        want = 8
                        return
                    if buf.bytes_at(off, 8) not in _HEADERS_OK:
                        d.header = False
                        raise Malformed(NAME, "bad_protocol_header", 0)
                    off += 8
                    d.header = False
                    continue
                if n < 7:
                    if n:
                        want = 7
                    return
                ftype, channel, size = _FRAME.unpack_from(buf.view_at(off, 7))  # one read (straddling: scratch)
                if ftype == BODY:
                    if n > 7 + size:  # the whole body frame is here: stepped over at once
                        if buf.u8_at(off + 7 + size) != FRAME_END:
                            raise Malformed(NAME, "bad_frame_end", 7 + size)
                        off += 8 + size
                        self._body_bytes(from_client, channel, size, ts_ns, final=True)
                        continue
                    off += 7
                    d.skip, d.skip_ch, d.end = size, channel, True
                    continue
                if ftype not in (METHOD, HEADER, HEARTBEAT):
                    raise Malformed(NAME, "bad_frame_type", 0, str(ftype))
                if size > MAX_FRAME:
                    raise LimitExceeded(NAME, "frame_too_large", 0)
                end = 7 + size
                if n < end + 1:
                    want = end + 1
                    return
                if buf.u8_at(off + end) != FRAME_END:
                    raise Malformed(NAME, "bad_frame_end", end)
                if ftype != HEARTBEAT:
                    # The frame as one view (in place; a frame across chunks: the scratch,
                    # <= MAX_FRAME), read with struct and indexing (_frame).
                    self._frame(from_client, ftype, channel, buf.view_at(off, end + 1), buf.ts_at(off), ts_ns)
                off += end + 1
        finally:
            buf.consumed(off, want)

    def feed_whole(self, from_client: bool, data: memoryview, ts_ns: int) -> bool:
        """A segment of whole frames (base.py's contract), read in place without a buffer.

        The framing is checked first (complete frames of known types, each with its
        frame-end octet, ending exactly with the segment): only then is anything done, in
        the order and with the code ``feed`` uses. A direction's first segment is taken too,
        the client's with the protocol header first (the header alone is most connections'
        first segment: read here, it is not buffered). Anything else returns False unchanged.
        """
        d = self.dirs[from_client]
        if d.skip or d.end or d.header:
            return False
        if type(data) is not memoryview:  # the eBPF receiver's payloads are bytes
            data = memoryview(data)
        n = len(data)
        off = 0
        if d.first and from_client and n and data[0] == 0x41:  # 'A': the client's protocol header
            # A connection's first segment: the header alone, or with whole frames after it, is
            # taken as feed takes it; any other (cut or wrong) is left to feed (it raises there).
            if n < 8 or data[:8] not in _HEADERS_OK:
                return False
            off = 8
        if _C is None:
            return self._feed_frames(from_client, data, off, n, ts_ns)
        recs = _C.walk(data, off)
        if recs is None:  # a frame C leaves to Python: the same segment, read by the reference
            return self._feed_frames(from_client, data, off, n, ts_ns)
        if recs is False:  # not whole frames (_feed_frames' check says the same)
            return False
        if n:
            d.first = False
        # The records (_frames.c's header lists them), each given to the handler the Python
        # readers would have called, with the fields they would have read.
        channels = self.channels
        for rec in recs:
            kind = rec[0]
            if kind == METHOD:  # _method's steps: its handler, its channel, any content there ended
                _, channel, off, end, cm = rec
                handler = _HANDLERS.get(cm)
                if handler is None:
                    raise Malformed(NAME, "unknown_method", 7, f"{cm[0]}.{cm[1]}")
                ch = channels.get(channel) or self._ch(channel)
                content = ch.content
                if content[from_client] is not None:
                    content[from_client] = None
                    self.conn.drop("incomplete_message")
                try:  # (never _no_span's: those come as _K_NO_SPAN)
                    handler(self, from_client, channel, ch, cm, data[off:end + 1], 11, end - off, ts_ns, ts_ns)
                except (BufferBoundsError, struct.error, IndexError):
                    raise Malformed(NAME, "truncated", 0, "a field overruns the frame") from None
                continue
            channel = rec[1]
            if kind == BODY:  # (a body makes no channel: _body_bytes)
                self._body_bytes(from_client, channel, rec[2], ts_ns, True)
                continue
            ch = channels.get(channel) or self._ch(channel)
            content = ch.content
            if kind == HEADER:
                _, _, body, corr, mid, tp = rec
                op = content[from_client]
                if op is None or op.body >= 0:
                    self.conn.drop("unexpected_header")  # as _header
                else:
                    self._properties(from_client, channel, ch, op, body, corr, mid, tp, ts_ns)
                continue
            # A method the walker decoded: _method's steps but the handler, then its fields.
            if content[from_client] is not None:
                content[from_client] = None
                self.conn.drop("incomplete_message")
            if kind == _K_NO_SPAN:  # methods without a span: nothing more
                continue
            if kind == _K_PUBLISH_MESSAGE:
                if rec[8] == rec[4] and not ch.confirm:  # the whole message, no confirm to await
                    self._published(ch, rec, ts_ns)
                    continue
                _, _, exchange, rk, body, corr, mid, tp, total = rec
                op = self._publish(from_client, ch, exchange, rk, ts_ns)
                self._properties(from_client, channel, ch, op, body, corr, mid, tp, ts_ns)
                if total:  # its body frames that came with it (none complete it before the last)
                    op.body -= total
                    if op.body == 0:
                        self._content_done(from_client, channel, ch, ts_ns)
            elif kind == _K_DELIVER_MESSAGE:
                if rec[11] == rec[7]:  # the whole message
                    self._delivered(ch, rec, ts_ns)
                    continue
                _, _, tag, dtag, redelivered, exchange, rk, body, corr, mid, tp, total = rec
                op = self._deliver(from_client, ch, tag, dtag, redelivered, exchange, rk, ts_ns)
                self._properties(from_client, channel, ch, op, body, corr, mid, tp, ts_ns)
                if total:
                    op.body -= total
                    if op.body == 0:
                        self._content_done(from_client, channel, ch, ts_ns)
            elif kind == _K_PUBLISH:
                self._publish(from_client, ch, rec[2], rec[3], ts_ns)
            elif kind == _K_DELIVER:
                _, _, tag, dtag, redelivered, exchange, rk = rec
                self._deliver(from_client, ch, tag, dtag, redelivered, exchange, rk, ts_ns)
            elif kind == _K_SETTLE:
                self._settled(from_client, channel, ch, (60, rec[2]), rec[3], rec[4], 11, ts_ns, ts_ns)
            else:  # _K_START_OK
                self._started(rec[2], ts_ns)
        return True

    def _feed_frames(self, from_client: bool, data: memoryview, off: int, n: int, ts_ns: int) -> bool:
        """feed_whole's pure-Python walk (the reference of _frames.c) of the frames from ``off``:
        the framing checked first, then each frame read in place."""
        d = self.dirs[from_client]
        frame = _FRAME.unpack_from
        frames = []  # (type, channel, start, end: its frame-end octet), as checked
        add = frames.append
        try:
            while off < n:
                ftype, channel, size = frame(data, off)  # fewer than 7 bytes left: struct.error
                end = off + 7 + size
                if end >= n or data[end] != FRAME_END:
                    return False
                if size > _SIZE_LIMIT[ftype]:  # an unknown type, or a method or header too large
                    return False
                add((ftype, channel, off, end))
                off = end + 1
        except struct.error:
            return False
        if n:
            d.first = False  # feed's first look, which found no protocol header
        for ftype, channel, off, end in frames:
            if ftype == METHOD:  # _frame, inline: most frames are methods
                try:
                    self._method(from_client, channel, data[off:end + 1], 7, end - off, ts_ns, ts_ns)
                except (BufferBoundsError, struct.error, IndexError):
                    raise Malformed(NAME, "truncated", 0, "a field overruns the frame") from None
            elif ftype == BODY:
                self._body_bytes(from_client, channel, end - off - 7, ts_ns, True)  # final
            elif ftype == HEADER:
                try:
                    self._header(from_client, channel, data[off:end + 1], 7, end - off, ts_ns)
                except (BufferBoundsError, struct.error, IndexError):
                    raise Malformed(NAME, "truncated", 0, "a field overruns the frame") from None
        return True

    def _frame(self, from_client: bool, ftype: int, channel: int, v: memoryview, start: int, ts_ns: int) -> None:
        """A whole method or content-header frame ``v`` (its 7-byte header to its frame-end)."""
        try:
            if ftype == METHOD:
                self._method(from_client, channel, v, 7, len(v) - 1, start, ts_ns)
            else:
                self._header(from_client, channel, v, 7, len(v) - 1, ts_ns)
        except (BufferBoundsError, struct.error, IndexError):
            raise Malformed(NAME, "truncated", 0, "a field overruns the frame") from None

    # -- content ------------------------------------------------------------
    def _header(self, from_client: bool, channel: int, v: memoryview, p: int, end: int, ts_ns: int) -> None:
        ch = self.channels.get(channel) or self._ch(channel)
        op = ch.content[from_client]
        if op is None or op.body >= 0:
            # A content header without its method: a capture joined inside a message. Skipped.
            self.conn.drop("unexpected_header")
            return
        body, corr, mid, tp = _read_header(v, p, end)
        self._properties(from_client, channel, ch, op, body, corr, mid, tp, ts_ns)

    def _properties(self, from_client: bool, channel: int, ch: _Channel, op: _Op, body: int, corr: str | None,
                    mid: str | None, tp: str | None, ts_ns: int) -> None:
        """A content header's fields (_read_header's, or _frames.walk's) for the message ``op``."""
        _message_fields(op.attrs, body, corr, mid)
        if tp:
            op.traceparent = tp
        op.body = body
        if body == 0:
            self._content_done(from_client, channel, ch, ts_ns)

    def _body_bytes(self, from_client: bool, channel: int, n: int, ts_ns: int, final: bool) -> None:
        ch = self.channels.get(channel)
        op = ch.content[from_client] if ch is not None else None
        if op is None or op.body < 0:
            if final:
                self.conn.drop("unexpected_body")  # joined inside a message: skipped, counted
            return
        op.body -= n
        if op.body < 0:
            ch.content[from_client] = None  # type: ignore[union-attr]
            raise Malformed(NAME, "body_too_long", 0)
        if final and op.body == 0:
            self._content_done(from_client, channel, ch, ts_ns)  # type: ignore[arg-type]

    def _content_done(self, from_client: bool, channel: int, ch: _Channel, ts_ns: int) -> None:
        op = ch.content[from_client]
        ch.content[from_client] = None
        assert op is not None
        if op.method == (60, 40):  # publish
            if ch.confirm:
                seq = ch.confirm_next
                ch.confirm_next += 1
                if self.unconfirmed is _NONE_UNCONFIRMED:
                    self.unconfirmed = PendingMap(self.conn, traceparent=_op_traceparent)
                self.unconfirmed[(channel, seq)] = op
                return
            self._emit(op, ts_ns)
        elif op.method == (60, 50):  # basic.return: the publish it returns failed
            self._returned(channel, ch, op, ts_ns)
        else:
            self._emit(op, ts_ns)

    # -- methods ------------------------------------------------------------
    def _method(self, from_client: bool, channel: int, v: memoryview, p: int, end: int, start: int,
                ts_ns: int) -> None:
        if end - p < 4:
            raise Malformed(NAME, "truncated", p)
        cm = _CM_AT(v, p)
        handler = _HANDLERS.get(cm)
        if handler is None:
            raise Malformed(NAME, "unknown_method", p, f"{cm[0]}.{cm[1]}")
        ch = self.channels.get(channel) or self._ch(channel)
        content = ch.content
        if content[from_client] is not None:
            content[from_client] = None  # a method ends any content on its channel (§4.2.6)
            self.conn.drop("incomplete_message")
        if handler is not _no_span:
            handler(self, from_client, channel, ch, cm, v, p + 4, end, start, ts_ns)


    # Each method's handler (_HANDLERS, by class and method id) takes the same arguments: the
    # frame ``v`` with its arguments from ``q`` to ``end``.
    def _start_ok(self, from_client: bool, channel: int, ch: _Channel, cm: tuple[int, int], v: memoryview,
                  q: int, end: int, start: int, ts_ns: int) -> None:
        """client-properties (the response's credentials are not read); the login is pending."""
        got, _ = _table_get(v, q, end, _WANT_NAME)
        self._started(got.get(b"connection_name"), start)

    def _started(self, name: str | None, start: int) -> None:
        """start-ok's connection_name (None: absent); the login is pending from ``start``."""
        if name:
            self.client_name = name[:MAX_NAME]
        self.login = start

    def _open_ok(self, from_client: bool, channel: int, ch: _Channel, cm: tuple[int, int], v: memoryview,
                 q: int, end: int, start: int, ts_ns: int) -> None:
        self.login = None  # logged in

    def _close_ok(self, from_client: bool, channel: int, ch: _Channel, cm: tuple[int, int], v: memoryview,
                  q: int, end: int, start: int, ts_ns: int) -> None:
        """channel.close-ok (either side's close answered): the channel is gone."""
        self._forget_channel(channel)

    def _connection_close_ok(self, from_client: bool, channel: int, ch: _Channel, cm: tuple[int, int],
                             v: memoryview, q: int, end: int, start: int, ts_ns: int) -> None:
        for c in list(self.channels):
            self._forget_channel(c)

    def _no_span(self, from_client: bool, channel: int, ch: _Channel, cm: tuple[int, int], v: memoryview,
                 q: int, end: int, start: int, ts_ns: int) -> None:
        """tune, flow, heartbeats' siblings, cancel from the broker, blocked: no span."""

    def _content_method(self, from_client: bool, channel: int, ch: _Channel, cm: tuple[int, int],
                        v: memoryview, q: int, end: int, start: int, ts_ns: int) -> None:
        if cm == (60, 40):  # publish: reserved u16, exchange, routing-key, bits
            exchange, q = _shortstr(v, q + 2, end)
            rk, q = _shortstr(v, q, end)
            self._publish(from_client, ch, exchange, rk, start)
            return
        if cm == (60, 60):  # deliver: consumer-tag, delivery-tag u64, redelivered, exchange, routing-key
            tag, q = _shortstr(v, q, end)
            dtag, redelivered = _TAG_BIT(v, q)
            exchange, q = _shortstr(v, q + 9, end)
            rk, q = _shortstr(v, q, end)
            self._deliver(from_client, ch, tag, dtag, redelivered & 1, exchange, rk, start)
            return
        if cm == (60, 50):  # return: reply-code, reply-text, exchange, routing-key
            code = _U16(v, q)[0]
            text, q = _shortstr(v, q + 2, end)
            exchange, q = _shortstr(v, q, end)
            rk, q = _shortstr(v, q, end)
            a: dict[str, Any] = {
                "messaging.system": "rabbitmq", "messaging.operation.name": "publish",
                "messaging.operation.type": "send", "messaging.destination.name": exchange,
                 "error.type": _REPLY.get(code, str(code)), "_status": text, "messaging.rabbitmq.reply_code": code}
            if rk:
                a["messaging.rabbitmq.destination.routing_key"] = rk
            op = _Op(cm, f"publish {exchange or 'amq.default'}", self.k_producer, start, a)
        else:  # get-ok: delivery-tag u64, redelivered, exchange, routing-key, message-count
            dtag, redelivered = _TAG_BIT(v, q)
            redelivered &= 1
            exchange, q = _shortstr(v, q + 9, end)
            rk, q = _shortstr(v, q, end)
            req = self._sync_pop(channel, ch)
            queue = req.attrs.get("messaging.destination.subscription.name", "") if req is not None else ""
            if queue:
                ch.get_queue = queue
            op = self._consumer_op(cm, "receive", queue, exchange, rk, dtag, redelivered,
                                   req.start_ts if req is not None else start)
        op.body = -1  # its content header is next
        ch.content[from_client] = op

    def _publish(self, from_client: bool, ch: _Channel, exchange: str, rk: str, start: int) -> _Op:
        """A basic.publish's fields (_content_method's, or _frames.walk's): its content is next."""
        ch.last_exchange = exchange
        a: dict[str, Any] = {"messaging.system": "rabbitmq", "messaging.operation.name": "publish",
                             "messaging.operation.type": "send",
                             "messaging.destination.name": exchange}  # "" for the default exchange (semconv)
        if rk:
            a["messaging.rabbitmq.destination.routing_key"] = rk
        op = _Op(_PUBLISH, f"publish {exchange or 'amq.default'}", self.k_producer, start, a)
        op.body = -1  # its content header is next
        ch.content[from_client] = op
        return op

    def _published(self, ch: _Channel, rec: tuple[Any, ...], ts_ns: int) -> None:
        """A whole publish (_frames.walk's message record) on a channel without confirms: its
        span at once, as _publish, _properties and _content_done make it, without an _Op
        kept in between (most messages come whole)."""
        _, _, exchange, rk, body, corr, mid, tp, _total = rec
        ch.last_exchange = exchange
        a: dict[str, Any] = {"messaging.system": "rabbitmq", "messaging.operation.name": "publish",
                             "messaging.operation.type": "send", "messaging.destination.name": exchange}
        if rk:
            a["messaging.rabbitmq.destination.routing_key"] = rk
        _message_fields(a, body, corr, mid)
        if self.client_name:
            a["messaging.client.id"] = self.client_name
        conn = self.conn
        conn.emit(conn.span(f"publish {exchange or 'amq.default'}", self.k_producer, ts_ns, ts_ns, a, tp or None))

    def _delivered(self, ch: _Channel, rec: tuple[Any, ...], ts_ns: int) -> None:
        """A whole delivery (_frames.walk's message record): its span at once, as _deliver,
        _properties and _content_done make it."""
        _, _, tag, dtag, redelivered, exchange, rk, body, corr, mid, tp, _total = rec
        queue = ch.consumers.get(tag, "")
        a: dict[str, Any] = {"messaging.system": "rabbitmq", "messaging.operation.name": "process",
                             "messaging.operation.type": "process", "messaging.destination.name": exchange,
                             "messaging.rabbitmq.message.delivery_tag": dtag}
        if rk:
            a["messaging.rabbitmq.destination.routing_key"] = rk
        if queue:
            a["messaging.destination.subscription.name"] = queue
        if redelivered:
            a["messaging.rabbitmq.redelivered"] = True
        _message_fields(a, body, corr, mid)
        if self.client_name:
            a["messaging.client.id"] = self.client_name
        target = queue if queue and not queue.startswith("amq.gen-") else (exchange or "amq.default")
        conn = self.conn
        conn.emit(conn.span(f"process {target}", self.k_consumer, ts_ns, ts_ns, a, tp or None))

    def _deliver(self, from_client: bool, ch: _Channel, tag: str, dtag: int, redelivered: int, exchange: str,
                 rk: str, start: int) -> _Op:
        """A basic.deliver's fields (_content_method's, or _frames.walk's): its content is next."""
        op = self._consumer_op(_DELIVER, "process", ch.consumers.get(tag, ""), exchange, rk, dtag, redelivered,
                               start)
        op.body = -1
        ch.content[from_client] = op
        return op

    def _consumer_op(self, cm: tuple[int, int], opname: str, queue: str, exchange: str, rk: str, dtag: int,
                     redelivered: int, start: int) -> _Op:
        a: dict[str, Any] = {"messaging.system": "rabbitmq", "messaging.operation.name": opname,
                             "messaging.operation.type": opname, "messaging.destination.name": exchange,
                             "messaging.rabbitmq.message.delivery_tag": dtag}
        if rk:
            a["messaging.rabbitmq.destination.routing_key"] = rk
        if queue:
            a["messaging.destination.subscription.name"] = queue
        if redelivered:
            a["messaging.rabbitmq.redelivered"] = True
        target = queue if queue and not queue.startswith("amq.gen-") else (exchange or "amq.default")
        return _Op(cm, f"{opname} {target}", self.k_consumer, start, a)

    def _request(self, from_client: bool, channel: int, ch: _Channel, cm: tuple[int, int], v: memoryview,
                 q: int, end: int, start: int, ts_ns: int) -> None:
        """A synchronous request (the client's: the broker's is not one) remembered until its -ok
        or the close that refuses it."""
        if not from_client:
            return
        mname = _METHODS[cm][0]
        a: dict[str, Any] = {"messaging.system": "rabbitmq", "messaging.operation.name": mname}
        target = ""
        nowait = False
        if cm in _QUEUE_FIRST:
            target, q2 = _shortstr(v, q + 2, end)  # reserved u16, queue
            if cm == (50, 10):
                nowait = bool(v[q2] & 0x10)
            elif cm == (60, 20):
                tag, q3 = _shortstr(v, q2, end)
                nowait = bool(v[q3] & 0x08)
                if nowait and tag:
                    self._consumer(ch, tag, target)
                a["_tag"] = tag
            if target:
                a["messaging.destination.subscription.name" if cm[0] == 60 else "messaging.destination.name"] = target
        elif cm in _EXCHANGE_FIRST:
            target, q2 = _shortstr(v, q + 2, end)
            if cm == (40, 10):
                q2 = _skip_shortstr(v, q2, end)  # type
                nowait = bool(v[q2] & 0x10)
            if target:
                a["messaging.destination.name"] = target
        if cm == (85, 10):
            ch.confirm = True  # publishes from here on are numbered (select-ok follows)
            ch.confirm_next = ch.confirm_low = 1
            nowait = bool(v[q] & 1)
        if cm == (60, 70):  # basic.get becomes a CONSUMER receive span at get-ok / get-empty
            traced = True
        else:
            # channel.open/close and the like are plumbing: never a span of their own unless refused
            traced = cm == (50, 10) or (self.settings.trace_all_methods and cm[0] not in (10, 20))
        name = mname if not target or target.startswith("amq.gen-") else f"{mname} {target}"
        op = _Op(cm, name, self.k_client, start, a, traced)
        if nowait:
            if traced:
                self._emit(op, start)
            return
        self.sync[(channel, ch.sync_tail)] = op
        ch.sync_tail += 1

    def _sync_peek(self, channel: int, ch: _Channel) -> _Op | None:
        while ch.sync_head < ch.sync_tail:
            op = self.sync.get((channel, ch.sync_head))
            if op is not None:
                return op
            ch.sync_head += 1  # dropped by the budget (counted there)
        return None

    def _sync_pop(self, channel: int, ch: _Channel) -> _Op | None:
        head = ch.sync_head
        if head < ch.sync_tail:  # the usual answer: to the request at the head, still there
            key = (channel, head)
            op = self.sync.get(key)
            if op is not None:
                del self.sync[key]  # (PendingMap.pop tests the key first: known here)
                ch.sync_head = head + 1
                return op
        op = self._sync_peek(channel, ch)
        if op is not None:
            self.sync.pop((channel, ch.sync_head))
            ch.sync_head += 1
        return op

    def _consumer(self, ch: _Channel, tag: str, queue: str) -> None:
        if tag not in ch.consumers and len(ch.consumers) >= MAX_CONSUMERS:
            ch.consumers.pop(next(iter(ch.consumers)))
        ch.consumers[tag] = queue

    def _answer(self, from_client: bool, channel: int, ch: _Channel, cm: tuple[int, int], v: memoryview, q: int,
                end: int, start: int, ts_ns: int) -> None:
        """The broker's answer to the request at the head of the channel's (a client's is none)."""
        if from_client:
            return
        req = self._sync_pop(channel, ch)
        if req is None:
            self.conn.drop("unpaired_answer")
            return
        if req.method != _ASKED.get(cm) and cm not in ((60, 72), (40, 51)):
            self.conn.drop("unpaired_answer")  # an answer to another request than the pending one
            return
        a = req.attrs
        if cm == (50, 11):  # declare-ok: queue, message-count, consumer-count
            queue, q = _shortstr(v, q, end)
            if queue:
                a["messaging.destination.name"] = queue
                if not req.name.endswith(queue) and not queue.startswith("amq.gen-"):
                    req.name = f"queue.declare {queue}"
                ch.last_queue = queue
        elif cm == (60, 21):  # consume-ok: consumer-tag
            tag, _ = _shortstr(v, q, end)
            self._consumer(ch, tag, a.get("messaging.destination.subscription.name", ""))
        elif cm == (60, 72):  # get-empty: nothing to receive, not an error
            a["messaging.batch.message_count"] = 0
            a["messaging.operation.type"] = "receive"
            req.kind = self.k_consumer
            q_ = a.get("messaging.destination.subscription.name", "")
            req.name = f"receive {q_}" if q_ and not q_.startswith("amq.gen-") else "receive"
            a["messaging.operation.name"] = "receive"
        if req.traced:
            self._emit(req, ts_ns)

    def _settle(self, from_client: bool, channel: int, ch: _Channel, cm: tuple[int, int], v: memoryview,
                q: int, end: int, start: int, ts_ns: int) -> None:
        tag, bits = _TAG_BIT(v, q)
        self._settled(from_client, channel, ch, cm, tag, bits, q, start, ts_ns)

    def _settled(self, from_client: bool, channel: int, ch: _Channel, cm: tuple[int, int], tag: int, bits: int,
                 q: int, start: int, ts_ns: int) -> None:
        """A basic.ack / nack / reject's delivery tag and bits (_settle's, or _frames.walk's; ``q``:
        their offset in the frame, for an error)."""
        if not from_client:
            # The broker's confirm of this channel's publishes (ack, or nack: not stored).
            if cm == (60, 90):
                raise Malformed(NAME, "unexpected_method", q, "basic.reject from the broker")
            self._confirm(channel, ch, tag, bool(bits & 1), cm == (60, 120), ts_ns)
            return
        if not self.settings.trace_settlements:
            return
        opname = _SETTLE_NAMES[cm]
        a: dict[str, Any] = {"messaging.system": "rabbitmq", "messaging.operation.name": opname,
                             "messaging.operation.type": "settle", "messaging.rabbitmq.message.delivery_tag": tag}
        if cm != (60, 90) and bits & 1:
            a["messaging.rabbitmq.multiple"] = True
        if cm != (60, 80) and bits & (2 if cm == (60, 120) else 1):
            a["messaging.rabbitmq.requeue"] = True
        consumers = ch.consumers
        got = ch.get_queue
        if len(consumers) == 1:  # the usual channel, one consumer: its queue without a set
            queue = next(iter(consumers.values()))
            if got and got != queue:
                queue = ""  # messages of two queues: the delivery tag does not tell which
        else:
            queues = set(consumers.values())
            if got:
                queues.add(got)
            queue = next(iter(queues)) if len(queues) == 1 else ""
        if queue:
            a["messaging.destination.subscription.name"] = queue
        name = f"{opname} {queue}" if queue and not queue.startswith("amq.gen-") else opname
        # _emit's steps for a settlement (nothing stashed in ``a``): no _Op to build.
        if self.client_name:
            a["messaging.client.id"] = self.client_name
        conn = self.conn
        conn.emit(conn.span(name, self.k_client, start, ts_ns, a))

    def _confirm(self, channel: int, ch: _Channel, tag: int, multiple: bool, nack: bool, ts_ns: int) -> None:
        seqs: Any = range(ch.confirm_low, tag + 1) if multiple else (tag,)
        if multiple and tag + 1 - ch.confirm_low > len(self.unconfirmed):
            # A range wider than what is pending (a hostile tag): walk what is pending instead.
            seqs = sorted(k[1] for k in self.unconfirmed if k[0] == channel and k[1] <= tag)
        for s in seqs:
            op = self.unconfirmed.pop((channel, s), None)
            if op is None:
                continue
            if nack:
                op.attrs["error.type"] = "nack"
                self._emit(op, ts_ns, StatusCode.ERROR, "the broker refused the message (basic.nack)")
            else:
                self._emit(op, ts_ns)
        if multiple:
            ch.confirm_low = max(ch.confirm_low, tag + 1)
        while ch.confirm_low < ch.confirm_next and (channel, ch.confirm_low) not in self.unconfirmed:
            ch.confirm_low += 1

    def _returned(self, channel: int, ch: _Channel, ret: _Op, ts_ns: int) -> None:
        """A basic.return: the publish it returns (confirm mode: the oldest unconfirmed one to the
        same exchange and routing key) fails; without confirms that publish's span is gone, so
        the return is an ERROR span of its own."""
        a = ret.attrs
        text = a.pop("_status", "")
        a.pop("messaging.message.body.size", None)
        for key, op in self.unconfirmed.items():
            if key[0] == channel and op.attrs.get("messaging.destination.name") == a["messaging.destination.name"] \
                    and op.attrs.get("messaging.rabbitmq.destination.routing_key") == \
                    a.get("messaging.rabbitmq.destination.routing_key"):
                op.attrs["error.type"] = a["error.type"]
                op.attrs["messaging.rabbitmq.reply_code"] = a["messaging.rabbitmq.reply_code"]
                op.attrs["_status"] = text
                return
        self._emit(ret, ts_ns, StatusCode.ERROR, text)

    def _close(self, from_client: bool, channel: int, ch: _Channel, cm: tuple[int, int], v: memoryview, q: int,
               end: int, start: int, ts_ns: int) -> None:
        code = _U16(v, q)[0]
        text, q = _shortstr(v, q + 2, end)
        ccls, cmeth = _U16(v, q)[0], _U16(v, q + 2)[0]
        if from_client or code < 300:
            return  # a client's own close, or a clean one (200 REPLY_SUCCESS): forgotten at close-ok
        etype = _REPLY.get(code, str(code))
        op: _Op | None = None
        pending = self._sync_peek(channel, ch)
        if cm == (10, 50) and self.login is not None:
            op = _Op((10, 11), "connect", self.k_client, self.login,
                     {"messaging.system": "rabbitmq", "messaging.operation.name": "connect"})
            self.login = None
        elif pending is not None and (pending.method == (ccls, cmeth) or (ccls, cmeth) != (60, 40)):
            op = self._sync_pop(channel, ch)
        elif (ccls, cmeth) == (60, 40):
            # The close names an earlier publish (to an exchange that does not exist): that
            # publish's own span is gone, so the failure is a span of its own; a request
            # pending on the channel meanwhile is aborted by the close, counted.
            while self._sync_pop(channel, ch) is not None:
                self.conn.drop("channel_closed")
            exch = ch.last_exchange
            op = _Op((60, 40), f"publish {exch or 'amq.default'}", self.k_producer, start,
                     {"messaging.system": "rabbitmq", "messaging.operation.name": "publish",
                      "messaging.operation.type": "send", "messaging.destination.name": exch})
        else:
            name = _METHODS[cm][0]
            op = _Op(cm, name, self.k_client, start,
                     {"messaging.system": "rabbitmq", "messaging.operation.name": name})
        op.attrs["error.type"] = etype
        op.attrs["messaging.rabbitmq.reply_code"] = code
        self._emit(op, ts_ns, StatusCode.ERROR, text)
        # Whatever else was pending on the channel (or, for the connection, everywhere) is over.
        for key in [k for k in self.unconfirmed if cm == (10, 50) or k[0] == channel]:
            self.unconfirmed.pop(key)
            self.conn.drop("no_confirm")

    def _forget_channel(self, channel: int) -> None:
        """A channel closed (its close-ok seen): what was still pending on it is over, counted. Its
        number may be opened again, and must not find the old channel's requests."""
        ch = self.channels.pop(channel, None)
        if ch is None:
            return
        for i in range(ch.sync_head, ch.sync_tail):
            if self.sync.pop((channel, i), None) is not None:
                self.conn.drop("channel_closed")
        for key in [k for k in self.unconfirmed if k[0] == channel]:
            self.unconfirmed.pop(key)
            self.conn.drop("no_confirm")

    def _emit(self, op: _Op, end_ts: int, status: StatusCode = StatusCode.UNSET, msg: str = "",
              incomplete: bool = False) -> None:
        a = op.attrs
        # The stashed keys are rare (a consume's tag, a return's text): tested, not popped.
        if "_tag" in a:
            del a["_tag"]
        if "_status" in a:
            st = a.pop("_status")
            if status == StatusCode.UNSET:
                status, msg = StatusCode.ERROR, st
        if self.client_name:
            a["messaging.client.id"] = self.client_name
        conn = self.conn
        # Positional (Conn.span's order): keywords were a third of the call, once a span.
        span = conn.span(op.name, op.kind, op.start_ts, end_ts, a, op.traceparent, status, msg)
        if incomplete:
            self.cut_short(span)
        else:
            conn.emit(span)

    # -- gaps and the end ----------------------------------------------------------
    def skip_gap(self, from_client: bool, nbytes: int, ts_ns: int) -> bool:
        d = self.dirs[from_client]
        if d.skip >= nbytes:
            d.skip -= nbytes
            self._body_bytes(from_client, d.skip_ch, nbytes, ts_ns, final=False)
            return True
        return False

    def gap(self, from_client: bool, ts_ns: int) -> None:
        d = self.dirs[from_client]
        d.skip = 0
        d.end = False
        d.header = False
        for ch in self.channels.values():
            if ch.content[from_client] is not None:
                ch.content[from_client] = None
                self.conn.drop("incomplete_message")

    def close(self, ts_ns: int, reset: bool = False) -> None:
        for ch in self.channels.values():
            content = ch.content
            if content[0] is None and content[1] is None:  # the usual channel: nothing arriving
                continue
            for i in (0, 1):
                op = content[i]
                if op is not None:
                    ch.content[i] = None
                    if op.method == (60, 50):  # a return whose content was cut: its publish stays as is
                        self.conn.drop("incomplete_message")
                    else:  # a publish or a delivery whose content was arriving: base.py's rule
                        self._emit(op, ts_ns, incomplete=True)
        # A confirm-mode publish without its confirm was sent as far as the wire shows (a span
        # marked incomplete); a request without its -ok has no outcome and is counted.
        if self.unconfirmed:  # (PendingMap.clear is a Python call: not made for an empty one)
            for op in self.unconfirmed.values():
                if self.client_name:
                    op.attrs["messaging.client.id"] = self.client_name
                op.attrs.pop("_status", None)
                self.cut_short(self.conn.span(op.name, op.kind, op.start_ts, op.start_ts, op.attrs, op.traceparent))
            self.unconfirmed.clear()
        if self.sync:
            for op in self.sync.values():
                if op.traced:
                    self.cut_short(None, "no_response")
            self.sync.clear()


def _handlers() -> dict[tuple[int, int], Any]:
    """Each method's handler in Session, as _method's old chain of tests chose it (the first
    test that matched wins: assigned here last): one dict look-up a method."""
    s = Session
    h: dict[tuple[int, int], Any] = dict.fromkeys(_METHODS, s._no_span)
    rules: list[tuple[Any, Any]] = [
        (_ANSWERS, s._answer), (_SYNC, s._request), (((60, 80), (60, 120), (60, 90)), s._settle),
        (((10, 51),), s._connection_close_ok), (((20, 41),), s._close_ok), (((10, 50), (20, 40)), s._close),
        (((10, 41),), s._open_ok), (((10, 11),), s._start_ok), (_CONTENT, s._content_method)]
    for methods, fn in rules:
        for cm in methods:
            if cm in h:  # only the methods of the table: another is unknown
                h[cm] = fn
    return h


#: (class, method) -> Session's handler of it (_method); a method not in it is unknown.
_HANDLERS = _handlers()
_no_span = Session._no_span  # not called: _method knows it does nothing
