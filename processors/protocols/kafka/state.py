"""What the Kafka walkers share: per-message context, per-topic results, common units,
and the bounded topic-id -> name cache.

The walkers (produce.py, fetch.py, metadata.py, records.py) are generators. They
yield either a *unit* -- a function ``unit(reader, msg) -> value`` that decodes one
small, bounded piece (a topic name, a partition's fixed fields) -- or an ``int``:
a number of bytes to skip (record data). The session (session.py) runs a unit
when its bytes may be there; if the window ends first, it waits for more bytes
and runs the same unit again. Skips are consumed (and released) as bytes arrive,
so a 100 MB produce costs no more memory than the largest unit.
"""

from __future__ import annotations

from collections import OrderedDict

from processors.protocols.errors import Malformed
from service.largebuf import LargeBufferReader

from .codec import NAME, read_array_len, read_string, read_uuid, skip_tags, topic_name

#: Topic ids kept for name lookup; Kafka clusters rarely have more topics than this.
DEFAULT_TOPIC_ID_CACHE = 10_000


class TopicData:
    """One topic of one exchange: request facts, then response facts merged in."""

    __slots__ = (
        "data_partitions",
        "error",
        "error_partition",
        "name",
        "offsets",
        "partitions",
        "records",
        "records_unknown",
        "topic_id",
        "traceparent",
    )

    def __init__(self, name: str | None, topic_id: bytes | None, partitions: list[int] | None = None,
                 offsets: dict[int, int] | None = None) -> None:
        self.name = name
        self.topic_id = topic_id
        self.partitions: list[int] = partitions if partitions is not None else []
        # partition -> fetch offset (Fetch) or base offset (Produce response)
        self.offsets: dict[int, int] = offsets if offsets is not None else {}
        self.data_partitions: list[int] = []  # Fetch response partitions that returned records
        self.records = 0
        self.records_unknown = False  # some record data was skipped unread (cap, truncation)
        self.traceparent: bytes | None = None
        self.error = 0
        self.error_partition = -1

    @property
    def key(self) -> str | bytes:
        return self.name if self.name is not None else (self.topic_id or b"")


class Msg:
    """Parse context of one request or response (the walker's ``m``)."""

    __slots__ = (
        "acks",
        "api_key",
        "by_key",
        "cache",
        "client_id",
        "corr",
        "end_ns",
        "error",
        "flex",
        "rec_left",
        "response",
        "scan_left",
        "start_ns",
        "topics",
        "truncated",
        "version",
        "want_tp",
    )

    def __init__(self, api_key: int, version: int, flex: bool, corr: int) -> None:
        self.api_key = api_key
        self.version = version
        self.flex = flex
        self.corr = corr
        self.client_id: str | None = None
        self.start_ns = 0
        self.end_ns = 0
        self.topics: list[TopicData] = []
        self.by_key: dict[str | bytes, TopicData] = {}
        self.acks = -1
        self.rec_left = 0
        self.scan_left = 0
        self.truncated = False
        self.want_tp = True
        self.error = 0
        self.cache: TopicIdCache | None = None
        self.response = False

    def topic(self, key: tuple[str | None, bytes | None]) -> TopicData:
        """The topic entry for a (name, id) key, created in first-seen order."""
        name, tid = key
        k = name if name is not None else (tid or b"")
        if not self.by_key and self.topics:  # the fast path appends to topics only
            self.by_key = {t.key: t for t in self.topics}
        t = self.by_key.get(k)
        if t is None:
            t = TopicData(name, tid)
            self.by_key[k] = t
            self.topics.append(t)
        return t


def resp_topic(req: Msg, key: tuple[str | None, bytes | None]) -> TopicData:
    """The request's topic a response entry belongs to.

    A zero topic id in a response means "no id" (Kafka's Uuid.ZERO_UUID; Tansu answers
    unknown ids so): it belongs to the request's only topic, or to none (dropped).
    """
    if key[1] == ZERO_UUID:
        if len(req.topics) == 1:
            return req.topics[0]
        return TopicData(None, ZERO_UUID)  # not attached to the exchange
    return req.topic(key)


class TopicIdCache:
    """Bounded LRU of topic id -> name, filled from Metadata responses (v10+).

    One per protocols processor (it hangs on the Kafka ``Settings`` object), shared
    by all its connections: clients learn ids on one connection (often the
    bootstrap one) and use them on another. Ids are random 128-bit UUIDs, so
    sharing across clusters cannot mix them up.
    """

    __slots__ = ("_d", "max_size")

    def __init__(self, max_size: int = DEFAULT_TOPIC_ID_CACHE) -> None:
        self._d: OrderedDict[bytes, str] = OrderedDict()
        self.max_size = max_size

    def put(self, topic_id: bytes, name: str) -> None:
        d = self._d
        d[topic_id] = name
        d.move_to_end(topic_id)
        while len(d) > self.max_size:
            d.popitem(last=False)

    def get(self, topic_id: bytes) -> str | None:
        name = self._d.get(topic_id)
        if name is not None:
            self._d.move_to_end(topic_id)
        return name

    def __len__(self) -> int:
        return len(self._d)


ZERO_UUID = bytes(16)


# -- units shared by the walkers ----------------------------------------------
def u_array(r: LargeBufferReader, m: Msg) -> int:
    return read_array_len(r, m.flex)


def u_tags(r: LargeBufferReader, m: Msg) -> None:
    skip_tags(r)


def u_topic_name(r: LargeBufferReader, m: Msg) -> tuple[str | None, bytes | None]:
    off = r.offset
    return topic_name(read_string(r, m.flex), off), None


def u_topic_id(r: LargeBufferReader, m: Msg) -> tuple[str | None, bytes | None]:
    return None, read_uuid(r)


def bad(reason: str, detail: str = "") -> Malformed:
    return Malformed(NAME, reason, -1, detail)
