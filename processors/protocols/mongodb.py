"""MongoDB wire protocol: OP_MSG, legacy OP_QUERY/OP_REPLY, OP_COMPRESSED.

Contract: processors/protocols/base.py. One CLIENT span per command, paired by
``requestID``/``responseTo`` (any order). BSON is read lazily where it lies in
the ``LargeBuffer``: only the top-level elements a span needs are decoded (the
command's first key and its value, ``$db``; ``ok``, ``errmsg``, ``code``,
``codeName`` in replies) and every other value is stepped over by its declared
size, never parsed, so nesting depth costs nothing and is not recursed into.

A message is processed as it arrives: once its command document is complete,
the rest (OP_MSG document sequences: the inserted documents themselves) is
skipped as bytes come in and released, so a 40 MB insert never sits in memory.
OP_COMPRESSED must be decompressed to be read; that copy is deliberate and
bounded by ``max_decompressed_bytes`` (zlib always; snappy and zstd when
``python-snappy`` / ``zstandard`` are installed, else counted as unsupported).
"""

from __future__ import annotations

import re
import struct
import zlib
from typing import Any, ClassVar

from processors.protocols.base import Conn, Detection, PendingMap, Perspective, ProtocolSettings, Session
from processors.protocols.errors import LimitExceeded, Malformed, Unsupported
from processors.protocols.sanitize import sanitize_error
from service.largebuf import LargeBuffer
from service.model import SpanKind, StatusCode
from service.speedups import load as _load_speedup

NAME = "mongodb"
DEFAULT_PORTS = frozenset({27017, 27018, 27019})

# Opcodes (MongoDB wire protocol reference).
OP_REPLY = 1
OP_QUERY = 2004
OP_COMPRESSED = 2012
OP_MSG = 2013
_OPCODES = frozenset({OP_REPLY, OP_QUERY, OP_COMPRESSED, OP_MSG})

#: The server's maxMessageSizeBytes (48 MB): a larger declared length is not MongoDB.
MAX_MESSAGE = 48_000_000
#: BSON's own document limit (16 MiB) bounds a command document we wait for.
MAX_DOCUMENT = 16 * 1024 * 1024
#: OP_MSG flag bits: checksumPresent, moreToCome, exhaustAllowed; others must be 0.
FLAG_CHECKSUM = 1 << 0
FLAG_MORE_TO_COME = 1 << 1
FLAG_EXHAUST = 1 << 16
_KNOWN_FLAGS = FLAG_CHECKSUM | FLAG_MORE_TO_COME | FLAG_EXHAUST
#: Requests in flight per connection before the oldest is dropped (counted).
MAX_PENDING = 4096
#: Commands of server monitoring: no span unless ``trace_heartbeats``.
_HEARTBEATS = frozenset({"hello", "ismaster", "isMaster"})

_HDR = struct.Struct("<iiii")  # messageLength, requestID, responseTo, opCode

#: The C twin of ``_op_msg`` (processors/protocols/_bson.c), or None (not built, or
#: WIRESPAN_PURE_PYTHON=1): the same flags and fields from the same bytes, or None for
#: anything unusual (an error among them), which the Python walk then reads.
_C = _load_speedup("processors.protocols._bson")
_C_OP_MSG = _C.op_msg if _C is not None else None
_I32 = struct.Struct("<i")
_D = struct.Struct("<d")
_Q = struct.Struct("<q")


class Settings(ProtocolSettings):
    #: Make spans for hello/isMaster monitoring heartbeats.
    trace_heartbeats: bool = False
    #: Largest OP_COMPRESSED payload decompressed (bytes); larger ones are counted and skipped.
    max_decompressed_bytes: int = MAX_DOCUMENT
    #: Replace quoted literals and ``dup key: {...}`` in ``errmsg`` by ``?`` (``sanitize.py``).
    sanitize_errors: bool = True


# ---------------------------------------------------------------------------
# lazy BSON
# ---------------------------------------------------------------------------
#: Fixed value sizes by BSON type; -1: int32-prefixed (string-like: +4 bytes of length),
#: -2: int32 total size (document, array, code-with-scope), -3: binary, -4: regex, -5: DBPointer.
_FIXED = {0x01: 8, 0x06: 0, 0x07: 12, 0x08: 1, 0x09: 8, 0x0A: 0, 0x10: 4, 0x11: 8, 0x12: 8, 0x13: 16,
          0xFF: 0, 0x7F: 0, 0x02: -1, 0x0D: -1, 0x0E: -1, 0x03: -2, 0x04: -2, 0x0F: -2, 0x05: -3,
          0x0B: -4, 0x0C: -5}


#: ``_FIXED`` by type byte (None: not a BSON type): ``_fields_in_view`` indexes it, no dict call.
_SIZES: tuple[int | None, ...] = tuple(_FIXED.get(t) for t in range(256))


def _cstring_end(buf: LargeBuffer, off: int, end: int) -> int:
    z = buf.find(b"\0", off, end)
    if z < 0:
        raise Malformed(NAME, "bad_bson", off, "unterminated key")
    return z


def _value_end(buf: LargeBuffer, t: int, off: int, end: int) -> int:
    """Offset just past a BSON value of type ``t`` at ``off`` (no parsing of its contents)."""
    size = _FIXED.get(t)
    if size is None:
        raise Malformed(NAME, "bad_bson", off, f"type {t:#x}")
    if size >= 0:
        nxt = off + size
    elif size == -1:
        nxt = off + 4 + _i32(buf, off, end)
    elif size == -2:
        nxt = off + _i32(buf, off, end)
    elif size == -3:
        nxt = off + 5 + _i32(buf, off, end)
    elif size == -4:
        nxt = _cstring_end(buf, _cstring_end(buf, off, end) + 1, end) + 1
    else:
        nxt = off + 4 + _i32(buf, off, end) + 12
    if nxt > end:
        raise Malformed(NAME, "bad_bson", off, "value overruns its document")
    return nxt


def _i32(buf: LargeBuffer, off: int, end: int) -> int:
    if off + 4 > end:
        raise Malformed(NAME, "bad_bson", off, "truncated length")
    v = buf.i32le_at(off)
    if v < 0:
        raise Malformed(NAME, "bad_bson", off, "negative length")
    return v


def _string(buf: LargeBuffer, off: int, limit: int = 512) -> str:
    n = buf.i32le_at(off)
    return buf.bytes_at(off + 4, max(0, min(n - 1, limit))).decode("utf-8", "replace")


def _scalar(buf: LargeBuffer, t: int, off: int) -> Any:
    """The few scalar types a span reads (ok, code, names); others -> None."""
    if t == 0x02:
        return _string(buf, off)
    if t == 0x01:
        return _D.unpack(buf.view_at(off, 8))[0]
    if t == 0x10:
        return buf.i32le_at(off)
    if t == 0x12:
        return buf.i64le_at(off)
    if t == 0x08:
        return buf.u8_at(off) != 0
    return None


_I32 = struct.Struct("<i").unpack_from
_U32_AT = struct.Struct("<I").unpack_from
_HDR_AT = _HDR.unpack_from
_I64 = struct.Struct("<q").unpack_from
_D_AT = _D.unpack_from
_NO_NUL = re.compile(rb"[^\0]*").match


#: The key lengths (UTF-8 bytes) of each ``wanted`` set: a key of another length is not
#: decoded (a decoded key equal to a wanted name has its length; see ``_fields_in_view``).
_KEY_LENGTHS: dict[frozenset[str], frozenset[int]] = {}


def _key_lengths(wanted: frozenset[str]) -> frozenset[int]:
    lens = _KEY_LENGTHS.get(wanted)
    if lens is None:
        if len(_KEY_LENGTHS) > 64:
            _KEY_LENGTHS.clear()
        lens = _KEY_LENGTHS[wanted] = frozenset(len(w.encode()) for w in wanted)
    return lens


def _fields_in_view(c: memoryview, p: int, end: int, base: int, wanted: frozenset[str],
                    first: bool, lens: frozenset[int] | None = None) -> dict[str, Any]:
    """``bson_fields``'s walk over a document lying whole in one chunk ``c`` (``c[p - 4:end]``,
    its size and terminator checked): the same fields and the same errors (offsets made
    absolute by ``base``, the chunk's start), read with struct and indexing in place instead
    of a buffer call (a ``find``, a copy) per element: one call for the common document.

    A key is decoded only for the first element and when its length is a wanted name's: a
    key decoding to a wanted (valid UTF-8, U+FFFD-free) name is that name's bytes, so of its
    length, and a key cut at 128 bytes decodes to 32 characters or more, no wanted name.
    ``lens``: ``wanted``'s key lengths, when the caller has them.
    """
    out: dict[str, Any] = {}
    last = end - 1
    sizes = _SIZES
    i32 = _I32
    nonul = _NO_NUL
    if lens is None:
        lens = _key_lengths(wanted)
    while p < last:
        t = c[p]
        z = nonul(c, p + 1, end).end()  # the key's NUL: the terminator at end - 1 bounds it
        vs = z + 1
        size = sizes[t]
        if size is None:
            raise Malformed(NAME, "bad_bson", base + vs, f"type {t:#x}")
        if size >= 0:
            nxt = vs + size
        elif size == -4:  # regex: two cstrings
            q = vs
            for _ in (0, 1):
                at = q
                while q < end and c[q]:
                    q += 1
                if q >= end:
                    raise Malformed(NAME, "bad_bson", base + at, "unterminated key")
                q += 1
            nxt = q
        else:
            if vs + 4 > end:
                raise Malformed(NAME, "bad_bson", base + vs, "truncated length")
            n = i32(c, vs)[0]
            if n < 0:
                raise Malformed(NAME, "bad_bson", base + vs, "negative length")
            nxt = vs + (n if size == -2 else 4 + n if size == -1 else 5 + n if size == -3 else 16 + n)
        if nxt > end:
            raise Malformed(NAME, "bad_bson", base + vs, "value overruns its document")
        if first or z - p - 1 in lens:
            name = str(c[p + 1:z if z - p < 129 else p + 129], "utf-8", "replace")  # 128 bytes at most
            keep = name in wanted and name not in out
            if first or keep:
                if t == 0x02:
                    n = i32(c, vs)[0] - 1  # its bytes less the NUL, 512 at most read
                    val: Any = str(c[vs + 4:vs + 4 + (n if 0 <= n <= 512 else 0 if n < 0 else 512)], "utf-8",
                                   "replace")
                elif t == 0x01:
                    val = _D_AT(c, vs)[0]
                elif t == 0x10:
                    val = i32(c, vs)[0]
                elif t == 0x12:
                    val = _I64(c, vs)[0]
                elif t == 0x08:
                    val = c[vs] != 0
                else:
                    val = None
                if first:
                    out[""] = (name, val)
                    first = False
                if keep:
                    out[name] = val
        p = nxt
    if p != last:
        raise Malformed(NAME, "bad_bson", base + p, "elements overrun the document")
    return out


def bson_fields(buf: LargeBuffer, off: int, wanted: frozenset[str], first: bool = True) -> tuple[dict[str, Any], int]:
    """Top-level fields of the document at ``off``: the first element (as ``""`` -> (name, value))
    and the ``wanted`` names. Returns (fields, document end).
    """
    if 0 <= off and off + 4 <= len(buf):
        c, cs = buf.chunk_at(off)
        rel = off - cs
        if rel + 4 <= len(c):
            size = _I32(c, rel)[0]
            if 5 <= size <= len(c) - rel and c[rel + size - 1] == 0:
                return _fields_in_view(c, rel + 4, rel + size, cs, wanted, first), off + size
    size = _i32(buf, off, len(buf))
    end = off + size
    if size < 5 or end > len(buf):
        raise Malformed(NAME, "bad_bson", off, "document size")
    if buf.u8_at(end - 1) != 0:
        raise Malformed(NAME, "bad_bson", end - 1, "missing terminator")
    out: dict[str, Any] = {}
    p = off + 4
    is_first = first
    while p < end - 1:
        t = buf.u8_at(p)
        z = _cstring_end(buf, p + 1, end)
        name = buf.bytes_at(p + 1, min(z - p - 1, 128)).decode("utf-8", "replace")
        vstart = z + 1
        vend = _value_end(buf, t, vstart, end)
        if is_first:
            out[""] = (name, _scalar(buf, t, vstart))
            is_first = False
        if name in wanted and name not in out:
            out[name] = _scalar(buf, t, vstart)
        p = vend
    if p != end - 1:
        raise Malformed(NAME, "bad_bson", p, "elements overrun the document")
    return out, end


# ---------------------------------------------------------------------------
# detection
# ---------------------------------------------------------------------------
#: An OP_MSG's header, flags, first section's kind and size: what ``detect`` checks, one unpack.
_MSG_START = struct.Struct("<iiiiIBi").unpack_from
_REQUEST = Detection.REQUEST
_RESPONSE = Detection.RESPONSE
_NO = Detection.NO


def detect(buf: LargeBuffer, from_client: bool | None) -> Detection:
    if len(buf) < 16:
        return Detection.NEED_MORE
    c, _cs = buf.chunk_at(0)
    if len(c) >= 26:  # the usual first segment: an OP_MSG's checks below in one unpack, no buffer calls
        length, _, resp_to, op, flags, kind, dsize = _MSG_START(c, 0)
        if op == OP_MSG:
            if not 16 < length <= MAX_MESSAGE or flags & ~_KNOWN_FLAGS or not 0 <= kind <= 1 \
                    or not 5 <= dsize <= length - 21 or (kind == 0 and c[25] not in _FIXED):
                return _NO
            return _REQUEST if resp_to == 0 else _RESPONSE
    length, _, resp_to, op = _HDR.unpack(buf.view_at(0, 16))
    if op not in _OPCODES or not 16 < length <= MAX_MESSAGE:
        return Detection.NO
    if op == OP_MSG:
        if len(buf) < 26:
            return Detection.NEED_MORE
        flags = buf.u32le_at(16)
        kind = buf.u8_at(20)
        if flags & ~_KNOWN_FLAGS or kind not in (0, 1):
            return Detection.NO
        dsize = buf.i32le_at(21)
        if not 5 <= dsize <= length - 21:
            return Detection.NO
        if kind == 0 and len(buf) >= 26 and buf.u8_at(25) not in _FIXED:
            return Detection.NO
    elif op == OP_QUERY:
        if resp_to != 0:
            return Detection.NO
        if len(buf) < 24:
            return Detection.NEED_MORE
        z = buf.find(b"\0", 20, min(len(buf), 20 + 256))
        if z < 0:
            return Detection.NEED_MORE if len(buf) < 276 else Detection.NO
        ns = bytes(buf.view_at(20, z - 20))  # namespace: <= 256 bytes
        if b"." not in ns or not ns.isascii():
            return Detection.NO
        return Detection.REQUEST
    elif op == OP_REPLY:
        return Detection.RESPONSE if resp_to != 0 else Detection.NO
    if resp_to == 0:
        return Detection.REQUEST
    return Detection.RESPONSE


def _zstd_decompress(data: memoryview, limit: int) -> bytes:
    """zstd through ``zstandard`` or the stdlib-style ``backports.zstd`` (what pymongo uses)."""
    try:
        import zstandard  # type: ignore[import-not-found]
        return zstandard.ZstdDecompressor().decompress(bytes(data), max_output_size=limit)  # codec wants bytes
    except ImportError:
        from backports.zstd import ZstdDecompressor  # type: ignore[import-not-found]
        return ZstdDecompressor().decompress(data, max_length=limit)


def _op_msg(data: memoryview, ms: int, length: int, reply: bool) -> tuple[int, dict[str, Any]]:
    """The flags and command (or reply, ``reply``) document fields of a whole OP_MSG lying at
    ``data[ms:ms + length]``: ``Session._parse``'s reading, with its errors at its offsets (from
    the message's start, as ``_parse`` has them with the message at the buffer's start); a
    "need more" of ``_parse`` is ``_body``'s ``bad_message`` here, the message being whole.
    The reference of _bson.c's ``op_msg`` (tests/test_mongodb_speedup.py holds them equal)."""
    if length < 21:
        raise Malformed(NAME, "bad_message", 0)
    flags = _U32_AT(data, ms + 16)[0]
    if flags & ~_KNOWN_FLAGS:
        raise Malformed(NAME, "bad_flags", 16)
    p = 20
    end = length - 4 if flags & FLAG_CHECKSUM else length
    while p < end:
        if p + 5 > length:
            raise Malformed(NAME, "bad_message", 0)
        kind = data[ms + p]
        size = _I32(data, ms + p + 1)[0]
        if size < 5 or size > MAX_DOCUMENT + 1024:
            raise LimitExceeded(NAME, "section_size", p)
        if kind == 0:
            if p + 1 + size > length:
                raise Malformed(NAME, "bad_message", 0)
            # bson_fields' checks of this document: its size is the section's (>= 5, inside
            # the message), so only its terminator is left to check.
            doc = ms + p + 1
            if data[doc + size - 1] != 0:
                raise Malformed(NAME, "bad_bson", p + size, "missing terminator")
            if reply:
                return flags, _fields_in_view(data, doc + 4, doc + size, -ms, _REPLY_FIELDS, True, _REPLY_LENGTHS)
            return flags, _fields_in_view(data, doc + 4, doc + size, -ms, _CMD_FIELDS, True, _CMD_LENGTHS)
        if kind != 1:
            raise Malformed(NAME, "bad_section", p, f"kind {kind}")
        p += 1 + size  # a document sequence: skipped, not read
    raise Malformed(NAME, "no_body", p)


# ---------------------------------------------------------------------------
# session
# ---------------------------------------------------------------------------
class _Msg:
    """What one message said, as far as a span cares."""

    __slots__ = ("cmd", "coll", "db", "error", "flags", "ok", "op", "req_id", "resp_to", "start_ts")

    def __init__(self, req_id: int, resp_to: int, op: int, start_ts: int) -> None:
        self.req_id = req_id
        self.resp_to = resp_to
        self.op = op
        self.start_ts = start_ts
        self.flags = 0
        self.cmd = ""
        self.coll: str | None = None
        self.db: str | None = None
        self.ok: Any = None
        self.error: tuple[Any, str, str] | None = None  # (code, codeName, errmsg)


class _Dir:
    """Per-direction progress through the current message."""

    __slots__ = ("msg", "remaining", "skip")

    def __init__(self) -> None:
        self.msg: _Msg | None = None
        self.remaining = 0   # bytes of the current message not yet consumed
        self.skip = 0        # bytes to pass over as they arrive


_UNSET = StatusCode.UNSET
_ERROR = StatusCode.ERROR
_SERVER = Perspective.SERVER
_SERVER_KIND = SpanKind.SERVER
_CLIENT_KIND = SpanKind.CLIENT
_REPLY_FIELDS = frozenset({"ok", "errmsg", "code", "codeName", "$err"})
_CMD_FIELDS = frozenset({"$db", "collection"})
_REPLY_LENGTHS = _key_lengths(_REPLY_FIELDS)
_CMD_LENGTHS = _key_lengths(_CMD_FIELDS)
#: Commands whose first value is not a collection though it may be a string: user and role
#: management (the user's or role's name), authentication, parameters, sessions and admin
#: commands (MongoDB's database command reference). ping, hello, isMaster, buildInfo...
#: take a number there, which is never a collection anyway. getMore takes a cursor id and
#: names its collection in its ``collection`` field.
_NOT_COLLECTION_CMDS = frozenset({
    "createUser", "dropUser", "updateUser", "usersInfo", "grantRolesToUser", "revokeRolesFromUser",
    "createRole", "dropRole", "updateRole", "rolesInfo", "grantRolesToRole", "revokeRolesFromRole",
    "grantPrivilegesToRole", "revokePrivilegesFromRole", "dropAllUsersFromDatabase", "dropAllRolesFromDatabase",
    "authenticate", "saslStart", "saslContinue", "logout", "getParameter", "setParameter",
    "setFeatureCompatibilityVersion", "getDefaultRWConcern", "setDefaultRWConcern",
    "endSessions", "killSessions", "killAllSessions", "refreshSessions", "startSession", "commitTransaction",
    "abortTransaction", "ping", "hello", "isMaster", "ismaster", "buildInfo", "buildinfo", "serverStatus",
    "hostInfo", "whatsmyuri", "getCmdLineOpts", "connectionStatus", "replSetGetStatus", "replSetGetConfig",
    "listDatabases", "dropDatabase", "listCollections", "dbStats", "currentOp", "killOp", "fsync",
    "shutdown", "explain", "getMore", "enableSharding", "addShard", "removeShard", "balancerStart",
    "balancerStop", "movePrimary", "flushRouterConfig", "logRotate", "setProfilingLevel", "profile",
})


def _command_fields(m: _Msg, f: dict[str, Any]) -> None:
    """A command's name, collection and database from its document's fields."""
    if "" in f:
        m.cmd, val = f[""]
        m.coll = val if isinstance(val, str) and m.cmd not in _NOT_COLLECTION_CMDS else None
        if m.cmd == "getMore" and isinstance(f.get("collection"), str):
            m.coll = f["collection"]
    m.db = f.get("$db")


def _reply_fields(m: _Msg, f: dict[str, Any]) -> None:
    """A reply's ``ok`` and error from its document's fields."""
    m.ok = f.get("ok")
    if "$err" in f:  # legacy OP_REPLY query failure
        m.ok = 0
    if m.ok is not None and m.ok != 1:
        m.error = (f.get("code"), f.get("codeName") or "", f.get("errmsg") or f.get("$err") or "")


class Session(Session):  # type: ignore[no-redef]
    protocol: ClassVar[str] = NAME

    def __init__(self, conn: Conn) -> None:
        self.conn = conn  # Session.__init__, without the call (one a connection)
        settings = conn.settings
        self.settings: Settings = settings if isinstance(settings, Settings) else Settings()
        self.dirs = (_Dir(), _Dir())  # server, client
        self.pending: dict[int, _Msg] = PendingMap(conn)
        #: requestIDs of moreToCome replies: their follow-ups are expected (made at the first)
        self.exhaust: set[int] | None = None

    def feed(self, from_client: bool, buf: LargeBuffer, ts_ns: int) -> None:
        d = self.dirs[from_client]
        while True:
            if d.skip:
                take = min(d.skip, len(buf))
                buf.release(take)
                d.skip -= take
                d.remaining -= take
                if d.skip:
                    return
                if d.remaining == 0 and d.msg is not None:
                    self._done(from_client, d.msg, ts_ns)
                    d.msg = None
                continue
            if d.msg is None:
                if len(buf) < 16:
                    buf.want = 16
                    return
                length, req_id, resp_to, op = _HDR.unpack(buf.view_at(0, 16))
                if op not in _OPCODES or not 16 < length <= MAX_MESSAGE:
                    raise Malformed(NAME, "bad_header", 0, f"length {length} opcode {op}")
                d.msg = _Msg(req_id, resp_to, op, buf.ts_at(0))
                d.remaining = length
            if not self._body(d, buf, ts_ns, from_client):
                return

    def feed_whole(self, from_client: bool, data: memoryview, ts_ns: int) -> bool:
        """A segment of whole OP_MSG messages (base.py's contract), read in place without a buffer.

        Taken only between messages (nothing of this direction half read or being skipped)
        and when the framing holds: each header's length and opcode as ``feed`` checks them,
        every message an OP_MSG, the last ending exactly with the segment. Then each message
        has ``feed``'s effects in order (``_msg_in_view`` reads what ``_parse`` reads, with the
        same errors at the same offsets, and the direction holds the message while it is read,
        as ``close`` may look). Anything else (legacy opcodes, OP_COMPRESSED, a message across
        segments, a bad header) returns False unchanged.
        """
        d = self.dirs[from_client]
        if d.msg is not None or d.skip:
            return False
        if type(data) is not memoryview:  # the eBPF receiver's payloads are bytes
            data = memoryview(data)
        n = len(data)
        if n < 16:
            return False
        length, req_id, resp_to, op = _HDR_AT(data, 0)
        if op != OP_MSG or not 16 < length <= MAX_MESSAGE:
            return False
        if length == n:  # the usual segment: one message
            m = _Msg(req_id, resp_to, OP_MSG, ts_ns)
            try:
                self._msg_in_view(m, data, 0, length)
            except BaseException:
                # what the loop below leaves when a read fails: the direction holds the message
                d.msg = m
                d.remaining = length
                raise
            self._done(from_client, m, ts_ns)
            return True
        else:
            msgs = []
            off = 0
            while off < n:
                if off + 16 > n:
                    return False
                length, req_id, resp_to, op = _HDR_AT(data, off)
                if op != OP_MSG or not 16 < length <= MAX_MESSAGE:
                    return False
                msgs.append((off, length, req_id, resp_to))
                off += length
            if off != n:
                return False
        for off, length, req_id, resp_to in msgs:
            m = _Msg(req_id, resp_to, OP_MSG, ts_ns)
            d.msg = m
            d.remaining = length
            self._msg_in_view(m, data, off, length)
            d.msg = None
            d.remaining = 0
            self._done(from_client, m, ts_ns)
        return True

    def _msg_in_view(self, m: _Msg, data: memoryview, ms: int, length: int) -> None:
        """``_parse`` of a whole OP_MSG lying at ``data[ms:ms + length]``: ``_C.op_msg`` reads
        the usual message, ``_op_msg`` (the reference) the rest and raises its errors."""
        reply = m.resp_to != 0
        r = _C_OP_MSG(data, ms, length, reply) if _C_OP_MSG is not None else None
        if r is None:
            r = _op_msg(data, ms, length, reply)
        m.flags, f = r
        if reply:
            _reply_fields(m, f)
        else:
            _command_fields(m, f)

    def _body(self, d: _Dir, buf: LargeBuffer, ts_ns: int, from_client: bool) -> bool:
        """Read what a span needs from the message at the front of ``buf``; False = need more bytes."""
        m = d.msg
        assert m is not None
        length = d.remaining
        if m.op == OP_COMPRESSED:
            if len(buf) < length:
                buf.want = length
                return False
            inner = self._decompress(buf, length)
            if inner is not None:
                im = _Msg(m.req_id, m.resp_to, inner.i32le_at(12), m.start_ts)
                if self._parse(im, inner, len(inner)):
                    raise Malformed(NAME, "bad_compressed_message", 0)
                d.msg = im
            d.skip = length
            return True
        need = self._parse(m, buf, min(length, len(buf)))
        if need:
            if len(buf) >= length:  # the whole message is here and still not parseable
                raise Malformed(NAME, "bad_message", 0)
            buf.want = min(need, length)
            return False
        d.skip = length
        return True

    def _parse(self, m: _Msg, buf: LargeBuffer, avail: int) -> int:
        """Fill ``m`` from the message at offset 0: 0 when done, else how many bytes of the
        message must be there first (so the stage need not call again before)."""
        if m.op == OP_MSG:
            if avail < 21:
                return 21
            m.flags = buf.u32le_at(16)
            if m.flags & ~_KNOWN_FLAGS:
                raise Malformed(NAME, "bad_flags", 16)
            p = 20
            end = buf.i32le_at(0) - (4 if m.flags & FLAG_CHECKSUM else 0)
            while p < end:
                if p + 5 > avail:
                    return p + 5
                kind = buf.u8_at(p)
                size = buf.i32le_at(p + 1)
                if size < 5 or size > MAX_DOCUMENT + 1024:
                    raise LimitExceeded(NAME, "section_size", p)
                if kind == 0:
                    if p + 1 + size > avail:
                        return p + 1 + size
                    self._command_doc(m, buf, p + 1)
                    return 0
                if kind != 1:
                    raise Malformed(NAME, "bad_section", p, f"kind {kind}")
                p += 1 + size  # a document sequence: skipped, not read
            raise Malformed(NAME, "no_body", p)
        if m.op == OP_QUERY:
            z = buf.find(b"\0", 20, avail)
            if z < 0:
                return avail + 1
            ns = buf.bytes_at(20, min(z - 20, 512)).decode("utf-8", "replace")
            q = z + 1 + 8
            if q + 4 > avail:
                return q + 4
            if q + buf.i32le_at(q) > avail:
                return q + buf.i32le_at(q)
            self._command_doc(m, buf, q)
            db, _, coll = ns.partition(".")
            m.db = m.db or db
            if coll != "$cmd":  # a legacy query on a collection, not a command
                m.cmd, m.coll = "find", coll
            return 0
        if m.op == OP_REPLY:
            if avail < 36:
                return 36
            if buf.i32le_at(32) == 0 or buf.i32le_at(0) <= 36:
                m.ok = 1
                return 0
            if 36 + 4 > avail:
                return 40
            if 36 + buf.i32le_at(36) > avail:
                return 36 + buf.i32le_at(36)
            self._reply_doc(m, buf, 36)
            return 0
        raise Unsupported(NAME, "opcode", 12, str(m.op))

    def _command_doc(self, m: _Msg, buf: LargeBuffer, off: int) -> None:
        if m.resp_to:  # a reply (OP_MSG answers are OP_MSG too)
            self._reply_doc(m, buf, off)
            return
        _command_fields(m, bson_fields(buf, off, _CMD_FIELDS)[0])

    def _reply_doc(self, m: _Msg, buf: LargeBuffer, off: int) -> None:
        _reply_fields(m, bson_fields(buf, off, _REPLY_FIELDS)[0])

    def _decompress(self, buf: LargeBuffer, length: int) -> LargeBuffer | None:
        if length < 25:  # the header, original opcode, uncompressed size and compressor id
            raise Malformed(NAME, "bad_header", 0, f"OP_COMPRESSED of {length} bytes")
        orig_op = buf.i32le_at(16)
        usize = buf.i32le_at(20)
        comp = buf.u8_at(24)
        if usize < 0 or usize > self.settings.max_decompressed_bytes:
            self.conn.drop("decompressed_too_large")
            return None
        data = buf.view_at(25, length - 25)  # may be a scratch view: decompressed at once
        try:
            if comp == 2:
                d = zlib.decompressobj()
                raw = d.decompress(data, usize + 1)
            elif comp == 1:
                import snappy  # type: ignore[import-not-found]
                raw = snappy.uncompress(bytes(data))  # the codec needs bytes: deliberate copy
            elif comp == 3:
                raw = _zstd_decompress(data, usize + 1)
            elif comp == 0:
                raw = bytes(data)
            else:
                self.conn.drop("unknown_compressor")
                return None
        except ImportError:
            self.conn.drop("compressor_unavailable")
            return None
        except Exception:  # any codec failure is bad input, counted
            self.conn.drop("decompression_failed")
            return None
        if len(raw) != usize:
            self.conn.drop("decompression_failed")
            return None
        # Rebuild a header so the inner message parses like any other (16 bytes, small).
        inner = LargeBuffer(_HDR.pack(usize + 16, buf.i32le_at(4), buf.i32le_at(8), orig_op), raw)
        return inner

    # -- pairing and spans ------------------------------------------------
    def _done(self, from_client: bool, m: _Msg, ts_ns: int) -> None:
        pending = self.pending
        if not m.resp_to:
            if len(pending) >= MAX_PENDING:
                pending.pop(next(iter(pending)))
                self.conn.drop("too_many_pending")
            if m.flags & FLAG_MORE_TO_COME and m.op == OP_MSG:
                self._span(m, None, ts_ns)  # no reply will come (unacknowledged write)
            else:
                pending[m.req_id] = m
            return
        req = pending.pop(m.resp_to, None)
        exhaust = self.exhaust
        if m.flags & FLAG_MORE_TO_COME:  # the server will send the next batch unasked
            if exhaust is None:
                exhaust = self.exhaust = set()
            exhaust.add(m.req_id)
        if req is None:
            if exhaust is not None and m.resp_to in exhaust:
                exhaust.discard(m.resp_to)
                return
            self.conn.drop("unpaired_reply")
            return
        self._span(req, m, ts_ns)

    def _span(self, req: _Msg, rep: _Msg | None, end_ts: int, incomplete: bool = False) -> None:
        if req.cmd in _HEARTBEATS and not self.settings.trace_heartbeats:
            return
        conn = self.conn
        op = req.cmd or "unknown"
        attrs: dict[str, object] = {"db.system.name": "mongodb", "db.operation.name": op}
        name = op
        if req.coll:
            attrs["db.collection.name"] = req.coll
            name = f"{op} {req.coll}"
        if req.db:
            attrs["db.namespace"] = req.db
        status = _UNSET
        msg = ""
        if rep is not None and rep.error is not None:
            code, code_name, errmsg = rep.error
            if self.settings.sanitize_errors:
                errmsg = sanitize_error(errmsg)
            status = _ERROR
            msg = f"{code_name}: {errmsg}" if code_name else errmsg
            if code is not None:
                attrs["db.response.status_code"] = str(code)
            attrs["error.type"] = code_name or (str(code) if code is not None else "error")
        # conn.kind_for(CLIENT), without the call: SERVER only for a traced server process
        kind = _SERVER_KIND if conn.perspective == _SERVER else _CLIENT_KIND
        span = conn.span(name, kind, req.start_ts, end_ts, attrs, None, status, msg)
        if incomplete:
            self.cut_short(span)
        else:
            conn.emit(span)

    def gap(self, from_client: bool, ts_ns: int) -> None:
        d = self.dirs[from_client]
        d.msg = None
        d.skip = d.remaining = 0
        if not from_client and self.pending:
            # Replies lost: requests waiting on them will never be paired.
            for _ in self.pending:
                self.conn.drop("gap")
            self.pending.clear()

    def close(self, ts_ns: int, reset: bool = False) -> None:
        # base.py's rule: a request whose reply began (its header read, its body cut by the
        # end) is a span of what was seen, marked incomplete; one never answered is counted.
        if not self.pending:
            return  # nothing awaits a reply (what follows would find nothing to do)
        begun = set()
        m = self.dirs[0].msg
        if m is not None and m.resp_to:
            begun.add(m.resp_to)
        buf = self.conn.server_buf
        if len(buf) >= 12:
            begun.add(buf.i32le_at(8))
        elif not begun and self.reply_begun():  # a header cut before its responseTo: the oldest's
            begun.add(next(iter(self.pending)))
        for rid, req in self.pending.items():
            if rid in begun:
                self._span(req, None, ts_ns, True)
            else:
                self.cut_short(None, "no_reply")
        self.pending.clear()
