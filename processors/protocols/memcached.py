"""memcached (binary and text protocols) and Couchbase KV (the binary protocol's superset).

Contract: processors/protocols/base.py. One CLIENT span per command.

Binary: the 24-byte header is read in place (classic magics 0x80/0x81, and
Couchbase's alternative framing 0x08/0x18 with framing extras); the key is read
(small, bounded), values are stepped over as they arrive and released. Pairing
is by ``opaque``; quiet opcodes (GETQ, GETKQ, SETQ, ...) are answered only on a
miss/error, so when a later request's response arrives, every quiet request sent
before it is complete (a GETQ with no answer was a miss, a SETQ a success), as
the protocol's in-order processing guarantees; NOOP is the usual fence.

Text: command lines (``get``, ``set``, ``cas``, ``incr``, ``delete``, ``touch``,
``gat``, meta ``mg``/``ms``/``md``/``ma``...) paired with replies in order; data
blocks are skipped by their declared length; ``noreply`` commands end at once.

A GET-family miss is not an error; other non-success statuses are. The
connection is Couchbase (``db.system.name`` = ``couchbase``) once it shows
Couchbase traits: SELECT_BUCKET (its key is ``db.namespace``), HELLO with the
collections feature, alternative framing, or collection-id operations.
"""

from __future__ import annotations

import re
import struct
from collections import deque
from functools import partial
from typing import Any, ClassVar

from processors.protocols.base import Conn, Detection, PendingQueue, Perspective, ProtocolSettings, Session
from processors.protocols.errors import LimitExceeded, Malformed, ProtocolError
from service.largebuf import LargeBuffer
from service.model import SpanKind, StatusCode
from service.speedups import load as _load_speedup

#: The C walker of feed_whole's segments (_memcache.c), or None: ``_walk`` then does the same.
_C = _load_speedup("processors.protocols._memcache")
#: Its text-line walker (``_text_walk`` in C), or None.
_C_TEXT = getattr(_C, "text_walk", None)

NAME = "memcached"
DEFAULT_PORTS = frozenset({11211, 11210, 11207})

REQ, RES, ALT_REQ, ALT_RES = 0x80, 0x81, 0x08, 0x18
_MAGICS = (REQ, ALT_REQ, RES, ALT_RES)
_HDR = struct.Struct(">BBHBBHIIQ")  # magic, opcode, keylen, extlen, datatype, vbucket|status, bodylen, opaque, cas

#: Keys are at most 250 bytes (memcached) and 250 + collection prefix (Couchbase); more is malformed.
MAX_KEY = 255 + 8
#: A binary body larger than this is refused (Couchbase's max document is 20 MiB).
MAX_BODY = 64 * 1024 * 1024
#: Longest text command line (memcached's own limit for a key line is 2048 bytes).
MAX_LINE = 8192
#: Requests in flight per connection.
MAX_PENDING = 8192

# opcode -> (name, quiet, get-family)
_OPS: dict[int, tuple[str, bool, bool]] = {
    0x00: ("GET", False, True), 0x01: ("SET", False, False), 0x02: ("ADD", False, False),
    0x03: ("REPLACE", False, False), 0x04: ("DELETE", False, False), 0x05: ("INCREMENT", False, False),
    0x06: ("DECREMENT", False, False), 0x07: ("QUIT", False, False), 0x08: ("FLUSH", False, False),
    0x09: ("GETQ", True, True), 0x0A: ("NOOP", False, False), 0x0B: ("VERSION", False, False),
    0x0C: ("GETK", False, True), 0x0D: ("GETKQ", True, True), 0x0E: ("APPEND", False, False),
    0x0F: ("PREPEND", False, False), 0x10: ("STAT", False, False), 0x11: ("SETQ", True, False),
    0x12: ("ADDQ", True, False), 0x13: ("REPLACEQ", True, False), 0x14: ("DELETEQ", True, False),
    0x15: ("INCREMENTQ", True, False), 0x16: ("DECREMENTQ", True, False), 0x17: ("QUITQ", True, False),
    0x18: ("FLUSHQ", True, False), 0x19: ("APPENDQ", True, False), 0x1A: ("PREPENDQ", True, False),
    0x1B: ("VERBOSITY", False, False), 0x1C: ("TOUCH", False, False), 0x1D: ("GAT", False, True),
    0x1E: ("GATQ", True, True), 0x1F: ("HELLO", False, False), 0x20: ("SASL_LIST_MECHS", False, False),
    0x21: ("SASL_AUTH", False, False), 0x22: ("SASL_STEP", False, False),
    # Couchbase KV
    0x83: ("GET_REPLICA", False, True), 0x89: ("SELECT_BUCKET", False, False),
    0x91: ("OBSERVE_SEQNO", False, False), 0x92: ("OBSERVE", False, False),
    0x94: ("GET_LOCKED", False, True), 0x95: ("UNLOCK_KEY", False, False),
    0xA0: ("SUBDOC_GET", False, True), 0xA1: ("SUBDOC_EXISTS", False, True),
    0xA2: ("SUBDOC_DICT_ADD", False, False), 0xA3: ("SUBDOC_DICT_UPSERT", False, False),
    0xA4: ("SUBDOC_DELETE", False, False), 0xA5: ("SUBDOC_REPLACE", False, False),
    # Couchbase's opcode table (kv_engine include/mcbp/protocol/opcode.h):
    # 0xBA CollectionsGetManifest, 0xBB CollectionsGetID.
    0xB5: ("GET_CLUSTER_CONFIG", False, False), 0xBA: ("GET_COLLECTIONS_MANIFEST", False, False),
    0xBB: ("GET_COLLECTION_ID", False, False), 0xD0: ("SUBDOC_MULTI_LOOKUP", False, True),
    0xD1: ("SUBDOC_MULTI_MUTATION", False, False), 0xFE: ("GET_ERROR_MAP", False, False),
}
#: Opcodes whose key carries no collection id (bucket names, SASL, HELLO's agent name...).
_NO_CID_OPS = frozenset({0x89, 0x1F, 0xBA, 0xBB, 0xB5, 0x20, 0x21, 0x22, 0xFE})
_COUCHBASE_OPS = frozenset({0x83, 0x89, 0x91, 0x92, 0x94, 0x95, 0xA0, 0xA1, 0xA2, 0xA3, 0xA4, 0xA5, 0xB5,
                            0xBA, 0xBB, 0xD0, 0xD1, 0xFE})
_STATUS = {
    0x00: "SUCCESS", 0x01: "KEY_ENOENT", 0x02: "KEY_EEXISTS", 0x03: "E2BIG", 0x04: "EINVAL",
    0x05: "NOT_STORED", 0x06: "DELTA_BADVAL", 0x07: "NOT_MY_VBUCKET", 0x08: "NO_BUCKET", 0x09: "LOCKED",
    0x1F: "AUTH_STALE", 0x20: "AUTH_ERROR", 0x21: "AUTH_CONTINUE", 0x22: "ERANGE", 0x24: "EACCESS",
    0x81: "UNKNOWN_COMMAND", 0x82: "ENOMEM", 0x83: "NOT_SUPPORTED", 0x84: "EINTERNAL", 0x85: "EBUSY",
    0x86: "ETMPFAIL", 0x88: "UNKNOWN_COLLECTION", 0xC0: "SUBDOC_PATH_ENOENT",
}
#: HELLO feature 0x12: collections (the key starts with a LEB128 collection id).
_FEATURE_COLLECTIONS = 0x12
# Enum members read once: ``Detection.NO`` is a descriptor lookup (~0.2 us), several a
# connection on the paths below (issue 21).
_NO, _NEED_MORE, _REQUEST, _RESPONSE = Detection.NO, Detection.NEED_MORE, Detection.REQUEST, Detection.RESPONSE
_CLIENT, _SERVER_KIND, _SERVER_VIEW = SpanKind.CLIENT, SpanKind.SERVER, Perspective.SERVER
_UNSET, _ERROR = StatusCode.UNSET, StatusCode.ERROR
_SUCCESS_LIKE = frozenset({0x00, 0x21})  # AUTH_CONTINUE is a step, not a failure
#: Connection set-up (HELLO, SASL, SELECT_BUCKET, error map, cluster config, collection
#: manifest and ids): a span only when it fails, as MySQL's COM_INIT_DB.
_SETUP_OPS = frozenset({0x1F, 0x20, 0x21, 0x22, 0x89, 0xB5, 0xBA, 0xBB, 0xFE})

_TEXT_STORAGE = frozenset({b"set", b"add", b"replace", b"append", b"prepend", b"cas"})
_TEXT_GET = frozenset({b"get", b"gets", b"gat", b"gats", b"mg"})
_TEXT_CMDS = _TEXT_STORAGE | _TEXT_GET | frozenset({
    b"incr", b"decr", b"delete", b"touch", b"version", b"stats", b"flush_all", b"verbosity", b"quit",
    b"ms", b"md", b"ma", b"mn", b"me", b"cache_memlimit", b"shutdown", b"lru_crawler", b"slabs", b"watch",
})
_TEXT_ERRORS = (b"ERROR", b"CLIENT_ERROR", b"SERVER_ERROR")
#: Replies that end a text command (multi-line replies end with END).
_TEXT_FINAL = frozenset({b"STORED", b"NOT_STORED", b"EXISTS", b"NOT_FOUND", b"DELETED", b"TOUCHED", b"OK",
                         b"END", b"RESET", b"HD", b"NF", b"NS", b"EX", b"EN", b"MN"})


class Settings(ProtocolSettings):
    #: Show keys in db.query.text (off by default: keys often carry user ids or emails).
    show_keys: bool = False


def _unknown_op(op: int) -> tuple[str, bool, bool]:
    """An opcode _OPS does not name: (name, quiet, get family). A function, not ``get``'s
    default, so the name is only formatted for an unknown opcode, not for every packet."""
    return f"OP_{op:#04x}", False, False


def detect(buf: LargeBuffer, from_client: bool | None) -> Detection:
    n = len(buf)
    if n == 0:
        return _NEED_MORE
    # The first chunk, read in place: a connection's first packet is usually all in it, so
    # its header is one unpack, not a view_at and a byte read (once a connection: issue 21).
    # (The buffer's own list, as the stage reads it: chunk_at's lookup is three calls.)
    c = buf._chunks[0]
    m0 = c[0]
    if m0 in _MAGICS:
        if n < 24:
            return _NEED_MORE
        magic, op, keylen, extlen, dtype, _, body, _, _ = _HDR.unpack_from(c) if len(c) >= 24 else \
            _HDR.unpack(buf.view_at(0, 24))
        fe = 0
        if magic == ALT_REQ or magic == ALT_RES:
            fe, keylen = keylen >> 8, keylen & 0xFF
        if body > MAX_BODY or fe + extlen + keylen > body or dtype > 7 or keylen > MAX_KEY:
            return _NO
        if op not in _OPS and (op < 0x80 or magic == REQ or magic == ALT_REQ):
            return _NO
        if magic == ALT_REQ or magic == ALT_RES:
            # Alternative framing: the framing extras must be well-formed frame infos (RAW
            # DNS that starts with 0x08 is not Couchbase: its "frame infos" do not parse).
            if n < 24 + fe:
                return _NEED_MORE
            if not _frame_infos_ok(buf, 24, fe, magic == ALT_REQ):
                return _NO
        if n > 24 + body and buf.u8_at(24 + body) not in _MAGICS:
            return _NO  # what follows the packet is no packet
        if magic == REQ or magic == ALT_REQ:
            return _REQUEST if from_client is not False else _NO
        return _RESPONSE if from_client is not True else _NO
    if from_client is False:
        return _NO
    end = buf.find(b"\r\n", 0, min(n, MAX_LINE))
    if end < 0:
        # The line is still arriving (a segment may hold a byte of it): wait while what
        # came is a command word, or the start of one, and the line is not over-long.
        head = buf.bytes_at(0, min(n, 16))  # a command word is at most 10 bytes
        word, sp, _ = head.rstrip(b"\r").partition(b" ")
        if n >= MAX_LINE:
            return _NO
        if sp:
            return _NEED_MORE if word in _TEXT_CMDS else _NO
        return _NEED_MORE if any(c.startswith(word) for c in _TEXT_CMDS) else _NO
    line = buf.bytes_at(0, min(end, 300))  # one command line, bounded
    word = line.split(b" ", 1)[0]
    if word not in _TEXT_CMDS:
        return _NO
    return _REQUEST if _arity_ok(word, line.split()) else _NO


def _arity_ok(word: bytes, parts: list[bytes]) -> bool:
    """Does a text command line have the arguments memcached's protocol.txt gives it?
    (Detection is strict: a line memcached itself answers ERROR is no evidence.)"""
    args = parts[1:]
    if args and args[-1] == b"noreply" and word not in _TEXT_GET:
        args = args[:-1]
    n = len(args)
    if word in _TEXT_STORAGE:  # <key> <flags> <exptime> <bytes>, cas: and <cas unique>
        return n == (5 if word == b"cas" else 4) and all(a.lstrip(b"-").isdigit() for a in args[1:])
    if word in (b"get", b"gets"):
        return n >= 1
    if word in (b"gat", b"gats"):
        return n >= 2 and args[0].lstrip(b"-").isdigit()
    if word == b"delete":
        return n == 1 or (n == 2 and args[1] == b"0")  # an old "delete <key> 0" is still accepted
    if word == b"touch":
        return n == 2 and args[1].lstrip(b"-").isdigit()
    if word in (b"incr", b"decr"):
        return n == 2 and args[1].isdigit()
    if word in (b"version", b"quit"):
        return n == 0
    if word == b"flush_all":
        return n == 0 or (n == 1 and args[0].isdigit())
    if word == b"verbosity":
        return n == 1 and args[0].isdigit()
    return True  # meta commands and admin words: their own shapes


#: Frame info ids (Couchbase "Alternative Framing") and the lengths each must have (None: any).
_REQ_FRAME_LEN = {0: 0, 1: (1, 3), 2: 2, 3: None, 4: None, 5: 0, 6: None, 7: None, 8: None}
_RES_FRAME_LEN = {0: 2, 1: 2, 2: 2}


def _frame_infos_ok(buf: LargeBuffer, off: int, fe: int, request: bool) -> bool:
    """``fe`` bytes of framing extras at ``off``: frame infos (id and length nibbles, 15
    escaping to a following byte) that end exactly at ``off + fe``, each with a known id
    and the length that id has."""
    end = off + fe
    known = _REQ_FRAME_LEN if request else _RES_FRAME_LEN
    p = off
    while p < end:
        b = buf.u8_at(p)
        p += 1
        fid, flen = b >> 4, b & 0x0F
        if fid == 15:
            if p >= end:
                return False
            fid = 15 + buf.u8_at(p)
            p += 1
        if flen == 15:
            if p >= end:
                return False
            flen = 15 + buf.u8_at(p)
            p += 1
        if fid not in known:
            return False
        want = known[fid]
        if want is not None and flen != want and not (isinstance(want, tuple) and flen in want):
            return False
        p += flen
    return p == end


def _walk(data: memoryview, from_client: bool, collections: bool) -> list[tuple[int, int, int, int, int]] | None:
    """The packets of a segment feed_whole may take, as (op, key offset, key length, status,
    opaque), or None when it must decline (_memcache.c's ``walk`` is this, in C).

    Classic magic for the direction (0x80 from the client, 0x81 from the server), the
    lengths as ``_binary`` checks them, no key read as a collection id (``collections``:
    the client's side of a connection with them), no HELLO/GET_COLLECTION_ID response (their
    bodies are read by ``_binary``), and the last packet ending exactly with the segment.
    """
    n = len(data)
    hdr = _HDR.unpack_from
    magic_ok = REQ if from_client else RES
    off = 0
    pkts = []
    while off < n:
        if off + 24 > n:
            return None
        magic, op, keylen, extlen, _dtype, vb_status, body, opaque, _cas = hdr(data, off)
        if magic != magic_ok or body > MAX_BODY or extlen + keylen > body or keylen > MAX_KEY:
            return None
        if collections and keylen and op not in _NO_CID_OPS:
            return None
        if not from_client and (op == 0xBB or op == 0x1F):
            return None
        pkts.append((op, off + 24 + extlen, keylen, vb_status, opaque))
        off += 24 + body
    return pkts if off == n else None


#: A text line is read from its first this many bytes (a bounded copy: a key, a length, a word).
MAX_TEXT_LINE = 512
#: (name as sent, key, get family, noreply): a text command line, as ``_text_requests`` takes it.
TextCommand = tuple[str, str, bool, bool]
#: A reply line's code: a value came for the oldest command (VALUE, VA).
_HIT = -1
#: A meta HD reply's code: status 0, and a hit for a get.
_HD = 0x100
#: Reply words that end a command, and the status each gives a command outside the get family.
_REPLY_CODES = {
    b"STORED": 0x00, b"DELETED": 0x00, b"TOUCHED": 0x00, b"OK": 0x00, b"MN": 0x00, b"RESET": 0x00,
    b"END": 0x00, b"VERSION": 0x00, b"HD": _HD, b"NOT_FOUND": 0x01, b"NF": 0x01, b"EN": 0x01,
    b"EXISTS": 0x02, b"EX": 0x02, b"NOT_STORED": 0x05, b"NS": 0x05,
}
_NO_KEY_CMDS = frozenset({b"verbosity", b"stats", b"flush_all", b"version"})
_CRLF = re.compile(b"\r\n")


def _text_command(line: bytes) -> tuple[TextCommand | None, int]:
    """A text command line's (name, key, get family, noreply), None for a blank line, and
    the data block bytes (with its CRLF) that follow it (0: none). Both paths read lines
    here (``_text``, ``_text_walk``), so they cannot disagree on one."""
    parts = line.split()
    if not parts:
        return None, 0
    word = parts[0].lower()
    if word not in _TEXT_CMDS:
        raise Malformed(NAME, "unknown_command", 0, repr(word[:16]))
    # gat/gats take the expiry first: "gat <exptime> <key>+" (memcached protocol.txt).
    ki = 2 if word in (b"gat", b"gats") else 1
    key = parts[ki].decode("utf-8", "replace") if len(parts) > ki and word not in _NO_KEY_CMDS else ""
    skip = 0
    if word in _TEXT_STORAGE:
        if len(parts) < 5 or not parts[4].isdigit():
            raise Malformed(NAME, "bad_storage_command", 0)
        skip = int(parts[4]) + 2
        if skip > MAX_BODY:
            raise LimitExceeded(NAME, "body_too_large", 0)
    elif word == b"ms" and len(parts) > 2 and parts[2].isdigit():
        skip = int(parts[2]) + 2
    noreply = b"noreply" in parts[2:] or (word.startswith(b"m") and b"q" in parts[2:])
    # The text protocol's command as sent (lower-case in the protocol): the semantic
    # conventions take the operation name as the protocol has it.
    return (parts[0].decode("ascii", "replace"), key, word in _TEXT_GET, noreply), skip


def _text_reply_line(line: bytes) -> tuple[int | str | None, int]:
    """A text reply line's code (``_HIT``, a ``_REPLY_CODES`` value, 0 for a number) or an
    error line's text, None for a line of a multi-line reply (STAT), and the value bytes
    (with their CRLF) that follow it."""
    word = line.split(b" ", 1)[0]
    if word == b"VALUE":
        parts = line.split()
        if len(parts) < 4 or not parts[3].isdigit():
            raise Malformed(NAME, "bad_value_line", 0)
        skip = int(parts[3]) + 2
        if skip > MAX_BODY:
            raise LimitExceeded(NAME, "body_too_large", 0)
        return _HIT, skip
    if word == b"STAT":
        return None, 0  # a line of a multi-line reply; END closes it
    if word == b"VA":  # meta get value
        parts = line.split()
        if len(parts) > 1 and parts[1].isdigit():
            return _HIT, int(parts[1]) + 2
    if word in _TEXT_ERRORS:
        return line.decode("utf-8", "replace")[:256], 0
    code = _REPLY_CODES.get(word)
    if code is not None:
        return code, 0
    if word.isdigit():
        return 0x00, 0
    # A line no reply starts with (the bytes are not what was asked for, or we lost our
    # place): it completes nothing.
    raise Malformed(NAME, "unknown_reply", 0, repr(word[:16]))


def _text_walk(data: memoryview | bytes, from_client: bool, skip: int) -> tuple[list[Any], int] | None:
    """A text segment's lines as ``_text_command`` or ``_text_reply_line`` reads them (blank
    command lines and STAT lines left out), and the data bytes still to skip after it; or
    None when ``feed`` would not read it all, leaving its buffer empty: a line cut by the
    segment's end, or one it refuses (_memcache.c's ``text_walk`` is this, in C).

    ``skip`` data bytes (a block begun in an earlier segment) come first, as ``feed`` steps
    over them; a block may go on past the segment (the rest is the result's skip)."""
    n = len(data)
    if skip >= n:
        return [], skip - n
    p = skip
    search = _CRLF.search
    read = _text_command if from_client else _text_reply_line
    items: list[Any] = []
    try:
        while p < n:
            m = search(data, p, min(n, p + MAX_LINE + 2))
            if m is None:
                return None  # cut short (or over-long: feed raises, and counts it)
            e = m.start()
            item, skip = read(bytes(data[p:min(e, p + MAX_TEXT_LINE)]))
            if item is not None:
                items.append(item)
            p = e + 2 + skip
    except ProtocolError:
        return None
    return items, p - n


def _forget_flight(flight: dict[tuple[int, int], int], r: _Req) -> None:
    """``r`` is no longer in flight: one fewer of its (opaque, opcode) in ``flight``."""
    fk = (r.opaque, r.op)
    left = flight[fk] - 1
    if left:
        flight[fk] = left
    else:
        del flight[fk]


class _Req:
    __slots__ = ("collection", "get_family", "hit", "key", "name", "op", "opaque", "quiet", "start_ts")

    def __init__(self, name: str, key: str, start_ts: int, get_family: bool, quiet: bool = False,
                 opaque: int = 0, op: int = -1, collection: str | None = None) -> None:
        self.name = name
        self.key = key
        self.start_ts = start_ts
        self.get_family = get_family
        self.quiet = quiet
        self.opaque = opaque
        self.op = op
        self.hit = False  # text protocol: a VALUE/VA line came for it
        self.collection = collection


def _leb128(buf: LargeBuffer, off: int, end: int) -> tuple[int, int]:
    v = shift = 0
    for i in range(5):
        if off + i >= end:
            break
        b = buf.u8_at(off + i)
        v |= (b & 0x7F) << shift
        if b < 0x80:
            return v, off + i + 1
        shift += 7
    raise Malformed(NAME, "bad_collection_id", off)


class Session(Session):  # type: ignore[no-redef]
    protocol: ClassVar[str] = NAME

    def __init__(self, conn: Conn) -> None:
        # Session.__init__ only keeps the conn: set here, one Python call fewer a connection.
        self.conn = conn
        settings = conn.settings
        #: Settings.show_keys (its default, False, without Settings of its own): read once here,
        #: not once a span.
        self.show_keys: bool = settings.show_keys if isinstance(settings, Settings) else False
        self.binary: bool | None = None
        self.couchbase = False
        self.collections = False
        self.bucket: str | None = None
        # Binary requests in send order. Opaques may repeat (python-binary-memcached numbers a
        # batch from 0 and sends its NOOP with opaque 0), so a response answers the earliest
        # request in flight with its (opaque, opcode); the count says whether there is one
        # without a scan (a plain dict: a Counter's Python __init__ was a tenth of a short
        # connection's setup, issue 21).
        self.pending: deque[_Req] = PendingQueue(conn)
        self.in_flight: dict[tuple[int, int], int] = {}
        # What the budget drops is forgotten from in_flight by a partial of the dict, not a
        # bound method: that made session -> queue -> method -> session a cycle, so every
        # connection's session waited for the cyclic GC instead of going at its end (issue 21).
        self.pending.on_evict = partial(_forget_flight, self.in_flight)
        # Text requests in order: a PendingQueue made once the connection shows it speaks
        # text (``_decide``), an empty tuple until then (a binary connection never needs it:
        # a second store was a sixth of a short connection's setup, issue 21).
        self.text_pending: deque[_Req] | tuple[()] = ()
        self.skip = [0, 0]  # per direction: value bytes still to step over
        # Couchbase collections only: made at the first GET_COLLECTION_ID / collection id.
        self.cid_names: dict[int, str] | None = None
        self.cid_requests: dict[int, str] | None = None  # opaque -> "scope.collection" asked for

    def _decide(self, first: int) -> bool:
        """Binary or text, from the connection's first byte (once a connection)."""
        binary = self.binary = first in _MAGICS
        if not binary:
            self.text_pending = PendingQueue(self.conn)
        return binary

    # -- dispatch --------------------------------------------------------------
    def feed(self, from_client: bool, buf: LargeBuffer, ts_ns: int) -> None:
        side = int(from_client)
        while True:
            if self.skip[side]:
                take = min(self.skip[side], len(buf))
                buf.release(take)
                self.skip[side] -= take
                if self.skip[side]:
                    return
            if not len(buf):
                return
            binary = self.binary
            if binary is None:
                binary = self._decide(buf.u8_at(0))
            done = self._binary(from_client, buf, ts_ns) if binary else self._text(from_client, buf, ts_ns)
            if not done:
                return

    # -- binary ------------------------------------------------------------------
    def _binary(self, from_client: bool, buf: LargeBuffer, ts_ns: int) -> bool:
        if len(buf) < 24:
            buf.want = 24
            return False
        magic, op, keylen, extlen, _dtype, vb_status, body, opaque, _cas = _HDR.unpack(buf.view_at(0, 24))
        fe = 0
        if magic in (ALT_REQ, ALT_RES):
            fe, keylen = keylen >> 8, keylen & 0xFF
            self.couchbase = True
        elif magic not in (REQ, RES):
            raise Malformed(NAME, "bad_magic", 0, f"{magic:#x}")
        if body > MAX_BODY:
            raise LimitExceeded(NAME, "body_too_large", 0)
        if fe + extlen + keylen > body or keylen > MAX_KEY:
            raise Malformed(NAME, "bad_lengths", 0)
        head = 24 + fe + extlen + keylen
        if len(buf) < head:
            buf.want = head
            return False
        kstart = 24 + fe + extlen
        if fe and not _frame_infos_ok(buf, 24, fe, magic == ALT_REQ):
            raise Malformed(NAME, "bad_framing_extras", 24)
        if magic in (REQ, ALT_REQ) and from_client:
            self._bin_request(buf, op, kstart, keylen, opaque, body - (head - 24), buf.ts_at(0))
        elif magic in (RES, ALT_RES) and not from_client:
            value = body - (head - 24)
            if op == 0xBB and vb_status == 0 and extlen >= 12:
                self._learn_cid(opaque, buf.u32be_at(24 + fe + 8))
            if op == 0x1F and vb_status == 0 and value >= 2 and len(buf) >= head + min(value, 64):
                self._hello_features(buf, head, value)
            self._bin_response(op, vb_status, opaque, ts_ns)
        else:
            raise Malformed(NAME, "wrong_direction", 0, f"magic {magic:#x}")
        buf.release(head)
        self.skip[int(from_client)] = body - (head - 24)
        return True

    def feed_whole(self, from_client: bool, data: memoryview, ts_ns: int) -> bool:
        """A segment of whole binary packets (base.py's contract), read in place without a buffer.

        Only classic framing (magic 0x80/0x81) in the right direction, each packet's lengths
        as ``_binary`` checks them, ending exactly with the segment, and none that reads a
        collection id or a HELLO/GET_COLLECTION_ID response (those take the buffered path):
        checked before anything is done (``_walk``, or _memcache.c's twin of it), then each
        packet has ``_binary``'s effects in order. Anything else (text, a value across
        segments, bad input) returns False unchanged. And a text segment (below).
        """
        binary = self.binary
        if binary is None:
            if not len(data):
                return False
            # The connection's first segment: decided as ``feed`` decides it, from the same byte
            # (it was always buffered, and the first request is half a short connection's work).
            binary = self._decide(data[0])
        if not binary:
            # The text protocol: the lines of a segment that ends where a line (or the data
            # block one announced) ends, or inside a data block, as ``feed`` would read them
            # leaving the buffer empty. ``_text_walk`` (or _memcache.c's twin) reads them all
            # first, declining whatever ``feed`` would wait on or refuse; then they have
            # ``feed``'s effects in order (the same two methods).
            skip = self.skip
            walked = _C_TEXT(data, from_client, skip[from_client]) if _C_TEXT is not None else None
            if walked is None:  # declined in C, or no C: the reference decides
                walked = _text_walk(data, from_client, skip[from_client])
                if walked is None:
                    return False
            items, skip[from_client] = walked
            if items:
                if from_client:
                    self._text_requests(items, ts_ns, ts_ns)
                else:
                    self._text_replies(items, ts_ns)
            return True
        if self.skip[from_client]:
            return False
        collections = self.collections and from_client
        pkts = _C.walk(data, from_client, collections) if _C is not None else None
        if pkts is None:  # declined in C, or no C: the reference decides
            if type(data) is not memoryview:  # the eBPF receiver's payloads are bytes
                data = memoryview(data)
            pkts = _walk(data, from_client, collections)
            if pkts is None:
                return False
        if from_client:
            for op, k, keylen, _st, opaque in pkts:
                info = _OPS.get(op) or _unknown_op(op)
                if op in _COUCHBASE_OPS:
                    self.couchbase = True
                # (str of a slice: bytes' copies at most 250 bytes, a memoryview's none.)
                key = str(data[k:k + (keylen if keylen < 250 else 250)], "utf-8", "replace") if keylen else ""
                self._bin_add(op, info, key, None, opaque, ts_ns)
        else:
            for op, _k, _kl, vb_status, opaque in pkts:
                self._bin_response(op, vb_status, opaque, ts_ns)
        return True

    def _bin_request(self, buf: LargeBuffer, op: int, kstart: int, keylen: int, opaque: int, value: int,
                     ts: int) -> None:
        info = _OPS.get(op) or _unknown_op(op)
        if op in _COUCHBASE_OPS:
            self.couchbase = True
        key_off, key_len = kstart, keylen
        collection = None
        if self.collections and keylen and op not in _NO_CID_OPS:
            cid, key_off = _leb128(buf, kstart, kstart + keylen)
            key_len = kstart + keylen - key_off
            names = self.cid_names
            collection = names.get(cid) if names else None
            if collection is None:
                collection = "_default" if cid == 0 else f"cid:{cid}"
        key = buf.bytes_at(key_off, min(key_len, 250)).decode("utf-8", "replace") if key_len else ""
        self._bin_add(op, info, key, collection, opaque, ts)

    def _bin_add(self, op: int, info: tuple[str, bool, bool], key: str, collection: str | None,
                 opaque: int, ts: int) -> None:
        """A binary request, its key read, ``info`` its _OPS entry: await its response."""
        if op == 0x89:  # SELECT_BUCKET: the key is the bucket name
            self.bucket = key
        elif op == 0xBB and key:
            # GET_COLLECTION_ID asks for "scope.collection" in its key; its response carries the id.
            asked = self.cid_requests
            if asked is None:
                asked = self.cid_requests = {}
            elif len(asked) > 1024:
                asked.clear()
            asked[opaque] = key
        r = _Req(info[0], key, ts, info[2], info[1], opaque, op, collection)
        pending = self.pending
        if len(pending) >= MAX_PENDING:
            self._pop_oldest()
            self.conn.drop("too_many_pending")
        pending.append(r)
        fk = (opaque, op)
        flight = self.in_flight
        flight[fk] = flight.get(fk, 0) + 1

    def _pop_oldest(self) -> _Req:
        r = self.pending.popleft()
        _forget_flight(self.in_flight, r)
        return r

    def _hello_features(self, buf: LargeBuffer, off: int, n: int) -> None:
        for i in range(0, min(n, 64) - 1, 2):
            if buf.u16be_at(off + i) == _FEATURE_COLLECTIONS:
                self.collections = True
                self.couchbase = True

    def _learn_cid(self, opaque: int, cid: int) -> None:
        name = self.cid_requests.pop(opaque, None) if self.cid_requests else None
        if name:
            names = self.cid_names
            if names is None:
                names = self.cid_names = {}
            elif len(names) > 4096:
                names.clear()
            names[cid] = name.split(".", 1)[-1]

    def _bin_response(self, op: int, status: int, opaque: int, ts_ns: int) -> None:
        pending = self.pending
        if pending:
            first = pending[0]
            if first.opaque == opaque and first.op == op:
                # The usual case, the oldest request's answer: the loop below, without the
                # dict probes and the two calls (_pop_oldest, _forget_flight) it costs.
                pending.popleft()
                fk = (opaque, op)
                flight = self.in_flight
                left = flight[fk] - 1
                if left:
                    flight[fk] = left
                else:
                    del flight[fk]
                self._span(first, status, ts_ns)
                return
        if (opaque, op) not in self.in_flight:
            self.conn.drop("unpaired_response")
            return
        # The response answers the earliest request in flight with its opaque; requests
        # sent before that one and still unanswered are complete: a quiet GETQ was a miss,
        # a quiet SETQ a success (the server answers in order).
        while True:
            first = self._pop_oldest()
            if first.opaque == opaque and first.op == op:
                break
            if first.quiet:
                self._span(first, 0x01 if first.get_family else 0x00, ts_ns, implicit=True)
            else:
                self.conn.drop("no_response")
        self._span(first, status, ts_ns)

    # -- text ------------------------------------------------------------------
    def _text(self, from_client: bool, buf: LargeBuffer, ts_ns: int) -> bool:
        end = buf.find(b"\r\n", 0, min(len(buf), MAX_LINE + 2))
        if end < 0:
            if len(buf) > MAX_LINE:
                raise LimitExceeded(NAME, "line_too_long", 0)
            return False
        line = buf.bytes_at(0, min(end, MAX_TEXT_LINE))  # one command/reply line (bounded copy)
        start = buf.ts_at(0)
        buf.release(end + 2)
        if from_client:
            cmd, skip = _text_command(line)
            if skip:
                self.skip[1] = skip
            if cmd is not None:
                self._text_requests((cmd,), start, ts_ns)
        else:
            reply, skip = _text_reply_line(line)
            if skip:
                self.skip[0] = skip
            if reply is not None:
                self._text_replies((reply,), ts_ns)
        return True

    def _text_requests(self, cmds: list[TextCommand] | tuple[TextCommand], start: int, ts_ns: int) -> None:
        """Command lines read (``_text_command``), in order: a span now for one that asks for no
        reply, else it awaits one. (Several a call: feed_whole's segment of them is one call.)"""
        pending = self.text_pending
        for name, key, get_family, noreply in cmds:
            r = _Req(name, key, start, get_family)
            if noreply:
                self._text_span(r, 0x00, ts_ns)
                continue
            if len(pending) >= MAX_PENDING:
                pending.popleft()
                self.conn.drop("too_many_pending")
            pending.append(r)

    def _text_replies(self, replies: list[int | str] | tuple[int | str], ts_ns: int) -> None:
        """Reply lines read (``_text_reply_line``), in order: a value came (``_HIT``), or the
        oldest command is answered by a reply word's code or an error line's text."""
        pending = self.text_pending
        for reply in replies:
            if reply == _HIT:
                if pending:
                    pending[0].hit = True
                continue
            if not pending:
                self.conn.drop("unpaired_response")
                continue
            req = pending.popleft()
            if reply.__class__ is str:
                self._text_span(req, -1, ts_ns, reply)  # type: ignore[arg-type]
            elif req.get_family:
                self._text_span(req, 0x00 if req.hit or reply == _HD else 0x01, ts_ns)
            else:
                self._text_span(req, reply & 0xFF, ts_ns)  # type: ignore[operator]

    # -- spans -------------------------------------------------------------------
    def _span(self, req: _Req, status: int, end_ts: int, implicit: bool = False, text_error: str = "",
              incomplete: bool = False) -> None:
        # Once an exchange: enum members are module constants, the span kind is kind_for's
        # answer inline, conn.span's arguments are positional (issue 21).
        if req.op in _SETUP_OPS and status in _SUCCESS_LIKE:
            return
        conn = self.conn
        op = req.name
        key = req.key
        if self.show_keys:
            query = f"{op} {key}".rstrip()
        else:  # (op names end with no blank: no rstrip needed)
            query = f"{op} ?" if key else op
        attrs: dict[str, Any] = {"db.system.name": "couchbase" if self.couchbase else "memcached",
                                 "db.operation.name": op, "db.query.text": query}
        if self.bucket:
            attrs["db.namespace"] = self.bucket
        name = op
        if req.collection:
            attrs["db.collection.name"] = req.collection
            name = f"{op} {req.collection}"
        code = _UNSET
        msg = ""
        if text_error:
            code = _ERROR
            msg = text_error
            attrs["error.type"] = text_error.split(" ", 1)[0]
        elif status not in _SUCCESS_LIKE:
            sname = _STATUS.get(status) or f"{status:#06x}"
            attrs["db.response.status_code"] = sname
            if not (status == 0x01 and req.get_family):  # a GET miss is not an error
                code = _ERROR
                msg = sname
                attrs["error.type"] = sname
        if implicit:
            attrs["memcached.quiet"] = True
        kind = _SERVER_KIND if conn.perspective == _SERVER_VIEW else _CLIENT  # kind_for(CLIENT)
        span = conn.span(name, kind, req.start_ts, end_ts, attrs, None, code, msg)
        if incomplete:
            self.cut_short(span)
        else:
            conn.emit(span)

    def _text_span(self, req: _Req, status: int, end_ts: int, text_error: str = "") -> None:
        """``_span`` for a text command answered (or a noreply one): a text connection has no
        set-up opcodes, bucket, collections or quiet requests (only the binary paths set
        them), so a span a command skips their checks."""
        conn = self.conn
        op = req.name
        key = req.key
        if self.show_keys:
            query = f"{op} {key}".rstrip()
        else:  # (op names end with no blank: no rstrip needed)
            query = f"{op} ?" if key else op
        attrs: dict[str, Any] = {"db.system.name": "memcached", "db.operation.name": op, "db.query.text": query}
        code = _UNSET
        msg = ""
        if text_error:
            code = _ERROR
            msg = text_error
            attrs["error.type"] = text_error.split(" ", 1)[0]
        elif status:
            sname = _STATUS[status]  # (text replies give 0x01, 0x02 or 0x05)
            attrs["db.response.status_code"] = sname
            if not (status == 0x01 and req.get_family):  # a GET miss is not an error
                code = _ERROR
                msg = sname
                attrs["error.type"] = sname
        kind = _SERVER_KIND if conn.perspective == _SERVER_VIEW else _CLIENT  # kind_for(CLIENT)
        conn.emit(conn.span(op, kind, req.start_ts, end_ts, attrs, None, code, msg))

    def gap(self, from_client: bool, ts_ns: int) -> None:
        self.skip[int(from_client)] = 0
        if self.pending or self.text_pending:
            self.conn.drop("gap")
        self.pending.clear()
        self.in_flight.clear()
        if self.text_pending:  # (an empty tuple on a binary connection)
            self.text_pending.clear()

    def close(self, ts_ns: int, reset: bool = False) -> None:
        # Quiet requests still unanswered when the connection ends completed silently. A
        # response that began (its header partly here, a text get's VALUE lines) is a span
        # of what was seen, marked incomplete (base.py's rule); the rest are counted.
        if not self.pending and not self.text_pending:
            return  # nothing awaits an answer (in_flight counts pending: empty too)
        buf = self.conn.server_buf
        began = (buf.u32be_at(12), buf.u8_at(1)) if self.binary and len(buf) >= 16 and \
            buf.u8_at(0) in (RES, ALT_RES) else None
        short = began is None and self.binary and len(buf) < 16  # a header cut short: the oldest's
        for r in self.pending:
            if r.quiet:
                self._span(r, 0x01 if r.get_family else 0x00, ts_ns, implicit=True)
            elif began == (r.opaque, r.op) or (short and self.reply_begun()):
                began = None
                self._span(r, 0x00, ts_ns, incomplete=True)
            else:
                self.cut_short(None, "no_response")
        self.pending.clear()
        self.in_flight.clear()
        for i, r in enumerate(self.text_pending):
            if r.hit or (i == 0 and not self.binary and self.reply_begun()):
                self._span(r, 0x00, ts_ns, incomplete=True)
            else:
                self.cut_short(None, "no_response")
        if self.text_pending:
            self.text_pending.clear()
