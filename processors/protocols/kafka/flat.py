"""Fast path: a complete request held in one contiguous view, parsed with offsets.

The streaming walkers (produce.py, fetch.py, records.py run by session.Cursor) handle
any split and any size with bounded memory, but pay a generator step and a reader
per field. Most requests are small and arrive whole, so when the complete message is
in one chunk (a view, no copy) -- or is small enough to gather into the buffer's
reusable scratch (a bounded, deliberate copy, as OBI's scratch for straddling
fields) -- this module parses it straight from a memoryview with precompiled
``struct`` unpackers. Same results as the walkers (tests run both); any
inconsistency raises ``Malformed``.
"""

from __future__ import annotations

import struct

from processors.protocols.errors import Malformed

from . import apis
from .codec import NAME, TOPIC_RE
from .records import BATCH_HEADER, BATCH_PREFIX, MAX_HEADERS_SCAN, MAX_TRACEPARENT
from .state import Msg, TopicData, resp_topic

#: Messages up to this size spanning several chunks are gathered into the buffer's scratch
#: (so a connection direction's scratch never grows past it for this).
MAX_GATHER = 16 * 1024

_HDR = struct.Struct(">ihhih")  # size, api key, version, correlation id, client id length
_I16 = struct.Struct(">h").unpack_from
_I32 = struct.Struct(">i").unpack_from
_PART = struct.Struct(">ii").unpack_from  # partition index, records length (non-flexible)
#: The 61-byte v2 batch header, unpacking only length, magic, attributes and recordsCount.
_V2HEADER = struct.Struct(">8xi4xb4xh34xi").unpack_from
_PREFIX = struct.Struct(">8xi4xb").unpack_from  # length, magic


def _bad(reason: str, pos: int, detail: str = "") -> Malformed:
    return Malformed(NAME, reason, pos, detail)


def _uvarint(mv: memoryview, pos: int) -> tuple[int, int]:
    b = mv[pos]
    if b < 0x80:
        return b, pos + 1
    result = b & 0x7F
    shift = 7
    for _ in range(9):
        pos += 1
        b = mv[pos]
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, pos + 1
        shift += 7
    raise _bad("bad_varint", pos)


def _varint(mv: memoryview, pos: int) -> tuple[int, int]:
    b = mv[pos]
    if b < 0x80:
        return (b >> 1) ^ -(b & 1), pos + 1
    v, pos = _uvarint(mv, pos)
    return (v >> 1) ^ -(v & 1), pos


def _tags(mv: memoryview, pos: int) -> int:
    if mv[pos] == 0:
        return pos + 1
    n, pos = _uvarint(mv, pos)
    if n > 64:
        raise _bad("bad_length", pos, f"{n} tagged fields")
    for _ in range(n):
        _, pos = _uvarint(mv, pos)
        size, pos = _uvarint(mv, pos)
        pos += size
    if pos > len(mv):
        raise _bad("truncated", pos)
    return pos


def _array(mv: memoryview, pos: int, flex: bool) -> tuple[int, int]:
    if flex:
        n, pos = _uvarint(mv, pos)
        n -= 1
    else:
        n = _I32(mv, pos)[0]
        pos += 4
    if n < -1 or n > len(mv) - pos:
        raise _bad("bad_length", pos, f"array length {n}")
    return n, pos


def _skip_str(mv: memoryview, pos: int, flex: bool) -> int:
    if flex:
        n, pos = _uvarint(mv, pos)
        n -= 1
    else:
        n = _I16(mv, pos)[0]
        pos += 2
    if n < -1:
        raise _bad("bad_length", pos, f"string length {n}")
    if n > 0:
        pos += n
        if pos > len(mv):
            raise _bad("truncated", pos)
    return pos


def _topic(mv: memoryview, pos: int, flex: bool, ids: bool, m: Msg) -> tuple[TopicData, int]:
    """The topic (name, or id from v13/Fetch v13) at ``pos``, merged by key into ``m.topics``."""
    (name, tid), pos = _topic_key(mv, pos, flex, ids)
    key: str | bytes = tid if ids else name  # type: ignore[assignment]
    t = m.by_key.get(key)
    if t is None:
        t = TopicData(name, tid)
        m.by_key[key] = t
        m.topics.append(t)
    return t, pos


def request_header(mv: memoryview) -> tuple[Msg, int]:
    """The header of a complete request view; returns the body offset."""
    _, key, ver, corr, cid = _HDR.unpack_from(mv, 0)
    if not apis.known(key, ver):
        raise _bad("unknown_api", 4, f"api {key} v{ver}")
    if corr < 0 or cid < -1:
        raise _bad("bad_header", 8)
    flex = apis.flexible(key, ver)
    m = Msg(key, ver, flex, corr)
    pos = 14
    if cid > 0:
        pos += cid
        if pos > len(mv):
            raise _bad("truncated", 14)
        m.client_id = str(mv[14:pos], "ascii", "replace")  # small, kept as an attribute
    if flex:
        pos = _tags(mv, pos)
    return m, pos


def records(mv: memoryview, pos: int, n: int, m: Msg, t: TopicData) -> None:
    """As records.walk_records, over ``mv[pos:pos+n]``."""
    left = n
    first = True
    while left > 0:
        if left < BATCH_PREFIX:
            return
        if m.scan_left <= 0:
            t.records_unknown = True
            m.truncated = True
            return
        if left >= BATCH_HEADER:
            length, magic, attrs, count = _V2HEADER(mv, pos)
        else:
            length, magic = _PREFIX(mv, pos)
            attrs = count = 0
        total = 12 + length
        if length < BATCH_PREFIX - 12 or magic > 2 or magic < 0:
            raise _bad("bad_record", pos, f"batch length {length} magic {magic}")
        if total > left or (magic == 2 and left < BATCH_HEADER):
            return  # partial trailing batch
        if magic == 2:
            if count < 0:
                raise _bad("bad_record", pos, f"records count {count}")
            t.records += count
            if first and t.traceparent is None and count > 0 and (attrs & 7) == 0 and m.want_tp:
                _first_record(mv, pos + BATCH_HEADER, total - BATCH_HEADER, t)
        else:
            t.records += 1
        m.scan_left -= total
        pos += total
        left -= total
        first = False


def _first_record(mv: memoryview, pos: int, room: int, t: TopicData) -> None:
    start = pos
    # length, attributes, timestampDelta, offsetDelta, keyLength: one byte each when small
    b = mv[pos]
    if b < 0x80:
        length = (b >> 1) ^ -(b & 1)
        pos += 1
    else:
        length, pos = _varint(mv, pos)
    end = pos + length
    if length < 0 or end - start > room:
        raise _bad("bad_record", pos, "record length")
    pos += 1  # attributes
    for _ in range(2):  # timestamp delta, offset delta
        if mv[pos] < 0x80:
            pos += 1
        else:
            _, pos = _varint(mv, pos)
    b = mv[pos]
    if b < 0x80:
        klen = (b >> 1) ^ -(b & 1)
        pos += 1
    else:
        klen, pos = _varint(mv, pos)
    if klen > 0:
        pos += klen
    elif klen < -1:
        raise _bad("bad_record", pos, "key length")
    if pos >= end:
        raise _bad("bad_record", pos, "key length")
    vlen, pos = _varint(mv, pos)
    if vlen > 0:
        pos += vlen
    elif vlen < -1:
        raise _bad("bad_record", pos, "value length")
    if pos > end:
        raise _bad("bad_record", pos, "value length")
    if end - pos > MAX_HEADERS_SCAN or pos == end:
        return
    n, pos = _varint(mv, pos)
    if n < 0 or n > end - pos:
        raise _bad("bad_record", pos, f"{n} record headers")
    for _ in range(n):
        kl, pos = _varint(mv, pos)
        if kl < 0:
            raise _bad("bad_record", pos, "header key length")
        kpos = pos
        pos += kl
        vl, pos = _varint(mv, pos)
        if vl < -1:
            raise _bad("bad_record", pos, "header value length")
        if kl == 11 and 0 < vl <= MAX_TRACEPARENT and mv[kpos:kpos + 11] == b"traceparent":
            if pos + vl > end:
                raise _bad("bad_record", pos, "header value length")
            t.traceparent = mv[pos:pos + vl].tobytes()  # deliberate small copy: the span's parent
            return
        if vl > 0:
            pos += vl
        if pos > end:
            raise _bad("bad_record", pos, "header length")


def produce_request(mv: memoryview, pos: int, m: Msg) -> None:
    flex = m.flex
    if m.version >= 3:
        pos = _skip_str(mv, pos, flex)
    m.acks = _I16(mv, pos)[0]
    pos += 6
    ids = m.version >= 13
    n, pos = _array(mv, pos, flex)
    end = len(mv)
    for _ in range(n):
        t, pos = _topic(mv, pos, flex, ids, m)
        np, pos = _array(mv, pos, flex)
        parts = t.partitions
        for _ in range(np):
            if flex:
                idx = _I32(mv, pos)[0]
                rlen, pos = _uvarint(mv, pos + 4)
                rlen -= 1
            else:
                idx, rlen = _PART(mv, pos)
                pos += 8
            if idx < 0 or rlen < -1:
                raise _bad("bad_field", pos, f"partition {idx} records {rlen}")
            parts.append(idx)
            if rlen > 0:
                if pos + rlen > end:
                    raise _bad("bad_length", pos, f"records of {rlen} past message end")
                records(mv, pos, rlen, m, t)
                pos += rlen
            if flex:
                pos = _tags(mv, pos)
        if flex:
            pos = _tags(mv, pos)


_FETCH_PART: dict[int, struct.Struct] = {}


def _fetch_part(v: int) -> struct.Struct:
    s = _FETCH_PART.get(v)
    if s is None:
        fmt = ">i" + ("i" if v >= 9 else "") + "q" + ("i" if v >= 12 else "") + ("q" if v >= 5 else "") + "i"
        s = _FETCH_PART[v] = struct.Struct(fmt)
    return s


_FETCH_N: dict[tuple[int, int], struct.Struct] = {}


def _fetch_parts(v: int, np: int) -> struct.Struct:
    """All ``np`` fixed-size partitions of a non-flexible Fetch topic in one unpack."""
    s = _FETCH_N.get((v, np))
    if s is None:
        s = struct.Struct(">" + _fetch_part(v).format[1:] * np)
        if len(_FETCH_N) < 1024:
            _FETCH_N[(v, np)] = s
    return s


def fetch_request(mv: memoryview, pos: int, m: Msg) -> None:
    v = m.version
    flex = m.flex
    pos += (4 if v <= 14 else 0) + 8 + (4 if v >= 3 else 0) + (1 if v >= 4 else 0) + (8 if v >= 7 else 0)
    ids = v >= 13
    st = _fetch_part(v)
    unpack = st.unpack_from
    size = st.size
    k = len(st.format) - 1  # fields per partition
    off_i = 2 if v >= 9 else 1
    n, pos = _array(mv, pos, flex)
    topics = m.topics
    append = topics.append
    end = len(mv)
    seen: set[str | bytes] = set()
    for _ in range(n):
        # Topic key, inlined (the hot loop of a poll).
        if ids:
            e = pos + 16
            if e > end:
                raise _bad("truncated", pos)
            name = None
            tid: bytes | None = mv[pos:e].tobytes()  # 16-byte id, kept
            key: str | bytes = tid
        else:
            if flex:
                ln, pos = _uvarint(mv, pos)
                ln -= 1
            else:
                ln = _I16(mv, pos)[0]
                pos += 2
            e = pos + ln
            if ln < 1 or e > end:
                raise _bad("bad_topic", pos, f"topic name length {ln}")
            nv = mv[pos:e]
            if TOPIC_RE.fullmatch(nv) is None:
                raise _bad("bad_topic", pos, "topic name not [a-zA-Z0-9._-]{1,249}")
            key = name = str(nv, "ascii")
            tid = None
        seen.add(key)
        if flex:
            np, pos = _uvarint(mv, e)
            np -= 1
        else:
            np = _I32(mv, e)[0]
            pos = e + 4
        if np < -1 or np > end - pos:
            raise _bad("bad_length", pos, f"array length {np}")
        if not flex:
            if np <= 0:
                append(TopicData(name, tid))
                continue
            e = pos + np * size
            if e > end:
                raise _bad("truncated", pos)
            vals = _fetch_parts(v, np).unpack_from(mv, pos)
            parts = list(vals[0::k])
            if min(parts) < 0:
                raise _bad("bad_field", pos, "negative partition")
            append(TopicData(name, tid, parts, dict(zip(parts, vals[off_i::k], strict=True))))
            pos = e
            continue
        parts = []
        offsets = {}
        for _ in range(np):
            f = unpack(mv, pos)
            pos += size
            p = f[0]
            if p < 0:
                raise _bad("bad_field", pos, f"partition {p}")
            parts.append(p)
            offsets[p] = f[off_i]
            pos = pos + 1 if mv[pos] == 0 else _tags(mv, pos)
        append(TopicData(name, tid, parts, offsets))
        pos = pos + 1 if mv[pos] == 0 else _tags(mv, pos)
    # Duplicate topics in one request (not sent by real clients) merge as the walker does.
    if len(seen) != len(topics):
        merged: dict[str | bytes, TopicData] = {}
        for t in topics:
            first = merged.setdefault(t.key, t)
            if first is not t:
                first.partitions += t.partitions
                first.offsets.update(t.offsets)
        m.topics = list(merged.values())


def _topic_key(mv: memoryview, pos: int, flex: bool, ids: bool) -> tuple[tuple[str | None, bytes | None], int]:
    if ids:
        e = pos + 16
        if e > len(mv):
            raise _bad("truncated", pos)
        return (None, mv[pos:e].tobytes()), e
    if flex:
        n, pos = _uvarint(mv, pos)
        n -= 1
    else:
        n = _I16(mv, pos)[0]
        pos += 2
    e = pos + n
    if n < 1 or e > len(mv):
        raise _bad("bad_topic", pos, f"topic name length {n}")
    v = mv[pos:e]
    if TOPIC_RE.fullmatch(v) is None:
        raise _bad("bad_topic", pos, "topic name not [a-zA-Z0-9._-]{1,249}")
    return (str(v, "ascii"), None), e


_PRODUCE_PART = struct.Struct(">ihq").unpack_from  # index, error code, base offset
_FETCH_PART_HEAD = struct.Struct(">ih").unpack_from  # index, error code


def produce_response(mv: memoryview, pos: int, m: Msg, req: Msg) -> None:
    flex = m.flex
    v = m.version
    ids = v >= 13
    n, pos = _array(mv, pos, flex)
    for _ in range(n):
        key, pos = _topic_key(mv, pos, flex, ids)
        t = resp_topic(req, key)
        np, pos = _array(mv, pos, flex)
        for _ in range(np):
            idx, err, base = _PRODUCE_PART(mv, pos)
            pos += 14 + (8 if v >= 2 else 0) + (8 if v >= 5 else 0)
            if v >= 8:
                ne, pos = _array(mv, pos, flex)
                for _ in range(ne):
                    pos = _skip_str(mv, pos + 4, flex)
                    if flex:
                        pos = _tags(mv, pos)
                pos = _skip_str(mv, pos, flex)
            if flex:
                pos = _tags(mv, pos)
            if idx not in t.partitions:
                t.partitions.append(idx)
            t.offsets[idx] = base
            if err and not t.error:
                t.error = err
                t.error_partition = idx
        if flex:
            pos = _tags(mv, pos)


def fetch_response(mv: memoryview, pos: int, m: Msg, req: Msg) -> None:
    flex = m.flex
    v = m.version
    ids = v >= 13
    if v >= 1:
        pos += 4
    if v >= 7:
        req.error = _I16(mv, pos)[0]
        pos += 6
    fixed = 8 + (8 if v >= 4 else 0) + (8 if v >= 5 else 0)
    end = len(mv)
    n, pos = _array(mv, pos, flex)
    for _ in range(n):
        key, pos = _topic_key(mv, pos, flex, ids)
        t = resp_topic(req, key)
        np, pos = _array(mv, pos, flex)
        for _ in range(np):
            idx, err = _FETCH_PART_HEAD(mv, pos)
            pos += 6 + fixed
            if v >= 4:
                na, pos = _array(mv, pos, flex)
                if na > 0:
                    if flex:
                        for _ in range(na):
                            pos = _tags(mv, pos + 16)
                    else:
                        pos += 16 * na
            if v >= 11:
                pos += 4
            if flex:
                rlen, pos = _uvarint(mv, pos)
                rlen -= 1
            else:
                rlen = _I32(mv, pos)[0]
                pos += 4
            if rlen < -1 or pos + rlen > end:
                raise _bad("bad_length", pos, f"records of {rlen}")
            if idx not in t.partitions:
                t.partitions.append(idx)
            if err and not t.error:
                t.error = err
                t.error_partition = idx
            if rlen > 0:
                before = t.records
                records(mv, pos, rlen, m, t)
                if t.records > before:
                    t.data_partitions.append(idx)
                pos += rlen
            if flex:
                pos = _tags(mv, pos)
        if flex:
            pos = _tags(mv, pos)


def parse_response(mv: memoryview, m: Msg, req: Msg) -> None:
    """A complete Produce or Fetch response view, merged into its request ``req``."""
    try:
        pos = 8
        if apis.response_header_flexible(req.api_key, req.version):
            pos = _tags(mv, pos)
        if req.api_key == apis.PRODUCE:
            produce_response(mv, pos, m, req)
        else:
            fetch_response(mv, pos, m, req)
    except (IndexError, struct.error) as e:
        raise Malformed(NAME, "truncated", -1, str(e))


def parse_request(mv: memoryview, scan_bytes: int) -> Msg:
    """Header and, for Produce/Fetch, every topic and partition of a complete request view."""
    try:
        m, pos = request_header(mv)
        m.scan_left = scan_bytes
        if m.api_key == apis.PRODUCE:
            produce_request(mv, pos, m)
        elif m.api_key == apis.FETCH:
            fetch_request(mv, pos, m)
    except (IndexError, struct.error) as e:
        raise Malformed(NAME, "truncated", -1, str(e))
    return m
