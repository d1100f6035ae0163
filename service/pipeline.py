"""Pipelines: build the component graph from a validated config, start, drain, stop, reload.

Graph. Each pipeline is ``receivers -> events->spans processor -> span
processors -> exporters``. Processors are built once per pipeline (they hold
per-pipeline state); a receiver or exporter named by several pipelines is one
instance: a receiver fans its events out to every pipeline that lists it, and
a pipeline's last processor fans its spans out to all its exporters (the same
list object goes to each: exporters must not mutate spans). Between stages the
pipeline puts thin links that count items in and out of span processors
(``wirespan_processor_incoming_items``/``outgoing_items``) and stop a
component's exception from escaping into the receiver's thread (counted as
``reason="error"``). Receivers and the events->spans processor count their own
accepted events and items in/out (they publish in their own rhythm), so the
pipeline does not count those again.

Concurrency model, and why. Each receiver runs its own thread(s). The
protocols stage and the span processors run synchronously in the calling
receiver's thread (they guard their own state with a lock): under the GIL,
handing each item to another thread costs more than parsing it, and a call
chain gives backpressure for free. Batching is the ``batch`` processor's job
(by size, or by timeout from its timer thread). Exporters that do network I/O
own a bounded sending queue with consumer threads, so a slow backend never
blocks parsing. When such a queue is full, a finite receiver (a capture file)
waits and a live receiver drops and counts: the link in front of a receiver's
consumers records in a thread-local whether the producer is finite, and a
queue asks ``should_block()``. Threads that emit on someone's behalf (the batch
timer) carry the flag along with ``blocking(...)``. A processor that refuses
data (``DataRefused``, e.g. a memory limiter) makes the link in front of it
wait and retry for a finite producer and count a drop for a live one.

Lifecycle. Start exporters first, then processors (downstream first), then
receivers, so nothing produces into a stage that is not ready. If a start
raises, everything started so far (and the one that failed) is shut down and
``StartError`` names the component. Shutdown goes in reverse: receivers stop
(``shutdown`` then ``flush``), then each processor in chain order and each
exporter is ``flush``-ed and shut down, so what is in flight drains stage by
stage. ``Runner`` adds the telemetry endpoints and SIGHUP-style reload: a new
config that fails to load, validate or build is refused and logged while the
running pipelines keep going. A reload keeps every component whose config did
not change (``Service(cfg, reuse=old)``): rebuilding an unchanged exporter would
throw away its queue (or empty its file), an unchanged receiver would miss the
traffic of the swap. A processor is kept only if everything after it in its
pipeline is kept as well, so kept components never feed a stage that is gone.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from service import speedups
from service import telemetry as tm
from service.component import CONNECTOR, EXPORTER, PROCESSOR, RECEIVER
from service.config import Config, ConfigError
from service.log import describe
from service.metrics import point_count

__all__ = [
    "Service",
    "Runner",
    "StartError",
    "BuildError",
    "DataRefused",
    "should_block",
    "blocking",
]

log = logging.getLogger("wirespan.pipeline")

#: How long a finite producer waits between retries when a processor refuses data.
REFUSED_RETRY_S = 0.05
#: At most one log line per link per this many seconds for repeated component errors.
ERROR_LOG_INTERVAL_S = 10.0

_tls = threading.local()


def should_block() -> bool:
    """True when the current producer is finite (a file): a full queue should wait, not drop."""
    return getattr(_tls, "block", False)


@contextlib.contextmanager
def blocking(flag: bool) -> Iterator[None]:
    """Run a block on behalf of a producer whose ``should_block()`` was ``flag``."""
    old = getattr(_tls, "block", False)
    _tls.block = flag
    try:
        yield
    finally:
        _tls.block = old


class DataRefused(Exception):
    """Raised by a processor that cannot take data now (memory pressure)."""


class StartError(RuntimeError):
    """A component failed to start; everything started before it was shut down."""


class BuildError(RuntimeError):
    """A component's constructor failed."""


class _Tally:
    __slots__ = ("_lock", "value")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.value = 0

    def add(self, n: int) -> None:
        with self._lock:
            self.value += n


class _Link:
    """In front of one consumer: counts what goes in, contains its failures.

    Spans are counted one an item, metrics one a data point (as the Collector counts them)."""

    __slots__ = ("_drop", "_drop_points", "_err_at", "_stopping", "incoming", "label", "path", "points", "tally",
                 "target")

    def __init__(self, target: Any, path: str, label: str, kind: str, stopping: threading.Event,
                 count: bool = True) -> None:
        self.target = target
        self.path = path
        self.label = label
        # Only exporters need an exact "offered" count (the delivery check); elsewhere
        # the Prometheus counters suffice and a second lock per batch is not worth it.
        self.tally = _Tally() if kind == EXPORTER else None
        self.points = _Tally() if kind == EXPORTER else None   # metric points offered (the delivery check)
        self._err_at = 0.0
        self._stopping = stopping
        if kind == PROCESSOR:
            # events->spans processors count their own incoming items
            self.incoming = tm.PROCESSOR_INCOMING.labels(processor=label) if count else None
            self._drop = lambda reason, n: tm.PROCESSOR_DROPPED.labels(processor=label, reason=reason).inc(n)
            self._drop_points = self._drop
        elif kind == CONNECTOR:
            self.incoming = None
            self._drop = lambda reason, n: tm.CONNECTOR_DROPPED.labels(connector=label, reason=reason).inc(n)
            self._drop_points = self._drop
        else:
            self.incoming = None
            self._drop = lambda reason, n: tm.EXPORTER_SEND_FAILED.labels(exporter=label, reason=reason).inc(n)
            self._drop_points = lambda reason, n: tm.EXPORTER_SEND_FAILED_POINTS.labels(
                exporter=label, reason=reason).inc(n)

    def _call(self, fn: Callable[[list], None], items: list, points: bool = False) -> None:
        n = point_count(items) if points else len(items)
        if self.incoming is not None:
            self.incoming.inc(n)
        tally = self.points if points else self.tally
        if tally is not None:
            tally.add(n)
        drop = self._drop_points if points else self._drop
        while True:
            try:
                fn(items)
                return
            except DataRefused:
                if should_block() and not self._stopping.is_set():
                    time.sleep(REFUSED_RETRY_S)
                    continue
                drop("refused", n)
                return
            except Exception:
                drop("error", n)
                now = time.monotonic()
                if now - self._err_at >= ERROR_LOG_INTERVAL_S:
                    self._err_at = now
                    log.exception("%s raised; %d items dropped (counted with reason=error)", self.path, n,
                                  extra={"component": self.path})
                return

    def consume_events(self, events: list) -> None:
        if events:
            self._call(self.target.consume_events, events)

    def consume_spans(self, spans: list) -> None:
        if spans:
            self._call(self.target.consume_spans, spans)

    def consume_metrics(self, batch: list) -> None:
        if batch:
            self._call(self.target.consume_metrics, batch, points=True)


class _SpanOut:
    """A processor's ``next``: counts its outgoing spans and fans out."""

    __slots__ = ("outgoing", "tally", "targets")

    def __init__(self, label: str, targets: list[_Link], tally: bool = False) -> None:
        # an events->spans processor (tally=True) counts its own outgoing spans
        self.outgoing = None if tally else tm.PROCESSOR_OUTGOING.labels(processor=label)
        self.targets = targets
        self.tally = _Tally() if tally else None   # spans made by a pipeline's events->spans processor

    def consume_spans(self, spans: list) -> None:
        if not spans:
            return
        if self.outgoing is not None:
            self.outgoing.inc(len(spans))
        if self.tally is not None:
            self.tally.add(len(spans))
        for t in self.targets:
            t.consume_spans(spans)

    def consume_metrics(self, batch: list) -> None:
        """A metric processor's output: counted in data points."""
        if not batch:
            return
        if self.outgoing is not None:
            self.outgoing.inc(point_count(batch))
        for t in self.targets:
            t.consume_metrics(batch)


class _MetricOut:
    """A connector's ``next``: fans its metrics out to every metrics pipeline that lists it.

    Metrics leave a connector from its own timer thread (or at shutdown), never from a
    receiver's: they are few, so waiting for room in a full queue (``blocking(True)``) loses
    nothing and stalls no capture.
    """

    __slots__ = ("targets",)

    def __init__(self, targets: list[_Link]) -> None:
        self.targets = targets

    def consume_metrics(self, batch: list) -> None:
        if not batch:
            return
        with blocking(True):
            for t in self.targets:
                t.consume_metrics(batch)


class _EventOut:
    """A receiver's ``next``: marks the thread's backpressure mode, fans out.

    ``lock`` is held while a batch goes downstream; a reload that keeps the receiver holds
    it while it swaps the pipelines behind it, so the receiver waits (a live one's kernel
    buffer holds what arrives meanwhile) and no batch reaches a stage being drained.
    """

    __slots__ = ("finite", "lock", "targets")

    def __init__(self, finite: bool, targets: list[_Link]) -> None:
        self.targets = targets
        self.finite = finite
        self.lock = threading.Lock()

    def consume_events(self, events: list) -> None:
        if not events:
            return
        _tls.block = self.finite
        with self.lock:
            for t in self.targets:
                t.consume_events(events)


def _delivery_counts(eid: str) -> tuple[float, float, float]:
    """(sent, failed, refused by a full queue) so far for exporter ``eid``."""
    return (tm.counter_value(tm.EXPORTER_SENT, exporter=eid),
            tm.counter_value(tm.EXPORTER_SEND_FAILED, exporter=eid),
            tm.counter_value(tm.EXPORTER_ENQUEUE_FAILED, exporter=eid))


def _point_counts(eid: str) -> tuple[float, float, float]:
    """As ``_delivery_counts``, for metric data points."""
    return (tm.counter_value(tm.EXPORTER_SENT_POINTS, exporter=eid),
            tm.counter_value(tm.EXPORTER_SEND_FAILED_POINTS, exporter=eid),
            tm.counter_value(tm.EXPORTER_ENQUEUE_FAILED_POINTS, exporter=eid))


#: Young-generation threshold while pipelines run (CPython's default is 700). The hot path
#: allocates several short-lived objects per event (events, spans, attribute dicts), so the
#: default runs a collection every ~100 events and, as batches in flight grow the heap, full
#: ones that scan every span alive; measured 5-10 % of replay CPU. The only cycles we make
#: are per connection (its two halves), which a later collection still frees.
GC_GEN0_THRESHOLD = 10_000


#: glibc malloc, while pipelines run: a batch's OTLP text is megabytes in a few strings, which
#: glibc's defaults serve by mmap (or from a heap top it then trims) and hand back at once, so
#: every batch faulted its pages in anew: 44k page faults and a fifth of a PostgreSQL replay's
#: CPU beyond its parsing (200k packets, 55k spans), 0.2 s of system time. Kept in the heap up
#: to these sizes, peak RSS stayed the same (79 MB) and the faults were 24k.
MALLOC_MMAP_THRESHOLD = 16 << 20
MALLOC_TRIM_THRESHOLD = 32 << 20
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)

_gc_tuned = False


def tune_malloc() -> bool:
    """glibc's mallopt with the thresholds above, unless the user tuned malloc themselves
    (GLIBC_TUNABLES, MALLOC_*_ environment variables); False where there is no glibc."""
    if os.environ.get("GLIBC_TUNABLES") or any(k.startswith("MALLOC_") for k in os.environ):
        return False
    try:
        import ctypes

        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc (musl, macOS): their allocators, untouched
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    return bool(mallopt(_M_MMAP_THRESHOLD, MALLOC_MMAP_THRESHOLD)) and bool(
        mallopt(_M_TRIM_THRESHOLD, MALLOC_TRIM_THRESHOLD))


def tune_gc() -> None:
    """Freeze what start-up allocated (modules, config models: never garbage) so collections
    stop rescanning it, and collect the young generation less often.

    Once per process: frozen objects are never collected, so freezing again at a reload
    would keep whatever garbage the previous pipelines had left.
    """
    global _gc_tuned
    if _gc_tuned:
        return
    _gc_tuned = True
    gc.freeze()
    t0, t1, t2 = gc.get_threshold()
    if t0 < GC_GEN0_THRESHOLD:
        gc.set_threshold(GC_GEN0_THRESHOLD, t1, t2)
    tune_malloc()
    # Also once per process: say if a C accelerator is missing (the service works, slower).
    missing = [n for n, ok in speedups.status().items() if not ok]
    if missing and not speedups.PURE:
        log.warning("C accelerators not built, pure-Python fallback in use (slower): %s; "
                    "reinstall with a C compiler and Python headers", ", ".join(missing))


class Service:
    """The running graph of one config. Build, ``start()``, ``shutdown()``; not restartable.

    With ``reuse`` (a reload), every component whose config did not change is taken over from
    that running service instead of being built again: an exporter keeps its queue and its
    file, a receiver keeps capturing, a processor keeps its state (batches, connections) when
    everything downstream of it in its pipeline is kept too. ``kept`` lists them; ``start()``
    does not start them again and points them at this service's stages before the receivers
    start; the old service's ``shutdown(keep=...)`` leaves them running.
    """

    def __init__(self, cfg: Config, reuse: Service | None = None) -> None:
        self.cfg = cfg
        self.state = "building"
        self.receivers: dict[str, Any] = {}
        self.exporters: dict[str, Any] = {}
        self.pipelines: dict[str, list[Any]] = {}
        self.current_step = ""
        self._stopping = threading.Event()
        self._started: list[tuple[str, str, Any]] = []   # (kind, path, component) in start order
        self._order: list[tuple[str, str, Any]] = []
        self._exporter_links: dict[str, _Link] = {}
        self.connectors: dict[str, Any] = {}
        self._connector_links: dict[str, _Link] = {}
        self._connector_outs: dict[str, _MetricOut] = {}
        self._span_outs: dict[str, _SpanOut] = {}        # pipeline id -> output of its events->spans processor
        self._event_outs: dict[str, _EventOut] = {}
        self._proc_outs: dict[int, _SpanOut] = {}        # id(processor) -> its next
        self._baseline: dict[str, Any] = {}
        #: id() -> component, for every component running now on behalf of this service
        #: (taken over at build, or started by start()); what a later reload may take over.
        self._live: dict[int, Any] = {}
        self.kept: dict[int, Any] = {}                   # taken over from ``reuse`` (already running)
        self._repoint: list[tuple[Any, list[_Link]]] = []  # kept outs -> this service's stages
        self._reuse = reuse
        try:
            self._build()
        finally:
            self._reuse = None
        self.state = "built"

    # -- build ---------------------------------------------------------------
    def _make(self, kind: str, cid: str, nxt: Any, old: Any = None) -> Any:
        spec = self.cfg.section(kind)[cid]
        try:
            inst = spec.cls(cid, spec.config, nxt)
        except Exception as e:
            raise BuildError(f"{spec.path}: cannot be created: {describe(e)}") from e
        replacing = getattr(inst, "replacing", None)
        if old is not None and type(old) is type(inst) and callable(replacing):
            replacing(old)  # a rebuilt component may carry on from the one it replaces (file: append)
        return inst

    def _take(self, kind: str, cid: str, old: Any) -> Any:
        """``old`` if this reload may keep it: running in the old service, same class and config."""
        prev = self._reuse
        if old is None or prev is None or id(old) not in prev._live:
            return None
        spec, was = self.cfg.section(kind).get(cid), prev.cfg.section(kind).get(cid)
        if spec is None or was is None or spec.cls is not was.cls or spec.config != was.config:
            return None
        self.kept[id(old)] = old
        self._live[id(old)] = old
        return old

    def _build(self) -> None:
        cfg = self.cfg
        prev = self._reuse
        # Built from the exporters back: every stage exists before anything that feeds it.
        # Exporters, then the metrics pipelines, then the connectors feeding them, then the
        # traces pipelines (whose exporters include the connectors), then the receivers.
        used_exp = [e for p in cfg.pipelines.values() for e in p.exporters if e not in cfg.connectors]
        for eid in dict.fromkeys(used_exp):
            old = prev.exporters.get(eid) if prev is not None else None
            inst = self._take(EXPORTER, eid, old)
            if inst is None:
                inst = self._make(EXPORTER, eid, None, old)
            self.exporters[eid] = inst
            self._exporter_links[eid] = _Link(inst, f"exporters::{eid}", eid, EXPORTER, self._stopping)
            self._order.append((EXPORTER, f"exporters::{eid}", inst))
            self._baseline[eid] = _delivery_counts(eid)
            self._baseline[f"points:{eid}"] = _point_counts(eid)
        entries: dict[str, list[_Link]] = {}
        metric_pipes = {pid: p for pid, p in cfg.pipelines.items() if p.signal == "metrics"}
        for pid, p in metric_pipes.items():
            entries[pid] = self._build_chain(pid, p)
        used_conn = [c for p in cfg.pipelines.values() for c in p.exporters if c in cfg.connectors]
        for cid in dict.fromkeys(used_conn):
            targets = [t for pid, p in metric_pipes.items() if cid in p.receivers for t in entries[pid]]
            old = prev.connectors.get(cid) if prev is not None else None
            inst = self._take(CONNECTOR, cid, old)
            if inst is not None:
                out = prev._connector_outs[cid]
                self._repoint.append((out, targets))
            else:
                out = _MetricOut(targets)
                inst = self._make(CONNECTOR, cid, out, old)
            self.connectors[cid] = inst
            self._connector_outs[cid] = out
            self._connector_links[cid] = _Link(inst, f"connectors::{cid}", cid, CONNECTOR, self._stopping)
            self._order.append((CONNECTOR, f"connectors::{cid}", inst))
        for pid, p in cfg.pipelines.items():
            if p.signal == "traces":
                entries[pid] = self._build_chain(pid, p)
        self._build_receivers(entries)

    def _sink(self, eid: str) -> Any:
        """The exporter or connector a pipeline lists among its exporters."""
        return self.exporters[eid] if eid in self.exporters else self.connectors[eid]

    def _build_chain(self, pid: str, p: Any) -> list[_Link]:
        """One pipeline's processors, built from its exporters back; returns its entry links (its first
        processor's, or its exporters' when it has no processor)."""
        cfg = self.cfg
        prev = self._reuse
        targets = [self._exporter_links.get(e) or self._connector_links[e] for e in p.exporters]
        chain: list[Any] = []
        # A processor is kept only with everything after it: the same processors behind it
        # in this pipeline, kept, and the same exporters, kept (its output must not change).
        was = prev.cfg.pipelines.get(pid) if prev is not None else None
        old_chain = prev.pipelines.get(pid, []) if prev is not None else []
        tail_kept = (was is not None and was.exporters == p.exporters
                     and all(id(self._sink(e)) in self.kept for e in p.exporters))
        for k, proc_id in enumerate(reversed(p.processors), 1):
            makes_spans = getattr(cfg.processors[proc_id].cls, "consumes", None) == "events"
            same_place = was is not None and len(was.processors) >= k and was.processors[-k] == proc_id
            old = old_chain[-k] if same_place and len(old_chain) >= k else None
            inst = self._take(PROCESSOR, proc_id, old) if tail_kept else None
            if inst is not None:
                out = prev._proc_outs[id(inst)]   # its next: pointed at this service's stages at start
                self._repoint.append((out, targets))
            else:
                tail_kept = False
                out = _SpanOut(proc_id, targets, tally=makes_spans)
                inst = self._make(PROCESSOR, proc_id, out, old)
            self._proc_outs[id(inst)] = out
            if makes_spans:
                self._span_outs[pid] = out
            chain.insert(0, inst)
            targets = [_Link(inst, f"service::pipelines::{pid}::processors::{proc_id}", proc_id, PROCESSOR,
                             self._stopping, count=not makes_spans)]
            self._order.append((PROCESSOR, f"processors::{proc_id} (pipeline {pid})", inst))
        self.pipelines[pid] = chain
        return targets

    def _build_receivers(self, entries: dict[str, list[_Link]]) -> None:
        cfg = self.cfg
        prev = self._reuse
        used_rcv = [r for p in cfg.pipelines.values() for r in p.receivers if r in cfg.receivers]
        for rid in dict.fromkeys(used_rcv):
            spec = cfg.receivers[rid]
            targets = [t for pid, p in cfg.pipelines.items() if rid in p.receivers for t in entries[pid]]
            self._baseline[f"receiver:{rid}"] = tm.counter_value(tm.RECEIVER_ACCEPTED, receiver=rid)
            old = prev.receivers.get(rid) if prev is not None else None
            inst = self._take(RECEIVER, rid, old)
            if inst is not None:
                out = prev._event_outs[rid]
                self._repoint.append((out, targets))
            else:
                out = _EventOut(bool(getattr(spec.cls, "finite", False)), targets)
                inst = self._make(RECEIVER, rid, out, old)
            self._event_outs[rid] = out
            self.receivers[rid] = inst
            self._order.append((RECEIVER, f"receivers::{rid}", inst))

    # -- lifecycle -----------------------------------------------------------
    def start(self) -> None:
        """Start exporters, processors (downstream first), receivers.

        Raises:
            StartError: naming the component; everything started was shut down.
        """
        if self.state != "built":
            raise RuntimeError(f"cannot start a service in state {self.state}")
        self.state = "starting"
        adopted = False
        for kind, path, comp in self._order:
            if kind == RECEIVER and not adopted:
                self._adopt()   # kept components feed this service's stages from now on
                adopted = True
            self.current_step = f"starting {path}"
            self._started.append((kind, path, comp))   # shutdown() must be safe after a failed start
            if id(comp) in self.kept:
                log.debug("kept %s (config unchanged)", path, extra={"component": path})
                continue
            self._live[id(comp)] = comp
            try:
                comp.start()
            except Exception as e:
                # the caller reports the StartError (one line); the traceback is for debug logs
                log.debug("%s failed to start; shutting down what was started", path, exc_info=True,
                          extra={"component": path})
                self._stop_started(drain=False, keep=self.kept)
                self.state = "failed"
                raise StartError(f"{path}: failed to start: {describe(e)}") from e
            log.debug("started %s", path, extra={"component": path})
        if not adopted:
            self._adopt()
        self.current_step = ""
        self.state = "running"
        tune_gc()
        log.info("pipelines running: %s", ", ".join(self.cfg.pipelines))

    def _adopt(self) -> None:
        for out, targets in self._repoint:
            out.targets = targets
            if isinstance(out, _SpanOut) and out.tally is not None:
                out.tally = _Tally()   # this service's stats count from its start

    def kept_event_outs(self) -> list[_EventOut]:
        """The outputs of the receivers this service keeps: a reload holds their locks while it swaps."""
        return [self._event_outs[rid] for rid, r in self.receivers.items() if id(r) in self.kept]

    def _stop_started(self, drain: bool, keep: dict[int, Any] | None = None) -> list[str]:
        problems: list[str] = []
        self._stopping.set()
        for kind, path, comp in reversed(self._started):
            if keep and id(comp) in keep:
                continue  # taken over by the next service: it keeps running
            self._live.pop(id(comp), None)
            steps = ("shutdown", "flush") if kind == RECEIVER else ("flush", "shutdown")
            for step in steps:
                if step == "flush" and not drain:
                    continue
                self.current_step = f"{step} {path}"
                try:
                    getattr(comp, step)()
                except Exception as e:
                    problems.append(f"{path}: {step} failed: {describe(e)}")
                    log.exception("%s: %s failed", path, step, extra={"component": path})
        self._started[:] = [s for s in self._started if keep and id(s[2]) in keep]
        self.current_step = ""
        return problems

    def shutdown(self, keep: dict[int, Any] | None = None) -> list[str]:
        """Stop receivers, drain every stage into the next, stop exporters. Returns problems found.

        ``keep`` (a reload: the next service's ``kept``) are left running, not drained.
        """
        if self.state in ("stopped", "stopping"):
            return []
        self.state = "stopping"
        problems = self._stop_started(drain=True, keep=keep)
        self.state = "stopped"
        log.info("pipelines stopped" if not keep else f"old pipelines stopped ({len(keep)} components kept)")
        return problems

    # -- observation -----------------------------------------------------------
    def finite(self) -> bool:
        """True when every receiver ends by itself (capture files)."""
        return bool(self.receivers) and all(getattr(r, "finite", False) for r in self.receivers.values())

    def receivers_done(self) -> bool:
        return all(r.done.is_set() for r in self.receivers.values() if getattr(r, "finite", False))

    def wait_receivers(self, timeout: float | None = None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        for r in self.receivers.values():
            if getattr(r, "finite", False):
                left = None if deadline is None else max(0.0, deadline - time.monotonic())
                if not r.done.wait(left):
                    return False
        return True

    def undelivered(self) -> list[str]:
        """Per exporter, spans handed to it that it neither sent nor counted as failed.

        Built-in exporters always count (``wirespan_exporter_sent_spans`` and the
        failure counters), so they are always checked. A plugin exporter is
        checked only if its class sets ``reports_delivery = True``; otherwise
        nothing can be known about what it did with the spans.
        """
        out = []
        for eid, link in self._exporter_links.items():
            exp = self.exporters[eid]
            checked = getattr(exp, "reports_delivery", None)
            if checked is None:
                checked = self.cfg.exporters[eid].source == "built-in"
            if not checked:
                continue
            for what, offered, now, base in (
                    ("spans", link.tally.value, _delivery_counts(eid), self._baseline[eid]),
                    ("metric points", link.points.value, _point_counts(eid), self._baseline[f"points:{eid}"])):
                sent, failed, refused = (int(x - y) for x, y in zip(now, base, strict=True))
                if sent < offered:
                    pending = max(0, offered - sent - failed - refused)
                    out.append(f"exporters::{eid}: {offered - sent} of {offered} {what} not delivered "
                               f"({failed} failed, {refused} refused by a full queue, {pending} still pending)")
        return out

    def stats(self) -> dict[str, Any]:
        """Counts of this service's own traffic (since it was built), for summaries."""
        exp = {}
        for eid, link in self._exporter_links.items():
            sent, failed, refused = (int(x - y) for x, y in zip(_delivery_counts(eid), self._baseline[eid],
                                                                 strict=True))
            exp[eid] = {"offered": link.tally.value, "sent": sent, "failed": failed, "refused": refused}
            if link.points.value:
                exp[eid]["points_offered"] = link.points.value
        return {
            "events": {rid: int(tm.counter_value(tm.RECEIVER_ACCEPTED, receiver=rid)
                                - self._baseline[f"receiver:{rid}"]) for rid in self._event_outs},
            "spans": {pid: o.tally.value for pid, o in self._span_outs.items()},
            "exporters": exp,
        }


def _pusher(r: Any) -> Any:
    """A periodic OTLP reader of the self-metrics (service.selftelemetry), from its config and,
    for what it does not give, the OTEL_EXPORTER_OTLP_* variables (as the SDK reads them)."""
    from exporters.otlp_env import env
    from service.selftelemetry import PeriodicPusher
    o = r.exporter.otlp
    protocol = o.protocol or env("PROTOCOL", "METRICS") or "http/protobuf"
    if protocol not in ("grpc", "http/protobuf"):
        raise ConfigError(f"service::telemetry::metrics::readers: OTLP protocol {protocol!r} is not supported "
                          f"(grpc or http/protobuf)")
    endpoint = o.endpoint
    if endpoint and protocol == "http/protobuf" and endpoint.count("/") <= 2:
        endpoint = endpoint.rstrip("/") + "/v1/metrics"
    timeout = (o.timeout or r.timeout) / 1000.0
    return PeriodicPusher(protocol, endpoint, o.header_map(), r.interval / 1000.0, min(timeout, r.timeout / 1000.0),
                          insecure=o.insecure, compression=o.compression)


class Runner:
    """A long-running service: telemetry endpoints, the current ``Service``, reload.

    ``load`` returns a validated ``Config`` (re-reading files each call, so a
    reload sees edits) and raises ``ConfigError`` for a bad one.
    """

    def __init__(self, load: Callable[[], Config], configure_logs: bool = False) -> None:
        self._load = load
        self._configure_logs = configure_logs
        self.service: Service | None = None
        self._metrics: tm.TelemetryServer | None = None
        self._more_metrics: list[tm.TelemetryServer] = []   # further pull readers
        self._pushers: list[Any] = []                        # periodic OTLP readers
        self._health: tm.TelemetryServer | None = None
        self._telemetry_key: Any = None
        self._telemetry_missing = False   # an endpoint could not listen (port taken): retried at a reload
        self._lock = threading.RLock()
        self.state = "starting"

    # health ----------------------------------------------------------------
    def ready(self) -> tuple[bool, str]:
        svc = self.service
        st = svc.state if svc is not None else self.state
        return (self.state == "running" and st == "running"), (st if self.state == "running" else self.state)

    @property
    def metrics_port(self) -> int | None:
        return self._metrics.port if self._metrics else None

    @property
    def health_port(self) -> int | None:
        return self._health.port if self._health else None

    def _apply_telemetry(self, cfg: Config) -> None:
        t = cfg.telemetry
        if self._configure_logs:
            from service import log as slog
            slog.setup(t.logs.level, t.logs.encoding)
        key = (t.metrics.model_dump_json(), t.health.address, t.health.path)
        if key == self._telemetry_key and not self._telemetry_missing:
            return  # unchanged and serving (one that could not listen is tried again at a reload)
        self._close_telemetry()
        missing = False
        try:
            for i, (address, path) in enumerate(t.metrics.pull_endpoints()):
                srv = self._listen("metrics", address,
                                   lambda a=address, p=path: tm.start_metrics_server(a, p))  # type: ignore[misc]
                missing = missing or srv is None
                if i == 0:
                    self._metrics = srv
                elif srv is not None:
                    self._more_metrics.append(srv)
            for r in t.metrics.periodic_readers():
                self._pushers.append(_pusher(r))
            if t.health.address:
                self._health = self._listen("health", t.health.address,
                                            lambda: tm.start_health_server(t.health.address, self.ready,
                                                                           t.health.path))
                missing = missing or self._health is None
        except ConfigError:
            self._close_telemetry()
            raise
        self._telemetry_key = key
        self._telemetry_missing = missing

    @staticmethod
    def _listen(name: str, address: str, start: Callable[[], tm.TelemetryServer]) -> tm.TelemetryServer | None:
        """Start one endpoint. A malformed address is a config error; a port that is taken (say, by
        a Collector next door) or not ours to bind is a warning: the pipelines run without it."""
        try:
            tm.parse_address(address)
        except ValueError as e:
            raise ConfigError(f"service::telemetry::{name}::address: {e}") from None
        try:
            return start()
        except OSError as e:
            log.warning("service::telemetry::%s::address: cannot listen on %s: %s; running without the %s "
                        "endpoint (free the port or set another address, then SIGHUP)",
                        name, address, (e.strerror or str(e)).lower(), name)
            return None

    def _close_telemetry(self) -> None:
        for s in (self._metrics, self._health, *self._more_metrics):
            if s is not None:
                s.close()
        for p in self._pushers:
            p.close()   # one last export of the values
        self._metrics = self._health = None
        self._more_metrics, self._pushers = [], []
        self._telemetry_key = None

    # lifecycle ----------------------------------------------------------------
    def start(self) -> None:
        """Load, serve telemetry, build and start. Raises ConfigError/BuildError/StartError."""
        with self._lock:
            cfg = self._load()
            self._apply_telemetry(cfg)
            try:
                svc = Service(cfg)
                self.service = svc
                svc.start()
            except Exception:
                self.state = "failed"
                self._close_telemetry()
                raise
            self.state = "running"

    def reload(self) -> bool:
        """Swap in the config as it is now on disk. False (logged) if it was refused or failed.

        Components whose config did not change are kept running (``Service(cfg, reuse=old)``):
        the receivers among them wait, their locks held, while the old pipelines drain and stop
        around them and the new ones start; then they feed the new pipelines.
        """
        with self._lock:
            old = self.service
            try:
                cfg = self._load()
                new = Service(cfg, reuse=old)
            except ConfigError as e:
                log.error("reload refused, the running pipelines keep going: %s", "; ".join(e.errors))
                return False
            except BuildError as e:
                log.error("reload refused, the running pipelines keep going: %s", e)
                return False
            self.state = "reloading"
            log.info("reloading configuration (unchanged and kept: %d components)", len(new.kept))
            # What kept receivers have already captured goes to the old stages first, so no
            # exchange straddles the swap for want of a read (receivers/live.py: settle).
            for rid, r in new.receivers.items():
                if id(r) in new.kept and hasattr(r, "settle") and not r.settle():
                    log.warning("receiver %s did not catch up before the reload; an exchange in flight may "
                                "be split across it (counted)", rid)
            paused = new.kept_event_outs()
            for out in paused:
                out.lock.acquire()
            try:
                return self._swap(old, new, cfg, paused)
            finally:
                for out in paused:
                    out.lock.release()

    def _swap(self, old: Service | None, new: Service, cfg: Config, paused: list[_EventOut]) -> bool:
        if old is not None:
            for p in old.shutdown(keep=new.kept):
                log.error("while stopping the old pipelines: %s", p)
        try:
            self._apply_telemetry(cfg)
            new.start()
        except (StartError, ConfigError) as e:
            log.error("new configuration failed to start (%s); restoring the previous one", e)
            self.service = None
            if old is not None:
                restored: Service | None = None
                try:
                    self._apply_telemetry(old.cfg)
                    restored = Service(old.cfg, reuse=new)   # takes the kept components back
                    self.service = restored
                    restored.start()
                except Exception as e2:
                    log.error("the previous configuration failed to start again: %s", e2)
                    self.state = "failed"
                    for out in paused:       # nothing to feed: kept receivers are stopped below
                        out.targets = []
                    for out in paused:
                        out.lock.release()
                    paused.clear()
                    for svc in (restored, new):
                        if svc is not None:
                            svc._stop_started(drain=False)
                    return False
            self.state = "running"
            return False
        self.service = new
        self.state = "running"
        log.info("configuration reloaded")
        return True

    def finished(self) -> bool:
        """True when every receiver is finite and done: nothing more will come."""
        svc = self.service
        return svc is not None and svc.state == "running" and svc.finite() and svc.receivers_done()

    def stop(self) -> list[str]:
        """Drain and stop everything. Returns problems (undelivered spans, failed steps)."""
        with self._lock:
            self.state = "stopping"
            problems: list[str] = []
            svc = self.service
            if svc is not None:
                problems += svc.shutdown()
                problems += svc.undelivered()
            self._close_telemetry()
            self.state = "stopped"
            return problems
