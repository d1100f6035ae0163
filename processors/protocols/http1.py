"""HTTP/1.0 and HTTP/1.1 (RFC 9112) as a sans-IO protocol module (base.py's contract).

Contract: ``Session.feed`` parses every complete request head / response head at
the front of the direction's ``LargeBuffer``; bodies are never held: they are
released as they arrive and only their remaining length (or chunked-coding
state) is remembered, so a declared ``Content-Length`` of 2**40 costs nothing.
Heads are matched with precompiled regular expressions run over a memoryview
of the buffer (no copy when the head lies in one chunk; the buffer's bounded
scratch when it straddles two), and only the headers wirespan uses are
extracted (framing, ``Host``, ``User-Agent``, ``traceparent``, ``Upgrade``).
Credentials (``Authorization``, ``Cookie``, ``Set-Cookie``, ``Proxy-Authorization``)
are never read, so they can never be exported.

Requests queue in order (pipelining); each response pairs with the oldest
request and ends in one span (start = first request byte, end = last response
byte). A 101 response ends HTTP/1 on the connection: the session sets
``conn.extra["switch_to"]`` ("http2" after ``Upgrade: h2c``, None otherwise)
and the stage hands the buffers to the next protocol or stops parsing.
"""

from __future__ import annotations

import re
from collections import deque
from typing import Any

from pydantic import Field

from processors.protocols.base import Conn, Detection, ProtocolSettings
from processors.protocols.base import Session as _BaseSession
from processors.protocols.errors import LimitExceeded, Malformed
from service.largebuf import LargeBuffer
from service.model import AttrValue, SpanKind, StatusCode

__all__ = ["NAME", "DEFAULT_PORTS", "Settings", "detect", "Http1Session", "Session",
           "MAX_HEADER_BYTES", "MAX_HEADERS", "MAX_CHUNK_LINE", "MAX_PENDING_REQUESTS"]

NAME = "http"
DEFAULT_PORTS = frozenset({80, 591, 3000, 5000, 8000, 8008, 8080, 8081, 8888})

#: Start line + header block. nginx allows 4 x 8 KiB (large_client_header_buffers),
#: Node.js 16 KiB, Go's DefaultMaxHeaderBytes 1 MiB; 64 KiB covers real traffic
#: and bounds what a hostile peer can make us hold.
MAX_HEADER_BYTES = 64 * 1024
#: Header fields per message: Apache's LimitRequestFields is 100, picohttpparser
#: stops at 100 as well; we allow a little more for proxies that add several.
MAX_HEADERS = 256
#: A chunk-size line with extensions (RFC 9112 §7.1.1); llhttp and h11 bound it too.
MAX_CHUNK_LINE = 4096
#: Requests awaiting a response on one connection (pipelining depth).
MAX_PENDING_REQUESTS = 1024
#: Hex digits in a chunk size: 16 is 2**64, more is hostile.
MAX_CHUNK_SIZE_DIGITS = 16
#: Query parameters whose values semconv says to scrub from ``url.query``.
DEFAULT_REDACT_QUERY = ("AWSAccessKeyId", "Signature", "sig", "X-Goog-Signature")

# RFC 9110 §5.6.2 tchar, for method and field names.
_TCHAR = rb"!#$%&'*+\-.^_`|~0-9A-Za-z"
_REQ_LINE = re.compile(rb"([" + _TCHAR + rb"]{1,32}) ([^\x00-\x20\x7f]+) HTTP/1\.([01])\r\n")
_STATUS_LINE = re.compile(rb"HTTP/1\.([01]) ([0-9]{3})(?:[ \t][\t\x20-\x7e\x80-\xff]*)?\r\n")
# Detection is stricter than parsing: the method starts with an upper-case letter.
_REQ_DETECT = re.compile(rb"[A-Z][A-Z0-9_\-]{0,31} [^\x00-\x20\x7f]+ HTTP/1\.[01]\r\n")


def _prefixes(parts: list[bytes]) -> bytes:
    """A regex matching any prefix of the concatenation of ``parts`` (each an atom)."""
    out = b""
    for p in reversed(parts):
        out = p + (b"(?:" + out + b")?" if out else b"")
    return out


# Any prefix of a request line / status line, for "need more" during detection.
_REQ_PARTIAL = re.compile(_prefixes([rb"[A-Z][A-Z0-9_\-]{0,31}", b" ", rb"[^\x00-\x20\x7f]+", b" ", b"H", b"T", b"T",
                                     b"P", b"/", b"1", rb"\.", b"[01]", b"\r"]) + rb"\Z")
_RESP_PARTIAL = re.compile(_prefixes([b"H", b"T", b"T", b"P", b"/", b"1", rb"\.", b"[01]", b" ", b"[0-9]", b"[0-9]",
                                      b"[0-9]", rb"(?:[ \t][^\r\n]*\r?|\r)"]) + rb"\Z")
_FIELD_LINE = rb"[" + _TCHAR + rb"]+:[\t\x20-\x7e\x80-\xff]*\r\n"
_ANY_HEADERS = re.compile(rb"(?:" + _FIELD_LINE + rb")*\r\n")
# Only the fields we use; the leading CRLF anchors each match at a line start.
_INTEREST = re.compile(
    rb"\r\n(content-length|transfer-encoding|connection|upgrade|host|user-agent|traceparent)"
    rb"[ \t]*:[ \t]*([^\r\n]*?)[ \t]*(?=\r\n)", re.IGNORECASE)
_DIGITS = re.compile(rb"[0-9]{1,18}\Z")
_CHUNK_SIZE = re.compile(rb"([0-9A-Fa-f]{1,%d})[ \t]*(?:;[^\r\n]*)?\Z" % MAX_CHUNK_SIZE_DIGITS)

# Methods semconv names; anything else is reported as _OTHER (+ method_original).
_KNOWN_METHODS = {m.encode(): m for m in
                  ("GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH", "QUERY")}

_HEADER_BLOCKS: dict[int, re.Pattern[bytes]] = {}


def _header_block(max_headers: int) -> re.Pattern[bytes]:
    p = _HEADER_BLOCKS.get(max_headers)
    if p is None:
        p = _HEADER_BLOCKS[max_headers] = re.compile(rb"(?:" + _FIELD_LINE + rb"){0,%d}\r\n" % max_headers)
    return p


class Settings(ProtocolSettings):
    """Options under ``processors: protocols: http:``."""

    #: Largest start line + header block accepted (bytes).
    max_header_bytes: int = Field(MAX_HEADER_BYTES, ge=256, le=16 * 1024 * 1024)
    #: Most header fields in one message.
    max_headers: int = Field(MAX_HEADERS, ge=1, le=100_000)
    #: Most pipelined requests awaiting responses on one connection.
    max_pending_requests: int = Field(MAX_PENDING_REQUESTS, ge=1)
    #: Query parameters whose values are replaced by ``REDACTED`` in ``url.query``.
    redact_query_params: list[str] = list(DEFAULT_REDACT_QUERY)


_DEFAULT_SETTINGS = Settings()


def detect(buf: LargeBuffer, from_client: bool | None) -> Detection:
    """A request line means the sender is the client, a status line the server."""
    n = len(buf)
    if n == 0:
        return Detection.NEED_MORE
    e = buf.find(b"\r\n", 0, min(n, MAX_HEADER_BYTES))
    if e < 0:
        if n >= MAX_HEADER_BYTES:
            return Detection.NO
        w = buf.view_at(0, min(n, 512))
        if from_client is not False and _REQ_PARTIAL.match(w):
            return Detection.NEED_MORE
        if from_client is not True and _RESP_PARTIAL.match(w):
            return Detection.NEED_MORE
        return Detection.NO
    line = buf.view_at(0, e + 2)
    if from_client is not False and _REQ_DETECT.fullmatch(line):
        return Detection.REQUEST
    if from_client is not True and _STATUS_LINE.fullmatch(line):
        return Detection.RESPONSE
    return Detection.NO


# Body framings.
_LENGTH, _CHUNKED, _CLOSE = 1, 2, 3
# Chunked-coding states.
_C_SIZE, _C_DATA, _C_CRLF, _C_TRAILER = 0, 1, 2, 3


class _Body:
    """Skips one message body as it arrives; remembers only counts."""

    __slots__ = ("cstate", "last_ts", "limit", "mode", "remaining", "size", "trailer")

    def __init__(self, mode: int, remaining: int, limit: int) -> None:
        self.mode = mode
        self.remaining = remaining
        self.size = 0
        self.cstate = _C_SIZE
        self.trailer = 0
        self.last_ts = 0
        self.limit = limit

    def consume(self, buf: LargeBuffer) -> bool:
        """Release the body bytes at the front of ``buf``; True once the body is complete."""
        mode = self.mode
        if mode == _LENGTH:
            n = len(buf)
            take = self.remaining if self.remaining <= n else n
            if take:
                self.last_ts = buf.ts_at(take - 1)
                buf.release(take)
                self.remaining -= take
                self.size += take
            return self.remaining == 0
        if mode == _CLOSE:
            n = len(buf)
            if n:
                self.last_ts = buf.ts_at(n - 1)
                buf.release(n)
                self.size += n
            return False
        return self._chunked(buf)

    def _chunked(self, buf: LargeBuffer) -> bool:
        while True:
            st = self.cstate
            if st == _C_DATA:
                n = len(buf)
                take = self.remaining if self.remaining <= n else n
                if take == 0:
                    return False
                self.last_ts = buf.ts_at(take - 1)
                buf.release(take)
                self.remaining -= take
                if self.remaining:
                    return False
                self.cstate = _C_CRLF
            elif st == _C_SIZE:
                e = buf.find(b"\r\n", 0, MAX_CHUNK_LINE)
                if e < 0:
                    if len(buf) >= MAX_CHUNK_LINE:
                        raise LimitExceeded(NAME, "chunk_line_too_long")
                    return False
                m = _CHUNK_SIZE.match(buf.view_at(0, e))
                if m is None:
                    raise Malformed(NAME, "bad_chunk_size")
                size = int(m.group(1), 16)
                self.last_ts = buf.ts_at(e + 1)
                buf.release(e + 2)
                if size:
                    self.remaining = size
                    self.size += size
                    self.cstate = _C_DATA
                else:
                    self.cstate = _C_TRAILER
            elif st == _C_CRLF:
                if len(buf) < 2:
                    return False
                if buf.u16be_at(0) != 0x0D0A:
                    raise Malformed(NAME, "bad_chunk_end")
                self.last_ts = buf.ts_at(1)
                buf.release(2)
                self.cstate = _C_SIZE
            else:  # trailer fields, then the empty line: skipped, never exported
                e = buf.find(b"\r\n", 0, MAX_CHUNK_LINE)
                if e < 0:
                    if len(buf) >= MAX_CHUNK_LINE:
                        raise LimitExceeded(NAME, "trailer_too_large")
                    return False
                self.trailer += e + 2
                if self.trailer > self.limit:
                    raise LimitExceeded(NAME, "trailer_too_large")
                self.last_ts = buf.ts_at(e + 1)
                buf.release(e + 2)
                if e == 0:
                    return True


class _Request:
    """What a request head told us, kept until its response completes (small fields only)."""

    __slots__ = (
        "body_size",
        "chunked",
        "connect",
        "head",
        "host",
        "method",
        "method_original",
        "start_ts",
        "target",
        "traceparent",
        "upgrade",
        "user_agent",
        "version",
    )

    def __init__(self) -> None:
        self.method = ""
        self.method_original: str | None = None
        self.target = b""
        self.version = "1.1"
        self.start_ts = 0
        self.body_size = 0
        self.host: bytes | None = None
        self.user_agent: bytes | None = None
        self.traceparent: bytes | None = None
        self.upgrade: bytes | None = None
        self.head = False
        self.connect = False
        self.chunked = False


class _Head:
    """Framing and interesting fields of one head."""

    __slots__ = ("chunked", "close", "host", "length", "te", "traceparent", "upgrade", "user_agent")

    def __init__(self) -> None:
        self.length = -1
        self.chunked = False
        self.te = False
        self.close = False
        self.upgrade: bytes | None = None
        self.host: bytes | None = None
        self.user_agent: bytes | None = None
        self.traceparent: bytes | None = None


def _fields(view: memoryview, start: int, end: int) -> _Head:
    """Extract the fields we use from the header block ``view[start:end]`` (start at a CRLF)."""
    h = _Head()
    for m in _INTEREST.finditer(view, start, end):
        name = m.group(1).lower()
        value = m.group(2)  # small field copy, bounded by max_header_bytes
        if name == b"content-length":
            for part in value.split(b","):  # "5, 5" is a legal repeat (RFC 9110 §8.6)
                part = part.strip()
                if not _DIGITS.match(part):
                    raise Malformed(NAME, "bad_content_length")
                n = int(part)
                if h.length >= 0 and n != h.length:
                    raise Malformed(NAME, "conflicting_content_length")
                h.length = n
        elif name == b"transfer-encoding":
            h.te = True
            h.chunked = value.rsplit(b",", 1)[-1].strip().lower() == b"chunked"
        elif name == b"connection":
            v = value.lower()
            if b"close" in v:
                h.close = True
        elif name == b"upgrade":
            h.upgrade = value.split(b",", 1)[0].strip().lower()
        elif name == b"host":
            h.host = value
        elif name == b"user-agent":
            h.user_agent = value
        else:
            h.traceparent = value
    return h


def _split_host(host: bytes) -> tuple[str, int | None]:
    s = host.decode("ascii", "replace")
    if s.startswith("["):  # [v6]:port
        close = s.find("]")
        if close > 0:
            rest = s[close + 1:]
            port = int(rest[1:]) if rest.startswith(":") and rest[1:].isdigit() and len(rest) < 8 else None
            return s[1:close], port
    h, sep, p = s.rpartition(":")
    if sep and p.isdigit() and len(p) < 6 and h:
        return h, int(p)
    return s, None


class Http1Session(_BaseSession):
    """One HTTP/1.x connection: requests in order, responses paired with the oldest request."""

    protocol = NAME

    def __init__(self, conn: Conn) -> None:
        super().__init__(conn)
        s = conn.settings
        self.settings: Settings = s if isinstance(s, Settings) else _DEFAULT_SETTINGS
        self._block = _header_block(self.settings.max_headers)
        self._pending: deque[_Request] = deque()
        self._deferred: deque[tuple[_Request, int, str, int, int]] = deque()
        self._cbody: _Body | None = None   # request body being skipped
        self._creq: _Request | None = None
        self._cpaused = False              # after Upgrade/CONNECT: wait for the response
        self._sbody: _Body | None = None   # response body being skipped
        self._sresp: tuple[_Request | None, int, str] | None = None  # (request, status, version)
        self._scan = [0, 0]                # where to resume looking for CRLFCRLF, per side
        self._resync = [False, False]      # after a gap: drop bytes until a message starts
        self._s_last_ts = 0
        self._done = False                 # protocol switched or tunnel: ignore the rest

    # -- heads ---------------------------------------------------------------
    def _head_end(self, buf: LargeBuffer, side: int) -> int:
        """Offset just past the CRLFCRLF ending the head, or -1 (need more)."""
        limit = self.settings.max_header_bytes
        n = len(buf)
        start = self._scan[side]
        e = buf.find(b"\r\n\r\n", start, min(n, limit))
        if e < 0:
            if n >= limit:
                raise LimitExceeded(NAME, "header_too_large")
            self._scan[side] = max(0, n - 3)
            return -1
        self._scan[side] = 0
        return e + 4

    def _check_block(self, view: memoryview, start: int, end: int) -> None:
        if self._block.fullmatch(view, start, end) is None:
            if _ANY_HEADERS.fullmatch(view, start, end) is not None:
                raise LimitExceeded(NAME, "too_many_headers")
            raise Malformed(NAME, "bad_header")

    def _resynced(self, buf: LargeBuffer, from_client: bool) -> bool:
        """After a gap: keep the buffer only if it starts with a message, else drop it."""
        d = detect(buf, from_client)
        if d == Detection.NEED_MORE:
            return False
        if d == (Detection.REQUEST if from_client else Detection.RESPONSE):
            self._resync[0 if from_client else 1] = False
            return True
        buf.release(len(buf))
        return False

    # -- feeding ---------------------------------------------------------------
    def feed(self, from_client: bool, buf: LargeBuffer, ts_ns: int) -> None:
        if self._done:
            buf.release(len(buf))
            return
        if from_client:
            self._feed_client(buf)
        else:
            self._s_last_ts = ts_ns
            self._feed_server(buf)

    def _feed_client(self, buf: LargeBuffer) -> None:
        while len(buf):
            body = self._cbody
            if body is not None:
                if not body.consume(buf):
                    return
                req = self._creq
                if req is not None:
                    req.body_size = body.size
                self._cbody = self._creq = None
                self._emit_deferred()
                continue
            if self._cpaused or self._done:
                return
            if self._resync[0] and not self._resynced(buf, True):
                return
            if buf.u8_at(0) == 0x0D and len(buf) >= 2 and buf.u8_at(1) == 0x0A:
                buf.release(2)  # RFC 9112 §2.2: ignore a CRLF before a request line
                continue
            end = self._head_end(buf, 0)
            if end < 0:
                return
            self._request(buf, end)

    def _request(self, buf: LargeBuffer, end: int) -> None:
        view = buf.view_at(0, end)
        m = _REQ_LINE.match(view)
        if m is None:
            raise Malformed(NAME, "bad_request_line")
        line_end = m.end()
        self._check_block(view, line_end, end)
        h = _fields(view, line_end - 2, end - 2)
        req = _Request()
        method = m.group(1)
        known = _KNOWN_METHODS.get(method)
        if known is None:
            req.method = "_OTHER"
            req.method_original = method.decode("ascii", "replace")
        else:
            req.method = known
            req.head = known == "HEAD"
            req.connect = known == "CONNECT"
        req.target = m.group(2)  # small field kept for the span
        req.version = "1.1" if m.group(3) == b"1" else "1.0"
        req.start_ts = buf.ts_at(0)
        req.host = h.host
        req.user_agent = h.user_agent
        req.traceparent = h.traceparent
        req.upgrade = h.upgrade
        buf.release(end)
        if len(self._pending) >= self.settings.max_pending_requests:
            self._pending.popleft()
            self.conn.drop("pending_overflow")
        self._pending.append(req)
        if h.te:
            if not h.chunked:  # RFC 9112 §6.3: a request must end in chunked
                raise Malformed(NAME, "bad_transfer_encoding")
            req.chunked = True
            self._cbody = _Body(_CHUNKED, 0, self.settings.max_header_bytes)
            self._creq = req
        elif h.length > 0:
            self._cbody = _Body(_LENGTH, h.length, 0)
            self._creq = req
        if req.upgrade is not None or req.connect:
            self._cpaused = True

    def _feed_server(self, buf: LargeBuffer) -> None:
        while len(buf):
            body = self._sbody
            if body is not None:
                if not body.consume(buf):
                    return
                self._sbody = None
                self._finish(body.size, body.last_ts)
                continue
            if self._done:
                return
            if self._resync[1] and not self._resynced(buf, False):
                return
            end = self._head_end(buf, 1)
            if end < 0:
                return
            self._response(buf, end)

    def _response(self, buf: LargeBuffer, end: int) -> None:
        view = buf.view_at(0, end)
        m = _STATUS_LINE.match(view)
        if m is None:
            raise Malformed(NAME, "bad_status_line")
        line_end = m.end()
        self._check_block(view, line_end, end)
        status = int(m.group(2))
        version = "1.1" if m.group(1) == b"1" else "1.0"
        h = _fields(view, line_end - 2, end - 2)
        last_ts = buf.ts_at(end - 1)
        buf.release(end)
        req = self._pending[0] if self._pending else None
        if status < 200:
            if status == 101:
                self._sresp = (req, status, version)
                self._done = True  # before _finish: the paused client side must not resume
                self._finish(0, last_ts)
                up = req.upgrade if req is not None else h.upgrade
                self._switch("http2" if up == b"h2c" else None)
            # 100 Continue, 102, 103: interim, the final response follows.
            return
        self._sresp = (req, status, version)
        if (req is not None and req.head) or status == 204 or status == 304:
            self._finish(0, last_ts)
        elif req is not None and req.connect and status < 300:
            self._finish(0, last_ts)
            self._switch(None)
        elif h.te and h.chunked:
            b = self._sbody = _Body(_CHUNKED, 0, self.settings.max_header_bytes)
            b.last_ts = last_ts
        elif h.length >= 0 and not h.te:
            if h.length == 0:
                self._finish(0, last_ts)
            else:
                b = self._sbody = _Body(_LENGTH, h.length, 0)
                b.last_ts = last_ts
        else:  # RFC 9112 §6.3 rule 8: the body ends when the server closes
            b = self._sbody = _Body(_CLOSE, 0, 0)
            b.last_ts = last_ts

    def _switch(self, to: str | None) -> None:
        self._done = True
        self._cpaused = False
        self.conn.extra["switch_to"] = to

    def _finish(self, resp_size: int, end_ts: int, error: str | None = None) -> None:
        sresp = self._sresp
        self._sresp = None
        if sresp is None:
            return
        req, status, version = sresp
        if req is None:
            self.conn.drop("unmatched_response")
            return
        self._pending.popleft()
        if self._cpaused and not self._done:
            self._cpaused = False  # upgrade refused: HTTP/1 goes on
            if len(self.conn.client_buf):
                self._feed_client(self.conn.client_buf)
        if req is self._creq and error is None:
            # The server answered before the request body ended (an early 413, nginx's
            # `return`): emit once the body is complete, so its size is known.
            self._deferred.append((req, status, version, resp_size, end_ts))
            return
        self.conn.emit(self._span(req, status, version, resp_size, end_ts, error))

    def _emit_deferred(self, error: str | None = None) -> None:
        while self._deferred:
            req, status, version, size, end_ts = self._deferred.popleft()
            if error is not None and req is self._creq and self._cbody is not None:
                req.body_size = self._cbody.size
            self.conn.emit(self._span(req, status, version, size, end_ts, None))

    # -- spans -------------------------------------------------------------------
    def _span(self, req: _Request, status: int, version: str, resp_size: int, end_ts: int,
              error: str | None) -> Any:
        conn = self.conn
        kind = conn.kind_for(SpanKind.SERVER, SpanKind.CLIENT)
        attrs: dict[str, AttrValue] = {"http.request.method": req.method}
        if req.method_original is not None:
            attrs["http.request.method_original"] = req.method_original
        target = req.target.decode("utf-8", "replace")
        host: str | None = None
        port: int | None = None
        if req.connect:
            host, port = _split_host(req.target)
        else:
            if target.startswith(("http://", "https://")):  # absolute-form (a proxy request)
                scheme_end = target.index("//") + 2
                slash = target.find("/", scheme_end)
                authority = target[scheme_end:] if slash < 0 else target[scheme_end:slash]
                host, port = _split_host(authority.encode())
                target = "/" if slash < 0 else target[slash:]
            path, q, query = target.partition("?")
            attrs["url.path"] = path
            if q:
                attrs["url.query"] = self._redact(query)
        attrs["url.scheme"] = "http"
        if host is None and req.host is not None:
            host, port = _split_host(req.host)
        if host:
            attrs["server.address"] = host
            attrs["server.port"] = port if port is not None else conn.server_port
        if kind == SpanKind.CLIENT and host and not req.connect:
            attrs["url.full"] = f"http://{req.host.decode('ascii', 'replace') if req.host else host}{target}"
        attrs["network.protocol.version"] = req.version if version == "1.1" else version
        if status:
            attrs["http.response.status_code"] = status
        if req.body_size or req.chunked:
            attrs["http.request.body.size"] = req.body_size
        attrs["http.response.body.size"] = resp_size
        if req.user_agent is not None:
            attrs["user_agent.original"] = req.user_agent.decode("utf-8", "replace")
        code = StatusCode.UNSET
        message = ""
        if error is not None:
            code = StatusCode.ERROR
            attrs["error.type"] = error
            message = "connection reset before the response completed" if error == "connection_reset" \
                else "connection closed before the response completed"
        elif status >= 500 or (status >= 400 and kind != SpanKind.SERVER):
            code = StatusCode.ERROR
            attrs["error.type"] = str(status)
        name = req.method if req.method != "_OTHER" else "HTTP"
        return conn.span(name, kind, req.start_ts, end_ts, attrs, traceparent=req.traceparent,
                         status_code=code, status_message=message)

    def _redact(self, query: str) -> str:
        names = self.settings.redact_query_params
        if not names or not any(n in query for n in names):
            return query
        parts = query.split("&")
        for i, p in enumerate(parts):
            k, eq, _v = p.partition("=")
            if eq and k in names:
                parts[i] = k + "=REDACTED"
        return "&".join(parts)

    # -- gaps and ends -------------------------------------------------------------
    def gap(self, from_client: bool, ts_ns: int) -> None:
        """Lost bytes in one direction: resync it at the next message start.

        A client gap may have swallowed whole requests, so queued requests other than
        the one whose response is being read can no longer be paired: they are
        dropped (counted). A server gap loses the response in progress and makes
        every queued request unpairable.
        """
        self._emit_deferred("gap")
        if from_client:
            self._cbody = self._creq = None
            self._cpaused = False
            keep = self._sresp[0] if self._sresp is not None else None
            for r in self._pending:
                if r is not keep:
                    self.conn.drop("gap")
            self._pending.clear()
            if keep is not None:
                self._pending.append(keep)
            self._scan[0] = 0
            self._resync[0] = True
        else:
            for _ in self._pending:
                self.conn.drop("gap")
            self._pending.clear()
            self._sbody = None
            self._sresp = None
            self._scan[1] = 0
            self._resync[1] = True

    def close(self, ts_ns: int, reset: bool = False) -> None:
        """End of connection: a close-delimited body ends here; anything else in flight is marked."""
        if self._done:
            self._emit_deferred("closed")
            return
        self._cpaused = False
        self._emit_deferred("closed")
        end_ts = self._s_last_ts or ts_ns
        body = self._sbody
        if self._sresp is not None:
            self._sbody = None
            size = body.size if body is not None else 0
            if body is not None and body.mode == _CLOSE and not reset:
                self._finish(size, body.last_ts or end_ts)
            else:
                self._finish(size, ts_ns, "connection_reset" if reset else "connection_closed")
        while self._pending:
            req = self._pending[0]
            if reset:
                self._sresp = (req, 0, req.version)
                self._finish(0, ts_ns, "connection_reset")
            else:
                self._pending.popleft()
                self.conn.drop("unanswered")
        self._done = True


Session = Http1Session  # the name base.py's contract asks for
