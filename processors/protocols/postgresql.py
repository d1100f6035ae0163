"""PostgreSQL frontend/backend protocol 3.x: one CLIENT span per query.

Contract (processors/protocols/base.py): ``detect`` recognises a startup packet
or, for a connection picked up mid-stream, a chain of well-formed typed
messages (type byte + int32 length, content checked per type); ``Session``
parses both directions and emits one span per simple Query (``Q``, several
statements give one span with a summary) and per extended-protocol Execute
(``E``), its query text resolved through bounded LRU caches of named
statements and portals (Parse/Bind/Close). Responses pair with requests by
order, so pipelined Parse/Bind/Execute.../Sync batches work. After an
ErrorResponse the server skips to the next Sync: the error lands on the first
Execute (or Parse) it skipped. SSLRequest/GSSENCRequest answered ``S``/``G``
means encrypted bytes follow: the session stops (counted ``tls``).

Zero-copy: each message is looked at through its header and, for the types we
read, at most a bounded head (``_CLIENT_HEAD``/``_SERVER_HEAD``); the rest of a
large message (DataRow, CopyData, a huge Bind) is released as it arrives and
skipped by count, never held. The only copies are the query text (bounded by
``sql.MAX_QUERY_BYTES``), names, and error fields.

A segment of whole messages (most of them: a Query, its CommandComplete and
ReadyForQuery, an extended batch) is read in place by ``feed_whole`` without the
buffer; the buffered ``feed`` is the reference it answers as, and takes everything
it declines (startup, TLS, resync, a message going on past the segment).
"""

from __future__ import annotations

import re
import struct
from collections import OrderedDict, deque

from pydantic import Field

from service.largebuf import LargeBuffer
from service.model import Span, SpanKind, StatusCode
from service.speedups import load as _load_speedup

from .base import Conn, Detection, PendingQueue, ProtocolSettings
from .base import Session as _Session
from .errors import LimitExceeded, Malformed
from .sanitize import sanitize_error
from .sql import MAX_QUERY_BYTES, QueryInfo, analyze, decode_query, query_attributes

NAME = "postgresql"
DEFAULT_PORTS = frozenset({5432})
SYSTEM = "postgresql"

#: Startup-packet codes (PostgreSQL docs, "Message Formats").
PROTOCOL_MAJOR = 3
SSL_REQUEST = 80877103
GSSENC_REQUEST = 80877104
CANCEL_REQUEST = 80877102
#: The server refuses startup packets longer than this (MAX_STARTUP_PACKET_LENGTH).
MAX_STARTUP_LEN = 10000
#: Largest message the server accepts or sends (PQ_LARGE_MESSAGE_LIMIT, 1 GiB).
MAX_MESSAGE_LEN = (1 << 30) - 1
#: Requests waiting for their response before the oldest is dropped (counted).
MAX_PENDING = 1024
#: Bytes searched for a message boundary after a gap before giving up on them.
RESYNC_WINDOW = 16384
#: Messages checked in a row by ``detect`` (strictness vs. cost).
DETECT_CHAIN = 4
#: Longest message ``detect`` and resync will vouch for without seeing it whole.
DETECT_MAX_LEN = 65536
#: PostgreSQL's NAMEDATALEN is 64; names longer than this cap are cut.
MAX_NAME = 256
#: Error/notice fields kept (message text is cut here).
MAX_ERROR_HEAD = 4096

# Bytes of a message body we need, per type; the rest is skipped by count.
_CLIENT_HEAD: dict[int, int] = {
    ord("Q"): MAX_QUERY_BYTES + 1,
    ord("P"): MAX_NAME + MAX_QUERY_BYTES + 2,
    ord("B"): 2 * MAX_NAME + 2,
    ord("E"): MAX_NAME + 5,
    ord("D"): MAX_NAME + 2,
    ord("C"): MAX_NAME + 2,
    ord("S"): 0, ord("H"): 0, ord("X"): 0, ord("d"): 0, ord("c"): 0, ord("f"): 0,
    ord("p"): 0, ord("F"): 0,
}
_SERVER_HEAD: dict[int, int] = {
    ord("E"): MAX_ERROR_HEAD, ord("N"): 0, ord("C"): 64, ord("Z"): 1,
    ord("R"): 0, ord("S"): 0, ord("K"): 0, ord("T"): 0, ord("D"): 0, ord("I"): 0,
    ord("1"): 0, ord("2"): 0, ord("3"): 0, ord("n"): 0, ord("t"): 0, ord("s"): 0,
    ord("G"): 0, ord("H"): 0, ord("W"): 0, ord("d"): 0, ord("c"): 0, ord("A"): 0,
    ord("v"): 0, ord("V"): 0,
}
_CLIENT_ONLY = frozenset(b"QPBXpFf")
_SERVER_ONLY = frozenset(b"RKZTI123ntsGWAvV")


class Settings(ProtocolSettings):
    """Options under ``processors: protocols: postgresql:``."""

    #: Replace literals in ``db.query.text`` by ``?`` (off: the text as sent).
    sanitize_query: bool = True
    #: Named prepared statements remembered per connection (LRU).
    max_statements: int = Field(512, ge=1, le=1_000_000)
    #: Named portals remembered per connection (LRU).
    max_portals: int = Field(64, ge=1, le=1_000_000)
    #: Replace quoted literals in error messages by ``?`` (``sanitize.py``; off: as the server sent them).
    sanitize_errors: bool = True


_I32BE = struct.Struct(">i").unpack_from

#: The C segment walker (_pgwire.c), or None (WIRESPAN_PURE_PYTHON=1, not built): feed_whole
#: then reads each message in Python, as it does whenever the walker declines a segment.
_C = _load_speedup("processors.protocols._pgwire")
if _C is not None:
    _C.limits(MAX_QUERY_BYTES, MAX_NAME, MAX_ERROR_HEAD)
_NO_CHUNK = memoryview(b"")
_NO_NUL = re.compile(rb"[^\0]*").match

#: Entries kept by each memo below; a full one is emptied (a bound on memory, not an LRU: a
#: miss only costs the work the memo saves).
_MEMO_MAX = 256
#: sql.analyze's results by query text, one memo per sanitize_query setting (indexed by it):
#: an application sends the same statements on every connection, and analyze's own LRU (a
#: key tuple and a move_to_end a hit) costs more than a lookup by the text.
_INFOS: tuple[dict[str, QueryInfo], dict[str, QueryInfo]] = ({}, {})
#: A span's name and its attributes but the answer's (rows, error), by (analysis, namespace):
#: built once for the statement rather than key by key for every span of it. Never mutated:
#: each span copies it.
_BASES: dict[tuple[QueryInfo | None, str], tuple[str, dict]] = {}
#: sanitize_error's result by message: a failing statement fails alike on every connection.
_ERRORS: dict[str, str] = {}


def _analyze(text: str, san: bool) -> QueryInfo:
    """``sql.analyze`` of a PostgreSQL query, remembered in ``_INFOS``."""
    memo = _INFOS[san]
    if len(memo) >= _MEMO_MAX:
        memo.clear()
    info = memo[text] = analyze(text, "postgresql", san)
    return info


def _info(text: str, san: bool) -> QueryInfo:
    info = _INFOS[san].get(text)
    return _analyze(text, san) if info is None else info


def _span_base(info: QueryInfo | None, namespace: str) -> tuple[str, dict]:
    """The span name and first attributes of a statement (``_BASES``), in the order spans have
    always had them: system, namespace, operation, collection, summary, text."""
    attrs: dict = {"db.system.name": SYSTEM}
    if namespace:
        attrs["db.namespace"] = namespace
    name = SYSTEM if info is None else query_attributes(attrs, info, SYSTEM)
    if len(_BASES) >= _MEMO_MAX:
        _BASES.clear()
    base = _BASES[(info, namespace)] = (name, attrs)
    return base


def _sanitized(msg: str) -> str:
    out = _ERRORS.get(msg)
    if out is None:
        if len(_ERRORS) >= _MEMO_MAX:
            _ERRORS.clear()
        out = _ERRORS[msg] = sanitize_error(msg)
    return out


# -- validation shared by detect and resync -----------------------------------------
def _cstr_end(buf: LargeBuffer, off: int, end: int) -> int:
    """Offset just past the NUL of a C string at ``off``, or -1."""
    if off < end:
        c, cs = buf.chunk_at(off)
        rel = off - cs
        if c[rel] == 0:  # the unnamed statement/portal: the common case
            return off + 1
        lim = end - cs
        if lim > len(c):
            lim = len(c)
        z = _NO_NUL(c, rel, lim).end()  # in place in the chunk (a buffer find costs more)
        if z < lim:
            return cs + z + 1
        if lim == end - cs:
            return -1
    z = buf.find(b"\0", off, end)
    return -1 if z < 0 else z + 1


#: Control bytes but tab, LF and CR; the second also allows NUL (a startup packet's separators).
_CONTROL = re.compile(rb"[\x00-\x08\x0b\x0c\x0e-\x1f]").search
_CONTROL_NO_NUL = re.compile(rb"[\x01-\x08\x0b\x0c\x0e-\x1f]").search


def _printable(buf: LargeBuffer, off: int, end: int, nul: bool = False) -> bool:
    """No control bytes in the first 64 bytes of ``[off, end)`` (NULs allowed if ``nul``).
    One regex scan, not a Python loop a byte: detect and resync run it on every message
    they vouch for (a server's first segment: a dozen ParameterStatus)."""
    n = min(end - off, 64)
    if n <= 0:
        return True
    return (_CONTROL_NO_NUL if nul else _CONTROL)(buf.view_at(off, n)) is None


def _valid_body(buf: LargeBuffer, t: int, off: int, end: int, client: bool) -> bool:
    """Is ``buf[off:end]`` a well-formed body of a ``t`` message from this side?"""
    ln = end - off
    try:
        if client:
            if t == 81:  # Q
                return ln >= 1 and buf.u8_at(end - 1) == 0 and _printable(buf, off, end - 1)
            if t == 80:  # P: name, query, int16 n, n oids
                p = _cstr_end(buf, off, end)
                q = _cstr_end(buf, p, end) if p > 0 else -1
                return q > 0 and q + 2 <= end and q + 2 + 4 * buf.i16be_at(q) == end \
                    and _printable(buf, p, q - 1)
            if t == 66:  # B
                p = _cstr_end(buf, off, end)
                if p < 0:
                    return False
                p = _cstr_end(buf, p, end)
                if p < 0 or p + 2 > end:
                    return False
                nf = buf.i16be_at(p)
                p += 2 + 2 * nf
                if nf < 0 or p + 2 > end:
                    return False
                npar = buf.i16be_at(p)
                p += 2
                if npar < 0:
                    return False
                for _ in range(npar):
                    if p + 4 > end:
                        return False
                    vl = buf.i32be_at(p)
                    p += 4 + max(vl, 0)
                    if vl < -1 or p > end:
                        return False
                if p + 2 > end:
                    return False
                return p + 2 + 2 * buf.i16be_at(p) == end
            if t == 69:  # E: portal, int32 max rows
                p = _cstr_end(buf, off, end)
                return p > 0 and p + 4 == end
            if t in (68, 67):  # D, C: 'S'|'P' + name
                return ln >= 2 and buf.u8_at(off) in (80, 83) and _cstr_end(buf, off + 1, end) == end
            if t in (83, 72, 88, 99):  # S H X c
                return ln == 0
            if t == 102:  # f
                return _cstr_end(buf, off, end) == end
            return t in (100, 112, 70)  # d p F: opaque
        if t == 82:  # R
            return ln >= 4 and buf.i32be_at(off) in (0, 2, 3, 5, 7, 8, 9, 10, 11, 12)
        if t == 83:  # S: name, value
            p = _cstr_end(buf, off, end)
            return p > 0 and _cstr_end(buf, p, end) == end and _printable(buf, off, p - 1)
        if t == 75:  # K: pid, secret key (4..256 bytes in 3.2)
            return 8 <= ln <= 260
        if t == 90:  # Z
            return ln == 1 and buf.u8_at(off) in (73, 84, 69)
        if t == 84:  # T
            n = buf.i16be_at(off)
            p = off + 2
            if n < 0:
                return False
            for _ in range(n):
                p = _cstr_end(buf, p, end)
                if p < 0:
                    return False
                p += 18
            return p == end
        if t == 68:  # D
            n = buf.i16be_at(off)
            p = off + 2
            if n < 0:
                return False
            for _ in range(n):
                if p + 4 > end:
                    return False
                vl = buf.i32be_at(p)
                p += 4 + max(vl, 0)
                if vl < -1:
                    return False
            return p == end
        if t == 67:  # C
            return _cstr_end(buf, off, end) == end and _printable(buf, off, end - 1)
        if t in (69, 78):  # E N: (code, cstr)* 0
            p = off
            while p < end:
                c = buf.u8_at(p)
                if c == 0:
                    return p + 1 == end
                p = _cstr_end(buf, p + 1, end)
                if p < 0:
                    return False
            return False
        if t in (73, 49, 50, 51, 110, 115, 99):  # I 1 2 3 n s c
            return ln == 0
        if t == 116:  # t
            return ln >= 2 and off + 2 + 4 * buf.i16be_at(off) == end
        if t in (71, 72, 87):  # G H W
            return ln >= 3 and buf.u8_at(off) in (0, 1) and off + 3 + 2 * buf.i16be_at(off + 1) == end
        if t == 65:  # A
            p = _cstr_end(buf, off + 4, end)
            return p > 0 and _cstr_end(buf, p, end) == end
        return t in (100, 118, 86)  # d v V
    except ValueError:
        return False


def _check_at(buf: LargeBuffer, off: int, client: bool) -> int:
    """At ``off``: 1 a complete valid message, 0 invalid, -1 undecided (need bytes)."""
    n = len(buf)
    if off + 5 > n:
        return -1
    t = buf.u8_at(off)
    if t not in (_CLIENT_HEAD if client else _SERVER_HEAD):
        return 0
    ln = buf.i32be_at(off + 1)
    if ln < 4 or ln > DETECT_MAX_LEN:
        return 0
    if off + 1 + ln > n:
        return -1
    return 1 if _valid_body(buf, t, off + 5, off + 1 + ln, client) else 0


def _chain(buf: LargeBuffer, off: int, client: bool) -> tuple[int, bool]:
    """Validate up to DETECT_CHAIN messages from ``off``: (verdict, saw a role-unique type)."""
    unique = False
    only = _CLIENT_ONLY if client else _SERVER_ONLY
    for _ in range(DETECT_CHAIN):
        r = _check_at(buf, off, client)
        if r != 1:
            if r == -1 and off + 5 <= len(buf) and unique:
                return 1, unique  # earlier messages proved it; the next is just long
            return r, unique
        unique = unique or buf.u8_at(off) in only
        off += 1 + buf.i32be_at(off + 1)
        if off == len(buf):
            return 1, unique
    return 1, unique


def _startup_verdict(buf: LargeBuffer) -> Detection:
    n = len(buf)
    if n < 8:
        if n == 0 or buf.u8_at(0) != 0:
            return Detection.NO
        return Detection.NEED_MORE
    ln = buf.i32be_at(0)
    code = buf.i32be_at(4)
    if code in (SSL_REQUEST, GSSENC_REQUEST):
        return Detection.REQUEST if ln == 8 else Detection.NO
    if code == CANCEL_REQUEST:
        return Detection.REQUEST if 16 <= ln <= 264 else Detection.NO
    if code >> 16 != PROTOCOL_MAJOR or ln < 9 or ln > MAX_STARTUP_LEN:
        return Detection.NO
    if n < ln:
        return Detection.NEED_MORE if _printable(buf, 8, n, True) else Detection.NO
    if buf.u8_at(ln - 1) != 0 or buf.find(b"user\0", 8, ln) < 0 or not _printable(buf, 8, ln - 1, True):
        return Detection.NO
    return Detection.REQUEST


def detect(buf: LargeBuffer, from_client: bool | None) -> Detection:
    """Startup packet, or (mid-stream) a chain of valid typed messages."""
    if len(buf) == 0:
        return Detection.NEED_MORE
    if from_client is not False:
        v = _startup_verdict(buf)
        if v != Detection.NO:
            return v
    verdicts = []
    for client in ((True,) if from_client else (False,) if from_client is False else (True, False)):
        r, unique = _chain(buf, 0, client)
        if r == 1 and (unique or from_client is not None):
            return Detection.REQUEST if client else Detection.RESPONSE
        verdicts.append(r)
    if -1 in verdicts or (1 in verdicts and len(buf) < 64):
        return Detection.NEED_MORE
    return Detection.NO


# -- the session ---------------------------------------------------------------------
class _Op:
    """A request waiting for its response: kind is the message type byte."""

    __slots__ = ("begun", "err_code", "err_msg", "info", "kind", "rows", "start")

    def __init__(self, kind: int, info: QueryInfo | None, start: int) -> None:
        self.kind = kind
        self.info = info
        self.start = start
        self.rows = 0
        self.err_code = ""
        self.err_msg = ""
        self.begun = False  #: its answer began (RowDescription, a CommandComplete of several)


#: What makes an op: _pgwire.Op, _Op's C twin (the same attributes, read and written alike),
#: made in one C call; _Op itself without the walker. An op a message, and _Op's __init__ is a
#: Python frame each time.
_new_op = _C.Op if _C is not None else _Op

_Q, _P, _B, _E, _D, _CLOSE, _S, _F = (ord(c) for c in "QPBEDCSF")
_CLIENT = SpanKind.CLIENT
_UNSET = StatusCode.UNSET
_ERROR = StatusCode.ERROR


class Session(_Session):
    protocol = NAME

    def __init__(self, conn: Conn) -> None:
        super().__init__(conn)
        s = conn.settings if isinstance(conn.settings, Settings) else Settings()
        self._sanitize = s.sanitize_query
        self._max_stmts = max(1, s.max_statements)
        self._max_portals = max(1, s.max_portals)
        self._sanitize_errors = s.sanitize_errors
        self._stmts: OrderedDict[bytes, QueryInfo] = OrderedDict()
        self._portals: OrderedDict[bytes, QueryInfo | None] = OrderedDict()
        self._unnamed: QueryInfo | None = None
        self._pending: deque[_Op] = PendingQueue(conn, start="start")
        self._batch_start = 0
        self._skip = [0, 0]          # bytes of a message still to skip, per direction
        self._resync = [False, True]  # look for a boundary before parsing
        self._startup = True          # the client may still send a startup packet
        self._ssl_wait = False        # SSLRequest/GSSENCRequest sent, 1-byte answer due
        self._stopped = False
        #: Per direction: nothing but typed messages due (no startup, TLS answer, resync, skip,
        #: stop): feed_whole's one test. Those states change only in feed and gap, which
        #: recompute it (``_replain``).
        self._plain = [False, False]
        self.namespace = ""
        self.user = ""

    # -- plumbing --------------------------------------------------------------------
    def feed(self, from_client: bool, buf: LargeBuffer, ts_ns: int) -> None:
        # Messages are walked with an offset and released once at the end: one
        # release per feed, not per message (a DataRow is a dozen bytes).
        d = 0 if from_client else 1
        heads = _CLIENT_HEAD if from_client else _SERVER_HEAD
        pos = 0
        want = 0
        c = _NO_CHUNK  # the chunk holding pos, from cs for clen bytes: headers read in place
        cs = clen = cts = 0
        fast = _C is not None
        try:
            while True:
                n = len(buf)
                if pos >= n:
                    return
                if self._stopped:
                    pos = n
                    return
                skip = self._skip[d]
                if skip:
                    k = skip if skip < n - pos else n - pos
                    pos += k
                    self._skip[d] = skip - k
                    continue
                if (self._startup if from_client else self._ssl_wait) or self._resync[d]:
                    # The rare paths work at offset 0 and release for themselves.
                    if pos:
                        buf.release(pos)
                        pos = 0
                    clen = 0  # offsets moved
                    if from_client and self._startup:
                        ok = self._feed_startup(buf)
                    elif not from_client and self._ssl_wait:
                        ok = self._ssl_answer(buf)
                    else:
                        ok = self._find_boundary(buf, from_client)
                    if not ok:
                        return
                    continue
                if n - pos < 5:
                    return
                rel = pos - cs
                if rel + 5 > clen:
                    c, cs = buf.chunk_at(pos)
                    clen = len(c)
                    rel = pos - cs
                    cts = buf.ts_at(pos)  # the arrival of the chunk holding pos
                if fast and rel + 5 <= clen:
                    # The whole messages in this chunk from pos in one C call, read as below
                    # (they all arrived with the chunk); the loop reads on from where it stops.
                    got = (_C.client if from_client else _C.server)(c[rel:], True)  # type: ignore[union-attr]
                    if got is None:
                        fast = False  # an unusual body: the rest of this feed is read below
                    elif got[0]:
                        if from_client:
                            self._client_records(got[1], cts)
                        else:
                            self._server_events(got[1], cts)
                        pos += got[0]
                        continue
                if rel + 5 <= clen:
                    t = c[rel]
                    ln = _I32BE(c, rel + 1)[0]
                else:  # the header straddles two chunks
                    t = buf.u8_at(pos)
                    ln = buf.i32be_at(pos + 1)
                if t not in heads or ln < 4:
                    self._resync[d] = True
                    raise Malformed(NAME, "bad_message", pos, f"type {t:#x} length {ln}")
                if ln > MAX_MESSAGE_LEN:
                    self._resync[d] = True
                    raise LimitExceeded(NAME, "message_too_large", pos, f"length {ln}")
                total = ln + 1
                body = ln - 4
                cap = heads[t]
                if body > cap:
                    body = cap
                if n - pos < 5 + body:
                    want = 5 + body  # what of the message is read is bounded by its cap
                    return
                # One view of the capped body (a straddling one: the buffer's scratch), read as
                # feed_whole reads its segment: every field bounded by the body, none overruns it.
                if from_client:
                    self._client_view(t, buf.view_at(pos + 5, body), 0, body, cts if rel < clen else buf.ts_at(pos))
                elif t == 68:  # DataRow, the common case: just count it
                    if self._pending:
                        self._pending[0].rows += 1
                elif t == 69:  # ErrorResponse: its fields read here, so _server_msg needs no buffer
                    self._server_error(*_error_fields_view(buf.view_at(pos + 5, body), 0, body),
                                       cts if rel < clen else buf.ts_at(pos))
                else:
                    self._server_msg(t, cts if rel < clen else buf.ts_at(pos))
                if self._stopped:
                    pos = len(buf)
                    return
                if n - pos >= total:
                    pos += total
                else:
                    self._skip[d] = total - (n - pos)
                    pos = n
        finally:
            buf.consumed(pos, want)
            self._replain()

    def _replain(self) -> None:
        live = not self._stopped
        self._plain = [live and not (self._skip[0] or self._resync[0] or self._startup),
                       live and not (self._skip[1] or self._resync[1] or self._ssl_wait)]

    def feed_whole(self, from_client: bool, data: memoryview, ts_ns: int) -> bool:
        """A segment of whole messages (base.py's contract), read in place without a buffer.

        Why: a session's segments are mostly whole (a Query; CommandComplete and
        ReadyForQuery; a Parse/Bind/Describe/Execute/Sync batch and its answers), and the
        buffer's append, chunk lookups and release cost more than the reads. Only in the
        plain state (no startup, TLS answer, resync or skip due) and when every header is
        one ``feed`` accepts and the last message ends with the segment; anything else
        returns False unchanged. Then each message is read as ``feed`` reads it, bodies
        capped alike, from the segment: a bad body raises what ``feed`` raises for it,
        after the same messages before it (the stage handles both alike).

        Before that state, the handshake's own whole segments (``_whole_handshake``)."""
        if not self._plain[0 if from_client else 1]:
            return self._whole_handshake(from_client, data, ts_ns)
        if _C is not None:
            # One C call frames the segment and reads every body as the loops below do:
            # False is their "not whole", None an unusual body they must read (and raise on).
            if from_client:
                recs = _C.client(data)
                if recs is False:
                    return False
                if recs is not None:
                    self._client_records(recs, ts_ns)
                    return True
            else:
                evs = _C.server(data)
                if evs is False:
                    return False
                if evs is not None:
                    self._server_events(evs, ts_ns)
                    return True
        if type(data) is not memoryview:  # the eBPF receiver's payloads are bytes
            data = memoryview(data)
        heads = _CLIENT_HEAD if from_client else _SERVER_HEAD
        n = len(data)
        pos = 0
        while pos < n:  # frame first: every header valid, the last message ending the segment
            if n - pos < 5:
                return False
            t = data[pos]
            ln = _I32BE(data, pos + 1)[0]
            if t not in heads or ln < 4 or ln > MAX_MESSAGE_LEN:
                return False
            pos += ln + 1
        if pos != n:
            return False
        pos = 0
        if from_client:
            view = self._client_view
            while pos < n:
                t = data[pos]
                ln = _I32BE(data, pos + 1)[0]
                body = ln - 4
                cap = heads[t]
                view(t, data, pos + 5, pos + 5 + (body if body < cap else cap), ts_ns)
                pos += ln + 1
        else:
            pend = self._pending
            while pos < n:
                t = data[pos]
                ln = _I32BE(data, pos + 1)[0]
                if t == 68:  # DataRow
                    if pend:
                        pend[0].rows += 1
                elif t == 69:
                    self._server_error(*_error_fields_view(data, pos + 5, pos + 1 + min(ln, 4 + MAX_ERROR_HEAD)),
                                       ts_ns)
                else:
                    self._server_msg(t, ts_ns)  # none reads its body
                pos += ln + 1
        return True

    def _whole_handshake(self, from_client: bool, data: memoryview, ts_ns: int) -> bool:
        """feed_whole before the plain state, for the segments a connection opens with: the
        SSLRequest's ``N`` answer, the startup packet, the server's first segment (read in the
        resync state, from its start). Each only exactly as ``feed`` would take it from an
        empty buffer (the whole segment, no drop), so the buffer is skipped four times a
        connection; anything else returns False unchanged, for ``feed``."""
        d = 0 if from_client else 1
        if self._skip[d] or self._stopped:
            return False
        n = len(data)
        if from_client:
            if not self._startup:
                if not self._resync[0] or _C is None or _C.boundary(data, True, min(n, RESYNC_WINDOW))[0] != 0:
                    return False
                return self._whole_resynced(True, data, ts_ns)
            if n < 8:
                return False
            ln = _I32BE(data, 0)[0]
            if ln != n or _I32BE(data, 4)[0] >> 16 != PROTOCOL_MAJOR or ln < 8 or ln > MAX_STARTUP_LEN:
                return False
            self._startup_fields(data if type(data) is memoryview else memoryview(data), 8, ln)
            self._startup = False
            self._resync[0] = False
        elif self._ssl_wait:
            if n != 1 or data[0] != 78:  # 'N': plaintext goes on
                return False
            self._ssl_wait = False
        else:
            if not self._resync[1] or _C is None or _C.boundary(data, False, min(n, RESYNC_WINDOW))[0] != 0:
                return False
            return self._whole_resynced(False, data, ts_ns)
        self._replain()
        return True

    def _whole_resynced(self, from_client: bool, data: memoryview, ts_ns: int) -> bool:
        """A segment in the resync state whose start is a boundary (``_find_boundary``'s scan
        found it at 0: no drop): the resync ends there and the segment is read as the plain
        state reads it, if it is whole messages the walker reads; else nothing changed."""
        got = (_C.client if from_client else _C.server)(data)  # type: ignore[union-attr]
        if got is False or got is None:
            return False
        self._resync[0 if from_client else 1] = False
        self._replain()
        if from_client:
            self._client_records(got, ts_ns)
        else:
            self._server_events(got, ts_ns)
        return True

    def gap(self, from_client: bool, ts_ns: int) -> None:
        d = 0 if from_client else 1
        self._skip[d] = 0
        self._resync[d] = True
        if from_client:
            self._startup = False
        self._ssl_wait = False
        self._replain()
        self._forget_pending("gap")

    def close(self, ts_ns: int, reset: bool = False) -> None:
        # base.py's rule: a query whose answer began (rows, a RowDescription, an error
        # without its ReadyForQuery) is a span of what was seen, marked incomplete; one
        # never answered is counted.
        for op in self._pending:
            if op.kind in (_Q, _E):
                if op.rows or op.err_code or op.begun:
                    self.cut_short(self._span(op, ts_ns, False))
                else:
                    self.cut_short(None, "no_response")
        self._pending.clear()
        self._batch_start = 0

    def _forget_pending(self, reason: str) -> None:
        for op in self._pending:
            if op.kind in (_Q, _E):
                self.conn.drop(reason)
        self._pending.clear()
        self._batch_start = 0

    def _prepared(self, name: bytes, info: QueryInfo, ts: int) -> None:
        """A Parse message's statement, kept by name (the unnamed one apart) for the Binds to come;
        the buffered and the in-place paths both call it."""
        if name:
            st = self._stmts
            st[name] = info
            st.move_to_end(name)
            if len(st) > self._max_stmts:
                st.popitem(last=False)
                self.conn.drop("statement_evicted")
        else:
            self._unnamed = info
        if not self._batch_start:
            self._batch_start = ts

    def _find_boundary(self, buf: LargeBuffer, client: bool) -> bool:
        """Release bytes up to the next message boundary; False if it needs more bytes."""
        d = 0 if client else 1
        n = len(buf)
        limit = min(n, RESYNC_WINDOW)
        first_undecided = -1
        found = -1
        c = buf.chunk_at(0)[0] if _C is not None else _NO_CHUNK
        if len(c) == n:  # the buffer in one view (a server's first segment): the scan in C
            found, first_undecided = _C.boundary(c, client, limit)  # type: ignore[union-attr]
        else:
            for off in range(limit):
                r, _ = _chain(buf, off, client)
                if r == 1:
                    found = off
                    break
                if r == -1 and first_undecided < 0:
                    first_undecided = off
        if found >= 0:
            if found:
                self.conn.drop("resync")
            buf.release(found)
            self._resync[d] = False
            return True
        if first_undecided >= 0 and n < RESYNC_WINDOW:
            if first_undecided:
                buf.release(first_undecided)
            return False
        # Nothing plausible in a whole window: give those bytes up (counted).
        keep = 4
        drop = n - keep if first_undecided < 0 else max(first_undecided, 1)
        if drop > 0:
            buf.release(drop)
            self.conn.drop("resync")
        return False

    # -- startup and TLS -----------------------------------------------------------------
    def _feed_startup(self, buf: LargeBuffer) -> bool:
        n = len(buf)
        if n < 8:
            if buf.u8_at(0) != 0:  # no startup packet: a typed message, mid-stream
                self._startup = False
                self._resync[0] = True
                return True
            return False
        ln = buf.i32be_at(0)
        code = buf.i32be_at(4)
        if code in (SSL_REQUEST, GSSENC_REQUEST) and ln == 8:
            buf.release(8)
            self._ssl_wait = True
            return True
        if code == CANCEL_REQUEST and 16 <= ln <= 264:
            # A cancel request opens its own connection and carries no query.
            self._startup = False
            if n < ln:
                return False
            buf.release(ln)
            return True
        if code >> 16 != PROTOCOL_MAJOR or ln < 8 or ln > MAX_STARTUP_LEN:
            self._startup = False
            if buf.u8_at(0) == 0 or code >> 16 == PROTOCOL_MAJOR:
                raise Malformed(NAME, "bad_startup", 0, f"length {ln} code {code}")
            self._resync[0] = True  # typed messages: we joined mid-stream
            return True
        if n < ln:
            return False
        self._startup_fields(buf.view_at(0, ln), 8, ln)  # bounded: MAX_STARTUP_LEN
        buf.release(ln)
        self._startup = False
        self._resync[0] = False
        return True

    def _startup_fields(self, data: memoryview, off: int, end: int) -> None:
        """User and database of a startup packet held in one view (its parameters from ``off``)."""
        user = database = ""
        while off < end:
            k = _cstr_end_view(data, off, end)
            if k < 0 or k == off + 1:
                break
            v = _cstr_end_view(data, k, end)
            if v < 0:
                break
            key = data[off:k - 1]
            if key == b"user":
                user = _text_view(data, k, v - 1)
            elif key == b"database":
                database = _text_view(data, k, v - 1)
            off = v
        self.user = user
        self.namespace = database or user  # the server's default database is the user's name

    def _ssl_answer(self, buf: LargeBuffer) -> bool:
        b = buf.u8_at(0)
        self._ssl_wait = False
        if b == 78:  # 'N': plaintext continues, the client sends its startup next
            buf.release(1)
            return True
        if b in (83, 71):  # 'S' TLS, 'G' GSSAPI encryption: nothing readable follows
            self._stopped = True
            self.conn.drop("tls")
            buf.release(len(buf))
            return True
        return True  # 'E' from a pre-SSL server: an ErrorResponse, parsed as usual

    # -- client messages ---------------------------------------------------------------
    def _client_view(self, t: int, data: memoryview, off: int, end: int, ts: int) -> None:
        """A client message's (capped) body in one view: the segment's own (feed_whole) or the
        buffer's (feed). Names are copied (cache keys), the query decoded once (sql.py)."""
        if t == _Q:
            z = _cstr_end_view(data, off, end)
            op = _new_op(_Q, _info(decode_query(data[off:(z - 1) if z > 0 else end]), self._sanitize), ts)
        elif t == _P:
            p = _cstr_end_view(data, off, end)
            if p < 0:
                raise Malformed(NAME, "bad_parse", off)
            name = data[off:off + min(p - 1 - off, MAX_NAME)].tobytes()  # kept: a cache key
            z = _cstr_end_view(data, p, end)
            info = _info(decode_query(data[p:(z - 1) if z > 0 else end]), self._sanitize)
            self._prepared(name, info, ts)
            op = _new_op(_P, info, ts)
        elif t == _B:
            p = _cstr_end_view(data, off, end)
            if p < 0:
                raise Malformed(NAME, "bad_bind", off)
            q = _cstr_end_view(data, p, end)
            if q < 0:
                raise Malformed(NAME, "bad_bind", p)
            info = self._stmts.get(data[p:q - 1].tobytes()) if q - 1 > p else self._unnamed
            op = self._bound(data[off:p - 1].tobytes(), info, ts)
        elif t == _E:
            p = _cstr_end_view(data, off, end)
            info = self._portals.get(data[off:p - 1 if p > 0 else end].tobytes())
            start = self._batch_start or ts
            self._batch_start = 0
            op = _new_op(_E, info, start)
        elif t == _CLOSE:
            kind = data[off] if end > off else 0
            p = _cstr_end_view(data, off + 1, end)
            if p > 0:
                (self._stmts if kind == 83 else self._portals).pop(data[off + 1:p - 1].tobytes(), None)
            op = _new_op(_CLOSE, None, ts)
        elif t == _S or t == _F or t == _D:
            op = _new_op(t, None, ts)
        else:
            return  # H (Flush), X (Terminate: no span), d/c/f (COPY data), p (auth): nothing to pair
        pend = self._pending
        pend.append(op)
        if len(pend) > MAX_PENDING:
            pend.popleft()
            self.conn.drop("pending_overflow")

    def _bound(self, portal: bytes, info: QueryInfo | None, ts: int) -> _Op:
        """A Bind of ``portal`` to a statement (its analysis ``info``): the portal cache, in LRU
        order, and the extended batch's start; the op that awaits BindComplete."""
        pt = self._portals
        pt[portal] = info
        pt.move_to_end(portal)
        if len(pt) > self._max_portals:
            pt.popitem(last=False)
        if not self._batch_start:
            self._batch_start = ts
        return _new_op(_B, info, ts)

    def _client_records(self, recs: tuple, ts: int) -> None:
        """What ``_client_view`` does for each message of a segment, from _pgwire.client's records
        (names already copied, bounds already found): the same caches, ops and drops, in order.
        Written out rather than calling a helper a message: the call is most of a Sync's cost."""
        pend = self._pending
        san = self._sanitize
        memo = _INFOS[san]
        for r in recs:
            t = r[0]
            if t == _B:
                stmt = r[2]
                op = self._bound(r[1], self._stmts.get(stmt) if stmt else self._unnamed, ts)
            elif t == _E:
                start = self._batch_start or ts
                self._batch_start = 0
                op = _new_op(_E, self._portals.get(r[1]), start)
            elif t == _Q:
                info = memo.get(r[1])
                op = _new_op(_Q, _analyze(r[1], san) if info is None else info, ts)
            elif t == _P:
                info = memo.get(r[2])
                if info is None:
                    info = _analyze(r[2], san)
                self._prepared(r[1], info, ts)
                op = _new_op(_P, info, ts)
            elif t == _CLOSE:
                if r[2] is not None:
                    (self._stmts if r[1] == 83 else self._portals).pop(r[2], None)
                op = _new_op(_CLOSE, None, ts)
            else:  # S, D, F
                op = _new_op(t, None, ts)
            pend.append(op)
            if len(pend) > MAX_PENDING:
                pend.popleft()
                self.conn.drop("pending_overflow")

    def _server_events(self, evs: tuple, ts: int) -> None:
        """What feed_whole's server loop does, from _pgwire.server's events: a run of DataRows
        counted at once (nothing between them can change the head), ErrorResponse fields as
        the walker read them, the common pairings inline and the rest through ``_server_msg``."""
        pend = self._pending
        it = iter(evs)
        for t in it:
            if t < 0:
                if pend:
                    pend[0].rows -= t
            elif t == 69:  # the SQLSTATE and message follow, read by the walker
                code = next(it)
                self._server_error(code, next(it), ts)
            elif not pend:  # nothing awaits an answer: _server_msg would do nothing
                continue
            else:  # _server_msg's common cases written out (a call per message costs as much)
                head = pend[0]
                hk = head.kind
                if t == 67:  # CommandComplete
                    if hk == _E:
                        self._span(pend.popleft(), ts)
                    elif hk == _Q:
                        head.begun = True
                elif t == 90:  # ReadyForQuery
                    if hk == _Q:
                        self._span(pend.popleft(), ts)
                    elif hk == _S:
                        pend.popleft()
                    else:
                        self._server_msg(t, ts)
                elif t == 49:  # ParseComplete
                    if hk == _P:
                        pend.popleft()
                elif t == 50:  # BindComplete
                    if hk == _B:
                        pend.popleft()
                elif t == 84 or t == 110:  # RowDescription, NoData
                    if hk == _D:
                        pend.popleft()
                    elif hk == _Q or hk == _E:
                        head.begun = True
                else:
                    self._server_msg(t, ts)

    # -- server messages -----------------------------------------------------------------
    def _server_msg(self, t: int, ts: int) -> None:
        """A server message other than ErrorResponse (``_server_error``): none reads its body."""
        pend = self._pending
        head = pend[0] if pend else None
        hk = head.kind if head is not None else 0
        if t == 68:  # D DataRow
            if head is not None:
                head.rows += 1
        elif t == 67:  # C CommandComplete
            if hk == _E:
                pend.popleft()
                self._span(head, ts)  # type: ignore[arg-type]
            elif hk == _Q:
                head.begun = True  # type: ignore[union-attr]
        elif t == 90:  # Z ReadyForQuery: ends a Q or a Sync group
            while pend:
                op = pend.popleft()
                if op.kind == _Q:
                    self._span(op, ts)
                    break
                if op.kind == _S:
                    break
                if op.kind == _E:  # answered nothing before Sync: lost, count it
                    self.conn.drop("unpaired")
        elif t in (49, 50, 51):  # 1 2 3: Parse/Bind/CloseComplete
            want = _P if t == 49 else _B if t == 50 else _CLOSE
            if hk == want:
                pend.popleft()
        elif t in (84, 110):  # T RowDescription, n NoData: answer Describe
            if hk == _D:
                pend.popleft()
            elif hk == _Q or hk == _E:
                head.begun = True  # type: ignore[union-attr]
        elif t in (73, 115):  # I EmptyQuery, s PortalSuspended
            if hk == _E:
                pend.popleft()
                self._span(head, ts)  # type: ignore[arg-type]
        elif t == 86:  # V FunctionCallResponse
            if hk == _F:
                pend.popleft()
        # R S K N A t G H W d c v: nothing to pair.

    def _server_error(self, code: str, msg: str, ts: int) -> None:
        """An ErrorResponse (SQLSTATE ``code``, message ``msg``): it ends a simple query's
        answer's error, or the extended-protocol request the server gave up on."""
        pend = self._pending
        head = pend[0] if pend else None
        hk = head.kind if head is not None else 0
        if hk == _Q:
            if not head.err_code:  # type: ignore[union-attr]
                head.err_code, head.err_msg = code, msg  # type: ignore[union-attr]
            return
        # Extended protocol: the server discards everything up to Sync.
        target: _Op | None = None
        while pend and pend[0].kind != _S:
            op = pend.popleft()
            if target is None or (target.kind != _E and op.kind == _E):
                target = op if op.kind in (_E, _P, _B) else target
        if target is not None:
            target.err_code, target.err_msg = code, msg
            self._span(target, ts)

    def _span(self, op: _Op, end_ts: int, emit: bool = True) -> Span:
        """The span of ``op`` ending at ``end_ts``, emitted unless ``emit`` is False."""
        base = _BASES.get((op.info, self.namespace))
        if base is None:
            base = _span_base(op.info, self.namespace)
        name = base[0]
        attrs = base[1].copy()
        if op.rows:
            attrs["db.response.returned_rows"] = op.rows
        status = _UNSET
        if op.err_code:
            attrs["db.response.status_code"] = op.err_code
            attrs["error.type"] = op.err_code
            status = _ERROR
        msg = op.err_msg
        if msg and self._sanitize_errors:
            msg = _sanitized(msg)
        conn = self.conn
        # Positional (traceparent None): keywords cost a third of the call.
        span = conn.span(name, conn.kind_for(_CLIENT), op.start, end_ts, attrs, None, status, msg)
        if emit:
            conn.emit(span)
        return span


def _text_view(data: memoryview, off: int, end: int) -> str:
    # Small fields kept on the span: a deliberate, bounded copy.
    return str(data[off:off + min(end - off, MAX_NAME)], "utf-8", "replace")


def _cstr_end_view(data: memoryview, off: int, end: int) -> int:
    """``_cstr_end`` within one view: just past the NUL at or after ``off``, or -1."""
    if off >= end:
        return -1
    if data[off] == 0:
        return off + 1
    z = _NO_NUL(data, off, end).end()
    return z + 1 if z < end else -1


def _error_fields_view(data: memoryview, off: int, end: int) -> tuple[str, str]:
    """SQLSTATE and message of an ErrorResponse body in one view (possibly cut at its head cap)."""
    code = msg = ""
    p = off
    while p < end:
        c = data[p]
        if c == 0:
            break
        z = _cstr_end_view(data, p + 1, end)
        stop = (z - 1) if z > 0 else end
        if c == 67:  # 'C'
            code = str(data[p + 1:p + 1 + min(stop - p - 1, 5)], "ascii", "replace")
        elif c == 77:  # 'M'
            msg = str(data[p + 1:stop], "utf-8", "replace")
        if z < 0:
            break
        p = z
    return code, msg
