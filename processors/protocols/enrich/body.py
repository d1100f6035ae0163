"""Bounded body capture for the HTTP enrichers: the first bytes of a body, decoded, parsed.

Contract: nothing here is on the plain-HTTP path. A ``Capture`` exists only for a request
an enricher selected (enrich/__init__.py); it copies at most ``limit`` bytes of one body
(the one deliberate copy: what the attributes are read from) and, once over, keeps only
the last ``TAIL`` bytes (OpenAI puts ``usage`` last) and counts the rest. Decoding
(gzip/deflate, br, zstd) runs once on the captured bytes, with its output bounded too;
an ``SseStream`` decodes and splits a ``text/event-stream`` as it arrives, each event
bounded, the whole stream bounded. JSON is parsed with the standard library on bounded
input; a prefix that does not parse (a truncated body) is scanned for its top-level
scalars instead. Nothing here raises on bad input: each failure is a reason the caller
counts (``Capture.problem``, ``SseStream.problem``).
"""

from __future__ import annotations

import json
import re
import weakref
import zlib
from collections.abc import Callable, Iterable
from typing import Any

from service.largebuf import LargeBuffer

try:  # PEP 784's zstd (3.14's compression.zstd, backports.zstd before): output bounded by max_length
    from compression import zstd as _zstd  # type: ignore[import-not-found]
except ImportError:  # pragma: no cover - depends on the interpreter
    try:
        from backports import zstd as _zstd  # type: ignore[no-redef]
    except ImportError:
        _zstd = None
try:
    import brotli as _brotli
except ImportError:  # pragma: no cover - brotli is a dependency; without it br bodies are counted
    _brotli = None

__all__ = ["Budget", "Capture", "SseStream", "Decoder", "load_json", "top_level", "object_after", "TAIL",
           "available_encodings"]

#: Bytes kept from the end of a body that outgrew its bound (a response's ``usage`` is last).
TAIL = 4096
#: Longest SSE line kept (an event's ``data:`` line beyond it is skipped and counted).
MAX_SSE_LINE = 1 << 20


def available_encodings() -> list[str]:
    """The content codings this build decodes (br and zstd need their libraries)."""
    out = ["identity", "gzip", "x-gzip", "deflate"]
    if _brotli is not None:
        out.append("br")
    if _zstd is not None:
        out.append("zstd")
    return out


class Decoder:
    """One body's content coding, decoded with a bounded output.

    ``decode(data, limit)`` returns at most ``limit`` decoded bytes for ``data`` (fed in
    order) and sets ``over`` when more output was pending; ``problem`` names a failure
    (``decode_error``, ``unsupported_encoding``). A stream calls it once per piece.
    """

    __slots__ = ("_d", "kind", "over", "problem")

    def __init__(self, encoding: str) -> None:
        self.over = False
        self.problem: str | None = None
        self._d: Any = None
        enc = encoding.strip().lower()
        self.kind = enc
        if enc in ("gzip", "x-gzip"):
            self._d = zlib.decompressobj(16 + zlib.MAX_WBITS)
        elif enc == "deflate":
            self._d = zlib.decompressobj()
        elif enc == "br" and _brotli is not None:
            self._d = _brotli.Decompressor()
        elif enc == "zstd" and _zstd is not None:
            self._d = _zstd.ZstdDecompressor()
        elif enc not in ("", "identity"):
            self.problem = "unsupported_encoding"

    @property
    def identity(self) -> bool:
        return self._d is None and self.problem is None

    def decode(self, data: bytes | bytearray | memoryview, limit: int) -> bytes:
        if self.problem is not None or limit <= 0:
            if limit <= 0 and len(data):
                self.over = True
            return b""
        d = self._d
        if d is None:
            if len(data) > limit:
                self.over = True
                return bytes(data[:limit])
            return bytes(data)
        try:
            if self.kind == "br":
                out = d.process(bytes(data), output_buffer_limit=limit)
                if len(out) > limit:
                    out = out[:limit]
                    self.over = True
                elif not d.can_accept_more_data():
                    self.over = True
                return out
            if self.kind == "zstd":
                out = d.decompress(data, max_length=limit)
                if not d.needs_input and not d.eof:
                    self.over = True
                return out
            out = d.decompress(data, limit)
            if d.unconsumed_tail:
                self.over = True
            return out
        except Exception:  # zlib.error, brotli.error, ZstdError: hostile or corrupt input
            if self.kind == "deflate":  # RFC 9110 says zlib-wrapped; some servers send raw deflate
                self.kind = "raw-deflate"
                self._d = zlib.decompressobj(-zlib.MAX_WBITS)
                return self.decode(data, limit)
            self.problem = "decode_error"
            return b""


class Budget:
    """What every capture and stream buffer holds at once, against ``max_total_bytes``: one
    connection's bound times many connections is no bound, this is. Each holder keeps its
    charge in a one-item list; a finalizer gives it back when the holder is dropped, however
    its exchange ended (answered, evicted, cut by a gap or by the end of the connection)."""

    __slots__ = ("limit", "refused", "used")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self.refused = 0

    def take(self, acct: list[int], n: int) -> bool:
        if self.used + n > self.limit:
            self.refused += 1
            return False
        self.used += n
        acct[0] += n
        return True

    def give(self, acct: list[int], n: int) -> None:
        self.used -= n
        acct[0] -= n

    def release(self, acct: list[int]) -> None:
        self.used -= acct[0]
        acct[0] = 0

    def account(self, holder: object) -> list[int]:
        """A charge for ``holder``, returned when it is garbage."""
        acct = [0]
        weakref.finalize(holder, self.release, acct)
        return acct


class Capture:
    """The first ``limit`` bytes of one body (and its last ``TAIL`` once over), then decoded.

    ``feed`` takes a memoryview (or ``feed_buf`` a range of a ``LargeBuffer``, read as its
    chunks' views, never gathered); bytes past the bound are only counted. With a
    ``Budget``, bytes it refuses end the capture there (``over_budget``).
    """

    __slots__ = ("__weakref__", "_acct", "_budget", "data", "encoding", "limit", "over_budget", "seen", "tail")

    def __init__(self, limit: int, encoding: str = "", budget: Budget | None = None) -> None:
        self.limit = limit
        self.encoding = encoding
        self.data = bytearray()
        self.tail: bytearray | None = None
        self.seen = 0
        self.over_budget = False
        self._budget = budget
        self._acct = budget.account(self) if budget is not None else None

    def feed(self, v: memoryview | bytes) -> None:
        n = len(v)
        if not n:
            return
        self.seen += n
        room = self.limit - len(self.data)
        if room > 0:
            k = room if n > room else n
            if self._budget is not None and not self._budget.take(self._acct, k):  # type: ignore[arg-type]
                self.over_budget = True
                self.limit = len(self.data)
                return
            self.data += v[:k] if n > k else v
            if n <= room:
                return
            v = v[room:]
        t = self.tail
        if t is None:
            if self._budget is not None and not self._budget.take(self._acct, TAIL):  # type: ignore[arg-type]
                self.over_budget = True
                return
            t = self.tail = bytearray()
        t += v[-TAIL:] if len(v) > TAIL else v
        if len(t) > TAIL:
            del t[:len(t) - TAIL]

    def feed_buf(self, buf: LargeBuffer, off: int, n: int) -> None:
        room = self.limit - len(self.data)
        if room >= n:
            for v in buf.views(off, n):
                self.feed(v)
            return
        # Past the bound: the head up to it, and only the last TAIL bytes of the rest.
        if room > 0:
            for v in buf.views(off, room):
                self.feed(v)
            off += room
            n -= room
        skip = n - TAIL if n > TAIL else 0
        self.seen += skip
        if self.tail is not None and skip:
            self.tail.clear()
        for v in buf.views(off + skip, n - skip):
            self.feed(v)

    @property
    def truncated(self) -> bool:
        return self.seen > len(self.data)

    def decoded(self, max_decoded: int) -> tuple[bytes, bool, str | None]:
        """(decoded bytes, truncated, problem): the captured head decoded within ``max_decoded``."""
        d = Decoder(self.encoding)
        if d.identity:
            data = bytes(self.data[:max_decoded])
            return data, self.truncated or len(self.data) > max_decoded, None
        out = d.decode(self.data, max_decoded)
        return out, d.over or self.truncated, d.problem

    def tail_bytes(self) -> bytes | None:
        """The last bytes of an identity-coded body that outgrew the bound (None otherwise)."""
        if self.tail is None or Decoder(self.encoding).problem is not None or self.encoding not in ("", "identity"):
            return None
        return bytes(self.tail)


class SseStream:
    """A ``text/event-stream`` body (WHATWG HTML §9.2), split into events as it arrives.

    Each complete event's ``event`` name and ``data`` (lines joined by LF) go to
    ``on_event(name, data)``. Lines are gathered in one bytearray bounded by
    ``max_event`` (a longer event is skipped and counted ``sse_event_too_large``); the
    stream as a whole is read up to ``max_stream`` decoded bytes (``sse_truncated``).
    """

    __slots__ = ("__weakref__", "_acct", "_budget", "_data", "_dec", "_event", "_line", "_skip_event", "events",
                 "max_event", "max_stream", "on_event", "oversized", "problem", "seen")

    def __init__(self, on_event: Callable[[str, bytes], None], encoding: str, max_event: int,
                 max_stream: int, budget: Budget | None = None) -> None:
        self._budget = budget
        self._acct = budget.account(self) if budget is not None else None
        self.on_event = on_event
        self._dec = Decoder(encoding)
        self.problem: str | None = self._dec.problem
        self.max_event = max_event
        self.max_stream = max_stream
        self.seen = 0
        self.events = 0
        self.oversized = 0  #: events skipped for their size
        self._line = bytearray()
        self._data = bytearray()
        self._event = ""
        self._skip_event = False

    def feed_buf(self, buf: LargeBuffer, off: int, n: int) -> None:
        for v in buf.views(off, n):
            self.feed(v)

    def feed(self, v: memoryview | bytes) -> None:
        if self.problem is not None:
            return
        room = self.max_stream - self.seen
        if room <= 0:
            self.problem = "sse_truncated"
            return
        text = self._dec.decode(v, room)
        if self._dec.problem is not None:
            self.problem = self._dec.problem
            return
        self.seen += len(text)
        if text:
            self._lines(text)
            b = self._budget
            if b is not None:  # charge what the event being gathered holds now (usually ~nothing)
                held = len(self._line) + len(self._data)
                acct = self._acct
                delta = held - acct[0]  # type: ignore[index]
                if delta > 0 and not b.take(acct, delta):  # type: ignore[arg-type]
                    self._line.clear()
                    self._data.clear()
                    self._skip_event = True
                    self.problem = "capture_budget"
                elif delta < 0:
                    b.give(acct, -delta)  # type: ignore[arg-type]
        if self._dec.over:
            self.problem = "sse_truncated"

    def _lines(self, text: bytes) -> None:
        start = 0
        n = len(text)
        line = self._line
        while start < n:
            e = text.find(b"\n", start)
            if e < 0:
                if len(line) + n - start > self.max_event:
                    self._skip_event = True
                    line.clear()
                else:
                    line += text[start:]
                return
            if line:
                if len(line) + e - start > self.max_event:
                    self._skip_event = True
                    line.clear()
                    start = e + 1
                    continue
                line += text[start:e]
                self._field(bytes(line))
                line.clear()
            else:
                self._field(text[start:e])
            start = e + 1

    def _field(self, raw: bytes) -> None:
        if raw[-1:] == b"\r":
            raw = raw[:-1]
        if not raw:  # an empty line dispatches the event
            if self._skip_event:
                self._skip_event = False
                self.oversized += 1
                self._data.clear()
                self._event = ""
                self.events += 1
                return
            if self._data:
                data = bytes(self._data[:-1])  # the last LF is not part of the data
                self.events += 1
                self.on_event(self._event, data)
            self._data.clear()
            self._event = ""
            return
        if raw[:1] == b":":
            return  # a comment (keep-alive)
        name, _c, value = raw.partition(b":")
        if value[:1] == b" ":
            value = value[1:]
        if name == b"data":
            if len(self._data) + len(value) + 1 > self.max_event:
                self._skip_event = True
                self._data.clear()
                return
            self._data += value
            self._data += b"\n"
        elif name == b"event":
            self._event = value[:64].decode("utf-8", "replace")

    def close(self) -> None:
        """The body ended: an event not closed by an empty line is dispatched (as browsers do not,
        but a capture cut at the end should still count what was said)."""
        if self._line:
            self._field(bytes(self._line))
            self._line.clear()
        if self._data and not self._skip_event:
            self._field(b"")


def load_json(data: bytes) -> tuple[Any, str | None]:
    """(value, problem): ``data`` parsed, or None and ``bad_json`` / ``too_deep`` / ``bad_utf8``."""
    try:
        return json.loads(data), None
    except RecursionError:
        return None, "too_deep"
    except UnicodeDecodeError:
        try:
            return json.loads(data.decode("utf-8", "replace")), None
        except RecursionError:
            return None, "too_deep"
        except ValueError:
            return None, "bad_json"
    except ValueError:
        return None, "bad_json"


# One JSON token: a string, a bracket, a scalar, or separators (anything else stops the scan).
# Possessive quantifiers: an unterminated string fails in linear time and constant memory
# (a backtracking ``(?:[^"\\]|\\.)*`` kept a frame a character: 40 MB for 256 KiB).
_STR = rb'"([^"\\]*+(?:\\.[^"\\]*+)*+)"'
_TOKEN = re.compile(rb'[\s,:]*+(?:' + _STR + rb'|([{\[])|([}\]])|(-?[0-9][0-9.eE+\-]*+|true|false|null))')


def top_level(data: bytes, keys: Iterable[str]) -> dict[str, Any]:
    """The scalar members ``keys`` of the JSON object that ``data`` begins (a prefix, maybe
    cut anywhere): read token by token in one pass, depth counted, never recursing, so a
    truncated or deeply nested body costs linear time and gives what its prefix said."""
    want = set(keys)
    out: dict[str, Any] = {}
    m = _TOKEN.match(data, 0)
    if m is None or m.group(2) != b"{":
        return out
    pos = m.end()
    depth = 1
    expect_key = True
    key: str | None = None
    match = _TOKEN.match
    while want:
        m = match(data, pos)
        if m is None:
            break
        pos = m.end()
        s, opening, closing, scalar = m.groups()
        if opening is not None:
            depth += 1
            key = None
            continue
        if closing is not None:
            depth -= 1
            if depth == 1:
                expect_key = True
            if depth <= 0:
                break
            continue
        if depth != 1:
            continue
        if expect_key:
            if s is None:
                break
            key = _unescape(s)
            expect_key = False
            continue
        expect_key = True
        if key in want:
            want.discard(key)
            out[key] = _unescape(s) if s is not None else _scalar(scalar)
        key = None
    return out


def _unescape(raw: bytes) -> str:
    if b"\\" not in raw:
        return raw.decode("utf-8", "replace")
    try:
        return json.loads(b'"' + raw + b'"')  # type: ignore[no-any-return]
    except ValueError:
        return raw.decode("utf-8", "replace")


def _scalar(raw: bytes) -> Any:
    if raw == b"true":
        return True
    if raw == b"false":
        return False
    if raw == b"null":
        return None
    try:
        return int(raw)
    except ValueError:
        try:
            return float(raw)
        except ValueError:
            return None


_OBJ_AFTER: dict[bytes, re.Pattern[bytes]] = {}


def object_after(data: bytes, key: bytes) -> Any:
    """The flat JSON object (one level of nesting inside) after ``"key":`` in ``data``: how a
    ``usage`` block is found in the tail of a body too large to keep whole."""
    pat = _OBJ_AFTER.get(key)
    if pat is None:
        s = rb'"[^"\\]*+(?:\\.[^"\\]*+)*+"'
        pat = _OBJ_AFTER[key] = re.compile(
            rb'"' + re.escape(key) + rb'"\s*:\s*(\{(?:[^{}"]++|' + s + rb'|\{(?:[^{}"]++|' + s + rb')*+\})*+\})')
    found = None
    for m in pat.finditer(data):
        found = m
    if found is None:
        return None
    v, _p = load_json(found.group(1))
    return v if isinstance(v, dict) else None
