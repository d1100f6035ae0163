"""Kafka: Produce, Fetch and Metadata at every version, zero-copy over the connection buffer.

A protocol module per processors/protocols/base.py: ``NAME``, ``DEFAULT_PORTS``,
``Settings``, ``detect`` and ``Session``. Spans per design.md §3: Produce ->
``send {topic}`` (PRODUCER), Fetch -> ``poll {topic}`` (CONSUMER), one per topic;
Metadata responses fill a bounded topic-id -> name cache for v13+ topic ids.
See README.md in this folder for options and what is buffered.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field, PrivateAttr

from processors.protocols.base import Conn, Detection, ProtocolSettings
from processors.protocols.base import Session as _BaseSession
from service.largebuf import LargeBuffer

from . import apis
from .header import MAX_MESSAGE_SIZE, RequestHeader, ResponseHeader
from .session import KafkaSession, looks_like_request, looks_like_responses
from .state import DEFAULT_TOPIC_ID_CACHE, TopicIdCache

__all__ = ["NAME", "DEFAULT_PORTS", "Settings", "detect", "Session", "RequestHeader", "ResponseHeader", "apis"]

NAME = "kafka"
#: Kafka's registered port (IANA 9092); detection still checks content.
DEFAULT_PORTS = frozenset({9092})

#: Record data scanned per message before the rest is skipped unread (OBI's
#: large-buffer size, 1 MiB, is the precedent).
DEFAULT_MAX_RECORDS_SCAN = 1024 * 1024
#: Requests awaiting a response per connection (Kafka clients default to 5 in flight per broker).
DEFAULT_MAX_PENDING = 1024


class Settings(ProtocolSettings):
    """Options under ``processors: protocols: kafka:``."""

    #: Larger declared message sizes are malformed (Kafka's socket.request.max.bytes default).
    max_message_bytes: int = Field(MAX_MESSAGE_SIZE, ge=16)
    #: Record bytes per message walked to count records; beyond, skipped unread and counted.
    max_records_scan_bytes: int = Field(DEFAULT_MAX_RECORDS_SCAN, ge=0)
    #: Requests awaiting their response per connection; the oldest is evicted (counted).
    max_pending_requests: int = Field(DEFAULT_MAX_PENDING, ge=1)
    #: Topic id -> name entries kept (LRU), shared by the processor's connections.
    topic_id_cache_size: int = Field(DEFAULT_TOPIC_ID_CACHE, ge=1)
    #: Also emit a span (named after the API, e.g. ``JoinGroup``) for the other API keys.
    other_api_spans: bool = False

    _topic_ids: TopicIdCache = PrivateAttr(default=None)  # type: ignore[assignment]

    def model_post_init(self, __context: Any) -> None:
        self._topic_ids = TopicIdCache(self.topic_id_cache_size)

    @property
    def topic_ids(self) -> TopicIdCache:
        # Read from pydantic's private-value dict: ``self._topic_ids`` goes through
        # BaseModel.__getattr__ (3.5 us, measured), and every connection asks once.
        return self.__pydantic_private__["_topic_ids"]  # type: ignore[index]


_DEFAULT_SETTINGS = Settings()


def detect(buf: LargeBuffer | bytes | bytearray | memoryview, from_client: bool | None) -> Detection:
    """A Kafka request header, checked as strictly as OBI does.

    A response is only size + correlation id, too weak alone: server bytes count
    as Kafka only when the roles are known and they are whole responses chaining
    exactly to the end of what was seen.
    """
    if not isinstance(buf, LargeBuffer):
        buf = LargeBuffer(buf)
    if from_client is False:
        resp = looks_like_responses(buf)
        if resp is None:
            return Detection.NEED_MORE
        return Detection.RESPONSE if resp else Detection.NO
    ok = looks_like_request(buf)
    if ok is None:
        return Detection.NEED_MORE
    return Detection.REQUEST if ok else Detection.NO


class Session(_BaseSession):
    """Per-connection Kafka state (see session.py)."""

    protocol = NAME

    def __init__(self, conn: Conn) -> None:
        super().__init__(conn)
        settings = conn.settings if isinstance(conn.settings, Settings) else _DEFAULT_SETTINGS
        self._k = KafkaSession(conn, settings)
        self.feed = self._k.feed  # type: ignore[method-assign]  # the stage calls it per segment: no hop
        if type(self).feed_whole is not None:  # (tests set the class's to None: the buffered path only)
            self.feed_whole = self._k.feed_whole  # type: ignore[method-assign]  # likewise

    def feed(self, from_client: bool, buf: LargeBuffer, ts_ns: int) -> None:
        self._k.feed(from_client, buf, ts_ns)

    def feed_whole(self, from_client: bool, data: Any, ts_ns: int) -> bool:  # type: ignore[override]
        return self._k.feed_whole(from_client, data, ts_ns)

    def gap(self, from_client: bool, ts_ns: int) -> None:
        self._k.gap(from_client, ts_ns)

    def close(self, ts_ns: int, reset: bool = False) -> None:
        self._k.close(ts_ns, reset)

    @property
    def pending(self) -> int:
        return len(self._k.pending)
