"""``file`` exporter: OTLP JSON lines, as the Collector's file exporter writes them.

Each batch becomes one line holding one ``ExportTraceServiceRequest`` in the
OTLP/JSON mapping (``service.model.spans_to_otlp_json``), or, from a metrics pipeline,
one ``ExportMetricsServiceRequest`` (``service.metrics.metrics_to_otlp_json``), so the file can be
replayed into any OTLP/JSON consumer or read line by line. Writes are buffered
and flushed every ``flush_interval`` and at shutdown (nothing written is lost
on a graceful stop). With ``rotation``, a file that would grow past
``max_megabytes`` is renamed ``<name>-<UTC time>.<ext>`` and a new one is
started; only the newest ``max_backups`` renamed files are kept (the
Collector's lumberjack behaviour).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path
from typing import Any, ClassVar

from pydantic import Field, model_validator

from service import telemetry as tm
from service.component import ComponentConfig, Exporter
from service.config import Duration
from service.metrics import MetricBatch, metrics_to_otlp_json, point_count
from service.model import Span, spans_to_otlp_json

__all__ = ["FileExporter", "FileConfig", "RotationConfig"]

log = logging.getLogger(__name__)

#: Collector defaults (fileexporter: rotation max_megabytes 100, max_backups 100; flush_interval 1s).
DEFAULT_MAX_MEGABYTES = 100
DEFAULT_MAX_BACKUPS = 100
DEFAULT_FLUSH_INTERVAL = 1.0
_MIB = 1024 * 1024
_WRITE_BUFFER = 1 << 20


class RotationConfig(ComponentConfig):
    #: Rotate before the file grows past this size.
    max_megabytes: float = Field(DEFAULT_MAX_MEGABYTES, gt=0)
    #: Renamed files kept (oldest deleted first); 0 keeps all.
    max_backups: int = Field(DEFAULT_MAX_BACKUPS, ge=0)


class FileConfig(ComponentConfig):
    #: Where to write (created with its directory if needed).
    path: str
    #: Keep what the file holds and append (default: start it afresh, as the Collector does).
    append: bool = False
    #: How often buffered lines are flushed to the file; 0 flushes every batch.
    flush_interval: Duration = DEFAULT_FLUSH_INTERVAL
    rotation: RotationConfig | None = None

    @model_validator(mode="after")
    def _check(self) -> FileConfig:
        if not self.path.strip():
            raise ValueError("path must not be empty")
        if self.flush_interval < 0:
            raise ValueError("flush_interval must not be negative")
        return self


class FileExporter(Exporter):
    type: ClassVar[str] = "file"
    signals: ClassVar[tuple[str, ...]] = ("traces", "metrics")
    Config = FileConfig

    def __init__(self, id: str, config: FileConfig, next: Any = None) -> None:
        super().__init__(id, config, next)
        self.path = Path(config.path)
        self._lock = threading.Lock()
        self._fh: Any = None
        self._size = 0
        self._stop = threading.Event()
        self._flusher: threading.Thread | None = None
        self._sent = tm.EXPORTER_SENT.labels(exporter=id)
        self._carry_on = False   # a reload rebuilt this exporter: keep what the file holds

    def replacing(self, old: Any) -> None:
        """Called by a reload that rebuilds this exporter (its options changed) in place of ``old``:
        the same file is continued, not started afresh. ``append: false`` empties the file when
        the service starts, not at every SIGHUP (a reload keeps an exporter's data)."""
        try:
            self._carry_on = Path(old.config.path).resolve() == self.path.resolve()
        except (AttributeError, OSError):
            self._carry_on = False

    def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._open("a" if self.config.append or self._carry_on else "w")
        if self.config.flush_interval > 0:
            self._flusher = threading.Thread(target=self._flush_loop, name=f"wirespan-{self.id}-flush", daemon=True)
            self._flusher.start()

    def _open(self, mode: str) -> None:
        self._fh = open(self.path, mode, encoding="utf-8", buffering=_WRITE_BUFFER)
        self._size = self._fh.tell() if mode == "a" else 0

    def _flush_loop(self) -> None:
        while not self._stop.wait(self.config.flush_interval):
            self.flush()

    def consume_spans(self, spans: list[Span]) -> None:
        if self._write(spans_to_otlp_json(spans), len(spans), tm.EXPORTER_SEND_FAILED):
            self._sent.inc(len(spans))

    def consume_metrics(self, batch: MetricBatch) -> None:
        points = point_count(batch)
        if self._write(metrics_to_otlp_json(batch), points, tm.EXPORTER_SEND_FAILED_POINTS):
            tm.EXPORTER_SENT_POINTS.labels(exporter=self.id).inc(points)

    def _write(self, line: str, items: int, failed: Any) -> bool:
        """One line (``line`` and a newline: not appended to it, a copy of megabytes a batch) into
        the file, rotating first if due; False, counted in ``failed``, if it could not."""
        n = (len(line.encode("utf-8")) if self.config.rotation is not None else len(line)) + 1
        with self._lock:
            if self._fh is None:
                failed.labels(exporter=self.id, reason="not_started").inc(items)
                return False
            try:
                rot = self.config.rotation
                if rot is not None and self._size and self._size + n > rot.max_megabytes * _MIB:
                    self._rotate(rot)
                self._fh.write(line)
                self._fh.write("\n")
                self._size += n
                if self.config.flush_interval == 0:
                    self._fh.flush()
            except OSError as e:
                failed.labels(exporter=self.id, reason="write_error").inc(items)
                log.error("%s: cannot write %s: %s", self.id, self.path, e)
                return False
        return True

    def _rotate(self, rot: RotationConfig) -> None:
        self._fh.close()
        stamp = time.strftime("%Y-%m-%dT%H-%M-%S", time.gmtime()) + f".{int(time.time() * 1000) % 1000:03d}"
        backup = self.path.with_name(f"{self.path.stem}-{stamp}{self.path.suffix}")
        i = 1
        while backup.exists():  # two rotations in one millisecond
            backup = self.path.with_name(f"{self.path.stem}-{stamp}-{i}{self.path.suffix}")
            i += 1
        os.replace(self.path, backup)
        self._open("w")
        if rot.max_backups:
            olds = sorted(self.backups(), key=lambda p: p.stat().st_mtime_ns)
            for p in olds[:-rot.max_backups]:
                try:
                    p.unlink()
                except OSError as e:
                    log.warning("%s: cannot remove old backup %s: %s", self.id, p, e)

    def backups(self) -> list[Path]:
        """Rotated files of this exporter, oldest first by name (the name sorts by time)."""
        return sorted(self.path.parent.glob(f"{self.path.stem}-*{self.path.suffix}"))

    def flush(self) -> None:
        with self._lock:
            if self._fh is not None:
                try:
                    self._fh.flush()
                except OSError as e:
                    log.error("%s: flush of %s failed: %s", self.id, self.path, e)

    def shutdown(self) -> None:
        self._stop.set()
        if self._flusher is not None:
            self._flusher.join(5)
        with self._lock:
            if self._fh is not None:
                try:
                    self._fh.flush()
                    os.fsync(self._fh.fileno())
                finally:
                    self._fh.close()
                    self._fh = None
