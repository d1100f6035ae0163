"""Fetch (API key 1), request and response, versions 0-18.

Request:  [v0-14 replica_id:i32] max_wait_ms:i32 min_bytes:i32 [v3+ max_bytes:i32]
          [v4+ isolation_level:i8] [v7+ session_id:i32 session_epoch:i32]
          topics:[ topic:STRING (v0-12) | topic_id:UUID (v13+)
                   partitions:[ partition:i32 [v9+ current_leader_epoch:i32] fetch_offset:i64
                                [v12+ last_fetched_epoch:i32] [v5+ log_start_offset:i64]
                                partition_max_bytes:i32 <tags> ] <tags> ]
          [v7+ forgotten_topics_data] [v11+ rack_id] <tags>        (not read: no span needs them)
Response: [v1+ throttle_time_ms:i32] [v7+ error_code:i16 session_id:i32]
          responses:[ topic | topic_id
                      partitions:[ partition_index:i32 error_code:i16 high_watermark:i64
                                   [v4+ last_stable_offset:i64] [v5+ log_start_offset:i64]
                                   [v4+ aborted_transactions:[producer_id:i64 first_offset:i64 <tags>]]
                                   [v11+ preferred_read_replica:i32] records:RECORDS <tags> ] <tags> ] <tags>
Flexible from v12, topic ids from v13. With fetch sessions (v7+, KIP-227) a request
may list no topics at all and the response still carries data: the span set is
the union of both.
"""

from __future__ import annotations

from service.largebuf import LargeBufferReader

from .codec import read_array_len, read_bytes_len, skip_tags
from .records import Walker, walk_records
from .state import Msg, bad, resp_topic, u_array, u_tags, u_topic_id, u_topic_name

MAX_VERSION = 18
TOPIC_IDS_SINCE = 13


def u_request_prefix(r: LargeBufferReader, m: Msg) -> None:
    v = m.version
    r.skip((4 if v <= 14 else 0) + 8 + (4 if v >= 3 else 0) + (1 if v >= 4 else 0) + (8 if v >= 7 else 0))


def u_partition(r: LargeBufferReader, m: Msg) -> tuple[int, int]:
    v = m.version
    part = r.read_i32be()
    if v >= 9:
        r.skip(4)
    offset = r.read_i64be()
    r.skip((4 if v >= 12 else 0) + (8 if v >= 5 else 0) + 4)
    if m.flex:
        skip_tags(r)
    return part, offset


def walk_request(m: Msg) -> Walker:
    yield u_request_prefix
    u_topic = u_topic_id if m.version >= TOPIC_IDS_SINCE else u_topic_name
    n = yield u_array
    for _ in range(n):
        t = m.topic((yield u_topic))
        np = yield u_array
        for _ in range(np):
            part, offset = yield u_partition
            if part < 0:
                raise bad("bad_field", f"partition {part}")
            t.partitions.append(part)
            t.offsets[part] = offset
        if m.flex:
            yield u_tags


def u_response_prefix(r: LargeBufferReader, m: Msg) -> int:
    v = m.version
    if v >= 1:
        r.skip(4)
    if v >= 7:
        err = r.read_i16be()
        r.skip(4)
        return err
    return 0


def u_partition_response(r: LargeBufferReader, m: Msg) -> tuple[int, int, int]:
    v = m.version
    flex = m.flex
    idx = r.read_i32be()
    err = r.read_i16be()
    r.skip(8 + (8 if v >= 4 else 0) + (8 if v >= 5 else 0))
    if v >= 4:
        n = read_array_len(r, flex)
        for _ in range(n):
            r.skip(16)
            if flex:
                skip_tags(r)
    if v >= 11:
        r.skip(4)
    return idx, err, read_bytes_len(r, flex)


def walk_response(m: Msg, req: Msg) -> Walker:
    req.error = yield u_response_prefix
    u_topic = u_topic_id if m.version >= TOPIC_IDS_SINCE else u_topic_name
    n = yield u_array
    for _ in range(n):
        t = resp_topic(req, (yield u_topic))
        np = yield u_array
        for _ in range(np):
            idx, err, rlen = yield u_partition_response
            if not t.has_partition(idx):
                t.partitions.append(idx)
            if err and not t.error:
                t.error = err
                t.error_partition = idx
            if rlen > 0:
                before = t.records
                yield from walk_records(m, rlen, t)
                if t.records > before:
                    t.add_data_partition(idx)
            if m.flex:
                yield u_tags
        if m.flex:
            yield u_tags
