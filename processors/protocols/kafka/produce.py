"""Produce (API key 0), request and response, versions 0-13.

Request:  [v3+ transactional_id:NULLABLE_STRING] acks:i16 timeout_ms:i32
          topics:[ name:STRING (v0-12) | topic_id:UUID (v13+)
                   partitions:[ index:i32 records:RECORDS <tags> ] <tags> ] <tags>
Response: topics:[ name | topic_id
                   partitions:[ index:i32 error_code:i16 base_offset:i64 [v2+ log_append_time:i64]
                                [v5+ log_start_offset:i64] [v8+ record_errors:[i32 NULLABLE_STRING <tags>]
                                error_message:NULLABLE_STRING] <tags> ] <tags> ]
          [v1+ throttle_time_ms:i32] <tags>
Flexible (compact strings/arrays, <tags>) from v9 (KIP-482); topic ids from v13 (KIP-516).
"""

from __future__ import annotations

from service.largebuf import LargeBufferReader

from .codec import read_array_len, read_bytes_len, skip_string, skip_tags
from .records import Walker, walk_records
from .state import Msg, bad, resp_topic, u_array, u_tags, u_topic_id, u_topic_name

MAX_VERSION = 13
TOPIC_IDS_SINCE = 13


def u_request_prefix(r: LargeBufferReader, m: Msg) -> int:
    if m.version >= 3:
        skip_string(r, m.flex)
    acks = r.read_i16be()
    r.skip(4)  # timeout
    return acks


def u_partition(r: LargeBufferReader, m: Msg) -> tuple[int, int]:
    return r.read_i32be(), read_bytes_len(r, m.flex)


def walk_request(m: Msg) -> Walker:
    m.acks = yield u_request_prefix  # any value: the broker answers INVALID_REQUIRED_ACKS itself
    u_topic = u_topic_id if m.version >= TOPIC_IDS_SINCE else u_topic_name
    n = yield u_array
    for _ in range(n):
        t = m.topic((yield u_topic))
        np = yield u_array
        for _ in range(np):
            idx, rlen = yield u_partition
            if idx < 0:
                raise bad("bad_field", f"partition {idx}")
            t.partitions.append(idx)
            if rlen > 0:
                yield from walk_records(m, rlen, t)
            if m.flex:
                yield u_tags
        if m.flex:
            yield u_tags


def u_partition_response(r: LargeBufferReader, m: Msg) -> tuple[int, int, int]:
    idx = r.read_i32be()
    err = r.read_i16be()
    base = r.read_i64be()
    v = m.version
    if v >= 2:
        r.skip(8)
    if v >= 5:
        r.skip(8)
    if v >= 8:
        flex = m.flex
        for _ in range(read_array_len(r, flex)):
            r.skip(4)
            skip_string(r, flex)
            if flex:
                skip_tags(r)
        skip_string(r, flex)
    if m.flex:
        skip_tags(r)
    return idx, err, base


def walk_response(m: Msg, req: Msg) -> Walker:
    """Merge per-partition errors and base offsets into the request's topics."""
    u_topic = u_topic_id if m.version >= TOPIC_IDS_SINCE else u_topic_name
    n = yield u_array
    for _ in range(n):
        t = resp_topic(req, (yield u_topic))
        np = yield u_array
        for _ in range(np):
            idx, err, base = yield u_partition_response
            if not t.has_partition(idx):
                t.partitions.append(idx)
            t.offsets[idx] = base
            if err and not t.error:
                t.error = err
                t.error_partition = idx
        if m.flex:
            yield u_tags
