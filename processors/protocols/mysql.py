"""MySQL / MariaDB client/server protocol: one CLIENT span per command.

Contract (processors/protocols/base.py): ``detect`` recognises the server's
initial handshake (protocol 10) or, picked up mid-stream, a client command
packet (sequence 0, a known command byte, content checked); ``Session`` tracks
the handshake (capabilities, schema from HandshakeResponse41, SSL request =>
TLS follows: stop, counted ``tls``), then pairs each command with its response
by order. COM_QUERY and COM_STMT_EXECUTE give spans (EXECUTE carries the text
cached at COM_STMT_PREPARE, bounded LRU by statement id); COM_STMT_PREPARE
gives a span only when it fails; COM_INIT_DB and ``USE x`` set
``db.namespace``; COM_PING gives a span only with ``trace_ping``; COM_QUIT,
COM_STMT_CLOSE, COM_STMT_RESET none.

Zero-copy: a packet is its 4-byte header (3-byte little-endian length, sequence
id) and at most a bounded head of its payload (``_CLIENT_HEAD``/``_SERVER_HEAD``);
rows are counted by their first byte and released as they arrive. Payloads of
16 MiB - 1 continue in the next packet (the continuation is skipped, never
joined). CLIENT_DEPRECATE_EOF decides whether result sets end with EOF or OK.
Query attributes (CLIENT_QUERY_ATTRIBUTES) before a COM_QUERY's text are stepped
over; the compressed protocol (CLIENT_COMPRESS zlib, zstd) is inflated frame by
frame into a per-direction packet buffer (the one deliberate copy) and parsed
from there.

Reading: a packet's handler (``_client_packet``, ``_server_packet``) gets one view of its
payload's capped head and reads nothing past it, so what a field says never depends on the
bytes that happen to follow the packet in the buffer; a field that overruns the head is
``Malformed`` (``truncated_field``). The buffered ``feed`` takes that view from the buffer;
``feed_whole`` (base.py) slices it from a segment that holds only whole packets (a command,
its OK or ERR, a whole result set or PREPARE answer) without buffering the segment, and
declines, changing nothing, a partial packet, a payload of 16 MiB - 1, the compressed
protocol, a client's first bytes (compressed or not is decided there) or a direction being
resynchronised or skipped. Both walks call the same handlers: ``feed`` is the reference.
"""

from __future__ import annotations

import re
import struct
import zlib
from collections import OrderedDict, deque

from pydantic import Field

from service.largebuf import LargeBuffer
from service.model import SpanKind, StatusCode

from .base import Conn, Detection, PendingQueue, Perspective, ProtocolSettings
from .base import Session as _Session
from .errors import LimitExceeded, Malformed
from .sanitize import sanitize_error
from .sql import MAX_QUERY_BYTES, QueryInfo, analyze, query_attributes

NAME = "mysql"
DEFAULT_PORTS = frozenset({3306})
SYSTEM = "mysql"

#: A payload of this length continues in the next packet (MySQL "Sending More than 16Mb").
MAX_PACKET_PAYLOAD = 0xFFFFFF
#: Handshake protocol version of every server since 3.21.
PROTOCOL_VERSION = 10
# Capability flags (MySQL source, include/mysql_com.h).
CLIENT_CONNECT_WITH_DB = 0x8
CLIENT_COMPRESS = 0x20
CLIENT_PROTOCOL_41 = 0x200
CLIENT_SSL = 0x800
CLIENT_SECURE_CONNECTION = 0x8000
CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA = 0x200000
CLIENT_DEPRECATE_EOF = 0x1000000
#: A compressed frame may inflate to this many bytes whatever its size, and beyond only up to
#: this ratio: a 1.4 KB zstd frame of 16 MiB of COM_PINGs cost 10 s of parsing (7 ms a wire
#: byte). Real result sets compress 3-20x (zlib's ceiling on repetition is about 1000x).
INFLATE_FREE = 64 * 1024
MAX_INFLATE_RATIO = 100
#: zstd instead of zlib for the compressed protocol (MySQL 8.0.18+).
CLIENT_ZSTD_COMPRESSION_ALGORITHM = 0x4000000
#: COM_QUERY / COM_STMT_EXECUTE carry query attributes before the SQL (MySQL 8.0.23+).
CLIENT_QUERY_ATTRIBUTES = 0x8000000
# Server status flags.
SERVER_MORE_RESULTS_EXISTS = 0x8
#: Requests waiting for their response before the oldest is dropped (counted).
MAX_PENDING = 256
#: Bytes searched for a command boundary after a gap before giving up on them.
RESYNC_WINDOW = 16384
#: Names (schema, user) kept at most this long; MySQL's own limit is 64 characters.
MAX_NAME = 256
#: Payload bytes the server-side parser looks at (OK, ERR, EOF, PREPARE-OK, column count).
_SERVER_HEAD = 1024
#: Client: a command byte plus the longest query text we keep.
_CLIENT_HEAD = 1 + MAX_QUERY_BYTES

# Command bytes (MySQL "Text Protocol" / "Prepared Statements").
COM_QUIT = 0x01
COM_INIT_DB = 0x02
COM_QUERY = 0x03
COM_FIELD_LIST = 0x04
COM_STATISTICS = 0x09
COM_PING = 0x0E
COM_CHANGE_USER = 0x11
COM_STMT_PREPARE = 0x16
COM_STMT_EXECUTE = 0x17
COM_STMT_SEND_LONG_DATA = 0x18
COM_STMT_CLOSE = 0x19
COM_STMT_RESET = 0x1A
COM_SET_OPTION = 0x1B
COM_STMT_FETCH = 0x1C
COM_RESET_CONNECTION = 0x1F
#: MariaDB 10.2+: an EXECUTE with an array of parameter rows (same statement id layout).
COM_STMT_BULK_EXECUTE = 0xFA
#: Commands the server never answers.
_NO_RESPONSE = frozenset((COM_QUIT, COM_STMT_SEND_LONG_DATA, COM_STMT_CLOSE))
#: Known command bytes (0x00 sleep .. 0x1f reset connection; MariaDB adds 0xfe bulk execute).
_COMMANDS = frozenset(range(0x01, 0x20)) | {0xFA, 0xFE}
#: Commands ``detect`` trusts on a connection joined mid-stream (their content is checked).
_DETECT_COMMANDS = frozenset((COM_QUIT, COM_INIT_DB, COM_QUERY, COM_STATISTICS, COM_PING, COM_STMT_PREPARE,
                              0x17, 0x19, 0x1A, COM_RESET_CONNECTION))
#: Commands whose payload is text, checked by ``detect``.
_TEXT_COMMANDS = frozenset((COM_QUERY, COM_INIT_DB, COM_STMT_PREPARE))

# Binary protocol value sizes by field type (MySQL "Binary Protocol Value"): fixed sizes;
# DATE/TIME/DATETIME/TIMESTAMP are a length byte and that many bytes; every other type
# (strings, blobs, DECIMAL, JSON, BIT, ENUM, SET, GEOMETRY, VECTOR) a length-encoded string.
_FIXED_SIZE = {1: 1, 2: 2, 3: 4, 4: 4, 5: 8, 6: 0, 8: 8, 9: 4, 13: 2}
_TEMPORAL = frozenset((7, 10, 11, 12))
#: Query attributes one COM_QUERY may carry before we stop believing its parameter count.
MAX_QUERY_ATTRIBUTES = 1024

# Response states.
_FIRST, _COLS, _COLS_EOF, _ROWS, _P_PARAMS, _P_PARAMS_EOF, _P_COLS, _P_COLS_EOF, _INFILE, _FIELDS = range(10)
_HANDSHAKE, _AUTH, _COMMAND = range(3)


class Settings(ProtocolSettings):
    """Options under ``processors: protocols: mysql:``."""

    #: Replace literals in ``db.query.text`` by ``?`` (off: the text as sent).
    sanitize_query: bool = True
    #: Prepared statements remembered per connection (LRU by statement id).
    max_statements: int = Field(512, ge=1, le=1_000_000)
    #: Make spans for COM_PING (connection-pool health checks; off by default).
    trace_ping: bool = False
    #: Replace quoted literals in error messages by ``?`` (``sanitize.py``; off: as the server sent them).
    sanitize_errors: bool = True


_U16 = struct.Struct("<H").unpack_from
_U32 = struct.Struct("<I").unpack_from
_U64 = struct.Struct("<Q").unpack_from
#: PREPARE's OK after its status byte: statement id, columns, parameters.
_PREPARE_OK = struct.Struct("<IHH").unpack_from
#: What a read past the end of a packet's view raises (``v[i]``, ``unpack_from``): a field
#: overrunning its packet, as ``BufferBoundsError`` is one overrunning a buffer.
_SHORT = (IndexError, struct.error)
_NUL = re.compile(b"\0")
_UNSET = StatusCode.UNSET
_ERROR = StatusCode.ERROR
_CLIENT_KIND = SpanKind.CLIENT
_SERVER_KIND = SpanKind.SERVER
_AT_SERVER = Perspective.SERVER
#: A control byte other than tab, LF, CR: not query or version text.
_CONTROL = re.compile(b"[\x00-\x08\x0b\x0c\x0e-\x1f]")


def _printable(v: memoryview, off: int, end: int) -> bool:
    """No control byte but tab, LF, CR in the first 64 of ``v[off:end]`` (one regex scan in C)."""
    return _CONTROL.search(v, off, min(end, off + 64)) is None


def _nul(v: memoryview, off: int) -> int:
    """Offset of the first NUL in ``v`` at or after ``off``, or -1 (searched in place)."""
    m = _NUL.search(v, off)
    return m.start() if m is not None else -1


def _greeting_ok(buf: LargeBuffer, plen: int) -> bool:
    """Is the payload at 4 a protocol-10 server handshake?"""
    if plen < 34 or plen > 1024 or buf.u8_at(4) != PROTOCOL_VERSION:
        return False
    z = buf.find(b"\0", 5, min(4 + plen, 5 + 80))
    if z < 6 or not _printable(buf.view_at(5, z - 5), 0, z - 5):
        return False
    filler = z + 1 + 4 + 8
    return filler < 4 + plen and buf.u8_at(filler) == 0


def _command_at(buf: LargeBuffer, off: int, plen: int) -> bool:
    """Is the ``plen``-byte payload at ``off`` (all in ``buf``) a plausible client command?
    Read through one view of its head, as the session reads a command."""
    return _command_ok(buf.view_at(off, min(plen, _CLIENT_HEAD)), plen)


def _command_ok(v: memoryview, plen: int) -> bool:
    """Is ``v`` (a ``plen``-byte payload's head) a plausible client command?"""
    if plen < 1 or not len(v):
        return False
    cmd = v[0]
    if cmd not in _COMMANDS:
        return False
    if cmd in (COM_QUIT, COM_PING, COM_STATISTICS, COM_RESET_CONNECTION):
        return plen == 1
    if cmd in (COM_STMT_CLOSE, COM_STMT_RESET):
        return plen == 5
    if cmd == COM_STMT_EXECUTE:
        return plen >= 10 and len(v) >= 6 and v[5] <= 0x0F
    if cmd in _TEXT_COMMANDS:
        end = min(plen, len(v))
        if plen >= 2 and _printable(v, 1, end):
            return True
        if cmd == COM_QUERY:  # query attributes before the text (joined mid-stream: caps unknown)
            q = _query_attrs_end(v, 1, end)
            return 1 < q < plen and _printable(v, q, end)
        return False
    return False  # rarer commands are not trusted for detection


def _frame_plausible(buf: LargeBuffer, n: int) -> bool:
    """Could the ``n`` bytes so far begin a compressed frame around one client command?
    (Checked on what is there: the uncompressed length, the stored packet's header or the
    codec's first byte.)"""
    if n < 7:
        return True
    clen = buf.u32le_at(0) & 0xFFFFFF
    ulen = buf.u32le_at(3) >> 8
    if ulen == 0:
        if n < 11:
            return True
        return (buf.u32le_at(7) & 0xFFFFFF) + 4 == clen and buf.u8_at(10) == 0 and (
            n < 12 or buf.u8_at(11) in _DETECT_COMMANDS)
    if ulen < 5 or ulen > 65536 + 4 or clen < 2:
        return False
    return n < 8 or buf.u8_at(7) in (0x78, 0x28)  # zlib's CMF byte, zstd's magic


def _compressed_command(buf: LargeBuffer, n: int) -> bool:
    """Is ``buf`` (``n`` bytes) one compressed-protocol frame holding one client command?
    (Joined mid-stream on a compressed connection: the frame is alone, as a command is.)"""
    if n < 12 or buf.u8_at(3) != 0 or 7 + (buf.u32le_at(0) & 0xFFFFFF) != n or not _frame_plausible(buf, n):
        return False
    ulen = buf.u32le_at(3) >> 8
    if ulen == 0:
        inner = buf
        off = 7
        avail = n - 7
    else:
        if ulen < 5 or ulen > 65536 + 4:
            return False
        try:
            head = _inflate(buf, 7, n - 7, ulen, 5 + 64)
        except Malformed:
            return False
        inner = LargeBuffer(head)
        off = 0
        avail = ulen
    plen = inner.u32le_at(off) & 0xFFFFFF
    if inner.u8_at(off + 3) != 0 or 4 + plen != avail:
        return False
    return _command_at(inner, off + 4, min(plen, len(inner) - off - 4))


def _inflate(buf: LargeBuffer, off: int, clen: int, ulen: int, limit: int = 0) -> bytes:
    """A compressed frame's payload (zlib, or zstd by its magic number) inflated to its
    declared ``ulen`` bytes (or the first ``limit``); more, less or a broken stream is
    ``Malformed``. The decompressor is never allowed past the declared length."""
    want = limit if 0 < limit < ulen else ulen
    if clen >= 4 and buf.u32le_at(off) == 0xFD2FB528:  # zstd frame
        from .mongodb import _zstd_decompress
        try:
            out = _zstd_decompress(buf.view_at(off, clen), want + (0 if limit else 1))
        except ImportError:
            raise Malformed(NAME, "compressor_unavailable", off, "zstd") from None
        except Exception as e:  # the codecs' own error types
            raise Malformed(NAME, "bad_compressed_frame", off, str(e)) from None
        if limit:
            out = out[:want]
    else:
        z = zlib.decompressobj()
        out = b""
        try:
            for v in buf.views(off, clen):
                out += z.decompress(v, want + 1 - len(out))
                if len(out) > want or (limit and len(out) >= want):
                    break
        except zlib.error as e:
            raise Malformed(NAME, "bad_compressed_frame", off, str(e)) from None
        if limit:
            return out[:want]
    if len(out) != want:
        raise Malformed(NAME, "bad_compressed_frame", off, f"{len(out)} bytes inflated, {ulen} declared")
    return out


def _query_attrs_end(v: memoryview, off: int, end: int) -> int:
    """Where the SQL text starts after a COM_QUERY's query attributes at ``off``.

    With CLIENT_QUERY_ATTRIBUTES (MySQL 8.0.23+) the text follows parameter_count and
    parameter_set_count (always 1) and, when there are parameters, a NULL bitmap, the
    new-params-bound flag (always 1), each one's type and name, then the non-NULL values
    in the binary protocol's encoding (MySQL "COM_QUERY", "Binary Protocol Value").
    Returns -1 when the bytes at ``off`` are no such block, -2 when it runs past ``end``
    or past ``v`` (the part of the packet read). Bounded: at most ``MAX_QUERY_ATTRIBUTES``
    parameters, each step checked against ``end``.
    """
    try:
        if off >= end:
            return -1
        n, off = _lenenc(v, off)
        if n > MAX_QUERY_ATTRIBUTES or off >= end:
            return -1
        sets, off = _lenenc(v, off)
        if sets != 1:
            return -1
        if n == 0:
            return off
        nulls = off
        off += (n + 7) >> 3
        if off >= end or v[off] != 1:
            return -1
        off += 1
        types = off
        for _ in range(n):
            if off + 3 > end:
                return -2
            ln, off = _lenenc(v, off + 2)
            off += ln
        t = types
        for i in range(n):
            if off > end:
                return -2
            ftype = v[t]
            ln, t = _lenenc(v, t + 2)
            t += ln
            if v[nulls + (i >> 3)] >> (i & 7) & 1:
                continue
            size = _FIXED_SIZE.get(ftype)
            if size is not None:
                off += size
            elif off >= end:
                return -2
            elif ftype in _TEMPORAL:
                off += 1 + v[off]
            else:
                ln, off = _lenenc(v, off)
                off += ln
        return off if off <= end else -2
    except Malformed:
        return -1
    except _SHORT:
        return -2


def detect(buf: LargeBuffer, from_client: bool | None) -> Detection:
    """Server handshake, or (mid-stream) a client command with sequence 0."""
    n = len(buf)
    if n < 4:
        return Detection.NEED_MORE
    plen = buf.u32le_at(0) & 0xFFFFFF
    seq = buf.u8_at(3)
    if seq != 0 or plen == 0:
        return Detection.NO
    if from_client is not True:
        if n < 5:
            return Detection.NEED_MORE
        if buf.u8_at(4) == PROTOCOL_VERSION and plen >= 34:
            if n < 4 + plen:
                return Detection.NEED_MORE if plen <= 1024 else Detection.NO
            if _greeting_ok(buf, plen):
                return Detection.RESPONSE
            return Detection.NO
    if from_client is not False:
        if n < 5:
            return Detection.NEED_MORE
        if buf.u8_at(4) in _DETECT_COMMANDS:
            if n < 4 + plen:
                if plen > 65536 and n >= 4 + 64 and buf.u8_at(4) in _TEXT_COMMANDS:
                    return Detection.REQUEST if _printable(buf.view_at(5, 63), 0, 63) else Detection.NO
                return Detection.NEED_MORE if plen <= 65536 else Detection.NO
            if n == 4 + plen and _command_at(buf, 4, plen):
                return Detection.REQUEST  # one command, then the client waits for its answer
        # A compressed-protocol frame (7-byte header) around one command?
        if plen > 65536 or not _frame_plausible(buf, n):
            return Detection.NO
        if n < 7 + plen:
            return Detection.NEED_MORE
        return Detection.REQUEST if n == 7 + plen and _compressed_command(buf, n) else Detection.NO
    return Detection.NO


class _Cmd:
    """A command waiting for (the rest of) its response."""

    __slots__ = (
        "arg",
        "cmd",
        "err_code",
        "err_msg",
        "err_state",
        "info",
        "left",
        "rows",
        "start",
        "state",
    )

    def __init__(self, cmd: int, info: QueryInfo | None, start: int, arg: str = "") -> None:
        self.cmd = cmd
        self.info = info
        self.start = start
        self.state = _FIRST
        self.left = 0
        self.rows = 0
        self.err_code = 0
        self.err_state = ""
        self.err_msg = ""
        self.arg = arg


def _lenenc(v: memoryview, off: int) -> tuple[int, int]:
    """(value, offset after) of a length-encoded integer in ``v``; one cut short raises
    what a read past ``v`` raises (``_SHORT``)."""
    b = v[off]
    if b < 0xFB:
        return b, off + 1
    if b == 0xFC:
        return _U16(v, off + 1)[0], off + 3
    if b == 0xFD:
        return _U32(v, off)[0] >> 8, off + 4  # the marker and 3 bytes: the same bytes read
    if b == 0xFE:
        return _U64(v, off + 1)[0], off + 9
    raise Malformed(NAME, "bad_lenenc", off)


class Session(_Session):
    protocol = NAME

    def __init__(self, conn: Conn) -> None:
        super().__init__(conn)
        s = conn.settings if isinstance(conn.settings, Settings) else Settings()
        self._sanitize = s.sanitize_query
        self._max_stmts = max(1, s.max_statements)
        self._trace_ping = s.trace_ping
        self._sanitize_errors = s.sanitize_errors
        self._stmts: OrderedDict[int, QueryInfo | None] = OrderedDict()
        self._pending: deque[_Cmd] = PendingQueue(conn, start="start")
        self._phase = _HANDSHAKE
        self._server_caps = 0
        self._deprecate_eof: bool | None = None  # None: joined mid-stream, not negotiated
        self._skip = [0, 0]
        self._cont = [False, False]      # next packet continues a 16 MiB payload
        self._resync_client = False
        self._server_desync = False      # drop server bytes until the next command
        self._seq = 0                    # last sequence id of the command in progress
        self._stopped = False
        self._compress = False
        #: Compressed protocol in effect: per direction, the packets decompressed from its
        #: frames (a deliberate copy: the one way to read them), parsed as usual from there.
        self._zbuf: tuple[LargeBuffer, LargeBuffer] | None = None
        #: CLIENT_QUERY_ATTRIBUTES negotiated: True/False from the handshake, None when joined
        #: mid-stream (then a COM_QUERY whose text starts with an attribute block says so).
        self._qattrs: bool | None = None
        self.namespace = ""
        self.user = ""
        self.server_version = ""

    # -- plumbing --------------------------------------------------------------------
    def feed(self, from_client: bool, buf: LargeBuffer, ts_ns: int) -> None:
        if self._zbuf is None:
            if self._phase == _HANDSHAKE and from_client:
                z = self._sniff_compressed(buf)
                if z is None:
                    return
            else:
                z = False
            if z:
                self._phase = _COMMAND  # joined mid-stream on a compressed connection
                self._zbuf = (LargeBuffer(), LargeBuffer())
            else:
                self._packets(from_client, buf, True)
                if self._zbuf is None or not len(buf) or self._stopped:
                    return
        self._frames(from_client, buf)

    def _sniff_compressed(self, buf: LargeBuffer) -> bool | None:
        """Joined mid-stream, the client's first bytes: a plain command (False), one inside a
        compressed-protocol frame (True), or None with ``buf.want`` set to tell them apart."""
        n = len(buf)
        if n < 4:
            buf.want = 4
            return None
        plen = buf.u32le_at(0) & 0xFFFFFF
        if buf.u8_at(3) != 0 or plen > 65536:
            return False
        if n < 4 + plen:
            buf.want = 4 + plen
            return None
        if n == 4 + plen and _command_at(buf, 4, plen):
            return False
        if n < 7 + plen:
            buf.want = 7 + plen
            return None
        return n == 7 + plen and _compressed_command(buf, n)

    def _frames(self, from_client: bool, buf: LargeBuffer) -> None:
        """The compressed protocol: 7-byte frame headers (compressed length, sequence id,
        uncompressed length, 0 when the frame is stored as is) around zlib or zstd payloads
        that hold the usual packets, which may span frames. Each whole frame is inflated
        (bounded by its declared length, at most 16 MiB) into this direction's packet
        buffer, whose packets are then parsed as on a plain connection."""
        assert self._zbuf is not None
        inner = self._zbuf[0 if from_client else 1]
        pos = 0
        want = 0
        try:
            while True:
                n = len(buf) - pos
                if n < 7:
                    want = 7
                    break
                clen = buf.u32le_at(pos) & 0xFFFFFF
                ulen = buf.u32le_at(pos + 3) >> 8
                if n < 7 + clen:
                    want = 7 + clen
                    break
                ts = buf.ts_at(pos + 6 + clen) if clen else buf.ts_at(pos + 6)
                if ulen > INFLATE_FREE and ulen > clen * MAX_INFLATE_RATIO:
                    pos += 7 + clen  # a decompression bomb: not inflated; the stage resyncs after it
                    raise LimitExceeded(NAME, "inflate_ratio", pos, f"{clen} -> {ulen} bytes")
                if ulen == 0:
                    for v in buf.views(pos + 7, clen):  # stored: the payload's own chunks, no copy
                        inner.append(v, ts)
                elif clen:
                    inner.append(_inflate(buf, pos + 7, clen, ulen), ts)
                pos += 7 + clen
        finally:
            buf.consumed(pos, want)
        if len(inner):
            self._packets(from_client, inner, False)

    def _packets(self, from_client: bool, buf: LargeBuffer, outer: bool) -> None:
        # Packets are walked with an offset and released once at the end: one
        # release per feed, not per packet (a row is a few dozen bytes).
        d = 0 if from_client else 1
        cap = _CLIENT_HEAD if from_client else _SERVER_HEAD
        pos = 0
        want = 0
        try:
            while True:
                n = len(buf)
                if pos >= n:
                    return
                if self._stopped or (not from_client and self._server_desync):
                    pos = n
                    return
                skip = self._skip[d]
                if skip:
                    k = skip if skip < n - pos else n - pos
                    pos += k
                    self._skip[d] = skip - k
                    continue
                if from_client and self._resync_client:
                    if pos:
                        buf.release(pos)
                        pos = 0
                    if not self._find_command(buf):
                        return
                    continue
                if n - pos < 4:
                    return
                h = buf.u32le_at(pos)  # length (3 bytes LE) and sequence id in one read
                plen = h & 0xFFFFFF
                seq = h >> 24
                if not from_client and self._phase == _HANDSHAKE and (
                        seq != 0 or (n - pos > 4 and buf.u8_at(pos + 4) != PROTOCOL_VERSION)):
                    # Joined mid-stream: this is the tail of some answer; wait for a command.
                    self._server_desync = True
                    self.conn.drop("resync")
                    continue
                total = 4 + plen
                head = plen if plen < cap else cap
                if n - pos < 4 + head:
                    want = 4 + head  # what of the packet is read is bounded by its cap
                    return
                if self._cont[d]:
                    self._seq = seq  # the tail of a >16 MiB payload: nothing to read
                else:
                    # The head in one view (a slice of its chunk, or the buffer's scratch
                    # when it straddles two: bounded by the cap), read by the handler alone.
                    v = buf.view_at(pos + 4, head)
                    try:
                        if from_client:
                            self._client_packet(v, plen, seq, buf.ts_at(pos), pos)
                        else:
                            self._server_packet(v, plen, seq, buf.ts_at(pos), pos)
                    except _SHORT as e:  # a field overruns its packet's head
                        raise Malformed(NAME, "truncated_field", pos, str(e)) from None
                self._cont[d] = plen == MAX_PACKET_PAYLOAD
                if self._stopped:
                    pos = len(buf)
                    return
                if n - pos >= total:
                    pos += total
                else:
                    self._skip[d] = total - (n - pos)
                    pos = n
                if outer and self._zbuf is not None:
                    return  # compressed from here on: feed hands the rest to _frames
        finally:
            buf.consumed(pos, want)

    def feed_whole(self, from_client: bool, data: memoryview, ts_ns: int) -> bool:
        """A segment of whole packets (base.py's contract), read in place without a buffer.

        Why: nearly every segment of a session is whole packets (a command; its OK or ERR;
        a result set's column count, definitions, rows and EOF/OK; a PREPARE answer), and
        the buffer's append, chunk lookups and release cost more than reading them. Taken
        only when ``feed`` would walk plain packets from the segment's first byte (no
        compressed protocol, nothing to skip, no resync, not a client's first bytes) and
        every packet ends inside it, the last with it, none of 16 MiB - 1; anything else is
        declined unchanged. Then each packet's capped head goes to the handler ``feed``
        calls, in the same order: a bad packet raises what ``feed`` raises for it, after the
        same packets before it (the stage handles both alike)."""
        if from_client:
            if self._resync_client or self._phase == _HANDSHAKE or self._skip[0] or self._cont[0]:
                return False
        elif self._server_desync or self._skip[1] or self._cont[1]:
            return False
        if self._zbuf is not None or self._compress or self._stopped:
            return False
        if type(data) is not memoryview:  # the eBPF receiver's payloads are bytes
            data = memoryview(data)
        if data.format != "B" or data.ndim != 1:
            data = data.cast("B")
        n = len(data)
        if n < 4:
            return False
        h = _U32(data, 0)[0]
        plen = h & 0xFFFFFF
        if plen == MAX_PACKET_PAYLOAD:
            return False
        if n != 4 + plen:  # not the usual one packet: frame first, the last ending the segment
            pos = 4 + plen
            while pos + 4 <= n:
                k = _U32(data, pos)[0] & 0xFFFFFF
                if k == MAX_PACKET_PAYLOAD:
                    return False
                pos += 4 + k
            if pos != n:  # a header cut short, or a payload running past the segment
                return False
        pos = 0
        try:
            if from_client:
                while True:
                    self._client_packet(data[pos + 4:pos + 4 + (plen if plen < _CLIENT_HEAD else _CLIENT_HEAD)],
                                        plen, h >> 24, ts_ns, pos)
                    pos += 4 + plen
                    if pos >= n or self._stopped:
                        return True
                    h = _U32(data, pos)[0]
                    plen = h & 0xFFFFFF
            pending = self._pending
            while True:
                seq = h >> 24
                if self._phase == _HANDSHAKE and (seq != 0 or (n - pos > 4 and data[pos + 4] != PROTOCOL_VERSION)):
                    self._server_desync = True  # as _packets: the tail of some answer, dropped
                    self.conn.drop("resync")
                    return True
                self._server_packet(data[pos + 4:pos + 4 + (plen if plen < _SERVER_HEAD else _SERVER_HEAD)],
                                    plen, seq, ts_ns, pos)
                pos += 4 + plen
                if pos >= n or self._stopped:
                    return True
                h = _U32(data, pos)[0]
                plen = h & 0xFFFFFF
                if pending and self._phase == _COMMAND:
                    # A run of rows or column definitions next, stepped over here as
                    # _server_packet steps each (a row: neither EOF/OK nor ERR; a definition:
                    # the count down): they are most of an answer's packets, and the call
                    # most of their cost (issue 21). What ends the run goes the usual way.
                    c = pending[0]
                    st = c.state
                    if st == _ROWS:
                        last = self._seq
                        while plen and h >> 24 == (last + 1) & 0xFF:
                            b0 = data[pos + 4]
                            if b0 == 0xFE or b0 == 0xFF:
                                break
                            c.rows += 1
                            last = h >> 24
                            pos += 4 + plen
                            if pos >= n:
                                self._seq = last
                                return True
                            h = _U32(data, pos)[0]
                            plen = h & 0xFFFFFF
                        self._seq = last
                    elif st == _COLS:
                        last = self._seq
                        while plen and h >> 24 == (last + 1) & 0xFF:
                            last = h >> 24
                            pos += 4 + plen
                            c.left -= 1
                            end = c.left <= 0
                            if end:
                                c.state = _ROWS if self._deprecate_eof else _COLS_EOF
                            if pos >= n:
                                self._seq = last
                                return True
                            h = _U32(data, pos)[0]
                            plen = h & 0xFFFFFF
                            if end:
                                break
                        self._seq = last
                    elif st == _P_PARAMS or st == _P_COLS:
                        # A PREPARE answer's parameter or column definitions but each kind's
                        # last (which ends its part: _server_packet's step).
                        last = self._seq
                        params = st == _P_PARAMS
                        while plen and h >> 24 == (last + 1) & 0xFF and (c.rows if params else c.left) > 1:
                            if params:
                                c.rows -= 1
                            else:
                                c.left -= 1
                            last = h >> 24
                            pos += 4 + plen
                            if pos >= n:
                                self._seq = last
                                return True
                            h = _U32(data, pos)[0]
                            plen = h & 0xFFFFFF
                        self._seq = last
        except _SHORT as e:  # a field overruns its packet's head
            raise Malformed(NAME, "truncated_field", pos, str(e)) from None

    def gap(self, from_client: bool, ts_ns: int) -> None:
        d = 0 if from_client else 1
        if self._zbuf is not None:
            self._zbuf[d].reset()  # a frame was lost: its packets with it
        self._skip[d] = 0
        self._cont[d] = False
        if from_client:
            self._resync_client = True
        self._server_desync = True
        if self._phase != _COMMAND:
            self._phase = _COMMAND
        self._forget("gap")

    def close(self, ts_ns: int, reset: bool = False) -> None:
        # base.py's rule: a command whose answer began (a result set's column count, its
        # rows) is a span of what was seen, marked incomplete; one never answered is counted.
        for i, c in enumerate(self._pending):
            if c.cmd in (COM_QUERY, COM_STMT_EXECUTE):
                if c.state != _FIRST or (i == 0 and self.reply_begun()):
                    self._finish(c, ts_ns, True)
                else:
                    self.cut_short(None, "no_response")
        self._pending.clear()

    def _forget(self, reason: str) -> None:
        for c in self._pending:
            if c.cmd in (COM_QUERY, COM_STMT_EXECUTE):
                self.conn.drop(reason)
        self._pending.clear()

    def _find_command(self, buf: LargeBuffer) -> bool:
        """Release bytes up to the next plausible command packet; False if it needs more."""
        n = len(buf)
        for off in range(min(n, RESYNC_WINDOW)):
            if off + 5 > n:
                break
            plen = buf.u32le_at(off) & 0xFFFFFF
            if buf.u8_at(off + 3) != 0 or off + 4 + plen != n:
                continue
            if _command_at(buf, off + 4, plen):
                if off:
                    self.conn.drop("resync")
                buf.release(off)
                self._resync_client = False
                return True
        if n >= RESYNC_WINDOW:
            buf.release(n)
            self.conn.drop("resync")
        return False

    # -- client ----------------------------------------------------------------------------
    def _client_packet(self, v: memoryview, plen: int, seq: int, ts: int, pos: int) -> None:
        """A client packet: ``v`` is its payload's head (at most ``_CLIENT_HEAD`` bytes), its
        header at ``pos`` (for errors)."""
        if self._phase != _COMMAND:
            if self._phase == _HANDSHAKE:
                if seq == 0 and plen >= 1:
                    self._phase = _COMMAND  # joined after the handshake
                else:
                    return
            else:  # _AUTH
                if seq == 1:
                    self._handshake_response(v)
                return
        if seq != 0:
            # Only LOCAL INFILE contents continue a command from the client side.
            if self._pending and self._pending[0].state == _INFILE and seq == (self._seq + 1) & 0xFF:
                self._seq = seq
                return
            raise Malformed(NAME, "bad_sequence", pos, f"client packet with sequence {seq}")
        if plen == 0:
            raise Malformed(NAME, "bad_command", pos, "empty command packet")
        self._seq = 0
        cmd = v[0]
        if cmd not in _COMMANDS:
            raise Malformed(NAME, "bad_command", pos + 4, f"command {cmd:#x}")
        self._server_desync = False
        if self._deprecate_eof is None and self._pending:
            # Caps unknown (mid-stream): a new command means the last answer ended.
            self._finish(self._pending.popleft(), ts)
        if cmd == COM_QUERY or cmd == COM_STMT_PREPARE:
            q = 1
            if cmd == COM_QUERY and self._qattrs is not False and len(v) > 2:
                q = self._query_start(v)
            # ``v`` is capped at _CLIENT_HEAD: the text after the command byte is within
            # MAX_QUERY_BYTES already, so it is decode_query's copy without the call.
            info = analyze(str(v[q:], "utf-8", "replace"), "mysql", self._sanitize) if q > 0 else None
            c = _Cmd(cmd, info, ts)
        elif cmd == COM_STMT_EXECUTE or cmd == COM_STMT_BULK_EXECUTE:
            sid = _U32(v, 1)[0] if len(v) >= 5 else -1
            c = _Cmd(COM_STMT_EXECUTE, self._stmts.get(sid), ts)
        elif cmd == COM_STMT_CLOSE:
            if len(v) >= 5:
                self._stmts.pop(_U32(v, 1)[0], None)
            return
        elif cmd == COM_INIT_DB:
            c = _Cmd(cmd, None, ts, _text(v, 1, len(v)))
        elif cmd == COM_CHANGE_USER:
            self._phase = _AUTH  # an auth exchange follows, ended by OK/ERR
            return
        elif cmd in _NO_RESPONSE:
            return
        else:
            c = _Cmd(cmd, None, ts)
            if cmd == COM_STMT_FETCH:
                c.state = _ROWS
            elif cmd == COM_FIELD_LIST:
                c.state = _FIELDS
        # Queued for its answer (what _push did, inline: one call fewer a command, issue 21).
        p = self._pending
        p.append(c)
        if len(p) > MAX_PENDING:
            p.popleft()
            self.conn.drop("pending_overflow")

    def _query_start(self, v: memoryview) -> int:
        """Where a COM_QUERY's text starts in ``v`` (its head, from the command byte): after
        its query attributes when they were negotiated (or, joined mid-stream, when the bytes
        are such a block followed by text); 0 when the attributes run past the part we read."""
        end = len(v)
        if self._qattrs is None:
            if v[1] >= 0x20 or v[2] != 1:
                return 1  # text (no attribute block starts with a printable count)
            q = _query_attrs_end(v, 1, end)
            if q < 0 or not _printable(v, q, end):
                return 1
            self._qattrs = True
            return q
        q = _query_attrs_end(v, 1, end)
        if q == -1:
            raise Malformed(NAME, "bad_query_attributes", 0, "query attributes expected")
        return q if q > 0 else 0

    def _handshake_response(self, v: memoryview) -> None:
        end = len(v)
        if end < 4:
            return
        caps = _U32(v, 0)[0]
        if not caps & CLIENT_PROTOCOL_41:
            self._deprecate_eof = False
            self._qattrs = False
            return  # pre-4.1 HandshakeResponse320: no schema worth the trouble
        if caps & CLIENT_SSL:
            # SSLRequest (the 32-byte head of a response): TLS starts now.
            self._stopped = True
            self.conn.drop("tls")
            return
        both = caps & (self._server_caps or 0xFFFFFFFF)
        self._deprecate_eof = bool(both & CLIENT_DEPRECATE_EOF)
        self._qattrs = bool(both & CLIENT_QUERY_ATTRIBUTES)
        if both & (CLIENT_COMPRESS | CLIENT_ZSTD_COMPRESSION_ALGORITHM):
            # The compressed protocol (zlib, or zstd where negotiated) starts after the
            # server's OK to the authentication.
            self._compress = True
        off = 32
        z = _nul(v, off)
        if z < 0:
            return
        self.user = _text(v, off, z)
        off = z + 1
        if off >= end:
            return
        if caps & CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA:
            alen, off = _lenenc(v, off)
        elif caps & CLIENT_SECURE_CONNECTION:
            alen = v[off]
            off += 1
        else:
            z = _nul(v, off)
            alen = (z - off) if z >= 0 else end - off
            off += 1
        off += alen
        if caps & CLIENT_CONNECT_WITH_DB and off < end:
            z = _nul(v, off)
            if z > off:
                self.namespace = _text(v, off, z)

    # -- server ----------------------------------------------------------------------------
    def _server_packet(self, v: memoryview, plen: int, seq: int, ts: int, pos: int) -> None:
        """A server packet: ``v`` is its payload's head (at most ``_SERVER_HEAD`` bytes), its
        header at ``pos`` (for errors), ``ts`` when that header arrived."""
        if self._phase != _COMMAND:
            if self._phase == _HANDSHAKE:
                if seq == 0 and plen and v[0] == PROTOCOL_VERSION:
                    self._greeting(v)
                    self._phase = _AUTH
            elif plen and v[0] in (0x00, 0xFF):  # _AUTH
                self._phase = _COMMAND  # OK: authenticated; ERR: the server will hang up
                self._seq = 0
                if self._compress and v[0] == 0x00:
                    self._zbuf = (LargeBuffer(), LargeBuffer())
            return
        if seq != (self._seq + 1) & 0xFF:
            # Every packet of an answer follows the previous one's sequence id: anything
            # else is not an answer to what we saw (garbage, or a capture that lost bytes).
            raise Malformed(NAME, "bad_sequence", pos, f"server packet {seq} after {self._seq}")
        self._seq = seq
        pending = self._pending
        if not pending:
            self.conn.drop("unpaired")
            return
        if plen == 0:
            return
        c = pending[0]
        b0 = v[0]
        st = c.state
        if st == _ROWS:  # first: a result set's rows are most of an answer's packets
            self._row(c, v, plen, ts, b0)
        elif st == _FIRST:
            # ``c`` is the queue's head here: ending it is popleft and _finish (_done's
            # check and call saved on every command's answer, issue 21).
            cmd = c.cmd
            if cmd == COM_STATISTICS:
                self._pending.popleft()
                self._finish(c, ts)
            elif b0 == 0x00 and (cmd != COM_STMT_PREPARE or len(v) < 9):
                # _ok_status's usual case inline: affected rows and insert id in a byte each
                status = _U16(v, 3)[0] if len(v) >= 5 and v[1] < 0xFB and v[2] < 0xFB else self._ok_status(v)
                if status & SERVER_MORE_RESULTS_EXISTS:
                    return  # an OK ending one result of several (multi-statement, CALL)
                if cmd == COM_INIT_DB:
                    self.namespace = c.arg
                elif cmd == COM_QUERY and c.info is not None and c.info.operation == "USE":
                    self.namespace = _use_target(c.info.text)
                self._pending.popleft()
                self._finish(c, ts)
            elif b0 == 0xFF:
                self._error(c, v)
                self._pending.popleft()
                self._finish(c, ts)
            elif b0 == 0x00:  # PREPARE's OK
                sid, ncols, nparams = _PREPARE_OK(v, 1)
                self._stmts[sid] = c.info
                self._stmts.move_to_end(sid)
                if len(self._stmts) > self._max_stmts:
                    self._stmts.popitem(last=False)
                    self.conn.drop("statement_evicted")
                c.left = ncols
                if nparams:
                    c.state = _P_PARAMS
                    c.rows = nparams  # reused as the params still to skip
                elif ncols:
                    c.state = _P_COLS
                else:
                    self._done(c, ts)
            elif b0 == 0xFE and plen < 9:
                self._done(c, ts)
            elif b0 == 0xFB:
                c.state = _INFILE
            else:
                c.left = b0 if b0 < 0xFB else _lenenc(v, 0)[0]
                c.state = _COLS if c.left else _ROWS
        elif st == _COLS:
            c.left -= 1
            if c.left <= 0:
                c.state = _ROWS if self._deprecate_eof else _COLS_EOF
        elif st == _COLS_EOF:
            c.state = _ROWS
            if not (b0 == 0xFE and plen < 9):
                self._row(c, v, plen, ts, b0)  # no EOF after all: this is a row
        elif st in (_P_PARAMS, _P_COLS):
            if st == _P_PARAMS:
                c.rows -= 1
                if c.rows > 0:
                    return
                c.rows = 0
                nxt_eof = _P_PARAMS_EOF
            else:
                c.left -= 1
                if c.left > 0:
                    return
                nxt_eof = _P_COLS_EOF
            if not self._deprecate_eof:
                c.state = nxt_eof
            elif st == _P_PARAMS and c.left:
                c.state = _P_COLS
            else:
                self._done(c, ts)
        elif st in (_P_PARAMS_EOF, _P_COLS_EOF):
            if st == _P_PARAMS_EOF and c.left:
                c.state = _P_COLS
            else:
                self._done(c, ts)
        elif st == _INFILE:
            if b0 == 0xFF:
                self._error(c, v)
            self._done(c, ts)
        elif st == _FIELDS:
            if b0 == 0xFF:
                self._error(c, v)
                self._done(c, ts)
            elif b0 == 0xFE and plen < 9:
                self._done(c, ts)

    def _row(self, c: _Cmd, v: memoryview, plen: int, ts: int, b0: int) -> None:
        if b0 == 0xFE and (plen < 9 or (self._deprecate_eof and plen < MAX_PACKET_PAYLOAD)):
            if plen < 9 and not self._deprecate_eof:
                more = len(v) >= 5 and _U16(v, 3)[0] & SERVER_MORE_RESULTS_EXISTS
            else:
                more = self._ok_status(v) & SERVER_MORE_RESULTS_EXISTS
            if more:
                c.state = _FIRST
            else:
                self._pending.popleft()  # c is the head (see _server_packet)
                self._finish(c, ts)
        elif b0 == 0xFF:
            self._error(c, v)
            self._pending.popleft()
            self._finish(c, ts)
        else:
            c.rows += 1

    @staticmethod
    def _ok_status(v: memoryview) -> int:
        """An OK packet's (or an EOF-as-OK's) status flags; 0 when its head is cut before them."""
        if len(v) >= 5 and v[1] < 0xFB and v[2] < 0xFB:  # the usual: affected rows and id in a byte each
            return _U16(v, 3)[0]
        try:
            _, off = _lenenc(v, 1)
            _, off = _lenenc(v, off)
            return _U16(v, off)[0] if off + 2 <= len(v) else 0
        except _SHORT:
            return 0

    def _greeting(self, v: memoryview) -> None:
        end = len(v)
        z = _nul(v, 1)
        if z < 0:
            return
        self.server_version = _text(v, 1, z)
        off = z + 1 + 4 + 8 + 1
        if off + 2 <= end:
            caps = _U16(v, off)[0]
            if off + 7 <= end:
                caps |= _U16(v, off + 5)[0] << 16
            self._server_caps = caps

    @staticmethod
    def _error(c: _Cmd, v: memoryview) -> None:
        end = len(v)
        if end < 3:
            c.err_code = -1
            return
        c.err_code = _U16(v, 1)[0]
        off = 3
        if off + 6 <= end and v[off] == 0x23:  # '#' + SQLSTATE
            c.err_state = str(v[off + 1:off + 6], "ascii", "replace")
            off += 6
        c.err_msg = str(v[off:end], "utf-8", "replace")

    def _done(self, c: _Cmd, ts: int) -> None:
        if self._pending and self._pending[0] is c:
            self._pending.popleft()
        self._finish(c, ts)

    def _finish(self, c: _Cmd, ts: int, incomplete: bool = False) -> None:
        cmd = c.cmd
        if cmd in (COM_QUERY, COM_STMT_EXECUTE):
            pass
        elif cmd == COM_PING and self._trace_ping:
            pass
        elif c.err_code and cmd in (COM_STMT_PREPARE, COM_INIT_DB):
            pass
        else:
            return
        info = c.info
        attrs: dict = {"db.system.name": SYSTEM}
        ns = self.namespace
        if ns:
            attrs["db.namespace"] = ns
        name = SYSTEM
        if cmd == COM_PING:
            name = attrs["db.operation.name"] = "PING"
        elif cmd == COM_INIT_DB:
            name = attrs["db.operation.name"] = "USE"
        elif info is not None:
            name = query_attributes(attrs, info, name)
        elif cmd == COM_STMT_EXECUTE:
            name = attrs["db.operation.name"] = "EXECUTE"  # prepared before we joined
        if c.rows and cmd in (COM_QUERY, COM_STMT_EXECUTE):
            attrs["db.response.returned_rows"] = c.rows
        status = _UNSET
        msg = c.err_msg
        if c.err_code:
            attrs["db.response.status_code"] = str(c.err_code)
            attrs["error.type"] = c.err_state or str(c.err_code)
            status = _ERROR
        if msg and self._sanitize_errors:
            msg = sanitize_error(msg)  # (remembered there)
        conn = self.conn
        # Positional, as base.py's span passes them on (keywords cost a third of a call).
        kind = _SERVER_KIND if conn.perspective == _AT_SERVER else _CLIENT_KIND  # conn.kind_for(CLIENT), inline
        span = conn.span(name, kind, c.start, ts, attrs, None, status, msg)
        if incomplete:
            self.cut_short(span)
        else:
            conn.emit(span)


def _text(v: memoryview, off: int, end: int) -> str:
    # Small fields kept on the span (schema, user): a deliberate, bounded copy.
    return str(v[off:off + max(0, min(end - off, MAX_NAME))], "utf-8", "replace")


def _use_target(text: str) -> str:
    parts = text.split()
    return parts[1].strip("`;") if len(parts) > 1 else ""
