"""MQTT 3.1, 3.1.1 and 5.0: spans for PUBLISH, SUBSCRIBE and UNSUBSCRIBE.

Contract: processors/protocols/base.py. Packets are read where they lie: the
fixed header and the variable header a span needs (topic, packet id, MQTT 5
properties) are decoded from the ``LargeBuffer``; a PUBLISH payload is never
read, only stepped over as it arrives and released, so a 200 MB retained
message costs no memory.

Pairing is by packet id in the id space of the side that started the exchange
(client->broker publishes and broker->client deliveries use separate ids):
QoS 0 publishes end at once, QoS 1 at PUBACK, QoS 2 at PUBCOMP; SUBSCRIBE at
SUBACK, UNSUBSCRIBE at UNSUBACK. CONNECT gives the client id (username and
password are never read); a refused CONNACK makes an ERROR ``connect`` span
even though CONNECT, PING and DISCONNECT make none by default.

A segment of whole packets (the usual short connection: one packet a segment) is read in
place by ``feed_whole`` without the buffer; the buffered ``feed`` is the reference it
answers as, and takes everything it declines.
"""

from __future__ import annotations

import re
import struct
from typing import Any, ClassVar

from processors.protocols.base import Conn, Detection, PendingMap, ProtocolSettings, Session
from processors.protocols.errors import LimitExceeded, Malformed
from service.largebuf import BufferBoundsError, LargeBuffer
from service.model import SpanKind, StatusCode

NAME = "mqtt"
DEFAULT_PORTS = frozenset({1883, 8883})

CONNECT, CONNACK, PUBLISH, PUBACK, PUBREC, PUBREL, PUBCOMP = 1, 2, 3, 4, 5, 6, 7
SUBSCRIBE, SUBACK, UNSUBSCRIBE, UNSUBACK, PINGREQ, PINGRESP, DISCONNECT, AUTH = range(8, 16)
_NAMES = {1: "connect", 3: "publish", 8: "subscribe", 10: "unsubscribe"}

#: The largest remaining length MQTT can encode (4 varint bytes): 268,435,455.
MAX_REMAINING = 268_435_455
#: A non-PUBLISH packet, or a PUBLISH's variable header, larger than this is refused
#: (subscriptions and properties are small; mosquitto's default max packet is larger
#: only to admit big payloads, which we skip).
MAX_HEADER = 1024 * 1024
#: Exchanges awaiting their acknowledgement, per connection.
MAX_PENDING = 65_535
#: Fixed-header flags each packet type must carry (MQTT 3.1.1 §2.2.2, 5.0 §2.1.3).
_REQUIRED_FLAGS = {PUBREL: 2, SUBSCRIBE: 2, UNSUBSCRIBE: 2}
#: Smallest remaining length of each non-PUBLISH packet (a shorter one is malformed,
#: and would otherwise make the reads run into the next packet).
_MIN_LENGTH = {CONNECT: 10, CONNACK: 2, PUBACK: 2, PUBREC: 2, PUBREL: 2, PUBCOMP: 2, SUBSCRIBE: 5,
               SUBACK: 3, UNSUBSCRIBE: 4, UNSUBACK: 2, PINGREQ: 0, PINGRESP: 0, DISCONNECT: 0, AUTH: 0}

# MQTT 5 property identifiers -> value kind: 1/2/4 fixed bytes, "v" varint, "s" string,
# "b" binary, "p" string pair (user property).
_PROPS: dict[int, Any] = {
    0x01: 1, 0x02: 4, 0x03: "s", 0x08: "s", 0x09: "b", 0x0B: "v", 0x11: 4, 0x12: "s", 0x13: 2,
    0x15: "s", 0x16: "b", 0x17: 1, 0x18: 4, 0x19: 1, 0x1A: "s", 0x1C: "s", 0x1F: "s", 0x21: 2,
    0x22: 2, 0x23: 2, 0x24: 1, 0x25: 1, 0x26: "p", 0x27: 4, 0x28: 1, 0x29: 1, 0x2A: 1,
}
_U16 = struct.Struct(">H")
_NO_PROPS: dict[str, Any] = {}  # read only


class Settings(ProtocolSettings):
    #: Also make spans for CONNECT (and PING/DISCONNECT are still none).
    trace_connect: bool = False


# ---------------------------------------------------------------------------
# reading helpers (absolute offsets in a LargeBuffer)
# ---------------------------------------------------------------------------
def _varint(buf: LargeBuffer, off: int, end: int) -> tuple[int, int] | None:
    """MQTT variable byte integer at ``off`` -> (value, next offset); None if incomplete."""
    v = 0
    for i in range(4):
        if off + i >= end:
            return None
        b = buf.u8_at(off + i)
        v |= (b & 0x7F) << (7 * i)
        if b < 0x80:
            return v, off + i + 1
    raise Malformed(NAME, "bad_varint", off)


def _string(buf: LargeBuffer, off: int, end: int, keep: int = 1024) -> tuple[str, int]:
    if off + 2 > end:
        raise Malformed(NAME, "truncated", off)
    n = buf.u16be_at(off)
    if off + 2 + n > end:
        raise Malformed(NAME, "truncated", off, "string overruns the packet")
    s = buf.bytes_at(off + 2, min(n, keep)).decode("utf-8", "replace")  # small field, kept
    return s, off + 2 + n


def _properties(buf: LargeBuffer, off: int, end: int, want_user: bool) -> tuple[dict[str, Any], int]:
    """MQTT 5 properties at ``off``: (the ones a span uses, next offset)."""
    got = _varint(buf, off, end)
    if got is None:
        raise Malformed(NAME, "truncated", off)
    plen, p = got
    pend = p + plen
    if pend > end:
        raise Malformed(NAME, "truncated", off, "properties overrun the packet")
    out: dict[str, Any] = {}
    while p < pend:
        pid = buf.u8_at(p)
        kind = _PROPS.get(pid)
        p += 1
        if kind is None:
            raise Malformed(NAME, "bad_property", p - 1, f"id {pid:#x}")
        if kind == 1:
            p += 1
        elif kind == 2:
            if pid == 0x23:
                out["topic_alias"] = buf.u16be_at(p)
            p += 2
        elif kind == 4:
            p += 4
        elif kind == "v":
            got = _varint(buf, p, pend)
            if got is None:
                raise Malformed(NAME, "truncated", p)
            p = got[1]
        elif kind in ("s", "b"):
            if pid == 0x1F:
                out["reason"], p = _string(buf, p, pend, 256)
            elif pid == 0x03:
                out["content_type"], p = _string(buf, p, pend, 256)
            else:
                if p + 2 > pend:
                    raise Malformed(NAME, "truncated", p)
                p += 2 + buf.u16be_at(p)
        else:  # user property: name, value
            if want_user:
                k, p = _string(buf, p, pend, 64)
                v, p = _string(buf, p, pend, 256)
                if k.lower() in ("traceparent", "tracestate") and k.lower() not in out:
                    out[k.lower()] = v
            else:
                for _ in range(2):
                    if p + 2 > pend:
                        raise Malformed(NAME, "truncated", p)
                    p += 2 + buf.u16be_at(p)
        if p > pend:
            raise Malformed(NAME, "bad_property", p, "property overruns the list")
    return out, pend


# ---------------------------------------------------------------------------
# detection
# ---------------------------------------------------------------------------
def detect(buf: LargeBuffer, from_client: bool | None) -> Detection:
    n = len(buf)
    if n < 2:
        return Detection.NEED_MORE
    c = buf.chunk_at(0)[0]
    if len(c) >= 10 and c[0] == 0x10 and c[1] < 0x80 and c[8] in (4, 5) and c[2:8] == b"\x00\x04MQTT" \
            and from_client is not False:
        return Detection.REQUEST  # the usual CONNECT (3.1.1 or 5.0) in one chunk: the checks below, in place
    b0 = buf.u8_at(0)
    t = b0 >> 4
    try:
        got = _varint(buf, 1, min(n, 5))
    except Malformed:
        return Detection.NO
    if got is None:
        return Detection.NEED_MORE if n < 5 else Detection.NO
    rl, p = got
    if t == CONNECT and b0 == 0x10 and from_client is not False:
        if n < p + 8:
            return Detection.NEED_MORE
        plen = buf.u16be_at(p)
        if plen == 4 and buf.view_at(p + 2, 4) == b"MQTT" and buf.u8_at(p + 6) in (4, 5):
            return Detection.REQUEST
        if plen == 6 and n >= p + 9 and buf.view_at(p + 2, 6) == b"MQIsdp" and buf.u8_at(p + 8) == 3:
            return Detection.REQUEST
        return Detection.NO
    if b0 == 0x20 and from_client is not True and rl >= 2:
        if n < p + 2:
            return Detection.NEED_MORE
        return Detection.RESPONSE if buf.u8_at(p) in (0, 1) else Detection.NO
    if b0 == 0xC0 and rl == 0 and from_client is not False:
        return Detection.REQUEST  # PINGREQ: a connection picked up between publishes
    if t == PUBLISH and (b0 & 0x06) != 0x06 and 3 <= rl <= MAX_REMAINING:
        # Mid-stream PUBLISH: the topic must be a printable UTF-8 name without wildcards.
        if n < p + 2:
            return Detection.NEED_MORE
        tlen = buf.u16be_at(p)
        if not 1 <= tlen <= min(rl - 2, 1024):
            return Detection.NO
        if n < p + 2 + tlen:
            return Detection.NEED_MORE
        topic = buf.bytes_at(p + 2, tlen)  # <= 1 KiB
        if not _topic_ok(topic, False):  # control characters, wildcards, invalid UTF-8
            return Detection.NO
        return Detection.REQUEST if from_client is not False else Detection.RESPONSE
    if b0 in (0x82, 0xA2) and from_client is not False and 5 <= rl <= 4096:
        # Mid-stream (UN)SUBSCRIBE (3.1.1 layout): a packet id, then well-formed filters that
        # end exactly with the packet, alone in the buffer (the client waits for the ack).
        if n < p + rl:
            return Detection.NEED_MORE
        if n != p + rl or buf.u16be_at(p) == 0:
            return Detection.NO
        return Detection.REQUEST if _filters_ok(buf, p + 2, p + rl, b0 == 0x82) else Detection.NO
    if b0 == 0x90 and from_client is not True and 3 <= rl <= 2 + 64:
        if n < p + rl:
            return Detection.NEED_MORE
        if n != p + rl or buf.u16be_at(p) == 0:
            return Detection.NO
        ok = all(buf.u8_at(i) in (0, 1, 2, 0x80) for i in range(p + 2, p + rl))
        return Detection.RESPONSE if ok else Detection.NO
    return Detection.NO


def ambiguous_role(buf: LargeBuffer) -> bool:
    """A PUBLISH goes either way (client to broker, broker to subscriber): the stage takes
    the roles of a connection joined on one from its ports (base.py)."""
    return len(buf) > 0 and buf.u8_at(0) >> 4 == PUBLISH


def _filters_ok(buf: LargeBuffer, off: int, end: int, subscribe: bool) -> bool:
    """Topic filters from ``off`` to exactly ``end``: each a non-empty printable UTF-8
    string (and for SUBSCRIBE its options byte, QoS 0-2, reserved bits clear)."""
    count = 0
    while off < end and count < 64:
        if off + 2 > end:
            return False
        tlen = buf.u16be_at(off)
        if tlen == 0 or off + 2 + tlen + (1 if subscribe else 0) > end:
            return False
        if not _topic_ok(buf.bytes_at(off + 2, min(tlen, 1024)), True):
            return False
        off += 2 + tlen
        if subscribe:
            if buf.u8_at(off) & 0xC0 or buf.u8_at(off) & 0x03 == 3:
                return False
            off += 1
        count += 1
    return off == end and count > 0


_BAD_NAME = re.compile(rb"[\x00-\x1f\x7f+#]")   # control characters and wildcards
_BAD_FILTER = re.compile(rb"[\x00-\x1f\x7f]")


def _topic_ok(raw: bytes, wildcards: bool) -> bool:
    """A topic name (or, with ``wildcards``, a filter): well-formed UTF-8 without U+0000 or
    control characters (MQTT 3.1.1 §1.5.3, 5.0 §1.5.4); a topic name has no wildcards
    (3.1.1 §4.7.1, 5.0 §4.7.1). Two C-level scans: a regex and the UTF-8 decoder."""
    if (_BAD_FILTER if wildcards else _BAD_NAME).search(raw) is not None:
        return False
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


# ---------------------------------------------------------------------------
# session
# ---------------------------------------------------------------------------
def _exchange_traceparent(ex: _Exchange) -> Any:
    return ex.traceparent


class _Exchange:
    __slots__ = ("attrs", "kind", "name", "op", "start_ts", "traceparent", "expect")

    def __init__(self, op: str, name: str, kind: SpanKind, start_ts: int, attrs: dict[str, Any],
                 traceparent: str | None, expect: int) -> None:
        self.op = op
        self.name = name
        self.kind = kind
        self.start_ts = start_ts
        self.attrs = attrs
        self.traceparent = traceparent
        self.expect = expect  # the packet type that completes it


class _Dir:
    __slots__ = ("aliases", "skip")

    def __init__(self) -> None:
        self.skip = 0  # payload bytes still to step over
        self.aliases: dict[int, str] = {}  # MQTT 5 topic aliases set by this direction's sender


def _vbi_rest(data: memoryview, p: int, end: int, first: int) -> tuple[int, int] | None:
    """A variable byte integer whose first byte (``first``, >= 0x80) was read in place, its
    rest from ``p``: (value, next offset), or None when cut by ``end`` or longer than four
    bytes (the buffered path's _varint then decides: it waits or raises)."""
    v = first & 0x7F
    shift = 7
    while True:
        if p >= end or shift > 21:
            return None
        b = data[p]
        p += 1
        v |= (b & 0x7F) << shift
        shift += 7
        if b < 0x80:
            return v, p


def _props_at(data: memoryview, p: int, end: int) -> tuple[dict[str, Any], int] | None:
    """``_props_in`` without user properties, an empty list (one zero byte: most packets') read
    without its work."""
    if p < end and not data[p]:
        return _NO_PROPS, p + 1
    return _props_in(data, p, end, False)


def _props_in(data: memoryview, p: int, end: int, want_user: bool) -> tuple[dict[str, Any], int] | None:
    """MQTT 5 properties at ``p`` for feed_whole: ``_properties``' reading of them in place
    (the same keys, the same strings cut and decoded alike), or None wherever ``_properties``
    would raise, so the buffered path meets that list and raises it itself.

    Why a twin: half of a real MQTT 5 session's packets carry properties (a traceparent user
    property, a topic alias, a subscription identifier, CONNECT's and CONNACK's limits), and
    leaving those to the buffer cost a fifth of the stage (issue 21)."""
    if p >= end:
        return None
    plen = data[p]
    p += 1
    if plen >= 0x80:
        got = _vbi_rest(data, p, end, plen)
        if got is None:
            return None
        plen, p = got
    pend = p + plen
    if pend > end:
        return None
    out: dict[str, Any] = {}
    props = _PROPS
    while p < pend:
        pid = data[p]
        kind = props.get(pid)
        p += 1
        if kind == 1:
            p += 1
        elif kind == "p":  # user property: name, value
            if p + 2 > pend:
                return None
            n = data[p] << 8 | data[p + 1]
            k = p + 2
            p = k + n
            if p + 2 > pend:
                return None
            v = p + 2
            p = v + (data[p] << 8 | data[p + 1])
            if p > pend:
                return None
            # Only a 10- or 11-byte name can lower() to tracestate or traceparent: any other
            # character that lowers to ASCII (the Kelvin sign's k, U+0130's i plus a dot) is
            # not in them, and a name over 64 bytes is cut first.
            if want_user and (n == 11 or n == 10):
                name = str(data[k:k + n], "utf-8", "replace").lower()
                if (name == "traceparent" or name == "tracestate") and name not in out:
                    out[name] = str(data[v:v + min(p - v, 256)], "utf-8", "replace")
        elif kind == 2:
            if pid == 0x23:
                if p + 2 > pend:
                    return None
                out["topic_alias"] = data[p] << 8 | data[p + 1]
            p += 2
        elif kind == 4:
            p += 4
        elif kind == "v":
            for _ in range(4):
                if p >= pend:
                    return None
                b = data[p]
                p += 1
                if b < 0x80:
                    break
            else:
                return None
        elif kind is None:
            return None
        else:  # a string or binary
            if p + 2 > pend:
                return None
            n = data[p] << 8 | data[p + 1]
            k = p + 2
            p = k + n
            if p > pend:
                return None
            if pid == 0x1F:
                out["reason"] = str(data[k:k + min(n, 256)], "utf-8", "replace")
            elif pid == 0x03:
                out["content_type"] = str(data[k:k + min(n, 256)], "utf-8", "replace")
        if p > pend:
            return None
    return out, pend


class Session(Session):  # type: ignore[no-redef]
    protocol: ClassVar[str] = NAME

    def __init__(self, conn: Conn) -> None:
        super().__init__(conn)
        self.settings: Settings = conn.settings if isinstance(conn.settings, Settings) else Settings()
        self.version = 4  # until CONNECT says otherwise (3.1.1 is the common default)
        self.client_id: str | None = None
        self.dirs = (_Dir(), _Dir())  # from server, from client
        # (initiator is client, packet id) -> the exchange awaiting its acknowledgement
        self.pending: dict[tuple[bool, int], _Exchange] = PendingMap(conn, traceparent=_exchange_traceparent)
        self.connect: _Exchange | None = None
        self._need = 0  # _publish's bytes wanted from the buffer's front (feed turns it into buf.want)

    def feed(self, from_client: bool, buf: LargeBuffer, ts_ns: int) -> None:
        # Packets are walked with a cursor and released once at the end (a release per
        # packet re-sliced the chunk list); the fixed header's common one-byte length is
        # read from the chunk's view. Error offsets count from the front of the buffer.
        d = self.dirs[from_client]
        off = 0
        want = 0
        n = len(buf)
        try:
            while True:
                if d.skip:
                    take = min(d.skip, n - off)
                    off += take
                    d.skip -= take
                    if d.skip:
                        return
                if n - off < 2:
                    return
                c, cs = buf.chunk_at(off)
                rel = off - cs
                if rel + 2 <= len(c) and c[rel + 1] < 0x80:
                    b0 = c[rel]
                    rl = c[rel + 1]
                    p = off + 2
                else:
                    b0 = buf.u8_at(off)
                    got = _varint(buf, off + 1, min(n, off + 5))
                    if got is None:
                        return
                    rl, p = got
                t = b0 >> 4
                if t == 0 or (t in _REQUIRED_FLAGS and b0 & 0x0F != _REQUIRED_FLAGS[t]):
                    raise Malformed(NAME, "bad_fixed_header", off, f"{b0:#x}")
                end = p + rl
                if t == PUBLISH:
                    r = self._publish(from_client, buf, b0, off, p, end, ts_ns, d)
                    if r > 0:
                        off = r  # the payload (d.skip) is stepped over next
                        continue
                    if r == 0:
                        if self._need:
                            want = self._need - off
                            self._need = 0
                        return
                    off = -r  # a bad topic: its header is dropped, its payload skipped
                    raise Malformed(NAME, "bad_topic", p)
                if rl > MAX_HEADER:
                    raise LimitExceeded(NAME, "packet_too_large", off)
                if rl < _MIN_LENGTH[t]:
                    raise Malformed(NAME, "packet_too_short", off, f"type {t} length {rl}")
                if n < end:
                    want = end - off
                    return
                try:
                    self._control(from_client, t, buf, p, end, buf.ts_at(off), ts_ns)
                except BufferBoundsError:
                    raise Malformed(NAME, "truncated", off, "a field overruns the packet") from None
                off = end
        finally:
            buf.consumed(off, want)

    def feed_whole(self, from_client: bool, data: memoryview, ts_ns: int) -> bool:
        """A segment of whole packets (base.py's contract), read in place without a buffer.

        Why: a short connection's packets come one a segment (CONNECT, PUBLISH, the acks),
        and the buffer's append, chunk lookups and release cost more than reading them.
        First every packet is framed and read into a plan, checking all ``feed`` would
        check (MQTT 5 properties through ``_props_in``, ``_properties``' twin); anything it
        would refuse, wait on, or read with more care (a payload going on past the segment)
        returns False with nothing changed, and the buffered path has it. Then the plan is
        done in order, through the helpers ``feed`` ends in (a topic alias set or used there,
        as ``_publish`` does it)."""
        if self.dirs[from_client].skip:
            return False
        n = len(data)
        if n >= 4:
            # One PUBACK/PUBREC/PUBREL/PUBCOMP alone (two in five of a session's segments): the
            # loop's checks for it (a one-byte length that ends the segment, PUBREL's flags),
            # without the plan.
            b0 = data[0]
            t = b0 >> 4
            if PUBACK <= t <= PUBCOMP and data[1] + 2 == n and data[1] < 0x80 and (t != PUBREL or b0 == 0x62):
                self._ack(from_client, t, data[2] << 8 | data[3], data[4] if n > 4 and self.version == 5 else 0,
                          ts_ns)
                return True
        ver = self.version
        plan: list[tuple[Any, ...]] = []
        off = 0
        while off < n:
            if n - off < 2:
                return False
            b0 = data[off]
            rl = data[off + 1]
            p = off + 2
            if rl >= 0x80:  # a longer remaining length (up to 4 bytes)
                got = _vbi_rest(data, p, n, rl)
                if got is None:
                    return False
                rl, p = got
            end = p + rl
            if end > n:
                return False
            t = b0 >> 4
            if t == PUBLISH:
                qos = (b0 >> 1) & 3
                if qos == 3 or rl < 2:
                    return False
                q = p + 2 + (data[p] << 8 | data[p + 1])
                hdr_end = q + 2 if qos else q
                if hdr_end > end:
                    return False
                props = _NO_PROPS
                if ver == 5:
                    if hdr_end < end and not data[hdr_end]:
                        hdr_end += 1  # an empty list
                    else:
                        got = _props_in(data, hdr_end, end, True)
                        if got is None:
                            return False
                        props, hdr_end = got
                if hdr_end - p > MAX_HEADER or (q == p + 2 and ver != 5):
                    return False
                raw = data[p + 2:q]  # the topic, kept for the span (bounded by MAX_HEADER)
                if _BAD_NAME.search(raw) is not None:
                    return False
                try:
                    topic = str(raw, "utf-8")
                except UnicodeDecodeError:
                    return False
                if q - p - 2 > 1024:
                    topic = topic[:1024]
                plan.append((PUBLISH, b0, topic, (data[q] << 8 | data[q + 1]) if qos else 0, end - hdr_end, props))
                off = end
                continue
            if t == 0 or (t in _REQUIRED_FLAGS and b0 & 0x0F != _REQUIRED_FLAGS[t]) or rl > MAX_HEADER \
                    or rl < _MIN_LENGTH[t]:
                return False
            if PUBACK <= t <= PUBCOMP:
                plan.append((t, data[p] << 8 | data[p + 1], data[p + 2] if ver == 5 and rl >= 3 else 0))
            elif t == CONNECT:
                q = p + 2 + (data[p] << 8 | data[p + 1])
                if q + 4 > end:
                    return False
                ver = data[q]
                q += 4
                if ver == 5:
                    got = _props_at(data, q, end)
                    if got is None:
                        return False
                    q = got[1]
                if q + 2 > end:
                    return False
                k = q + 2 + (data[q] << 8 | data[q + 1])
                if k > end:
                    return False
                plan.append((CONNECT, ver, str(data[q + 2:min(k, q + 2 + 256)], "utf-8", "replace")))
            elif t == CONNACK:
                reason = ""
                if ver == 5 and rl > 2 and data[p + 2]:
                    got = _props_in(data, p + 2, end, False)
                    if got is None:
                        return False
                    reason = got[0].get("reason", "")
                plan.append((CONNACK, data[p + 1], ver == 5, reason))
            elif t == SUBSCRIBE or t == UNSUBSCRIBE:
                q = p + 2
                if ver == 5:
                    got = _props_at(data, q, end)
                    if got is None:
                        return False
                    q = got[1]
                filters = []
                while q < end:
                    if q + 2 > end:
                        return False
                    k = q + 2 + (data[q] << 8 | data[q + 1])
                    if k > end:
                        return False
                    filters.append(str(data[q + 2:min(k, q + 2 + 512)], "utf-8", "replace"))
                    q = k + 1 if t == SUBSCRIBE else k
                if not filters:
                    return False
                plan.append((t, data[p] << 8 | data[p + 1], filters))
            elif t == SUBACK or t == UNSUBACK:
                q = p + 2
                reason = ""
                if ver == 5:
                    got = _props_at(data, q, end)
                    if got is None:
                        return False
                    reason = got[0].get("reason", "")
                    q = got[1]
                failed = None
                for c in data[q:min(end, q + 256)]:
                    if c >= 0x80:
                        failed = c
                        break
                plan.append((t, data[p] << 8 | data[p + 1], failed, reason))
            # PINGREQ, PINGRESP, DISCONNECT, AUTH: nothing to do
            off = end
        for step in plan:
            t = step[0]
            if t == PUBLISH:
                topic = step[2]
                props = step[5]
                if props:
                    alias = props.get("topic_alias")
                    if alias is not None:  # _publish's reading of it, in the packets' order
                        aliases = self.dirs[from_client].aliases
                        if topic:
                            aliases[alias] = topic
                        else:
                            topic = aliases.get(alias, f"alias:{alias}")
                self._published(from_client, step[1], topic, step[3], step[4], props, ts_ns, ts_ns)
            elif t <= PUBCOMP and t >= PUBACK:
                self._ack(from_client, t, step[1], step[2], ts_ns)
            elif t == CONNECT:
                self.version = step[1]
                self.client_id = step[2]
                self._connected(ts_ns)
            elif t == CONNACK:
                self._connack(step[1], step[3], step[2], ts_ns)
            elif t == SUBSCRIBE or t == UNSUBSCRIBE:
                self._subscribe(from_client, t, step[1], step[2], ts_ns)
            else:
                self._suback(from_client, step[1], step[3], step[2], ts_ns)
        return True

    # -- PUBLISH ------------------------------------------------------------
    def _publish(self, from_client: bool, buf: LargeBuffer, b0: int, o: int, p: int, end: int, ts_ns: int,
                 d: _Dir) -> int:
        """A PUBLISH at ``o`` (its variable header at ``p``): the offset after its variable
        header (its payload left in ``d.skip``); 0 to wait (``self._need``: the bytes wanted
        from the buffer's front, when known); minus that offset for a bad topic name."""
        qos = (b0 >> 1) & 3
        if qos == 3:
            raise Malformed(NAME, "bad_qos", o)
        n = len(buf)
        # The variable header: topic, packet id, properties. Wait for it (bounded).
        if n < p + 2:
            return 0
        tlen = buf.u16be_at(p)
        hdr_end = p + 2 + tlen + (2 if qos else 0)
        if hdr_end > end:
            raise Malformed(NAME, "truncated", p, "topic overruns the packet")
        if self.version == 5:
            if n < hdr_end + 4 and n < end:
                return 0
            got = _varint(buf, hdr_end, min(n, end))
            if got is None:
                if n >= end:  # the whole packet is here and its property length is not: no wait helps
                    raise Malformed(NAME, "truncated", p, "no property length before the packet's end")
                return 0
            hdr_end = got[1] + got[0]
            if hdr_end > end:
                raise Malformed(NAME, "truncated", p, "properties overrun the packet")
        if hdr_end - p > MAX_HEADER:
            raise LimitExceeded(NAME, "header_too_large", p)
        if n < hdr_end:
            self._need = hdr_end
            return 0
        raw = buf.bytes_at(p + 2, tlen)  # the topic, kept for the span (bounded by MAX_HEADER)
        if _BAD_NAME.search(raw) is not None or (tlen == 0 and self.version != 5):
            topic = None
        else:
            try:
                topic = raw.decode("utf-8")
            except UnicodeDecodeError:
                topic = None
        if topic is None:
            # Invalid UTF-8, U+0000 or a wildcard in a topic name: a protocol violation, which
            # the broker answers by closing the connection (3.1.1 §4.7.3, 5.0 §4.7.3).
            d.skip = end - hdr_end
            return -hdr_end
        if tlen > 1024:
            topic = topic[:1024]
        q = p + 2 + tlen
        pid = 0
        if qos:
            pid = buf.u16be_at(q)
            q += 2
        props: dict[str, Any] = _NO_PROPS
        if self.version == 5:
            props, q = _properties(buf, q, hdr_end, True)
            alias = props.get("topic_alias")
            if alias is not None:
                if topic:
                    d.aliases[alias] = topic
                else:
                    topic = d.aliases.get(alias, f"alias:{alias}")
        payload = end - hdr_end
        self._published(from_client, b0, topic, pid, payload, props, buf.ts_at(o), ts_ns)
        d.skip = payload
        return hdr_end

    def _published(self, from_client: bool, b0: int, topic: str, pid: int, payload: int, props: dict[str, Any],
                   start: int, ts_ns: int) -> None:
        """A PUBLISH read (either path): its span now (QoS 0) or once acknowledged."""
        qos = (b0 >> 1) & 3
        # eBPF: the client process publishes (PRODUCER) or receives (CONSUMER); the broker is SERVER.
        k = SpanKind.PRODUCER if from_client else SpanKind.CONSUMER
        attrs: dict[str, Any] = {
            "messaging.system": "mqtt",
            "messaging.operation.name": "publish",
            "messaging.operation.type": "send" if from_client else "receive",
            "messaging.destination.name": topic,
            "messaging.message.body.size": payload,
            "messaging.mqtt.qos": qos,
        }
        if b0 & 1:
            attrs["messaging.mqtt.retain"] = True
        if props:
            if "content_type" in props:
                attrs["messaging.mqtt.content_type"] = props["content_type"]
            tp = props.get("traceparent")
        else:
            tp = None
        ex = _Exchange("publish", f"publish {topic}", self.conn.kind_for(k, k), start, attrs, tp,
                       PUBACK if qos == 1 else PUBCOMP)
        if qos == 0:
            self._emit(ex, ts_ns)
        else:
            self._add((from_client, pid), ex)

    # -- everything else (small, read whole) ------------------------------------
    def _control(self, from_client: bool, t: int, buf: LargeBuffer, p: int, end: int, start: int,
                 ts_ns: int) -> None:
        v5 = self.version == 5
        if t == CONNECT:
            plen = buf.u16be_at(p)
            q = p + 2 + plen
            if q + 4 > end:
                raise Malformed(NAME, "truncated", p, "protocol name overruns CONNECT")
            self.version = buf.u8_at(q)
            q += 1 + 1 + 2  # level, flags, keep-alive
            if self.version == 5:
                _, q = _properties(buf, q, end, False)
            self.client_id, _ = _string(buf, q, end, 256)  # the will, username and password are never read
            self._connected(start)
            return
        if t == CONNACK:
            code = buf.u8_at(p + 1) if end - p >= 2 else 0
            reason = ""
            if v5 and end - p > 2:
                props, _ = _properties(buf, p + 2, end, False)
                reason = props.get("reason", "")
            self._connack(code, reason, v5, ts_ns)
            return
        if t in (PUBACK, PUBREC, PUBREL, PUBCOMP):
            self._ack(from_client, t, buf.u16be_at(p), buf.u8_at(p + 2) if v5 and end - p >= 3 else 0, ts_ns)
            return
        if t in (SUBSCRIBE, UNSUBSCRIBE):
            pid = buf.u16be_at(p)
            q = p + 2
            if v5:
                _, q = _properties(buf, q, end, False)
            filters = []
            while q < end:
                f, q = _string(buf, q, end, 512)
                filters.append(f)
                if t == SUBSCRIBE:
                    q += 1  # subscription options / requested QoS
            if not filters:
                raise Malformed(NAME, "no_topic_filter", p)
            self._subscribe(from_client, t, pid, filters, start)
            return
        if t in (SUBACK, UNSUBACK):
            pid = buf.u16be_at(p)
            q = p + 2
            reason = ""
            if v5:
                props, q = _properties(buf, q, end, False)
                reason = props.get("reason", "")
            failed = None
            for i in range(q, min(end, q + 256)):
                c = buf.u8_at(i)
                if c >= 0x80:
                    failed = c
                    break
            self._suback(from_client, pid, reason, failed, ts_ns)
            return
        if t in (PINGREQ, PINGRESP, DISCONNECT, AUTH):
            return
        raise Malformed(NAME, "bad_packet_type", 0, str(t))  # pragma: no cover - all 15 handled

    # -- what a packet does, once read (either path) ------------------------------
    def _connected(self, start: int) -> None:
        attrs = {"messaging.system": "mqtt", "messaging.operation.name": "connect"}
        self.connect = _Exchange("connect", "connect", self.conn.kind_for(SpanKind.CLIENT), start,
                                 attrs, None, CONNACK)

    def _connack(self, code: int, reason: str, v5: bool, ts_ns: int) -> None:
        ex, self.connect = self.connect, None
        refused = code >= 0x80 if v5 else code != 0
        if ex is not None and (refused or self.settings.trace_connect):
            if refused:
                ex.attrs["error.type"] = str(code)
                ex.attrs["messaging.mqtt.reason_code"] = code
            self._emit(ex, ts_ns, StatusCode.ERROR if refused else StatusCode.UNSET,
                       reason or (f"connection refused: code {code}" if refused else ""))

    def _ack(self, from_client: bool, t: int, pid: int, code: int, ts_ns: int) -> None:
        """PUBACK/PUBREC/PUBREL/PUBCOMP ``pid`` with reason ``code`` (0 before MQTT 5)."""
        # PUBACK/PUBREC/PUBCOMP answer the other side's publish; PUBREL is the
        # publisher's own second step.
        initiator = from_client if t == PUBREL else not from_client
        pending = self.pending
        key = (initiator, pid)
        ex = pending.get(key)
        if ex is None:
            if t != PUBREL:
                self.conn.drop("unpaired_ack")
            return
        if code >= 0x80:
            pending.pop(key)
            ex.attrs["error.type"] = str(code)
            ex.attrs["messaging.mqtt.reason_code"] = code
            self._emit(ex, ts_ns, StatusCode.ERROR, f"reason code {code:#x}")
        elif t == ex.expect:
            pending.pop(key)
            self._emit(ex, ts_ns)

    def _subscribe(self, from_client: bool, t: int, pid: int, filters: list[str], start: int) -> None:
        op = _NAMES[t]
        attrs = {"messaging.system": "mqtt", "messaging.operation.name": op,
                 "messaging.destination.name": filters[0]}
        if len(filters) > 1:
            attrs["messaging.mqtt.topic_filters"] = filters[:32]
        ex = _Exchange(op, f"{op} {filters[0]}", self.conn.kind_for(SpanKind.CLIENT), start, attrs, None,
                       SUBACK if t == SUBSCRIBE else UNSUBACK)
        self._add((from_client, pid), ex)

    def _suback(self, from_client: bool, pid: int, reason: str, failed: int | None, ts_ns: int) -> None:
        """(UN)SUBACK ``pid``; ``failed``: its first refusing reason code (of the first 256), if any."""
        ex = self.pending.pop((not from_client, pid), None)
        if ex is None:
            self.conn.drop("unpaired_ack")
            return
        if failed is not None:
            ex.attrs["error.type"] = str(failed)
            ex.attrs["messaging.mqtt.reason_code"] = failed
            self._emit(ex, ts_ns, StatusCode.ERROR, reason or f"refused: reason code {failed:#x}")
        else:
            self._emit(ex, ts_ns)

    def _add(self, key: tuple[bool, int], ex: _Exchange) -> None:
        if len(self.pending) >= MAX_PENDING:
            self.pending.pop(next(iter(self.pending)))
            self.conn.drop("too_many_pending")
        if key in self.pending:
            self.conn.drop("packet_id_reused")  # the earlier exchange never completed
        self.pending[key] = ex

    def _emit(self, ex: _Exchange, end_ts: int, status: StatusCode = StatusCode.UNSET, msg: str = "") -> None:
        if self.client_id:
            ex.attrs["messaging.client.id"] = self.client_id
        conn = self.conn
        conn.emit(conn.span(ex.name, ex.kind, ex.start_ts, end_ts, ex.attrs, traceparent=ex.traceparent,
                            status_code=status, status_message=msg))

    def gap(self, from_client: bool, ts_ns: int) -> None:
        self.dirs[from_client].skip = 0

    def close(self, ts_ns: int, reset: bool = False) -> None:
        # A publish left without its acknowledgement was still delivered as far as the wire
        # shows: a span marked incomplete (base.py's rule); a (un)subscribe without its ack
        # has no outcome to report and is counted.
        for ex in self.pending.values():
            if ex.op == "publish":
                if self.client_id:
                    ex.attrs["messaging.client.id"] = self.client_id
                conn = self.conn
                # It ends where what was seen of it ends: the publish itself.
                self.cut_short(conn.span(ex.name, ex.kind, ex.start_ts, ex.start_ts, ex.attrs, ex.traceparent))
            else:
                self.cut_short(None, "no_ack")
        self.pending.clear()
