"""Kafka request and response header views over a ``LargeBuffer``.

OBI's idea, in Python: a header object holds the buffer and the message's offset,
nothing else; each field decodes on access with one ``struct.unpack_from``.
``body_offset`` walks the client id (and, for flexible versions, the header's
tagged fields, request header v2) to where the API body starts.

Request:  size:i32 api_key:i16 api_version:i16 correlation_id:i32 client_id:NULLABLE_STRING(i16)
          [tagged fields if flexible]   (client id is never compact: KIP-482)
Response: size:i32 correlation_id:i32 [tagged fields if flexible and not ApiVersions]
"""

from __future__ import annotations

from processors.protocols.errors import Malformed
from service.largebuf import LargeBuffer, LargeBufferReader

from . import apis
from .codec import NAME, printable, skip_tags

#: Bytes before the client id's characters: size, key, version, correlation id, client id length.
REQUEST_FIXED = 14
#: The smallest request body after the size prefix (header v1 with a null client id).
MIN_REQUEST_SIZE = 10
MIN_RESPONSE_SIZE = 4
#: Kafka brokers refuse larger requests by default (socket.request.max.bytes = 100 MiB).
MAX_MESSAGE_SIZE = 100 * 1024 * 1024


class RequestHeader:
    """A view: ``buf`` + ``off`` (where the size prefix starts). Fields decode on access."""

    __slots__ = ("buf", "off")

    def __init__(self, buf: LargeBuffer, off: int = 0) -> None:
        self.buf = buf
        self.off = off

    @property
    def message_size(self) -> int:
        """Bytes after the 4-byte size prefix."""
        return self.buf.i32be_at(self.off)

    @property
    def api_key(self) -> int:
        return self.buf.i16be_at(self.off + 4)

    @property
    def api_version(self) -> int:
        return self.buf.i16be_at(self.off + 6)

    @property
    def correlation_id(self) -> int:
        return self.buf.i32be_at(self.off + 8)

    @property
    def client_id_size(self) -> int:
        return self.buf.i16be_at(self.off + 12)

    @property
    def client_id(self) -> str | None:
        """Decoded (a small copy kept as an attribute); None when null."""
        n = self.client_id_size
        if n < 0:
            return None
        return str(self.buf.view_at(self.off + REQUEST_FIXED, n), "ascii", "replace")

    @property
    def flexible(self) -> bool:
        return apis.flexible(self.api_key, self.api_version)

    @property
    def end(self) -> int:
        return self.off + 4 + self.message_size

    def body_offset(self) -> int:
        """Offset of the API body: after the client id and, if flexible, the header's tagged fields."""
        n = self.client_id_size
        pos = self.off + REQUEST_FIXED + max(n, 0)
        if self.flexible:
            r = self.buf.reader(pos, min(self.end, len(self.buf)))
            skip_tags(r)
            pos = r.offset
        return pos

    def body_reader(self) -> LargeBufferReader:
        """A reader over the body, bounded by the message (or by what has arrived)."""
        return self.buf.reader(self.body_offset(), min(self.end, len(self.buf)))

    def validate(self) -> None:
        """OBI-strict checks; raises ``Malformed``. Needs the client id bytes present."""
        size = self.message_size
        if size < MIN_REQUEST_SIZE or size > MAX_MESSAGE_SIZE:
            raise Malformed(NAME, "bad_size", self.off, f"message size {size}")
        if not apis.known(self.api_key, self.api_version):
            raise Malformed(NAME, "unknown_api", self.off, f"api {self.api_key} v{self.api_version}")
        if self.correlation_id < 0:
            raise Malformed(NAME, "bad_header", self.off, "negative correlation id")
        n = self.client_id_size
        if n < -1 or n > size - MIN_REQUEST_SIZE:
            raise Malformed(NAME, "bad_header", self.off, f"client id length {n}")
        if n > 0 and not printable(self.buf.view_at(self.off + REQUEST_FIXED, n)):
            raise Malformed(NAME, "bad_header", self.off, "client id not printable")

    def __repr__(self) -> str:
        return (f"RequestHeader(size={self.message_size}, api={self.api_key}, v={self.api_version}, "
                f"corr={self.correlation_id}, client_id={self.client_id!r})")


class ResponseHeader:
    """A view over a response's size prefix and correlation id."""

    __slots__ = ("buf", "off")

    def __init__(self, buf: LargeBuffer, off: int = 0) -> None:
        self.buf = buf
        self.off = off

    @property
    def message_size(self) -> int:
        return self.buf.i32be_at(self.off)

    @property
    def correlation_id(self) -> int:
        return self.buf.i32be_at(self.off + 4)

    def body_offset(self, api_key: int, api_version: int) -> int:
        pos = self.off + 8
        if apis.response_header_flexible(api_key, api_version):
            r = self.buf.reader(pos, min(self.off + 4 + self.message_size, len(self.buf)))
            skip_tags(r)
            pos = r.offset
        return pos
