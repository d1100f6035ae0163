"""Fast path: a complete request held in one contiguous view, parsed with offsets.

The streaming walkers (produce.py, fetch.py, records.py run by session.Cursor) handle
any split and any size with bounded memory, but pay a generator step and a reader
per field. Most requests are small and arrive whole, so when the complete message is
in one chunk (a view, no copy) -- or is small enough to gather into the buffer's
reusable scratch (a bounded, deliberate copy, as OBI's scratch for straddling
fields) -- this module parses it straight from a memoryview with precompiled
``struct`` unpackers. Same results as the walkers (tests run both); any
inconsistency raises ``Malformed``.

What makes it fast is doing per topic a few Python steps, whatever its size: a Fetch
topic's fixed-size partitions are one unpack (kept as that tuple, see
state.TopicData), a produce partition with one v2 batch is one unpack, the first
record is walked only when a ``traceparent`` key's bytes occur in it, and validated
topic names / client ids are cached (bounded). tests/test_kafka_fast.py holds each
shortcut to the walkers' result; ``python -m bench kafka`` measures it.

Requests go first to the optional C accelerator (_flat.c), which does this module's
request walk step for step (for APIs other than Produce and Fetch, the header) and
returns None for anything it does not take (any input this walk rejects, a repeated
topic, an unknown API key); then
``parse_request_py`` -- the reference -- runs. The tests hold the two to identical
results; ``WIRESPAN_PURE_PYTHON=1`` turns C off.
"""

from __future__ import annotations

import re
import struct
from typing import Any

from processors.protocols.errors import Malformed
from service import speedups

from . import apis
from .apis import APIS
from .codec import NAME, TOPIC_RE
from .records import BATCH_HEADER, BATCH_PREFIX, MAX_HEADERS_SCAN, MAX_TRACEPARENT
from .state import ZERO_UUID, FastTopic, FastTopic3, Msg, TopicData, resp_topic

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
#: A non-flexible produce partition's index and records length, then _V2HEADER's fields.
_PART_HEAD = struct.Struct(">ii8xi4xb4xh34xi").unpack_from


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


# -- topic names ----------------------------------------------------------------
#: Validated topic names, bytes -> str. Clients repeat the same few topics in every
#: request for months, so a hit skips the pattern check and the decode. Bounded:
#: cleared when full (a cluster with more topics than this just decodes more).
MAX_NAME_CACHE = 4096
_NAMES: dict[bytes, str] = {}
#: Per name length n (1..249, Topic.MAX_NAME_LENGTH): unpack the name's n bytes, and
#: the name plus the int32 that follows it (a non-flexible array length) in one call.
_NAME_S = [None] + [struct.Struct(f">{n}s").unpack_from for n in range(1, 250)]
_NAME_I = [None] + [struct.Struct(f">{n}si").unpack_from for n in range(1, 250)]
_UUID_S = struct.Struct(">16s").unpack_from
_UUID_I = struct.Struct(">16si").unpack_from
#: Client ids (decoded once per distinct id, like names); only short ones are cached, so
#: the cache holds at most MAX_NAME_CACHE x 128 bytes whatever clients send.
MAX_CACHED_CLIENT_ID = 128
_CLIENT_IDS: dict[int, Any] = {}  # client id length -> unpacker, at most 256 lengths
_CLIENT_ID_CACHE: dict[bytes, str] = {}


def _name(nb: bytes, pos: int) -> str:
    """Validate and decode a topic name the cache does not hold (a small copy, kept)."""
    if TOPIC_RE.fullmatch(nb) is None:
        raise _bad("bad_topic", pos, "topic name not [a-zA-Z0-9._-]{1,249}")
    name = str(nb, "ascii")
    if len(_NAMES) >= MAX_NAME_CACHE:
        _NAMES.clear()
    _NAMES[nb] = name
    return name


def _client_id(mv: memoryview, n: int) -> str:
    unpack = _CLIENT_IDS.get(n)
    if unpack is None:
        unpack = struct.Struct(f">14x{n}s").unpack_from
        if len(_CLIENT_IDS) < 256:
            _CLIENT_IDS[n] = unpack
    raw = unpack(mv, 0)[0]  # small, kept as an attribute
    cid = _CLIENT_ID_CACHE.get(raw)
    if cid is None:
        cid = str(raw, "ascii", "replace")
        if n <= MAX_CACHED_CLIENT_ID:
            if len(_CLIENT_ID_CACHE) >= MAX_NAME_CACHE:
                _CLIENT_ID_CACHE.clear()
            _CLIENT_ID_CACHE[raw] = cid
    return cid


def request_header(mv: memoryview) -> tuple[Msg, int]:
    """The header of a complete request view; returns the body offset."""
    _, key, ver, corr, cid = _HDR.unpack_from(mv, 0)
    a = APIS.get(key)
    if a is None or ver < 0 or ver > a[1]:
        raise _bad("unknown_api", 4, f"api {key} v{ver}")
    if corr < 0 or cid < -1:
        raise _bad("bad_header", 8)
    flex = ver >= a[2]
    m = Msg(key, ver, flex, corr)
    pos = 14
    if cid > 0:
        pos += cid
        if pos > len(mv):
            raise _bad("truncated", 14)
        m.client_id = _client_id(mv, cid)
    if flex:
        pos = pos + 1 if mv[pos] == 0 else _tags(mv, pos)
    return m, pos


# -- record data ----------------------------------------------------------------
#: The first record's header key as it appears on the wire: varint length 11 (zigzag 22).
_TP_KEY = re.compile(rb"\x16traceparent").search
_B3 = struct.Struct(">3B").unpack_from


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
                _traceparent(mv, pos + BATCH_HEADER, pos + total, t)
        else:
            t.records += 1
        m.scan_left -= total
        pos += total
        left -= total
        first = False


def _traceparent(mv: memoryview, pos: int, end: int, t: TopicData) -> None:
    """The first record's ``traceparent`` header, if any, from the record at ``pos``.

    Its header keys lie inside the record's bytes, so when the key's wire form does
    not occur there (one C-speed search of the view, no copy) there is none to find.
    When it does occur -- maybe inside a key or value -- the precise walk decides.
    Varints of one byte (two for lengths) are decoded inline: a record's small fields
    almost always fit.
    """
    b = mv[pos]
    if b < 0x80:
        length = (b >> 1) ^ -(b & 1)
        pos += 1
    elif mv[pos + 1] < 0x80:
        u = (b & 0x7F) | mv[pos + 1] << 7
        length = (u >> 1) ^ -(u & 1)
        pos += 2
    else:
        length, pos = _varint(mv, pos)
    if length < 0 or pos + length > end:
        raise _bad("bad_record", pos, "record length")
    end = pos + length
    hit = _TP_KEY(mv, pos, end)
    if hit is None:
        return
    # attributes, then timestamp delta, offset delta and key length: one byte each, mostly
    ts, od, b = _B3(mv, pos + 1) if length >= 4 else (0x80, 0, 0)
    if ts < 0x80 and od < 0x80 and b < 0x80:
        klen = (b >> 1) ^ -(b & 1)
        pos += 4
    else:
        pos += 1
        if mv[pos] < 0x80:  # timestamp delta
            pos += 1
        else:
            _, pos = _varint(mv, pos)
        if mv[pos] < 0x80:  # offset delta
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
    b = mv[pos]
    if b < 0x80:
        vlen = (b >> 1) ^ -(b & 1)
        pos += 1
    elif mv[pos + 1] < 0x80:
        u = (b & 0x7F) | mv[pos + 1] << 7
        vlen = (u >> 1) ^ -(u & 1)
        pos += 2
    else:
        vlen, pos = _varint(mv, pos)
    if vlen > 0:
        pos += vlen
    elif vlen < -1:
        raise _bad("bad_record", pos, "value length")
    if pos >= end or end - pos > MAX_HEADERS_SCAN:
        if pos > end:
            raise _bad("bad_record", pos, "value length")
        return
    b = mv[pos]
    if b < 0x80:
        n = (b >> 1) ^ -(b & 1)
        pos += 1
        if n > 0 and pos == hit.start():
            # The search's hit is the first header's key (length 11, "traceparent").
            b = mv[pos + 12]
            vl = (b >> 1) ^ -(b & 1) if b < 0x80 else -2
            if 0 < vl <= MAX_TRACEPARENT:
                pos += 13
                if pos + vl > end:
                    raise _bad("bad_record", pos, "header value length")
                t.traceparent = mv[pos:pos + vl].tobytes()  # deliberate small copy: the span's parent
                return
    else:
        n, pos = _varint(mv, pos)
    if n < 0 or n > end - pos:
        raise _bad("bad_record", pos, f"{n} record headers")
    while n:
        n -= 1
        b = mv[pos]
        if b < 0x80:
            kl = (b >> 1) ^ -(b & 1)
            pos += 1
        else:
            kl, pos = _varint(mv, pos)
        if kl < 0:
            raise _bad("bad_record", pos, "header key length")
        kpos = pos
        pos += kl
        b = mv[pos]
        if b < 0x80:
            vl = (b >> 1) ^ -(b & 1)
            pos += 1
        else:
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


# -- Produce ----------------------------------------------------------------------
def produce_request(mv: memoryview, pos: int, m: Msg) -> None:
    flex = m.flex
    v = m.version
    if v >= 3:  # transactional id
        if flex:
            b = mv[pos]
            pos = pos + 1 if b == 0 else _skip_str(mv, pos, True)
        else:
            pos = _skip_str(mv, pos, False)
    m.acks = _I16(mv, pos)[0]
    pos += 6
    ids = v >= 13
    end = len(mv)
    n, pos = _array(mv, pos, flex)  # the topics array: once per request
    names = _NAMES
    name_s = _NAME_S
    name_i = _NAME_I
    uuid_s = _UUID_S
    uuid_i = _UUID_I
    topics = m.topics
    by: dict[str | bytes, TopicData] = {}
    want_tp = m.want_tp
    part = _PART
    part_head = _PART_HEAD
    v2head = _V2HEADER
    scan = m.scan_left
    i32 = _I32
    bh = BATCH_HEADER
    for _ in range(n):
        # Topic key and partition count.
        if ids:
            if flex:
                key, = uuid_s(mv, pos)  # 16-byte id, kept
                pos += 16
                b = mv[pos]
                if b < 0x80:
                    np = b - 1
                    pos += 1
                else:
                    np, pos = _uvarint(mv, pos)
                    np -= 1
            else:
                key, np = uuid_i(mv, pos)
                pos += 20
            t = by.get(key)
            if t is None:
                t = by[key] = FastTopic()
                t.name = None
                t.topic_id = key
                t._p = []
                t.records = 0
                t.traceparent = None
                topics.append(t)
        else:
            if flex:
                b = mv[pos]
                if b < 0x80:
                    ln = b - 1
                    pos += 1
                else:
                    ln, pos = _uvarint(mv, pos)
                    ln -= 1
                if ln < 1 or ln > 249:
                    raise _bad("bad_topic", pos, f"topic name length {ln}")
                nb, = name_s[ln](mv, pos)
                pos += ln
                b = mv[pos]
                if b < 0x80:
                    np = b - 1
                    pos += 1
                else:
                    np, pos = _uvarint(mv, pos)
                    np -= 1
            else:
                ln = mv[pos] << 8 | mv[pos + 1]
                if ln < 1 or ln > 249:
                    raise _bad("bad_topic", pos, f"topic name length {ln}")
                nb, np = name_i[ln](mv, pos + 2)
                pos += 6 + ln
            name = names.get(nb) or _name(nb, pos)
            t = by.get(name)
            if t is None:
                t = by[name] = FastTopic()
                t.name = name
                t.topic_id = None
                t._p = []
                t.records = 0
                t.traceparent = None
                topics.append(t)
        if np < -1 or np > end - pos:
            raise _bad("bad_length", pos, f"array length {np}")
        add = t._p.append  # a list: produce topics are made here, never from a tuple
        recs = 0
        need_tp = want_tp and t.traceparent is None
        for _ in range(np):
            if flex:
                idx = i32(mv, pos)[0]
                b = mv[pos + 4]
                if b < 0x80:
                    rlen = b - 1
                    pos += 5
                else:
                    b2 = mv[pos + 5]
                    if b2 < 0x80:
                        rlen = ((b & 0x7F) | b2 << 7) - 1
                        pos += 6
                    else:
                        rlen, pos = _uvarint(mv, pos + 4)
                        rlen -= 1
                if rlen >= bh and scan > 0:
                    length, magic, attrs, count = v2head(mv, pos)
                else:
                    magic = -1
            elif scan > 0 and pos + 69 <= end:  # 8 + BATCH_HEADER
                # Partition index, records length and (if it is one) the batch header at once.
                idx, rlen, length, magic, attrs, count = part_head(mv, pos)
                pos += 8
            else:
                idx, rlen = part(mv, pos)
                pos += 8
                magic = -1
            if idx < 0 or rlen < -1:
                raise _bad("bad_field", pos, f"partition {idx} records {rlen}")
            add(idx)
            if rlen > 0:
                e = pos + rlen
                if e > end:
                    raise _bad("bad_length", pos, f"records of {rlen} past message end")
                if magic == 2 and length + 12 == rlen and rlen >= bh and count >= 0:
                    # The usual produce: one v2 batch filling the partition's records.
                    recs += count
                    scan -= rlen
                    if need_tp and count and (attrs & 7) == 0:
                        _traceparent(mv, pos + bh, e, t)
                        need_tp = t.traceparent is None
                elif scan <= 0:
                    if rlen >= BATCH_PREFIX:
                        t.records_unknown = True
                        m.truncated = True
                else:
                    m.scan_left = scan
                    records(mv, pos, rlen, m, t)
                    scan = m.scan_left
                    need_tp = want_tp and t.traceparent is None
                pos = e
            if flex:
                pos = pos + 1 if mv[pos] == 0 else _tags(mv, pos)
        if recs:
            t.records += recs
        if flex:
            pos = pos + 1 if mv[pos] == 0 else _tags(mv, pos)
    m.scan_left = scan


# -- Fetch ------------------------------------------------------------------------
def _fetch_fmt(v: int, flex: bool) -> str:
    """One Fetch request partition: partition index and fetch offset kept, the rest
    padding; the tagged-field count byte (flexible versions) kept to check it is 0."""
    return ("i" + ("4x" if v >= 9 else "") + "q" + ("4x" if v >= 12 else "") + ("8x" if v >= 5 else "")
            + "4x" + ("B" if flex else ""))


#: Partitions per topic up to which one ``struct`` unpacks them all (and the check of
#: the values is generated code); a topic with more is walked partition by partition,
#: so no unpacker (and no cache entry) grows with what a message declares.
MAX_LAYOUT_PARTITIONS = 64
_FETCH_N: dict[tuple[int, bool], dict[int, tuple[Any, int, Any]]] = {}


def _fetch_layout(v: int, flex: bool, np: int) -> tuple[Any, int, Any]:
    """(unpack, size, check) for ``np`` (<= MAX_LAYOUT_PARTITIONS) fixed-size partitions.

    ``check(raw)`` is < 0 when a partition index is negative, > 0 (flexible versions)
    when some partition has tagged fields -- then the partitions are not fixed-size
    from there and are walked one by one. Generated (like namedtuple does) as ORs of
    the values: one call instead of a slice and ``min``.
    """
    st = struct.Struct(">" + _fetch_fmt(v, flex) * np)
    k = 3 if flex else 2
    ids = " | ".join(f"r[{i * k}]" for i in range(np))
    if flex:
        tags = " | ".join(f"r[{i * k + 2}]" for i in range(np))
        check = eval(f"lambda r: -1 if ({ids}) < 0 else ({tags})")  # our own literal code
    else:
        check = eval(f"lambda r: {ids}")  # our own literal code
    entry = (st.unpack_from, st.size, check)
    _FETCH_N.setdefault((v, flex), {})[np] = entry  # at most MAX_LAYOUT_PARTITIONS per version
    return entry


def _fetch_parts_walk(mv: memoryview, pos: int, np: int, v: int, flex: bool) -> tuple[list[int], dict[int, int], int]:
    """Partition by partition: many partitions, or some carry tagged fields."""
    st = struct.Struct(">" + _fetch_fmt(v, flex))
    unpack = st.unpack_from
    size = st.size - flex
    parts: list[int] = []
    offsets: dict[int, int] = {}
    for _ in range(np):
        p, off = unpack(mv, pos)[:2]
        if p < 0:
            raise _bad("bad_field", pos, f"partition {p}")
        parts.append(p)
        offsets[p] = off
        pos += size
        if flex:
            pos = pos + 1 if mv[pos] == 0 else _tags(mv, pos)
    return parts, offsets, pos


def _fetch_topic_rest(mv: memoryview, pos: int, np: int, t: TopicData, v: int, flex: bool) -> int:
    """A Fetch topic's partitions when the fast loop has no unpacker for ``np``
    (first sight of that count, none or too many) or some partition has tagged fields."""
    if np <= 0:
        if np < -1:
            raise _bad("bad_length", pos, f"array length {np}")
        t._p = []
        return pos
    if np > len(mv) - pos:
        raise _bad("bad_length", pos, f"array length {np}")
    if np <= MAX_LAYOUT_PARTITIONS:
        unpack, size, check = _FETCH_N[(v, flex)].get(np) or _fetch_layout(v, flex, np)
        raw = unpack(mv, pos)  # struct.error past the end: truncated
        c = check(raw)
        if c < 0:
            raise _bad("bad_field", pos, "negative partition")
        if not flex or not c:
            t._p = raw
            return pos + size
    t._p, t._o, pos = _fetch_parts_walk(mv, pos, np, v, flex)
    return pos


def fetch_request(mv: memoryview, pos: int, m: Msg) -> None:
    """Every topic and partition of a Fetch request.

    One loop per topic encoding (names, compact names, ids): the per-topic steps are
    the cost here, so each loop does only its own. A topic's partitions are one
    unpack at a fixed stride (flexible: while every tagged-field count is 0) and a
    generated sign/tag check; anything else goes to ``_fetch_topic_rest``.
    """
    v = m.version
    flex = m.flex
    pos += (4 if v <= 14 else 0) + 8 + (4 if v >= 3 else 0) + (1 if v >= 4 else 0) + (8 if v >= 7 else 0)
    n, pos = _array(mv, pos, flex)  # the topics array: once per request
    names = _NAMES
    topics = m.topics
    append = topics.append
    layouts = _FETCH_N.setdefault((v, flex), {})
    seen: set[str | bytes] = set()
    add = seen.add
    if not flex:  # v0-v11: STRING names, INT32 counts
        name_i = _NAME_I
        for _ in range(n):
            ln = mv[pos] << 8 | mv[pos + 1]
            if ln < 1 or ln > 249:
                raise _bad("bad_topic", pos, f"topic name length {ln}")
            nb, np = name_i[ln](mv, pos + 2)
            pos += 6 + ln
            name = names.get(nb) or _name(nb, pos)
            add(name)
            t = FastTopic()
            t.name = name
            t.topic_id = None
            t.records = 0
            t.traceparent = None
            append(t)
            lay = layouts.get(np)
            if lay is not None:
                unpack, size, check = lay
                raw = unpack(mv, pos)  # struct.error past the end: truncated
                if (raw[0] if np == 1 else check(raw)) < 0:
                    raise _bad("bad_field", pos, "negative partition")
                t._p = raw
                pos += size
            else:
                pos = _fetch_topic_rest(mv, pos, np, t, v, flex)
    else:  # v12: COMPACT_STRING names; v13+: topic ids
        ids = v >= 13
        name_s = _NAME_S
        uuid_s = _UUID_S
        name = None
        tid = None
        for _ in range(n):
            if ids:
                tid, = uuid_s(mv, pos)  # 16-byte id, kept
                pos += 16
                add(tid)
            else:
                b = mv[pos]
                if b < 0x80:
                    ln = b - 1
                    pos += 1
                else:
                    ln, pos = _uvarint(mv, pos)
                    ln -= 1
                if ln < 1 or ln > 249:
                    raise _bad("bad_topic", pos, f"topic name length {ln}")
                nb, = name_s[ln](mv, pos)
                pos += ln
                name = names.get(nb) or _name(nb, pos)
                add(name)
            b = mv[pos]
            if b < 0x80:
                np = b - 1
                pos += 1
            else:
                np, pos = _uvarint(mv, pos)
                np -= 1
            t = FastTopic3()
            t.name = name
            t.topic_id = tid
            t.records = 0
            t.traceparent = None
            append(t)
            lay = layouts.get(np)
            if lay is not None:
                unpack, size, check = lay
                raw = unpack(mv, pos)  # struct.error past the end: truncated
                if not ((raw[2] if raw[0] >= 0 else -1) if np == 1 else check(raw)):
                    t._p = raw
                    pos += size
                else:
                    pos = _fetch_topic_rest(mv, pos, np, t, v, flex)
            else:
                pos = _fetch_topic_rest(mv, pos, np, t, v, flex)
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
            if not t.has_partition(idx):
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
            if not t.has_partition(idx):
                t.partitions.append(idx)
            if err and not t.error:
                t.error = err
                t.error_partition = idx
            if rlen > 0:
                before = t.records
                records(mv, pos, rlen, m, t)
                if t.records > before:
                    t.add_data_partition(idx)
                pos += rlen
            if flex:
                pos = _tags(mv, pos)
        if flex:
            pos = _tags(mv, pos)


def metadata_response(mv: memoryview, version: int, flex: bool, header_tags: bool) -> list[tuple[bytes, str]] | None:
    """A complete Metadata response view: the (topic id, name) pairs metadata.py's walker
    would cache, in its order; None for anything the walker might refuse (it then reads
    the message and says why), so nothing here decides an error.

    Clients refresh metadata every few seconds on every connection, so it is one message
    in four: the C accelerator walks it when built, ``metadata_response_py`` (the
    reference) when C declines (None) or is off.
    """
    if _c_metadata is not None:
        pairs = _c_metadata(mv, version, flex, header_tags)
        if pairs is not None:
            return pairs
    return metadata_response_py(mv, version, flex, header_tags)


def metadata_response_py(mv: memoryview, version: int, flex: bool,
                         header_tags: bool) -> list[tuple[bytes, str]] | None:
    """metadata_response in Python: the reference, and the answer whenever C declines.

    Positions only grow, so a field past the end either fails its read (IndexError,
    struct.error) or is caught by the last check, as the walker's bounded reader would.
    """
    n_all = len(mv)
    out: list[tuple[bytes, str]] = []
    try:
        pos = _tags(mv, 8) if header_tags else 8
        if version >= 3:
            pos += 4  # throttle_time_ms
        nb, pos = _array(mv, pos, flex)
        for _ in range(nb):  # brokers: node_id host port [rack] <tags>
            pos = _skip_str(mv, pos + 4, flex) + 4
            if version >= 1:
                pos = _skip_str(mv, pos, flex)
            if flex:
                pos = _tags(mv, pos)
        if version >= 2:
            pos = _skip_str(mv, pos, flex)  # cluster_id
        if version >= 1:
            pos += 4  # controller_id
        nt, pos = _array(mv, pos, flex)
        fixed = 14 if version >= 7 else 10
        arrays = 3 if version >= 5 else 2
        for _ in range(nt):
            pos += 2  # error_code
            if flex:
                ln, pos = _uvarint(mv, pos)
                ln -= 1
            else:
                ln = _I16(mv, pos)[0]
                pos += 2
            if ln < -1 or pos + ln > n_all:
                return None
            name = None
            if ln >= 0:
                nb_ = mv[pos:pos + ln].tobytes()  # a topic name (<= the message), kept in the cache
                name = _NAMES.get(nb_)
                if name is None and TOPIC_RE.fullmatch(nb_) is not None:
                    name = _name(nb_, pos)
                pos += ln  # a name the walker cannot validate is just not cached
            tid = None
            if version >= 10:
                if pos + 16 > n_all:
                    return None
                tid = mv[pos:pos + 16].tobytes()
                pos += 16
            if version >= 1:
                pos += 1  # is_internal
            np, pos = _array(mv, pos, flex)
            for _ in range(np):  # partitions: fixed fields, replica/isr[/offline] arrays, <tags>
                pos += fixed
                for _ in range(arrays):
                    k, pos = _array(mv, pos, flex)
                    if k > 0:
                        pos += 4 * k
                if flex:
                    pos = _tags(mv, pos)
            if version >= 8:
                pos += 4  # topic_authorized_operations
            if flex:
                pos = _tags(mv, pos)
            if name is not None and tid is not None and tid != ZERO_UUID:
                out.append((tid, name))
    except (Malformed, IndexError, struct.error):
        return None
    if pos > n_all:
        return None
    return out


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
    """Header and, for Produce/Fetch, every topic and partition of a complete request view.

    A valid request goes through the C accelerator (_flat.c) when it is built (for an API
    that makes no span, only its header, read there too); it hands back anything else
    (None) and this module's walk decides.
    """
    if _c_request is not None:
        r = _c_request(mv, scan_bytes, True)  # Msg.want_tp: always True today
        if r is not None:
            return _c_msg(r)
    return parse_request_py(mv, scan_bytes)


def _c_msg(r: tuple[Any, ...]) -> Msg:
    """The Msg parse_request_py would build, from the accelerator's tuple."""
    key, version, flex, corr, client_id, acks, scan_left, truncated, topics = r
    m = Msg(key, version, flex, corr)
    m.topics = topics
    if client_id is not None:
        m.client_id = client_id
    m.scan_left = scan_left
    if key == apis.PRODUCE:
        m.acks = acks
        if truncated:
            m.truncated = True
    return m


def parse_request_py(mv: memoryview, scan_bytes: int) -> Msg:
    """parse_request in Python: the reference, and the fallback for whatever C hands back."""
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


# -- the C accelerator ------------------------------------------------------------
#: What _flat.setup needs: the topic classes it instantiates and the limits it shares with
#: this module (one source for each).
C_SETUP = (FastTopic, FastTopic3, (APIS[apis.PRODUCE][1], APIS[apis.PRODUCE][2], APIS[apis.FETCH][1],
                                   APIS[apis.FETCH][2], MAX_HEADERS_SCAN, MAX_TRACEPARENT, MAX_LAYOUT_PARTITIONS),
           tuple((APIS[k][1], APIS[k][2]) if k in APIS else None for k in range(max(APIS) + 1)))
#: processors/protocols/kafka/_flat.c (None: not built, or WIRESPAN_PURE_PYTHON=1).
_C = speedups.load("processors.protocols.kafka._flat")
_c_request = None
_c_metadata = None
if _C is not None:
    _C.setup(*C_SETUP)
    _c_request = _C.request
    _c_metadata = _C.metadata
