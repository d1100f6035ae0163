"""Core data types that flow through a pipeline, and their one OTLP encoding.

``TcpEvent``: what a receiver hands the protocols stage (one direction of one
TCP connection, in order). ``Span``: what the protocols stage emits. Both use
``__slots__``: millions go through a node per minute.

``spans_to_otlp`` / ``spans_to_otlp_json`` are the only places spans become
OTLP; every exporter goes through them.
"""

from __future__ import annotations

import json
import os
import random
import re
import socket
import struct
from binascii import unhexlify
from collections.abc import Iterable, Mapping, Sequence
from enum import IntEnum
from typing import Any

from service import speedups

__all__ = [
    "AttrValue",
    "EventKind",
    "Resource",
    "Span",
    "SpanEvent",
    "SpanKind",
    "StatusCode",
    "TcpEvent",
    "new_span_id",
    "new_trace_id",
    "parse_traceparent",
    "spans_to_otlp",
    "spans_to_otlp_bytes",
    "spans_to_otlp_dict",
    "spans_to_otlp_json",
    "otlp_json_to_proto",
    "SCOPE_NAME",
    "SCOPE_VERSION",
]

SCOPE_NAME = "wirespan"
SCOPE_VERSION = "0.1.0"

AttrValue = str | bool | int | float | bytes | Sequence[Any]


# ---------------------------------------------------------------------------
# TcpEvent
# ---------------------------------------------------------------------------
class EventKind(IntEnum):
    DATA = 0   #: ``payload`` holds the next bytes of this direction
    GAP = 1    #: ``gap`` bytes of this direction were lost: resync at a message boundary
    CLOSE = 2  #: FIN (or ``close()``): this direction is finished
    RESET = 3  #: RST: the whole connection is gone
    OPEN = 4   #: SYN seen: a new connection incarnation (``client_is_src`` is set)
    #: ``payload`` is one whole UDP datagram from ``src``/``sport`` to ``dst``/``dport``;
    #: ``conn_id`` names the UDP flow (the same for both directions). A message boundary:
    #: nothing is reassembled, and a flow has no OPEN/CLOSE (the stage ends it when idle).
    DATAGRAM = 5


class TcpEvent:
    """One in-order piece of one direction of a TCP connection, or one UDP datagram.

    A UDP datagram is an event of kind ``DATAGRAM`` (its transport is its kind: the TCP
    kinds never carry UDP, so the TCP hot paths test nothing new); everything below
    holds for it too, except that a UDP flow has no roles (``client_is_src`` None).

    ``src``/``sport`` sent the bytes to ``dst``/``dport``. ``conn_id`` is
    hashable and unique per connection incarnation (a reused 4-tuple after a
    new SYN gets a new id; eBPF adds the pid, since each process has its own
    view). ``ts_ns`` is Unix-epoch nanoseconds (receivers convert monotonic
    clocks). ``client_is_src`` is True/False when the receiver knows who
    connected (SYN seen, or eBPF connect/accept), else None and the protocol
    decides. ``egress`` is set only by receivers that observe one process:
    True when that process sent the payload.
    """

    __slots__ = (
        "client_is_src",
        "comm",
        "conn_id",
        "dport",
        "dst",
        "egress",
        "gap",
        "kind",
        "payload",
        "pid",
        "sport",
        "src",
        "tid",
        "ts_ns",
    )

    def __init__(
        self,
        kind: EventKind,
        conn_id: Any,
        src: str,
        sport: int,
        dst: str,
        dport: int,
        ts_ns: int,
        payload: memoryview | bytes | None = None,
        gap: int = 0,
        client_is_src: bool | None = None,
        egress: bool | None = None,
        pid: int | None = None,
        tid: int | None = None,
        comm: str | None = None,
    ) -> None:
        self.kind = kind
        self.conn_id = conn_id
        self.src = src
        self.sport = sport
        self.dst = dst
        self.dport = dport
        self.ts_ns = ts_ns
        self.payload = payload
        self.gap = gap
        self.client_is_src = client_is_src
        self.egress = egress
        self.pid = pid
        self.tid = tid
        self.comm = comm

    def __repr__(self) -> str:
        n = len(self.payload) if self.payload is not None else 0
        return (f"TcpEvent({self.kind.name} {self.src}:{self.sport}->{self.dst}:{self.dport} "
                f"ts={self.ts_ns} len={n} gap={self.gap})")


# ---------------------------------------------------------------------------
# Span
# ---------------------------------------------------------------------------
class SpanKind(IntEnum):
    """OTLP ``Span.SpanKind`` numbers."""

    UNSPECIFIED = 0
    INTERNAL = 1
    SERVER = 2
    CLIENT = 3
    PRODUCER = 4
    CONSUMER = 5


class StatusCode(IntEnum):
    """OTLP ``Status.StatusCode`` numbers."""

    UNSET = 0
    OK = 1
    ERROR = 2


class Resource:
    """Resource attributes, shared by many spans; compared by content for grouping."""

    __slots__ = ("_key", "attributes")

    def __init__(self, attributes: Mapping[str, AttrValue] | None = None) -> None:
        self.attributes: dict[str, AttrValue] = dict(attributes or {})
        self._key: tuple[Any, ...] | None = None

    def key(self) -> tuple[Any, ...]:
        if self._key is None:
            self._key = tuple(sorted((k, _hashable(v)) for k, v in self.attributes.items()))
        return self._key

    def merged(self, extra: Mapping[str, AttrValue]) -> Resource:
        a = dict(self.attributes)
        a.update(extra)
        return Resource(a)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Resource) and self.key() == other.key()

    def __hash__(self) -> int:
        return hash(self.key())

    def __repr__(self) -> str:
        return f"Resource({self.attributes!r})"


def _hashable(v: Any) -> Any:
    return tuple(v) if isinstance(v, list) else v


class SpanEvent:
    __slots__ = ("attributes", "name", "ts_ns")

    def __init__(self, name: str, ts_ns: int, attributes: dict[str, AttrValue] | None = None) -> None:
        self.name = name
        self.ts_ns = ts_ns
        self.attributes = attributes or {}


class Span:
    """A finished span. Ids are raw bytes (16 and 8); ``parent_span_id`` is b"" for a root."""

    __slots__ = (
        "attributes",
        "end_ns",
        "events",
        "flags",
        "kind",
        "name",
        "parent_span_id",
        "resource",
        "span_id",
        "start_ns",
        "status_code",
        "status_message",
        "trace_id",
        "trace_state",
    )

    def __init__(
        self,
        name: str,
        kind: SpanKind | int,
        start_ns: int,
        end_ns: int,
        attributes: dict[str, AttrValue] | None = None,
        resource: Resource | None = None,
        trace_id: bytes | None = None,
        span_id: bytes | None = None,
        parent_span_id: bytes = b"",
        status_code: StatusCode | int = StatusCode.UNSET,
        status_message: str = "",
        events: list[SpanEvent] | None = None,
        trace_state: str = "",
        flags: int = 1,
    ) -> None:
        self.trace_id = trace_id if trace_id is not None else new_trace_id()
        self.span_id = span_id if span_id is not None else new_span_id()
        self.parent_span_id = parent_span_id
        self.name = name
        self.kind = kind
        self.start_ns = start_ns
        self.end_ns = end_ns
        self.status_code = status_code
        self.status_message = status_message
        self.attributes = attributes if attributes is not None else {}
        self.resource = resource if resource is not None else DEFAULT_RESOURCE
        self.events = events
        self.trace_state = trace_state
        self.flags = flags

    @property
    def duration_ns(self) -> int:
        return self.end_ns - self.start_ns

    def __repr__(self) -> str:
        return (f"Span({self.name!r}, kind={SpanKind(self.kind).name}, "
                f"status={StatusCode(self.status_code).name}, attrs={self.attributes!r})")


_rand = random.Random(int.from_bytes(os.urandom(16), "little"))


def reseed_ids() -> None:
    """Call in a forked child so it does not repeat its parent's ids."""
    _rand.seed(int.from_bytes(os.urandom(16), "little"))


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=reseed_ids)


def new_trace_id() -> bytes:
    # Random 128 bits as the OTel SDK does; getrandbits is ~10x faster than urandom.
    v = _rand.getrandbits(128)
    while not v:  # all-zero ids are invalid
        v = _rand.getrandbits(128)
    return v.to_bytes(16, "big")


def new_span_id() -> bytes:
    v = _rand.getrandbits(64)
    while not v:
        v = _rand.getrandbits(64)
    return v.to_bytes(8, "big")


#: W3C Trace Context §3.2: version-traceid-parentid-flags, lowercase hex (uppercase
#: tolerated, as most SDKs do); a later version may append "-..." fields.
_TRACEPARENT = re.compile(
    rb"[ \t]*([0-9a-fA-F]{2})-([0-9a-fA-F]{32})-([0-9a-fA-F]{16})-([0-9a-fA-F]{2})(-[\x21-\x7e]*)?[ \t]*\Z")
_ZERO_TRACE = bytes(16)
_ZERO_SPAN = bytes(8)


def parse_traceparent(value: bytes | bytearray | memoryview | str) -> tuple[bytes, bytes, int] | None:
    """W3C ``traceparent`` -> (trace_id, parent_span_id, flags), or None if invalid.

    Version 00 is exactly 55 characters; later versions may append fields after
    a dash (W3C Trace Context §3.2.4); version ff is invalid.
    """
    if isinstance(value, str):
        value = value.encode("ascii", "replace")
    if len(value) == 55 and value[:3] == b"00-" and value[35:36] == b"-" and value[52:53] == b"-":
        # The usual version-00 form, without the regex: unhexlify checks the digits.
        try:
            trace_id = unhexlify(value[3:35])
            span_id = unhexlify(value[36:52])
            flags = unhexlify(value[53:55])[0]
        except ValueError:  # binascii.Error
            return None
        if trace_id == _ZERO_TRACE or span_id == _ZERO_SPAN:
            return None
        return trace_id, span_id, flags
    if len(value) > 512:
        return None
    m = _TRACEPARENT.match(value)
    if m is None:
        return None
    version, tid, sid, flags, rest = m.groups()
    if version in (b"ff", b"FF", b"fF", b"Ff") or (version == b"00" and rest):
        return None
    trace_id = unhexlify(tid)
    span_id = unhexlify(sid)
    if trace_id == _ZERO_TRACE or span_id == _ZERO_SPAN:
        return None
    return trace_id, span_id, int(flags, 16)


def _default_resource() -> Resource:
    return Resource({
        "service.name": "wirespan-unknown",
        "host.name": socket.gethostname(),
        "telemetry.sdk.name": "wirespan",
        "telemetry.sdk.language": "python",
        "telemetry.sdk.version": SCOPE_VERSION,
    })


DEFAULT_RESOURCE = _default_resource()


# ---------------------------------------------------------------------------
# OTLP: protobuf
# ---------------------------------------------------------------------------
def _pb():  # imported lazily: the protobuf modules cost ~100 ms to import
    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
    from opentelemetry.proto.common.v1 import common_pb2
    from opentelemetry.proto.resource.v1 import resource_pb2
    from opentelemetry.proto.trace.v1 import trace_pb2
    return trace_service_pb2, common_pb2, resource_pb2, trace_pb2


def _any_value(common_pb2: Any, v: Any) -> Any:
    if isinstance(v, str):
        return common_pb2.AnyValue(string_value=v)
    if isinstance(v, bool):
        return common_pb2.AnyValue(bool_value=v)
    if isinstance(v, int):
        if -(1 << 63) <= v < (1 << 63):
            return common_pb2.AnyValue(int_value=v)
        return common_pb2.AnyValue(string_value=str(v))
    if isinstance(v, float):
        return common_pb2.AnyValue(double_value=v)
    if isinstance(v, (bytes, bytearray, memoryview)):
        return common_pb2.AnyValue(bytes_value=bytes(v))
    if isinstance(v, (list, tuple)):
        return common_pb2.AnyValue(array_value=common_pb2.ArrayValue(values=[_any_value(common_pb2, x) for x in v]))
    if isinstance(v, Mapping):
        return common_pb2.AnyValue(kvlist_value=common_pb2.KeyValueList(
            values=[common_pb2.KeyValue(key=str(k), value=_any_value(common_pb2, x)) for k, x in v.items()]))
    return common_pb2.AnyValue(string_value=str(v))


def _kvs(common_pb2: Any, attrs: Mapping[str, Any]) -> list[Any]:
    KV = common_pb2.KeyValue
    return [KV(key=k, value=_any_value(common_pb2, v)) for k, v in attrs.items()]


def _group(spans: Iterable[Span]) -> list[tuple[Resource, list[Span]]]:
    groups: dict[int, tuple[Resource, list[Span]]] = {}
    by_key: dict[tuple[Any, ...], tuple[Resource, list[Span]]] = {}
    for s in spans:
        r = s.resource
        g = groups.get(id(r))
        if g is None:
            g = by_key.get(r.key())
            if g is None:
                g = by_key[r.key()] = (r, [])
            groups[id(r)] = g
        g[1].append(s)
    return list(by_key.values())


def spans_to_otlp(spans: Iterable[Span]) -> Any:
    """Spans -> ``ExportTraceServiceRequest`` (one ResourceSpans per distinct resource)."""
    svc, common_pb2, resource_pb2, trace_pb2 = _pb()
    PbSpan = trace_pb2.Span
    Status = trace_pb2.Status
    Event = PbSpan.Event
    scope = common_pb2.InstrumentationScope(name=SCOPE_NAME, version=SCOPE_VERSION)
    out = []
    for res, group in _group(spans):
        pb_spans = []
        for s in group:
            kw: dict[str, Any] = {}
            if s.events:
                kw["events"] = [Event(time_unix_nano=e.ts_ns, name=e.name, attributes=_kvs(common_pb2, e.attributes))
                                for e in s.events]
            if s.trace_state:
                kw["trace_state"] = s.trace_state
            pb_spans.append(PbSpan(
                trace_id=s.trace_id,
                span_id=s.span_id,
                parent_span_id=s.parent_span_id,
                name=s.name,
                kind=int(s.kind),
                start_time_unix_nano=s.start_ns,
                end_time_unix_nano=s.end_ns,
                attributes=_kvs(common_pb2, s.attributes),
                status=Status(code=int(s.status_code), message=s.status_message),
                flags=s.flags & 0xFF,
                **kw,
            ))
        out.append(trace_pb2.ResourceSpans(
            resource=resource_pb2.Resource(attributes=_kvs(common_pb2, res.attributes)),
            scope_spans=[trace_pb2.ScopeSpans(scope=scope, spans=pb_spans)],
        ))
    return svc.ExportTraceServiceRequest(resource_spans=out)


# ---------------------------------------------------------------------------
# OTLP: protobuf wire bytes, encoded directly
# ---------------------------------------------------------------------------
# Building upb message objects costs ~35 us a span here; writing the wire format
# directly, with the encoded form of repeated (key, string value) attributes
# cached, costs a tenth of that. Field numbers are those of opentelemetry-proto
# (trace.proto, common.proto, trace_service.proto); tests parse the bytes back
# with the official messages.
_FIXED64 = struct.Struct("<Q").pack
_FIXED32 = struct.Struct("<I").pack
_DOUBLE = struct.Struct("<d").pack
_SMALL_VARINTS = [bytes((i,)) for i in range(128)]
#: Bound on the attribute-encoding cache: a per-request id in a value must not grow it forever.
_KV_CACHE_MAX = 65536
_kv_cache: dict[tuple[str, Any], bytes] = {}
#: Only values of these exact types are cache keys (True == 1, but must not share an entry).
_CACHED_TYPES = frozenset((str, int))


def _varint(n: int) -> bytes:
    if n < 128:
        return _SMALL_VARINTS[n]
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _ld(tag: bytes, payload: bytes) -> bytes:
    """A length-delimited field: tag, length, payload."""
    return tag + _varint(len(payload)) + payload


def _str_field(tag: bytes, v: str) -> bytes:
    b = v.encode("utf-8", "surrogatepass")
    return tag + _varint(len(b)) + b


def _any_bytes(v: Any) -> bytes:
    """AnyValue message body."""
    if isinstance(v, str):
        return _str_field(b"\x0a", v)
    if isinstance(v, bool):
        return b"\x10\x01" if v else b"\x10\x00"
    if isinstance(v, int):
        if -(1 << 63) <= v < (1 << 63):
            return b"\x18" + _varint(v & 0xFFFFFFFFFFFFFFFF)
        return _str_field(b"\x0a", str(v))
    if isinstance(v, float):
        return b"\x21" + _DOUBLE(v)
    if isinstance(v, (bytes, bytearray, memoryview)):
        return _ld(b"\x3a", bytes(v))
    if isinstance(v, (list, tuple)):
        return _ld(b"\x2a", b"".join(_ld(b"\x0a", _any_bytes(x)) for x in v))
    if isinstance(v, Mapping):
        return _ld(b"\x32", b"".join(_ld(b"\x0a", _kv_body(str(k), x)) for k, x in v.items()))
    return _str_field(b"\x0a", str(v))


def _kv_body(k: str, v: Any) -> bytes:
    return _str_field(b"\x0a", k) + _ld(b"\x12", _any_bytes(v))


def _kv_fields(tag: bytes, attrs: Mapping[str, Any]) -> list[bytes]:
    return [tag + _varint(len(f)) + f for f in (_kv_body(k, v) for k, v in attrs.items())]


def _attr_field(k: str, v: Any) -> bytes:
    """One span attribute as field 9, cached (bounded) for str and int values.

    The exact-type check keeps ``True`` (a bool) from hitting the entry of ``1``.
    """
    body = _kv_body(k, v)
    f = b"\x4a" + _varint(len(body)) + body
    if type(v) in _CACHED_TYPES:
        if len(_kv_cache) >= _KV_CACHE_MAX:
            _kv_cache.clear()
        _kv_cache[(k, v)] = f
    return f


def _span_attr_fields(attrs: Mapping[str, Any]) -> list[bytes]:
    """Span attributes (field 9); the cache lookup inlined, as the encoder runs per span."""
    get = _kv_cache.get
    return [(get((k, v)) if type(v) in _CACHED_TYPES else None) or _attr_field(k, v) for k, v in attrs.items()]


#: kind (field 6, a one-byte varint), start and end time (fields 7 and 8, fixed64): one pack.
_KIND_TIMES = struct.Struct("<BBBQBQ").pack
_SCOPE_FIELD = _ld(b"\x0a", _str_field(b"\x0a", SCOPE_NAME) + _str_field(b"\x12", SCOPE_VERSION))
_resource_cache: dict[tuple[Any, ...], bytes] = {}


def _span_bytes(s: Span) -> bytes:
    parts = [b"\x0a\x10", s.trace_id, b"\x12\x08", s.span_id]
    if s.trace_state:
        parts.append(_str_field(b"\x1a", s.trace_state))
    if s.parent_span_id:
        parts.append(b"\x22\x08")
        parts.append(s.parent_span_id)
    parts.append(_str_field(b"\x2a", s.name))
    parts.append(_KIND_TIMES(0x30, s.kind & 0x7F, 0x39, s.start_ns, 0x41, s.end_ns))
    if s.attributes:
        parts += _span_attr_fields(s.attributes)
    if s.events:
        for e in s.events:
            body = b"\x09" + _FIXED64(e.ts_ns) + _str_field(b"\x12", e.name) + b"".join(
                _kv_fields(b"\x1a", e.attributes))
            parts.append(_ld(b"\x5a", body))
    code = int(s.status_code)
    if code or s.status_message:
        st = (_str_field(b"\x12", s.status_message) if s.status_message else b"") + (
            b"\x18" + _SMALL_VARINTS[code & 0x7F] if code else b"")
        parts.append(_ld(b"\x7a", st))
    else:
        parts.append(b"\x7a\x00")  # an empty Status, as the message path writes it
    parts.append(b"\x85\x01" + _FIXED32(s.flags & 0xFF))
    return b"".join(parts)


#: The C twin of the loop below (service/_otlp.c): ~8x faster, and it calls _span_bytes for
#: any span it does not handle itself (events, non-scalar values), so the bytes are the same.
_c_otlp = speedups.load("service._otlp")
_c_span_fields = _c_otlp.span_fields if _c_otlp is not None else None


def spans_to_otlp_bytes(spans: Iterable[Span]) -> bytes:
    """Spans -> serialized ``ExportTraceServiceRequest``: what the exporters send."""
    out = []
    for res, group in _group(spans):
        rkey = res.key()
        rfield = _resource_cache.get(rkey)
        if rfield is None:
            if len(_resource_cache) > 1024:
                _resource_cache.clear()
            rfield = _resource_cache[rkey] = _ld(b"\x0a", b"".join(_kv_fields(b"\x0a", res.attributes)))
        if _c_span_fields is not None:  # the whole ResourceSpans field, in one buffer
            out.append(_c_span_fields(group, _span_bytes, rfield, _SCOPE_FIELD))
            continue
        span_fields = []
        for s in group:
            b = _span_bytes(s)
            span_fields.append(b"\x12" + _varint(len(b)) + b)
        fields = b"".join(span_fields)
        ss = _ld(b"\x12", _SCOPE_FIELD + fields)
        out.append(_ld(b"\x0a", rfield + ss))
    return out[0] if len(out) == 1 else b"".join(out)


# ---------------------------------------------------------------------------
# OTLP: JSON (OTLP/JSON rules: hex ids, integer enums, 64-bit ints as strings)
# ---------------------------------------------------------------------------
def _json_value(v: Any) -> dict[str, Any]:
    if isinstance(v, str):
        return {"stringValue": v}
    if isinstance(v, bool):
        return {"boolValue": v}
    if isinstance(v, int):
        if -(1 << 63) <= v < (1 << 63):
            return {"intValue": str(v)}
        return {"stringValue": str(v)}
    if isinstance(v, float):
        return {"doubleValue": v}
    if isinstance(v, (bytes, bytearray, memoryview)):
        import base64
        return {"bytesValue": base64.b64encode(bytes(v)).decode()}
    if isinstance(v, (list, tuple)):
        return {"arrayValue": {"values": [_json_value(x) for x in v]}}
    if isinstance(v, Mapping):
        return {"kvlistValue": {"values": [{"key": str(k), "value": _json_value(x)} for k, x in v.items()]}}
    return {"stringValue": str(v)}


def _json_kvs(attrs: Mapping[str, Any]) -> list[dict[str, Any]]:
    return [{"key": k, "value": _json_value(v)} for k, v in attrs.items()]


def spans_to_otlp_dict(spans: Iterable[Span]) -> dict[str, Any]:
    """Spans -> the OTLP/JSON object of one ``ExportTraceServiceRequest``."""
    scope = {"name": SCOPE_NAME, "version": SCOPE_VERSION}
    rs = []
    for res, group in _group(spans):
        js = []
        for s in group:
            d: dict[str, Any] = {
                "traceId": s.trace_id.hex(),
                "spanId": s.span_id.hex(),
                "name": s.name,
                "kind": int(s.kind),
                "startTimeUnixNano": str(s.start_ns),
                "endTimeUnixNano": str(s.end_ns),
                "attributes": _json_kvs(s.attributes),
                "status": {"code": int(s.status_code)} if not s.status_message
                else {"code": int(s.status_code), "message": s.status_message},
                "flags": s.flags & 0xFF,
            }
            if s.parent_span_id:
                d["parentSpanId"] = s.parent_span_id.hex()
            if s.trace_state:
                d["traceState"] = s.trace_state
            if s.events:
                d["events"] = [{"timeUnixNano": str(e.ts_ns), "name": e.name, "attributes": _json_kvs(e.attributes)}
                               for e in s.events]
            js.append(d)
        rs.append({"resource": {"attributes": _json_kvs(res.attributes)},
                   "scopeSpans": [{"scope": scope, "spans": js}]})
    return {"resourceSpans": rs}


_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
_quote = json.encoder.encode_basestring  # a str as a JSON string: what _dumps does for str, minus its dispatch
_json_kv_cache: dict[tuple[str, Any], str] = {}


def _json_kv(k: str, v: Any) -> str:
    """One attribute as OTLP/JSON text; str and int values cached like the protobuf fields."""
    t = type(v)
    if t is str or t is int:
        f = _json_kv_cache.get((k, v))
        if f is None:
            if len(_json_kv_cache) >= _KV_CACHE_MAX:
                _json_kv_cache.clear()
            f = _json_kv_cache[(k, v)] = _dumps({"key": k, "value": _json_value(v)})
        return f
    return _dumps({"key": k, "value": _json_value(v)})


_JSON_STATUS = {int(c): f'{{"code":{int(c)}}}' for c in StatusCode}


def _json_span(s: Span) -> str:
    # _json_kv's cache inlined (most attributes repeat: method, port, scheme, status ...);
    # only str and int values are keys, so True never finds the entry of 1.
    get = _json_kv_cache.get
    attrs = ",".join([(get((k, v)) if type(v) in _CACHED_TYPES else None) or _json_kv(k, v)
                      for k, v in s.attributes.items()])
    status = f'{{"code":{int(s.status_code)},"message":{_dumps(s.status_message)}}}' if s.status_message \
        else _JSON_STATUS.get(s.status_code) or f'{{"code":{int(s.status_code)}}}'
    extra = ""
    if s.parent_span_id:
        extra += f',"parentSpanId":"{s.parent_span_id.hex()}"'
    if s.trace_state:
        extra += f',"traceState":{_dumps(s.trace_state)}'
    if s.events:
        extra += ',"events":' + _dumps([
            {"timeUnixNano": str(e.ts_ns), "name": e.name, "attributes": _json_kvs(e.attributes)} for e in s.events])
    return (f'{{"traceId":"{s.trace_id.hex()}","spanId":"{s.span_id.hex()}","name":{_quote(s.name)},'
            f'"kind":{s.kind:d},"startTimeUnixNano":"{s.start_ns}","endTimeUnixNano":"{s.end_ns}",'
            f'"attributes":[{attrs}],"status":{status},"flags":{s.flags & 0xFF}{extra}}}')


#: The C twin of the join below (service/_otlp.c json_spans): the same text, ~10x faster; it
#: calls _json_span for any span it does not write itself, and returns None (do it all here)
#: when that text cannot be UTF-8.
_c_json_spans = _c_otlp.json_spans if _c_otlp is not None else None


def spans_to_otlp_json(spans: Iterable[Span]) -> str:
    """One line of the Collector file exporter's format (no newline); same content as ``spans_to_otlp_dict``.

    Each resource's part is written whole, head and tail around its spans, by the C writer: a
    line of one resource (a capture's usual batch) is then never copied again, and one of several
    once (a batch's text is megabytes: three joins of it were a fifth of the encoding)."""
    scope = f'{{"name":"{SCOPE_NAME}","version":"{SCOPE_VERSION}"}}'
    cj = _c_json_spans
    groups = list(_group(spans))
    if not groups:
        return '{"resourceSpans":[]}'
    last = len(groups) - 1
    parts = []
    for i, (res, group) in enumerate(groups):
        rattrs = ",".join(_dumps(kv) for kv in _json_kvs(res.attributes))
        head = ('{"resourceSpans":[' if i == 0 else ",") + \
            f'{{"resource":{{"attributes":[{rattrs}]}},"scopeSpans":[{{"scope":{scope},"spans":['
        tail = "]}]}]}" if i == last else "]}]}"
        part = cj(group, _json_span, head, tail) if cj is not None else None
        if part is None:
            part = head + ",".join([_json_span(s) for s in group]) + tail
        parts.append(part)
    return parts[0] if len(parts) == 1 else "".join(parts)


def otlp_json_to_proto(text: str | bytes) -> Any:
    """Parse OTLP/JSON back to ``ExportTraceServiceRequest``.

    OTLP/JSON differs from the plain protobuf JSON mapping only in hex (not
    base64) trace/span ids; they are converted, the rest goes through
    ``google.protobuf.json_format``.
    """
    import base64

    from google.protobuf import json_format
    svc = _pb()[0]
    d = json.loads(text)
    for r in d.get("resourceSpans", []):
        for ss in r.get("scopeSpans", []):
            for s in ss.get("spans", []):
                for k in ("traceId", "spanId", "parentSpanId"):
                    if s.get(k):
                        s[k] = base64.b64encode(bytes.fromhex(s[k])).decode()
                for link in s.get("links", []):
                    for k in ("traceId", "spanId"):
                        if link.get(k):
                            link[k] = base64.b64encode(bytes.fromhex(link[k])).decode()
    return json_format.ParseDict(d, svc.ExportTraceServiceRequest())


def span_summary(s: Span) -> str:
    """A one-line human form, for logs and the debug exporter."""
    dur_ms = (s.end_ns - s.start_ns) / 1e6
    st = StatusCode(s.status_code).name
    return f"{SpanKind(s.kind).name:<8} {s.name} {dur_ms:.3f}ms {st}"


