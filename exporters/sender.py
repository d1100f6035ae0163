"""The one send/retry loop and sending queue behind every OTLP exporter.

Contract: an exporter encodes spans once into request bytes (``_encode``) and
implements one attempt (``_send(data) -> rejected_spans``), raising ``SendError``
that says whether the failure is retryable and whether the server asked for a
delay. Everything else lives here and is shared by ``otlp`` and ``otlphttp``:

- ``retry_on_failure``: jittered exponential backoff as the Collector's
  configretry (initial_interval, randomization_factor, multiplier, max_interval,
  max_elapsed_time); a server delay (gRPC RetryInfo on any retryable code, HTTP
  Retry-After) is honoured as a lower bound, capped at ``MAX_SERVER_DELAY``;
  retries stop at the deadline, on a permanent error, or when shutdown runs out
  of drain time.
- ``sending_queue``: bounded in spans, ``num_consumers`` threads, drop (counted
  as enqueue failures) or block on overflow; in memory, or on disk when
  ``storage`` names a directory (``exporters.persistent_queue``).
- ``shutdown`` drains the queue within ``drain_timeout``; what is still queued
  then is counted as failed (memory) or left on disk for the next run (storage).

Metrics (label ``exporter``): sent, send_failed{reason}, enqueue_failed, retries,
queue_size, queue_capacity.

Logs (``Outage``): the first failed attempt of an outage is a warning naming the
endpoint and the cause (connection refused, a TLS error, ``HTTP 503: <the body's
message>``, a gRPC status and its details), whether the spans are kept for a retry
or dropped; while it lasts, at most one "still failing" warning per
``OUTAGE_LOG_INTERVAL`` (attempts, spans dropped, the latest cause); the first
success after it says it recovered and how long it took. Every attempt is at debug.
"""

from __future__ import annotations

import collections
import logging
import random
import re
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field, model_validator

from exporters.persistent_queue import PersistentQueue, QueueItem, room_for
from service import telemetry
from service.component import ComponentConfig, Exporter
from service.config import Duration, parse_duration
from service.pipeline import should_block

__all__ = [
    "Duration",
    "parse_duration",
    "RetryConfig",
    "QueueConfig",
    "TlsConfig",
    "SendError",
    "Outage",
    "MemoryQueue",
    "Sender",
    "QueuedExporter",
    "DEFAULT_TIMEOUT",
    "DEFAULT_DRAIN_TIMEOUT",
    "DEFAULT_QUEUE_SIZE",
    "DEFAULT_NUM_CONSUMERS",
    "MAX_SERVER_DELAY",
]

log = logging.getLogger("wirespan.exporter")

# Defaults of the Collector's exporterhelper / configretry (v0.1xx), kept where they mean the same.
DEFAULT_TIMEOUT = 5.0                    # exporterhelper TimeoutConfig: 5s per attempt
DEFAULT_INITIAL_INTERVAL = 5.0           # configretry.NewDefaultBackOffConfig
DEFAULT_RANDOMIZATION_FACTOR = 0.5
DEFAULT_MULTIPLIER = 1.5
DEFAULT_MAX_INTERVAL = 30.0
DEFAULT_MAX_ELAPSED_TIME = 300.0         # 0 means retry until shutdown
#: The Collector counts 1000 *requests*; we bound memory in spans. 100k spans of ~300 encoded
#: bytes is ~30 MB, i.e. ~1000 requests of the batch processor's default 8192/… mix.
DEFAULT_QUEUE_SIZE = 100_000
#: The Collector uses 10 goroutines; sends release the GIL, but on a small node four
#: concurrent requests already saturate one core of encoding and bookkeeping.
DEFAULT_NUM_CONSUMERS = 4
#: How long shutdown keeps sending what is queued (the Collector drains until its context ends).
DEFAULT_DRAIN_TIMEOUT = 10.0
#: A server-requested delay (gRPC RetryInfo, HTTP Retry-After) longer than this is capped: a hostile
#: or broken backend must not park a consumer for days. Same cap for every exporter.
MAX_SERVER_DELAY = 300.0
#: While an outage lasts, at most one "still failing" warning per this many seconds (per exporter).
OUTAGE_LOG_INTERVAL = 30.0

class RetryConfig(ComponentConfig):
    """``retry_on_failure``: as the Collector's configretry.BackOffConfig."""

    enabled: bool = True
    initial_interval: Duration = DEFAULT_INITIAL_INTERVAL
    randomization_factor: float = Field(DEFAULT_RANDOMIZATION_FACTOR, ge=0.0, le=1.0)
    multiplier: float = Field(DEFAULT_MULTIPLIER, ge=1.0)
    max_interval: Duration = DEFAULT_MAX_INTERVAL
    max_elapsed_time: Duration = DEFAULT_MAX_ELAPSED_TIME

    @model_validator(mode="after")
    def _check(self) -> RetryConfig:
        if self.enabled:
            if self.initial_interval <= 0:
                raise ValueError("initial_interval must be > 0")
            if self.max_interval < self.initial_interval:
                raise ValueError("max_interval must be >= initial_interval")
            if self.max_elapsed_time < 0:
                raise ValueError("max_elapsed_time must be >= 0 (0: until shutdown)")
            if 0 < self.max_elapsed_time < self.initial_interval:
                raise ValueError("max_elapsed_time must be 0 or >= initial_interval")
        return self


class QueueConfig(ComponentConfig):
    """``sending_queue``: as exporterhelper's QueueConfig, sized in spans."""

    enabled: bool = True
    num_consumers: int = Field(DEFAULT_NUM_CONSUMERS, ge=1, le=256)
    queue_size: int = Field(DEFAULT_QUEUE_SIZE, ge=1)
    block_on_overflow: bool = False
    #: A directory: the queue lives on disk there and survives restarts and kill -9.
    storage: str | None = None
    drain_timeout: Duration = DEFAULT_DRAIN_TIMEOUT

    @model_validator(mode="after")
    def _check(self) -> QueueConfig:
        if self.storage is not None and not self.enabled:
            raise ValueError("storage needs the sending queue enabled")
        if self.drain_timeout < 0:
            raise ValueError("drain_timeout must be >= 0")
        return self


class TlsConfig(ComponentConfig):
    """``tls``: as configtls.ClientConfig (insecure means plaintext)."""

    insecure: bool = False
    #: Consent to send credentials (an authorization or API-key header, a URL's user:password) in
    #: plaintext to a host that is not loopback; refused without it (exporters/credentials.py).
    insecure_credentials: bool = False
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    server_name_override: str | None = None

    @model_validator(mode="after")
    def _check(self) -> TlsConfig:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together (client certificate)")
        for name in ("ca_file", "cert_file", "key_file"):
            path = getattr(self, name)
            if path is not None and not Path(path).is_file():
                raise ValueError(f"{name}: no such file: {path}")
        if self.insecure and (self.ca_file or self.cert_file):
            raise ValueError("insecure: true sends plaintext; drop ca_file/cert_file or set insecure: false")
        return self


class SendError(Exception):
    """One failed attempt. ``reason`` is a small fixed vocabulary (a metric label)."""

    def __init__(self, reason: str, retryable: bool, delay: float | None = None, message: str = "") -> None:
        super().__init__(f"{reason}: {message}" if message else reason)
        self.reason = reason
        self.retryable = retryable
        self.delay = delay
        self.message = message

    def cause(self) -> str:
        """The failure in a user's words: ``connection refused``, ``HTTP 503: overloaded``,
        ``TLS: certificate verify failed ...``, ``gRPC UNAVAILABLE: ...``."""
        msg = re.sub(r"^\[Errno \d+\] ", "", " ".join(self.message.split()))
        r = self.reason
        if r.startswith("http_") and r[5:].isdigit():
            return f"HTTP {r[5:]}" + (f": {msg}" if msg else "")
        if "SSL" in msg or "TLS" in msg or "certificate" in msg.lower():
            what = f"TLS error: {msg}"
        elif r == "timeout":
            what = f"timed out: {msg}" if msg else "timed out"
        elif r == "transport":
            what = msg[:1].lower() + msg[1:] if msg else "connection failed"
        elif r.isupper():  # a gRPC status code name
            what = f"gRPC {r}" + (f": {msg}" if msg else "")
        else:
            what = f"{r}: {msg}" if msg else r
        return what


class Outage:
    """The log lines of one exporter's send failures: the first failure of an outage at once
    (a warning with the cause), then at most one summary per ``interval`` while it lasts, and
    the recovery. Shared by the consumer threads; ``clock`` is replaceable for tests.
    """

    def __init__(self, exporter_id: str, target: str = "", interval: float = OUTAGE_LOG_INTERVAL,
                 clock: Callable[[], float] = time.monotonic, unit: str = "spans") -> None:
        self.id = exporter_id
        self.unit = unit
        self.target = f" to {target}" if target else ""
        self.interval = interval
        self._clock = clock
        self._lock = threading.Lock()
        self.since: float | None = None    # when the outage began (None: sends are fine)
        self._logged_at = 0.0
        self._attempts = 0                 # failed attempts since the outage began
        self._dropped = 0                  # spans given up on since the outage began

    def failed(self, e: SendError, dropped: int = 0, why: str = "") -> None:
        """An attempt failed; ``dropped`` spans were given up on (0: they are kept for a retry)."""
        with self._lock:
            now = self._clock()
            self._attempts += 1
            self._dropped += dropped
            fate = f"{dropped} {self.unit} dropped ({why})" if dropped else f"will retry; the {self.unit} are kept"
            if self.since is None:
                self.since = self._logged_at = now
                log.warning("%s: export%s failed: %s; %s", self.id, self.target, e.cause(), fate)
            elif now - self._logged_at >= self.interval:
                self._logged_at = now
                log.warning("%s: export%s still failing after %.0fs (%d failed attempts, %d %s dropped): %s",
                            self.id, self.target, now - self.since, self._attempts, self._dropped, self.unit,
                            e.cause())
            else:
                log.debug("%s: export%s failed: %s; %s", self.id, self.target, e.cause(), fate)

    def succeeded(self) -> None:
        if self.since is None:  # the usual case, without the lock (a stale read only delays the line)
            return
        with self._lock:
            if self.since is None:
                return
            log.warning("%s: export%s recovered after %.1fs (%d failed attempts, %d %s dropped meanwhile)",
                        self.id, self.target, self._clock() - self.since, self._attempts, self._dropped, self.unit)
            self.since = None
            self._attempts = self._dropped = 0


class MemoryQueue:
    """A FIFO of encoded requests bounded by the number of spans (or metric points) it holds."""

    #: The gauge of its size (the metrics queue of an exporter has its own).
    size_family: Any = telemetry.EXPORTER_QUEUE_SIZE

    def __init__(self, capacity_spans: int, exporter_id: str = "", block_on_overflow: bool = False) -> None:
        self.capacity = capacity_spans
        self.exporter_id = exporter_id
        self.block_on_overflow = block_on_overflow
        self._items: collections.deque[QueueItem] = collections.deque()
        self._cv = threading.Condition()
        self._closed = False
        self._size = 0      # queued + in flight, in spans
        self._queued = 0

    def put(self, data: bytes, n: int, block: bool | None = None, timeout: float | None = None) -> bool:
        with self._cv:
            if not room_for(self, n, block, timeout):
                return False
            self._items.append(QueueItem(data, n))
            self._size += n
            self._queued += n
            self.size_family.labels(exporter=self.exporter_id).set(self._size)
            self._cv.notify()
            return True

    def get(self, timeout: float | None = None) -> QueueItem | None:
        with self._cv:
            while not self._items:
                if self._closed or not self._cv.wait(timeout):
                    return None
            item = self._items.popleft()
            self._queued -= item.n
            return item

    def ack(self, item: QueueItem) -> None:
        with self._cv:
            self._size -= item.n
            self.size_family.labels(exporter=self.exporter_id).set(self._size)
            self._cv.notify_all()

    release = ack  # nothing survives a restart in memory: the caller counts it as failed

    def drain_items(self) -> list[QueueItem]:
        with self._cv:
            items = list(self._items)
            self._items.clear()
            self._queued = 0
            return items

    @property
    def size(self) -> int:
        return self._size

    @property
    def queued(self) -> int:
        return self._queued

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify_all()


_SENT, _FAILED, _STOPPED = "sent", "failed", "stopped"


#: signal -> (sent, send_failed, enqueue_failed, queue size, queue capacity) metric families.
_SIGNAL_METRICS = {
    "traces": (telemetry.EXPORTER_SENT, telemetry.EXPORTER_SEND_FAILED, telemetry.EXPORTER_ENQUEUE_FAILED,
               telemetry.EXPORTER_QUEUE_SIZE, telemetry.EXPORTER_QUEUE_CAPACITY),
    "metrics": (telemetry.EXPORTER_SENT_POINTS, telemetry.EXPORTER_SEND_FAILED_POINTS,
                telemetry.EXPORTER_ENQUEUE_FAILED_POINTS, telemetry.EXPORTER_METRICS_QUEUE_SIZE,
                telemetry.EXPORTER_METRICS_QUEUE_CAPACITY),
}


class Sender:
    """Queue + consumer threads + the retry loop, around one ``send(data) -> rejected`` callable.

    ``signal`` picks what it counts: spans (``traces``) or metric data points (``metrics``);
    an exporter of both signals has one sender each, with the same queue and retry options
    (a metrics queue on disk lives under ``<storage>/metrics/<exporter>``).
    """

    def __init__(self, exporter_id: str, send: Callable[[bytes], int], retry: RetryConfig, queue: QueueConfig,
                 rng: random.Random | None = None, target: str = "", signal: str = "traces") -> None:
        self.id = exporter_id
        self.signal = signal
        self.outage = Outage(exporter_id, target, unit="spans" if signal == "traces" else "metric points")
        (self._sent_family, self._failed, enqueue_failed, self._size_family,
         self._capacity_family) = _SIGNAL_METRICS[signal]
        self._send = send
        self.retry = retry
        self.qcfg = queue
        self._rng = rng or random.Random()
        self._stop = threading.Event()        # interrupts backoff waits: drain time is over
        self._closing = False                 # no new data accepted
        self._threads: list[threading.Thread] = []
        self._inflight = 0
        self._idle = threading.Condition()
        self.queue: MemoryQueue | PersistentQueue | None = None
        lbl = {"exporter": exporter_id}
        self._m_sent = self._sent_family.labels(**lbl)
        self._m_enqueue_failed = enqueue_failed.labels(**lbl)
        self._m_retries = telemetry.EXPORTER_RETRIES.labels(**lbl)

    @property
    def _unit(self) -> str:
        return "spans" if self.signal == "traces" else "metric points"

    # -- lifecycle ------------------------------------------------------------------
    def start(self) -> None:
        q = self.qcfg
        if q.enabled:
            if q.storage:
                safe = re.sub(r"[^A-Za-z0-9_.-]", "_", self.id) or "exporter"
                where = Path(q.storage) / safe if self.signal == "traces" else Path(q.storage) / self.signal / safe
                self.queue = PersistentQueue(where, q.queue_size, self.id, q.block_on_overflow)
            else:
                self.queue = MemoryQueue(q.queue_size, self.id, q.block_on_overflow)
            self.queue.size_family = self._size_family
            self._capacity_family.labels(exporter=self.id).set(q.queue_size)
            for i in range(q.num_consumers):
                t = threading.Thread(target=self._consume, name=f"{self.id}-sender-{i}", daemon=True)
                t.start()
                self._threads.append(t)

    def submit(self, data: bytes, n: int) -> bool:
        """Queue one encoded request of ``n`` spans (or send it now without a queue)."""
        if self._closing:
            self._m_enqueue_failed.inc(n)
            return False
        if self.queue is None:
            with self._idle:
                self._inflight += 1
            try:
                return self._export(data, n) == _SENT
            finally:
                with self._idle:
                    self._inflight -= 1
                    self._idle.notify_all()
        try:
            # A finite producer (a capture replay) waits for room instead of dropping.
            ok = self.queue.put(data, n, block=self.qcfg.block_on_overflow or should_block())
        except OSError as e:  # the disk under a persistent queue is full or gone
            log.error("%s: cannot queue %d %s: %s", self.id, n, self._unit, e)
            ok = False
        if not ok:
            self._m_enqueue_failed.inc(n)
        return ok

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until everything queued so far has been sent or has failed for good."""
        deadline = time.monotonic() + (self.qcfg.drain_timeout if timeout is None else timeout)
        with self._idle:
            while (self.queue is not None and self.queue.size > 0) or self._inflight:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._idle.wait(min(left, 0.05))
        return True

    def shutdown(self, timeout: float | None = None) -> None:
        """Stop accepting, drain within ``drain_timeout``, then stop the consumers."""
        self._closing = True
        self.flush(timeout)
        self._stop.set()
        q = self.queue
        if q is not None:
            q.close()
        for t in self._threads:
            t.join(timeout=max(DEFAULT_TIMEOUT, 1.0) + 1.0)
        if isinstance(q, MemoryQueue):
            lost = sum(it.n for it in q.drain_items())
            if lost:
                log.error("%s: %d %s still queued at shutdown were dropped", self.id, lost, self._unit)
                self._failed.labels(exporter=self.id, reason="shutdown").inc(lost)
        if q is not None:
            self._size_family.labels(exporter=self.id).set(q.size if isinstance(q, MemoryQueue) else 0)

    # -- consumers ------------------------------------------------------------------
    def _consume(self) -> None:
        q = self.queue
        assert q is not None
        while not self._stop.is_set():
            item = q.get(timeout=0.2)
            if item is None:
                continue
            with self._idle:
                self._inflight += 1
            try:
                result = self._export(item.data, item.n)
            except Exception:  # a bug in a send path must not kill the consumer
                log.exception("%s: unexpected error while sending", self.id)
                self._failed.labels(exporter=self.id, reason="internal").inc(item.n)
                result = _FAILED
            if result == _STOPPED:
                q.release(item)
                if isinstance(q, MemoryQueue):
                    self._failed.labels(exporter=self.id, reason="shutdown").inc(item.n)
            else:
                q.ack(item)
            with self._idle:
                self._inflight -= 1
                self._idle.notify_all()

    def _export(self, data: bytes, n: int) -> str:
        """Send with retries. Returns _SENT, _FAILED (counted) or _STOPPED (shutdown; caller counts)."""
        r = self.retry
        start = time.monotonic()
        interval = r.initial_interval
        while True:
            try:
                rejected = self._send(data)
            except SendError as e:
                if not e.retryable or not r.enabled:
                    self.outage.failed(e, n, "not retryable" if not e.retryable else "retry_on_failure is off")
                    self._failed.labels(exporter=self.id, reason=e.reason).inc(n)
                    return _FAILED
                delay = interval * (1.0 + r.randomization_factor * (2.0 * self._rng.random() - 1.0))
                interval = min(interval * r.multiplier, r.max_interval)
                if e.delay is not None:
                    # the server's throttle wins when longer (Collector rule), within our cap
                    delay = max(delay, min(e.delay, MAX_SERVER_DELAY))
                if r.max_elapsed_time > 0 and time.monotonic() + delay - start > r.max_elapsed_time:
                    self.outage.failed(e, n, f"retried for {time.monotonic() - start:.1f}s, max_elapsed_time")
                    self._failed.labels(exporter=self.id, reason="retries_exhausted").inc(n)
                    return _FAILED
                self.outage.failed(e)
                if self._stop.is_set():
                    return _STOPPED
                log.debug("%s: retrying %d %s in %.2fs: %s", self.id, n, self._unit, delay, e)
                self._m_retries.inc()
                if self._stop.wait(delay):
                    return _STOPPED
                continue
            self.outage.succeeded()
            if rejected:
                self._failed.labels(exporter=self.id, reason="rejected").inc(rejected)
            self._m_sent.inc(max(n - rejected, 0))
            return _SENT


class QueuedExporter(Exporter):
    """Base of the OTLP exporters: encode once in ``consume_spans``/``consume_metrics``, then
    queue and send.

    Subclasses implement ``_encode(spans) -> bytes``, ``_send(data) -> rejected``
    (raising ``SendError``), ``_open()`` and ``_close()``; for metrics,
    ``_encode_metrics(batch) -> bytes`` and ``_send_metrics(data) -> rejected``. The metrics
    sender (its own queue, same options) starts with the first metrics, or at start when a
    persistent queue of metrics is left on disk from a previous run.
    """

    signals: ClassVar[tuple[str, ...]] = ("traces", "metrics")
    retry_config: RetryConfig
    queue_config: QueueConfig

    def __init__(self, id: str, config: Any, next: Any = None) -> None:
        super().__init__(id, config, next)
        # where the spans go, for the outage log lines (otlphttp: its URL; otlp: host:port)
        url = getattr(config, "url", None)
        target = url() if callable(url) else str(getattr(config, "endpoint", "") or "")
        self.sender = Sender(id, self._send, config.retry_on_failure, config.sending_queue, target=target)
        murl = getattr(config, "metrics_url", None)
        self.metrics_sender = Sender(id, self._send_metrics, config.retry_on_failure, config.sending_queue,
                                     target=murl() if callable(murl) else target, signal="metrics")
        self._metrics_started = False
        self._metrics_lock = threading.Lock()

    def start(self) -> None:
        self._open()
        self.sender.start()
        q = self.config.sending_queue
        if q.enabled and q.storage:
            safe = re.sub(r"[^A-Za-z0-9_.-]", "_", self.id) or "exporter"
            if (Path(q.storage) / "metrics" / safe).is_dir():
                self._start_metrics()

    def _start_metrics(self) -> None:
        with self._metrics_lock:
            if not self._metrics_started:
                self.metrics_sender.start()
                self._metrics_started = True

    def consume_spans(self, spans: Sequence[Any]) -> None:
        if not spans:
            return
        self.sender.submit(self._encode(spans), len(spans))

    def consume_metrics(self, batch: Sequence[Any]) -> None:
        from service.metrics import point_count
        n = point_count(batch)
        if not n:
            return
        if not self._metrics_started:
            self._start_metrics()
        self.metrics_sender.submit(self._encode_metrics(batch), n)

    def flush(self) -> None:
        self.sender.flush()
        if self._metrics_started:
            self.metrics_sender.flush()

    def shutdown(self) -> None:
        try:
            self.sender.shutdown()
            if self._metrics_started:
                self.metrics_sender.shutdown()
        finally:
            self._close()

    # -- to implement ---------------------------------------------------------------
    def _open(self) -> None:
        raise NotImplementedError

    def _close(self) -> None:
        raise NotImplementedError

    def _encode(self, spans: Sequence[Any]) -> bytes:
        raise NotImplementedError

    def _send(self, data: bytes) -> int:
        raise NotImplementedError

    def _encode_metrics(self, batch: Sequence[Any]) -> bytes:
        raise NotImplementedError

    def _send_metrics(self, data: bytes) -> int:
        raise NotImplementedError


Compression = Literal["gzip", "none"]
