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
    """One topic of one exchange: request facts, then response facts merged in.

    The rarely-set fields are class defaults (stored in the instance dict only when
    written), so the fast path (flat.py, via ``FastTopic``) creates one with five
    slot stores. ``_p`` holds the partitions as a list, or as the flat tuple the fast
    path unpacked (partition, offset[, tag] per partition: ``_k`` values each), which
    becomes the ``partitions`` list and ``offsets`` dict on first use.
    """

    __slots__ = ("__dict__", "_p", "name", "records", "topic_id", "traceparent")

    records_unknown = False  # some record data was skipped unread (cap, truncation)
    error = 0
    error_partition = -1
    #: Fetch response partitions that returned records (replaced, never mutated in place).
    data_partitions: tuple[int, ...] | list[int] = ()
    # partition -> fetch offset (Fetch) or base offset (Produce response)
    _o: dict[int, int] | None = None
    _k = 2

    def __init__(self, name: str | None, topic_id: bytes | None, partitions: list[int] | None = None,
                 offsets: dict[int, int] | None = None) -> None:
        self.name = name
        self.topic_id = topic_id
        self.records = 0
        self.traceparent: bytes | None = None
        self._p = partitions if partitions is not None else []
        if offsets is not None:
            self._o = offsets

    def _unpack(self) -> None:
        raw = self._p
        k = self._k
        parts = list(raw[0::k])  # type: ignore[index]
        self._p = parts
        offs = dict(zip(parts, raw[1::k], strict=True))  # type: ignore[index]
        if self._o is None:
            self._o = offs

    @property
    def partitions(self) -> list[int]:
        if type(self._p) is not list:
            self._unpack()
        return self._p  # type: ignore[return-value]

    @partitions.setter
    def partitions(self, value: list[int]) -> None:
        self._p = value

    @property
    def offsets(self) -> dict[int, int]:
        if type(self._p) is not list:
            self._unpack()
        o = self._o
        if o is None:
            o = self._o = {}
        return o

    @offsets.setter
    def offsets(self, value: dict[int, int]) -> None:
        self._o = value

    # Reads that spans and response merges need, served from the unpacked tuple in place.
    @property
    def partition_count(self) -> int:
        p = self._p
        return len(p) if type(p) is list else len(p) // self._k  # type: ignore[arg-type]

    @property
    def first_partition(self) -> int:
        return self._p[0]  # type: ignore[index]

    def has_partition(self, idx: int) -> bool:
        p = self._p
        return idx in p if type(p) is list else idx in p[0::self._k]  # type: ignore[index, operator]

    def offset_of(self, idx: int) -> int | None:
        p = self._p
        if type(p) is list:
            o = self._o
            return None if o is None else o.get(idx)
        k = self._k
        for i in range(len(p) - k, -1, -k):  # type: ignore[arg-type]  # the last entry wins, as in a dict
            if p[i] == idx:  # type: ignore[index]
                return p[i + 1]  # type: ignore[index]
        return None

    def add_data_partition(self, idx: int) -> None:
        self.data_partitions = [*self.data_partitions, idx]

    @property
    def key(self) -> str | bytes:
        return self.name if self.name is not None else (self.topic_id or b"")


class FastTopic(TopicData):
    """A TopicData made without ``__init__`` (C-level init): the caller sets ``name``,
    ``topic_id``, ``_p``, ``records`` and ``traceparent``."""

    __slots__ = ()
    __init__ = object.__init__  # type: ignore[assignment]


class FastTopic3(FastTopic):
    """A FastTopic whose ``_p`` tuple has three values per partition (flexible Fetch:
    partition, offset, tagged-field count)."""

    __slots__ = ()
    _k = 3


class Msg:
    """Parse context of one request or response (the walker's ``m``).

    No ``__slots__``: defaults live on the class so a message costs five stores.
    """

    client_id: str | None = None
    start_ns = 0
    end_ns = 0
    by_key: dict[str | bytes, TopicData] | None = None  # built on first Msg.topic()
    acks = -1
    rec_left = 0
    scan_left = 0
    truncated = False
    want_tp = True
    error = 0
    cache: TopicIdCache | None = None
    response = False

    def __init__(self, api_key: int, version: int, flex: bool, corr: int) -> None:
        self.api_key = api_key
        self.version = version
        self.flex = flex
        self.corr = corr
        self.topics: list[TopicData] = []

    def topic(self, key: tuple[str | None, bytes | None]) -> TopicData:
        """The topic entry for a (name, id) key, created in first-seen order."""
        name, tid = key
        k = name if name is not None else (tid or b"")
        by_key = self.by_key
        if by_key is None:  # the fast path appends to topics only
            by_key = self.by_key = {t.key: t for t in self.topics}
        t = by_key.get(k)
        if t is None:
            t = TopicData(name, tid)
            by_key[k] = t
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
