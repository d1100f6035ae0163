"""Redis (RESP2 and RESP3): one CLIENT span per command, replies paired in order.

Contract: processors/protocols/base.py. Both directions are parsed by one
incremental RESP scanner (``_Scanner``) that keeps its place across ``feed``
calls: a reply of a million elements or a 500 MB bulk string is walked once,
as it arrives, and released as it goes, so memory stays bounded and work
linear. Only what a span needs is decoded: a request's command name and a few
leading arguments (small copies, deliberate), a reply's type and, for errors,
its first line.

Pub/sub: after SUBSCRIBE the server pushes ``message``/``pmessage``/``smessage``
arrays (RESP2) or ``>`` pushes (RESP3); these are never paired with a request.
Commands inside MULTI get their ``+QUEUED`` reply; EXEC gets the result array
(null = aborted, an error).
"""

from __future__ import annotations

import re
from collections import deque
from typing import ClassVar

from processors.protocols.base import Conn, Detection, PendingQueue, Perspective, ProtocolSettings, Session
from processors.protocols.errors import LimitExceeded, Malformed
from processors.protocols.sanitize import sanitize_error
from service.largebuf import LargeBuffer
from service.model import SpanKind, StatusCode
from service.speedups import load as _load_speedup

#: The C twin of ``_whole_values`` (processors/protocols/_resp.c), or None (not built, or
#: WIRESPAN_PURE_PYTHON=1): the same values, from the same bytes, without the regex calls.
_C = _load_speedup("processors.protocols._resp")

NAME = "redis"
DEFAULT_PORTS = frozenset({6379, 6380, 26379})

#: Nesting deeper than this is refused: real replies nest a few levels (CLUSTER
#: SLOTS, XREAD ~4); RESP3 attributes add one. Hostile nesting must not recurse.
MAX_DEPTH = 64
#: Longest RESP type line (``$<len>``, ``+simple``, ``-error``) accepted. Redis
#: itself caps inline/multibulk header lines at 64 KiB (PROTO_INLINE_MAX_SIZE).
MAX_LINE = 64 * 1024
#: Aggregate and bulk lengths above these are malformed (Redis's own proto-max-bulk-len
#: default is 512 MB; 2^31 elements is far past any real reply).
MAX_BULK = 512 * 1024 * 1024
MAX_AGGREGATE = 1 << 31
#: Requests in flight per connection before the oldest are dropped (counted).
MAX_PENDING = 10_000
#: Arguments of a request kept for db.query.text, and bytes kept of each.
MAX_ARGS_KEPT = 8
MAX_ARG_BYTES = 128

_AGG_TYPES = frozenset(b"*%~>|")  # array, map, set, push, attribute
_LINE_TYPES = frozenset(b"+-:_,#(")  # simple, error, integer, null, double, boolean, big number
_BULK_TYPES = frozenset(b"$!=")  # bulk string, bulk error, verbatim string
_ALL_TYPES = _AGG_TYPES | _LINE_TYPES | _BULK_TYPES
_NUM_TYPES = _AGG_TYPES | _BULK_TYPES  # header line is a length
#: A type byte and its header line, matched in place on a chunk (bounded like MAX_LINE).
_TOKEN = re.compile(rb"([*%~>|$!=+\-:_,#(])([^\r\n]{0," + str(MAX_LINE).encode() + rb"})\r\n")
#: The common shapes ``_whole_values`` takes in place, after the type byte: an aggregate's
#: count or a bulk's length (at most 9 digits: under MAX_BULK's 10), and a line type's text
#: (bounded like _TOKEN).
_COUNT = re.compile(rb"(-?[0-9]{1,9})\r\n")
_LINE = re.compile(rb"([^\r\n]{0," + str(MAX_LINE).encode() + rb"})\r\n")
_FLAT_AGG_TYPES = frozenset(b"*%~>")  # aggregates _whole_values takes (not attributes)

#: Commands whose every argument is a key (kept in db.query.text); others keep the first.
_KEY_ONLY = frozenset({
    "GET", "DEL", "UNLINK", "EXISTS", "MGET", "INCR", "DECR", "TTL", "PTTL", "TYPE", "HGETALL", "HKEYS",
    "HVALS", "HLEN", "LLEN", "SMEMBERS", "SCARD", "ZCARD", "KEYS", "PERSIST", "STRLEN", "WATCH",
    "SUBSCRIBE", "UNSUBSCRIBE", "PSUBSCRIBE", "PUNSUBSCRIBE", "SSUBSCRIBE", "SUNSUBSCRIBE", "SELECT",
    "DUMP", "SINTER", "SUNION", "SDIFF", "PFCOUNT", "XLEN", "GETDEL",
})
#: Commands whose first argument is a subcommand, part of the operation name (CLIENT SETNAME).
_CONTAINER = frozenset({
    "CLIENT", "CONFIG", "CLUSTER", "COMMAND", "MEMORY", "MODULE", "OBJECT", "SCRIPT", "XINFO", "XGROUP",
    "FUNCTION", "ACL", "LATENCY", "PUBSUB", "SLOWLOG", "DEBUG",
})
#: Inline commands recognised at detection (a bare word on a line is otherwise too weak a sign).
_INLINE_OK = frozenset({"PING", "INFO", "GET", "SET", "DEL", "KEYS", "SELECT", "QUIT", "MONITOR", "DBSIZE",
                        "FLUSHALL", "FLUSHDB", "HELLO", "AUTH", "EXISTS", "INCR", "SUBSCRIBE", "CLIENT",
                        "PUBLISH", "PSUBSCRIBE", "ECHO", "TTL", "EXPIRE", "LPUSH", "RPUSH", "HGET", "HSET",
                        "SADD", "ZADD", "MGET", "MSET", "SETEX", "DECR", "APPEND", "CONFIG", "COMMAND",
                        "MULTI", "EXEC", "TYPE", "SCAN"})
#: An inline line whose first word is no command above: only the server's RESP answer can
#: tell it is Redis (detection waits for it rather than guessing from one line of text).
_INLINE_WORD = re.compile(rb"[A-Za-z][A-Za-z0-9_\-|.]{0,31}\Z")
_SUBSCRIBE = frozenset({"SUBSCRIBE", "PSUBSCRIBE", "SSUBSCRIBE"})
_UNSUBSCRIBE = frozenset({"UNSUBSCRIBE", "PUNSUBSCRIBE", "SUNSUBSCRIBE"})
_PUSH_KINDS = frozenset({b"message", b"pmessage", b"smessage"})
_SUB_REPLY_KINDS = frozenset({b"subscribe", b"psubscribe", b"ssubscribe", b"unsubscribe", b"punsubscribe",
                              b"sunsubscribe"})
_CREDENTIAL_CMDS = frozenset({"AUTH", "HELLO", "MIGRATE"})


class Settings(ProtocolSettings):
    #: Replace argument values in db.query.text with ``?`` (keys are kept).
    sanitize_query: bool = True
    #: Emit spans for pub/sub messages pushed by the server (CONSUMER, no request).
    trace_pushes: bool = False
    #: Replace quoted literals (echoed arguments) in error replies by ``?`` (``sanitize.py``).
    sanitize_errors: bool = True


# ---------------------------------------------------------------------------
# detection
# ---------------------------------------------------------------------------
def _int_line(buf: LargeBuffer, off: int, limit: int) -> tuple[int, int] | None:
    """``<digits>\\r\\n`` at ``off`` -> (value, next offset); None if not (yet) that."""
    end = buf.find(b"\r\n", off, min(len(buf), off + 24))
    if end < 0:
        return None
    v = bytes(buf.view_at(off, end - off))  # <= 24 bytes: a cheap, deliberate copy
    if not (v[1:] if v[:1] == b"-" else v).isdigit():  # one sign at most: int(b"--1") raises
        return None
    n = int(v)
    if n > limit:
        return None
    return n, end + 2


#: ``*<count>\r\n$<len>\r\n<name>\r\n`` with a letter-led command name (detect's fast path).
_DETECT_COMMAND = re.compile(rb"\*([1-9][0-9]{0,5})\r\n\$([1-9][0-9]?)\r\n([A-Za-z][A-Za-z_|\-]*)\r\n")


def detect(buf: LargeBuffer, from_client: bool | None) -> Detection:
    n = len(buf)
    if n == 0:
        return Detection.NEED_MORE
    t = buf.u8_at(0)
    if t == 0x2A and from_client is not False:  # '*': a command array: *<n>\r\n$<len>\r\n<name>\r\n
        if n < 8:
            return Detection.NEED_MORE
        if buf.chunk_count == 1:
            # The usual first segment, in one regex over its view: what the general walk below
            # accepts, in its plainest spelling (no leading zeros); anything else takes the walk.
            m = _DETECT_COMMAND.match(buf.view_at(0, n if n < 96 else 96))
            if m is not None and int(m.group(2)) == len(m.group(3)) <= 64:
                return Detection.REQUEST
        head = _int_line(buf, 1, 1 << 20)
        if head is None or head[0] < 1:
            return Detection.NEED_MORE if buf.find(b"\r\n", 1, min(n, 25)) < 0 and n < 25 else Detection.NO
        off = head[1]
        if off >= n:
            return Detection.NEED_MORE
        if buf.u8_at(off) != 0x24:  # '$'
            return Detection.NO
        blen = _int_line(buf, off + 1, 64)
        if blen is None:
            return Detection.NEED_MORE if n - off < 8 else Detection.NO
        if blen[0] < 1:  # a command name is a non-empty bulk string ($-1 / $0 are not)
            return Detection.NO
        name_off = blen[1]
        if name_off + blen[0] + 2 > n:
            return Detection.NEED_MORE
        name = buf.view_at(name_off, blen[0])
        if not bytes(name).replace(b"-", b"").replace(b"_", b"").replace(b"|", b"").isalpha():
            return Detection.NO
        if buf.view_at(name_off + blen[0], 2) != b"\r\n":
            return Detection.NO
        return Detection.REQUEST
    if from_client is not False and 0x41 <= (t & 0xDF) <= 0x5A:  # inline command, a letter first
        end = buf.find(b"\r\n", 0, min(n, 256))
        if end < 0:
            return Detection.NEED_MORE if n < 256 else Detection.NO
        line = bytes(buf.view_at(0, end))  # <= 256 bytes
        if b" HTTP/" in line or not line.isascii():  # "GET / HTTP/1.1" is HTTP, not Redis
            return Detection.NO
        words = line.split()
        word = words[0].upper() if words else b""
        if word.decode("ascii") not in _INLINE_OK:
            # An unknown command (a module's, a test server's): plausible, not proof. Wait for
            # the server's answer (the stage keeps these bytes when that answer is RESP).
            if _INLINE_WORD.match(words[0] if words else b"") and all(0x20 <= c < 0x7F or c == 9 for c in line):
                return Detection.NEED_MORE if n < 4096 else Detection.NO
            return Detection.NO
        # memcached's text protocol shares words with inline Redis: "set k 0 0 5" (flags,
        # exptime, bytes) and "get k1 k2" are memcached; Redis GET takes one key.
        if word == b"SET" and len(words) >= 5 and all(w.isdigit() for w in words[2:5]):
            return Detection.NO
        if word == b"GET" and len(words) != 2:
            return Detection.NO
        return Detection.REQUEST
    if from_client is not True and t in b"+-$:*%|":
        # Responses are a weaker sign: accept only the common exact shapes.
        end = buf.find(b"\r\n", 0, min(n, 128))
        if end < 0:
            return Detection.NEED_MORE if n < 128 else Detection.NO
        line = bytes(buf.view_at(0, end))  # <= 128 bytes
        if line in (b"+OK", b"+PONG", b"+QUEUED") or line.startswith((b"-ERR ", b"-WRONGTYPE ", b"-NOAUTH ")):
            return Detection.RESPONSE
        if line[:1] in (b"$", b":", b"*", b"%", b"|") and line[1:].lstrip(b"-").isdigit() and len(line) < 12:
            return Detection.RESPONSE
    return Detection.NO


# ---------------------------------------------------------------------------
# the incremental scanner
# ---------------------------------------------------------------------------
class _Value:
    """What a top-level value is, as far as a span cares."""

    __slots__ = ("args", "end_ts", "error", "is_null", "nargs", "push", "start_ts", "type")

    def __init__(self, t: int, start_ts: int) -> None:
        self.type = t
        self.start_ts = start_ts
        self.end_ts = start_ts
        self.error: str | None = None
        self.push = t == 0x3E  # '>'
        self.is_null = False
        self.args: list[bytes] = []   # leading bulk/simple elements of a top-level array (small copies)
        self.nargs = 0


class _Scanner:
    """Walks RESP values as bytes arrive; resumable at any byte.

    ``stack`` holds the elements still expected at each open aggregate level;
    ``skip`` the bulk bytes (plus CRLF) still to pass over. ``keep`` is how many
    leading top-level elements to copy (the command name and a few args).
    """

    __slots__ = ("cur", "keep", "need", "skip", "stack")

    def __init__(self, keep: int) -> None:
        self.keep = keep
        self.stack: list[int] = []
        self.skip = 0
        self.need = 0  # the offset an element kept for the span needs (set when waiting for it)
        self.cur: _Value | None = None

    def reset(self) -> None:
        self.stack.clear()
        self.skip = 0
        self.cur = None

    def _elem_done(self) -> bool:
        """One element finished at the current level; True when the top-level value is complete."""
        st = self.stack
        while st:
            st[-1] -= 1
            if st[-1] > 0:
                return False
            st.pop()
        return True

    def scan(self, buf: LargeBuffer, ts_ns: int) -> list[_Value]:
        """Consume complete values at the front of ``buf``; return them (top-level only)."""
        out: list[_Value] = []
        off = 0
        n = len(buf)
        token = _TOKEN.match
        while off < n:
            if not self.stack and not self.skip:
                # Whole values of the common shapes, read in place (see _whole_values).
                c, cs = buf.chunk_at(off)
                vals: list[WholeValue] = []
                got = _whole_values(c, off - cs, self.keep, vals)
                if vals:
                    start_ts = buf.ts_at(off)
                    for t, args, nargs, is_null, error in vals:
                        v = _Value(t, start_ts)
                        v.args = args
                        v.nargs = nargs
                        v.is_null = is_null
                        v.error = error
                        v.end_ts = ts_ns
                        out.append(v)
                    self.cur = None
                    off = cs + got
                    continue
            if self.skip:
                take = min(self.skip, n - off)
                self.skip -= take
                off += take
                if self.skip:
                    break
                if self._elem_done():
                    assert self.cur is not None
                    self.cur.end_ts = ts_ns
                    out.append(self.cur)
                    self.cur = None
                continue
            # Fast path: the header line lies in one chunk; one regex match reads it in place.
            c, cs = buf.chunk_at(off)
            m = token(c, off - cs)
            if m is not None:
                t = m.group(1)[0]
                st = self.stack
                if t == 0x24 and st and st[-1] > 1 and (len(st) > 1 or len(self.cur.args) >= self.keep):  # type: ignore[union-attr]
                    # The common bulk string inside an aggregate that nobody keeps
                    # (LRANGE, HGETALL): step over it by its length, nothing else.
                    raw = m.group(2)
                    blen = _to_int(raw, off) if len(raw) > 20 or not raw.isdigit() else int(raw)
                    if blen > MAX_BULK:
                        raise LimitExceeded(NAME, "bulk_too_large", off)
                    st[-1] -= 1
                    if blen < 0:  # $-1 (RESP2 null) or any negative length: no body follows
                        off = cs + m.end()
                        continue
                    nxt = cs + m.end() + blen + 2
                    if nxt <= n:
                        off = nxt
                    else:
                        off = cs + m.end()
                        self.skip = blen + 2
                        st[-1] += 1  # the skip branch counts the element when it ends
                    continue
                line_start = cs + m.start(2)
                end = cs + m.end(2)
                num = m.group(2) if t in _NUM_TYPES else b""
            else:
                t = c[off - cs]
                if t not in _ALL_TYPES:
                    if self.cur is None and not self.stack and (t == 0x0A or t == 0x0D):
                        # An empty line between values (redis-cli --pipe sends one; Redis
                        # ignores an empty inline query): skipped.
                        if t == 0x0A:
                            off += 1
                            continue
                        if off + 1 >= n:
                            break
                        if buf.u8_at(off + 1) == 0x0A:
                            off += 2
                            continue
                    if self.cur is None and not self.stack and 0x20 < t < 0x7F:
                        got = self._inline(buf, off, ts_ns)
                        if got is None:
                            break
                        off, v = got
                        out.append(v)
                        continue
                    raise Malformed(NAME, "bad_type", off, f"type byte {t:#x}")
                end = buf.find(b"\r\n", off + 1, min(n, off + 1 + MAX_LINE + 2))
                if end < 0:
                    if n - off > MAX_LINE:
                        raise LimitExceeded(NAME, "line_too_long", off)
                    break
                line_start = off + 1
                num = buf.bytes_at(line_start, min(end - line_start, 21)) if t in _NUM_TYPES else b""
            nxt = self._element(buf, t, off, line_start, end, num, n, ts_ns, out)
            if nxt < 0:
                break
            off = nxt
        if off:
            buf.release(off)
        if self.need:
            # An argument a span keeps has not fully arrived: no call helps before it has.
            buf.want = self.need - off
            self.need = 0
        return out

    def _element(self, buf: LargeBuffer, t: int, off: int, line_start: int, end: int, num: bytes, n: int,
                 ts_ns: int, out: list[_Value]) -> int:
        """Handle the element whose header line is ``buf[off:end+2]``; the offset after it, or -1 to wait."""
        top = not self.stack
        if top:
            self.cur = _Value(t, buf.ts_at(off))
        cur = self.cur
        assert cur is not None
        if t in _AGG_TYPES:
            cnt = _to_int(num, off)
            if t == 0x25 or t == 0x7C:  # map / attribute: key and value per entry
                cnt *= 2
            if t == 0x7C:
                # An attribute annotates the value after it and is not an element of its
                # own: expect its entries plus the annotated value.
                cnt += 1
                if top:
                    cur.type = 0
            if cnt > MAX_AGGREGATE:
                raise LimitExceeded(NAME, "aggregate_too_large", off)
            if top and t != 0x7C:
                cur.nargs = max(cnt, 0)
            if cnt <= 0:  # empty or null (*-1) aggregate is a complete element
                if top:
                    cur.is_null = cnt < 0
                self._complete(ts_ns, out)
                return end + 2
            if len(self.stack) >= MAX_DEPTH:
                raise LimitExceeded(NAME, "too_deep", off)
            self.stack.append(cnt)
            return end + 2
        if t in _BULK_TYPES:
            blen = _to_int(num, off)
            body = end + 2
            if blen < 0:  # $-1: null bulk
                if top:
                    cur.is_null = True
                self._complete(ts_ns, out)
                return body
            if blen > MAX_BULK:
                raise LimitExceeded(NAME, "bulk_too_large", off)
            # Elements a span needs are copied (bounded); if they have not fully
            # arrived, stop before the header and read it again with more bytes.
            if t == 0x21 and top:  # '!' bulk error: keep its text
                if body + min(blen, 256) > n:
                    self.need = body + min(blen, 256)
                    return -1
                cur.error = _text(buf, body, min(blen, 256))
            elif len(self.stack) == 1 and len(cur.args) < self.keep:
                if body + min(blen, MAX_ARG_BYTES) > n:
                    self.need = body + min(blen, MAX_ARG_BYTES)
                    return -1
                cur.args.append(buf.bytes_at(body, min(blen, MAX_ARG_BYTES)))
            self.skip = blen + 2
            return body
        # line types
        if t == 0x2D and top:  # '-' error
            cur.error = _text(buf, line_start, min(end - line_start, 512))
        elif t == 0x5F and top:  # '_' null
            cur.is_null = True
        elif t == 0x2B and len(self.stack) == 1 and len(cur.args) < self.keep:
            cur.args.append(buf.bytes_at(line_start, min(end - line_start, MAX_ARG_BYTES)))
        self._complete(ts_ns, out)
        return end + 2

    def _complete(self, ts_ns: int, out: list[_Value]) -> None:
        if self._elem_done():
            cur = self.cur
            assert cur is not None
            cur.end_ts = ts_ns
            out.append(cur)
            self.cur = None

    def _inline(self, buf: LargeBuffer, off: int, ts_ns: int) -> tuple[int, _Value] | None:
        """An inline command (``PING\\r\\n``): space-separated words on one line."""
        end = buf.find(b"\n", off, min(len(buf), off + MAX_LINE + 1))
        if end < 0:
            if len(buf) - off > MAX_LINE:
                raise LimitExceeded(NAME, "line_too_long", off)
            return None
        v = _Value(0x2A, buf.ts_at(off))
        line = buf.view_at(off, min(end - off, 4096)).tobytes().rstrip(b"\r")  # bounded: one command line
        words = line.split()
        v.args = [w[:MAX_ARG_BYTES] for w in words[: self.keep]]
        v.nargs = len(words)
        v.end_ts = ts_ns
        return end + 1, v


#: One top-level value as ``_whole_values`` (and _resp.c) reads it: its type byte, the
#: leading elements kept (bytes, each at most MAX_ARG_BYTES), an aggregate's element count,
#: whether it is null, and an error's text.
WholeValue = tuple[int, list[bytes], int, bool, str | None]


def _whole_values(c: memoryview | bytes, p: int, keep: int, out: list[WholeValue]) -> int:
    """Top-level values of the common shapes lying whole in ``c`` from ``p``: flat aggregates
    (``*`` ``%`` ``~`` ``>``) of bulk and line elements and empty aggregates (every command,
    most replies, HELLO's), a bulk (``$`` ``!`` ``=``) or a line (``+`` ``-`` ``:`` ``_`` ``,`` ``#`` ``(``) value, each
    appended to ``out`` as a ``WholeValue`` (what the scanner would have found: the same
    kept elements, count, null and error). Returns the offset after the last one taken; it
    stops, having taken nothing of it, at the first value it cannot take whole.

    Why: ``_Scanner.scan`` is resumable at any byte, which costs a method call, a regex
    match and the stack's bookkeeping per element; a value whose bytes are all in one
    chunk (nearly every one) needs none of that. Whatever this declines (a value cut by
    the chunk's end, nesting, attributes, inline commands, anything malformed or over a
    limit) the scanner reads as before, so it decides every odd case alone.
    _resp.c's ``values`` does the same work when built (tests/test_redis_speedup.py holds
    the two equal); this is the reference, and the path when ``_C`` is None.
    """
    if _C is not None:
        return _C.values(c, p, keep, out)  # type: ignore[no-any-return]
    n = len(c)
    count = _COUNT.match
    line = _LINE.match
    while p < n:
        t = c[p]
        if t in _FLAT_AGG_TYPES:
            m = count(c, p + 1)
            if m is None:
                break
            cnt = int(m.group(1))
            if t == 0x25:  # '%': a map's key and value per entry
                cnt *= 2
            q = m.end()
            args: list[bytes] = []
            if cnt <= 0:  # empty, or null (*-1)
                out.append((t, args, 0, cnt < 0, None))
                p = q
                continue
            for _ in range(cnt):  # each element takes >= 3 bytes: at most n / 3 rounds
                if q >= n:
                    return p
                e = c[q]
                if e in _BULK_TYPES:
                    m = count(c, q + 1)
                    if m is None:
                        return p
                    blen = int(m.group(1))
                    q = m.end()
                    if blen < 0:  # a null element: no body
                        continue
                    if blen > MAX_BULK:
                        return p
                    if len(args) < keep:
                        args.append(c[q:q + min(blen, MAX_ARG_BYTES)].tobytes())  # small, bounded copy
                    q += blen + 2  # the body and its CRLF (not checked, as the scanner's skip)
                elif e in _LINE_TYPES:
                    m = line(c, q + 1)
                    if m is None:
                        return p
                    if e == 0x2B and len(args) < keep:  # '+'
                        args.append(c[q + 1:min(m.end(1), q + 1 + MAX_ARG_BYTES)].tobytes())
                    q = m.end()
                elif e in _FLAT_AGG_TYPES:
                    # An empty or null aggregate (HELLO's "modules" *0): a complete element,
                    # not kept, as the scanner has it; one with elements is the scanner's.
                    m = count(c, q + 1)
                    if m is None or int(m.group(1)) > 0:
                        return p
                    q = m.end()
                else:  # an attribute, anything else: the scanner's
                    return p
            if q > n:
                return p
            out.append((t, args, cnt, False, None))
        elif t in _BULK_TYPES:
            m = count(c, p + 1)
            if m is None:
                break
            blen = int(m.group(1))
            q = m.end()
            if blen < 0:
                out.append((t, [], 0, True, None))
            elif blen > MAX_BULK:
                break
            else:
                error = None
                if t == 0x21:  # '!' a bulk error: its text
                    error = c[q:q + min(blen, 256)].tobytes().decode("utf-8", "replace")
                q += blen + 2
                if q > n:
                    break
                out.append((t, [], 0, False, error))
        elif t in _LINE_TYPES:
            m = line(c, p + 1)
            if m is None:
                break
            q = m.end()
            if t == 0x2D:  # '-'
                a = p + 1
                out.append((t, [], 0, False, c[a:min(m.end(1), a + 512)].tobytes().decode("utf-8", "replace")))
            else:
                out.append((t, [], 0, t == 0x5F, None))  # '_' is null
        else:
            break
        p = q
    return p


def _to_int(raw: bytes, off: int) -> int:
    if not 0 < len(raw) <= 20:
        raise Malformed(NAME, "bad_length", off)
    try:
        return int(raw)
    except ValueError:
        raise Malformed(NAME, "bad_length", off, repr(raw)) from None


def _text(buf: LargeBuffer, off: int, n: int) -> str:
    return buf.bytes_at(off, max(n, 0)).decode("utf-8", "replace")


# ---------------------------------------------------------------------------
# session
# ---------------------------------------------------------------------------
class _Pending:
    __slots__ = ("base", "command", "in_multi", "nargs", "replies_left", "special", "start_ts", "text")

    def __init__(self, command: str, base: str, text: str, start_ts: int, replies: int, in_multi: bool,
                 nargs: int, special: bool) -> None:
        self.command = command
        self.base = base  # the command name upper-cased, without a container's subcommand (the rules' key)
        self.text = text
        self.start_ts = start_ts
        self.replies_left = replies
        self.in_multi = in_multi
        self.nargs = nargs
        self.special = special  # base is one _span has a rule for (SELECT, UNSUBSCRIBE...)


def _decode(b: bytes) -> str:
    return b.decode("utf-8", "replace")


#: What a command name's rules decide, as bits of ``_Rule.flags``: its first argument is a
#: subcommand (part of the operation name); its arguments are credentials (never shown);
#: every argument is a key (shown when sanitising); it changes the session's state or
#: pairing (SUBSCRIBE, CLIENT, MULTI, EXEC, DISCARD, SELECT: ``_request``'s slow branch).
_F_CONTAINER = 1
_F_CREDENTIAL = 2
_F_KEYS = 4
_F_STATEFUL = 8
#: Commands ``_request`` looks at beyond the text (``_F_STATEFUL``), and those ``_span`` does.
_STATEFUL = _SUBSCRIBE | frozenset({"CLIENT", "MULTI", "EXEC", "DISCARD", "SELECT"})
_SPAN_RULES = _UNSUBSCRIBE | frozenset({"SELECT", "EXEC", "DISCARD"})

#: A command name's spellings and rule bits: (as sent, decoded; upper-cased; its first word
#: upper-cased, the rules' key at span time; flags; whether _span has a rule for it).
_Rule = tuple[str, str, str, int, bool]
#: Command name as sent -> its _Rule. A few dozen names in practice; bounded so that a client
#: sending random names cannot grow it (past the bound a name is worked out each time).
_NAMES: dict[bytes, _Rule] = {}
_NAMES_MAX = 4096


def _name(b: bytes) -> _Rule:
    """A command name's rules, decided once a name (not once a command: the sets are
    looked up and the name decoded and upper-cased for every command otherwise)."""
    got = _NAMES.get(b)
    if got is None:
        sent = b.decode("utf-8", "replace")
        cmd = sent.upper()
        base = cmd if " " not in sent else sent.split(" ", 1)[0].upper()
        flags = ((_F_CONTAINER if cmd in _CONTAINER else 0) | (_F_CREDENTIAL if cmd in _CREDENTIAL_CMDS else 0)
                 | (_F_KEYS if cmd in _KEY_ONLY and cmd not in _CONTAINER else 0)
                 | (_F_STATEFUL if cmd in _STATEFUL else 0))
        got = (sent, cmd, base, flags, base in _SPAN_RULES)
        if len(_NAMES) < _NAMES_MAX:
            _NAMES[b] = got
    return got


def _more(more: int) -> str:
    """The elements of a command not kept: a ``?`` each, at most 8, then ``...``."""
    if more <= 0:
        return ""
    return " ?" * min(more, 8) + (" ..." if more > 8 else "")


#: ``_TAILS[q][m]``: the text after a sanitised command's first argument, for ``q`` more
#: arguments kept (each a ``?``) and ``m`` not kept (``_more``; 9 stands for any above 8):
#: built once, not with two string repeats and a concatenation a command.
_TAILS: tuple[tuple[str, ...], ...] = tuple(tuple(" ?" * q + _more(m) for m in range(10))
                                            for q in range(MAX_ARGS_KEPT))


_NO_ARGS: tuple[bytes, ...] = ()
_SUB_OR_UNSUB = _SUBSCRIBE | _UNSUBSCRIBE
_CLIENT = SpanKind.CLIENT
_SERVER = SpanKind.SERVER
_AT_SERVER = Perspective.SERVER
_UNSET = StatusCode.UNSET
_ERROR = StatusCode.ERROR


class Session(Session):  # type: ignore[no-redef]
    protocol: ClassVar[str] = NAME

    def __init__(self, conn: Conn) -> None:
        super().__init__(conn)
        self.settings: Settings = conn.settings if isinstance(conn.settings, Settings) else Settings()
        self._sanitize = self.settings.sanitize_query  # read once a command: a model's field is a slow read
        self.req = _Scanner(keep=MAX_ARGS_KEPT)
        self.resp = _Scanner(keep=3)
        self.pending: deque[_Pending] = PendingQueue(conn)
        self.namespace: str | None = None
        self._select: str | None = None  # the index a pending SELECT asks for
        self.in_multi = False
        self.subscribed = False
        self._reply_off = False   # CLIENT REPLY OFF: no reply until CLIENT REPLY ON
        self._skip_next = False   # CLIENT REPLY SKIP: no reply for the next command

    # -- requests ------------------------------------------------------
    def feed_whole(self, from_client: bool, data: memoryview, ts_ns: int) -> bool:
        """A segment of whole values (base.py's contract): read in place, no buffer. False,
        with nothing changed, for anything else (the buffered path reads and counts it)."""
        sc = self.req if from_client else self.resp
        if sc.stack or sc.skip or sc.cur is not None:
            return False
        if _C is None and type(data) is not memoryview:  # the eBPF receiver's payloads are bytes
            data = memoryview(data)
        vals: list[WholeValue] = []
        # _C's reader called here, not through _whole_values: that call was a tenth of this one
        keep = sc.keep
        if (_C.values(data, 0, keep, vals) if _C is not None else _whole_values(data, 0, keep, vals)) != len(data):
            return False
        if from_client:
            request = self._request
            for _t, args, nargs, _null, _error in vals:
                request(args, nargs, ts_ns)
        else:
            pending = self.pending
            for t, args, _nargs, is_null, error in vals:
                if args or t == 0x3E or not pending:  # '>' a push; the pub/sub cases; unpaired
                    self._reply(t == 0x3E, args, is_null, error, ts_ns, ts_ns)
                    continue
                # _reply's pairing, inline: once a reply, and the call was a fifth of it
                p = pending[0]
                p.replies_left -= 1
                if p.replies_left <= 0:
                    pending.popleft()
                    self._span(p, error, is_null, args, ts_ns)
        return True

    def feed(self, from_client: bool, buf: LargeBuffer, ts_ns: int) -> None:
        if from_client:
            for v in self.req.scan(buf, ts_ns):
                self._request(v.args, v.nargs, v.start_ts)
        else:
            for v in self.resp.scan(buf, ts_ns):
                self._reply(v.push, v.args, v.is_null, v.error, v.start_ts, v.end_ts)

    def _request(self, args: list[bytes], nargs: int, start_ts: int) -> None:
        """One command: its kept leading elements (``args``), its element count, when it began."""
        if not args:
            self.conn.drop("empty_command")
            return
        # ``cmd`` for the rules below; spans keep the command as the client sent it
        sent, cmd, base, flags, special = _NAMES.get(args[0]) or _name(args[0])
        nkept = len(args) - 1  # the arguments kept after the command name
        m = nargs - len(args)  # the elements not kept (never negative: the count includes the kept)
        if not 0 <= m < 10:
            m = 9 if m > 0 else 0  # _TAILS's index: 9 is any above 8
        # db.query.text: only the arguments shown are decoded, the others are a "?" each.
        if flags & _F_CREDENTIAL:
            text = sent + (" ?" * nkept)  # never a password, sanitising or not
        elif nkept <= 0:
            text = sent + _TAILS[0][m]
        elif not self._sanitize or flags & _F_KEYS:
            # One decode of the joined arguments: a space ends any broken UTF-8 sequence
            # before it, so this is the join of each one decoded, with one call.
            shown = args[1] if nkept == 1 else b" ".join(args[1:])
            text = f"{sent} {shown.decode('utf-8', 'replace')}{_TAILS[0][m]}"
        else:
            text = f"{sent} {args[1].decode('utf-8', 'replace')}{_TAILS[nkept - 1][m]}"
        op = f"{sent} {args[1].decode('utf-8', 'replace')}" if flags & _F_CONTAINER and nkept else sent
        pending = self.pending
        if not flags & _F_STATEFUL and not self._reply_off and not self._skip_next:
            # The common command: no state of the session's changes; paired with its reply.
            if len(pending) >= MAX_PENDING:
                pending.popleft()
                self.conn.drop("too_many_pending")
            pending.append(_Pending(op, base, text, start_ts, 1, self.in_multi, nargs, special))
            return
        replies = 1
        if cmd in _SUBSCRIBE:
            replies = max(nargs - 1, 1)  # one confirmation per channel
            self.subscribed = True
        if len(pending) >= MAX_PENDING:
            pending.popleft()
            self.conn.drop("too_many_pending")
        p = _Pending(op, base, text, start_ts, replies, self.in_multi, nargs, special)
        silent = self._reply_off or self._skip_next
        self._skip_next = False
        if cmd == "CLIENT" and len(args) > 2 and args[1].upper() == b"REPLY":
            mode = args[2].upper()
            if mode == b"ON":  # answered +OK, whatever came before
                self._reply_off = silent = False
            elif mode == b"OFF":
                self._reply_off = silent = True
            elif mode == b"SKIP":
                self._skip_next = silent = True
        if silent:
            # The server runs it and answers nothing (CLIENT REPLY): a span now, of the request.
            self._span(p, None, False, _NO_ARGS, start_ts)
            return
        if cmd == "MULTI":
            self.in_multi = True
        elif cmd == "EXEC" or cmd == "DISCARD":
            self.in_multi = False
        elif cmd == "SELECT" and len(args) > 1:
            self._select = _decode(args[1])
        pending.append(p)

    # -- replies ---------------------------------------------------------
    def _reply(self, push: bool, args: list[bytes], is_null: bool, error: str | None, start_ts: int,
               end_ts: int) -> None:
        """One top-level reply (what ``_Value`` holds): paired with the oldest command, or a push."""
        if args or push:  # the pub/sub cases need one or the other
            confirms = bool(args) and args[0] in _SUB_REPLY_KINDS
            if confirms and self.pending and self.pending[0].command.upper() in _SUB_OR_UNSUB:
                push = False  # RESP3 sends (un)subscribe confirmations as pushes: they answer the request
            if push or (self.subscribed and args and args[0] in _PUSH_KINDS):
                self.conn.extra["redis_pushes"] = self.conn.extra.get("redis_pushes", 0) + 1
                if self.settings.trace_pushes and len(args) >= 2:
                    self._push_span(args, start_ts, end_ts)
                return
            if self.subscribed and confirms and not self.pending:
                return  # extra (un)subscribe confirmations with no request left to pair
        pending = self.pending
        if not pending:
            self.conn.drop("unpaired_reply")
            return
        p = pending[0]
        p.replies_left -= 1
        if p.replies_left > 0:
            return
        pending.popleft()
        self._span(p, error, is_null, args, end_ts)

    def _span(self, p: _Pending, error: str | None, is_null: bool, args: list[bytes] | tuple[bytes, ...],
              end_ts: int, incomplete: bool = False) -> None:
        """The span of command ``p`` and its reply (``error``, ``is_null``, kept ``args``), ended at ``end_ts``."""
        conn = self.conn
        cmd = p.command
        base = p.base
        if p.special:  # SELECT, EXEC, DISCARD or an UNSUBSCRIBE (_SPAN_RULES)
            if base == "SELECT" and error is None and self._select is not None:
                self.namespace = self._select
            if base in _UNSUBSCRIBE and args and args[-1] == b"0":
                self.subscribed = False
        attrs: dict[str, object] = {
            "db.system.name": "redis",
            "db.operation.name": cmd,
            "db.query.text": p.text,
        }
        if self.namespace is not None:
            attrs["db.namespace"] = self.namespace
        if p.in_multi and base != "EXEC" and base != "DISCARD":
            attrs["db.redis.transaction"] = True
        status = _UNSET
        msg = ""
        if error is not None:
            status = _ERROR
            msg = sanitize_error(error) if self.settings.sanitize_errors else error  # (remembered there)
            prefix = error.split(" ", 1)[0]
            attrs["db.response.status_code"] = prefix
            attrs["error.type"] = prefix
        elif is_null and base == "EXEC":
            status = _ERROR
            msg = "transaction aborted (WATCH)"
            attrs["error.type"] = "EXECABORT"
        kind = _SERVER if conn.perspective == _AT_SERVER else _CLIENT  # conn.kind_for(CLIENT), inline
        span = conn.span(cmd, kind, p.start_ts, end_ts, attrs, None, status, msg)  # positional: once a span
        if incomplete:
            self.cut_short(span)
        else:
            conn.emit(span)

    def _push_span(self, args: list[bytes], start_ts: int, end_ts: int) -> None:
        conn = self.conn
        channel = _decode(args[2] if args[0] == b"pmessage" and len(args) > 2 else args[1])
        attrs: dict[str, object] = {
            "messaging.system": "redis",
            "messaging.operation.type": "receive",
            "messaging.destination.name": channel,
        }
        conn.emit(conn.span(f"receive {channel}", SpanKind.CONSUMER, start_ts, end_ts, attrs))

    def gap(self, from_client: bool, ts_ns: int) -> None:
        # Lost bytes: the scanner's place is meaningless and pairing is unknowable.
        (self.req if from_client else self.resp).reset()
        if self.pending:
            self.conn.drop("gap")
        self.pending.clear()

    def close(self, ts_ns: int, reset: bool = False) -> None:
        # base.py's rule: the command whose reply was being read (a large value, a long
        # array) is a span of what was seen, marked incomplete; the others are counted.
        cur = self.resp.cur
        buf = self.conn.server_buf
        if cur is None and len(buf) and buf.u8_at(0) != 0x3E and self.reply_begun():
            cur = _Value(buf.u8_at(0), buf.ts_at(0))  # a reply's first line cut short
        for i, p in enumerate(self.pending):
            if i == 0 and cur is not None and not cur.push:
                self._span(p, cur.error, False, _NO_ARGS, ts_ns, True)  # what was seen: its error, if any
            else:
                self.cut_short(None, "no_reply")
        if self.pending:
            self.pending.clear()
        if self.req.cur is not None:  # a command begun (and its bytes consumed) but never ended
            self.conn.drop("incomplete_message")
            self.req.reset()
