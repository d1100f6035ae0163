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

Linear time, whatever the segmentation (a byte a segment included). One client
dripping bytes must not cost the node a core, so:

- ``detect`` answers from a bounded prefix, and its ``NO`` is final for the
  message at the buffer's start: the stage does not ask again until the buffer
  is reset, so a detector must say ``NEED_MORE`` while the bytes so far could
  still begin its protocol (tests/test_segmentation.py holds every module to it).
- ``feed`` resumes where it stopped: it releases what it consumed (or remembers
  its place, as the Redis scanner does) and never rescans a growing message from
  its start. ``LargeBuffer.find`` remembers a failed search, so re-asking for a
  delimiter scans only the new bytes. When the next message needs ``n`` bytes,
  set ``buf.want = n`` (from the buffer's start, after any release; ``buf.consumed(n, want)``
  does both at a feed's end): the stage
  does not call ``feed`` again before they are there.
- A shared test feeds each protocol's exchange (tests/support/exchanges.py: add
  a new protocol's line) whole, a byte a segment and in random pieces: same
  spans, linear time.

Bounded, and counted. Requests awaiting answers live in a ``PendingQueue`` or
``PendingMap`` built with the ``Conn``: they draw from the stage's
``PendingBudget`` (per connection and in total), which drops the oldest and
counts each (``pending_limit``, ``pending_budget``). ``close`` counts what is
still pending (``no_response``-like reasons) or a message begun and never ended
(``incomplete_message``); bytes still buffered when a session ends are counted
by the stage. Nothing leaves the stage without a span or a reason.

The end of a capture (or of a connection) is not a failure: one rule for every
protocol, ``Session.cut_short``. An exchange whose reply had begun when the
connection closed becomes a span with what was seen: the status the reply gave
so far (its status line, its first message) and ``wirespan.incomplete=true``,
never an ``error.type`` of its own. A reply begun but not yet readable (bytes
left in the server's direction, ``Session.reply_begun``) counts as begun too. One whose reply had not begun is counted
(``no_response``-like reasons), as before. A reset stays an error
(``error.type=connection_reset`` where a protocol reports it).

UDP (optional): a module that also reads UDP exports ``detect_datagram(view, from_client)``
(one whole datagram, a memoryview: ``NEED_MORE`` is ``NO`` there) and its ``Session`` a
``feed_datagram(from_client, view, ts_ns)`` parsing that one message in place. The stage
keeps UDP flows (receivers' ``DATAGRAM`` events) apart from connections, tries only these
modules on them, and builds the ``Conn`` with ``transport = "udp"`` (``"tcp"`` otherwise);
``close`` is called when the flow has been idle for the stage's ``udp_idle_timeout``, so
queries still awaiting an answer are counted then. Only DNS reads UDP today.

Roles when the receiver does not know them (no SYN seen, a capture started
late): ``detect``'s answer decides who is the client. A module whose first
message may come from either side (an MQTT PUBLISH, an HTTP/2 frame joined
mid-stream) also exports ``ambiguous_role(buf) -> bool``; when it says True the
stage takes the roles from the ports instead (``server_side_by_ports``: the
protocol's well-known or configured port, else a system port against a
non-system one, else the non-ephemeral port is the server's) and keeps
``detect``'s answer only when the ports do not tell.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable
from enum import IntEnum
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel, ConfigDict

from processors.protocols.assembly import recent_deque
from service import model, speedups
from service.largebuf import LargeBuffer
from service.model import AttrValue, Resource, Span, SpanEvent, SpanKind, StatusCode, parse_traceparent

if TYPE_CHECKING:
    from processors.protocols.assembly import Ctx, TraceAssembler

__all__ = ["Detection", "Perspective", "ProtocolSettings", "Conn", "Session", "PendingBudget", "PendingQueue",
           "PendingMap", "INCOMPLETE", "server_side_by_ports"]

#: The span attribute that marks an exchange cut short by the end of the capture or of
#: the connection after its reply began (``Session.cut_short``).
INCOMPLETE = "wirespan.incomplete"
#: Ports at or above this are ephemeral (Linux's default ``ip_local_port_range`` starts
#: here; IANA's dynamic range at 49152, Windows' too): a client's, not a server's.
EPHEMERAL_PORT_MIN = 32768
#: Ports below this are system ports (RFC 6335 §6): a server's.
SYSTEM_PORT_MAX = 1024

#: ``Span(...)`` with every argument given, in C when built (processors/protocols/_stage.c
#: new_span: the same span, the same generator for its ids; tests/test_stage_speedup.py holds
#: them equal): Conn.span's last step, once a span.
_STAGE_C = speedups.load("processors.protocols._stage")
if _STAGE_C is not None:
    _STAGE_C.span_setup(Span, model._rand.getrandbits, model.DEFAULT_RESOURCE)
    _new_span: Callable[..., Span] = _STAGE_C.new_span
else:
    _new_span = Span


def server_side_by_ports(port_a: int, port_b: int, known: frozenset[int] = frozenset()) -> int | None:
    """Which end of a connection is the server by its ports alone: 0 (``port_a``), 1
    (``port_b``) or None when the ports do not tell.

    In order: the one port that is the protocol's (``known``: its default ports and the
    configured ones); a system port (< 1024) against a non-system one; a port below the
    ephemeral range against one inside it. Two ports alike (both known, both ephemeral,
    equal) tell nothing.
    """
    if port_a == port_b:
        return None
    ka, kb = port_a in known, port_b in known
    if ka != kb:
        return 0 if ka else 1
    sa, sb = port_a < SYSTEM_PORT_MAX, port_b < SYSTEM_PORT_MAX
    if sa != sb:
        return 0 if sa else 1
    ea, eb = port_a >= EPHEMERAL_PORT_MIN, port_b >= EPHEMERAL_PORT_MIN
    if ea != eb:
        return 1 if ea else 0
    return None

#: Defaults of the stage's budget for pending-request state (``pending:`` in its config).
#: A node agent must survive its worst neighbour: one connection that never answers (an
#: MQTT flood of unacknowledged publishes, memcached quiet gets) may hold this much, and all
#: of them together this much, before the oldest requests are dropped and counted.
MAX_PENDING_ENTRIES = 200_000
MAX_PENDING_BYTES = 128 * 1024 * 1024
MAX_PENDING_ENTRIES_PER_CONNECTION = 10_000
MAX_PENDING_BYTES_PER_CONNECTION = 8 * 1024 * 1024
#: What one pending request costs when its store does not say (a small object with a few
#: attributes and its dict entry: measured 400-700 bytes across the protocols here).
ENTRY_BYTES = 512


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


#: Members as module constants for the per-span paths (an enum member looked up on its class
#: is a Python-level lookup: 70 ns against a global's few).
_PASSIVE, _SERVER_VIEW = Perspective.PASSIVE, Perspective.SERVER
_SERVER_KIND = SpanKind.SERVER


class ProtocolSettings(BaseModel):
    """Options every protocol has; subclasses add their own."""

    model_config = ConfigDict(extra="forbid")

    #: Extra ports to try this protocol first on (detection still checks content).
    ports: list[int] = []


class PendingBudget:
    """The stage-wide budget every session's pending requests draw from.

    Stores (``PendingQueue``/``PendingMap``) add and subtract their entries here as they
    change (two integer updates: the hot path stays cheap). A store keeps itself within
    the per-connection bounds by dropping its own oldest entries; when the totals go over,
    ``over`` is set and the stage sheds the oldest entries of the least recently active
    connections (``shed``) until the totals are back under ``low`` of the bounds.
    """

    __slots__ = ("bytes", "entries", "max_bytes", "max_entries", "over", "per_conn_bytes", "per_conn_entries")

    def __init__(self, max_entries: int = MAX_PENDING_ENTRIES, max_bytes: int = MAX_PENDING_BYTES,
                 per_conn_entries: int = MAX_PENDING_ENTRIES_PER_CONNECTION,
                 per_conn_bytes: int = MAX_PENDING_BYTES_PER_CONNECTION) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.per_conn_entries = per_conn_entries
        self.per_conn_bytes = per_conn_bytes
        self.entries = 0
        self.bytes = 0
        self.over = False

    def shed(self, stores: Iterable[_Store], low: float = 0.9) -> int:
        """Drop the oldest entries of ``stores`` (oldest connection first) until under ``low``
        of both bounds; returns how many were dropped (each counted by its store)."""
        goal_e, goal_b = int(self.max_entries * low), int(self.max_bytes * low)
        dropped = 0
        for store in stores:
            while len(store) and (self.entries > goal_e or self.bytes > goal_b):
                store._evict_oldest("pending_budget")
                dropped += 1
            if self.entries <= goal_e and self.bytes <= goal_b:
                break
        self.over = self.entries > self.max_entries or self.bytes > self.max_bytes
        return dropped


#: A budget for sessions built outside a stage (tests, tools): the defaults, shared.
_DEFAULT_BUDGET = PendingBudget()
_MISSING = object()


def _store_init(self: Any, conn: Conn, entry_bytes: int = ENTRY_BYTES, start: str = "start_ts",
                traceparent: Callable[[Any], Any] | None = None) -> None:
    """``start``: the entries' attribute holding the request's start (its span's start);
    ``traceparent``: a function giving an entry's wire traceparent, for trace assembly.

    The ``__init__`` of both stores: the empty deque or dict is made by its ``__new__`` (its
    ``__init__`` without arguments changes nothing), so a store, several a connection, costs
    one Python call and plain comparisons, not max/min (issue 21)."""
    b = conn.budget
    self._conn = conn
    self._eb = entry_bytes
    cap = b.per_conn_bytes // (entry_bytes if entry_bytes > 1 else 1)
    if cap > b.per_conn_entries:
        cap = b.per_conn_entries
    self._cap = cap if cap > 1 else 1
    self._extra = None
    self._start = start
    self._tp = traceparent
    #: Called with an entry the budget dropped, for a session's own bookkeeping.
    self.on_evict = None
    conn.stores.append(self)


class _Store:
    """What PendingQueue and PendingMap share: the accounting against the budget."""

    __slots__ = ()
    _conn: Conn
    _eb: int
    _cap: int
    _extra: dict[Any, int] | None
    _start: str
    _tp: Callable[[Any], Any] | None
    on_evict: Callable[[Any], None] | None

    def _added(self, x: Any) -> None:
        conn = self._conn
        b = conn.budget
        b.entries += 1
        b.bytes += self._eb
        if b.entries > b.max_entries or b.bytes > b.max_bytes:
            b.over = True
        if conn.assembler is not None:  # a request was parsed: its trace context is decided now
            conn.assembler.open(conn, x, getattr(x, self._start, 0), self._tp)
        if len(self) > self._cap:  # type: ignore[arg-type]
            self._evict_oldest("pending_limit")

    def _removed(self, n: int = 1, extra: int = 0, x: Any = None) -> None:
        """``n`` entries left (``x`` when one did: its request's context closes with it)."""
        conn = self._conn
        b = conn.budget
        b.entries -= n
        b.bytes -= n * self._eb + extra
        if x is not None and conn.ctxs:
            conn.assembler.close(conn, x)  # type: ignore[union-attr]

    def _evict_oldest(self, reason: str) -> None:
        raise NotImplementedError

    def _dropped(self, item: Any, reason: str) -> None:
        self._conn.drop(reason)
        if self.on_evict is not None:
            self.on_evict(item)


class PendingQueue(deque, _Store):  # type: ignore[type-arg]
    """A session's requests in order (a ``deque``), charged to the stage's ``PendingBudget``.

    Beyond the per-connection bound the oldest is dropped and counted (``pending_limit``);
    the stage may drop the oldest to keep the totals (``pending_budget``). Sessions use it
    as the deque it is; only appending and removing are accounted.
    """

    __slots__ = ("_cap", "_conn", "_eb", "_extra", "_start", "_tp", "on_evict")

    __init__ = _store_init

    def append(self, x: Any) -> None:
        # _added, inline: once a request in every protocol, and the call was a third of it (issue 21)
        deque.append(self, x)
        conn = self._conn
        b = conn.budget
        b.entries += 1
        b.bytes += self._eb
        if b.entries > b.max_entries or b.bytes > b.max_bytes:
            b.over = True
        if conn.assembler is not None:
            conn.assembler.open(conn, x, getattr(x, self._start, 0), self._tp)
        if len(self) > self._cap:
            self._evict_oldest("pending_limit")

    def appendleft(self, x: Any) -> None:
        deque.appendleft(self, x)
        self._added(x)

    def popleft(self) -> Any:
        x = deque.popleft(self)
        conn = self._conn  # _removed(1, 0, x), inline (see append)
        b = conn.budget
        b.entries -= 1
        b.bytes -= self._eb
        if x is not None and conn.ctxs:
            conn.assembler.close(conn, x)  # type: ignore[union-attr]
        return x

    def pop(self) -> Any:  # type: ignore[override]
        x = deque.pop(self)
        self._removed(1, 0, x)
        return x

    def remove(self, x: Any) -> None:
        deque.remove(self, x)
        self._removed(1, 0, x)

    def clear(self) -> None:
        n = len(self)
        if n:
            if self._conn.assembler is not None:
                for y in self:
                    self._conn.assembler.close(self._conn, y)
            deque.clear(self)
            self._removed(n)

    def _evict_oldest(self, reason: str) -> None:
        self._dropped(self.popleft(), reason)


class PendingMap(dict, _Store):  # type: ignore[type-arg]
    """A session's requests by key (a ``dict``, insertion-ordered), charged to the budget as
    ``PendingQueue`` is. ``charge(key, n)`` adds bytes an entry holds beyond its estimate
    (e.g. FastCGI params), refunded when the entry goes."""

    __slots__ = ("_cap", "_conn", "_eb", "_extra", "_start", "_tp", "on_evict")

    __init__ = _store_init

    def __setitem__(self, key: Any, value: Any) -> None:
        old = dict.get(self, key, _MISSING)
        dict.__setitem__(self, key, value)
        conn = self._conn
        if old is _MISSING:  # _added, inline (see PendingQueue.append)
            b = conn.budget
            b.entries += 1
            b.bytes += self._eb
            if b.entries > b.max_entries or b.bytes > b.max_bytes:
                b.over = True
            if conn.assembler is not None:
                conn.assembler.open(conn, value, getattr(value, self._start, 0), self._tp)
            if len(self) > self._cap:
                self._evict_oldest("pending_limit")
        elif old is not value and self._conn.assembler is not None:  # a key reused: a new request
            self._conn.assembler.close(self._conn, old)
            self._conn.assembler.open(self._conn, value, getattr(value, self._start, 0), self._tp)

    def setdefault(self, key: Any, default: Any = None) -> Any:
        if key not in self:
            self[key] = default
        return dict.__getitem__(self, key)

    def __delitem__(self, key: Any) -> None:
        v = dict.pop(self, key)
        self._removed(1, self._extra.pop(key, 0) if self._extra else 0, v)

    def pop(self, key: Any, *default: Any) -> Any:
        v = dict.pop(self, key, _MISSING)
        if v is _MISSING:
            return dict.pop(self, key, *default)
        conn = self._conn  # _removed, inline (see PendingQueue.append)
        b = conn.budget
        b.entries -= 1
        b.bytes -= self._eb + (self._extra.pop(key, 0) if self._extra else 0)
        if v is not None and conn.ctxs:
            conn.assembler.close(conn, v)  # type: ignore[union-attr]
        return v

    def popitem(self) -> tuple[Any, Any]:
        k, v = dict.popitem(self)
        self._removed(1, self._extra.pop(k, 0) if self._extra else 0, v)
        return k, v

    def clear(self) -> None:
        n = len(self)
        if n:
            extra = sum(self._extra.values()) if self._extra else 0
            if self._conn.assembler is not None:
                for y in self.values():
                    self._conn.assembler.close(self._conn, y)
            dict.clear(self)
            if self._extra:
                self._extra.clear()
            self._removed(n, extra)

    def update(self, *a: Any, **kw: Any) -> None:  # type: ignore[override]
        for k, v in dict(*a, **kw).items():
            self[k] = v

    def charge(self, key: Any, nbytes: int) -> None:
        """``key``'s entry holds ``nbytes`` more (refunded when it is removed)."""
        if key not in self or nbytes <= 0:
            return
        if self._extra is None:
            self._extra = {}
        self._extra[key] = self._extra.get(key, 0) + nbytes
        b = self._conn.budget
        b.bytes += nbytes
        if b.bytes > b.max_bytes:
            b.over = True

    def _evict_oldest(self, reason: str) -> None:
        k = next(iter(self))
        self._dropped(self.pop(k), reason)


class Conn:
    """What a protocol session knows of its connection, and how it emits spans."""

    __slots__ = (
        "_drop",
        "assembler",
        "budget",
        "client_addr",
        "client_buf",
        "client_port",
        "comm",
        "conn_id",
        "ctxs",
        "emit",
        "enrich",
        "extra",
        "link",
        "perspective",
        "pid",
        "protocol",
        "recent",
        "req_from_client",
        "resource",
        "server_addr",
        "server_buf",
        "server_port",
        "settings",
        "stores",
        "tid",
        "transport",
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
        budget: PendingBudget | None = None,
        assembler: TraceAssembler | None = None,
        bufs: tuple[LargeBuffer, LargeBuffer] | None = None,
    ) -> None:
        self.conn_id = conn_id
        self.client_addr = client_addr
        self.client_port = client_port
        self.server_addr = server_addr
        self.server_port = server_port
        self.perspective = perspective
        self.resource = resource
        self.settings = settings
        # The stage hands over the buffers it already keeps (client's, server's): a connection
        # costs two buffers, not four.
        self.client_buf, self.server_buf = bufs if bufs is not None else (LargeBuffer(), LargeBuffer())
        #: Emit a finished span: the stage's callback itself, not a method wrapping it
        #: (one Python call fewer per span). Replace it with ``set_emit``.
        self.emit: Callable[[Span], None] = emit
        self._drop = drop
        self.protocol = protocol
        self.pid = pid
        self.comm = comm
        self.extra: dict[str, Any] = {}
        #: The stage's budget for pending requests, and this connection's stores drawing on it.
        self.budget = budget if budget is not None else _DEFAULT_BUDGET
        self.stores: list[_Store] = []
        #: Trace assembly (assembly.py), or None: the request contexts of this connection
        #: by pending entry, the recently closed ones, and what the stage tells of the bytes
        #: being fed (the thread that moved them, whether the client sent them).
        self.assembler = assembler
        self.ctxs: dict[int, Ctx] = {}
        # Only trace assembly reads it (a 64-slot deque block, ~700 bytes a connection: issue 21).
        self.recent: deque[Ctx] = recent_deque() if assembler is not None else None  # type: ignore[assignment]
        self.tid: int | None = None
        self.req_from_client = True
        self.link: Any = None  #: assembly's state of this 4-tuple, shared with the other end's view
        #: ``"tcp"`` or ``"udp"`` (a UDP flow: each message one datagram, ``feed_datagram``).
        self.transport = "tcp"
        #: The stage's HTTP enrichers (processors/protocols/enrich/), given to HTTP connections only.
        self.enrich: Any = None

    def release_stores(self) -> None:
        """The session is gone: give back what its stores still hold (without counting drops:
        the session's close counted what it had to)."""
        stores = self.stores
        for st in stores:
            if len(st):  # most are empty by now: no Python-level clear call for them
                st.clear()
        stores.clear()
        if self.assembler is not None:
            self.assembler.forget(self)

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
        if kind == _SERVER_KIND:
            attributes.setdefault("server.address", self.server_addr)
            attributes.setdefault("server.port", self.server_port)
            attributes.setdefault("client.address", self.client_addr)
            attributes.setdefault("client.port", self.client_port)
        else:
            attributes.setdefault("server.address", self.server_addr)
            attributes.setdefault("server.port", self.server_port)
        trace_id = None
        span_id = None
        parent = b""
        flags = 1
        if self.assembler is not None:
            ids = self.assembler.for_span(self, start_ns, end_ns)
            if ids is not None:
                trace_id, span_id, parent, flags = ids
        if traceparent is not None:
            tp = parse_traceparent(traceparent)
            if tp is not None:
                if trace_id is not None and (tp[0] != trace_id or tp[1] != parent):
                    self.assembler.count_conflict()  # type: ignore[union-attr]  # the wire wins
                trace_id, parent, flags = tp
        if end_ns < start_ns:
            end_ns = start_ns
        # Positional: this runs once per span, and keywords cost a third of the call.
        return _new_span(name, kind, start_ns, end_ns, attributes, self.resource, trace_id, span_id, parent,
                         status_code, status_message, events, "", flags)

    def kind_for(self, passive: SpanKind, client_side: SpanKind = SpanKind.CLIENT) -> SpanKind:
        """The span kind for this perspective.

        ``passive`` is the protocol's kind for a wire capture (SERVER for HTTP,
        CLIENT for databases, PRODUCER/CONSUMER for messaging); ``client_side`` is
        what the calling process's span is (CLIENT, PRODUCER or CONSUMER).
        """
        p = self.perspective
        if p == _PASSIVE:
            return passive
        if p == _SERVER_VIEW:
            return _SERVER_KIND
        return client_side


class Session:
    """Per-connection parser state. Subclasses implement ``feed``; ``gap``/``close`` as needed."""

    protocol: ClassVar[str] = ""
    #: Optional ``feed_whole(from_client, data, ts_ns) -> bool``: parse ``data`` (one
    #: segment, while this direction's buffer is empty) without buffering it, when the
    #: session can take all of it in place and be left as ``feed`` would leave it with an
    #: empty buffer: whole messages, or pieces whose state it keeps itself (an HTTP head and
    #: the start of its body, a body's next piece, a memcached data block's rest); return
    #: False, having changed nothing, to have it buffered and ``feed`` called as usual.
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

    def reply_begun(self) -> bool:
        """At ``close``: whether the server's direction still holds bytes the parser had not
        read as a whole message: a reply had begun (a status line cut short, a packet header
        without its body) for the oldest request still waiting, which then takes
        ``cut_short``'s span branch. True once a session: only that request takes it. A parser
        that had read the reply's first message knows it began without asking."""
        if self.__dict__.get("_reply_taken") or not self.conn.server_buf._len:
            return False
        self._reply_taken = True
        return True

    def cut_short(self, span: Span | None, reason: str = "no_response") -> None:
        """An exchange the end of the connection (or of the capture) left unfinished: the
        one rule every protocol's ``close`` follows (this module's docstring).

        ``span`` is what was seen, built as the session builds a finished one, with the
        status its reply gave so far; it is emitted marked ``wirespan.incomplete=true``
        (an error only if that reply said so: the cut itself adds none). ``None``, when no
        reply had begun, is counted as ``reason`` instead.
        """
        if span is None:
            self.conn.drop(reason)
            return
        span.attributes[INCOMPLETE] = True
        self.conn.emit(span)
