"""gRPC over HTTP/2: the parts of a stream that make it an RPC.

Contract: pure helpers used by ``http2.py`` (no frames, no I/O here).
``is_grpc`` recognises the content type, ``MessageCounter`` counts the
5-byte length-prefixed messages of a stream's DATA payload in place (it reads
the prefixes from the ``LargeBuffer`` and skips the message bodies, so nothing
is copied and memory is the same for a 1 KiB or a 1 GiB message),
``rpc_fields`` turns what the stream carried into span name, attributes and
status following design.md §3 (error rules as OBI: a client span errs on any
non-OK status, a server span only on the codes that mean the server failed).

Wire facts are from the gRPC "PROTOCOL-HTTP2" spec and "Status codes and their
use in gRPC" (grpc/grpc doc/statuscodes.md, doc/http-grpc-status-mapping.md).
"""

from __future__ import annotations

import struct

from service.largebuf import LargeBuffer
from service.model import AttrValue, SpanKind, StatusCode

from .errors import Malformed

__all__ = [
    "STATUS_NAMES", "SERVER_ERROR_CODES", "MessageCounter", "is_grpc", "status_from_http",
    "parse_timeout_ns", "percent_decode", "rpc_fields", "CANCELLED", "DEADLINE_EXCEEDED",
]

PROTOCOL = "grpc"

#: Status code names by number (statuscodes.md); index = code.
STATUS_NAMES: tuple[str, ...] = (
    "OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND",
    "ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION", "ABORTED",
    "OUT_OF_RANGE", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS", "UNAUTHENTICATED",
)
OK = 0
CANCELLED = 1
UNKNOWN = 2
DEADLINE_EXCEEDED = 4
UNIMPLEMENTED = 12
INTERNAL = 13
UNAVAILABLE = 14
DATA_LOSS = 15

#: Codes that make a SERVER span an error (OBI's rule, design.md §3): the
#: others (NOT_FOUND, INVALID_ARGUMENT...) are the caller's fault, not the server's.
SERVER_ERROR_CODES = frozenset({UNKNOWN, DEADLINE_EXCEEDED, UNIMPLEMENTED, INTERNAL, UNAVAILABLE, DATA_LOSS})

#: HTTP status -> gRPC code when a response carries no grpc-status
#: (doc/http-grpc-status-mapping.md); anything else not 200 is UNKNOWN.
_HTTP_TO_GRPC = {400: INTERNAL, 401: 16, 403: 7, 404: UNIMPLEMENTED, 429: UNAVAILABLE,
                 502: UNAVAILABLE, 503: UNAVAILABLE, 504: UNAVAILABLE}

#: The length prefix: 1 byte compressed flag + 4 bytes big-endian length (PROTOCOL-HTTP2 "Length-Prefixed-Message").
PREFIX_LEN = 5
_U32 = struct.Struct(">I")

#: grpc-timeout units -> nanoseconds (PROTOCOL-HTTP2 "Timeout"); the value has at most 8 digits.
_TIMEOUT_UNITS = {"H": 3_600_000_000_000, "M": 60_000_000_000, "S": 1_000_000_000,
                  "m": 1_000_000, "u": 1_000, "n": 1}
MAX_TIMEOUT_DIGITS = 8


def is_grpc(content_type: str | None) -> bool:
    """``application/grpc`` and its ``+proto``/``+json``/``;params`` variants.

    Not ``application/grpc-web*``: its trailers travel inside the body (flag
    0x80 frames) and it is mostly HTTP/1; such streams are plain HTTP spans.
    """
    if content_type is None:
        return False
    ct = content_type[:20].lower()
    return ct.startswith("application/grpc") and not ct.startswith("application/grpc-web")


def status_name(code: int) -> str:
    """The name of a code; an unknown number is reported as UNKNOWN (statuscodes.md)."""
    if 0 <= code < len(STATUS_NAMES):
        return STATUS_NAMES[code]
    return "UNKNOWN"


def status_from_http(http_status: int | None) -> int:
    """The gRPC code a client derives from the HTTP status when there is no grpc-status."""
    if http_status is None:
        return UNKNOWN
    if http_status == 200:
        # A 200 with no grpc-status at all: the stream ended without the
        # required trailer, which grpc implementations report as INTERNAL.
        return INTERNAL
    return _HTTP_TO_GRPC.get(http_status, UNKNOWN)


def parse_timeout_ns(value: str | None) -> int | None:
    """``grpc-timeout`` ("100m", "5S") in nanoseconds, or None when absent or invalid."""
    if not value or len(value) > MAX_TIMEOUT_DIGITS + 1:
        return None
    unit = _TIMEOUT_UNITS.get(value[-1])
    digits = value[:-1]
    if unit is None or not digits.isdigit() or not digits.isascii():
        return None
    return int(digits) * unit


def percent_decode(msg: str) -> str:
    """grpc-message is percent-encoded UTF-8 (PROTOCOL-HTTP2 "Status-Message")."""
    if "%" not in msg:
        return msg
    out = bytearray()
    i = 0
    raw = msg.encode("utf-8", "replace")
    n = len(raw)
    while i < n:
        c = raw[i]
        if c == 0x25 and i + 2 < n:
            try:
                out.append(int(raw[i + 1:i + 3], 16))
                i += 3
                continue
            except ValueError:
                pass
        out.append(c)
        i += 1
    return out.decode("utf-8", "replace")


class MessageCounter:
    """Counts length-prefixed messages in one direction of a stream, reading only the prefixes.

    ``feed`` is given a range of a ``LargeBuffer`` (a DATA frame's payload, or
    the part of it that has arrived); a prefix may straddle DATA frames and TCP
    segments, so its bytes are accumulated in an int. Message bodies are
    skipped by arithmetic. A compressed-flag byte other than 0/1 means the
    stream is not length-prefixed gRPC after all: counting stops (``broken``).
    """

    __slots__ = ("_hdr", "_hdr_got", "_need", "broken", "messages")

    def __init__(self) -> None:
        self.messages = 0
        self._need = 0      #: body bytes of the current message still to skip
        self._hdr_got = 0   #: prefix bytes collected so far (0..4)
        self._hdr = 0       #: the prefix bytes collected, big-endian
        self.broken = False

    def feed(self, buf: LargeBuffer, off: int, n: int) -> None:
        """Account for ``n`` payload bytes at ``off``; raises Malformed once on a bad flag byte."""
        if self.broken:
            return
        end = off + n
        while off < end:
            need = self._need
            if need:
                k = end - off
                if k > need:
                    k = need
                self._need = need - k
                off += k
                continue
            if self._hdr_got == 0 and end - off >= PREFIX_LEN:
                flag = buf.u8_at(off)
                length = buf.u32be_at(off + 1)
                off += PREFIX_LEN
            else:
                self._hdr = (self._hdr << 8) | buf.u8_at(off)
                self._hdr_got += 1
                off += 1
                if self._hdr_got < PREFIX_LEN:
                    continue
                flag = self._hdr >> 32
                length = self._hdr & 0xFFFFFFFF
                self._hdr_got = 0
                self._hdr = 0
            if flag > 1:
                self.broken = True
                raise Malformed(PROTOCOL, "bad_message_prefix", off, f"compressed flag {flag}")
            self.messages += 1
            self._need = length

    def one(self, v: memoryview, off: int, n: int) -> bool:
        """Count the usual payload, exactly one whole message from a message boundary, from
        the view ``v`` that holds it (no loop, no buffer reads); False leaves the payload,
        untouched, to ``feed`` (anything else: several or partial messages, a bad flag)."""
        if self.broken or self._need or self._hdr_got or n < PREFIX_LEN or v[off] > 1:
            return False
        if _U32.unpack_from(v, off + 1)[0] != n - PREFIX_LEN:
            return False
        self.messages += 1
        return True

    @property
    def partial(self) -> bool:
        """True in the middle of a message (the stream ended early)."""
        return bool(self._need or self._hdr_got)


def rpc_fields(
    path: str | None,
    kind: SpanKind,
    grpc_status: int | None,
    grpc_message: str | None,
    http_status: int | None,
    reset: bool,
    timed_out: bool,
    grpc_timeout: str | None,
    req_messages: int | None,
    resp_messages: int | None,
    status_unknown: bool = False,
) -> tuple[str, dict[str, AttrValue], StatusCode, str]:
    """Span name, attributes, status and status message of one gRPC call.

    The status comes from the grpc-status trailer; failing that, a stream
    reset is CANCELLED (DEADLINE_EXCEEDED when the caller's grpc-timeout had
    passed: that is why a client resets), and failing that, the HTTP status
    mapped per http-grpc-status-mapping.md. ``status_unknown``: the status
    field was there but undecodable (mid-stream pickup): no status is reported
    rather than a guessed one.
    """
    method = path[1:] if path and path.startswith("/") else (path or "")
    name = method or "grpc"
    if grpc_status is not None:
        code = grpc_status
    elif reset:
        code = DEADLINE_EXCEEDED if timed_out else CANCELLED
    else:
        code = status_from_http(http_status)
    code_name = status_name(code)
    attrs: dict[str, AttrValue] = {"rpc.system.name": "grpc"}
    if method:
        attrs["rpc.method"] = method
    if status_unknown:
        code = OK  # for the error rules below: nothing known to be wrong
    else:
        attrs["rpc.response.status_code"] = code_name
    attrs["network.protocol.version"] = "2"
    if grpc_timeout is not None:
        # OTel semconv rpc.grpc.request.metadata.<key>: metadata values as a string array.
        attrs["rpc.grpc.request.metadata.grpc-timeout"] = [grpc_timeout]
    if req_messages is not None:  # None: the stream was not known as gRPC from its start
        attrs["wirespan.grpc.request.message_count"] = req_messages
    if resp_messages is not None:
        attrs["wirespan.grpc.response.message_count"] = resp_messages
    if kind == SpanKind.SERVER:
        err = code in SERVER_ERROR_CODES
    else:
        err = code != OK
    msg = ""
    if err:
        attrs["error.type"] = code_name
        msg = grpc_message if grpc_message else code_name
    return name, attrs, (StatusCode.ERROR if err else StatusCode.UNSET), msg
