"""HTTP/2 (RFC 9113) and gRPC over it: frames -> streams -> one span per stream.

Contract (processors/protocols/base.py): ``Session.feed`` reads every complete
frame at the front of a direction's ``LargeBuffer`` with one precompiled
struct, releases it, and keeps per direction only small state: the HPACK
table, a header block being gathered across CONTINUATION frames, and how much
of a DATA payload is still to come. DATA payloads are never copied or even
held: they are counted as they arrive (gRPC message prefixes are read in
place by ``grpc.MessageCounter``). The one deliberate copy is a header block
that spans CONTINUATION frames, gathered into a bytearray bounded by
``Settings.max_header_list_size``. ``feed_whole`` reads a segment of whole frames in place
(no buffer at all): most of a gRPC connection's segments are; anything else goes to ``feed``.

Streams are keyed by id, so multiplexed and interleaved streams pair
naturally. A span starts at the stream's first HEADERS and ends at the
response's END_STREAM or at RST_STREAM.

HPACK (RFC 7541) is decoded here, not by ``hpack.Decoder``, because a
connection picked up mid-stream has an unknown dynamic table: ``_Hpack``
knows which entries it saw inserted (they are the newest, so their indices
are exact) and reports references past them as unknown instead of failing or
guessing. Unknown fields are counted (``hpack_unknown_index``); a span never
gets a made-up path. Huffman strings are decoded with the ``hpack`` package's
table, and only for fields we keep or must index. A header block decoded from a table
known from empty is remembered with its answer (``_BLOCK_MEMO``, bounded): new connections
of one client replay the same opening blocks.

h2c: prior knowledge starts with the client preface. An ``Upgrade: h2c``
exchange is handled by the HTTP/1 session, which sets, on the shared
``Conn``, ``conn.extra["switch_to"] = "http2"`` (the stage pops it and builds
this session on the same ``Conn`` and buffers) and
``conn.extra["http2_upgrade_request"]`` = a dict with the upgraded request
(keys, all optional: ``method``, ``target``, ``host``, ``scheme``,
``user_agent``, ``traceparent``, ``content_type`` as str or bytes;
``start_ns``, ``body_size`` as int). This session then answers that request on stream 1 (RFC 9113
§3.2) and expects the client preface next.
"""

from __future__ import annotations

import itertools
import re
import struct
from collections import deque
from typing import Any

from hpack import huffman_table as _hufft
from hpack.table import HeaderTable
from pydantic import Field

from service import speedups as _speedups
from service.largebuf import LargeBuffer
from service.model import AttrValue, SpanKind, StatusCode

from . import grpc
from .base import Conn, Detection, PendingMap, ProtocolSettings
from .base import Session as _BaseSession
from .enrich import feed as _sink_feed
from .errors import LimitExceeded, Malformed, ProtocolError
from .sanitize import redact_query

__all__ = ["NAME", "DEFAULT_PORTS", "Settings", "detect", "Session", "H2Session", "PREFACE"]

NAME = "http2"
#: gRPC's customary port, and the cleartext h2 ports commonly used; detection decides anyway.
DEFAULT_PORTS = frozenset({50051, 8080, 80})

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"  # RFC 9113 §3.4

# -- limits -------------------------------------------------------------------
#: RFC 9113 §4.2: the frame length field is 24 bits; SETTINGS_MAX_FRAME_SIZE may not exceed 2^24-1.
MAX_FRAME_SIZE = (1 << 24) - 1
#: RFC 9113 §6.5.2: the initial SETTINGS_MAX_FRAME_SIZE; frames this small are what detection accepts.
DEFAULT_MAX_FRAME_SIZE = 16384
#: Bytes of one header block we gather (the python ``hpack`` package's
#: DEFAULT_MAX_HEADER_LIST_SIZE is 64 KiB; nginx's large_client_header_buffers is 4x8k).
MAX_HEADER_LIST_SIZE = 65536
#: Streams tracked at once per connection (RFC 9113 §6.5.2 recommends a
#: SETTINGS_MAX_CONCURRENT_STREAMS of at least 100; Go's server allows 250, nginx 128).
MAX_STREAMS = 1000
#: RFC 7541 §4.2: the default dynamic table size; a decoder may allow more with SETTINGS_HEADER_TABLE_SIZE.
DEFAULT_TABLE_SIZE = 4096
#: The largest dynamic table we keep per direction (memory bound, not a protocol value).
MAX_TABLE_SIZE = 65536
#: Longest :path / other field value kept per stream until its span is built
#: (longer ones are truncated): bounds a connection with MAX_STREAMS open
#: streams to ~30 MB even when every field is hostile. 8 KiB is nginx's
#: large_client_header_buffers line size.
MAX_PATH_VALUE = 8192
MAX_FIELD_VALUE = 2048
#: RFC 7541 §5.1: an integer past 2^28 is not needed by any field; longer encodings are hostile.
MAX_INT_BYTES = 5
#: SETTINGS/GOAWAY longer than this are hostile (SETTINGS carries 6 bytes per known
#: parameter; GOAWAY debug data is skipped as it arrives, never held).
_CONTROL_BYTES = 16384

# -- frames (RFC 9113 §6) ------------------------------------------------------
_FRAME_HDR = struct.Struct(">HBBBI")  # length hi 16 | length lo 8 | type | flags | R+stream id
_FRAME_HDR_LEN = 9
_U32 = struct.Struct(">I")
_SETTING = struct.Struct(">HI")

DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = range(10)
F_END_STREAM = 0x1
F_ACK = 0x1
F_END_HEADERS = 0x4
F_PADDED = 0x8
F_PRIORITY = 0x20

#: type -> (exact payload length or -1, stream id rule): _NONZERO, _ZERO or _ANY (RFC 9113 §6).
_NONZERO, _ZERO, _ANY = 0, 1, 2
_SHAPES: dict[int, tuple[int, int]] = {
    DATA: (-1, _NONZERO), HEADERS: (-1, _NONZERO), PRIORITY: (5, _NONZERO), RST_STREAM: (4, _NONZERO),
    SETTINGS: (-1, _ZERO), PUSH_PROMISE: (-1, _NONZERO), PING: (8, _ZERO), GOAWAY: (-1, _ZERO),
    WINDOW_UPDATE: (4, _ANY), CONTINUATION: (-1, _NONZERO),
}


def _scan_whole(v: memoryview, max_block: int) -> list[tuple[int, int, int, int, int]] | None:
    """feed_whole's check of a segment: None unless every frame is whole, of the kinds it
    reads, within the initial frame size and well-formed (a bad one is feed's, which raises
    at it after the frames before it); else the frames with effects, in order, as (type,
    flags, stream id, payload offset, length). _h2frames.c's ``scan`` is this in C."""
    todo: list[tuple[int, int, int, int, int]] = []
    unpack = _FRAME_HDR.unpack_from
    n = len(v)
    pos = 0
    while pos < n:
        if n - pos < _FRAME_HDR_LEN:
            return None
        hi, lo, ftype, flags, sid = unpack(v, pos)
        length = (hi << 8) | lo
        sid &= 0x7FFFFFFF
        body = pos + _FRAME_HDR_LEN
        pos = body + length
        if ftype == WINDOW_UPDATE:  # nothing a span needs
            if length != 4:
                return None
        elif ftype == DATA:
            if flags & F_PADDED or not sid or length > DEFAULT_MAX_FRAME_SIZE:
                return None
            if length or flags & F_END_STREAM:
                todo.append((ftype, flags, sid, body, length))
        elif ftype == PING:
            if length != 8 or sid:
                return None
        elif ftype == HEADERS:
            if not flags & F_END_HEADERS or not sid or length > max_block or length > DEFAULT_MAX_FRAME_SIZE:
                return None
            todo.append((ftype, flags, sid, body, length))
        elif ftype in (SETTINGS, RST_STREAM, GOAWAY, PRIORITY):
            if (length > DEFAULT_MAX_FRAME_SIZE or _bad_shape(_SHAPES[ftype], length, sid)
                    or (ftype == GOAWAY and length < 8)):
                return None
            if ftype != PRIORITY:
                todo.append((ftype, flags, sid, body, length))
        else:  # PUSH_PROMISE, CONTINUATION, unknown types
            return None
    return todo if pos == n else None


#: The C twin of _scan_whole (processors/protocols/_h2frames.c), or None (not built, or
#: WIRESPAN_PURE_PYTHON=1).
_C = _speedups.load("processors.protocols._h2frames")
_scan = _C.scan if _C is not None else _scan_whole


def _bad_shape(shape: tuple[int, int], length: int, sid: int) -> bool:
    exact, rule = shape
    if exact >= 0 and length != exact:
        return True
    return (rule == _ZERO) != (sid == 0) if rule != _ANY else False

#: RFC 9113 §7 error codes, for error.type on reset streams.
ERROR_CODES = (
    "NO_ERROR", "PROTOCOL_ERROR", "INTERNAL_ERROR", "FLOW_CONTROL_ERROR", "SETTINGS_TIMEOUT",
    "STREAM_CLOSED", "FRAME_SIZE_ERROR", "REFUSED_STREAM", "CANCEL", "COMPRESSION_ERROR",
    "CONNECT_ERROR", "ENHANCE_YOUR_CALM", "INADEQUATE_SECURITY", "HTTP_1_1_REQUIRED",
)
_SETTINGS_HEADER_TABLE_SIZE = 1

#: The header fields a span uses; every other field is decoded only as far as HPACK state needs.
_WANTED = frozenset({
    b":method", b":path", b":scheme", b":authority", b":status", b"content-type", b"user-agent",
    b"traceparent", b"grpc-status", b"grpc-message", b"grpc-timeout",
    # for the HTTP enrichers (enrich/): body coding, and the headers that confirm a kind
    b"content-encoding", b"x-elastic-product", b"x-elastic-client-meta", b"mcp-session-id",
    b"mcp-protocol-version", b"anthropic-version", b"openai-version",
})
#: Never exported, whatever future options ask for (credentials).
_NEVER = frozenset({b"authorization", b"proxy-authorization", b"cookie", b"set-cookie"})

#: gRPC's path: /{package.Service}/{Method} (PROTOCOL-HTTP2 "Path").
_GRPC_PATH = re.compile(r"/[A-Za-z_][\w.]*/[A-Za-z_]\w*\Z")
_KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"})
_STATIC = HeaderTable.STATIC_TABLE
_STATIC_LEN = len(_STATIC)  # 61


class Settings(ProtocolSettings):
    """Options under ``processors: protocols: http2:``."""

    #: Largest header block gathered across CONTINUATION frames (bytes); at
    #: least the 4 KiB every peer must accept, at most one full-size frame.
    max_header_list_size: int = Field(MAX_HEADER_LIST_SIZE, ge=4096, le=MAX_FRAME_SIZE)
    #: Streams tracked per connection; more are counted as ``too_many_streams``.
    max_streams: int = Field(MAX_STREAMS, ge=1, le=100_000)
    #: Values of sensitive query parameters become ``REDACTED`` in ``url.query`` (``sanitize.py``).
    sanitize_query: bool = True


# -- detection ------------------------------------------------------------------
def _plausible_frame(buf: LargeBuffer, off: int) -> int:
    """Length of a plausible frame header at ``off`` or -1: strict, so random bytes fail."""
    hi, lo, ftype, flags, sid = _FRAME_HDR.unpack_from(buf.view_at(off, _FRAME_HDR_LEN))
    length = (hi << 8) | lo
    shape = _SHAPES.get(ftype)
    if shape is None or length > DEFAULT_MAX_FRAME_SIZE or sid & 0x80000000:
        return -1
    if _bad_shape(shape, length, sid):
        return -1
    if ftype == SETTINGS and (length % 6 or (flags & F_ACK and length) or flags & ~F_ACK):
        return -1
    if ftype == PING and flags & ~F_ACK:
        return -1
    if ftype == HEADERS and flags & ~(F_END_STREAM | F_END_HEADERS | F_PADDED | F_PRIORITY):
        return -1
    if ftype == DATA and flags & ~(F_END_STREAM | F_PADDED):
        return -1
    if ftype in (RST_STREAM, PRIORITY, WINDOW_UPDATE, GOAWAY) and flags:
        return -1
    return length


def _block_side(buf: LargeBuffer, off: int, length: int, flags: int) -> Detection:
    """Request or response from a HEADERS frame's first HPACK field (pseudo-headers come first)."""
    p = off + _FRAME_HDR_LEN
    end = p + length
    if flags & F_PADDED:
        p += 1
    if flags & F_PRIORITY:
        p += 5
    while p < end:
        b = buf.u8_at(p)
        if 0x20 <= b < 0x40:  # dynamic table size update precedes the fields
            p += 1
            continue
        if b & 0x80:
            idx = b & 0x7F
        elif b & 0x40:
            idx = b & 0x3F
        else:
            idx = b & 0x0F
        if 1 <= idx <= 7:
            return Detection.REQUEST
        if 8 <= idx <= 14:
            return Detection.RESPONSE
        if idx == 0 and not b & 0x80 and b & 0x0F == 0 and b in (0x00, 0x10, 0x40):
            # a literal with a new name: read the name (it may be Huffman-coded)
            try:
                name, _ = _str(buf.view_at(p + 1, end - p - 1), 0, p + 1)
            except ProtocolError:
                return Detection.NO
            if name in (b":method", b":path", b":scheme", b":authority"):
                return Detection.REQUEST
            if name == b":status":
                return Detection.RESPONSE
        return Detection.NO
    return Detection.NO


def detect(buf: LargeBuffer, from_client: bool | None) -> Detection:
    """The client preface, or (mid-stream pickup) two plausible frames in a row."""
    n = len(buf)
    m = min(n, len(PREFACE))
    if from_client is not False and buf.view_at(0, m) == PREFACE[:m]:
        return Detection.REQUEST if m == len(PREFACE) else Detection.NEED_MORE
    if n < _FRAME_HDR_LEN:
        return Detection.NEED_MORE  # a frame header a byte at a time is still a frame header
    length = _plausible_frame(buf, 0)
    if length < 0:
        return Detection.NO
    nxt = _FRAME_HDR_LEN + length
    if nxt > n or (nxt < n and n - nxt < _FRAME_HDR_LEN):
        return Detection.NEED_MORE  # bounded: a plausible frame is at most 16 KiB
    if nxt < n and _plausible_frame(buf, nxt) < 0:
        return Detection.NO
    if nxt == n and buf.u8_at(3) not in (HEADERS, SETTINGS):
        # One frame alone is weak evidence unless it is one that starts exchanges: wait
        # for the next one (the bytes so far are kept, so nothing is lost by waiting).
        return Detection.NEED_MORE
    if from_client is not None:
        return Detection.REQUEST if from_client else Detection.RESPONSE
    ftype = buf.u8_at(3)
    if ftype == HEADERS:
        return _block_side(buf, 0, length, buf.u8_at(4))
    if ftype == SETTINGS and not buf.u8_at(4) & F_ACK:
        return Detection.RESPONSE  # a server's first frame; a client's follows its preface
    return Detection.NO


# -- HPACK (RFC 7541) ----------------------------------------------------------------
class _Unknown(Exception):
    """A reference to a dynamic-table entry we did not see inserted (mid-stream pickup)."""


class _Hpack:
    """One direction's decoding context.

    ``entries`` holds the dynamic-table entries seen inserted, newest first, as
    (name, value, size); ``name``/``value`` are None when the inserting field
    itself referenced something unknown. ``exact`` is True when the table was
    seen from empty (connection start): then a reference past it is an error,
    otherwise it is merely unknown.
    """

    __slots__ = ("blocks", "entries", "exact", "maxsize", "size", "state", "unknown")

    def __init__(self, exact: bool) -> None:
        self.entries: deque[tuple[bytes | None, bytes | None, int]] = deque()
        self.size = 0
        # Not knowing the table's real size, keep as much as we may: a larger
        # guess only keeps entries the encoder will never reference again.
        self.maxsize = DEFAULT_TABLE_SIZE if exact else MAX_TABLE_SIZE
        self.exact = exact
        self.unknown = 0  #: fields of the last block we could not decode
        self.blocks = 0   #: header blocks decoded
        #: The table's state as a _BLOCK_MEMO token (None: not one the memo can name).
        self.state: int | None = _EMPTY_STATE if exact else None

    def lose_sync(self) -> None:
        """Header blocks were lost: entries may have been inserted before ours."""
        self.state = None
        self.entries.clear()
        self.size = 0
        self.exact = False
        self.maxsize = MAX_TABLE_SIZE

    def _evict(self) -> None:
        entries = self.entries
        while self.size > self.maxsize and entries:
            self.size -= entries.pop()[2]

    def _add(self, name: bytes | None, value: bytes | None, size: int) -> None:
        self.entries.appendleft((name, value, size))
        self.size += size
        self._evict()

    def _get(self, idx: int, off: int) -> tuple[bytes | None, bytes | None]:
        if 0 < idx <= _STATIC_LEN:
            return _STATIC[idx - 1]
        d = idx - _STATIC_LEN - 1
        if idx == 0:
            raise Malformed(NAME, "hpack_bad_index", off, "index 0")
        if d < len(self.entries):
            e = self.entries[d]
            return e[0], e[1]
        if self.exact:
            raise Malformed(NAME, "hpack_bad_index", off, f"index {idx} past table")
        raise _Unknown

    def decode(self, v: memoryview, want: dict[bytes, str], base: int = 0) -> None:
        """Decode one complete header block, filling ``want`` with the fields a span uses.

        Raises Malformed on a bad encoding (the table is then out of sync and
        the caller calls ``lose_sync``). Unknown references are counted in
        ``self.unknown``, never raised.

        A block is first looked up in ``_BLOCK_MEMO`` by (table state, bytes): decoding
        is a function of those two alone, and connections replay the same opening blocks
        (a client library sends the same headers on every new connection, each starting
        from an empty table), so the answer and the table after it are taken from the
        memo instead (``_decode`` is the one decoder; the memo only remembers its answers).
        """
        tok = self.state
        if tok is None or want or len(v) > _BLOCK_MEMO_MAX_LEN or self.blocks >= _BLOCK_MEMO_DEPTH:
            self.state = None  # the table leaves the states the memo names
            self._decode(v, want, base)
            return
        key = (tok, v.tobytes())  # deliberate: a small header block, the memo's key
        hit = _BLOCK_MEMO.get(key)
        if hit is not None:
            self.state, entries, self.size, self.maxsize, self.unknown, fields = hit
            self.entries = deque(entries)
            self.blocks += 1
            if fields:
                want.update(fields)
            return
        self.state = None  # until the decode succeeds
        self._decode(v, want, base)
        _memo_store(key, self, tuple(want.items()))

    def _decode(self, v: memoryview, want: dict[bytes, str], base: int) -> None:
        """The decoder (``decode`` without the memo)."""
        self.unknown = 0
        self.blocks += 1
        n = len(v)
        p = 0
        entries = self.entries
        wanted = _WANTED
        while p < n:
            b = v[p]
            if b & 0x80:  # indexed field (§6.1)
                # The common reference inlined (a one-byte index into either table): the
                # helpers are the general case, and a call a field was most of a block's cost.
                idx = b & 0x7F
                if 0 < idx <= _STATIC_LEN:
                    p += 1
                    name, value = _STATIC[idx - 1]
                elif _STATIC_LEN < idx < 0x7F and idx - _STATIC_LEN - 1 < len(entries):
                    p += 1
                    name, value, _size = entries[idx - _STATIC_LEN - 1]
                else:
                    idx, p = _int(v, p, 7, base)
                    try:
                        name, value = self._get(idx, base + p)
                    except _Unknown:
                        self.unknown += 1
                        continue
                if name in wanted and value is not None and name not in want:
                    want[name] = value[:MAX_PATH_VALUE if name == b":path" else MAX_FIELD_VALUE].decode(
                        "utf-8", "replace")  # type: ignore[index]
            elif b & 0x40 or not b & 0x20:  # literal (§6.2): with indexing, without, never indexed
                indexing = bool(b & 0x40)
                idx, p = _int(v, p, 6 if indexing else 4, base)
                name: bytes | None
                if idx:
                    try:
                        name = self._get(idx, base + p)[0]
                    except _Unknown:
                        name = None
                else:
                    name, p = _str(v, p, base)
                need = indexing or (name is not None and name in _WANTED)
                value, raw_len, p = _str_value(v, p, base, need)
                if name is None:
                    self.unknown += 1
                else:
                    _keep(want, name, value)
                if indexing:
                    if name is None:
                        # Inserted, but its size is unknown: keep the slot so
                        # later indices stay exact; count it as small.
                        self._add(None, value, 32 + raw_len)
                    else:
                        assert value is not None
                        self._add(name, value, 32 + len(name) + len(value))
            else:  # dynamic table size update (§6.3)
                size, p = _int(v, p, 5, base)
                if size > MAX_TABLE_SIZE:
                    raise LimitExceeded(NAME, "hpack_table_too_large", base + p, str(size))
                self.maxsize = size
                self._evict()


#: Header blocks decoded from a known table state: (state, block bytes) -> (state after,
#: the table's entries, size and maxsize after, unknown fields, the fields a span uses).
#: States are tokens: _EMPTY_STATE is an exact empty table (a connection's start), every
#: other token names the table some memoized decode left (so equal tokens are equal
#: tables). Bounded by bytes held (cleared when over); only the first _BLOCK_MEMO_DEPTH
#: blocks of a direction take part (a connection's opening, where repetition across
#: connections is; a long-lived one would only fill it with states no other reaches).
_MemoHit = tuple[int, tuple[tuple[bytes | None, bytes | None, int], ...], int, int, int,
                 tuple[tuple[bytes, str], ...]]
_BLOCK_MEMO: dict[tuple[int, bytes], _MemoHit] = {}
_BLOCK_MEMO_MAX_LEN = 1024
_BLOCK_MEMO_DEPTH = 32
_BLOCK_MEMO_BYTES = 8 << 20
_EMPTY_STATE = 0
_memo_held = 0
_memo_tokens = itertools.count(1)


def _memo_store(key: tuple[int, bytes], hp: _Hpack, fields: tuple[tuple[bytes, str], ...]) -> None:
    """Remember a decode's answer and give ``hp`` the token of the table it left."""
    global _memo_held
    # What the entry holds: the block, the table (entry sizes count 32 bytes of
    # overhead each, RFC 7541 §4.1: more than a tuple slot), the field values.
    cost = len(key[1]) + hp.size + sum(len(f) + len(x) for f, x in fields) + 256
    if _memo_held + cost > _BLOCK_MEMO_BYTES:
        _BLOCK_MEMO.clear()
        _memo_held = 0
    tok = next(_memo_tokens)
    _BLOCK_MEMO[key] = (tok, tuple(hp.entries), hp.size, hp.maxsize, hp.unknown, fields)
    _memo_held += cost
    hp.state = tok


def _int(v: memoryview, p: int, prefix: int, base: int) -> tuple[int, int]:
    """RFC 7541 §5.1 integer at ``p`` with a ``prefix``-bit prefix -> (value, next offset)."""
    mask = (1 << prefix) - 1
    i = v[p] & mask
    p += 1
    if i < mask:
        return i, p
    shift = 0
    n = len(v)
    for _ in range(MAX_INT_BYTES):
        if p >= n:
            raise Malformed(NAME, "hpack_truncated", base + p)
        b = v[p]
        p += 1
        i += (b & 0x7F) << shift
        if not b & 0x80:
            return i, p
        shift += 7
    raise Malformed(NAME, "hpack_int_too_long", base + p)


def _str(v: memoryview, p: int, base: int) -> tuple[bytes, int]:
    value, _, p = _str_value(v, p, base, True)
    assert value is not None
    return value, p


def _str_value(v: memoryview, p: int, base: int, need: bool) -> tuple[bytes | None, int, int]:
    """RFC 7541 §5.2 string -> (bytes or None when not needed, encoded length, next offset).

    The copy (``tobytes``/Huffman) is deliberate: header values are small and
    bounded by the block size, and only fields we keep or index are decoded.
    """
    if p >= len(v):
        raise Malformed(NAME, "hpack_truncated", base + p)
    huff = v[p] & 0x80
    length, p = _int(v, p, 7, base)
    end = p + length
    if end > len(v):
        raise Malformed(NAME, "hpack_truncated", base + p, f"string of {length}")
    if not need:
        return None, length, end
    s = v[p:end]
    if huff:
        key = s.tobytes()  # deliberate: a small header string, the memo's key
        out = _HUFF_MEMO.get(key)
        if out is None:
            out = _huffman(s)
            if out is None:
                raise Malformed(NAME, "hpack_bad_huffman", base + p)
            if length <= _HUFF_MEMO_MAX_LEN:
                if len(_HUFF_MEMO) >= _HUFF_MEMO_ENTRIES:
                    _HUFF_MEMO.clear()
                _HUFF_MEMO[key] = out
        return out, length, end
    return s.tobytes(), length, end


# -- Huffman (RFC 7541 §5.2, Appendix B) ---------------------------------------------
# The ``hpack`` package decodes a nibble at a time from nghttp2's 256-state
# table. We fold two nibbles into one byte-indexed step (65536 entries, built on
# first use from that same table): ~1.8x faster per string in our measurements,
# ~1 MB once per process. ``_HUFF_NEXT[state << 8 | byte]`` is the next state or
# -1 (invalid code, e.g. EOS), ``_HUFF_OUT`` the 0-2 bytes it emits; a string
# must end in an accepting state (valid padding, §5.2).
_HUFF_NEXT: list[int] = []
_HUFF_OUT: list[bytes] = []
_HUFF_ACCEPT: frozenset[int] = frozenset()


def _huff_build() -> None:
    global _HUFF_ACCEPT
    table = _hufft.HUFFMAN_TABLE
    fail, emit, done = _hufft.HUFFMAN_FAIL, _hufft.HUFFMAN_EMIT_SYMBOL, _hufft.HUFFMAN_COMPLETE
    nxt = [-1] * 65536
    out = [b""] * 65536
    accept = {0}  # the empty string is valid
    shared: dict[bytes, bytes] = {}
    for state in range(256):
        for byte in range(256):
            st1, fl1, o1 = table[state * 16 + (byte >> 4)]
            if fl1 & fail:
                continue
            st2, fl2, o2 = table[st1 * 16 + (byte & 15)]
            if fl2 & fail:
                continue
            emitted = (bytes((o1,)) if fl1 & emit else b"") + (bytes((o2,)) if fl2 & emit else b"")
            i = (state << 8) | byte
            nxt[i] = st2
            out[i] = shared.setdefault(emitted, emitted)
            if fl2 & done:
                accept.add(st2)
    _HUFF_OUT[:] = out
    _HUFF_ACCEPT = frozenset(accept)
    _HUFF_NEXT[:] = nxt  # last: its being non-empty means "built"


#: Decoded Huffman strings by their encoded bytes. Header values recur across streams and
#: connections (user-agent, authority, content-type, paths): a new connection's literals
#: are mostly strings some earlier one sent, and the byte-at-a-time decoder below costs
#: ~0.4 us a byte. Bounded: cleared when full; short strings only.
_HUFF_MEMO: dict[bytes, bytes] = {}
_HUFF_MEMO_ENTRIES = 4096
_HUFF_MEMO_MAX_LEN = 256


def _huffman(v: memoryview) -> bytes | None:
    """Decode a Huffman string; None when invalid (bad code, EOS, bad padding)."""
    nxt = _HUFF_NEXT
    if not nxt:
        _huff_build()
    outs = _HUFF_OUT
    state = 0
    parts: list[bytes] = []
    app = parts.append
    for b in v:
        i = (state << 8) | b
        state = nxt[i]
        if state < 0:
            return None
        o = outs[i]
        if o:
            app(o)
    if state not in _HUFF_ACCEPT:
        return None
    return b"".join(parts)


def _keep(want: dict[bytes, str], name: bytes | None, value: bytes | None) -> None:
    if name in _WANTED and value is not None and name not in want:
        limit = MAX_PATH_VALUE if name == b":path" else MAX_FIELD_VALUE
        want[name] = value[:limit].decode("utf-8", "replace")  # type: ignore[index]


# -- streams --------------------------------------------------------------------
def _stream_traceparent(st: _Stream) -> Any:
    return st.req.get(b"traceparent")


class _Stream:
    __slots__ = (
        "cap",
        "grpc",
        "last_ns",
        "lossy",
        "req",
        "req_body",
        "req_done",
        "req_msgs",
        "req_partial",
        "resp_partial",
        "req_seen",
        "resp",
        "resp_body",
        "resp_msgs",
        "resp_status",
        "sid",
        "start_ns",
        "trailer_block",
        "trailers",
    )

    def __init__(self, sid: int, start_ns: int) -> None:
        self.sid = sid
        self.start_ns = start_ns
        self.req: dict[bytes, str] = {}
        self.resp: dict[bytes, str] = {}
        self.trailers: dict[bytes, str] = {}
        self.req_seen = False
        self.req_partial = False
        self.resp_partial = False  #: a response/trailer field could not be decoded
        self.trailer_block = False
        self.resp_status: int | None = None
        self.req_body = 0
        self.resp_body = 0
        self.req_msgs: grpc.MessageCounter | None = None
        self.resp_msgs: grpc.MessageCounter | None = None
        self.req_done = False
        self.grpc = False
        self.lossy = False  #: bytes of the stream were lost (a gap): sizes and counts unknown
        self.last_ns = 0    #: when the response's last frame seen arrived
        self.cap: Any = None  #: an enricher's Exchange (enrich/), for a selected request only


class _Direction:
    """Per-direction parse state."""

    __slots__ = (
        "block",
        "block_end_stream",
        "block_promised",
        "block_sid",
        "block_skip",
        "block_ts",
        "data_end",
        "data_left",
        "data_sid",
        "hpack",
        "pad_left",
        "resync",
        "skip",
        "started",
    )

    def __init__(self) -> None:
        self.hpack: _Hpack | None = None
        self.started = False
        self.block: bytearray | None = None  #: header block gathered across CONTINUATION frames
        self.block_sid = 0
        self.block_end_stream = False
        self.block_ts = 0
        self.block_promised = 0
        self.block_skip = False  #: the block outgrew the limit: its frames are skipped
        self.data_left = 0       #: DATA payload bytes still to count
        self.pad_left = 0        #: DATA padding after them
        self.data_sid = 0
        self.data_end = False
        self.skip = 0            #: bytes of an ignored frame still to drop
        self.resync = False      #: bytes were lost: find a frame boundary before parsing


class H2Session(_BaseSession):
    """HTTP/2 connection state: two directions and the streams in flight."""

    protocol = NAME

    def __init__(self, conn: Conn) -> None:
        super().__init__(conn)
        self._want = 0  # bytes the frame being waited for needs (feed hands it to buf.want)
        s = conn.settings
        self.max_block = s.max_header_list_size if isinstance(s, Settings) else MAX_HEADER_LIST_SIZE
        self.max_streams = s.max_streams if isinstance(s, Settings) else MAX_STREAMS
        self.client = _Direction()
        self.server = _Direction()
        self.streams: dict[int, _Stream] = PendingMap(conn, start="start_ns", traceparent=_stream_traceparent)
        self.preface_seen = False
        self.goaway_last: int | None = None
        en = getattr(conn, "enrich", None)
        self._enrich: Any = en if en is not None and en.active else None  # enrich/: None = plain HTTP only
        up = conn.extra.pop("http2_upgrade_request", None)
        if isinstance(up, dict):
            self._start_upgraded(up)

    # -- set-up -----------------------------------------------------------------
    def _start_upgraded(self, up: dict[str, Any]) -> None:
        """The HTTP/1 request that asked for h2c becomes stream 1, half-closed by the client."""
        st = _Stream(1, int(up.get("start_ns") or 0))
        target = _text(up.get("target"))
        for key, field in (("method", b":method"), ("host", b":authority"), ("scheme", b":scheme"),
                           ("user_agent", b"user-agent"), ("traceparent", b"traceparent"),
                           ("content_type", b"content-type")):
            if up.get(key):
                st.req[field] = _text(up[key])
        if target:
            st.req[b":path"] = target
        st.req.setdefault(b":scheme", "http")
        st.req_seen = True
        st.req_done = True
        st.req_body = int(up.get("body_size") or 0)
        self.streams[1] = st
        # The server's table starts empty with its first HTTP/2 frame.
        self.server.hpack = _Hpack(True)
        self.server.started = True

    # -- feeding ----------------------------------------------------------------
    def feed(self, from_client: bool, buf: LargeBuffer, ts_ns: int) -> None:
        d = self.client if from_client else self.server
        if not d.started:
            if not self._start(from_client, d, buf):
                return
        pos = 0
        self._want = 0
        try:
            pos = self._frames(from_client, d, buf)
        finally:
            buf.consumed(pos, self._want)

    def feed_whole(self, from_client: bool, data: bytes | memoryview, ts_ns: int) -> bool:
        """A segment of whole frames, read in place (base.py's contract): most of a gRPC
        connection's segments are a few whole small frames, and buffering each (append,
        view, release) cost as much as parsing it. Declined, with nothing changed: a
        direction picked up mid-stream or in the middle of something (resync, a payload or
        header block to come), a preface cut short, a frame not whole, or any frame but
        DATA (unpadded), HEADERS (END_HEADERS, within max_block), WINDOW_UPDATE, PING,
        SETTINGS, RST_STREAM, GOAWAY and PRIORITY within the initial frame size, or one of
        those of a bad shape: ``feed`` has the rest (and raises where it raises).
        """
        d = self.client if from_client else self.server
        if d.resync or d.skip or d.data_left or d.pad_left or d.block is not None or d.block_skip:
            return False
        v = data if data.__class__ is memoryview else memoryview(data)
        if v.format != "B" or v.ndim != 1:
            return False
        start = not d.started
        if start:
            # A connection's first segment: the client's preface then frames, or the server's
            # frames once the preface was seen; a pickup mid-stream (resync) is feed's.
            if from_client:
                if v[:len(PREFACE)] != PREFACE:
                    return False
                v = v[len(PREFACE):]  # as feed releases it: offsets as feed's
            elif d.hpack is None and not self.preface_seen:
                return False
        todo = _scan(v, self.max_block)
        if todo is None:
            return False
        if start:
            self._begin(from_client, d, from_client)
        for ftype, flags, sid, body, length in todo:
            if ftype == DATA:
                if length:
                    self._data_frame(from_client, sid, v, body, length, ts_ns, None)
                if flags & F_END_STREAM:
                    self._end_stream(from_client, sid, ts_ns)
            elif ftype == HEADERS:
                if flags & (F_PADDED | F_PRIORITY):
                    self._headers(from_client, d, v, 0, body, length, flags, sid, ts_ns)
                else:  # _headers' common case
                    self._block(from_client, d, v[body:body + length], sid, bool(flags & F_END_STREAM), ts_ns, 0,
                                body)
            elif ftype == SETTINGS:
                self._settings(v, 0, body, length, flags)
            elif ftype == RST_STREAM:
                self._rst(sid, _U32.unpack_from(v, body)[0], ts_ns)
            else:
                self._goaway(_U32.unpack_from(v, body)[0] & 0x7FFFFFFF, ts_ns)
        return True

    def _start(self, from_client: bool, d: _Direction, buf: LargeBuffer) -> bool:
        """Consume the preface if there is one; otherwise pick up mid-stream."""
        preface = False
        if from_client:
            n = len(buf)
            m = min(n, len(PREFACE))
            if buf.view_at(0, m) == PREFACE[:m]:
                if m < len(PREFACE):
                    return False
                buf.release(len(PREFACE))
                preface = True
        self._begin(from_client, d, preface)
        return True

    def _begin(self, from_client: bool, d: _Direction, preface: bool) -> None:
        """A direction's first bytes, after the client's preface (``preface``) or not."""
        if from_client:
            if preface:
                self.preface_seen = True
                d.hpack = _Hpack(True)
                sh = self.server.hpack
                if sh is None or (sh.blocks == 0 and not self.server.resync):
                    # The server answers only after the preface: its table is
                    # empty too (its SETTINGS may have been fed first).
                    self.server.hpack = _Hpack(True)
            else:
                d.hpack = _Hpack(False)
                d.resync = True  # picked up mid-stream: the bytes may start inside a frame
        elif d.hpack is None:
            # The server's table is known from empty only if we saw the
            # client's preface (a server answers only after it).
            d.hpack = _Hpack(self.preface_seen)
            # Without the preface, the stage may hand us this direction from
            # the middle of a frame: find a frame boundary first.
            d.resync = not self.preface_seen
        d.started = True

    def _frames(self, from_client: bool, d: _Direction, buf: LargeBuffer) -> int:
        """Parse complete frames from offset 0; returns the bytes consumed.

        The outer loop finishes what a previous frame left (bytes to skip, a DATA payload
        still arriving); the inner one reads frame headers until a frame leaves such a rest.
        WINDOW_UPDATE, PING and whole DATA frames, most of a gRPC connection's frames, are
        handled first and inline (a gRPC call is ~70 us; a frame's dispatch through the
        general checks was a good part of it).
        """
        pos = 0
        n = len(buf)
        if d.resync:
            pos = self._resync(d, buf)
            if d.resync:
                return pos
        # The usual buffer is one chunk: frame headers are unpacked from its view in place
        # (a view_at a frame was a tenth of the loop), and all its bytes arrived at one
        # time. Nothing below appends to ``buf``.
        whole = buf.view_at(0, n) if buf.chunk_count == 1 else None
        ts1 = buf.ts_at(0) if whole is not None else 0
        unpack = _FRAME_HDR.unpack_from
        while True:
            if d.skip:
                k = min(d.skip, n - pos)
                d.skip -= k
                pos += k
                if d.skip:
                    return pos
            if d.data_left or d.pad_left:
                pos = self._data_payload(from_client, d, buf, pos, n)
                if d.data_left or d.pad_left:
                    return pos
            while True:
                if n - pos < _FRAME_HDR_LEN:
                    return pos
                hi, lo, ftype, flags, sid = unpack(whole, pos) if whole is not None else \
                    unpack(buf.view_at(pos, _FRAME_HDR_LEN))
                length = (hi << 8) | lo
                sid &= 0x7FFFFFFF
                if d.block is not None or d.block_skip:
                    if ftype != CONTINUATION or sid != d.block_sid:
                        # RFC 9113 §6.10: nothing may interleave a header block.
                        self._abandon_block(d)
                        raise Malformed(NAME, "continuation_expected", pos, f"frame type {ftype}")
                if ftype == WINDOW_UPDATE:  # nothing a span needs (its shape checked as _SHAPES says)
                    if length != 4:
                        raise Malformed(NAME, "bad_frame_shape", pos, f"type {ftype} length {length} stream {sid}")
                    if n - pos < _FRAME_HDR_LEN + 4:
                        self._want = _FRAME_HDR_LEN + 4
                        return pos
                    pos += _FRAME_HDR_LEN + 4
                    continue
                if ftype == DATA:
                    if sid == 0:
                        raise Malformed(NAME, "data_on_stream_0", pos)
                    end = pos + _FRAME_HDR_LEN + length
                    if whole is not None and end <= n and not flags & F_PADDED:
                        # All of an unpadded payload is here: counted now, as _data_payload would.
                        if length:
                            self._data_frame(from_client, sid, whole, pos + _FRAME_HDR_LEN, length, ts1, buf)
                        pos = end
                        if flags & F_END_STREAM:
                            self._end_stream(from_client, sid, ts1)
                        continue
                    if flags & F_PADDED:
                        if n - pos < _FRAME_HDR_LEN + 1:
                            return pos
                        pad = buf.u8_at(pos + _FRAME_HDR_LEN)
                        if length < 1 or pad > length - 1:
                            raise Malformed(NAME, "bad_padding", pos)
                        d.data_left = length - 1 - pad
                        d.pad_left = pad
                        pos += _FRAME_HDR_LEN + 1
                    else:
                        d.data_left = length
                        d.pad_left = 0
                        pos += _FRAME_HDR_LEN
                    d.data_sid = sid
                    d.data_end = bool(flags & F_END_STREAM)
                    if not d.data_left and not d.pad_left:
                        self._data_done(from_client, d, buf, pos)
                        continue
                    break
                if ftype == PING:
                    if length != 8 or sid:
                        raise Malformed(NAME, "bad_frame_shape", pos, f"type {ftype} length {length} stream {sid}")
                    if n - pos < _FRAME_HDR_LEN + 8:
                        self._want = _FRAME_HDR_LEN + 8
                        return pos
                    pos += _FRAME_HDR_LEN + 8
                    continue
                if ftype in (HEADERS, CONTINUATION, PUSH_PROMISE) and length > self.max_block:
                    pos = self._oversized_block(from_client, d, buf, pos, ftype, flags, sid, length)
                    break
                if length > _CONTROL_BYTES and ftype in (SETTINGS, GOAWAY):
                    # Hostile sizes: only GOAWAY's first 8 bytes matter (the rest is debug data).
                    if ftype == SETTINGS or sid:
                        raise LimitExceeded(NAME, "frame_too_large", pos, f"type {ftype} length {length}")
                    if n - pos < _FRAME_HDR_LEN + 8:
                        return pos
                    self._goaway(buf.u32be_at(pos + _FRAME_HDR_LEN) & 0x7FFFFFFF, buf.ts_at(pos))
                    d.skip = _FRAME_HDR_LEN + length
                    break
                shape = _SHAPES.get(ftype)
                if shape is None:
                    d.skip = _FRAME_HDR_LEN + length  # RFC 9113 §5.5: unknown frame types are ignored
                    break
                if _bad_shape(shape, length, sid):
                    raise Malformed(NAME, "bad_frame_shape", pos, f"type {ftype} length {length} stream {sid}")
                if n - pos < _FRAME_HDR_LEN + length:
                    self._want = _FRAME_HDR_LEN + length  # from pos, which feed releases
                    return pos  # control frames and header blocks are small: wait for all of it
                ts = ts1 if whole is not None else buf.ts_at(pos)
                body = pos + _FRAME_HDR_LEN
                pos = body + length
                if ftype == HEADERS:
                    if whole is not None:
                        self._headers(from_client, d, whole, 0, body, length, flags, sid, ts)
                    else:
                        self._headers(from_client, d, buf.view_at(body, length), body, body, length, flags, sid, ts)
                elif ftype == CONTINUATION:
                    self._continuation(from_client, d, buf, body, length, flags, sid)
                elif ftype == RST_STREAM:
                    self._rst(sid, buf.u32be_at(body), ts)
                elif ftype == SETTINGS:
                    if whole is not None:
                        self._settings(whole, 0, body, length, flags)
                    else:
                        self._settings(buf.view_at(body, length), body, body, length, flags)
                elif ftype == PUSH_PROMISE:
                    self._push_promise(from_client, d, buf, body, length, flags, sid, ts)
                elif ftype == GOAWAY:
                    if length < 8:
                        raise Malformed(NAME, "bad_frame_shape", body, "short GOAWAY")
                    self._goaway(buf.u32be_at(body) & 0x7FFFFFFF, ts)
                # PRIORITY: nothing a span needs (shape checked above).

    # -- DATA -------------------------------------------------------------------
    def _data_frame(self, from_client: bool, sid: int, v: memoryview, body: int, length: int, ts: int,
                    buf: LargeBuffer | None) -> None:
        """A whole unpadded DATA payload ``v[body:body + length]``, counted as _data_payload
        would; ``buf``: the same bytes as a LargeBuffer (at the same offsets), or None for a
        segment fed whole (one is made for the rare reader that needs it: a captured body,
        a payload not one whole message)."""
        st = self.streams.get(sid)
        if st is None:
            return
        if from_client:
            st.req_body += length
            counter = st.req_msgs
        else:
            st.resp_body += length
            st.last_ns = ts
            counter = st.resp_msgs
        if st.cap is not None:  # enrich/: a bounded capture of a selected exchange's body
            if buf is None:
                buf = LargeBuffer(v)
            _sink_feed(st.cap.req_body if from_client else st.cap.sink, buf, body, length)
        if counter is not None and not counter.one(v, body, length):
            if buf is None:
                buf = LargeBuffer(v)
            try:
                counter.feed(buf, body, length)
            except ProtocolError:
                self.conn.drop("grpc_bad_message_prefix")  # counted; the stream still ends well

    def _data_payload(self, from_client: bool, d: _Direction, buf: LargeBuffer, pos: int, n: int) -> int:
        """Count the part of a DATA payload that has arrived; never hold or copy it."""
        if d.data_left:
            k = min(d.data_left, n - pos)
            if k:
                st = self.streams.get(d.data_sid)
                if st is not None:
                    counter = st.req_msgs if from_client else st.resp_msgs
                    if from_client:
                        st.req_body += k
                    else:
                        st.resp_body += k
                        st.last_ns = buf.ts_at(pos + k - 1)
                    if st.cap is not None:  # enrich/: a bounded capture of a selected exchange's body
                        _sink_feed(st.cap.req_body if from_client else st.cap.sink, buf, pos, k)
                    if counter is not None:
                        try:
                            counter.feed(buf, pos, k)
                        except ProtocolError:
                            self.conn.drop("grpc_bad_message_prefix")  # counted; the stream still ends well
                d.data_left -= k
                pos += k
        if not d.data_left and d.pad_left:
            k = min(d.pad_left, n - pos)
            d.pad_left -= k
            pos += k
        if not d.data_left and not d.pad_left:
            self._data_done(from_client, d, buf, pos)
        return pos

    def _data_done(self, from_client: bool, d: _Direction, buf: LargeBuffer, pos: int) -> None:
        if d.data_end:
            d.data_end = False
            self._end_stream(from_client, d.data_sid, buf.ts_at(pos - 1) if pos else 0)

    # -- header blocks ------------------------------------------------------------
    def _headers(self, from_client: bool, d: _Direction, v: memoryview, vbase: int, body: int, length: int,
                 flags: int, sid: int, ts: int) -> None:
        """A HEADERS frame whose payload (at absolute ``body``) is ``v[body - vbase:]``: the
        buffer's one chunk (vbase 0), a segment fed whole (0), or a view of the payload."""
        if sid == 0:
            raise Malformed(NAME, "headers_on_stream_0", body)
        start, end = body, body + length
        if flags & F_PADDED:
            if length < 1:
                raise Malformed(NAME, "bad_padding", body)
            end -= v[body - vbase]
            start += 1
        if flags & F_PRIORITY:
            start += 5
        if end < start:
            raise Malformed(NAME, "bad_padding", body)
        if flags & F_END_HEADERS:
            self._block(from_client, d, v[start - vbase:end - vbase], sid, bool(flags & F_END_STREAM), ts, 0, start)
            return
        d.block = bytearray(v[start - vbase:end - vbase])  # deliberate: a block split by CONTINUATION
        d.block_sid = sid
        d.block_end_stream = bool(flags & F_END_STREAM)
        d.block_ts = ts
        d.block_promised = 0

    def _push_promise(self, from_client: bool, d: _Direction, buf: LargeBuffer, body: int, length: int,
                      flags: int, sid: int, ts: int) -> None:
        if from_client:
            raise Malformed(NAME, "push_from_client", body)
        start, end = body, body + length
        if flags & F_PADDED:
            if length < 1:
                raise Malformed(NAME, "bad_padding", body)
            end -= buf.u8_at(body)
            start += 1
        if end - start < 4:
            raise Malformed(NAME, "bad_padding", body)
        promised = buf.u32be_at(start) & 0x7FFFFFFF
        start += 4
        if flags & F_END_HEADERS:
            self._block(from_client, d, buf.view_at(start, end - start), sid, False, ts, promised, start)
            return
        d.block = bytearray(buf.view_at(start, end - start))  # deliberate, as for HEADERS
        d.block_sid = sid
        d.block_end_stream = False
        d.block_ts = ts
        d.block_promised = promised

    def _continuation(self, from_client: bool, d: _Direction, buf: LargeBuffer, body: int, length: int,
                      flags: int, sid: int) -> None:
        if d.block_skip:
            if flags & F_END_HEADERS:
                d.block_skip = False
            return
        if d.block is None:
            raise Malformed(NAME, "unexpected_continuation", body)
        if len(d.block) + length > self.max_block:
            self._abandon_block(d)
            d.block_skip = not flags & F_END_HEADERS
            self._too_large(from_client, d)
            return
        d.block += buf.view_at(body, length)  # deliberate, bounded copy (see _headers)
        if flags & F_END_HEADERS:
            block, d.block = d.block, None
            self._block(from_client, d, memoryview(block), d.block_sid, d.block_end_stream, d.block_ts,
                        d.block_promised, -1)

    def _oversized_block(self, from_client: bool, d: _Direction, buf: LargeBuffer, pos: int, ftype: int,
                         flags: int, sid: int, length: int) -> int:
        """A header frame past the limit: skip it as it arrives; the table is lost."""
        if ftype == CONTINUATION and d.block is None and not d.block_skip:
            raise Malformed(NAME, "unexpected_continuation", pos)
        counted = d.block_skip  # a block already being skipped was counted once
        self._abandon_block(d)
        d.block_skip = not flags & F_END_HEADERS
        d.block_sid = sid
        d.skip = _FRAME_HDR_LEN + length
        if ftype == HEADERS and from_client:
            self.streams.pop(sid, None)  # its request is lost; counted below
        if not counted:
            self._too_large(from_client, d)
        return pos

    def _too_large(self, from_client: bool, d: _Direction) -> None:
        self.conn.drop("header_list_too_large")
        assert d.hpack is not None
        d.hpack.lose_sync()

    def _abandon_block(self, d: _Direction) -> None:
        d.block = None
        d.block_skip = False

    def _block(self, from_client: bool, d: _Direction, block: memoryview, sid: int, end_stream: bool,
               ts: int, promised: int, base: int) -> None:
        """A complete header block: decode (always: HPACK state depends on it) and apply to the stream."""
        hp = d.hpack
        assert hp is not None
        fields: dict[bytes, str] = {}
        try:
            hp.decode(block, fields, max(base, 0))
        except ProtocolError:
            hp.lose_sync()
            raise
        if hp.unknown:
            self.conn.drop("hpack_unknown_index")
        partial = hp.unknown > 0
        if promised:
            self._request(promised, fields, partial, False, ts)
            return
        if from_client:
            st = self.streams.get(sid)
            if st is None or not st.req_seen:
                self._request(sid, fields, partial, end_stream, ts)
            elif end_stream:
                self._end_stream(True, sid, ts)  # request trailers
            return
        st = self.streams.get(sid)
        if st is None:
            st = self._new_stream(sid, ts)  # mid-stream pickup: the request was before our time
            if st is None:
                return
        if st.resp_status is None:
            status = fields.get(b":status")
            if status is not None and status.isdigit() and len(status) == 3:
                code = int(status)
                if 100 <= code < 200:
                    return  # informational: the final response follows
                st.resp_status = code
            else:
                st.resp_status = 0  # undecodable status: keep going, report none
            st.last_ns = ts
            st.resp = fields
            st.resp_partial |= partial
            if st.cap is not None:
                st.cap.response(st.resp_status, fields=fields)
            if st.grpc or grpc.is_grpc(fields.get(b"content-type")):
                if st.resp_msgs is None:
                    st.resp_msgs = grpc.MessageCounter()
                st.grpc = True
        else:
            st.last_ns = ts
            st.trailers = fields
            st.trailer_block = True
            st.resp_partial |= partial
        if end_stream:
            self._end_stream(False, sid, ts)

    def _new_stream(self, sid: int, ts: int) -> _Stream | None:
        if len(self.streams) >= self.max_streams:
            self.conn.drop("too_many_streams")
            return None
        st = self.streams[sid] = _Stream(sid, ts)
        return st

    def _request(self, sid: int, fields: dict[bytes, str], partial: bool, end_stream: bool, ts: int) -> None:
        st = self.streams.get(sid)
        if st is None:
            st = self._new_stream(sid, ts)
            if st is None:
                return
        st.req = fields
        st.req_seen = True
        st.req_partial = partial
        if grpc.is_grpc(fields.get(b"content-type")):
            st.grpc = True
            st.req_msgs = grpc.MessageCounter()
            st.resp_msgs = grpc.MessageCounter()
        elif self._enrich is not None:
            path = fields.get(b":path")
            if path is not None:
                path = path.partition("?")[0]
                en = self._enrich
                if path[-2:] in en.ends or "/_" in path or path == "/":  # three string tests a request
                    kinds = en.select(fields.get(b":method", ""), path, fields.get(b"user-agent"))
                    if kinds is not None:
                        st.cap = en.begin(kinds, fields.get(b":method", ""), fields[b":path"],
                                          fields.get(b":authority"), fields.get(b"user-agent"), fields=fields)
        if end_stream:
            st.req_done = True

    # -- control frames -------------------------------------------------------------
    def _settings(self, v: memoryview, vbase: int, body: int, length: int, flags: int) -> None:
        """A SETTINGS frame whose payload (at absolute ``body``) is ``v[body - vbase:]``."""
        if flags & F_ACK:
            if length:
                raise Malformed(NAME, "bad_frame_shape", body, "SETTINGS ACK with payload")
            return
        if length % 6:
            raise Malformed(NAME, "bad_frame_shape", body, "SETTINGS length")
        # SETTINGS_HEADER_TABLE_SIZE bounds the *peer's* encoder; the encoder
        # announces what it uses with a size update, which _Hpack follows, so
        # the value is only validated here.
        unpack = _SETTING.unpack_from
        for off in range(body, body + length, 6):
            ident, value = unpack(v, off - vbase)
            if ident == 5 and not (DEFAULT_MAX_FRAME_SIZE <= value <= MAX_FRAME_SIZE):
                raise Malformed(NAME, "bad_setting", off, f"MAX_FRAME_SIZE {value}")

    def _rst(self, sid: int, code: int, ts: int) -> None:
        st = self.streams.pop(sid, None)
        if st is None:
            return
        self._finish(st, ts, reset_code=code)

    def _goaway(self, last: int, ts: int) -> None:
        """Streams above ``last`` were never processed (RFC 9113 §6.8): the client retries them."""
        self.goaway_last = last
        for sid in [s for s in self.streams if s > last and s & 1]:
            del self.streams[sid]
            self.conn.drop("goaway_unprocessed")

    def _end_stream(self, from_client: bool, sid: int, ts: int) -> None:
        st = self.streams.get(sid)
        if st is None:
            return
        if from_client:
            st.req_done = True
            return
        del self.streams[sid]
        self._finish(st, ts)

    # -- spans ------------------------------------------------------------------
    def _finish(self, st: _Stream, end_ns: int, reset_code: int | None = None, closed: bool = False,
                incomplete: bool = False) -> None:
        """The stream's span. ``closed``: the connection was reset under it (an error);
        ``incomplete``: it ended, or the capture did, after the response began (base.py's
        rule: a span of what was seen, marked, with the status seen so far)."""
        conn = self.conn
        if not st.req_seen:
            conn.drop("request_not_seen")  # picked up mid-stream: no method or path to report
            return
        req = st.req
        kind = conn.kind_for(SpanKind.SERVER, SpanKind.CLIENT)
        start = st.start_ns or end_ns
        traceparent = req.get(b"traceparent")
        trailers = st.trailers or st.resp
        # Picked up mid-stream, content-type may have been an unknown table
        # entry: a grpc-status, or a /pkg.Service/Method path answered with
        # trailers, still marks the call as gRPC.
        if st.grpc or b"grpc-status" in trailers or (
                st.req_partial and b"content-type" not in req and st.trailer_block
                and _GRPC_PATH.match(req.get(b":path", "")) is not None):
            gs = trailers.get(b"grpc-status")
            code = int(gs) if gs is not None and gs.isdigit() and len(gs) <= 3 else None
            unknown = code is None and (st.resp_partial or incomplete) and reset_code is None and not closed
            gm = trailers.get(b"grpc-message")
            timeout = req.get(b"grpc-timeout")
            tns = grpc.parse_timeout_ns(timeout)
            reset = reset_code is not None or closed
            timed_out = reset and tns is not None and end_ns - start >= tns
            if closed and code is None and not timed_out:
                code = grpc.UNAVAILABLE  # the transport went away under the call
            if incomplete and code is None and st.resp_status not in (None, 0, 200):
                unknown = False  # the HTTP status says what went wrong (http-grpc-status-mapping.md)
            counts = not st.lossy
            name, attrs, status, msg = grpc.rpc_fields(
                req.get(b":path"), kind, code, grpc.percent_decode(gm) if gm else None,
                st.resp_status or None, reset, timed_out, timeout,
                st.req_msgs.messages if st.req_msgs and counts else None,
                st.resp_msgs.messages if st.resp_msgs and counts else None,
                status_unknown=unknown,
            )
            _server_addr(attrs, req.get(b":authority"))
            span = conn.span(name, kind, start, end_ns, attrs, traceparent, status, msg)
            if incomplete:
                self.cut_short(span)
            else:
                conn.emit(span)
            return
        attrs: dict[str, AttrValue] = {}
        method = req.get(b":method")
        if method is not None:
            if method in _KNOWN_METHODS:
                attrs["http.request.method"] = method
            else:
                attrs["http.request.method"] = "_OTHER"
                attrs["http.request.method_original"] = method
        path = req.get(b":path")
        if path is not None:
            q = path.find("?")
            if q >= 0:
                attrs["url.path"] = path[:q]
                s = conn.settings
                attrs["url.query"] = (redact_query(path[q + 1:]) if not isinstance(s, Settings) or s.sanitize_query
                                      else path[q + 1:])
            else:
                attrs["url.path"] = path
        scheme = req.get(b":scheme")
        if scheme is not None:
            attrs["url.scheme"] = scheme
        _server_addr(attrs, req.get(b":authority"))
        attrs["network.protocol.version"] = "2"
        if st.resp_status:
            attrs["http.response.status_code"] = st.resp_status
        if st.req_body and not st.lossy:
            attrs["http.request.body.size"] = st.req_body
        if st.resp_status and not st.lossy and not incomplete:
            attrs["http.response.body.size"] = st.resp_body
        ua = req.get(b"user-agent")
        if ua is not None:
            attrs["user_agent.original"] = ua
        status = StatusCode.UNSET
        msg = ""
        code = st.resp_status or 0
        if reset_code is not None or closed or not code:
            if reset_code is not None:
                etype = ERROR_CODES[reset_code] if reset_code < len(ERROR_CODES) else str(reset_code)
            else:
                etype = "connection_reset" if closed else "status_unknown"
            if not code or closed:
                attrs["error.type"] = etype
                status = StatusCode.ERROR
                msg = f"stream ended: {etype}"
        if code >= 500 or (code >= 400 and kind != SpanKind.SERVER):
            attrs["error.type"] = str(code)
            status = StatusCode.ERROR
        name = method if method in _KNOWN_METHODS else "HTTP"
        span = conn.span(name, kind, start, end_ns, attrs, traceparent, status, msg)
        if st.cap is not None:  # enrich/: GenAI, GraphQL, Elasticsearch, JSON-RPC attributes
            self._enrich.finish(st.cap, span, conn.emit)
        if incomplete:
            self.cut_short(span)
        else:
            conn.emit(span)

    # -- loss and end ------------------------------------------------------------
    def gap(self, from_client: bool, ts_ns: int) -> None:
        """Bytes were lost (or a parse error cleared the buffer): resynchronise this direction.

        Streams are keyed by id, so those in flight go on: frames after the gap still
        say which stream they belong to and when it ends. What the gap swallowed of
        them is unknown (their body sizes and message counts are left out; counted
        ``gap`` once). The direction's HPACK table may have missed insertions, so it
        continues as "unknown" (exact newer entries, older ones unknown).
        """
        d = self.client if from_client else self.server
        if self.streams:
            self.conn.drop("gap")
        for st in self.streams.values():
            st.lossy = True
            if st.cap is not None:  # enrich/: the captured body stops at the gap (counted "gap")
                st.cap.lose(from_client)
        d.block = None
        d.block_skip = False
        d.data_left = d.pad_left = d.skip = 0
        d.data_end = False
        if d.hpack is not None:
            d.hpack.lose_sync()
        if d.started:
            d.resync = True

    def _resync(self, d: _Direction, buf: LargeBuffer) -> int:
        """Skip to the first offset where two plausible frames (or one ending the buffer) start."""
        n = len(buf)
        pos = 0
        while n - pos >= _FRAME_HDR_LEN:
            length = _plausible_frame(buf, pos)
            if length >= 0:
                nxt = pos + _FRAME_HDR_LEN + length
                if nxt == n or (nxt + _FRAME_HDR_LEN <= n and _plausible_frame(buf, nxt) >= 0):
                    d.resync = False
                    if pos:
                        self.conn.drop("resync_skipped")
                    return pos
                if nxt > n or nxt + _FRAME_HDR_LEN > n:
                    return pos  # maybe a frame: wait for more
            pos += 1
            if pos > MAX_HEADER_LIST_SIZE:
                break
        return pos

    def close(self, ts_ns: int, reset: bool = False) -> None:
        """The connection (or the capture) ended: a stream whose response began is a span of
        what was seen, marked incomplete (base.py); one without a response is counted
        ``no_response``. A reset ends every open stream as an error (gRPC: UNAVAILABLE)."""
        streams = list(self.streams.values())
        self.streams.clear()
        for st in streams:
            if reset:
                self._finish(st, ts_ns, closed=True)
            elif not st.req_seen:
                self.conn.drop("request_not_seen")
            elif st.resp_status is not None:
                self._finish(st, st.last_ns or ts_ns, incomplete=True)
            else:
                self.cut_short(None, "no_response")


def _text(v: object) -> str:
    """A field handed over by the HTTP/1 session: bytes (as it keeps them) or str."""
    if isinstance(v, (bytes, bytearray, memoryview)):
        return bytes(v).decode("latin-1")  # small header value
    return "" if v is None else str(v)


def _server_addr(attrs: dict[str, AttrValue], authority: str | None) -> None:
    """server.address from :authority (the HTTP/2 Host); the port stays the connection's."""
    if not authority:
        return
    host = authority.rsplit("@", 1)[-1]
    if host.startswith("["):
        end = host.find("]")
        host = host[1:end] if end > 0 else host
    else:
        host = host.split(":", 1)[0]
    if host:
        attrs["server.address"] = host


Session = H2Session  # the contract's name (base.py)
