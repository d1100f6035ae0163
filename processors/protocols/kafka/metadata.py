"""Metadata (API key 3), versions 0-13: the response fills the topic-id -> name cache.

Request:  topics:[ [v10+ topic_id:UUID] name:STRING (nullable v10+) <tags> ] (null = all, v1+)
          [v4+ allow_auto_topic_creation:bool] [v8-10 include_cluster_authorized_operations:bool]
          [v8+ include_topic_authorized_operations:bool] <tags>
Response: [v3+ throttle_time_ms:i32]
          brokers:[ node_id:i32 host:STRING port:i32 [v1+ rack:NULLABLE_STRING] <tags> ]
          [v2+ cluster_id:NULLABLE_STRING] [v1+ controller_id:i32]
          topics:[ error_code:i16 name:STRING (nullable v12+) [v10+ topic_id:UUID] [v1+ is_internal:bool]
                   partitions:[ error_code:i16 partition_index:i32 leader_id:i32 [v7+ leader_epoch:i32]
                                replica_nodes:[i32] isr_nodes:[i32] [v5+ offline_replicas:[i32]] <tags> ]
                   [v8+ topic_authorized_operations:i32] <tags> ]
          [v8-10 cluster_authorized_operations:i32] [v13+ error_code:i16] <tags>
Flexible from v9. Requests make no span by default; only responses are walked.
"""

from __future__ import annotations

from processors.protocols.errors import Malformed
from service.largebuf import LargeBufferReader

from .codec import read_array_len, read_string, read_uuid, skip_string, skip_tags, topic_name
from .records import Walker
from .state import ZERO_UUID, Msg, u_array

MAX_VERSION = 13


def u_broker(r: LargeBufferReader, m: Msg) -> None:
    r.skip(4)
    skip_string(r, m.flex)
    r.skip(4)
    if m.version >= 1:
        skip_string(r, m.flex)
    if m.flex:
        skip_tags(r)


def u_cluster(r: LargeBufferReader, m: Msg) -> None:
    if m.version >= 2:
        skip_string(r, m.flex)
    if m.version >= 1:
        r.skip(4)


def u_topic_head(r: LargeBufferReader, m: Msg) -> tuple[str | None, bytes | None]:
    r.skip(2)
    off = r.offset
    v = read_string(r, m.flex)
    try:
        name = topic_name(v, off) if v is not None else None
    except Malformed:  # a topic the broker rejected may echo any name: just don't cache it
        name = None
    tid = read_uuid(r) if m.version >= 10 else None
    if m.version >= 1:
        r.skip(1)
    return name, tid


def u_partition(r: LargeBufferReader, m: Msg) -> None:
    flex = m.flex
    r.skip(10 + (4 if m.version >= 7 else 0))
    for _ in range(3 if m.version >= 5 else 2):
        n = read_array_len(r, flex)
        if n > 0:
            r.skip(4 * n)
    if flex:
        skip_tags(r)


def u_topic_tail(r: LargeBufferReader, m: Msg) -> None:
    if m.version >= 8:
        r.skip(4)
    if m.flex:
        skip_tags(r)


def walk_response(m: Msg, req: Msg) -> Walker:
    if m.version >= 3:
        yield 4
    n = yield u_array
    for _ in range(n):
        yield u_broker
    yield u_cluster
    n = yield u_array
    cache = m.cache
    for _ in range(n):
        name, tid = yield u_topic_head
        if cache is not None and name is not None and tid is not None and tid != ZERO_UUID:
            cache.put(tid, name)
        np = yield u_array
        for _ in range(np):
            yield u_partition
        yield u_topic_tail
    # cluster_authorized_operations, error_code and tags follow: nothing needed there.
