"""``servicegraph`` connector: the service graph (requests, failures, latency per edge) from spans.

Contract: as the Collector's servicegraph connector. An edge is a (client, server) pair of
services, from ``service.name`` of each side's resource:

- a CLIENT (or PRODUCER) span and the SERVER (or CONSUMER) span whose parent it is: the
  client span is stored under (trace id, its span id), the server span under (trace id,
  its parent span id); when both halves have arrived the edge is complete. Unpaired halves
  wait in a store bounded by ``store.max_items`` and ``store.ttl`` (a full store drops the
  new half, counted);
- until traces are assembled (a capture's spans have no parents), a CLIENT span that expires
  unpaired is mapped by its peer (``server.address``, ``server.port``) to the service of a
  SERVER span seen at that address (learned from the SERVER spans, bounded); else, when it
  has one of ``virtual_node_peer_attributes``, it ends at a virtual node named by that
  attribute (``connection_type`` ``database`` for ``db.system.name``, ``messaging_system``
  for ``messaging.system``, ``virtual_node`` otherwise); a SERVER span without a parent that
  expires unpaired has the virtual client ``user``.

Metrics (attributes ``client``, ``server``, ``connection_type`` and the configured
``dimensions`` as ``client_<dim>``/``server_<dim>``): ``traces_service_graph_request_total``,
``traces_service_graph_request_failed_total`` (either side's status is ERROR),
``traces_service_graph_request_server_seconds`` and ``..._client_seconds`` (histograms of
each side's span duration). Outcomes are counted in ``wirespan_connector_servicegraph_edges``.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from typing import Any, ClassVar

from pydantic import Field, model_validator

from connectors.aggregate import Family, FlushLoop, Temporality, temporality_number
from connectors.spanmetrics import Bounds
from service import telemetry as tm
from service.component import ComponentConfig, Connector
from service.config import Duration
from service.metrics import ResourceMetrics
from service.model import Resource, Span, SpanKind, StatusCode

__all__ = ["ServiceGraphConnector", "ServiceGraphConfig", "DEFAULT_BUCKETS", "USER"]

SCOPE = "wirespan/servicegraph"
#: The Collector's latency_histogram_buckets (seconds).
DEFAULT_BUCKETS = (0.002, 0.004, 0.006, 0.008, 0.01, 0.05, 0.1, 0.2, 0.4, 0.8, 1.0, 1.4, 2.0, 5.0, 10.0, 15.0)
#: The virtual client of a root SERVER span nobody called (the Collector's name).
USER = "user"
DEFAULT_TTL = 2.0
DEFAULT_MAX_ITEMS = 1000
#: Peer addresses remembered as a known server's (address, port) -> service.name.
MAX_PEERS = 4096

_CLIENTS = frozenset((int(SpanKind.CLIENT), int(SpanKind.PRODUCER)))
_SERVERS = frozenset((int(SpanKind.SERVER), int(SpanKind.CONSUMER)))
_ERROR = int(StatusCode.ERROR)
_NAMES = ("client", "server", "connection_type")


class StoreConfig(ComponentConfig):
    #: How long an unpaired half waits for the other.
    ttl: Duration = DEFAULT_TTL
    #: Unpaired halves held at once.
    max_items: int = Field(DEFAULT_MAX_ITEMS, ge=1)


class ServiceGraphConfig(ComponentConfig):
    #: Bucket bounds of the latency histograms (seconds or durations).
    latency_histogram_buckets: Bounds = None
    #: Span attributes added per side (``client_<name>``, ``server_<name>``).
    dimensions: list[str] = Field(default_factory=list)
    store: StoreConfig = Field(default_factory=StoreConfig)
    #: Attributes that name the server of a client span nobody answered (first present wins).
    virtual_node_peer_attributes: list[str] = Field(
        default_factory=lambda: ["peer.service", "db.system.name", "messaging.system", "server.address"])
    #: Map an unpaired client span to a known server by its peer address.
    peer_mapping: bool = True
    aggregation_temporality: Temporality = "AGGREGATION_TEMPORALITY_CUMULATIVE"
    metrics_flush_interval: Duration = 60.0
    #: How often unpaired halves past the TTL are settled.
    store_expiration_loop: Duration = 2.0
    #: Edges (client, server, type) a metric holds before the overflow series takes the rest.
    aggregation_cardinality_limit: int = Field(2000, ge=1)

    @model_validator(mode="after")
    def _check(self) -> ServiceGraphConfig:
        if self.metrics_flush_interval <= 0 or self.store_expiration_loop <= 0:
            raise ValueError("metrics_flush_interval and store_expiration_loop must be > 0")
        if self.store.ttl <= 0:
            raise ValueError("store::ttl must be > 0")
        return self


class _Half:
    """One side of an edge waiting for the other."""

    __slots__ = ("at", "client", "server")

    def __init__(self, at: float) -> None:
        self.at = at
        self.client: Span | None = None
        self.server: Span | None = None


def _service(s: Span) -> str:
    return str(s.resource.attributes.get("service.name", "unknown_service"))


class ServiceGraphConnector(Connector):
    type: ClassVar[str] = "servicegraph"
    Config = ServiceGraphConfig

    def __init__(self, id: str, config: ServiceGraphConfig, next: Any = None) -> None:
        super().__init__(id, config, next)
        c = config
        self._lock = threading.Lock()
        self._bounds = tuple(c.latency_histogram_buckets) if c.latency_histogram_buckets else DEFAULT_BUCKETS
        self._temporality = temporality_number(c.aggregation_temporality)
        lim = c.aggregation_cardinality_limit
        self._names = _NAMES + tuple(f"{side}_{d}" for side in ("client", "server") for d in c.dimensions)
        self._total = Family("traces_service_graph_request_total", None, lim, id)
        self._failed = Family("traces_service_graph_request_failed_total", None, lim, id)
        self._server_h = Family("traces_service_graph_request_server_seconds", self._bounds, lim, id)
        self._client_h = Family("traces_service_graph_request_client_seconds", self._bounds, lim, id)
        self._store: OrderedDict[tuple[bytes, bytes], _Half] = OrderedDict()
        self._peers: OrderedDict[tuple[Any, Any], str] = OrderedDict()
        self._last_flush = time.time_ns()
        self._changed = False   # edges since the last emit
        self._flush_loop = FlushLoop(id, c.metrics_flush_interval, self.emit)
        self._expire_loop = FlushLoop(f"{id}-store", c.store_expiration_loop, self._expire_now)
        self.stats = {"paired": 0, "peer": 0, "virtual": 0, "user": 0, "expired": 0, "store_full": 0}

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        self._last_flush = time.time_ns()
        self._flush_loop.start()
        self._expire_loop.start()

    def flush(self) -> None:
        """Settle every unpaired half (nothing more will come) and emit."""
        self._expire(float("inf"))
        self.emit()

    def shutdown(self) -> None:
        self._expire_loop.stop()
        self._flush_loop.stop()
        self._expire(float("inf"))
        if self._changed:   # flush() emitted already when the pipeline drained
            self.emit()

    # -- spans -------------------------------------------------------------------------------
    def consume_spans(self, spans: list[Span]) -> None:
        now = time.monotonic()
        store = self._store
        cap = self.config.store.max_items
        full = paired = 0
        with self._lock:
            for s in spans:
                k = int(s.kind)
                if k in _SERVERS:
                    if self.config.peer_mapping and k == int(SpanKind.SERVER):
                        self._learn_peer(s)
                    key = (s.trace_id, s.parent_span_id) if s.parent_span_id else (s.trace_id, b"\0root" + s.span_id)
                    side = "server"
                elif k in _CLIENTS:
                    key = (s.trace_id, s.span_id)
                    side = "client"
                else:
                    continue
                h = store.get(key)
                if h is None:
                    if len(store) >= cap:
                        full += 1
                        continue
                    h = store[key] = _Half(now)
                setattr(h, side, s)
                if h.client is not None and h.server is not None:
                    del store[key]
                    self._edge(h.client, h.server, "", time.time_ns())
                    paired += 1
            self.stats["store_full"] += full
            self.stats["paired"] += paired
        if full:
            tm.SERVICEGRAPH_EDGES.labels(connector=self.id, outcome="store_full").inc(full)
        if paired:
            tm.SERVICEGRAPH_EDGES.labels(connector=self.id, outcome="paired").inc(paired)

    def _learn_peer(self, s: Span) -> None:
        a = s.attributes
        addr, port = a.get("server.address"), a.get("server.port")
        if addr is None:
            return
        key = (addr, port)
        svc = _service(s)
        if self._peers.get(key) != svc:
            self._peers[key] = svc
            if len(self._peers) > MAX_PEERS:
                self._peers.popitem(last=False)

    def _edge(self, client: Span | None, server: Span | None, conn_type: str, now_ns: int,
              client_name: str | None = None, server_name: str | None = None) -> None:
        """Record one request on an edge (caller holds the lock)."""
        cname = client_name if client_name is not None else _service(client)  # type: ignore[arg-type]
        sname = server_name if server_name is not None else _service(server)  # type: ignore[arg-type]
        key: tuple[Any, ...] = (cname, sname, conn_type)
        dims = self.config.dimensions
        if dims:
            ca = client.attributes if client is not None else {}
            sa = server.attributes if server is not None else {}
            key += tuple(ca.get(d) for d in dims) + tuple(sa.get(d) for d in dims)
        self._changed = True
        t = self._total.get(key, self._names, now_ns)
        t.count += 1
        t.last_ns = now_ns
        failed = any(x is not None and x.status_code == _ERROR for x in (client, server))
        if failed:
            f = self._failed.get(key, self._names, now_ns)
            f.count += 1
            f.last_ns = now_ns
        if server is not None:
            self._server_h.observe(self._server_h.get(key, self._names, now_ns), server.duration_ns / 1e9, now_ns,
                                   server.trace_id, server.span_id, server.end_ns)
        if client is not None:
            self._client_h.observe(self._client_h.get(key, self._names, now_ns), client.duration_ns / 1e9, now_ns,
                                   client.trace_id, client.span_id, client.end_ns)

    def _expire_now(self) -> None:
        self._expire(time.monotonic() - self.config.store.ttl)

    def _expire(self, older_than: float) -> None:
        """Settle the unpaired halves stored before ``older_than`` (monotonic seconds)."""
        counts = {"peer": 0, "virtual": 0, "user": 0, "expired": 0}
        with self._lock:
            store = self._store
            now_ns = time.time_ns()
            while store:
                key, h = next(iter(store.items()))
                if h.at >= older_than:
                    break
                del store[key]
                counts[self._settle(h, now_ns)] += 1
            for k, n in counts.items():
                self.stats[k] += n
        for k, n in counts.items():
            if n:
                tm.SERVICEGRAPH_EDGES.labels(connector=self.id, outcome=k).inc(n)

    def _settle(self, h: _Half, now_ns: int) -> str:
        """An unpaired half past its TTL: an edge to a known peer or a virtual node, or nothing."""
        c, s = h.client, h.server
        if c is not None:
            a = c.attributes
            if self.config.peer_mapping:
                svc = self._peers.get((a.get("server.address"), a.get("server.port")))
                if svc is not None and svc != _service(c):
                    self._edge(c, None, "", now_ns, server_name=svc)
                    return "peer"
            for attr in self.config.virtual_node_peer_attributes:
                v = a.get(attr)
                if v is not None and v != "":
                    ctype = ("database" if "db.system.name" in a else
                             "messaging_system" if "messaging.system" in a else "virtual_node")
                    if attr == "server.address" and a.get("server.port") is not None:
                        v = f"{v}:{a['server.port']}"
                    self._edge(c, None, ctype, now_ns, server_name=str(v))
                    return "virtual"
            return "expired"
        if s is not None and not s.parent_span_id:
            self._edge(None, s, "virtual_node", now_ns, client_name=USER)
            return "user"
        return "expired"

    # -- emission ---------------------------------------------------------------------------
    def collect(self) -> list[ResourceMetrics]:
        now = time.time_ns()
        with self._lock:
            since, self._last_flush = self._last_flush, now
            self._changed = False
            t = self._temporality
            metrics = [m for m in (
                self._total.snapshot("traces_service_graph_request_total", "{request}",
                                     "Requests between two nodes.", t, now, since),
                self._failed.snapshot("traces_service_graph_request_failed_total", "{request}",
                                      "Failed requests between two nodes.", t, now, since),
                self._server_h.snapshot("traces_service_graph_request_server_seconds", "s",
                                        "Time for a request between two nodes, as seen from the server.", t, now,
                                        since),
                self._client_h.snapshot("traces_service_graph_request_client_seconds", "s",
                                        "Time for a request between two nodes, as seen from the client.", t, now,
                                        since),
            ) if m is not None]
            tm.CONNECTOR_SERIES.labels(connector=self.id, metric="traces_service_graph_request_total").set(
                len(self._total.series))
        return [ResourceMetrics(Resource({}), metrics, SCOPE)] if metrics else []

    def emit(self) -> None:
        batch = self.collect()
        if batch and self.next is not None:
            self.next.consume_metrics(batch)
