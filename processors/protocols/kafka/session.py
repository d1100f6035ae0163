"""The Kafka session: frames messages, runs the walkers, pairs by correlation id, builds spans.

Framing: every message is ``size:i32`` then ``size`` bytes. A message that is
already complete when it starts (in one chunk, or small) is parsed by flat.py from
one view; otherwise a ``Cursor`` per direction runs the message's walker (a generator of units and skips, see
state.py) over the connection's ``LargeBuffer``. Whatever is behind the cursor
is released as soon as the cursor stops for more bytes, so what stays buffered
is at most one unit (a header, a topic name, one partition's fixed fields, the
first record's headers; each bounded by ``MAX_UNIT``) -- never a record payload,
whatever the declared message size.

Pairing: requests wait in a per-connection dict keyed by correlation id (bounded,
oldest evicted and counted), so responses pair in any order. Produce with
acks=0 has no response and is emitted at once.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Generator
from typing import Any

from processors.protocols.base import PendingMap
from processors.protocols.base import Session as _BaseSession
from processors.protocols.errors import LimitExceeded, Malformed
from service.largebuf import BufferBoundsError, LargeBuffer, LargeBufferReader
from service.model import SpanKind, StatusCode

from . import apis, fetch, flat, metadata, produce
from .codec import NAME, printable, read_array_len, read_string, skip_tags, topic_name, uuid_str
from .header import MAX_MESSAGE_SIZE, MIN_REQUEST_SIZE, MIN_RESPONSE_SIZE, REQUEST_FIXED
from .state import Msg, TopicIdCache, u_tags

#: The largest piece a unit may need in memory at once (longest: a client id of
#: 32 KiB, an aborted-transactions list); more than this waiting is refused.
MAX_UNIT = 64 * 1024

Walker = Generator[Any, Any, Any]
_I32 = struct.Struct(">i").unpack_from
_HDR = struct.Struct(">ihhih").unpack_from  # size, api key, version, correlation id, client id length
Unit = Callable[[LargeBufferReader, Any], Any]


class Cursor:
    """One direction's position inside the message being parsed."""

    __slots__ = ("end", "gen", "msg", "pos", "req", "start_ns", "started", "unit")

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.gen: Walker | None = None
        self.unit: Any = None
        self.pos = 0
        self.end = 0
        self.msg: Msg | None = None
        self.req: Msg | None = None
        self.started = False
        self.start_ns = 0

    def begin(self, gen: Walker, end: int, start_ns: int) -> None:
        self.gen = gen
        self.unit = next(gen)
        self.pos = 4
        self.end = end
        self.started = True
        self.start_ns = start_ns

    def run(self, buf: LargeBuffer) -> bool:
        """Advance through ``buf``; True when the message is fully consumed.

        On False everything before the cursor has been released from ``buf``.
        """
        gen = self.gen
        unit = self.unit
        pos = self.pos
        end = self.end
        n = len(buf)
        while True:
            if type(unit) is int:
                if unit < 0 or pos + unit > end:
                    raise Malformed(NAME, "bad_length", pos, f"skip of {unit} past message end")
                avail = (n if n < end else end) - pos
                if unit > avail:
                    self._park(buf, pos + avail, unit - avail)
                    return False
                pos += unit
                val = None
            else:
                lim = n if n < end else end
                r = buf.reader(pos, lim)
                try:
                    val = unit(r, self.msg)
                except (BufferBoundsError, Malformed) as e:
                    # Before the message end, running out of bytes (or a count
                    # that only looks too large for what has arrived) means wait.
                    if lim == end:
                        if isinstance(e, Malformed):
                            raise
                        raise Malformed(NAME, "truncated", pos, str(e))
                    if lim - pos > MAX_UNIT:
                        if isinstance(e, Malformed):
                            raise
                        raise LimitExceeded(NAME, "field_too_large", pos, f"unit over {MAX_UNIT} bytes")
                    self._park(buf, pos, unit)
                    return False
                pos = r.offset
            if gen is None:
                self.pos = pos
                return True
            try:
                unit = gen.send(val)
            except StopIteration:
                gen = self.gen = None
                unit = end - pos  # trailing fields nobody needs

    def _park(self, buf: LargeBuffer, pos: int, unit: Any) -> None:
        if pos:
            buf.release(pos)
        self.end -= pos
        self.pos = 0
        self.unit = unit


# -- header units ---------------------------------------------------------------
def u_request_header(r: LargeBufferReader, m: Any) -> Msg:
    """Key, version, correlation id, client id (+ tagged fields when flexible)."""
    key = r.read_i16be()
    ver = r.read_i16be()
    corr = r.read_i32be()
    cid_len = r.read_i16be()
    if not apis.known(key, ver):
        raise Malformed(NAME, "unknown_api", r.offset, f"api {key} v{ver}")
    if corr < 0 or cid_len < -1:
        raise Malformed(NAME, "bad_header", r.offset)
    flex = apis.flexible(key, ver)
    msg = Msg(key, ver, flex, corr)
    if cid_len > 0:
        msg.client_id = str(r.read(cid_len), "ascii", "replace")  # small, kept as an attribute
    if flex:
        skip_tags(r)
    return msg


def u_corr(r: LargeBufferReader, m: Any) -> int:
    return r.read_i32be()


def walk_request(cur: Cursor, scan_bytes: int) -> Walker:
    """Any request: the header, then the body walker of the APIs that make spans."""
    m: Msg = yield u_request_header
    m.start_ns = cur.start_ns
    m.scan_left = scan_bytes
    cur.msg = m
    if m.api_key == apis.PRODUCE:
        yield from produce.walk_request(m)
    elif m.api_key == apis.FETCH:
        yield from fetch.walk_request(m)


def parse_request(buf: LargeBuffer, scan_bytes: int = 1 << 20) -> Msg:
    """Parse the one complete request at the front of ``buf`` (header and all topics);
    no pairing, no spans, nothing released. For tools and benchmarks."""
    if len(buf) < 4:
        raise Malformed(NAME, "truncated", 0)
    size = buf.i32be_at(0)
    if size < MIN_REQUEST_SIZE or size > MAX_MESSAGE_SIZE or 4 + size > len(buf):
        raise Malformed(NAME, "bad_size", 0, f"message size {size}")
    cur = Cursor()
    cur.begin(walk_request(cur, scan_bytes), 4 + size, 0)
    cur.run(buf)
    assert cur.msg is not None
    return cur.msg


class KafkaSession:
    """Per-connection state; the contract is in processors/protocols/base.py."""

    protocol = NAME
    cut_short = _BaseSession.cut_short  # base.py's rule for the end of a capture
    reply_begun = _BaseSession.reply_begun

    def __init__(self, conn: Any, settings: Any) -> None:
        self.conn = conn
        self.settings = settings
        self.cache: TopicIdCache = settings.topic_ids
        self.client = Cursor()
        self.server = Cursor()
        self.pending: dict[int, Msg] = PendingMap(conn, start="start_ns")
        #: After a gap, a direction's next bytes may start mid-message: wait for a chunk
        #: that starts like a message (a valid request header / a pending correlation id).
        self.resync = [False, False]

    # -- feeding ---------------------------------------------------------------
    def feed(self, from_client: bool, buf: LargeBuffer, ts_ns: int) -> None:
        cur = self.client if from_client else self.server
        if self.resync[from_client] and not self._resynced(from_client, buf):
            return
        while True:
            if not cur.started:
                if len(buf) < 4:
                    return
                size = buf.i32be_at(0)
                lo = MIN_REQUEST_SIZE if from_client else MIN_RESPONSE_SIZE
                if size < lo or size > self.settings.max_message_bytes:
                    raise Malformed(NAME, "bad_size", 0, f"message size {size}")
                total = 4 + size
                gather = flat.MAX_GATHER
                if total > len(buf) and total <= gather:
                    return  # a small message: wait for all of it (<= MAX_GATHER buffered), then the fast path
                if total <= len(buf) and (
                        total <= gather or buf.chunk_count == 1 or buf.chunks()[0].nbytes >= total):
                    # Fast path: the whole message in one view (a chunk, or the scratch when small).
                    if self._flat(from_client, cur, buf, total):
                        buf.release(total)
                        continue
                gen = self._walk_request(cur) if from_client else self._walk_response(cur)
                cur.begin(gen, 4 + size, buf.ts_at(0))
            if not cur.run(buf):
                return
            end = cur.end
            end_ns = buf.ts_at(end - 1) if end > 0 else ts_ns
            if from_client:
                if cur.msg is not None:
                    self._request_done(cur.msg, end_ns)
            else:
                self._response_done(cur, end_ns)
            cur.reset()
            buf.release(end)

    def feed_whole(self, from_client: bool, data: Any, ts_ns: int) -> bool:
        """A segment of whole messages, read in place (base.py's contract): most Kafka
        segments are one message, so this skips the buffer's append, lookups and release.
        False, with nothing changed, for anything ``feed`` must frame or wait on."""
        if self.resync[from_client] or (self.client if from_client else self.server).started:
            return False
        n = len(data)
        if n < 8:
            return False
        if type(data) is not memoryview:  # the eBPF receiver's payloads are bytes
            data = memoryview(data)
        size = _I32(data, 0)[0]
        lo = MIN_REQUEST_SIZE if from_client else MIN_RESPONSE_SIZE
        hi = self.settings.max_message_bytes
        if 4 + size == n:  # one message: the common case
            if size < lo or size > hi:
                return False  # feed raises it
            if from_client:
                self._flat_request(data, ts_ns, ts_ns)
                return True
            return self._flat_response(data, ts_ns)
        # Several: the framing is checked first, so a segment declined is left untouched.
        pos = 0
        while pos < n:
            if n - pos < 4:
                return False
            size = _I32(data, pos)[0]
            if size < lo or size > hi:
                return False
            pos += 4 + size
        if pos != n:
            return False
        pos = 0
        while pos < n:
            total = 4 + _I32(data, pos)[0]
            mv = data[pos:pos + total]
            if from_client:
                self._flat_request(mv, ts_ns, ts_ns)
            elif not self._flat_response(mv, ts_ns):
                if not pos:
                    return False
                # Past the first message nothing can be given back: the rest goes to the
                # walkers through a buffer of its own, as feed would run them.
                rest = LargeBuffer()
                rest.append(data[pos:], ts_ns)
                self.feed(from_client, rest, ts_ns)
                return True
            pos += total
        return True

    def _flat(self, from_client: bool, cur: Cursor, buf: LargeBuffer, total: int) -> bool:
        """Handle a complete message with flat.py; False leaves it to the walkers."""
        mv = buf.view_at(0, total)
        if from_client:
            self._flat_request(mv, buf.ts_at(0), buf.ts_at(total - 1))
            return True
        return self._flat_response(mv, buf.ts_at(total - 1))

    def _flat_request(self, mv: memoryview, start_ns: int, end_ns: int) -> None:
        m = flat.parse_request(mv, self.settings.max_records_scan_bytes)
        m.start_ns = start_ns
        self._request_done(m, end_ns)

    def _flat_response(self, mv: memoryview, end_ns: int) -> bool:
        """A complete response in one view; False leaves it to the walkers, untouched."""
        corr = _I32(mv, 4)[0]  # from mv: a buffer read could reuse its scratch
        pending = self.pending
        req = pending.get(corr)
        if req is None:
            return False  # unpaired: counted by the walker
        key = req.api_key
        if key > apis.FETCH:
            # Metadata: read from the view by flat.py (the topic ids it caches), unless it
            # declines. Any other API's response body nobody reads (ApiVersions,
            # FindCoordinator, ...): the walker would read the correlation id and an empty
            # tag section, then step over the rest; done here. Tagged fields in the
            # header go to the walker. No response Msg: these make no span from it.
            tags = req.flex and key != apis.API_VERSIONS  # apis.response_header_flexible
            if key == apis.METADATA:
                pairs = flat.metadata_response(mv, req.version, req.flex, tags)
                if pairs is None:
                    return False
                cache = self.cache
                if cache is not None:
                    for tid, name in pairs:
                        cache.put(tid, name)
            elif tags and (len(mv) < 9 or mv[8] != 0):
                return False
            del pending[corr]
            if self.settings.other_api_spans:
                self._emit_other(req, end_ns)
            return True
        del pending[corr]
        m = Msg(key, req.version, req.flex, corr)
        m.response = True
        m.scan_left = self.settings.max_records_scan_bytes
        flat.parse_response(mv, m, req)
        if m.truncated:
            self.conn.drop("records_over_scan_cap")
        self._emit(req, m, end_ns)
        return True

    def _walk_request(self, cur: Cursor) -> Walker:
        return walk_request(cur, self.settings.max_records_scan_bytes)

    def _walk_response(self, cur: Cursor) -> Walker:
        corr = yield u_corr
        req = self.pending.pop(corr, None)
        if req is None:
            self.conn.drop("unpaired_response")
            return
        cur.req = req
        m = Msg(req.api_key, req.version, req.flex, corr)
        m.response = True
        m.scan_left = self.settings.max_records_scan_bytes
        m.cache = self.cache
        cur.msg = m
        if apis.response_header_flexible(req.api_key, req.version):
            yield u_tags
        if req.api_key == apis.PRODUCE:
            yield from produce.walk_response(m, req)
        elif req.api_key == apis.FETCH:
            yield from fetch.walk_response(m, req)
        elif req.api_key == apis.METADATA:
            yield from metadata.walk_response(m, req)

    # -- pairing ---------------------------------------------------------------
    def _request_done(self, m: Msg, end_ns: int) -> None:
        m.end_ns = end_ns
        if m.truncated:
            self.conn.drop("records_over_scan_cap")
        if m.api_key == apis.PRODUCE and m.acks == 0:
            self._emit(m, None, end_ns)  # acks=0: the broker never answers
            return
        pending = self.pending
        if m.corr in pending:
            self.conn.drop("duplicate_correlation_id")
        elif len(pending) >= self.settings.max_pending_requests:
            del pending[next(iter(pending))]
            self.conn.drop("pending_evicted")
        pending[m.corr] = m

    def _response_done(self, cur: Cursor, end_ns: int) -> None:
        req = cur.req
        if req is None:
            return
        if cur.msg is not None and cur.msg.truncated:
            self.conn.drop("records_over_scan_cap")
        self._emit(req, cur.msg, end_ns)

    # -- spans -----------------------------------------------------------------
    def _emit(self, req: Msg, resp: Msg | None, end_ns: int) -> None:
        key = req.api_key
        conn = self.conn
        if key == apis.PRODUCE:
            op, optype = "send", "send"
            kind = conn.kind_for(SpanKind.PRODUCER, SpanKind.PRODUCER)
        elif key == apis.FETCH:
            op, optype = "poll", "receive"
            kind = conn.kind_for(SpanKind.CONSUMER, SpanKind.CONSUMER)
        else:
            if self.settings.other_api_spans:
                self._emit_other(req, end_ns)
            return
        cache = self.cache
        for t in req.topics:
            if t.name is not None:
                dest = t.name
            else:
                tid = t.topic_id or b""
                dest = cache.get(tid) or uuid_str(tid)  # an unknown id is shown as itself
            attrs: dict[str, Any] = {
                "messaging.system": "kafka",
                "messaging.operation.type": optype,
                "messaging.operation.name": op,
                "messaging.destination.name": dest,
            }
            if req.client_id:
                attrs["messaging.client.id"] = req.client_id
            if t.topic_id is not None:
                attrs["messaging.kafka.topic.id"] = uuid_str(t.topic_id)
            nparts = t.partition_count
            # One partition, or a poll over several where only one returned records.
            dp = t.data_partitions
            p = t.first_partition if nparts == 1 else (dp[0] if len(dp) == 1 else -1)
            if p >= 0:
                attrs["messaging.destination.partition.id"] = str(p)
                off = t.offset_of(p)
                if off is not None:
                    attrs["messaging.kafka.offset"] = off
            if nparts > 1:
                attrs["messaging.kafka.partition.count"] = nparts
            if not t.records_unknown and (t.records or key == apis.PRODUCE or resp is not None):
                attrs["messaging.batch.message_count"] = t.records
            code = t.error or req.error
            status = StatusCode.UNSET
            msg = ""
            if code:
                status = StatusCode.ERROR
                msg = apis.error_name(code)
                attrs["error.type"] = msg
                if t.error_partition >= 0 and nparts > 1:
                    attrs["messaging.kafka.error.partition"] = t.error_partition
            conn.emit(conn.span(f"{op} {dest}", kind, req.start_ns, end_ns, attrs,
                                traceparent=t.traceparent, status_code=status, status_message=msg))

    def _cut(self, req: Msg, resp: Msg | None, end_ns: int) -> None:
        """The spans of an exchange whose response the end cut short (one per topic, as
        ``_emit`` makes them), each marked incomplete by ``cut_short``."""
        conn = self.conn
        emit = conn.emit
        spans: list[Any] = []
        conn.emit = spans.append
        try:
            self._emit(req, resp, end_ns)
        finally:
            conn.emit = emit
        for sp in spans:
            self.cut_short(sp)

    def _emit_other(self, req: Msg, end_ns: int) -> None:
        name = apis.APIS[req.api_key][0]
        attrs: dict[str, Any] = {"messaging.system": "kafka", "messaging.operation.name": name}
        if req.client_id:
            attrs["messaging.client.id"] = req.client_id
        kind = self.conn.kind_for(SpanKind.CLIENT, SpanKind.CLIENT)
        self.conn.emit(self.conn.span(name, kind, req.start_ns, end_ns, attrs))

    # -- lifecycle -------------------------------------------------------------
    def _resynced(self, from_client: bool, buf: LargeBuffer) -> bool:
        """Drop bytes until the buffer starts like a message again."""
        if from_client:
            ok = looks_like_request(buf)
        elif len(buf) < 8:
            ok = None
        else:
            size = buf.i32be_at(0)
            ok = MIN_RESPONSE_SIZE <= size <= self.settings.max_message_bytes and buf.i32be_at(4) in self.pending
        if ok is None:
            return False
        if not ok:
            self.conn.drop("resync_skipped")
            buf.release(len(buf))
            return False
        self.resync[from_client] = False
        return True

    def gap(self, from_client: bool, ts_ns: int) -> None:
        (self.client if from_client else self.server).reset()
        # Requests in flight stay pending: responses after the gap still pair by
        # correlation id; those lost in it are counted at close or on eviction.
        self.resync[from_client] = True

    def close(self, ts_ns: int, reset: bool = False) -> None:
        # base.py's rule: a Produce/Fetch whose response began (its walker past the
        # correlation id, or its size and id in the buffer) is a span of what was seen,
        # marked incomplete; one never answered is counted.
        wanted = (apis.PRODUCE, apis.FETCH)
        srv = self.server
        if srv.req is not None and srv.req.api_key in wanted:
            self._cut(srv.req, srv.msg, ts_ns)
        buf = self.conn.server_buf
        corr = buf.i32be_at(4) if len(buf) >= 8 and not srv.started else None
        short = corr is None and len(buf) < 8 and not srv.started  # cut inside the header: the oldest's
        for m in self.pending.values():
            if m.api_key in wanted:
                if m.corr == corr or (short and self.reply_begun()):
                    self._cut(m, None, ts_ns)
                else:
                    self.cut_short(None, "unanswered")
        self.pending.clear()
        self.client.reset()
        self.server.reset()


def looks_like_responses(buf: LargeBuffer) -> bool | None:
    """Server bytes that are whole responses chaining exactly to the end of ``buf``
    (a response alone is only size + correlation id, too weak to check otherwise)."""
    n = len(buf)
    pos = 0
    while pos < n:
        if n - pos < 8:
            return None
        size = buf.i32be_at(pos)
        if size < MIN_RESPONSE_SIZE or size > MAX_MESSAGE_SIZE or buf.i32be_at(pos + 4) < 0:
            return False
        pos += 4 + size
    if pos == n:
        return True
    return None if size <= MAX_UNIT else False


#: A first request other than Produce larger than this is not taken for Kafka: clients
#: open with ApiVersions/Metadata (tens of bytes); a FastCGI record read as a Kafka
#: header declares ~16 MiB.
MAX_DETECT_OTHER = 1024 * 1024


def looks_like_request(buf: LargeBuffer) -> bool | None:
    """OBI-strict check of a request's first bytes: True, False, or None (need more).

    Beyond the header (size, known key/version, correlation id, printable client id):
    Produce must have a valid acks, timeout and first topic name; Fetch sane
    wait/size fields; any other API a modest size and, once whole, must be followed
    by nothing or by another plausible request header; Produce/Fetch, once whole,
    must parse completely.
    """
    n = len(buf)
    if n >= REQUEST_FIXED:
        # The whole fixed header is there (a connection's first segment, nearly always):
        # one unpack, then the checks below in their order, none of which can wait.
        size, key, ver, corr, cid = _HDR(buf.view_at(0, REQUEST_FIXED), 0)
        if size < MIN_REQUEST_SIZE or size > MAX_MESSAGE_SIZE or not apis.known(key, ver) or corr < 0:
            return False  # (a first byte over MAX_MESSAGE_SIZE >> 24 is a size over it)
    else:
        if n >= 1 and buf.u8_at(0) > (MAX_MESSAGE_SIZE >> 24):
            return False
        if n < 4:
            return None
        size = buf.i32be_at(0)
        if size < MIN_REQUEST_SIZE or size > MAX_MESSAGE_SIZE:
            return False
        if n >= 8 and not apis.known(buf.i16be_at(4), buf.i16be_at(6)):
            return False
        if n >= 12 and buf.i32be_at(8) < 0:
            return False
        return None
    if cid < -1 or cid > size - MIN_REQUEST_SIZE:
        return False
    if n < REQUEST_FIXED + max(cid, 0):
        return None
    if cid > 0 and not printable(buf.view_at(REQUEST_FIXED, cid)):
        return False
    total = 4 + size
    if key != apis.PRODUCE and size > MAX_DETECT_OTHER:
        return False
    try:
        ok = _body_plausible(buf, key, ver, cid)
    except (BufferBoundsError, Malformed):
        ok = None if n < total else False
    if ok is not True:
        return ok
    if n < total:
        # A produce may be large and arrive in pieces; any other first request is small.
        return True if key == apis.PRODUCE else None
    if key in (apis.PRODUCE, apis.FETCH):
        try:
            flat.parse_request(buf.view_at(0, total), 0)
        except Malformed:
            return False
    if n > total:
        rest = LargeBuffer(buf.view_at(total, min(n - total, REQUEST_FIXED)))
        return looks_like_request(rest) is not False
    return True


def _body_plausible(buf: LargeBuffer, key: int, ver: int, cid: int) -> bool:
    """The first body fields of Produce/Fetch; raises BufferBoundsError when not there yet."""
    if key not in (apis.PRODUCE, apis.FETCH):
        return True
    flex = apis.flexible(key, ver)
    r = buf.reader(REQUEST_FIXED + max(cid, 0), min(len(buf), buf.i32be_at(0) + 4))
    if flex:
        skip_tags(r)
    if key == apis.PRODUCE:
        if ver >= 3:
            tx = read_string(r, flex)
            if tx is not None and not printable(tx):
                return False
        if r.read_i16be() not in (-1, 0, 1) or r.read_i32be() < 0:
            return False
        ntopics = read_array_len(r, flex)
        if ntopics < 1:
            return False
        if ver < 13:
            topic_name(read_string(r, flex))
        return True
    if ver <= 14 and r.read_i32be() < -1:  # replica id: -1 for consumers
        return False
    if r.read_i32be() < 0 or r.read_i32be() < 0:  # max wait, min bytes
        return False
    if ver >= 3 and r.read_i32be() < 0:  # max bytes
        return False
    return not (ver >= 4 and r.read_u8() > 1)  # isolation level
