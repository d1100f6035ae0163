"""HTTP/1.0 and HTTP/1.1 (RFC 9112) as a sans-IO protocol module (base.py's contract).

Contract: ``Session.feed`` parses every complete request head / response head at
the front of the direction's ``LargeBuffer``; bodies are never held: they are
released as they arrive and only their remaining length (or chunked-coding
state) is remembered, so a declared ``Content-Length`` of 2**40 costs nothing.
Heads are matched with precompiled regular expressions run over a memoryview
of the buffer (no copy when the head lies in one chunk; the buffer's bounded
scratch when it straddles two), and only the headers wirespan uses are
extracted (framing, ``Host``, ``User-Agent``, ``traceparent``, ``Upgrade``).
When built, the C accelerator ``_http1.c`` parses a head that lies in one view in
one call (validation and those fields, plus the span's decoded path and query);
it declines (None) anything it does not accept, and the regexes then run and
classify it, so results and drop reasons are the same with or without it.
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

from processors.protocols.base import Conn, Detection, PendingQueue, ProtocolSettings
from processors.protocols.base import Session as _BaseSession
from processors.protocols.enrich import feed as _sink_feed
from processors.protocols.errors import LimitExceeded, Malformed, ProtocolError
from processors.protocols.sanitize import redact_query
from service.largebuf import LargeBuffer
from service.model import AttrValue, SpanKind, StatusCode
from service.speedups import load as _load_speedup

# The C head parser (_http1.c): the common valid head in one call, None for anything
# else (then the regexes below run and classify it). None here when disabled/not built.
_C = _load_speedup("processors.protocols._http1")
_C_REQUEST = _C.parse_request if _C is not None else None
_C_RESPONSE = _C.parse_response if _C is not None else None
_C_CHUNKED = _C.chunked_body if _C is not None else None

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
#: Empty lines skipped before a request line (RFC 9112 §2.2 asks for "at least one").
MAX_LEADING_CRLF = 4
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
# Detection is stricter than parsing: the method starts with an upper-case letter. Line ends
# may be bare LF and a status line's version lower-case (what servers and Zeek accept).
_REQ_DETECT = re.compile(rb"[A-Z][A-Z0-9_\-]{0,31} +(?:[^\x00-\x20\x7f]+ +)?HTTP/1\.[01]? *\r?\n")
#: An HTTP/0.9 Simple-Request (RFC 1945 §4.1: ``GET`` SP Request-URI CRLF, no version, no
#: headers), still answered by nginx and Apache and still sent by probes and old clients. Only
#: an origin-form or absolute target: "GET key" is inline Redis.
_REQ09 = re.compile(rb"GET +((?:/|https?://)[^\x00-\x20\x7f]*) *\r?\n")
_BARE_LF = re.compile(rb"(?<!\r)\n")
#: Where an HTTP/0.9 request line may end: a longer line is no Simple-Request a peer sends.
MAX_09_LINE = 2048
_STATUS_DETECT = re.compile(rb"[Hh][Tt][Tt][Pp]/1\.[01] +[0-9]{3}(?:[ \t][\t\x20-\x7e\x80-\xff]*)?\r?\n")
# The lenient reading of a start line (RFC 9112 §3: words separated by any whitespace).
# A version without its minor digit (``HTTP/1.``, answered by Google's front end) and a
# missing target (``OPTIONS HTTP/1.1``, answered 400) are read too: the exchange happened.
_LENIENT_REQ = re.compile(rb"([" + _TCHAR + rb"]{1,32})[ \t]+(?:([^\x00-\x20\x7f]+)[ \t]+)?HTTP/1\.([01]?)[ \t]*\Z")
_LENIENT_STATUS = re.compile(rb"[Hh][Tt][Tt][Pp]/1\.([01])[ \t]+([0-9]{3})(?:[ \t]+([\t\x20-\x7e\x80-\xff]*))?\Z")
_FIELD_NAME = re.compile(rb"[" + _TCHAR + rb"]+:")
_FIELD_NAME_SPACE = re.compile(rb"([" + _TCHAR + rb"]+)[ \t]+:")  # "Name :" (a response's, see _lenient_head)


def _prefixes(parts: list[bytes]) -> bytes:
    """A regex matching any prefix of the concatenation of ``parts`` (each an atom)."""
    out = b""
    for p in reversed(parts):
        out = p + (b"(?:" + out + b")?" if out else b"")
    return out


# Any prefix of a request line / status line, for "need more" during detection.
_REQ_PARTIAL = re.compile(_prefixes([rb"[A-Z][A-Z0-9_\-]{0,31}", b" +", rb"[^\x00-\x20\x7f]+", b" +", b"H", b"T",
                                     b"T", b"P", b"/", b"1", rb"\.", b"[01]?", b" *\r"]) + rb"\Z")
#: A status line cut short: its code once the three digits are in sight (``_cut_head``).
_STATUS_CODE_PREFIX = re.compile(rb"[Hh][Tt][Tt][Pp]/1\.([01]) +([0-9]{3})(?![0-9])")
_RESP_PARTIAL = re.compile(_prefixes([b"[Hh]", b"[Tt]", b"[Tt]", b"[Pp]", b"/", b"1", rb"\.", b"[01]", b" +", b"[0-9]",
                                      b"[0-9]", b"[0-9]", rb"(?:[ \t][^\r\n]*\r?|\r)"]) + rb"\Z")
_FIELD_LINE = rb"[" + _TCHAR + rb"]+:[\t\x20-\x7e\x80-\xff]*\r\n"
_ANY_HEADERS = re.compile(rb"(?:" + _FIELD_LINE + rb")*\r\n")
# Only the fields we use; the leading CRLF anchors each match at a line start.
_INTEREST = re.compile(
    rb"\r\n(content-length|transfer-encoding|upgrade|host|user-agent|traceparent)"
    rb"[ \t]*:[ \t]*([^\r\n]*)", re.IGNORECASE)
_CL, _TE, _UPGRADE, _HOST, _UA, _TP = range(6)
_UNSET, _ERROR = StatusCode.UNSET, StatusCode.ERROR  # module constants: enum attribute access is slow
_CLIENT, _SERVER = SpanKind.CLIENT, SpanKind.SERVER
_FIELD_IDS = {n: i for i, n in enumerate(
    (b"content-length", b"transfer-encoding", b"upgrade", b"host", b"user-agent", b"traceparent"))}
# The spellings clients and servers send, so the usual lookup needs no lower(); others are lowered.
_FIELD_IDS.update((n.title(), i) for n, i in list(_FIELD_IDS.items()))
_FIELD_IDS.update(((b"TraceParent", _FIELD_IDS[b"traceparent"]), (b"HOST", _FIELD_IDS[b"host"])))
_DIGITS = re.compile(rb"[0-9]{1,18}\Z")
_CHUNK_SIZE = re.compile(rb"([0-9A-Fa-f]{1,%d})[ \t]*(?:;[^\r\n]*)?\Z" % MAX_CHUNK_SIZE_DIGITS)

# Methods semconv names; anything else is reported as _OTHER (+ method_original).
_KNOWN_METHODS = {m.encode(): m for m in
                  ("GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH", "QUERY")}

_HEADER_BLOCKS: dict[int, tuple[re.Pattern[bytes], re.Pattern[bytes], re.Pattern[bytes]]] = {}


def _head_patterns(max_headers: int) -> tuple[re.Pattern[bytes], re.Pattern[bytes], re.Pattern[bytes]]:
    """(header block, whole request head, whole response head) for a header-count limit.

    One match validates a whole head: the start line's groups, then an empty group
    marking where the field lines start, bounded repetition for the count limit.
    """
    p = _HEADER_BLOCKS.get(max_headers)
    if p is None:
        fields = rb"(?:" + _FIELD_LINE + rb"){0,%d}\r\n" % max_headers
        p = _HEADER_BLOCKS[max_headers] = (
            re.compile(fields),
            re.compile(_REQ_LINE.pattern + rb"()" + fields),
            re.compile(_STATUS_LINE.pattern + rb"()" + fields),
        )
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
    #: Values of sensitive query parameters (tokens, keys, passwords...: ``sanitize.py``) become
    #: ``REDACTED`` in ``url.query`` and ``url.full`` (off: only ``redact_query_params``).
    sanitize_query: bool = True
    #: The HTTP methods taken as known (case-sensitive); others are ``_OTHER`` with
    #: ``http.request.method_original`` (semconv's rule, and its required override, as
    #: ``OTEL_INSTRUMENTATION_HTTP_KNOWN_METHODS``). None: semconv's list (RFC 9110's
    #: methods, PATCH, QUERY).
    known_methods: list[str] | None = None


_DEFAULT_SETTINGS = Settings()


def detect(buf: LargeBuffer, from_client: bool | None) -> Detection:
    """A request line means the sender is the client, a status line the server."""
    n = len(buf)
    if n == 0:
        return Detection.NEED_MORE
    if buf.chunk_count == 1:
        # The usual first segment: the patterns run over the chunk itself. None of them can
        # match past a line's LF, so a match at the start is the first line's fullmatch below
        # (the find and the line's view cost more than the match, once a connection).
        w = buf.view_at(0, n if n <= MAX_HEADER_BYTES else MAX_HEADER_BYTES)
        if from_client is not False and (_REQ_DETECT.match(w) or _REQ09.match(w)):
            return Detection.REQUEST
        if from_client is not True and _STATUS_DETECT.match(w):
            return Detection.RESPONSE
    e = buf.find(b"\n", 0, min(n, MAX_HEADER_BYTES))
    if e < 0:
        if n >= MAX_HEADER_BYTES:
            return Detection.NO
        w = buf.view_at(0, min(n, 512))
        if from_client is not False and _REQ_PARTIAL.match(w):
            return Detection.NEED_MORE
        if from_client is not True and _RESP_PARTIAL.match(w):
            return Detection.NEED_MORE
        return Detection.NO
    line = buf.view_at(0, e + 1)
    if from_client is not False and (_REQ_DETECT.fullmatch(line) or _REQ09.fullmatch(line)):
        return Detection.REQUEST
    if from_client is not True and _STATUS_DETECT.fullmatch(line):
        return Detection.RESPONSE
    return Detection.NO


def _lenient_head(view: memoryview, request: bool) -> tuple[bytes, tuple[bytes, bytes, bytes] | None]:
    """A head the strict patterns refused, read as mainstream servers read it, and rewritten
    in the strict form (so the one parser below reads both): bare LF line ends (RFC 9112
    §2.2), start-line words separated by runs of whitespace (§3), a lower-case ``http/`` in a
    status line, obs-fold continuation lines joined with a space (§5.2); in a request line a
    version without its minor digit (read as 1.0) and a missing target (``url.path`` empty),
    returned beside the rewrite as (method, target, minor). Ambiguity is still
    refused: a bare CR (§2.2), a whitespace-led line before the first field (§2.2 allows
    rejecting it) and, in a request, whitespace between a field name and its colon (§5.1):
    all three are how request smuggling hides a field, and are ``bad_header`` (a response's
    ``Name :`` loses the whitespace, as §5.1 has a proxy do). The head is copied once
    (bounded by ``max_header_bytes``), on this rare path only.
    """
    lines = bytes(view).split(b"\n")
    lines = [ln[:-1] if ln[-1:] == b"\r" else ln for ln in lines[:-2]]  # the empty line and after
    while lines and not lines[0] and request:
        del lines[0]  # empty lines before a request line (the strict path skips CRLF ones)
    if not lines:
        raise Malformed(NAME, "bad_request_line" if request else "bad_status_line")
    m = (_LENIENT_REQ if request else _LENIENT_STATUS).match(lines[0])
    if m is None:
        raise Malformed(NAME, "bad_request_line" if request else "bad_status_line")
    start = None
    if request:
        start = (m.group(1), m.group(2) or b"", m.group(3) or b"0")
        out = [b"%s %s HTTP/1.%s" % (start[0], start[1] or b"*", start[2])]
    else:
        out = [b"HTTP/1.%s %s %s" % (m.group(1), m.group(2), m.group(3) or b"")]
    for ln in lines[1:]:
        if b"\r" in ln:
            raise Malformed(NAME, "bad_header", 0, "bare CR")
        if ln[:1] in (b" ", b"\t"):
            if len(out) == 1:
                raise Malformed(NAME, "bad_header", 0, "whitespace before the first field")
            out[-1] = out[-1].rstrip(b" \t") + b" " + ln.strip(b" \t")  # obs-fold: one space
            continue
        if _FIELD_NAME.match(ln) is None:
            sp = None if request else _FIELD_NAME_SPACE.match(ln)
            if sp is None:
                raise Malformed(NAME, "bad_header", 0, "field line")
            # A response's "Server : x": §5.1 has a proxy remove the whitespace and a
            # client read on; only a server must refuse it (in a request, smuggling).
            ln = sp.group(1) + ln[sp.end() - 1:]
        out.append(ln)
    out.append(b"")
    out.append(b"")
    return b"\r\n".join(out), start


# Body framings.
_LENGTH, _CHUNKED, _CLOSE = 1, 2, 3
# Chunked-coding states.
_C_SIZE, _C_DATA, _C_CRLF, _C_TRAILER = 0, 1, 2, 3


class _Body:
    """Skips one message body as it arrives; remembers only counts."""

    __slots__ = ("cstate", "last_ts", "lf", "limit", "mode", "remaining", "sink", "size", "trailer")

    def __init__(self, mode: int, remaining: int, limit: int, lf: bool = False) -> None:
        self.sink: Any = None  #: an enricher's bounded capture of this body (enrich/), else None
        #: The sender ended its head's lines in a bare LF: its chunk lines may too (see _line).
        self.lf = lf
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
                if self.sink is not None:
                    _sink_feed(self.sink, buf, 0, take)
                buf.release(take)
                self.remaining -= take
                self.size += take
            return self.remaining == 0
        if mode == _CLOSE:
            n = len(buf)
            if n:
                self.last_ts = buf.ts_at(n - 1)
                if self.sink is not None:
                    _sink_feed(self.sink, buf, 0, n)
                buf.release(n)
                self.size += n
            return False
        return self._chunked(buf)

    def _line(self, buf: LargeBuffer, what: str) -> tuple[int, int]:
        """(end of the chunk-size or trailer line's text, bytes the line takes) or (-1, 0).

        CRLF, as RFC 9112 §7.1 writes it. A bare LF only from a sender whose head already
        used bare LF (§2.2's leniency is for the start line and fields): a peer that ends
        every line in LF is read consistently, while a CRLF sender's LF inside a chunk line
        stays refused, since a lone LF is where chunk parsers disagree (request smuggling).
        """
        if not self.lf:
            e = buf.find(b"\r\n", 0, MAX_CHUNK_LINE)
            take = e + 2
        else:
            e = buf.find(b"\n", 0, MAX_CHUNK_LINE)
            take = e + 1
            if e > 0 and buf.u8_at(e - 1) == 0x0D:
                e -= 1
        if e < 0:
            if len(buf) >= MAX_CHUNK_LINE:
                raise LimitExceeded(NAME, what)
            return -1, 0
        return e, take

    def _chunked(self, buf: LargeBuffer) -> bool:
        while True:
            st = self.cstate
            if st == _C_DATA:
                n = len(buf)
                take = self.remaining if self.remaining <= n else n
                if take == 0:
                    return False
                self.last_ts = buf.ts_at(take - 1)
                if self.sink is not None:
                    _sink_feed(self.sink, buf, 0, take)
                buf.release(take)
                self.remaining -= take
                if self.remaining:
                    return False
                self.cstate = _C_CRLF
            elif st == _C_SIZE:
                e, take = self._line(buf, "chunk_line_too_long")
                if e < 0:
                    return False
                m = _CHUNK_SIZE.match(buf.view_at(0, e))
                if m is None:
                    raise Malformed(NAME, "bad_chunk_size")
                size = int(m.group(1), 16)
                self.last_ts = buf.ts_at(take - 1)
                buf.release(take)
                if size:
                    self.remaining = size
                    self.size += size
                    self.cstate = _C_DATA
                else:
                    self.cstate = _C_TRAILER
            elif st == _C_CRLF:
                if self.lf and len(buf) and buf.u8_at(0) == 0x0A:
                    self.last_ts = buf.ts_at(0)
                    buf.release(1)
                    self.cstate = _C_SIZE
                    continue
                if len(buf) < 2:
                    return False
                if buf.u16be_at(0) != 0x0D0A:
                    raise Malformed(NAME, "bad_chunk_end")
                self.last_ts = buf.ts_at(1)
                buf.release(2)
                self.cstate = _C_SIZE
            else:  # trailer fields, then the empty line: skipped, never exported
                e, take = self._line(buf, "trailer_too_large")
                if e < 0:
                    return False
                self.trailer += take
                if self.trailer > self.limit:
                    raise LimitExceeded(NAME, "trailer_too_large")
                self.last_ts = buf.ts_at(take - 1)
                buf.release(take)
                if e == 0:
                    return True


def _traceparent_of(req: _Request) -> Any:
    return req.traceparent


class _Request:
    """What a request head told us, kept until its response completes (small fields only)."""

    __slots__ = (
        "body_size",
        "cap",
        "chunked",
        "connect",
        "head",
        "host",
        "method",
        "method_original",
        "path",
        "query",
        "start_ts",
        "target",
        "traceparent",
        "upgrade",
        "user_agent",
        "version",
    )

    def __init__(self, method: str, method_original: str | None, target: bytes, version: str, start_ts: int,
                 host: bytes | None, user_agent: bytes | None, traceparent: bytes | None, upgrade: bytes | None,
                 path: str | None = None, query: str | None = None) -> None:
        self.method = method
        self.method_original = method_original
        self.head = method == "HEAD"
        self.connect = method == "CONNECT"
        self.target = target  # small field kept for the span
        self.path = path    # url.path / raw url.query when the C parser decoded them already
        self.query = query
        self.version = version
        self.start_ts = start_ts
        self.body_size = 0
        self.host = host
        self.user_agent = user_agent
        self.traceparent = traceparent
        self.upgrade = upgrade
        self.chunked = False
        self.cap: Any = None  #: an enricher's Exchange (enrich/), for a selected request only


def _method(raw: bytes) -> tuple[str, str | None]:
    """(semconv method, method_original) for a request line's method token."""
    known = _KNOWN_METHODS.get(raw)
    if known is None:
        return "_OTHER", raw.decode("ascii", "replace")
    return known, None


#: (content length or -1, has Transfer-Encoding, ends in chunked, upgrade, host, user agent, traceparent)
_Fields = tuple[int, bool, bool, Any, Any, Any, Any]


def _fields(view: memoryview, start: int, end: int) -> _Fields:
    """The fields we use from the header block ``view[start:end]`` (``start`` at a CRLF).

    Returns (content length or -1, has Transfer-Encoding, ends in chunked, upgrade
    token, Host, User-Agent, traceparent). Values are small copies (bounded by
    ``max_header_bytes``); every other field, credentials included, is never read.
    """
    length = -1
    te = chunked = False
    upgrade = host = ua = tp = None
    ids = _FIELD_IDS
    for name, value in _INTEREST.findall(view, start, end):
        fid = ids.get(name)
        if fid is None:
            fid = ids[name.lower()]
        if value[-1:] in (b" ", b"\t"):
            value = value.rstrip(b" \t")
        if fid == _CL:
            if value.isdigit() and len(value) <= 18:
                n = int(value)
                if length >= 0 and n != length:
                    raise Malformed(NAME, "conflicting_content_length")
                length = n
                continue
            for part in value.split(b","):  # "5, 5" is a legal repeat (RFC 9110 §8.6)
                part = part.strip()
                if not _DIGITS.match(part):
                    raise Malformed(NAME, "bad_content_length")
                n = int(part)
                if length >= 0 and n != length:
                    raise Malformed(NAME, "conflicting_content_length")
                length = n
        elif fid == _HOST:
            host = value
        elif fid == _UA:
            ua = value
        elif fid == _TP:
            tp = value
        elif fid == _TE:
            te = True
            chunked = value.rsplit(b",", 1)[-1].strip().lower() == b"chunked"
        elif fid == _UPGRADE:
            upgrade = value.split(b",", 1)[0].strip().lower()
    return length, te, chunked, upgrade, host, ua, tp


#: Host header -> (name, port), shared by the connections (a service's clients send the same few).
_HOSTS: dict[bytes, tuple[str, int | None]] = {}
_MAX_HOSTS = 256


def _host(raw: bytes) -> tuple[str, int | None]:
    """``_split_host`` through ``_HOSTS`` (emptied when full: a peer's random hosts stay bounded)."""
    hp = _HOSTS.get(raw)
    if hp is None:
        if len(_HOSTS) >= _MAX_HOSTS:
            _HOSTS.clear()
        hp = _HOSTS[raw] = _split_host(raw)
    return hp


#: What a session derives from its Settings, for the last Settings seen (the stage's one).
_DERIVED: list[Any] = [None, None]


def _derived(s: Settings) -> tuple[Any, ...]:
    """(block, request head, response head patterns, max header bytes, max headers, max pending,
    known methods) for ``s``: once per Settings object, not once per connection (issue 21)."""
    if _DERIVED[0] is s:
        return _DERIVED[1]  # type: ignore[no-any-return]
    km = s.known_methods
    d = (*_head_patterns(s.max_headers), s.max_header_bytes, s.max_headers, s.max_pending_requests,
         frozenset(km) if km is not None else None)
    _DERIVED[0], _DERIVED[1] = s, d
    return d


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
        if not isinstance(s, Settings):
            s = _DEFAULT_SETTINGS
        self.settings: Settings = s
        (self._block, self._req_head, self._resp_head, self._limit, self._max_headers, self._max_pending,
         self._known) = _derived(s)
        self._kind = conn.kind_for(_SERVER, _CLIENT)
        en = getattr(conn, "enrich", None)
        self._enrich: Any = en if en is not None and en.active else None  # enrich/: None = plain HTTP only
        self._pending: deque[_Request] = PendingQueue(conn, traceparent=_traceparent_of)
        # A list, not a deque: it is almost always empty, and an empty deque costs a 64-slot block
        # (~700 bytes a connection, issue 21); entries are few, so pop(0) is cheap.
        self._deferred: list[tuple[_Request, int, str, int, int]] = []
        self._cbody: _Body | None = None   # request body being skipped
        self._creq: _Request | None = None
        self._cpaused = False              # after Upgrade/CONNECT: wait for the response
        self._sbody: _Body | None = None   # response body being skipped
        self._sresp: tuple[_Request | None, int, str] | None = None  # (request, status, version)
        self._scan = [0, 0]                # where to resume looking for CRLFCRLF, per side
        self._resync = [False, False]      # after a gap: drop bytes until a message starts
        self._s_last_ts = 0
        self._done = False                 # protocol switched or tunnel: ignore the rest
        self._done_client = False          # an HTTP/0.9 request was the client's last word
        self._lf = 0                       # bit 1 << side: that side's head ended lines in a bare LF

    # -- heads ---------------------------------------------------------------
    def _head_end(self, buf: LargeBuffer, side: int) -> int:
        """Offset just past the empty line ending the head, or -1 (need more).

        Lines may end in CRLF or a bare LF (RFC 9112 §2.2): each LF is looked at once, and
        the search resumes at the last one (``_scan``), so a head arriving a byte at a time
        is still read in linear time.
        """
        limit = self.settings.max_header_bytes
        n = len(buf)
        stop = n if n <= limit else limit
        start = self._scan[side]
        while True:
            e = buf.find(b"\n", start, stop)
            if e < 0 or e + 1 >= n:
                break
            b1 = buf.u8_at(e + 1)
            if b1 == 0x0A:
                self._scan[side] = 0
                return e + 2
            if b1 == 0x0D:
                if e + 2 >= n:
                    break
                if buf.u8_at(e + 2) == 0x0A:
                    self._scan[side] = 0
                    return e + 3
            start = e + 1
        if n >= limit:
            raise LimitExceeded(NAME, "header_too_large")
        self._scan[side] = e if e >= 0 else stop
        return -1

    def _head(self, buf: LargeBuffer, side: int, skip_crlf: bool = True) -> tuple[Any, ...] | None:
        """The complete head at the front of ``buf``, validated in one regex match, or None:
        (what the match ran over, the match, bytes of ``buf`` the head takes[, the request
        line's (method, target, minor) when a lenient reading differs from the match's]).

        Fast path: when the buffer is one chunk (the usual case: a head arrives in
        one segment) the head regex runs over a view of it directly. Otherwise, or
        when it does not match, look for the end of the head first (need more /
        limits) and then classify the error.
        """
        pat = self._req_head if side == 0 else self._resp_head
        n = len(buf)
        if buf.chunk_count == 1:
            lim = self._limit
            v = buf.view_at(0, n if n <= lim else lim)
            m = pat.match(v)
            if m is not None:
                self._scan[side] = 0
                return v, m, m.end()
        if side == 0 and skip_crlf and n and (buf.u8_at(0) == 0x0A or (n >= 2 and buf.u16be_at(0) == 0x0D0A)):
            # RFC 9112 §2.2: ignore empty lines before a request line (a few, not a flood).
            for _ in range(MAX_LEADING_CRLF):
                if len(buf) and buf.u8_at(0) == 0x0A:
                    buf.release(1)
                elif len(buf) >= 2 and buf.u16be_at(0) == 0x0D0A:
                    buf.release(2)
                else:
                    break
            return self._head(buf, side, False) if len(buf) else None
        end = self._head_end(buf, side)
        if end < 0:
            return None
        v = buf.view_at(0, end)
        m = pat.fullmatch(v)
        if m is not None:
            return v, m, end
        canon, start = _lenient_head(v, side == 0)  # raises what it refuses
        if not self._lf & (1 << side) and _BARE_LF.search(v) is not None:
            self._lf |= 1 << side  # its chunk lines may end so too (_Body._line)
        m = pat.fullmatch(canon)
        if m is not None:
            return canon, m, end, start
        line = (_REQ_LINE if side == 0 else _STATUS_LINE).match(canon)
        if line is None:
            raise Malformed(NAME, "bad_request_line" if side == 0 else "bad_status_line")
        self._check_block(canon, line.end(), len(canon))
        raise Malformed(NAME, "bad_header")  # not reached: _check_block raised

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

    def feed_whole(self, from_client: bool, data: memoryview, ts_ns: int) -> bool:
        """The common segment, parsed without a buffer: a request, or a response, whose head
        and whole Content-Length body (a response's whole chunked body too, with the C
        parser) are exactly ``data``; a head followed by only the start of its
        Content-Length body (or, in a response, by the start of a close-delimited one);
        the next piece of such a body, up to its end. Servers write a head and its body in
        separate segments (Python's http.server, most frameworks), so without the last two
        every such response went through the buffer (issue 21).

        Anything else (pipelined, interim, HEAD/204/304, chunked pieces, enriched
        exchanges, malformed) returns False before any state changes, and the stage takes
        the buffered path, which handles and counts it. About a third of the stage's cost
        per exchange is the buffer bookkeeping this skips.
        """
        if self._done:
            return False
        if from_client:
            body = self._cbody
            if body is not None:  # _feed_client's body step, for a piece that ends by the body's end
                if body.mode != _LENGTH or body.sink is not None:
                    return False
                left = body.remaining - len(data)
                if left < 0:
                    return False  # the next request follows: the buffered path splits them
                body.remaining = left
                body.size += len(data)
                body.last_ts = ts_ns
                if not left:
                    req = self._creq
                    if req is not None:
                        req.body_size = body.size
                    self._cbody = self._creq = None
                    self._emit_deferred()
                return True
            if self._cpaused or self._resync[0]:
                return False
            if _C_REQUEST is not None:
                n = len(data)
                r = _C_REQUEST(data if n <= self._limit else data[:self._limit], self._max_headers)
                if r is not None:
                    (end, method, original, target, version, length, te, chunked, upgrade, host, ua, tp, path,
                     query) = r
                    # A body-less request, or one with its whole Content-Length or chunked body.
                    if te and length >= 0:
                        return False  # both framings: the buffered path refuses and counts it
                    en = self._enrich
                    if en is not None and path is not None and (path[-2:] in en.ends or "/_" in path
                                                                 or path == "/") and en.select(method, path, ua):
                        return False  # an enricher reads it: the buffered path captures its body
                    if te:  # not ending in chunked: malformed, the buffered path counts it
                        c = _C_CHUNKED(data, end, self._limit) if chunked else None  # type: ignore[misc]
                        if c is None or c[0] != n:
                            return False
                        length = c[1]
                    elif end + length < n if length > 0 else end != n:
                        return False  # pipelined: the buffered path splits them
                    if len(self._pending) >= self._max_pending:
                        return False
                    req = _Request(method, original, target, version, ts_ns, host, ua, tp, upgrade, path, query)
                    if te:
                        req.chunked = True
                    return self._queue_whole(req, length, n - end)
            return self._whole_request(data, ts_ns)
        body = self._sbody
        if body is not None:  # _feed_server's body step, for a piece that ends by the body's end
            if body.sink is not None:
                return False
            mode = body.mode
            n = len(data)
            self._s_last_ts = ts_ns
            if mode == _LENGTH:
                left = body.remaining - n
                if left < 0:
                    return False  # the next response follows: the buffered path splits them
                body.remaining = left
                body.size += n
                body.last_ts = ts_ns
                if not left:
                    self._sbody = None
                    self._finish(body.size, ts_ns)
                return True
            if mode == _CLOSE:
                body.size += n
                body.last_ts = ts_ns
                return True
            return False
        if self._resync[1] or not self._pending or self._pending[0].cap is not None:
            return False
        if _C_RESPONSE is not None:
            r = _C_RESPONSE(data, self._max_headers, self._limit)
            if r is not None:
                end, status, version, length, te, chunked, _u = r
                req = self._pending[0]
                if status < 200 or status == 204 or status == 304 or req.head or req.connect:
                    return False
                if te:  # a whole chunked body (the Python walker handles anything else)
                    if not chunked:
                        return False
                    c = _C_CHUNKED(data, end, self._limit)  # type: ignore[misc]
                    if c is None or c[0] != len(data):
                        return False
                    length = c[1]
                elif length < 0 or end + length != len(data):
                    return self._response_start(req, status, version, end, length, len(data), ts_ns)
                self._s_last_ts = ts_ns
                self._scan[1] = 0
                if self._cpaused or req is self._creq:  # _finish resumes / defers these
                    self._sresp = (req, status, version)
                    self._finish(length, ts_ns)
                else:  # _finish's common case, inlined
                    self._pending.popleft()
                    self.conn.emit(self._span(req, status, version, length, ts_ns, None))
                return True
        return self._whole_response(data, ts_ns)

    def _whole_request(self, data: memoryview, ts_ns: int) -> bool:
        """feed_whole's request side with the regexes (the reference; C declined or is off)."""
        n = len(data)
        m = self._req_head.match(data, 0, self._limit)
        if m is None:
            return False
        end = m.end()
        try:
            length, te, _c, upgrade, host, ua, tp = _fields(data, m.start(4) - 2, end - 2)
        except ProtocolError:
            return False
        if te or (end + length < n if length > 0 else end != n):
            return False
        method, target, minor = m.group(1, 2, 3)
        if len(self._pending) >= self._max_pending:
            return False
        meth, original = _method(method)
        if self._enrich is not None and self._selected(meth, target, None, ua):
            return False  # an enricher reads it: the buffered path captures its body
        req = _Request(meth, original, target, "1.1" if minor == b"1" else "1.0", ts_ns, host, ua, tp, upgrade)
        return self._queue_whole(req, length, n - end)

    def _queue_whole(self, req: _Request, length: int, got: int) -> bool:
        """A request head taken by feed_whole (either path) with ``got`` bytes of its
        ``length``-byte body (all of it, or its start: _queue_request's body then, the rest
        to come in later segments): await its response."""
        self._pending.append(req)
        self._scan[0] = 0
        if got < length:
            body = self._cbody = _Body(_LENGTH, length - got, 0)
            body.size = got
            self._creq = req
        elif length > 0:
            req.body_size = length
        if req.upgrade is not None or req.connect:
            self._cpaused = True
        return True

    def _response_start(self, req: _Request, status: int, version: str, end: int, length: int, n: int,
                        ts_ns: int) -> bool:
        """A final response's head in ``data[:end]`` (of ``n`` bytes) followed by only the start of
        its body, Content-Length (``length``) or close-delimited (-1) (feed_whole, either path):
        _response_head's state once the buffered body step has taken those bytes, or False
        (pipelined, or a head the caller has not ruled out)."""
        got = n - end
        if length >= 0:
            if got >= length:
                return False
            body = self._sbody = _Body(_LENGTH, length - got, 0)
        else:
            body = self._sbody = _Body(_CLOSE, 0, 0)
        body.size = got
        body.last_ts = ts_ns
        self._s_last_ts = ts_ns
        self._scan[1] = 0
        self._sresp = (req, status, version)
        return True

    def _whole_response(self, data: memoryview, ts_ns: int) -> bool:
        """feed_whole's response side with the regexes (the reference; C declined or is off)."""
        m = self._resp_head.match(data, 0, self._limit)
        if m is None:
            return False
        end = m.end()
        status = int(m.group(2))
        if status < 200 or status == 204 or status == 304:
            return False
        try:
            length, te, _c, _u, _h, _a, _t = _fields(data, m.start(3) - 2, end - 2)
        except ProtocolError:
            return False
        req = self._pending[0]
        if te or req.head or req.connect:
            return False
        if length < 0 or end + length != len(data):
            return self._response_start(req, status, "1.1" if m.group(1) == b"1" else "1.0", end, length,
                                        len(data), ts_ns)
        self._s_last_ts = ts_ns
        self._scan[1] = 0
        self._sresp = (req, status, "1.1" if m.group(1) == b"1" else "1.0")
        self._finish(length, ts_ns)
        return True

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
            if self._done_client:  # after an HTTP/0.9 request: nothing the server reads
                buf.release(len(buf))
                return
            if self._resync[0] and not self._resynced(buf, True):
                return
            if buf.chunk_count == 1:  # the usual case, inlined from _head's fast path
                n = len(buf)
                v = buf.view_at(0, n if n <= self._limit else self._limit)
                if _C_REQUEST is not None:
                    r = _C_REQUEST(v, self._max_headers)
                    if r is not None:
                        self._scan[0] = 0
                        (end, method, original, target, version, length, te, chunked, upgrade, host, ua, tp, path,
                         query) = r
                        self._queue_request(buf, _Request(method, original, target, version, buf.ts_at(0), host, ua,
                                                          tp, upgrade, path, query), end, length, te, chunked)
                        continue
                m = self._req_head.match(v)
                if m is not None:
                    self._scan[0] = 0
                    self._request(buf, v, m)
                    continue
            if buf.u8_at(0) == 0x47 and self._simple_request(buf):  # 'G': maybe HTTP/0.9
                return
            head = self._head(buf, 0)
            if head is None:
                return
            self._request(buf, *head)

    def _simple_request(self, buf: LargeBuffer) -> bool:
        """An HTTP/0.9 Simple-Request at the front of ``buf``: queued, True (the client has
        nothing more to say: 0.9 is one request a connection, the rest is released); False
        when the first line is not complete yet or is not one."""
        e = buf.find(b"\n", 0, min(len(buf), MAX_09_LINE))
        if e < 0:
            return False
        m = _REQ09.fullmatch(buf.view_at(0, e + 1))
        if m is None:
            return False
        self._scan[0] = 0
        req = _Request("GET", None, bytes(m.group(1)), "0.9", buf.ts_at(0), None, None, None, None)
        self._queue_request(buf, req, e + 1, -1, False, False)
        buf.release(len(buf))
        self._done_client = True
        return True

    def _request(self, buf: LargeBuffer, view: memoryview | bytes, m: re.Match[bytes], size: int = -1,
                 start: tuple[bytes, bytes, bytes] | None = None) -> None:
        """A request head matched over ``view`` (the buffer's, or a lenient head's strict
        rewrite); it takes ``size`` bytes of ``buf`` (the match's length when -1); ``start``
        is the lenient reading's request line, when given."""
        end = m.end()
        length, te, chunked, upgrade, host, ua, tp = _fields(view, m.start(4) - 2, end - 2)
        method, target, minor = m.group(1, 2, 3) if start is None else start
        meth, original = _method(method)
        req = _Request(meth, original, target, "1.1" if minor == b"1" else "1.0", buf.ts_at(0), host, ua, tp,
                       upgrade)
        self._queue_request(buf, req, end if size < 0 else size, length, te, chunked)

    def _queue_request(self, buf: LargeBuffer, req: _Request, end: int, length: int, te: bool,
                       chunked: bool) -> None:
        """A parsed request head (``end`` bytes at the front of ``buf``): queue it, frame its body."""
        if te and length >= 0:
            # Both framings (RFC 9112 §6.1): which one the server used is what request
            # smuggling plays on. Refused and counted, never guessed.
            raise Malformed(NAME, "content_length_with_transfer_encoding")
        en = self._enrich
        if en is not None:
            kinds = self._selected(req.method, req.target, req.path, req.user_agent)
            if kinds is not None:  # an enricher reads this exchange: its head fields, a bounded body
                req.cap = en.begin(kinds, req.method, req.target, req.host, req.user_agent, buf.view_at(0, end))
        buf.release(end)
        if len(self._pending) >= self.settings.max_pending_requests:
            self._pending.popleft()
            self.conn.drop("pending_overflow")
        self._pending.append(req)
        if te:
            if not chunked:  # RFC 9112 §6.3: a request must end in chunked
                raise Malformed(NAME, "bad_transfer_encoding")
            req.chunked = True
            self._cbody = _Body(_CHUNKED, 0, self.settings.max_header_bytes, bool(self._lf & 1))
            self._creq = req
        elif length > 0:
            self._cbody = _Body(_LENGTH, length, 0)
            self._creq = req
        if req.cap is not None and self._creq is req:
            self._cbody.sink = req.cap.req_body  # type: ignore[union-attr]
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
            if buf.chunk_count == 1:  # the usual case, inlined from _head's fast path
                n = len(buf)
                v = buf.view_at(0, n if n <= self._limit else self._limit)
                if _C_RESPONSE is not None:
                    r = _C_RESPONSE(v, self._max_headers, n)
                    if r is not None:
                        self._scan[1] = 0
                        self._response_head(buf, *r)
                        continue
                m = self._resp_head.match(v)
                if m is not None:
                    self._scan[1] = 0
                    self._response(buf, v, m)
                    continue
            pend = self._pending
            if pend and pend[0].version == "0.9" and self._sresp is None:
                # RFC 1945 §6: a Simple-Response is the entity body alone, until the close.
                self._sresp = (pend[0], 0, "0.9")
                b = self._sbody = _Body(_CLOSE, 0, 0)
                b.last_ts = buf.ts_at(0)
                continue
            head = self._head(buf, 1)
            if head is None:
                return
            self._response(buf, *head)

    def _response(self, buf: LargeBuffer, view: memoryview | bytes, m: re.Match[bytes], size: int = -1,
                  _start: Any = None) -> None:
        end = m.end()
        status = int(m.group(2))
        version = "1.1" if m.group(1) == b"1" else "1.0"
        length, te, chunked, upgrade, _h, _u, _t = _fields(view, m.start(3) - 2, end - 2)
        self._response_head(buf, end if size < 0 else size, status, version, length, te, chunked, upgrade)

    def _response_head(self, buf: LargeBuffer, end: int, status: int, version: str, length: int, te: bool,
                       chunked: bool, upgrade: bytes | None) -> None:
        """A parsed response head (``end`` bytes at the front of ``buf``): pair it, frame its body."""
        req = self._pending[0] if self._pending else None
        sink = None
        if req is not None and req.cap is not None and status >= 200:
            sink = req.cap.response(status, buf.view_at(0, end))  # enrich/: where the body goes, if read
        if length > 0 and not te and status >= 200 and len(buf) - end >= length and status != 204 \
                and status != 304 and (req is None or not (req.head or req.connect)):
            # The usual small response: head and whole body are here, release them at once.
            last = end + length
            last_ts = buf.ts_at(last - 1)
            if sink is not None:
                _sink_feed(sink, buf, end, length)
            buf.release(last)
            self._sresp = (req, status, version)
            self._finish(length, last_ts)
            return
        last_ts = buf.ts_at(end - 1)
        buf.release(end)
        if status < 200:
            if status == 101:
                self._done = True  # the paused client side must not resume as HTTP/1
                up = req.upgrade if req is not None else upgrade
                if up == b"h2c":
                    # The answer to this request comes as HTTP/2 stream 1 (RFC 9113 §3.2):
                    # hand the request to the http2 session, which makes its span.
                    if req is not None:
                        self._pending.popleft()
                        self.conn.extra["http2_upgrade_request"] = {
                            "method": req.method_original or req.method, "target": req.target,
                            "host": req.host, "scheme": "http", "user_agent": req.user_agent,
                            "traceparent": req.traceparent, "start_ns": req.start_ts,
                            "body_size": req.body_size}
                    self._switch("http2")
                else:  # websocket and others: the 101 ends the exchange
                    self._sresp = (req, status, version)
                    self._finish(0, last_ts)
                    self._switch(None)
            # 100 Continue, 102, 103: interim, the final response follows.
            return
        self._sresp = (req, status, version)
        if (req is not None and req.head) or status == 204 or status == 304:
            self._finish(0, last_ts)
        elif req is not None and req.connect and status < 300:
            self._finish(0, last_ts)
            self._switch(None)
        elif te and chunked:
            b = self._sbody = _Body(_CHUNKED, 0, self.settings.max_header_bytes, bool(self._lf & 2))
            b.last_ts = last_ts
            b.sink = sink
        elif length >= 0 and not te:
            if length == 0:
                self._finish(0, last_ts)
            else:
                b = self._sbody = _Body(_LENGTH, length, 0)
                b.last_ts = last_ts
                b.sink = sink
        else:  # RFC 9112 §6.3 rule 8: the body ends when the server closes
            b = self._sbody = _Body(_CLOSE, 0, 0)
            b.last_ts = last_ts
            b.sink = sink

    def skip_gap(self, from_client: bool, nbytes: int, ts_ns: int) -> bool:
        """Lost bytes inside a Content-Length body: count them and keep going.

        eBPF's per-message cap and a full ring lose the middle of large bodies; the
        exchange is still whole from HTTP's point of view, and its sizes stay right.
        """
        body = self._cbody if from_client else self._sbody
        if body is None or body.mode != _LENGTH or nbytes > body.remaining:
            return False
        if body.sink is not None:  # enrich/: the captured body stops at the gap (counted "gap")
            req = self._creq if from_client else (self._sresp[0] if self._sresp is not None else None)
            if req is not None and req.cap is not None:
                req.cap.lose(from_client)
            body.sink = None
        body.remaining -= nbytes
        body.size += nbytes
        body.last_ts = ts_ns
        if body.remaining == 0:  # the gap ended the body: finish now, no more bytes may come
            if from_client:
                req = self._creq
                if req is not None:
                    req.body_size = body.size
                self._cbody = self._creq = None
                self._emit_deferred()
                if len(self.conn.client_buf):
                    self._feed_client(self.conn.client_buf)
            else:
                self._sbody = None
                self._finish(body.size, body.last_ts)
                if len(self.conn.server_buf):
                    self._feed_server(self.conn.server_buf)
        return True

    def _switch(self, to: str | None) -> None:
        self._done = True
        self._cpaused = False
        self.conn.extra["switch_to"] = to

    def _finish(self, resp_size: int, end_ts: int, error: str | None = None, incomplete: bool = False) -> None:
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
        if req is self._creq and error is None and not incomplete:
            # The server answered before the request body ended (an early 413, nginx's
            # `return`): emit once the body is complete, so its size is known.
            self._deferred.append((req, status, version, resp_size, end_ts))
            return
        if incomplete:  # the response began, the connection ended first: base.py's rule
            if req is self._creq and self._cbody is not None:
                req.body_size = self._cbody.size
            self.cut_short(self._span(req, status, version, resp_size, end_ts, None))
            return
        self.conn.emit(self._span(req, status, version, resp_size, end_ts, error))

    def _emit_deferred(self, error: str | None = None) -> None:
        while self._deferred:
            req, status, version, size, end_ts = self._deferred.pop(0)
            if error is not None and req is self._creq and self._cbody is not None:
                req.body_size = self._cbody.size
            self.conn.emit(self._span(req, status, version, size, end_ts, None))

    # -- spans -------------------------------------------------------------------
    def _span(self, req: _Request, status: int, version: str, resp_size: int, end_ts: int,
              error: str | None) -> Any:
        conn = self.conn
        kind = self._kind
        target = req.target
        host: str | None = None
        port: int | None = None
        method, original = req.method, req.method_original
        known = self._known
        if known is not None:  # a configured list replaces semconv's
            raw = original if original is not None else method
            method, original = (raw, None) if raw in known else ("_OTHER", raw)
        attrs: dict[str, AttrValue] = {"http.request.method": method}
        if original is not None:
            attrs["http.request.method_original"] = original
        if req.connect:  # authority-form: CONNECT host:port
            host, port = _host(target)
        elif req.path is not None:  # origin-form, decoded by the C parser already
            attrs["url.path"] = req.path
            if req.query is not None:
                attrs["url.query"] = self._redact(req.query)
        else:
            scheme = target[:8].lower() if target[:1] != b"/" else b""
            # absolute-form (a request to a proxy): the authority is the server
            scheme_end = 7 if scheme[:7] == b"http://" else 8 if scheme == b"https://" else 0
            if scheme_end:
                slash = target.find(b"/", scheme_end)
                host, port = _host(target[scheme_end:] if slash < 0 else target[scheme_end:slash])
                target = b"/" if slash < 0 else target[slash:]
            q = target.find(b"?")
            if q < 0:
                attrs["url.path"] = target.decode("utf-8", "replace")
            else:
                attrs["url.path"] = target[:q].decode("utf-8", "replace")
                attrs["url.query"] = self._redact(target[q + 1:].decode("utf-8", "replace"))
        attrs["url.scheme"] = "http"
        if host is None and req.host is not None:
            host, port = _HOSTS.get(req.host) or _host(req.host)
        if host:
            attrs["server.address"] = host
            attrs["server.port"] = port if port is not None else conn.server_port
            if kind == _CLIENT and not req.connect:
                hh = req.host.decode("ascii", "replace") if req.host else host
                full = target.decode("utf-8", "replace")
                if "url.query" in attrs:  # the redacted query, not the raw one
                    full = f"{full.partition('?')[0]}?{attrs['url.query']}"
                attrs["url.full"] = f"http://{hh}{full}"
        attrs["network.protocol.version"] = req.version if version == "1.1" else version
        if status:
            attrs["http.response.status_code"] = status
        if req.body_size or req.chunked:
            attrs["http.request.body.size"] = req.body_size
        attrs["http.response.body.size"] = resp_size
        if req.user_agent is not None:
            attrs["user_agent.original"] = req.user_agent.decode("utf-8", "replace")
        code = _UNSET
        message = ""
        if error is not None:
            code = _ERROR
            attrs["error.type"] = error
            message = ("connection reset before the response completed" if error == "connection_reset"
                       else "connection closed before the response completed")
        elif status >= 500 or (status >= 400 and kind != _SERVER):
            code = _ERROR
            attrs["error.type"] = str(status)
        # Positional (base.Conn.span's order): keywords cost a fifth of this call.
        span = conn.span(method if original is None else "HTTP", kind, req.start_ts, end_ts,
                         attrs, req.traceparent, code, message)
        if req.cap is not None:  # enrich/: GenAI, GraphQL, Elasticsearch, JSON-RPC attributes
            self._enrich.finish(req.cap, span, conn.emit)
        return span

    def _selected(self, method: str, target: bytes, path: str | None = None, ua: bytes | None = None) -> Any:
        """The enrichers' candidate kinds for a request (enrich/), or None; the inline pre-test
        first, so a plain request costs three string tests."""
        if path is None:
            if target[:1] != b"/":
                return None  # absolute-form (a proxy's) and CONNECT: not enriched
            q = target.find(b"?")
            path = (target if q < 0 else target[:q]).decode("utf-8", "replace")
        en = self._enrich
        if path[-2:] in en.ends or "/_" in path or path == "/":
            return en.select(method, path, ua)
        return None

    def _redact(self, query: str) -> str:
        if self.settings.sanitize_query:  # one pass: the rule and redact_query_params
            return redact_query(query, self.settings.redact_query_params)
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
            elif reset:
                self._finish(size, ts_ns, "connection_reset")
            else:  # the head (and part of the body) came: a span of what was seen
                self._finish(size, (body.last_ts if body is not None else 0) or end_ts, incomplete=True)
        elif self._pending and not reset:
            self._cut_head(end_ts)
        while self._pending:
            req = self._pending[0]
            if reset:
                self._sresp = (req, 0, req.version)
                self._finish(0, ts_ns, "connection_reset")
            else:
                self._pending.popleft()
                self.conn.drop("unanswered")
        self._done = True


    def _cut_head(self, end_ts: int) -> None:
        """The reply's head had begun (its status line whole, or cut short: then its code if
        in sight) when the connection ended: base.py's rule makes a span of it, with that
        status; the partial fields are released as read. A final status only: an interim 1xx
        says nothing of the answer."""
        buf = self.conn.server_buf
        n = min(len(buf), 512)
        if not n:
            return
        e = buf.find(b"\n", 0, n)
        if e < 0:  # the status line itself cut short: its code, if in sight
            part = buf.view_at(0, n)  # matched in place (re reads any buffer)
            if not _RESP_PARTIAL.match(part):
                return
            m = _STATUS_CODE_PREFIX.match(part)
            status = int(m.group(2)) if m else 0  # 0: not yet in sight, no status on the span
            minor = m.group(1) if m else b"1"
            last = n - 1
        else:
            line = bytes(buf.view_at(0, e + 1))  # <= 512 bytes, once a connection
            if _STATUS_DETECT.fullmatch(line) is None:
                return
            ver, code = line.split(None, 2)[:2]  # the pattern allows runs of spaces between them
            status, minor, last = int(code), ver[7:8], e
            if status < 100:
                return  # no status class: not an answer to make a span of
        if 100 <= status < 200:
            return
        ts = buf.ts_at(last)
        buf.release(len(buf))
        self._sresp = (self._pending[0], status, "1.0" if minor == b"0" else "1.1")
        self._finish(0, ts or end_ts, incomplete=True)

Session = Http1Session  # the name base.py's contract asks for
