"""Record data (Kafka RECORDS): count records and find the first record's ``traceparent``.

Record batch v2 (magic 2, Kafka >= 0.11) starts with a fixed 61-byte header:
  baseOffset:i64 batchLength:i32 partitionLeaderEpoch:i32 magic:i8 crc:u32
  attributes:i16 lastOffsetDelta:i32 baseTimestamp:i64 maxTimestamp:i64
  producerId:i64 producerEpoch:i16 baseSequence:i32 recordsCount:i32
then records: length:varint attributes:i8 timestampDelta:varlong offsetDelta:varint
  keyLength:varint key valueLength:varint value headersCount:varint
  [headerKeyLength:varint headerKey headerValueLength:varint headerValue]...
Message sets v0/v1 (magic 0/1): offset:i64 messageSize:i32 crc:u32 magic:i8 ... one message each.

The record count comes from each batch header (cheap: one 61-byte unit per batch,
the rest is skipped). Only the first record of the first uncompressed batch is
read, and of it only the header keys and the ``traceparent`` value (copied: 55
bytes); keys and values are skipped unread. Compressed batches (attributes & 7)
are counted but not opened. Fetch responses may end with a partial batch (the
broker cuts at max bytes): it is skipped, not counted and not an error.
"""

from __future__ import annotations

import struct
from collections.abc import Generator
from typing import Any

from service.largebuf import LargeBufferReader

from .state import Msg, TopicData, bad

#: Fixed part of a v2 record batch (Kafka DefaultRecordBatch.RECORD_BATCH_OVERHEAD).
BATCH_HEADER = 61
#: Enough of any batch/message to tell its magic byte: offset, size, epoch/crc, magic.
BATCH_PREFIX = 17
#: The first record's headers are read only when they fit in this much (a bounded unit).
MAX_HEADERS_SCAN = 16 * 1024
#: A traceparent longer than this is not W3C (55 bytes for version 00).
MAX_TRACEPARENT = 128

_PREFIX = struct.Struct(">qiib")  # baseOffset, length, epoch (v2) or crc (v0/1), magic
_V2_REST = struct.Struct(">Ihiqqqhii")  # crc .. recordsCount (44 bytes)

Walker = Generator[Any, Any, Any]


def u_batch_head(r: LargeBufferReader, m: Msg) -> tuple[int, int, int, int]:
    """(length, magic, records count, attributes); count/attributes are 1/0 below magic 2."""
    _, length, _, magic = _PREFIX.unpack(r.read(BATCH_PREFIX))
    if magic == 2 and m.rec_left >= BATCH_HEADER:
        _, attrs, _, _, _, _, _, _, count = _V2_REST.unpack(r.read(BATCH_HEADER - BATCH_PREFIX))
        return length, magic, count, attrs
    return length, magic, 1, 0


def u_record_prefix(r: LargeBufferReader, m: Msg) -> tuple[int, int, int]:
    """(record's total bytes incl. its length varint, bytes read, key length)."""
    start = r.offset
    length = r.read_varint()
    total = (r.offset - start) + length
    r.skip(1)  # attributes
    r.read_varint()  # timestamp delta
    r.read_varint()  # offset delta
    klen = r.read_varint()
    return total, r.offset - start, klen


def u_varint(r: LargeBufferReader, m: Msg) -> tuple[int, int]:
    start = r.offset
    v = r.read_varint()
    return v, r.offset - start


def u_headers(r: LargeBufferReader, m: Msg) -> bytes | None:
    """The ``traceparent`` header's value (copied, <= 128 bytes), or None."""
    w = r.window(m.rec_left)
    n = w.read_varint()
    if n < 0 or n > w.remaining:
        raise bad("bad_record", f"{n} record headers")
    found = None
    for _ in range(n):
        klen = w.read_varint()
        if klen < 0:
            raise bad("bad_record", "header key length")
        key = w.read(klen)
        vlen = w.read_varint()
        if vlen < -1:
            raise bad("bad_record", "header value length")
        if found is None and klen == 11 and key == b"traceparent" and 0 < vlen <= MAX_TRACEPARENT:
            found = w.read_bytes(vlen)  # deliberate small copy: kept for the span's parent
        elif vlen > 0:
            w.skip(vlen)
    return found


def walk_records(m: Msg, n: int, t: TopicData) -> Walker:
    """Count the records in ``n`` bytes of record data; fills ``t.records``/``t.traceparent``."""
    left = n
    first = True
    while left > 0:
        if left < BATCH_PREFIX:
            yield left  # a partial trailing batch (Fetch cuts at max bytes)
            return
        if m.scan_left <= 0:
            t.records_unknown = True
            m.truncated = True
            yield left
            return
        m.rec_left = left
        length, magic, count, attrs = yield u_batch_head
        total = 12 + length
        if length < BATCH_PREFIX - 12:
            raise bad("bad_record", f"batch length {length}")
        if magic > 2 or magic < 0:
            raise bad("bad_record", f"magic {magic}")
        if total > left or (magic == 2 and left < BATCH_HEADER):
            # Partial batch at the end of a fetch: skip what is left.
            yield left - (BATCH_HEADER if magic == 2 and left >= BATCH_HEADER else BATCH_PREFIX)
            return
        used = BATCH_HEADER if magic == 2 else BATCH_PREFIX
        if count < 0:
            raise bad("bad_record", f"records count {count}")
        t.records += count
        if first and magic == 2 and m.want_tp and (attrs & 7) == 0 and count > 0 and t.traceparent is None:
            used += yield from _first_record(m, t, total - BATCH_HEADER)
        m.scan_left -= total
        yield total - used
        left -= total
        first = False


def _first_record(m: Msg, t: TopicData, room: int) -> Walker:
    """Walk the first record to its headers; returns the bytes it consumed."""
    m.rec_left = room
    total, used, klen = yield u_record_prefix
    if total > room or total < used:
        raise bad("bad_record", "record length")
    if klen > 0:
        if used + klen > total:
            raise bad("bad_record", "key length")
        yield klen
        used += klen
    elif klen < -1:
        raise bad("bad_record", "key length")
    vlen, k = yield u_varint
    used += k
    if vlen > 0:
        if used + vlen > total:
            raise bad("bad_record", "value length")
        yield vlen
        used += vlen
    elif vlen < -1:
        raise bad("bad_record", "value length")
    rest = total - used
    if rest < 0:
        raise bad("bad_record", "record length")
    if 0 < rest <= MAX_HEADERS_SCAN:
        m.rec_left = rest
        t.traceparent = yield u_headers
        used = total
    return used
