"""Kafka primitive encodings, decoded in place from a ``LargeBufferReader``.

Contract: every function reads at the reader's cursor and advances it; bytes come
back as memoryviews into the buffer (no copy) unless the value is small and kept
(UUIDs, names). A short window raises ``BufferBoundsError`` (the session decides
whether that means "need more" or "malformed"); a value that can never be valid
(length below -1, a non-printable topic name) raises ``Malformed``.

Flexible versions (KIP-482) use compact forms: lengths as uvarint N+1 (0 = null),
and tagged fields after each struct.
"""

from __future__ import annotations

import base64
import re

from processors.protocols.errors import Malformed
from service.largebuf import LargeBufferReader

NAME = "kafka"

#: Kafka topic names: 1..249 characters of [a-zA-Z0-9._-] (org.apache.kafka.common.internals.Topic).
MAX_TOPIC_NAME = 249
TOPIC_RE = re.compile(rb"[A-Za-z0-9._-]{1,249}")
#: Printable ASCII only: how OBI tells a client id from random bytes.
_PRINTABLE_RE = re.compile(rb"[\x20-\x7e]*")

#: Tagged fields per struct: the spec caps nothing, 64 is far above any real message.
MAX_TAGS = 64


def read_string(r: LargeBufferReader, flex: bool) -> memoryview | None:
    """STRING / NULLABLE_STRING, or their COMPACT forms when ``flex``."""
    if flex:
        n = r.read_uvarint() - 1
    else:
        n = r.read_i16be()
    if n < 0:
        if n == -1:
            return None
        raise Malformed(NAME, "bad_length", r.offset, f"string length {n}")
    return r.read(n)


def skip_string(r: LargeBufferReader, flex: bool) -> None:
    n = r.read_uvarint() - 1 if flex else r.read_i16be()
    if n > 0:
        r.skip(n)
    elif n < -1:
        raise Malformed(NAME, "bad_length", r.offset, f"string length {n}")


def read_array_len(r: LargeBufferReader, flex: bool) -> int:
    """ARRAY / COMPACT_ARRAY length; -1 for null. Each element takes >= 1 byte, so a
    count larger than what is left in the window is rejected at once."""
    n = r.read_uvarint() - 1 if flex else r.read_i32be()
    if n < -1:
        raise Malformed(NAME, "bad_length", r.offset, f"array length {n}")
    if n > r.remaining:
        raise Malformed(NAME, "bad_length", r.offset, f"array of {n} in {r.remaining} bytes")
    return n


def read_bytes_len(r: LargeBufferReader, flex: bool) -> int:
    """Length of BYTES / RECORDS (nullable), compact when ``flex``; -1 for null."""
    n = r.read_uvarint() - 1 if flex else r.read_i32be()
    if n < -1:
        raise Malformed(NAME, "bad_length", r.offset, f"bytes length {n}")
    return n


def skip_tags(r: LargeBufferReader) -> None:
    """Skip a tagged-field section (count, then tag/size/bytes per field)."""
    n = r.read_uvarint()
    if n > MAX_TAGS:
        raise Malformed(NAME, "bad_length", r.offset, f"{n} tagged fields")
    for _ in range(n):
        r.read_uvarint()
        r.skip(r.read_uvarint())


def read_uuid(r: LargeBufferReader) -> bytes:
    """A UUID: 16 bytes, copied (a small key kept beyond the parse)."""
    return r.read_bytes(16)


def uuid_str(u: bytes) -> str:
    """Kafka's own text form of a topic id: URL-safe base64 without padding (Uuid.toString)."""
    return base64.urlsafe_b64encode(u).rstrip(b"=").decode("ascii")


def topic_name(v: memoryview | None, off: int = -1) -> str:
    """Validate and decode a topic name (a small copy, kept in the span)."""
    if v is None or TOPIC_RE.fullmatch(v) is None:
        raise Malformed(NAME, "bad_topic", off, "topic name not [a-zA-Z0-9._-]{1,249}")
    return str(v, "ascii")


def printable(v: memoryview) -> bool:
    return _PRINTABLE_RE.fullmatch(v) is not None
