"""FastCGI: one HTTP-style SERVER span per request, from the web server <-> app records.

Contract: processors/protocols/base.py. Records (8-byte header, content,
padding) are read in place; requests are multiplexed by request id. PARAMS
content, which may be split anywhere across records, is collected as views of
the payload chunks (``LargeBuffer.views``: no copy) and decoded once the empty
PARAMS record ends the stream; only the parameters a span uses are copied
out. STDIN and the STDOUT body are counted, never read; the STDOUT head is
read only up to the blank line, for ``Status:``. STDERR is kept as span events.

The span is the app's view of an HTTP request (design.md §3, FastCGI row):
method, path, query, scheme, the HTTP server's port and the client address from
the params; status from ``Status:`` (200 when absent); 5xx -> ERROR. An
END_REQUEST with a protocol status other than REQUEST_COMPLETE, or an
ABORT_REQUEST, is an error too.
"""

from __future__ import annotations

import re
import struct
from typing import Any, ClassVar

from processors.protocols.base import Conn, Detection, PendingMap, Perspective, ProtocolSettings, Session
from processors.protocols.errors import LimitExceeded, Malformed
from processors.protocols.sanitize import redact_query
from service.largebuf import LargeBuffer
from service.model import SpanEvent, SpanKind, StatusCode
from service.speedups import load as _load_speedup

NAME = "fastcgi"
DEFAULT_PORTS = frozenset({9000, 9001})

BEGIN_REQUEST, ABORT_REQUEST, END_REQUEST, PARAMS, STDIN, STDOUT, STDERR, DATA = range(1, 9)
GET_VALUES, GET_VALUES_RESULT, UNKNOWN_TYPE = 9, 10, 11
_TYPES = frozenset(range(1, 12))
_HDR = struct.Struct(">BBHHBB")  # version, type, requestId, contentLength, paddingLength, reserved
_END = struct.Struct(">iB")  # END_REQUEST: appStatus, protocolStatus
_HDR_AT = _HDR.unpack_from
_END_AT = _END.unpack_from
_NO_CHUNK = memoryview(b"")
#: The C walk of a segment's records and of a PARAMS stream (processors/protocols/_fcgi.c), or
#: None (WIRESPAN_PURE_PYTHON=1, not built): the Python code below is the reference either way,
#: and runs wherever the C declines. Read at each call, so a test can set it to None.
_C = _load_speedup("processors.protocols._fcgi")

#: A PARAMS stream larger than this is refused (nginx sends ~1-2 KB; Apache's
#: mod_proxy_fcgi caps the whole header set at 8 KB by default).
MAX_PARAMS = 256 * 1024
#: Bytes of STDOUT searched for the end of the response head.
MAX_HEAD = 64 * 1024
#: Requests in flight on one connection (nginx multiplexes rarely; php-fpm never).
MAX_REQUESTS = 1024
#: STDERR kept per request, as span events.
MAX_STDERR_EVENTS = 8
MAX_STDERR_BYTES = 1024
_PROTOCOL_STATUS = {0: "REQUEST_COMPLETE", 1: "CANT_MPX_CONN", 2: "OVERLOADED", 3: "UNKNOWN_ROLE"}
#: The parameters ``_span`` reads: only these are copied out of the PARAMS stream.
_WANTED = frozenset({
    b"REQUEST_METHOD", b"REQUEST_URI", b"SCRIPT_NAME", b"QUERY_STRING", b"SERVER_PORT",
    b"SERVER_NAME", b"REMOTE_ADDR", b"REMOTE_PORT", b"SERVER_PROTOCOL", b"REQUEST_SCHEME",
    b"HTTPS", b"HTTP_USER_AGENT", b"HTTP_TRACEPARENT", b"HTTP_HOST", b"DOCUMENT_URI",
})


class Settings(ProtocolSettings):
    #: Keep STDERR output as span events.
    stderr_events: bool = True
    #: Values of sensitive query parameters become ``REDACTED`` in ``url.query`` (``sanitize.py``).
    sanitize_query: bool = True


#: Members as module constants: detect runs once a connection, and nginx opens one a request.
_NEED_MORE, _NO, _REQUEST, _RESPONSE = Detection.NEED_MORE, Detection.NO, Detection.REQUEST, Detection.RESPONSE
_CLIENT_VIEW = Perspective.CLIENT
_CLIENT_KIND, _SERVER_KIND = SpanKind.CLIENT, SpanKind.SERVER
_UNSET, _ERROR = StatusCode.UNSET, StatusCode.ERROR
_NO_PARAMS = {}.get  # a request whose PARAMS never ended: every parameter absent


def detect(buf: LargeBuffer, from_client: bool | None) -> Detection:
    n = len(buf)
    if n < 8:
        return _NEED_MORE
    # The header and a BEGIN_REQUEST's role, read from the first chunk where it holds them (the
    # segment that opened the connection: view_at's lookups cost more than the reads). Fewer
    # than 10 bytes come in at most 9 chunks before the answer is not NEED_MORE: chunks() is short.
    v = buf.chunks()[0]
    if len(v) < 10:
        v = buf.view_at(0, 10 if n >= 10 else 8)
    version, t, rid, clen, _plen, reserved = _HDR_AT(v)
    if version != 1 or reserved != 0:
        return _NO
    if t == BEGIN_REQUEST and clen == 8 and from_client is not False:
        if n < 10:
            return _NEED_MORE
        return _REQUEST if (v[8] << 8 | v[9]) in (1, 2, 3) and rid != 0 else _NO
    if t == GET_VALUES and rid == 0 and from_client is not False:
        return _REQUEST
    if t in (STDOUT, STDERR, END_REQUEST) and rid != 0 and from_client is not True:
        return _RESPONSE
    return _NO


def _gathered(held: LargeBuffer | memoryview | None, vs: list[memoryview]) -> LargeBuffer:
    """A stream held as one record's view (or nothing), now with more records: a buffer of the
    views (PARAMS and the STDOUT head alike; still no copy)."""
    if type(held) is not LargeBuffer:
        lb = LargeBuffer()
        if held is not None:
            lb.append(held)
        held = lb
    for v in vs:
        held.append(v)
    return held


class _Req:
    """A request in flight. ``params`` and ``head`` hold what arrived of the PARAMS stream and
    of the STDOUT head: None before any, the one record's view while there is one (the usual
    request: decoded, or searched, in place), a ``LargeBuffer`` of views from the second on.
    Nothing is allocated for them until a record comes (issue 21: two buffers a request)."""

    __slots__ = ("aborted", "head", "head_done", "head_len", "params", "params_done", "start_ts", "status",
                 "stderr", "stdin", "stdout")

    def __init__(self, start_ts: int) -> None:
        self.start_ts = start_ts
        self.params: LargeBuffer | memoryview | None = None
        self.params_done = False  # the empty PARAMS record came: ``done`` holds the decoded pairs
        self.head: LargeBuffer | memoryview | None = None  # STDOUT until the blank line is found
        self.head_done = False
        self.head_len = 0
        #: The head's status code once read (the C walk reads it with the head, and then keeps
        #: no view of it); 0 until then: ``_status`` reads it from ``head`` at the span.
        self.status = 0
        self.stdout = 0
        self.stdin = 0
        self.stderr: list[SpanEvent] = []
        self.aborted = False


_WANTED_LENGTHS = frozenset(len(w) for w in _WANTED)


def _pairs(buf: LargeBuffer) -> dict[bytes, bytes]:
    """The wanted pairs of a PARAMS stream held in a buffer of views (``_wanted_pairs`` of one
    view over it: gathered into the buffer's scratch only when the stream spans chunks,
    bounded by MAX_PARAMS)."""
    return _wanted_pairs(buf.view_at(0, len(buf)))


def _wanted_pairs(mv: memoryview) -> dict[bytes, bytes]:
    """The wanted name-value pairs of the PARAMS stream ``mv`` (``_walk_pairs``'s answer).

    Why a second loop: nginx sends 20-40 pairs, of which a few are wanted, and nearly all
    have two one-byte lengths. This loop reads only such pairs, with no bound check per
    pair: at a four-byte length, a stream cut inside a pair (IndexError) or a pair overrunning
    the stream (the end is not met exactly) it gives up, and ``_walk_pairs`` decides from the
    start (the same pairs, or its error at its offset). A name is copied only when its
    length is a wanted name's.
    """
    c = _C
    if c is not None:
        got = c.pairs(mv)  # None: malformed, and the walk below raises with its reason
        if got is not None:
            return got
    n = len(mv)
    out: dict[bytes, bytes] = {}
    i = 0
    wanted_lengths = _WANTED_LENGTHS
    wanted = _WANTED
    try:
        while i < n:
            nlen = mv[i]
            vlen = mv[i + 1]
            if (nlen | vlen) & 0x80:
                break  # a four-byte length: the walk reads it
            i += 2
            if nlen in wanted_lengths:
                name = mv[i:i + nlen].tobytes()  # a short parameter name
                if name in wanted:
                    out[name] = mv[i + nlen:i + nlen + vlen].tobytes()  # a kept value (< 128 bytes)
            i += nlen + vlen
    except IndexError:
        pass
    if i == n:
        return out
    return _walk_pairs(mv)


def _walk_pairs(mv: memoryview) -> dict[bytes, bytes]:
    """Decode FastCGI name-value pairs (1- or 4-byte lengths); keep only the wanted ones.

    The reference walk, every length checked: bad input is ``Malformed`` at the offset of
    the length or pair at fault. A name is copied only when its length is that of a wanted
    name.
    """
    n = len(mv)
    out: dict[bytes, bytes] = {}
    i = 0
    wanted_lengths = _WANTED_LENGTHS
    while i < n:
        b = mv[i]
        if b < 0x80:
            nlen = b
            i += 1
        else:
            if i + 4 > n:
                raise Malformed(NAME, "bad_params", i, "truncated name length")
            nlen = int.from_bytes(mv[i:i + 4], "big") & 0x7FFFFFFF
            i += 4
        if i >= n:
            raise Malformed(NAME, "bad_params", i, "truncated value length")
        b = mv[i]
        if b < 0x80:
            vlen = b
            i += 1
        else:
            if i + 4 > n:
                raise Malformed(NAME, "bad_params", i, "truncated value length")
            vlen = int.from_bytes(mv[i:i + 4], "big") & 0x7FFFFFFF
            i += 4
        if i + nlen + vlen > n:
            raise Malformed(NAME, "bad_params", i, "pair overruns the stream")
        if nlen in wanted_lengths:
            name = mv[i:i + nlen].tobytes()  # a short parameter name
            if name in _WANTED:
                out[name] = mv[i + nlen:i + nlen + min(vlen, 2048)].tobytes()  # a kept value, bounded
        i += nlen + vlen
    return out


#: The response head's first ``Status:`` line with something after the colon (the walk's
#: ``e - p > 7``), its newline inside the head: a line start is 0 or after a newline (re.M),
#: the name ASCII case-insensitive as ``bytes.lower`` (a bytes pattern's re.I).
_STATUS_LINE = re.compile(rb"^status:([^\n]+)\n", re.I | re.M).search
_HEAD_END_CRLF = re.compile(rb"\r\n\r\n").search
_HEAD_END_LF = re.compile(rb"\n\n").search


def _status_code(line: bytes) -> int:
    """The code of a ``Status:`` line's value (its first 64 bytes), 200 when it is no number."""
    try:
        return int(line.strip().split(b" ", 1)[0])
    except ValueError:
        return 200


def _status_in_view(v: memoryview, head_len: int) -> int:
    """``Session._status`` of a head lying in one view: one regex search instead of a
    buffer search per line (the same line, the same code)."""
    m = _STATUS_LINE(v, 0, head_len)
    if m is None:
        return 200
    a = m.start(1)
    return _status_code(v[a:a + min(m.end(1) - a, 64)].tobytes())


class Session(Session):  # type: ignore[no-redef]
    protocol: ClassVar[str] = NAME

    def __init__(self, conn: Conn) -> None:
        self.conn = conn  # base Session.__init__, without the call: nginx opens a connection a request
        self.settings: Settings = conn.settings if isinstance(conn.settings, Settings) else Settings()
        self.reqs: dict[int, _Req] = PendingMap(conn)
        self.done: dict[int, dict[bytes, bytes]] = {}  # params of requests whose span is pending

    def feed(self, from_client: bool, buf: LargeBuffer, ts_ns: int) -> None:
        # Records are walked with a cursor and released once at the end (a release per record
        # re-sliced the chunk list). A record lying in one chunk is read from that chunk's view
        # with struct (one chunk lookup and arrival time per chunk); one across chunks from
        # the buffer's views. Error offsets are from the start of the record at fault, as when
        # each record was released before the next.
        off = 0
        n = len(buf)
        hdr = _HDR.unpack_from
        c = _NO_CHUNK  # the chunk holding off, from cs for clen bytes
        cs = cl = cts = 0
        want = 0
        try:
            while n - off >= 8:
                rel = off - cs
                if rel < 0 or rel + 8 > cl:
                    c, cs = buf.chunk_at(off)
                    cl = len(c)
                    rel = off - cs
                    cts = buf.ts_at(off)
                if rel + 8 <= cl:
                    version, t, rid, clen, plen, _ = hdr(c, rel)
                else:  # the header straddles two chunks
                    version, t, rid, clen, plen, _ = hdr(buf.view_at(off, 8))
                if version != 1 or t not in _TYPES:
                    raise Malformed(NAME, "bad_record", 0, f"version {version} type {t}")
                total = 8 + clen + plen
                if n - off < total:
                    want = total
                    return  # records are at most 65,543 bytes: waiting for one is bounded
                if rel + 8 + clen <= cl:
                    self._record(t, rid, [c[rel + 8:rel + 8 + clen]] if clen else [], clen, cts, ts_ns)
                else:
                    self._record(t, rid, buf.views(off + 8, clen), clen, buf.ts_at(off), ts_ns)
                off += total
        finally:
            buf.consumed(off, want)

    def feed_whole(self, from_client: bool, data: memoryview, ts_ns: int) -> bool:
        """A segment of whole records (base.py's contract), read in place without a buffer.

        The framing is checked first (version 1, known types, complete records ending
        exactly with the segment): only then is anything done, record by record as ``feed``
        does it. Anything else returns False unchanged. The usual records are handled here as
        ``_record`` and ``_params`` handle them (no call, no list of views): BEGIN_REQUEST
        below the request bound, STDIN, END_REQUEST, a PARAMS stream of one record and its
        end, a head ending in its first STDOUT record; other STDOUT goes to ``_head``, anything
        else to ``_record``.
        """
        c = _C
        if c is not None:
            r = c.walk(data)  # False: not whole records; None: not the one shape _fcgi.c takes
            if r is False:
                return False
            if r is not None and self._walked(r, ts_ns):
                return True
        if type(data) is not memoryview:  # the eBPF receiver's payloads are bytes
            data = memoryview(data)
        n = len(data)
        hdr = _HDR_AT
        types = _TYPES
        off = 0
        recs = []
        try:
            while off < n:
                version, t, rid, clen, plen, _ = hdr(data, off)
                if version != 1 or t not in types:
                    return False
                recs.append((t, rid, off + 8, clen))
                off += 8 + clen + plen
        except struct.error:  # a header cut by the segment's end
            return False
        if off != n:
            return False
        reqs = self.reqs
        for t, rid, p, clen in recs:
            if t == BEGIN_REQUEST and len(reqs) < MAX_REQUESTS:
                reqs[rid] = _Req(ts_ns)
                continue
            if not rid or t < END_REQUEST or t > STDOUT:  # ABORT, STDERR, DATA, management, a full map
                self._record(t, rid, [data[p:p + clen]] if clen else [], clen, ts_ns, ts_ns)
                continue
            req = reqs.get(rid)
            if req is None:
                self.conn.drop("unknown_request_id")
            elif t == STDIN:
                req.stdin += clen
            elif t == PARAMS:
                held = req.params
                if req.params_done:
                    pass
                elif clen and held is None and clen <= MAX_PARAMS:  # the stream's first record: held as it is
                    req.params = data[p:p + clen]
                    reqs.charge(rid, clen)
                elif not clen and type(held) is memoryview:  # its end, after one record
                    req.params = None
                    req.params_done = True
                    self.done[rid] = _wanted_pairs(held)
                else:
                    self._params(rid, req, [data[p:p + clen]] if clen else [], clen)
            elif t == STDOUT:
                req.stdout += clen
                if clen and not req.head_done:
                    v = data[p:p + clen]
                    m = _HEAD_END_CRLF(v, 0, clen if clen < MAX_HEAD else MAX_HEAD) if req.head is None else None
                    if m is not None:  # _head's first case: the head ends in the first record
                        req.head, req.head_done, req.head_len = v, True, m.start() + 4
                    else:
                        self._head(req, [v])
            else:  # END_REQUEST
                app_status, proto = _END_AT(data, p) if clen >= 5 else (0, 0)
                reqs.pop(rid, None)
                self._span(rid, req, app_status, proto, ts_ns)
        return True

    def _walked(self, r: tuple, ts_ns: int) -> bool:
        """Do what the loop of ``feed_whole`` does with a segment of one request's records, from
        the C walk's summary of it (_fcgi.c's contract), in the records' order: BEGIN, the PARAMS
        stream, STDIN, STDOUT (its head read), END; STDERR, wherever it came, only adds events
        (``_record``'s). False, having changed nothing, when this
        request's state is not the one the summary assumes (no request and no BEGIN, the
        request map full, PARAMS or a head already held from an earlier segment): the Python
        loop then takes the segment record by record, counting what it counts."""
        rid, begin, params, plen, stdin, stdout, head_len, status, end, app_status, proto, errs = r
        reqs = self.reqs
        if begin:
            if len(reqs) >= MAX_REQUESTS:
                return False  # _record evicts the oldest, counted
            req = _Req(ts_ns)
        else:
            req = reqs.get(rid)
            if req is None:
                return False  # each record is counted unknown_request_id
            if (type(params) is dict and not req.params_done and req.params is not None) or \
                    (head_len and not req.head_done and req.head is not None):
                return False
        if begin:
            reqs[rid] = req
        if errs is not None and self.settings.stderr_events:
            events = req.stderr
            for raw in errs:
                if len(events) >= MAX_STDERR_EVENTS:
                    break
                events.append(SpanEvent("fastcgi.stderr", ts_ns, {"message": raw.decode("utf-8", "replace")}))
        if params is not None and not req.params_done:
            if type(params) is dict:  # one record and the end: held, charged, decoded (feed_whole)
                reqs.charge(rid, plen)
                req.params_done = True
                self.done[rid] = params
            else:  # the end record alone
                self._params(rid, req, [], 0)
        if stdin:
            req.stdin += stdin
        if stdout:
            req.stdout += stdout
            if head_len and not req.head_done:
                req.head_done, req.head_len, req.status = True, head_len, status
        if end:
            reqs.pop(rid, None)
            self._span(rid, req, app_status, proto, ts_ns)
        return True

    def _record(self, t: int, rid: int, vs: list[memoryview], clen: int, start_ts: int, ts_ns: int) -> None:
        """One record's content, ``clen`` bytes as the views ``vs`` (one in the common case;
        they stay valid after the release: PARAMS and the STDOUT head keep them)."""
        if t == BEGIN_REQUEST:
            if len(self.reqs) >= MAX_REQUESTS:
                self.reqs.pop(next(iter(self.reqs)))
                self.conn.drop("too_many_requests")
            self.reqs[rid] = _Req(start_ts)
            return
        if t in (GET_VALUES, GET_VALUES_RESULT, UNKNOWN_TYPE) or rid == 0:
            return  # management records: no span
        req = self.reqs.get(rid)
        if req is None:
            self.conn.drop("unknown_request_id")
            return
        if t == PARAMS:
            self._params(rid, req, vs, clen)
        elif t in (STDIN, DATA):
            req.stdin += clen
        elif t == STDOUT:
            req.stdout += clen
            if not req.head_done and clen:
                self._head(req, vs)
        elif t == STDERR:
            if clen and self.settings.stderr_events and len(req.stderr) < MAX_STDERR_EVENTS:
                k = min(clen, MAX_STDERR_BYTES)
                raw = vs[0][:k].tobytes() if len(vs[0]) >= k else b"".join(v.tobytes() for v in vs)[:k]
                req.stderr.append(SpanEvent("fastcgi.stderr", ts_ns, {"message": raw.decode("utf-8", "replace")}))
        elif t == ABORT_REQUEST:
            req.aborted = True
        elif t == END_REQUEST:
            if clen >= 5:
                v = vs[0] if len(vs[0]) >= 5 else memoryview(b"".join(v.tobytes() for v in vs)[:5])
                app_status, proto = _END_AT(v)
            else:
                app_status = proto = 0
            self.reqs.pop(rid, None)
            self._span(rid, req, app_status, proto, ts_ns)

    def _params(self, rid: int, req: _Req, vs: list[memoryview], clen: int) -> None:
        """A PARAMS record: content is held (one record's view as it is, more in a buffer of
        views) and charged to the request; the empty record ends the stream and decodes it."""
        if req.params_done:
            return
        held = req.params
        if clen == 0:
            req.params = None
            req.params_done = True
            if held is None:
                self.done[rid] = {}
            elif type(held) is memoryview:
                self.done[rid] = _wanted_pairs(held)
            else:
                self.done[rid] = _pairs(held)  # type: ignore[arg-type]
            return
        if (0 if held is None else len(held)) + clen > MAX_PARAMS:
            self.reqs.pop(rid, None)
            raise LimitExceeded(NAME, "params_too_large", 0)
        if held is None and len(vs) == 1:
            req.params = vs[0]
        else:
            req.params = _gathered(held, vs)
        self.reqs.charge(rid, clen)  # the params are held until the request ends

    def _head(self, req: _Req, vs: list[memoryview]) -> None:
        """STDOUT content while the head's blank line is not found: look for it. The first
        record's one view is searched in place (the usual response: its head is there); from
        the second record on, the views are collected in a buffer and searched there."""
        head = req.head
        if head is None and len(vs) == 1:
            v = vs[0]
            lim = len(v) if len(v) < MAX_HEAD else MAX_HEAD
            m = _HEAD_END_CRLF(v, 0, lim)
            if m is not None:
                req.head, req.head_done, req.head_len = v, True, m.start() + 4
                return
            m = _HEAD_END_LF(v, 0, lim)
            if m is not None:
                req.head, req.head_done, req.head_len = v, True, m.start() + 2
                return
            if len(v) > MAX_HEAD:
                req.head_done = True  # no head: treat all as body
            else:
                req.head = v
            return
        req.head = head = _gathered(head, vs)
        end = head.find(b"\r\n\r\n", 0, MAX_HEAD)  # type: ignore[union-attr]
        if end < 0:
            end = head.find(b"\n\n", 0, MAX_HEAD)  # type: ignore[union-attr]
            sep = 2
        else:
            sep = 4
        if end >= 0:
            req.head_done = True
            req.head_len = end + sep
        elif len(head) > MAX_HEAD:  # type: ignore[arg-type]
            req.head_done = True  # no head: treat all as body
            req.head = None

    def _status(self, req: _Req) -> int:
        if not req.head_done or not req.head_len:
            return 200
        head = req.head
        if type(head) is memoryview:
            return _status_in_view(head, req.head_len)
        assert isinstance(head, LargeBuffer)
        p = 0
        while p < req.head_len:
            e = head.find(b"\n", p, req.head_len)
            if e < 0:
                break
            if e - p > 7 and bytes(head.view_at(p, 7)).lower() == b"status:":
                return _status_code(head.bytes_at(p + 7, min(e - p - 7, 64)))
            p = e + 1
        return 200

    def _span(self, rid: int, req: _Req, app_status: int, proto: int, ts_ns: int, incomplete: bool = False) -> None:
        params = self.done.pop(rid, None)
        g = _NO_PARAMS if params is None else params.get
        v = g(b"REQUEST_METHOD")
        method = v.decode("latin-1") if v else "GET"
        # The client's target (REQUEST_URI): behind a front controller (try_files ...
        # /index.php?$query_string) DOCUMENT_URI names the script, and every route would read
        # /index.php. Its query, else QUERY_STRING (what the script was given).
        v = g(b"REQUEST_URI") or g(b"DOCUMENT_URI") or g(b"SCRIPT_NAME")
        if v:
            path, _, query = v.decode("utf-8", "replace").partition("?")
        else:
            path = "/"
            query = ""
        if not query:
            v = g(b"QUERY_STRING")
            if v:
                query = v.decode("utf-8", "replace")
        status = req.status
        if not status:  # not read yet (the Python path): from the head
            head = req.head
            if type(head) is memoryview and req.head_done and req.head_len:  # _status, the usual head
                status = _status_in_view(head, req.head_len)
            else:
                status = self._status(req)
        v = g(b"HTTPS")
        if v and v.lower() in (b"on", b"1"):
            scheme = "https"
        else:
            v = g(b"REQUEST_SCHEME")
            scheme = v.decode("latin-1") if v else "http"
        body = req.stdout - req.head_len
        attrs: dict[str, Any] = {
            "http.request.method": method,
            "url.path": path,
            "url.scheme": scheme,
            "http.response.status_code": status,
            "http.request.body.size": req.stdin,
            "http.response.body.size": body if body > 0 else 0,
            "network.protocol.name": "fastcgi",
        }
        if query:
            attrs["url.query"] = redact_query(query) if self.settings.sanitize_query else query
        v = g(b"SERVER_NAME") or g(b"HTTP_HOST")
        if v:
            attrs["server.address"] = v.decode("latin-1").partition(":")[0]
        v = g(b"SERVER_PORT")
        if v and v.isdigit():
            attrs["server.port"] = int(v)
        v = g(b"REMOTE_ADDR")
        if v:
            attrs["client.address"] = v.decode("latin-1")
        v = g(b"REMOTE_PORT")
        if v and v.isdigit():
            attrs["client.port"] = int(v)
        v = g(b"SERVER_PROTOCOL")
        if v and v.startswith(b"HTTP/"):
            attrs["network.protocol.version"] = v[5:].decode("latin-1")
        v = g(b"HTTP_USER_AGENT")
        if v:
            attrs["user_agent.original"] = v.decode("utf-8", "replace")
        code = _UNSET
        msg = ""
        if status >= 500:
            code = _ERROR
            attrs["error.type"] = str(status)
        if proto != 0:
            code = _ERROR
            msg = _PROTOCOL_STATUS.get(proto, str(proto))
            attrs["error.type"] = msg
        if req.aborted:
            code = _ERROR
            msg = "request aborted by the web server"
            attrs["error.type"] = "aborted"
        if app_status:
            attrs["fastcgi.app_status"] = app_status
        conn = self.conn
        # conn.kind_for(SERVER, CLIENT), without the call: CLIENT only for a traced client process
        kind = _CLIENT_KIND if conn.perspective == _CLIENT_VIEW else _SERVER_KIND
        span = conn.span(method, kind, req.start_ts, ts_ns, attrs,
                         g(b"HTTP_TRACEPARENT"), code, msg, req.stderr or None)
        if incomplete:
            self.cut_short(span)
        else:
            conn.emit(span)

    def gap(self, from_client: bool, ts_ns: int) -> None:
        for _ in self.reqs:
            self.conn.drop("gap")
        self.reqs.clear()
        self.done.clear()

    def close(self, ts_ns: int, reset: bool = False) -> None:
        # base.py's rule: a request whose STDOUT began (its Status: line, if any, says how it
        # went) is a span of what was seen, marked incomplete; one never answered is counted.
        if not self.reqs:  # the usual end: nothing in flight (the loop below would find nothing)
            if self.done:
                self.done.clear()
            return
        # A record cut before the parser read it (bytes left in the server's direction) began the
        # reply of the request it names (its id from the fourth byte on), else of the oldest.
        buf = self.conn.server_buf
        cut = (buf.u16be_at(2) if len(buf) >= 4 else next(iter(self.reqs))) if len(buf) else None
        for rid, req in list(self.reqs.items()):
            if rid in self.done and (req.stdout or (rid == cut and self.reply_begun())):
                self._span(rid, req, 0, 0, ts_ns, True)
            else:
                self.cut_short(None, "no_end_request")
        self.reqs.clear()
        self.done.clear()
