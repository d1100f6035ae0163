"""The ``protocols`` stage: TcpEvents in, spans out (design.md §1).

Contract: per connection it keeps two ``LargeBuffer``s (one per direction),
detects the protocol by content (ports only order the tries), builds that
protocol module's ``Session`` (base.py) and feeds it. Everything a parser can
do wrong stops here: a ``ProtocolError`` is counted
(``wirespan_parser_messages{protocol,result=reason}``), the direction's buffer
is cleared and the session told of a gap; after ``max_consecutive_errors`` the
connection is abandoned (counted). Any other exception is a bug: counted as
``internal_error``, logged once with its traceback, the connection abandoned;
nothing escapes ``consume_events``. State is bounded: an LRU of connections,
an idle timeout, a byte budget before detection and per pending message, all
evictions and drops counted. Spans go to ``next.consume_spans`` once per call.

UDP: ``DATAGRAM`` events (receivers/udp.py) are kept apart from TCP. Their ``conn_id``
names a flow (the 5-tuple; eBPF adds the process); flows live in their own LRU
(``max_udp_flows``) and end after ``udp_idle_timeout`` without a datagram, when the
session's ``close`` counts what never got an answer. Each datagram is one message:
only the modules with ``detect_datagram`` (base.py) are tried, and a detected flow's
datagrams go to ``Session.feed_datagram``. A datagram no module takes is counted
``udp_undetected``; the TCP fast path tests nothing new (DATAGRAM is not DATA).
"""

from __future__ import annotations

import ipaddress
import logging
import re
import threading
from collections import OrderedDict
from types import ModuleType
from typing import Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    create_model,
    field_validator,
    model_validator,
)

from processors.protocols import PROTOCOLS, base, load
from processors.protocols.assembly import TraceAssembler
from processors.protocols.base import Conn, Detection, PendingBudget, Perspective, ProtocolSettings, Session
from processors.protocols.enrich import EnrichConfig, Enricher
from processors.protocols.errors import ProtocolError
from processors.routes import HTTP_PROTOCOLS, Routes, RoutesConfig, apply_route
from service import speedups
from service.component import ComponentConfig, EventProcessor
from service.largebuf import LargeBuffer
from service.model import DEFAULT_RESOURCE, EventKind, Resource, Span, TcpEvent
from service.resource_detect import HostNames, ProcessMetadata, ResourceDetectionConfig
from service.telemetry import CONNECTIONS_EVICTED, PARSER_MESSAGES, PROCESSOR_INCOMING, PROCESSOR_OUTGOING

__all__ = ["ProtocolsProcessor", "ServiceNameRule", "Config", "parse_duration"]

log = logging.getLogger(__name__)

#: Connections tracked at once; the least recently used is evicted beyond it
#: (OBI and Beyla keep a comparable LRU of ongoing connections).
MAX_CONNECTIONS = 65_536
#: Seconds without traffic before a connection's state is dropped (the
#: Collector's and conntrack's established-idle timeouts are minutes).
IDLE_TIMEOUT_S = 300.0
#: Bytes a connection may send before a protocol is recognised; then it is ignored.
MAX_DETECT_BYTES = 64 * 1024
#: A segment this long, arriving while detection waits on earlier bytes, is also tried as a
#: message start of its own (``_fresh_start``): the smallest whole messages (a MySQL COM_PING,
#: a Redis inline PING) are five or six bytes.
FRESH_START_MIN = 5
#: Unconsumed bytes one direction may hold (an incomplete message); beyond it the
#: direction is cleared and the session resynchronises.
MAX_MESSAGE_BYTES = 16 * 1024 * 1024
#: Consecutive parse errors before a connection is abandoned.
MAX_CONSECUTIVE_ERRORS = 3
#: UDP flows tracked at once (LRU beyond), apart from the TCP connections.
MAX_UDP_FLOWS = 65_536
#: Seconds without a datagram before a UDP flow ends: a DNS client gives up after 5 s (glibc,
#: dig) and retries at most a few times, so unanswered queries are counted soon; conntrack's
#: unreplied-UDP timeout is 30 s.
UDP_IDLE_TIMEOUT_S = 30.0
#: Default service.name for passive captures when no rule matches: the OTel SDK's
#: own fallback, honest about not knowing.
UNKNOWN_SERVICE = "unknown_service"

_DUR = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?)\s*(ns|us|µs|ms|s|m|h)?\s*$")
_UNIT = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def parse_duration(v: Any) -> float:
    """Seconds from a number or a Collector-style duration string (``"30s"``, ``"5m"``)."""
    if isinstance(v, bool):
        raise ValueError("a duration, not a boolean")
    if isinstance(v, (int, float)):
        return float(v)
    m = _DUR.match(str(v))
    if m is None:
        raise ValueError(f"not a duration: {v!r} (e.g. 30s, 5m, 200ms)")
    return float(m.group(1)) * _UNIT[m.group(2)]


class ServiceNameRule(BaseModel):
    """``service.name`` for connections whose server matches every given condition."""

    model_config = ConfigDict(extra="forbid")

    #: The server's port.
    port: int | None = Field(None, ge=0, le=65535)
    #: The server's address, or a network in CIDR form.
    address: str | None = None
    #: The traced process's command name (eBPF receivers only).
    process: str | None = None
    #: The service.name to set.
    name: str

    @model_validator(mode="after")
    def _one_condition(self) -> ServiceNameRule:
        if self.port is None and self.address is None and self.process is None:
            raise ValueError("a service_name rule needs at least one of port, address, process")
        if self.address is not None:
            ipaddress.ip_network(self.address, strict=False)  # raises ValueError on a typo
        return self

    def matches(self, server_addr: str, server_port: int, comm: str | None) -> bool:
        if self.port is not None and self.port != server_port:
            return False
        if self.process is not None and self.process != comm:
            return False
        if self.address is not None:
            try:
                return ipaddress.ip_address(server_addr) in ipaddress.ip_network(self.address, strict=False)
            except ValueError:
                return False
        return True


class PendingConfig(BaseModel):
    """The budget of pending-request state all sessions draw from (base.PendingBudget)."""

    model_config = ConfigDict(extra="forbid")

    #: Requests awaiting an answer, all connections together.
    max_entries: int = Field(base.MAX_PENDING_ENTRIES, ge=1)
    #: Their estimated bytes, all connections together.
    max_bytes: int = Field(base.MAX_PENDING_BYTES, ge=1024)
    #: Requests awaiting an answer on one connection.
    max_entries_per_connection: int = Field(base.MAX_PENDING_ENTRIES_PER_CONNECTION, ge=1)
    #: Their estimated bytes on one connection.
    max_bytes_per_connection: int = Field(base.MAX_PENDING_BYTES_PER_CONNECTION, ge=1024)

    @model_validator(mode="after")
    def _per_connection_within_total(self) -> PendingConfig:
        if self.max_entries_per_connection > self.max_entries:
            raise ValueError("max_entries_per_connection must be <= max_entries")
        if self.max_bytes_per_connection > self.max_bytes:
            raise ValueError("max_bytes_per_connection must be <= max_bytes")
        return self


class _BaseConfig(ComponentConfig):
    #: Protocols to detect (default: every available one).
    enabled: list[str] | None = None
    #: Rules giving service.name; the first match wins.
    service_name: list[ServiceNameRule] = []
    #: service.name when no rule matches a passive capture (eBPF uses the process name).
    default_service_name: str = UNKNOWN_SERVICE
    #: Captures (no pid): a server's address, or a CIDR network, to its name: host.name, and
    #: service.name when no rule matches (service/resource_detect.py). Other servers' host.name
    #: is their address (a loopback one keeps this machine's).
    hosts: dict[str, str] = {}
    #: eBPF spans' resource from the traced process: environment, command line, owner, cgroup, Kubernetes.
    resource_detection: ResourceDetectionConfig = ResourceDetectionConfig()
    #: Connections tracked at once (LRU beyond).
    max_connections: int = Field(MAX_CONNECTIONS, ge=1)
    #: Idle time before a connection's state is dropped (seconds or "5m").
    idle_timeout: float = IDLE_TIMEOUT_S
    #: Bytes a connection may send before its protocol is recognised.
    max_detect_bytes: int = Field(MAX_DETECT_BYTES, ge=16)
    #: Unconsumed bytes one direction may hold once detected.
    max_message_bytes: int = Field(MAX_MESSAGE_BYTES, ge=1024)
    #: Consecutive parse errors before a connection is abandoned.
    max_consecutive_errors: int = Field(MAX_CONSECUTIVE_ERRORS, ge=1)
    #: UDP flows tracked at once (LRU beyond).
    max_udp_flows: int = Field(MAX_UDP_FLOWS, ge=1)
    #: Idle time before a UDP flow ends and its unanswered requests are counted (seconds or "30s").
    udp_idle_timeout: float = UDP_IDLE_TIMEOUT_S
    #: The budget of requests awaiting answers (per connection and in total).
    pending: PendingConfig = PendingConfig()
    #: Trace assembly (assembly.py): None (the default) assembles what eBPF sees and leaves
    #: captures one span per exchange; true also nests a capture's calls under the one inbound
    #: request open on their host; false turns it off everywhere.
    assemble: bool | None = None
    #: HTTP spans' ``http.route`` (and names ``GET /users/{id}``) from url.path (processors/routes.py).
    routes: RoutesConfig = RoutesConfig()
    #: What rides on HTTP: GenAI, GraphQL, Elasticsearch, JSON-RPC/MCP attributes (enrich/).
    enrich: EnrichConfig = EnrichConfig()

    @field_validator("idle_timeout", "udp_idle_timeout", mode="before")
    @classmethod
    def _duration(cls, v: Any, info: ValidationInfo) -> float:
        d = parse_duration(v)
        if d <= 0:
            raise ValueError(f"{info.field_name} must be > 0")
        return d

    @field_validator("hosts")
    @classmethod
    def _hosts(cls, v: dict[str, str]) -> dict[str, str]:
        HostNames(v)  # raises ValueError on an address or network that is not one
        return v

    @field_validator("enabled")
    @classmethod
    def _known(cls, v: list[str] | None) -> list[str] | None:
        if v is not None:
            unknown = [n for n in v if n not in PROTOCOLS]
            if unknown:
                raise ValueError(f"unknown protocol(s) {unknown}; known: {', '.join(PROTOCOLS)}")
        return v

    @model_validator(mode="after")
    def _protocol_settings(self) -> _BaseConfig:
        """Keep each ``<protocol>:`` block as that module's validated Settings."""
        settings: dict[str, ProtocolSettings] = {}
        for name in PROTOCOLS:
            raw = getattr(self, name, None)
            if isinstance(raw, ProtocolSettings):
                settings[name] = raw
        object.__setattr__(self, "_settings", settings)
        return self

    def protocol_settings(self, name: str) -> ProtocolSettings | None:
        return getattr(self, "_settings", {}).get(name)


def _check_protocol_block(value: Any, info: ValidationInfo) -> Any:
    """Validate a ``<protocol>:`` block with the module's own Settings (errors keep their path)."""
    if value is None:
        return None
    name = info.field_name
    mod = load(name)  # type: ignore[arg-type]
    if mod is None:
        raise ValueError(f"settings given but the {name!r} protocol module is not available")
    try:
        return mod.Settings.model_validate(value)
    except ValidationError as e:
        msgs = "; ".join(f"{'::'.join(str(p) for p in err['loc']) or name}: {err['msg']}" for err in e.errors())
        raise ValueError(msgs) from None


# One optional field per protocol in the table, so a new protocol needs no change here.
Config = create_model(  # type: ignore[call-overload]
    "Config", __base__=_BaseConfig,
    __validators__={"_protocol_blocks": field_validator(*PROTOCOLS, mode="after")(_check_protocol_block)},
    **{name: (dict[str, Any] | ProtocolSettings | None, None) for name in PROTOCOLS},
)
Config.__doc__ = "Options of the ``protocols`` stage (see processors/protocols/README.md)."


def _tls_emit(emit: Any, tls: dict[str, Any]) -> Any:
    """The emit callback of a connection whose payloads are TLS plaintext (a receiver's
    ``TlsConnId``): its spans get the connection's ``tls.*`` attributes, and HTTP's scheme
    (and ``url.full``) is https. ``tls`` is read when each span is emitted: a receiver may
    complete it after the connection started."""

    def e(span: Span) -> None:
        a = span.attributes
        if "url.scheme" in a:
            a["url.scheme"] = "https"
            full = a.get("url.full")
            if isinstance(full, str) and full.startswith("http://"):
                a["url.full"] = "https://" + full[7:]
        for k, v in tls.items():
            a.setdefault(k, v)
        emit(span)

    return e


# Connection modes.
_DETECTING, _PARSING, _IGNORED = 0, 1, 2
_DATA = EventKind.DATA
_DATAGRAM = EventKind.DATAGRAM
_GAP = EventKind.GAP
_CLOSE = EventKind.CLOSE
_RESET = EventKind.RESET
_OPEN = EventKind.OPEN
# The members as module constants: a member looked up on its enum class is a Python-level
# lookup (70 ns, a local 5 ns), several times a connection in detection.
_REQUEST, _RESPONSE, _NEED_MORE, _NO = Detection.REQUEST, Detection.RESPONSE, Detection.NEED_MORE, Detection.NO
_PASSIVE, _CLIENT_VIEW, _SERVER_VIEW = Perspective.PASSIVE, Perspective.CLIENT, Perspective.SERVER


class _State:
    """One tracked connection. Sides are 0 (first sender seen) and 1."""

    __slots__ = (
        "a_addr",
        "a_port",
        "b_addr",
        "b_port",
        "bufs",
        "client_side",
        "candidates",
        "closed",
        "comm",
        "conn",
        "detect_bytes",
        "egress_side",
        "errors",
        "last_ts",
        "mode",
        "module",
        "pid",
        "server_closed",
        "skipped",
        "session",
        "udp",
    )

    def __init__(self, ev: TcpEvent) -> None:
        self.a_addr = ev.src
        self.a_port = ev.sport
        self.b_addr = ev.dst
        self.b_port = ev.dport
        self.bufs = (LargeBuffer(), LargeBuffer())
        self.client_side: int | None = None
        self.conn: Conn | None = None
        self.session: Session | None = None
        self.module: ModuleType | None = None
        self.mode = _DETECTING
        self.last_ts = ev.ts_ns
        self.errors = 0
        self.detect_bytes = 0
        #: Per side, the protocols still in the running for the message at the buffer's
        #: start (a detector's NO is final for it: base.py), in the order to try them.
        self.candidates: list[list[tuple[str, ModuleType, frozenset[int]]] | None] = [None, None]
        #: Sides that sent FIN: bit 1 << side (an int: no list a connection).
        self.closed = 0
        self.server_closed = False
        self.egress_side: int | None = None
        self.pid = ev.pid
        self.comm = ev.comm
        self.skipped = False
        self.udp = False


#: The per-event fast path in C (processors/protocols/_stage.c), or None: ``_one`` is the reference.
_C_STAGE = speedups.load("processors.protocols._stage")
if _C_STAGE is not None:
    _C_STAGE.setup(TcpEvent, _State, Conn, LargeBuffer, PendingBudget, _DATA, _PARSING, _OPEN, _CLOSE)


class ProtocolsProcessor(EventProcessor):
    """Detects protocols per connection, runs their sessions, emits spans in batches."""

    type = "protocols"
    Config = Config

    def __init__(self, id: str, config: Any, next: Any = None) -> None:
        if config is None:
            config = Config()
        elif isinstance(config, dict):
            config = Config.model_validate(config)
        super().__init__(id, config, next)
        self._lock = threading.Lock()
        self._conns: OrderedDict[Any, _State] = OrderedDict()
        #: UDP flows (DATAGRAM events), their own LRU: their idle timeout differs from TCP's.
        self._flows: OrderedDict[Any, _State] = OrderedDict()
        self._modules: list[tuple[str, ModuleType, frozenset[int]]] = []
        names = config.enabled if config.enabled is not None else list(PROTOCOLS)
        for name in names:
            mod = load(name)
            if mod is None:
                continue
            s = config.protocol_settings(name) or mod.Settings()
            ports = frozenset(mod.DEFAULT_PORTS) | frozenset(s.ports)
            self._modules.append((name, mod, ports))
        self._settings = {name: (config.protocol_settings(name) or mod.Settings()) for name, mod, _ in self._modules}
        #: Every protocol's ports, and the detection orders by them (_detect_order).
        self._hint_ports: frozenset[int] = frozenset().union(*(p for _, _, p in self._modules))
        self._orders: dict[tuple[int, int], tuple[tuple[str, ModuleType, frozenset[int]], ...]] = {}
        self._udp_modules = [m for m in self._modules if hasattr(m[1], "detect_datagram")]
        pc = config.pending
        self._budget = PendingBudget(pc.max_entries, pc.max_bytes, pc.max_entries_per_connection,
                                     pc.max_bytes_per_connection)
        asm_on = config.assemble is not False
        self._assembler = TraceAssembler(self.id, passive=config.assemble is True) if asm_on else None
        self._cur_tid: int | None = None
        self._resources: dict[tuple[Any, ...], Resource] = {}
        #: A capture's resources by (server address, port, comm): _resource's rules walk, once.
        self._server_resources: dict[tuple[Any, ...], Resource] = {}
        self._hosts = HostNames(config.hosts)
        self._procs = ProcessMetadata(config.resource_detection)
        self._out: list[Span] = []
        self._counts: dict[tuple[str, str], int] = {}
        self._emitters: dict[str, Any] = {}
        rc = config.routes
        self._routes = Routes(rc) if rc.patterns or rc.unmatched != "unset" else None
        self._logged: set[str] = set()
        self._last_sweep = 0
        self.stats: dict[str, Any] = {"connections": 0, "spans": 0, "events": 0, "drops": {},
                                      "protocols": {}}
        if self._assembler is not None:
            self.stats["traces"] = self._assembler.stats
        en = Enricher(config.enrich, self._enrich_count)
        self._enricher = en if en.active else None
        if self._enricher is not None:
            self.stats["enrich"] = en.counts

    @property
    def protocols(self) -> list[str]:
        """The protocols this stage detects (enabled and available)."""
        return [n for n, _, _ in self._modules]

    # -- counting ------------------------------------------------------------------
    def _drop(self, protocol: str, reason: str, n: int = 1) -> None:
        key = (protocol, reason)
        self._counts[key] = self._counts.get(key, 0) + n
        d = self.stats["drops"]
        k = f"{protocol}:{reason}" if protocol else reason
        d[k] = d.get(k, 0) + n

    def _enrich_count(self, kind: str, result: str) -> None:
        """An enricher's outcome: ``wirespan_parser_messages{protocol=<kind>,result=...}``."""
        if result == "internal_error":  # a bug: also where the summary and the fuzzer look (stats drops)
            self._drop(kind, result)
            return
        key = (kind, result)
        self._counts[key] = self._counts.get(key, 0) + 1

    def _evict_count(self, reason: str) -> None:
        CONNECTIONS_EVICTED.labels(component=self.id, reason=reason).inc()
        d = self.stats["drops"]
        k = f"evicted:{reason}"
        d[k] = d.get(k, 0) + 1

    # -- the component API ------------------------------------------------------------
    def consume_events(self, events: list[TcpEvent]) -> None:
        with self._lock:
            out = self._out = []
            if _C_STAGE is not None and events.__class__ is list:
                self._run_c(events, out)
            else:
                one = self._one
                for ev in events:
                    one(ev, out)
            self.stats["events"] += len(events)
            if events:
                self._sweep(events[-1].ts_ns)
            self._publish(len(events), out)
        if out and self.next is not None:
            self.next.consume_spans(out)

    def _one(self, ev: TcpEvent, out: list[Span], declined: bool = False) -> None:
        """One event. ``declined``: its session's feed_whole already declined the payload (the C
        fast path asked it), so it is buffered without asking again."""
        try:
            # Fast path: data on a connection already being parsed (most events).
            if ev.kind == _DATA:
                cid = ev.conn_id
                conns = self._conns
                st = conns.get(cid)
                if st is not None and st.mode == _PARSING and (ev.egress is None or st.egress_side is not None):
                    conns.move_to_end(cid)
                    ts = ev.ts_ns
                    if ts > st.last_ts:
                        st.last_ts = ts
                    payload = ev.payload
                    if payload is not None and len(payload):
                        side = 0 if (ev.sport == st.a_port and ev.src == st.a_addr) else 1
                        buf = st.bufs[side]
                        conn = st.conn
                        if conn.assembler is not None:  # type: ignore[union-attr]
                            conn.tid = ev.tid  # type: ignore[union-attr]
                            conn.req_from_client = side == st.client_side  # type: ignore[union-attr]
                        if not buf._len and not declined:  # Session.feed_whole: no buffering for a whole message
                            whole = st.session.feed_whole  # type: ignore[union-attr]
                            if whole is not None:
                                before = len(out)
                                try:
                                    took = whole(side == st.client_side, payload, ts)
                                except ProtocolError as e:
                                    self._protocol_error(cid, st, side, ts, e)
                                    return
                                if took:
                                    if st.errors and len(out) > before:
                                        st.errors = 0
                                    extra = st.conn.extra  # type: ignore[union-attr]
                                    if extra and "switch_to" in extra:
                                        self._switch(cid, st, ts)
                                    return
                        buf.append(payload, ts)
                        n = buf._len
                        if n > self.config.max_message_bytes:
                            self._too_large(st, side, ev)
                        elif n >= buf.want:  # the session said how much it needs first
                            # _feed, inline (once an event here): an exception other than
                            # ProtocolError is the outer handler's, as _feed's is its own.
                            from_client = side == st.client_side
                            conn.req_from_client = from_client  # type: ignore[union-attr]
                            before = len(out)
                            try:
                                st.session.feed(from_client, buf, ts)  # type: ignore[union-attr]
                            except ProtocolError as e:
                                self._protocol_error(cid, st, side, ts, e)
                                return
                            if st.errors and len(out) > before:
                                st.errors = 0
                            extra = conn.extra  # type: ignore[union-attr]
                            if extra and "switch_to" in extra:
                                self._switch(cid, st, ts)
                    return
            self._event(ev)
        except Exception:  # a bug: never let it escape; abandon the connection
            self._internal_error(ev.conn_id)
        finally:
            if self._budget.over:
                self._shed()

    def _run_c(self, events: list[TcpEvent], out: list[Span]) -> None:
        """The batch through the C fast path (_stage.c), each event it hands back through ``_event``,
        ``_one`` or the step it names: the same outcome as ``_one`` for every event (tests hold
        them equal)."""
        c = _C_STAGE
        run = c.run  # type: ignore[union-attr]
        done, event, declined, bail, switch = c.DONE, c.EVENT, c.DECLINED, c.BAIL, c.SWITCH  # type: ignore[union-attr]
        conns = self._conns
        move = conns.move_to_end
        budget = self._budget
        where = [0]
        stats, most = self.stats, self.config.max_connections
        i, n = 0, len(events)
        while i < n:
            try:
                r = run(events, i, conns, move, out, budget, where, stats, most)
            except ProtocolError as e:  # from feed_whole: _one's handling of it
                ev = events[where[0]]
                i = where[0] + 1
                try:
                    st = conns[ev.conn_id]
                    side = 0 if (ev.sport == st.a_port and ev.src == st.a_addr) else 1
                    self._protocol_error(ev.conn_id, st, side, ev.ts_ns, e)
                except Exception:
                    self._internal_error(ev.conn_id)
                finally:
                    if budget.over:
                        self._shed()
                continue
            except Exception:
                ev = events[where[0]]
                i = where[0] + 1
                try:
                    self._internal_error(ev.conn_id)
                finally:
                    if budget.over:
                        self._shed()
                continue
            code = r & 7
            if code == done:
                return
            i = r >> 3
            ev = events[i]
            i += 1
            if code == event:  # not one of the C path's: _one would call _event
                try:
                    self._event(ev)
                except Exception:
                    self._internal_error(ev.conn_id)
                finally:
                    if budget.over:
                        self._shed()
            elif code == declined:
                self._one(ev, out, True)
            elif code == bail:
                self._one(ev, out)
            elif code == switch:
                try:
                    self._switch(ev.conn_id, conns[ev.conn_id], ev.ts_ns)
                except Exception:
                    self._internal_error(ev.conn_id)
                finally:
                    if budget.over:
                        self._shed()
            else:  # SHED: the event was taken, the budget is over
                self._shed()

    def flush(self) -> None:
        """Nothing is held between calls except connection state (closed at shutdown)."""

    def shutdown(self) -> None:
        """Close every tracked connection so close-delimited bodies and resets are emitted."""
        self._procs.close()
        with self._lock:
            out = self._out = []
            for table in (self._conns, self._flows):
                for cid in list(table):
                    st = table.get(cid)
                    if st is not None:
                        self._end(cid, st, st.last_ts, reset=False)
            self._publish(0, out)
        if out and self.next is not None:
            self.next.consume_spans(out)

    def _publish(self, n_events: int, out: list[Span]) -> None:
        if n_events:
            PROCESSOR_INCOMING.labels(processor=self.id).inc(n_events)
        if out:
            PROCESSOR_OUTGOING.labels(processor=self.id).inc(len(out))
            self.stats["spans"] += len(out)
        for (proto, result), n in self._counts.items():
            PARSER_MESSAGES.labels(protocol=proto or "none", result=result).inc(n)
        self._counts.clear()

    def _emitter(self, protocol: str) -> Any:
        """The emit callback for one protocol's sessions: collects the span, counts it ok."""
        e = self._emitters.get(protocol)
        if e is None:
            key = (protocol, "ok")
            counts = self._counts

            routes = self._routes if protocol in HTTP_PROTOCOLS else None

            def e(span: Span) -> None:
                if routes is not None:
                    apply_route(routes, span)
                self._out.append(span)
                counts[key] = counts.get(key, 0) + 1

            self._emitters[protocol] = e
        return e

    # -- per event ---------------------------------------------------------------------
    def _event(self, ev: TcpEvent) -> None:
        self._cur_tid = ev.tid
        kind = ev.kind
        if kind == _DATAGRAM:
            self._datagram(ev)
            return
        cid = ev.conn_id
        conns = self._conns
        st = conns.get(cid)
        if st is None:
            if kind == _CLOSE or kind == _RESET or kind == _GAP:
                return  # nothing known about it: nothing to end
            st = conns[cid] = _State(ev)
            self.stats["connections"] += 1
            if len(conns) > self.config.max_connections:
                old_id, old = next(iter(conns.items()))
                self._end(old_id, old, old.last_ts, reset=False)
                self._evict_count("max_connections")
        else:
            conns.move_to_end(cid)
        ts = ev.ts_ns
        if ts > st.last_ts:
            st.last_ts = ts
        side = 0 if (ev.sport == st.a_port and ev.src == st.a_addr) else 1
        cis = ev.client_is_src
        if cis is not None and st.client_side is None:
            st.client_side = side if cis else 1 - side
        egress = ev.egress
        if egress is not None and st.egress_side is None:
            st.egress_side = side if egress else 1 - side
        if kind == _DATA:
            mode = st.mode
            if mode == _PARSING:
                self._data(st, side, ev)
            elif mode == _DETECTING:
                self._detect(cid, st, side, ev)
        elif kind == _CLOSE:
            closed = st.closed = st.closed | (1 << side)
            if st.mode == _PARSING and side != st.client_side and not st.server_closed:
                # The server is done: nothing in flight can still be answered.
                st.server_closed = True
                session = st.session
                if session is not None:  # _guard's rules, inline: once a connection (issue 21)
                    try:
                        session.close(ts, False)
                    except ProtocolError as e:
                        self._drop(st.conn.protocol if st.conn else e.protocol, e.reason)
                    except Exception:
                        self._internal_error(cid)
            if closed == 3:
                self._end(cid, st, ts, reset=False)
        elif kind == _GAP:
            self._gap(cid, st, side, ts, ev.gap)
        elif kind == _RESET:
            self._end(cid, st, ev.ts_ns, reset=True)
        # OPEN needs nothing beyond creating the state and noting the roles.

    def _data(self, st: _State, side: int, ev: TcpEvent) -> None:
        payload = ev.payload
        if payload is None or len(payload) == 0:
            return
        if st.conn is not None:
            st.conn.tid = ev.tid
        buf = st.bufs[side]
        buf.append(payload, ev.ts_ns)
        if len(buf) > self.config.max_message_bytes:
            self._too_large(st, side, ev)
            return
        if len(buf) >= buf.want:
            self._feed(ev.conn_id, st, side, ev.ts_ns)

    def _too_large(self, st: _State, side: int, ev: TcpEvent) -> None:
        """An incomplete message outgrew ``max_message_bytes``: drop it and resync."""
        from_client = side == st.client_side
        if st.conn is not None and st.conn.assembler is not None:
            st.conn.assembler.broken(st.conn)
        self._drop(st.conn.protocol, "message_too_large")  # type: ignore[union-attr]
        st.bufs[side].reset()
        self._guard(ev.conn_id, st, lambda: st.session.gap(from_client, ev.ts_ns))  # type: ignore[union-attr]

    def _feed(self, cid: Any, st: _State, side: int, ts: int) -> None:
        conn = st.conn
        session = st.session
        assert conn is not None and session is not None
        buf = st.bufs[side]
        from_client = side == st.client_side
        conn.req_from_client = from_client
        out = self._out
        before = len(out)
        try:
            session.feed(from_client, buf, ts)
        except ProtocolError as e:
            self._protocol_error(cid, st, side, ts, e)
            return
        except Exception:
            self._internal_error(cid)
            return
        if st.errors and len(out) > before:
            st.errors = 0
        if conn.extra and "switch_to" in conn.extra:
            self._switch(cid, st, ts)

    def _protocol_error(self, cid: Any, st: _State, side: int, ts: int, e: ProtocolError) -> None:
        proto = st.conn.protocol if st.conn is not None else e.protocol
        self._drop(proto, e.reason)
        st.bufs[side].reset()
        st.errors += 1
        if st.errors >= self.config.max_consecutive_errors:
            self._abandon(cid, st, "too_many_errors")
            return
        from_client = side == st.client_side
        self._guard(cid, st, lambda: st.session.gap(from_client, ts))  # type: ignore[union-attr]

    def _guard(self, cid: Any, st: _State, fn: Any) -> None:
        """Run a session callback (gap/close) under the same rules as feed."""
        if st.session is None:
            return
        try:
            fn()
        except ProtocolError as e:
            self._drop(st.conn.protocol if st.conn else e.protocol, e.reason)
        except Exception:
            self._internal_error(cid)

    def _internal_error(self, cid: Any) -> None:
        st = self._conns.get(cid) or self._flows.get(cid)
        proto = st.conn.protocol if st is not None and st.conn is not None else ""
        self._drop(proto, "internal_error")
        key = f"internal:{proto}"
        if key not in self._logged:
            self._logged.add(key)
            log.error("%s: internal error in the %s parser; connection abandoned (logged once)",
                      self.id, proto or "protocols", exc_info=True)
        if st is not None:
            self._abandon(cid, st, "internal_error", count=False)

    def _abandon(self, cid: Any, st: _State, reason: str, count: bool = True) -> None:
        """Stop parsing a connection but remember it, so its later bytes are ignored."""
        if count:
            self._evict_count(reason)
        if st.session is not None and reason != "internal_error":
            # What the session still holds (requests awaiting an answer) is counted by its close,
            # as when the connection ends; a session that raised is not asked again.
            session = st.session
            self._guard(cid, st, lambda: session.close(st.last_ts, True))
            self._count_incomplete(st)
        if st.conn is not None:
            st.conn.release_stores()
        st.mode = _IGNORED
        st.session = None
        st.bufs[0].reset()
        st.bufs[1].reset()

    def _gap(self, cid: Any, st: _State, side: int, ts: int, nbytes: int = 0) -> None:
        if st.conn is not None and st.conn.assembler is not None:
            st.conn.assembler.broken(st.conn)  # request order on this 4-tuple is lost
        if st.mode == _PARSING:
            from_client = side == st.client_side
            session = st.session
            assert session is not None
            if nbytes > 0 and not len(st.bufs[side]):
                # Lost bytes inside something the session can step over (a body of known
                # length): it keeps its place and nothing is resynchronised.
                skipped: list[bool] = []
                self._guard(cid, st, lambda: skipped.append(session.skip_gap(from_client, nbytes, ts)))
                if skipped and skipped[0]:
                    self._drop(st.conn.protocol if st.conn else "", "gap_skipped")
                    return
                if cid not in self._conns:  # the guard abandoned it
                    return
            st.bufs[side].reset()
            self._guard(cid, st, lambda: session.gap(from_client, ts))
        else:
            st.bufs[side].reset()
            st.candidates[side] = None  # a new message start: every protocol may claim it

    def _end(self, cid: Any, st: _State, ts: int, reset: bool) -> None:
        if st.mode == _DETECTING and st.detect_bytes:
            self._drop("", "undetected")  # it sent bytes, none of them understood
        session = st.session
        if st.mode == _PARSING and session is not None:
            if not st.server_closed or reset:
                try:  # _guard's rules, inline: once a connection (issue 21)
                    session.close(ts, reset)
                except ProtocolError as e:
                    self._drop(st.conn.protocol if st.conn else e.protocol, e.reason)
                except Exception:
                    self._internal_error(cid)
            self._count_incomplete(st)
        if st.conn is not None:
            st.conn.release_stores()
        st.session = None
        st.conn = None
        (self._flows if st.udp else self._conns).pop(cid, None)

    def _count_incomplete(self, st: _State) -> None:
        """Bytes still buffered when a session ends are a message that never completed."""
        if st.conn is not None:
            for b in st.bufs:
                if b._len:
                    self._drop(st.conn.protocol, "incomplete_message")

    def _shed(self) -> None:
        """Over the pending budget: drop the oldest requests of the least recently active
        connections first (each counted ``pending_budget`` under its protocol)."""
        stores = (s for table in (self._conns, self._flows) for st in table.values() if st.conn is not None
                  for s in st.conn.stores)
        self._budget.shed(stores)

    def _sweep(self, now: int) -> None:
        """Drop idle connections and end idle UDP flows (at most once a second of event time)."""
        if now - self._last_sweep < 1_000_000_000:
            return
        self._last_sweep = now
        cutoff = now - int(self.config.idle_timeout * 1e9)
        conns = self._conns
        while conns:
            cid, st = next(iter(conns.items()))
            if st.last_ts >= cutoff:
                break
            self._end(cid, st, st.last_ts, reset=False)
            self._evict_count("idle_timeout")
        flows = self._flows
        if flows:
            cutoff = now - int(self.config.udp_idle_timeout * 1e9)
            while flows:
                cid, st = next(iter(flows.items()))
                if st.last_ts >= cutoff:
                    break
                self._end(cid, st, st.last_ts, reset=False)  # a flow's normal end: not an eviction

    # -- UDP -----------------------------------------------------------------------------
    def _datagram(self, ev: TcpEvent) -> None:
        """One UDP datagram: one message of its flow (module docstring)."""
        payload = ev.payload
        if payload is None or not len(payload):
            self._drop("", "udp_empty")
            return
        cid = ev.conn_id
        flows = self._flows
        st = flows.get(cid)
        if st is None:
            if not self._udp_modules:
                self._drop("", "udp_undetected")
                return
            st = flows[cid] = _State(ev)
            st.udp = True
            self.stats["udp_flows"] = self.stats.get("udp_flows", 0) + 1
            if len(flows) > self.config.max_udp_flows:
                old_id, old = next(iter(flows.items()))
                self._end(old_id, old, old.last_ts, reset=False)
                self._evict_count("max_udp_flows")
        else:
            flows.move_to_end(cid)
        ts = ev.ts_ns
        if ts > st.last_ts:
            st.last_ts = ts
        side = 0 if (ev.src == st.a_addr and ev.sport == st.a_port) else 1
        if ev.egress is not None and st.egress_side is None:
            st.egress_side = side if ev.egress else 1 - side
        if st.mode == _PARSING:
            conn = st.conn
            conn.tid = ev.tid  # type: ignore[union-attr]
            from_client = side == st.client_side
            conn.req_from_client = from_client  # type: ignore[union-attr]
            before = len(self._out)
            try:
                st.session.feed_datagram(from_client, payload, ts)  # type: ignore[union-attr]
            except ProtocolError as e:
                self._drop(conn.protocol, e.reason)  # type: ignore[union-attr]
                st.errors += 1
                if st.errors >= self.config.max_consecutive_errors:
                    self._abandon(cid, st, "too_many_errors")
                return
            if st.errors and len(self._out) > before:
                st.errors = 0
            return
        if st.mode == _IGNORED:
            self._drop("", "udp_ignored")
            return
        from_client = None if st.client_side is None else side == st.client_side
        pa, pb = st.a_port, st.b_port
        mods = self._udp_modules
        order = [m for m in mods if pa in m[2] or pb in m[2]] + [m for m in mods if pa not in m[2] and pb not in m[2]]
        for entry in order:
            d = self._ask(entry, payload, from_client, datagram=True)
            if d == _REQUEST or d == _RESPONSE:
                self._start(cid, st, side, entry[0], entry[1], d, ts, datagram=payload)
                return
        self._drop("", "udp_undetected")

    # -- detection -----------------------------------------------------------------------
    def _detect(self, cid: Any, st: _State, side: int, ev: TcpEvent) -> None:
        payload = ev.payload
        if payload is None or len(payload) == 0:
            return
        buf = st.bufs[side]
        buf.append(payload, ev.ts_ns)
        st.detect_bytes += len(payload)
        from_client = None if st.client_side is None else side == st.client_side
        order = st.candidates[side]
        if order is None:  # the shared tuple: only ``still`` below is the connection's own
            pa, pb = st.a_port, st.b_port
            hint = self._hint_ports
            order = self._orders.get((pa if pa in hint else -1, pb if pb in hint else -1))
            if order is None:
                order = self._detect_order(pa, pb)
        still: list[tuple[str, ModuleType, frozenset[int]]] = []
        for entry in order:
            d = self._ask(entry, buf, from_client)
            if d == _REQUEST or d == _RESPONSE:
                self._start(cid, st, side, entry[0], entry[1], d, ev.ts_ns)
                return
            if d == _NEED_MORE:
                still.append(entry)
        if len(payload) >= FRESH_START_MIN and len(buf) > len(payload) and \
                self._fresh_start(cid, st, side, ev, still, from_client):
            return
        # Only the protocols that asked for more are asked again when the next segment comes:
        # a byte a segment then costs the stage one call of each, not one of every protocol.
        st.candidates[side] = still
        if st.detect_bytes >= self.config.max_detect_bytes:
            self._drop("", "undetected")
            self._abandon(cid, st, "undetected", count=False)
        elif not still:
            buf.reset()  # not the start of any message: wait for one at a later segment
            st.candidates[side] = None
            st.skipped = True

    def _ask(self, entry: tuple[str, ModuleType, frozenset[int]], data: Any, from_client: bool | None,
             datagram: bool = False) -> Detection:
        """One protocol's ``detect`` (of a buffer) or ``detect_datagram`` (of one datagram); one
        that raises is counted, logged once, and said NO: a detector's bug never ends the stage."""
        mod = entry[1]
        try:
            return mod.detect_datagram(data, from_client) if datagram else mod.detect(data, from_client)
        except Exception:
            name = entry[0]
            self._drop(name, "internal_error")
            key = f"detect:{name}"
            if key not in self._logged:
                self._logged.add(key)
                what = "detect_datagram" if datagram else "detect"
                log.error("%s: %s.%s raised (logged once)", self.id, name, what, exc_info=True)
            return _NO

    def _fresh_start(self, cid: Any, st: _State, side: int, ev: TcpEvent,
                     still: list[tuple[str, ModuleType, frozenset[int]]], from_client: bool | None) -> bool:
        """A connection joined mid-stream whose first bytes some protocol read as the start
        of a long message (NEED_MORE) while they are the tail of another's: the next segment
        may begin a message, and the protocols not waiting on the buffer as a whole are asked
        about it alone. Without this, a MySQL capture started after the greeting (the
        client's login first, which PostgreSQL and Redis take for a message start) lost the
        whole connection to ``max_detect_bytes``. A protocol the ports name, still waiting,
        keeps the connection (its message may simply span segments) unless the newcomer is
        named by the ports too. Only segments of FRESH_START_MIN bytes or more are tried,
        so a byte a segment costs nothing more."""
        pa, pb = st.a_port, st.b_port
        hinted_waiting = any(pa in p or pb in p for _n, _m, p in still)
        alone: LargeBuffer | None = None
        for entry in self._detect_order(pa, pb):
            ports = entry[2]
            if entry in still or (hinted_waiting and pa not in ports and pb not in ports):
                continue
            if alone is None:
                alone = LargeBuffer()
                alone.append(ev.payload, ev.ts_ns)
            d = self._ask(entry, alone, from_client)
            if d == _REQUEST or d == _RESPONSE:
                buf = st.bufs[side]
                buf.reset()
                buf.append(ev.payload, ev.ts_ns)
                st.detect_bytes = len(ev.payload)
                st.skipped = True  # the bytes before this segment: counted undetected by _start
                self._start(cid, st, side, entry[0], entry[1], d, ev.ts_ns)
                return True
        return False

    def _detect_order(self, port_a: int, port_b: int) -> tuple[tuple[str, ModuleType, frozenset[int]], ...]:
        """The protocols to try, those whose ports the connection uses first. Kept by the ports
        that are some protocol's (most connections' client port is none): two list builds a
        connection were a tenth of a short connection's setup (issue 21)."""
        hint_ports = self._hint_ports
        key = (port_a if port_a in hint_ports else -1, port_b if port_b in hint_ports else -1)
        order = self._orders.get(key)
        if order is None:
            hinted = [m for m in self._modules if port_a in m[2] or port_b in m[2]]
            order = tuple(hinted + [m for m in self._modules if m not in hinted])
            if len(self._orders) >= 4096:
                self._orders.clear()
            self._orders[key] = order
        return order

    def _start(self, cid: Any, st: _State, side: int, name: str, mod: ModuleType, d: Detection, ts: int,
               datagram: Any = None) -> None:
        if st.client_side is None:  # the receiver's knowledge wins when it has it
            st.client_side = side if d == _REQUEST else 1 - side
            ambiguous = getattr(mod, "ambiguous_role", None)
            if ambiguous is not None and ambiguous(st.bufs[side]):
                # A message either side sends (base.py): the ports say who serves, if they can.
                known = next((p for n, _m, p in self._modules if n == name), frozenset())
                server = base.server_side_by_ports(st.a_port, st.b_port, known)
                if server is not None:
                    st.client_side = 1 - server
        cs = st.client_side
        if cs == 0:
            caddr, cport, saddr, sport = st.a_addr, st.a_port, st.b_addr, st.b_port
        else:
            caddr, cport, saddr, sport = st.b_addr, st.b_port, st.a_addr, st.a_port
        perspective = _PASSIVE
        if st.pid is not None and st.egress_side is not None:
            perspective = _CLIENT_VIEW if st.egress_side == cs else _SERVER_VIEW
        asm = self._assembler
        if asm is not None and st.pid is None and not asm.passive:
            asm = None  # a capture: assembled only with assemble: true
        emit = self._emitters.get(name) or self._emitter(name)
        # A plain tuple has no ``tls``: no getattr (and its AttributeError) a connection.
        tls = getattr(cid, "tls", None) if cid.__class__ is not tuple else None
        if tls is not None:  # TLS plaintext (receivers/tls.py TlsConnId)
            emit = _tls_emit(emit, tls)
        # Positional (Conn's order): keywords were a third of the call, once a connection.
        conn = Conn(cid, caddr, cport, saddr, sport, emit, self._drop, perspective,
                    self._resource(saddr, sport, st.pid, st.comm), self._settings.get(name),
                    name, st.pid, st.comm, self._budget, asm, (st.bufs[cs], st.bufs[1 - cs]))
        conn.tid = self._cur_tid
        if name in HTTP_PROTOCOLS:  # fastcgi ignores it
            conn.enrich = self._enricher
        if st.udp:
            conn.transport = "udp"
        st.conn = conn
        st.module = mod
        st.mode = _PARSING
        if st.skipped:  # bytes before the first recognised message were dropped: say so
            self._drop("", "undetected")
            st.skipped = False
        proto = self.stats["protocols"]
        proto[name] = proto.get(name, 0) + 1
        try:
            st.session = mod.Session(conn)
        except Exception:
            self._internal_error(cid)
            return
        if datagram is not None:  # a UDP flow: its first message, in place (nothing was buffered)
            conn.req_from_client = side == cs
            try:
                st.session.feed_datagram(side == cs, datagram, ts)
            except ProtocolError as e:
                self._drop(name, e.reason)
                st.errors += 1
            except Exception:
                self._internal_error(cid)
            return
        other = 1 - side
        bufs = st.bufs
        obuf = bufs[other]
        if obuf._len:
            od = mod.detect(obuf, other == cs)
            if od != _REQUEST and od != _RESPONSE and od != _NEED_MORE:
                obuf.reset()
        buf = bufs[side]
        if not obuf._len and len(buf._chunks) == 1:
            # The detected message came in one segment, as the fast path's do: it may go to
            # feed_whole as it would have with an empty buffer (a short connection's first
            # request is half its messages: issue 21). Declined, it is fed from the buffer.
            whole = st.session.feed_whole
            if whole is not None:
                from_client = side == cs
                conn.req_from_client = from_client
                out = self._out
                before = len(out)
                chunk, chunk_ts = buf._chunks[0], buf._ts[0]
                buf.reset()  # the session sees the buffer as the fast path leaves it: empty
                try:
                    took = whole(from_client, chunk, ts)
                except ProtocolError as e:
                    self._protocol_error(cid, st, side, ts, e)
                    return
                except Exception:
                    self._internal_error(cid)
                    return
                if not took:
                    buf.append(chunk, chunk_ts)
                else:
                    if st.errors and len(out) > before:
                        st.errors = 0
                    if conn.extra and "switch_to" in conn.extra:
                        self._switch(cid, st, ts)
                    return
        # Requests before responses, whichever side was detected first.
        if bufs[cs]._len:
            self._feed(cid, st, cs, ts)
        if bufs[1 - cs]._len and st.session is not None and st.mode == _PARSING:
            self._feed(cid, st, 1 - cs, ts)

    def _switch(self, cid: Any, st: _State, ts: int) -> None:
        """A session handed the connection on (HTTP/1 101 -> h2c, websocket, CONNECT)."""
        conn = st.conn
        assert conn is not None
        to = conn.extra.pop("switch_to")
        old = conn.protocol
        mod = load(to) if to is not None and to in self._settings else None
        if mod is None:
            self._drop(old, "upgraded")
            self._abandon(cid, st, "upgraded", count=False)
            return
        sw = self.stats.setdefault("switched", {})
        sw[f"{old}->{to}"] = sw.get(f"{old}->{to}", 0) + 1
        conn.release_stores()  # the old session's requests were handed over or are done
        conn.protocol = to
        conn.settings = self._settings[to]
        emit = self._emitter(to)
        tls = getattr(cid, "tls", None)
        conn.set_emit(emit if tls is None else _tls_emit(emit, tls))
        try:
            st.session = mod.Session(conn)
        except Exception:
            self._internal_error(cid)
            return
        st.module = mod
        cs = st.client_side
        for s in (cs, 1 - cs):  # type: ignore[operator]
            if len(st.bufs[s]) and st.session is not None and st.mode == _PARSING:
                self._feed(cid, st, s, ts)

    # -- resources -----------------------------------------------------------------------
    def _resource(self, saddr: str, sport: int, pid: int | None, comm: str | None) -> Resource:
        if pid is None:  # a capture's: fixed by the server and the config, kept (issue 21)
            key = (saddr, sport, comm)
            r = self._server_resources.get(key)
            if r is None:
                if len(self._server_resources) >= 4096:
                    self._server_resources.clear()
                r = self._server_resources[key] = self._resource_of(saddr, sport, pid, comm)
            return r
        return self._resource_of(saddr, sport, pid, comm)

    def _resource_of(self, saddr: str, sport: int, pid: int | None, comm: str | None) -> Resource:
        name = None
        for rule in self.config.service_name:
            if rule.matches(saddr, sport, comm):
                name = rule.name
                break
        info = host = None
        if pid is not None:  # eBPF: the process says who it is (resource_detect.ProcessMetadata)
            info = self._procs.get(pid, comm)
            if name is None:  # else the process's name (its main thread's comm: a record's is its thread's)
                name = info.service_name or info.name
        else:  # a capture: the server names the host (not the replaying machine)
            host = self._hosts.name_of(saddr)
            if host is None and not HostNames.is_local(saddr):
                host = saddr
            elif name is None and host is not None:
                name = host
        if name is None:
            name = comm if comm else self.config.default_service_name
        key = (name, pid, comm, info.generation) if info is not None else (name, None, None, host)
        r = self._resources.get(key)
        if r is None:
            extra: dict[str, Any] = {"service.name": name}
            if pid is not None:
                extra["process.pid"] = pid
                if comm:
                    extra["process.executable.name"] = comm
                if info is not None:
                    extra.update(info.attributes)
            elif host is not None:
                extra["host.name"] = host
            if len(self._resources) > 4096:
                self._resources.clear()
            r = self._resources[key] = DEFAULT_RESOURCE.merged(extra)
        return r
