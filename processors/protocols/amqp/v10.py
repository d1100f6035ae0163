"""AMQP 1.0 (OASIS, ISO/IEC 19464): spans for transfers, settled by dispositions, and the errors of
rejected outcomes, detach, end and close.

Contract: processors/protocols/base.py (the package, ``amqp/__init__.py``, picks this module by the
protocol header ``AMQP 0 1.0.0`` / ``AMQP 3 1.0.0`` (SASL) or a frame of AMQP 1.0's shape).

The wire (AMQP 1.0 part 2): each peer sends a protocol header, then frames

    size u32 | doff u8 (header length in 4-byte words, >= 2) | type u8 (0 AMQP, 1 SASL) |
    channel u16 | extended header | body

whose body is a performative (a described list: open 0x10, begin 0x11, attach 0x12, flow 0x13,
transfer 0x14, disposition 0x15, detach 0x16, end 0x17, close 0x18; SASL 0x40-0x44) and, for a
transfer, the message's bytes. A frame of 8 bytes is a heartbeat. Only a frame's first
``MAX_HEAD`` bytes are looked at, through a view (no copy): the performative and the message's
leading sections (properties, application-properties, message-annotations: message id,
correlation id, ``traceparent``); the body (data, amqp-value, amqp-sequence sections) is measured
by its encoded sizes and stepped over as it arrives, released, never held.

Pairing: a session's channel differs per side (the server's ``begin`` names the client's as its
remote-channel), a link's handle too (both ``attach``es carry the link's name). A transfer is a
PRODUCER ``publish {address}`` when the client sends it (a sender link: the target's address),
a CONSUMER ``receive {address}`` when the server does (a receiver link: the source's). It ends
when its last frame is sent if it was sent settled, else at the ``disposition`` that settles it
(``accepted``; ``rejected`` is an ERROR with the condition as ``error.type``, ``released`` and
``modified`` too). A ``detach``, ``end`` or ``close`` with an error fails the transfers still
unsettled under it, or else is an ERROR span of its own (``attach {address}`` for a link refused
before any transfer). A failed SASL outcome is an ERROR ``connect``.
"""

from __future__ import annotations

import struct
from typing import Any, ClassVar

from processors.protocols.base import Conn, Detection, PendingMap, Session
from processors.protocols.errors import LimitExceeded, Malformed
from service.largebuf import LargeBuffer
from service.model import SpanKind, StatusCode

from .v091 import NAME, Settings

HEADER_AMQP = b"AMQP\x00\x01\x00\x00"
HEADER_SASL = b"AMQP\x03\x01\x00\x00"
HEADER_TLS = b"AMQP\x02\x01\x00\x00"
#: The bytes of a frame looked at (performative and leading sections); the rest is stepped over.
MAX_HEAD = 64 * 1024
#: A frame is first looked at when this much of it is there (a performative is rarely longer);
#: when its performative or a properties section goes on past it, the look doubles, to MAX_HEAD.
FIRST_LOOK = 512
#: The spec's smallest max-frame-size is 512; the largest is 2^32-1: every size is possible.
MIN_FRAME = 8
#: Nesting of compound values read in a performative (a source's filter map holds described
#: values: 4 levels suffice; a deeper one is refused).
MAX_DEPTH = 16
#: Sessions and links per connection tracked (the spec's channel-max and handle-max defaults
#: are 65535 and 2^32-1: bounded here instead; a link costs ~300 bytes).
MAX_SESSIONS = 2048
MAX_LINKS = 4096
#: Bytes of an address or a string attribute kept.
MAX_TEXT = 1024

OPEN, BEGIN, ATTACH, FLOW, TRANSFER, DISPOSITION, DETACH, END, CLOSE = range(0x10, 0x19)
SASL_MECHANISMS, SASL_INIT, SASL_CHALLENGE, SASL_RESPONSE, SASL_OUTCOME = range(0x40, 0x45)
_PERFORMATIVES = frozenset(range(0x10, 0x19))
_SASL = frozenset(range(0x40, 0x45))
_SYMBOLIC = {b"amqp:open:list": OPEN, b"amqp:begin:list": BEGIN, b"amqp:attach:list": ATTACH,
             b"amqp:flow:list": FLOW, b"amqp:transfer:list": TRANSFER, b"amqp:disposition:list": DISPOSITION,
             b"amqp:detach:list": DETACH, b"amqp:end:list": END, b"amqp:close:list": CLOSE}
#: Delivery states (part 3 §3.4) and message sections (part 3 §3.2).
RECEIVED, ACCEPTED, REJECTED, RELEASED, MODIFIED = 0x23, 0x24, 0x25, 0x26, 0x27
ERROR = 0x1D
SOURCE, TARGET = 0x28, 0x29
S_HEADER, S_DELIVERY_ANN, S_MESSAGE_ANN, S_PROPERTIES, S_APP_PROPS, S_DATA, S_SEQUENCE, S_VALUE, S_FOOTER = \
    range(0x70, 0x79)
_SASL_CODES = {1: "sasl_auth", 2: "sasl_sys", 3: "sasl_sys_perm", 4: "sasl_sys_temp"}

_U16 = struct.Struct(">H").unpack_from
_U32 = struct.Struct(">I").unpack_from
_I32 = struct.Struct(">i").unpack_from
_U64 = struct.Struct(">Q").unpack_from
_I64 = struct.Struct(">q").unpack_from
_FRAME = struct.Struct(">IBBH")

# Fixed-width constructors -> width (part 1 §1.6).
_FIXED = {0x40: 0, 0x41: 0, 0x42: 0, 0x43: 0, 0x44: 0, 0x45: 0,
          0x50: 1, 0x51: 1, 0x52: 1, 0x53: 1, 0x54: 1, 0x55: 1, 0x56: 1,
          0x60: 2, 0x61: 2, 0x70: 4, 0x71: 4, 0x72: 4, 0x73: 4, 0x74: 4,
          0x80: 8, 0x81: 8, 0x82: 8, 0x83: 8, 0x84: 8, 0x94: 16, 0x98: 16}


#: Zero-width constructors' values (null, true, false, uint0, ulong0) and the one-byte
#: unsigned ones (ubyte, smalluint, smallulong), read inline by _compound.
_ZERO_WIDTH = {0x40: None, 0x41: True, 0x42: False, 0x43: 0, 0x44: 0}
_ONE_BYTE_UINT = frozenset((0x50, 0x52, 0x53))


class _Short(Exception):
    """A value runs past the bytes looked at (the frame's head): not an error of the peer."""


class _More(Exception):
    """The frame's bytes in sight end inside its performative or a section to read: look again
    when ``need`` bytes of its body are there (nothing was changed)."""

    def __init__(self, need: int) -> None:
        self.need = need


def _extent(mv: memoryview, p: int, end: int) -> int:
    """The offset after the value at ``p``, from its constructor and size fields alone (a
    compound's size says it: nothing inside is walked). Raises _Short when the value's header
    is past ``end``, Malformed for a constructor AMQP does not define."""
    if p >= end:
        raise _Short
    c = mv[p]
    if c == 0x00:  # described: descriptor, then the value
        return _extent(mv, _extent(mv, p + 1, end), end)
    w = _FIXED.get(c)
    if w is not None:
        return p + 1 + w
    hi = c & 0xF0
    if hi in (0xA0, 0xC0, 0xE0):  # 1-byte size
        if p + 2 > end:
            raise _Short
        return p + 2 + mv[p + 1]
    if hi in (0xB0, 0xD0, 0xF0):  # 4-byte size
        if p + 5 > end:
            raise _Short
        return p + 5 + _U32(mv, p + 1)[0]
    raise Malformed(NAME, "bad_constructor", p, f"{c:#x}")


def _value(mv: memoryview, p: int, end: int, depth: int = 0, nmax: int = 1 << 30) -> tuple[Any, int]:
    """Decode the value at ``p`` (whole within ``end``, else _Short): scalars as Python values,
    strings and symbols as ``str``, binary as ``bytes`` (<= MAX_TEXT, else its length), lists and
    arrays as lists (their first ``nmax`` elements), maps as dicts, a described value as
    ``(descriptor, value)``."""
    if depth > MAX_DEPTH:
        raise Malformed(NAME, "too_deep", p)
    if p >= end:
        raise _Short
    c = mv[p]
    q = p + 1
    if c == 0x00:
        if q + 1 < end and mv[q] == 0x53 and depth < MAX_DEPTH:  # the usual smallulong descriptor, inline
            d = mv[q + 1]
            q += 2
        else:
            d, q = _value(mv, q, end, depth + 1)
        v, q = _value(mv, q, end, depth + 1, nmax)
        return (d, v), q
    w = _FIXED.get(c)
    if w is not None:
        if q + w > end:
            raise _Short
        if c == 0x40:
            return None, q
        if c in (0x41, 0x42):
            return c == 0x41, q
        if c in (0x43, 0x44):
            return 0, q
        if c == 0x45:
            return [], q
        if c in (0x50, 0x52, 0x53):
            return mv[q], q + 1
        if c in (0x51, 0x54, 0x55):
            b = mv[q]
            return b - 256 if b > 127 else b, q + 1
        if c == 0x56:
            return mv[q] != 0, q + 1
        if c == 0x60:
            return _U16(mv, q)[0], q + 2
        if c == 0x70:
            return _U32(mv, q)[0], q + 4
        if c == 0x71:
            return _I32(mv, q)[0], q + 4
        if c == 0x80:
            return _U64(mv, q)[0], q + 8
        if c in (0x81, 0x83):
            return _I64(mv, q)[0], q + 8
        if c == 0x98:
            return bytes(mv[q:q + 16]).hex(), q + 16  # a uuid: 16 bytes, deliberate copy
        return None, q + w  # floats, decimals, chars: not needed
    nxt = _extent(mv, p, end)
    if nxt > end:
        raise _Short
    if c in (0xA1, 0xB1, 0xA3, 0xB3):  # str8/32, sym8/32
        s = q + (1 if c < 0xB0 else 4)
        n = nxt - s
        return str(mv[s:s + min(n, MAX_TEXT)], "utf-8", "replace"), nxt  # bounded copy
    if c in (0xA0, 0xB0):  # binary
        s = q + (1 if c == 0xA0 else 4)
        n = nxt - s
        return (bytes(mv[s:nxt]) if n <= MAX_TEXT else n), nxt  # bounded copy
    if c in (0xC0, 0xC1, 0xD0, 0xD1):  # list8/map8, list32/map32: size, count, items
        try:
            return _compound(mv, c, p, q, nxt, depth, nmax), nxt
        except _Short:
            # The compound is whole in sight (nxt <= end): what overruns its own size is malformed.
            raise Malformed(NAME, "bad_compound", p) from None
    # arrays: size, count, one constructor, then the elements without theirs: kept as their count
    return [], nxt


def _compound(mv: memoryview, c: int, p: int, q: int, nxt: int, depth: int, nmax: int) -> Any:
    """A list or map at ``p`` ending at ``nxt``: its items, each bounded by ``nxt``."""
    if c < 0xD0:
        if q + 2 > nxt:
            raise _Short
        count, s = mv[q + 1], q + 2
    else:
        if q + 8 > nxt:
            raise _Short
        count, s = _U32(mv, q + 4)[0], q + 8
    if c in (0xC1, 0xD1):
        if count & 1:
            raise Malformed(NAME, "bad_map", p)
        out: dict[Any, Any] = {}
        for _ in range(count // 2):
            k, s = _value(mv, s, nxt, depth + 1)
            v, s = _value(mv, s, nxt, depth + 1)
            if isinstance(k, (str, int, bytes, bool)) or k is None:
                out[k] = v
        return out
    items: list[Any] = []
    append = items.append
    # A performative's fields are mostly nulls, booleans, small integers and short strings:
    # those are read here as _value reads them (same bounds, same results), without a call.
    inline = depth < MAX_DEPTH
    for _ in range(min(count, nmax)):
        if inline and s < nxt:
            c = mv[s]
            if c in _ZERO_WIDTH:
                append(_ZERO_WIDTH[c])
                s += 1
                continue
            if s + 2 <= nxt:
                if c in _ONE_BYTE_UINT:
                    append(mv[s + 1])
                    s += 2
                    continue
                if c == 0xA1 or c == 0xA3:  # str8, sym8
                    e = s + 2 + mv[s + 1]
                    if e <= nxt:
                        append(str(mv[s + 2:s + 2 + min(e - s - 2, MAX_TEXT)], "utf-8", "replace"))  # bounded copy
                        s = e
                        continue
        v, s = _value(mv, s, nxt, depth + 1)
        append(v)
    return items


def _list(body: Any, n: int) -> list[Any]:
    """A performative's field list padded to ``n`` (trailing nulls may be omitted on the wire)."""
    if not isinstance(body, list):
        raise Malformed(NAME, "bad_performative", 0, "not a list")
    return body + [None] * (n - len(body)) if len(body) < n else body


def _code(d: Any) -> int | None:
    if isinstance(d, int):
        return d if d < 0x100000000 else d & 0xFFFFFFFF  # domain 0 (AMQP's own): the low word
    if isinstance(d, str):
        return _SYMBOLIC.get(d.encode())
    return None


def _error(v: Any) -> tuple[str, str] | None:
    """An ``error`` (0x1d: condition, description, info) -> (condition, description)."""
    if isinstance(v, tuple) and _code(v[0]) == ERROR and isinstance(v[1], list) and v[1]:
        cond = v[1][0] if isinstance(v[1][0], str) else "amqp:internal-error"
        desc = v[1][1] if len(v[1]) > 1 and isinstance(v[1][1], str) else ""
        return cond[:256], desc[:512]
    return None


def _address(terminus: Any) -> str:
    if isinstance(terminus, tuple) and _code(terminus[0]) in (SOURCE, TARGET) and isinstance(terminus[1], list) \
            and terminus[1] and isinstance(terminus[1][0], str):
        return terminus[1][0][:MAX_TEXT]
    return ""


#: A section header cut by the end of a transfer frame is carried to the next frame when it is
#: at most this long (a described section's header: 0x00, a descriptor, a constructor and size).
MAX_CARRY = 64


def _scan(mv: memoryview, p: int, end: int, sec_rem: int, can_more: bool, whole: bool = False,
          carry: bytes = b"") -> tuple[int, dict[str, str], str | None, int, bool, bytes]:
    """The message sections in ``mv[p:end]`` (a transfer frame's payload in sight), after the
    ``sec_rem`` bytes of a section begun earlier, or completing the section header ``carry`` the
    previous frame ended in: (body bytes, message and correlation ids, traceparent, bytes of the
    last section still to come, whether the body size is known, a header cut by this frame's end
    when ``whole``: the frame is all in sight). Raises _More when ``can_more`` and a section
    header or a properties / application-properties / message-annotations section goes on past
    ``end``."""
    body = 0
    ids: dict[str, str] = {}
    tp: str | None = None
    if carry:
        tmp = carry + bytes(mv[p:min(end, p + MAX_CARRY)])  # <= 128 bytes, a deliberate copy
        try:
            if tmp[0] != 0x00:
                raise Malformed(NAME, "bad_section", p)
            d, q = _value(memoryview(tmp), 1, len(tmp))
            nxt = _extent(memoryview(tmp), q, len(tmp))
        except _Short:
            return body, ids, tp, 0, False, b""
        code = _code(d)
        if code is None or not S_HEADER <= code <= S_FOOTER:
            raise Malformed(NAME, "bad_section", p, f"{d!r}"[:32])
        if code in (S_DATA, S_SEQUENCE, S_VALUE):
            body += _body_bytes(code, tmp[q], q, nxt)
        sec_rem = nxt - len(carry)  # the rest of this section, from p on
    if sec_rem:
        take = min(sec_rem, end - p)
        sec_rem -= take
        p += take
    while p < end:
        try:
            if mv[p] != 0x00:
                raise Malformed(NAME, "bad_section", p)
            d, q = _value(mv, p + 1, end)
            code = _code(d)
            nxt = _extent(mv, q, end)
        except _Short:
            if can_more:
                raise _More(end + 64) from None
            if whole and end - p <= MAX_CARRY:
                return body, ids, tp, 0, True, bytes(mv[p:end])  # the next frame completes it
            return body, ids, tp, 0, False, b""  # a section header out of sight: the body size is unknown
        if code is None or not S_HEADER <= code <= S_FOOTER:
            raise Malformed(NAME, "bad_section", p, f"{d!r}"[:32])
        if code in (S_DATA, S_SEQUENCE, S_VALUE):
            body += _body_bytes(code, mv[q], q, nxt)
        elif code in (S_PROPERTIES, S_APP_PROPS, S_MESSAGE_ANN):
            if nxt > end:
                if can_more:
                    raise _More(nxt)
            else:
                v, _ = _value(mv, q, end, 1, 13)
                if code == S_PROPERTIES and isinstance(v, list):
                    mid = v[0] if v else None
                    if isinstance(mid, (str, int)):
                        ids["messaging.message.id"] = str(mid)
                    cid = v[5] if len(v) > 5 else None
                    if isinstance(cid, (str, int)):
                        ids["messaging.message.conversation_id"] = str(cid)
                    to = v[2] if len(v) > 2 else None
                    if isinstance(to, str) and to:
                        ids["_to"] = to[:256]  # the destination when the link names none (see _apply)
                elif isinstance(v, dict):
                    t = v.get("traceparent")
                    if isinstance(t, str):
                        tp = t
        if nxt > end:
            return body, ids, tp, nxt - end, True, b""
        p = nxt
    return body, ids, tp, sec_rem, True, b""


def _apply(op: _Op, body: int, ids: dict[str, str], tp: str | None, sec_rem: int, sized: bool,
           carry: bytes) -> None:
    """What ``_scan`` read of a transfer frame, onto its delivery."""
    op.attrs["messaging.message.body.size"] += body
    if ids:
        to = ids.pop("_to", None)
        # A message's ``to`` is its destination where the link has no address: an anonymous
        # relay link (part 3 §3.2.4), or a link attached before the capture began.
        if to is not None and "messaging.destination.name" not in op.attrs:
            op.attrs["messaging.destination.name"] = to
            op.name = f"{op.attrs['messaging.operation.name']} {to}"
        op.attrs.update(ids)
    if tp is not None:
        op.traceparent = tp
    op.sec_rem = sec_rem
    op.carry = carry
    op.sized = op.sized and sized


def _body_bytes(code: int, c: int, q: int, nxt: int) -> int:
    """A body section's bytes: a data section's binary, an amqp-value's binary or string without
    its constructor and size; anything else (a sequence, a map) its encoding."""
    if code == S_DATA:
        hdr = 2 if c == 0xA0 else 5 if c == 0xB0 else 0
        if not hdr:
            raise Malformed(NAME, "bad_section", q, "data is not binary")
        return nxt - q - hdr
    if code == S_VALUE:
        return nxt - q - (2 if c in (0xA0, 0xA1) else 5 if c in (0xB0, 0xB1) else 0)
    return nxt - q


# ---------------------------------------------------------------------------
# detection
# ---------------------------------------------------------------------------
#: What each SASL frame's sender is: True the client, False the server.
_SASL_FROM_CLIENT = {SASL_MECHANISMS: False, SASL_INIT: True, SASL_CHALLENGE: False, SASL_RESPONSE: True,
                     SASL_OUTCOME: False}


def _frame_code(buf: LargeBuffer) -> tuple[Detection, int]:
    """A frame at the buffer's start: (NEED_MORE / NO / REQUEST, its performative's code)."""
    n = len(buf)
    if n < 8:
        return Detection.NEED_MORE, 0
    size, doff, ftype, _ = _FRAME.unpack(buf.bytes_at(0, 8))
    doff *= 4
    if size < MIN_FRAME or doff < 8 or doff > size or ftype > 1 or size == doff:
        return Detection.NO, 0  # a heartbeat is too weak to start a session on
    need = min(size, doff + 16)
    if n < need:
        return Detection.NEED_MORE, 0
    mv = buf.bytes_at(doff, need - doff)  # <= 16 bytes
    if len(mv) < 4 or mv[0] != 0x00:
        return Detection.NO, 0
    if mv[1] == 0x53:
        code, q = mv[2], 3
    elif mv[1] == 0x80 and len(mv) >= 11:
        hi, code = struct.unpack_from(">II", mv, 2)
        if hi:
            return Detection.NO, 0
        q = 10
    else:
        return Detection.NO, 0
    if code not in (_SASL if ftype == 1 else _PERFORMATIVES) or q >= len(mv):
        return Detection.NO, 0
    c = mv[q]  # the performative's fields: an empty list, a list8 or a list32 within the frame
    if c == 0x45:
        end = doff + q + 1
    elif c == 0xC0 and q + 1 < len(mv):
        end = doff + q + 2 + mv[q + 1]
    elif c == 0xD0 and q + 5 <= len(mv):
        end = doff + q + 5 + _U32(mv, q + 1)[0]
    else:
        return Detection.NO, 0
    return (Detection.REQUEST if end <= size else Detection.NO), code


def detect(buf: LargeBuffer, from_client: bool | None) -> Detection:
    n = len(buf)
    if n == 0:
        return Detection.NEED_MORE
    if buf.u8_at(0) == 0x41:
        got = buf.bytes_at(0, min(n, 8))
        if not (HEADER_AMQP.startswith(got) or HEADER_SASL.startswith(got)):
            return Detection.NO
        if n < 8:
            return Detection.NEED_MORE
        # Both peers send the header, the client first.
        return Detection.RESPONSE if from_client is False else Detection.REQUEST
    if buf.u8_at(0) != 0:
        return Detection.NO
    d, code = _frame_code(buf)
    if d != Detection.REQUEST:
        return d
    sender = _SASL_FROM_CLIENT.get(code) if buf.u8_at(5) == 1 else None
    if sender is not None:
        if from_client is not None and from_client != sender:
            return Detection.NO
        return Detection.REQUEST if sender else Detection.RESPONSE
    return Detection.RESPONSE if from_client is False else Detection.REQUEST


def ambiguous_role(buf: LargeBuffer) -> bool:
    """An AMQP performative either peer sends (open, begin, attach, transfer, ...): a connection
    joined on one takes its roles from the ports (base.py)."""
    return len(buf) >= 6 and buf.u8_at(0) == 0 and buf.u8_at(5) == 0


# ---------------------------------------------------------------------------
# session state
# ---------------------------------------------------------------------------
class _Op:
    """A transfer becoming a span (its frames and its disposition to come), or a refused attach."""

    __slots__ = ("attrs", "carry", "kind", "link", "name", "sec_rem", "sized", "start_ts", "traceparent")

    def __init__(self, name: str, kind: SpanKind, start_ts: int, attrs: dict[str, Any], link: _Link | None) -> None:
        self.name = name
        self.kind = kind
        self.start_ts = start_ts
        self.attrs = attrs
        self.link = link
        self.traceparent: str | None = None
        self.sec_rem = 0      # bytes of the current message section still to come
        self.sized = True     # False when a section header was out of sight: the body size is unknown
        self.carry = b""      # a section header the last frame ended in (<= MAX_CARRY bytes)


def _op_traceparent(op: _Op) -> Any:
    return op.traceparent


class _Link:
    __slots__ = ("address", "client_sends", "cur", "failed", "handles", "name", "start_ts", "transfers")

    def __init__(self, name: tuple[str, bool], client_sends: bool, address: str) -> None:
        self.name = name
        self.client_sends = client_sends  # the client is the link's sender (it publishes)
        self.address = address
        self.cur: _Op | None = None       # a delivery whose transfer frames are still coming (more=true)
        self.handles: list[int | None] = [None, None]  # per side: (server's, client's)
        self.transfers = 0
        self.start_ts = 0  # when the client attached it
        self.failed = False  # a detach with an error was reported for it


class _Sess:
    __slots__ = ("by_name", "channels", "links", "remote", "sid")

    def __init__(self, sid: int) -> None:
        self.sid = sid
        self.remote: int | None = None  # the peer's channel a begin named as its remote-channel
        self.links: tuple[dict[int, _Link], dict[int, _Link]] = ({}, {})  # per side: handle -> link
        self.by_name: dict[tuple[str, bool], _Link] = {}
        self.channels: list[int | None] = [None, None]


class _Dir:
    __slots__ = ("first", "need", "sasl", "skip", "skip_op")

    def __init__(self) -> None:
        self.need = 0  # bytes of the frame at the buffer's start to wait for (0: FIRST_LOOK)
        self.first = True
        self.sasl = False
        self.skip = 0                  # bytes of a frame's tail still to step over
        self.skip_op: _Op | None = None  # the delivery those bytes belong to


class Session(Session):  # type: ignore[no-redef]
    protocol: ClassVar[str] = NAME

    def __init__(self, conn: Conn) -> None:
        super().__init__(conn)
        self.settings: Settings = conn.settings if isinstance(conn.settings, Settings) else Settings()
        self.dirs = (_Dir(), _Dir())
        self.sessions: tuple[dict[int, _Sess], dict[int, _Sess]] = ({}, {})  # per side: channel -> session
        self.next_sid = 0
        self.nlinks = 0  # links tracked, all sessions together (MAX_LINKS)
        #: Unsettled deliveries by (session id, sender side, delivery-id).
        self.unsettled: dict[tuple[int, bool, int], _Op] = PendingMap(conn, traceparent=_op_traceparent)
        self.client_id: str | None = None
        self.system = "amqp"
        self.login: _Op | None = None

    # -- framing ------------------------------------------------------------
    def feed(self, from_client: bool, buf: LargeBuffer, ts_ns: int) -> None:
        d = self.dirs[from_client]
        while True:
            if d.skip:
                if not self._tail(d, buf):
                    return
                op, d.skip_op = d.skip_op, None
                if op is not None:
                    self._frame_done(op, ts_ns)
            n = len(buf)
            if n == 0:
                return
            if buf.u8_at(0) == 0x41:  # 'A': a protocol header (each side's first, and after SASL)
                if n < 8:
                    buf.want = 8
                    return
                h = buf.bytes_at(0, 8)
                if h not in (HEADER_AMQP, HEADER_SASL):
                    raise Malformed(NAME, "bad_protocol_header", 0)
                d.sasl = h == HEADER_SASL
                d.first = False
                buf.release(8)
                continue
            d.first = False
            if n < 8:
                buf.want = 8
                return
            size, doff, ftype, channel = _FRAME.unpack_from(buf.view_at(0, 8))  # one read (straddling: scratch)
            doff *= 4
            if size < MIN_FRAME or doff < 8 or doff > size or ftype > 1:
                raise Malformed(NAME, "bad_frame", 0, f"size {size} doff {doff} type {ftype}")
            if size == doff:  # an empty frame: a heartbeat
                buf.release(size)
                continue
            limit = min(size, doff + MAX_HEAD)
            want = d.need or min(limit, doff + FIRST_LOOK)
            if n < want:
                buf.want = want
                return
            # Look at what is wanted, not at all that is there: the view (a straddling one is a
            # copy into the buffer's reused scratch) stays small whatever the segments are.
            head = want
            start = buf.ts_at(0)
            mv = buf.view_at(doff, head - doff)
            try:
                op = self._frame(from_client, ftype, channel, mv, size - doff, start, ts_ns, head < limit)
            except _More as more:
                d.need = min(limit, max(doff + more.need, 2 * head - doff))
                if n < d.need:
                    buf.want = d.need
                    return
                continue
            d.need = 0
            buf.release(head)
            if size > head:
                d.skip, d.skip_op = size - head, op
            elif op is not None:
                self._frame_done(op, ts_ns)

    def _frame(self, from_client: bool, ftype: int, channel: int, mv: memoryview, total: int, start: int,
               ts_ns: int, can_more: bool = False) -> _Op | None:
        """One frame's performative (and a transfer's leading sections). Returns the delivery a
        transfer frame belongs to when its tail is still to be stepped over (see _frame_done).
        ``can_more``: more of the frame may come into sight (raise _More, changing nothing)."""
        end = len(mv)
        if mv[0] != 0x00:
            raise Malformed(NAME, "bad_performative", 0, "not a described type")
        try:
            d, q = _value(mv, 1, end, 1)
            code = _code(d)
            # SASL init and response carry the credentials: never decoded (only the mechanism).
            f, p = _value(mv, q, end, 1, 1 if code == SASL_INIT else 0 if code == SASL_RESPONSE else 12)
        except _Short:
            if can_more:
                raise _More(2 * end) from None
            raise LimitExceeded(NAME, "performative_too_large", 0) from None
        if ftype == 1:
            if code not in _SASL:
                raise Malformed(NAME, "bad_performative", 0, f"SASL frame with {code}")
            self._sasl(from_client, code, f, start, ts_ns)  # type: ignore[arg-type]
            return None
        if code not in _PERFORMATIVES:
            raise Malformed(NAME, "bad_performative", 0, f"{code}")
        if code == TRANSFER:
            return self._transfer(from_client, channel, _list(f, 11), mv, p, total, start, ts_ns, can_more)
        if code == DISPOSITION:
            self._disposition(from_client, channel, _list(f, 6), ts_ns)
        elif code == ATTACH:
            self._attach(from_client, channel, _list(f, 7), start)
        elif code == DETACH:
            self._detach(from_client, channel, _list(f, 3), start, ts_ns)
        elif code == BEGIN:
            self._begin(from_client, channel, _list(f, 1))
        elif code == END:
            self._end(from_client, channel, _list(f, 1), start, ts_ns)
        elif code == OPEN:
            self._open(from_client, _list(f, 10))
        elif code == CLOSE:
            self._close(from_client, _list(f, 1), start, ts_ns)
        return None  # flow: credit, nothing to trace

    # -- connection, sessions, links ------------------------------------------------
    def _sasl(self, from_client: bool, code: int, f: Any, start: int, ts_ns: int) -> None:
        if code == SASL_INIT and from_client:  # its initial-response (the credentials) is not read
            self.login = _Op("connect", self.conn.kind_for(SpanKind.CLIENT), start,
                             {"messaging.operation.name": "connect"}, None)
        elif code == SASL_OUTCOME and not from_client:
            outcome = _list(f, 1)[0]
            op, self.login = self.login, None
            if isinstance(outcome, int) and outcome != 0:
                if op is None:
                    op = _Op("connect", self.conn.kind_for(SpanKind.CLIENT), start,
                             {"messaging.operation.name": "connect"}, None)
                op.attrs["error.type"] = _SASL_CODES.get(outcome, str(outcome))
                self._emit(op, ts_ns, StatusCode.ERROR, f"SASL outcome {outcome}")

    def _open(self, from_client: bool, f: list[Any]) -> None:
        if from_client:
            if isinstance(f[0], str) and f[0]:
                self.client_id = f[0][:256]
            return
        props = f[9]
        if isinstance(props, dict):
            product = props.get("product")
            if isinstance(product, str):
                low = product.lower()
                self.system = "rabbitmq" if "rabbitmq" in low else "activemq" if "activemq" in low else "amqp"

    def _begin(self, from_client: bool, channel: int, f: list[Any]) -> None:
        own = self.sessions[from_client]
        other = self.sessions[not from_client]
        s: _Sess | None = None
        remote = f[0]
        if isinstance(remote, int) and remote in other and other[remote].channels[from_client] is None:
            s = other[remote]  # the answer to the peer's begin: the same session
        if s is None:  # the peer's answer came first (a capture's order): it named this channel
            s = next((x for x in other.values() if x.channels[from_client] is None and x.remote == channel), None)
        if s is None:
            if len(own) >= MAX_SESSIONS:
                raise LimitExceeded(NAME, "too_many_sessions", 0)
            self.next_sid += 1
            s = _Sess(self.next_sid)
        old = own.get(channel)
        if old is not None and old is not s:
            self._forget_session(old, "session_replaced")
        own[channel] = s
        s.channels[from_client] = channel
        if isinstance(remote, int):
            s.remote = remote

    def _sess(self, from_client: bool, channel: int) -> _Sess:
        s = self.sessions[from_client].get(channel)
        if s is None:  # joined after the begins: pair with the peer's one unpaired session, if one
            if len(self.sessions[from_client]) >= MAX_SESSIONS:
                raise LimitExceeded(NAME, "too_many_sessions", 0)
            lone = [x for x in self.sessions[not from_client].values() if x.channels[from_client] is None]
            if len(lone) == 1:
                s = lone[0]
            else:
                self.next_sid += 1
                s = _Sess(self.next_sid)
            self.sessions[from_client][channel] = s
            s.channels[from_client] = channel
        return s

    def _attach(self, from_client: bool, channel: int, f: list[Any], start: int) -> None:
        s = self._sess(from_client, channel)
        name, handle, role = f[0], f[1], f[2]
        if not isinstance(name, str) or not isinstance(handle, int) or not isinstance(role, bool):
            raise Malformed(NAME, "bad_attach", 0)
        # role: False = sender, True = receiver (of this attach's sender)
        client_sends = role is False if from_client else role is True
        addr = _address(f[6] if client_sends else f[5])
        key = (name, client_sends)  # a link's name is unique per direction (part 2 §2.6.1)
        link = s.by_name.get(key)
        if link is None or link.handles[from_client] is not None:
            if self.nlinks >= MAX_LINKS:
                raise LimitExceeded(NAME, "too_many_links", 0)
            link = _Link(key, client_sends, addr)
            if s.by_name.get(key) is None:
                self.nlinks += 1
            s.by_name[key] = link
        elif not link.address:
            link.address = addr
        link.handles[from_client] = handle
        if from_client:
            link.start_ts = start
        s.links[from_client][handle] = link

    def _detach(self, from_client: bool, channel: int, f: list[Any], start: int, ts_ns: int) -> None:
        s = self._sess(from_client, channel)
        handle = f[0]
        link = s.links[from_client].get(handle) if isinstance(handle, int) else None
        err = _error(f[2])
        if link is None:
            if err is not None:
                self._error_span("detach", "", err, start, ts_ns)
            return
        if err is not None:
            link.failed = True
            failed = self._fail_where(lambda op: op.link is link, err, ts_ns)
            if not failed and not link.transfers:
                self._error_span("attach", link.address, err, start, ts_ns)
            elif not failed:
                self._error_span("detach", link.address, err, start, ts_ns)
        del s.links[from_client][handle]
        link.handles[from_client] = None
        if link.handles[not from_client] is None:
            if s.by_name.get(link.name) is link:
                del s.by_name[link.name]
                self.nlinks -= 1
            for key in [k for k, op in self.unsettled.items() if op.link is link]:
                self.unsettled.pop(key)
                self.conn.drop("no_disposition")

    def _end(self, from_client: bool, channel: int, f: list[Any], start: int, ts_ns: int) -> None:
        s = self.sessions[from_client].pop(channel, None)
        if s is None:
            return
        s.channels[from_client] = None
        err = _error(f[0])
        if err is not None:
            links = list(s.by_name.values())
            if not self._fail_where(lambda op: op.link is not None and op.link in links, err, ts_ns) \
                    and not self._refused(links, err, start, ts_ns):
                self._error_span("end", "", err, start, ts_ns)
        if s.channels[not from_client] is None:
            self._forget_session(s, "no_disposition")

    def _close(self, from_client: bool, f: list[Any], start: int, ts_ns: int) -> None:
        err = _error(f[0])
        if err is None or self._fail_where(lambda op: True, err, ts_ns):
            return
        seen: set[int] = set()
        links = []
        for s in self.sessions[True].values():
            if s.sid not in seen:
                seen.add(s.sid)
                links.extend(s.by_name.values())
        if not self._refused(links, err, start, ts_ns):
            self._error_span("close", "", err, start, ts_ns)

    def _refused(self, links: list[_Link], err: tuple[str, str], start: int, ts_ns: int) -> int:
        """Links the client attached and the server never answered, ended by an error (RabbitMQ
        ends the session when an address does not exist): an ERROR ``attach {address}`` each."""
        n = 0
        for link in links:
            if link.handles[True] is not None and link.handles[False] is None and not link.transfers \
                    and not link.failed:
                self._error_span("attach", link.address, err, link.start_ts or start, ts_ns)
                link.failed = True  # reported: not again at the close that may follow
                n += 1
        return n

    def _forget_session(self, s: _Sess, reason: str) -> None:
        links = set(map(id, s.by_name.values()))
        self.nlinks -= len(s.by_name)
        s.by_name.clear()
        for key in [k for k, op in self.unsettled.items() if op.link is not None and id(op.link) in links]:
            self.unsettled.pop(key)
            self.conn.drop(reason)
        for side in (0, 1):
            ch = s.channels[side]
            if ch is not None and self.sessions[side].get(ch) is s:
                del self.sessions[side][ch]

    def _fail_where(self, pred: Any, err: tuple[str, str], ts_ns: int) -> int:
        keys = [k for k, op in self.unsettled.items() if pred(op)]
        for k in keys:
            op = self.unsettled.pop(k)
            op.attrs["error.type"] = err[0]
            self._emit(op, ts_ns, StatusCode.ERROR, err[1] or err[0])
        return len(keys)

    def _error_span(self, what: str, address: str, err: tuple[str, str], start: int, ts_ns: int) -> None:
        a: dict[str, Any] = {"messaging.operation.name": what, "error.type": err[0]}
        if address:
            a["messaging.destination.name"] = address
        op = _Op(f"{what} {address}" if address else what, self.conn.kind_for(SpanKind.CLIENT), start, a, None)
        self._emit(op, ts_ns, StatusCode.ERROR, err[1] or err[0])

    # -- transfers and dispositions ------------------------------------------------
    def _transfer(self, from_client: bool, channel: int, f: list[Any], mv: memoryview, p: int, total: int,
                  start: int, ts_ns: int, can_more: bool) -> _Op | None:
        handle = f[0]
        if not isinstance(handle, int):
            raise Malformed(NAME, "bad_transfer", 0, "no handle")
        s = self.sessions[from_client].get(channel)
        link = s.links[from_client].get(handle) if s is not None else None
        if link is None:
            # Joined after the attach (or the begin): the link's name and address are not known,
            # but a transfer's sender is its link's sender, so the delivery is traced all the same
            # (the message's ``to``, where it has one, names the destination).
            s = self._sess(from_client, channel)
            if self.nlinks >= MAX_LINKS:
                raise LimitExceeded(NAME, "too_many_links", 0)
            key = (f"\0joined {int(from_client)} {handle}", from_client)  # no real name starts with NUL
            link = _Link(key, from_client, "")
            self.nlinks += 1
            s.by_name[key] = link
            link.handles[from_client] = handle
            s.links[from_client][handle] = link
        op = link.cur
        # The sections first (it may raise _More): nothing is changed before they are read.
        if op is not None and not op.sized:
            body, ids, tp, sec_rem, sized, carry = 0, {}, None, 0, False, b""  # lost its place: not read
        else:
            body, ids, tp, sec_rem, sized, carry = _scan(
                mv, p, len(mv), op.sec_rem if op is not None else 0, can_more, total == len(mv),
                op.carry if op is not None else b"")
        if op is None:
            did = f[1]
            if not isinstance(did, int):
                raise Malformed(NAME, "bad_transfer", 0, "the first transfer of a delivery has no delivery-id")
            send = from_client
            opname = "publish" if send else "receive"
            a: dict[str, Any] = {"messaging.operation.name": opname,
                                 "messaging.operation.type": "send" if send else "receive",
                                 "messaging.message.body.size": 0}
            if link.address:
                a["messaging.destination.name"] = link.address
            tag = f[2]
            if isinstance(tag, bytes):
                a["messaging.amqp.delivery_tag"] = tag.hex()
            kind = SpanKind.PRODUCER if send else SpanKind.CONSUMER
            op = _Op(f"{opname} {link.address}" if link.address else opname, self.conn.kind_for(kind, kind), start, a,
                     link)
            op.attrs["_key"] = (s.sid, from_client, did)
            op.attrs["_settled"] = f[4] is True
            link.cur = op
            link.transfers += 1
        elif f[4] is True:
            op.attrs["_settled"] = True
        op.attrs["_more"] = f[5] is True
        if f[9] is True:  # aborted: the delivery never completes
            link.cur = None
            self.conn.drop("aborted")
            return None
        _apply(op, body, ids, tp, sec_rem, sized, carry)
        if total > len(mv):  # the rest of this frame is stepped over by feed: sections continue there
            return op
        self._frame_done(op, ts_ns)
        return None

    def _tail(self, d: _Dir, buf: LargeBuffer) -> bool:
        """Step over the ``d.skip`` bytes of a frame's tail as they arrive, releasing them. In a
        transfer's tail, where a section ends before the frame does, the next section's header
        is read there (a look of FIRST_LOOK bytes, doubling for a properties section, to MAX_HEAD).
        True when the tail is done."""
        while d.skip:
            op = d.skip_op
            if op is None or not op.sized or op.sec_rem >= d.skip:
                take = min(d.skip, len(buf))
                if take:
                    buf.release(take)
                    d.skip -= take
                    if op is not None:
                        self._skipped(op, take)
                return not d.skip
            if op.sec_rem:  # to the end of the section in progress
                take = min(op.sec_rem, len(buf))
                if not take:
                    return False
                buf.release(take)
                d.skip -= take
                op.sec_rem -= take
                continue
            look = min(d.skip, d.need or FIRST_LOOK)
            if len(buf) < look:
                buf.want = look
                return False
            bound = min(d.skip, MAX_HEAD)
            try:
                got = _scan(buf.view_at(0, look), 0, look, 0, look < bound, look == d.skip)
            except _More as more:
                d.need = min(bound, max(more.need, 2 * look))
                continue
            d.need = 0
            _apply(op, *got)  # its sec_rem counts from the look's end
            buf.release(look)
            d.skip -= look
        return True

    def _skipped(self, op: _Op, n: int) -> None:
        """``n`` bytes of a transfer frame's tail went by unseen: the section in progress takes
        them; any beyond it held section headers that were not seen."""
        if op.sec_rem >= n:
            op.sec_rem -= n
        else:
            op.sec_rem = 0
            op.sized = False

    def _frame_done(self, op: _Op, ts_ns: int) -> None:
        """A transfer frame ended: the delivery is whole when it said ``more=false``."""
        a = op.attrs
        if a.get("_more"):
            return
        link = op.link
        if link is not None and link.cur is op:
            link.cur = None
        if op.sec_rem or op.carry:
            op.sized = False
        if not op.sized:
            a.pop("messaging.message.body.size", None)
        if a.get("_settled"):
            self._emit(op, ts_ns)
        else:
            self.unsettled[a["_key"]] = op

    def _disposition(self, from_client: bool, channel: int, f: list[Any], ts_ns: int) -> None:
        s = self._sess(from_client, channel)
        role, first, last, settled, state = f[0], f[1], f[2], f[3], f[4]
        if not isinstance(first, int) or not isinstance(role, bool):
            raise Malformed(NAME, "bad_disposition", 0)
        if not isinstance(last, int) or last < first:
            last = first
        # role True: the receiver speaks of the deliveries its peer sent; False: the sender of its own.
        sender = (not from_client) if role else from_client
        outcome = _code(state[0]) if isinstance(state, tuple) else None
        if outcome == RECEIVED or (outcome is None and settled is not True):
            return  # no outcome yet
        if last - first > len(self.unsettled):
            ids = [k[2] for k in self.unsettled if k[0] == s.sid and k[1] == sender and first <= k[2] <= last]
        else:
            ids = range(first, last + 1)
        for did in ids:
            op = self.unsettled.pop((s.sid, sender, did), None)
            if op is None:
                continue
            if outcome in (REJECTED, RELEASED, MODIFIED):
                name = {REJECTED: "rejected", RELEASED: "released", MODIFIED: "modified"}[outcome]
                err = _error(state[1][0]) if outcome == REJECTED and isinstance(state[1], list) and state[1] \
                    else None
                op.attrs["error.type"] = err[0] if err else name
                op.attrs["messaging.amqp.outcome"] = name
                self._emit(op, ts_ns, StatusCode.ERROR, (err[1] or err[0]) if err else f"the delivery was {name}")
            else:
                if outcome == ACCEPTED:
                    op.attrs["messaging.amqp.outcome"] = "accepted"
                self._emit(op, ts_ns)

    def _emit(self, op: _Op, end_ts: int, status: StatusCode = StatusCode.UNSET, msg: str = "") -> None:
        a = op.attrs
        for k in ("_key", "_settled", "_more"):
            a.pop(k, None)
        a["messaging.system"] = self.system
        if self.client_id:
            a["messaging.client.id"] = self.client_id
        conn = self.conn
        conn.emit(conn.span(op.name, op.kind, op.start_ts, end_ts, a, traceparent=op.traceparent,
                            status_code=status, status_message=msg))

    # -- gaps and the end ----------------------------------------------------------
    def skip_gap(self, from_client: bool, nbytes: int, ts_ns: int) -> bool:
        d = self.dirs[from_client]
        if d.skip >= nbytes:
            d.skip -= nbytes
            if d.skip_op is not None:
                self._skipped(d.skip_op, nbytes)
            return True
        return False

    def gap(self, from_client: bool, ts_ns: int) -> None:
        d = self.dirs[from_client]
        d.skip, d.skip_op = 0, None
        for side in self.sessions[from_client].values():
            for link in side.links[from_client].values():
                if link.cur is not None:
                    link.cur = None
                    self.conn.drop("incomplete_message")

    def close(self, ts_ns: int, reset: bool = False) -> None:
        for fc in (True, False):
            self._cut_frame(fc, ts_ns)
        seen: set[int] = set()
        for side in (0, 1):
            for s in self.sessions[side].values():
                if s.sid in seen:
                    continue
                seen.add(s.sid)
                for link in s.by_name.values():
                    if link.cur is not None:  # a delivery whose frames were still coming
                        op, link.cur = link.cur, None
                        if op.attrs.get("_key") not in self.unsettled:
                            self._cut(op)
        # An unsettled transfer was sent as far as the wire shows: a span marked incomplete.
        for op in self.unsettled.values():
            self._cut(op)
        self.unsettled.clear()

    def _cut_frame(self, from_client: bool, ts_ns: int) -> None:
        """A transfer frame the end of the connection cut before ``feed``'s first look was
        in: its performative is read from what came (best effort: anything it cannot read is
        left to the stage's ``incomplete_message``), so its delivery is cut short as base.py's
        rule says, not lost."""
        buf = self.conn.client_buf if from_client else self.conn.server_buf
        n = len(buf)
        if self.dirs[from_client].skip or n < 8 or buf.u8_at(0) == 0x41:
            return
        size, doff, ftype, channel = _FRAME.unpack_from(buf.view_at(0, 8))
        doff *= 4
        if ftype != 0 or doff < 8 or not doff < n < size:
            return
        try:
            self._frame(from_client, ftype, channel, buf.view_at(doff, n - doff), size - doff, buf.ts_at(0), ts_ns)
        except (Malformed, LimitExceeded, _More, _Short):
            return
        buf.release(n)  # read: no longer an incomplete message

    def _cut(self, op: _Op) -> None:
        """A delivery the end of the connection left unfinished or unsettled: base.py's rule."""
        for k in ("_key", "_settled", "_more"):
            op.attrs.pop(k, None)
        op.attrs["messaging.system"] = self.system
        if self.client_id:
            op.attrs["messaging.client.id"] = self.client_id
        self.cut_short(self.conn.span(op.name, op.kind, op.start_ts, op.start_ts, op.attrs, op.traceparent))
