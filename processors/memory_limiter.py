"""``memory_limiter`` span processor: refuse data before the node runs out of memory.

Options are the Collector's memorylimiterprocessor: ``check_interval``,
``limit_mib`` with ``spike_limit_mib`` (default 20 % of the limit), or
``limit_percentage`` with ``spike_limit_percentage`` of the memory available
(the cgroup v2 ``memory.max`` when set, else MemTotal). The soft limit is
``limit - spike``. A checker thread samples the process RSS (``/proc/self/statm``;
Python has no heap figure like Go's) every ``check_interval``:

- above the soft limit, ``consume_spans`` raises ``MemoryLimitExceeded`` (a
  ``service.pipeline.DataRefused``): the pipeline link in front of this processor
  makes a finite producer (a capture replay) wait and retry, and counts a live
  producer's spans as dropped (``reason="refused"``); ``under_pressure()`` lets a
  receiver slow down before it reads more;
- above the hard limit, a full garbage collection runs at each check;
- below the soft limit again, data flows.

Put it first among the span processors, as in the Collector.
"""

from __future__ import annotations

import gc
import logging
import os
import threading
from pathlib import Path
from typing import Any, ClassVar

from pydantic import Field, model_validator

from service.component import ComponentConfig, SpanProcessor
from service.config import Duration
from service.model import Span
from service.pipeline import DataRefused

__all__ = ["MemoryLimiterConfig", "MemoryLimiterProcessor", "MemoryLimitExceeded", "under_pressure",
           "process_rss_bytes", "available_memory_bytes"]

log = logging.getLogger("wirespan.processor.memory_limiter")

#: The Collector's memorylimiter: spike defaults to 20 % of the limit.
DEFAULT_SPIKE_FRACTION = 0.2
DEFAULT_CHECK_INTERVAL = 1.0
_MIB = 1 << 20
_PAGE = os.sysconf("SC_PAGE_SIZE")
_PRESSURE = threading.Event()


class MemoryLimitExceeded(DataRefused):
    """Memory is above the soft limit: the data was not taken; slow down or drop (counted)."""


def under_pressure() -> bool:
    """True while any memory limiter in this process refuses data (receivers may pause)."""
    return _PRESSURE.is_set()


def process_rss_bytes() -> int:
    with open("/proc/self/statm", "rb") as f:
        return int(f.read().split()[1]) * _PAGE


def available_memory_bytes() -> int:
    """The cgroup v2 limit when one is set, else the machine's MemTotal."""
    try:
        v = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if v.isdigit():
            return int(v)
    except OSError:
        pass
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("cannot determine the memory available")


class MemoryLimiterConfig(ComponentConfig):
    check_interval: Duration = DEFAULT_CHECK_INTERVAL
    limit_mib: int = Field(0, ge=0)
    spike_limit_mib: int | None = Field(None, ge=0)
    limit_percentage: int = Field(0, ge=0, le=100)
    spike_limit_percentage: int | None = Field(None, ge=0, le=100)

    @model_validator(mode="after")
    def _check(self) -> MemoryLimiterConfig:
        if self.check_interval <= 0:
            raise ValueError("check_interval must be greater than zero")
        if bool(self.limit_mib) == bool(self.limit_percentage):
            raise ValueError("set exactly one of limit_mib or limit_percentage")
        if self.limit_mib:
            if self.spike_limit_percentage is not None:
                raise ValueError("spike_limit_percentage goes with limit_percentage, not limit_mib")
            if self.spike_limit_mib is not None and self.spike_limit_mib >= self.limit_mib:
                raise ValueError("spike_limit_mib must be smaller than limit_mib")
        else:
            if self.spike_limit_mib is not None:
                raise ValueError("spike_limit_mib goes with limit_mib, not limit_percentage")
            if self.spike_limit_percentage is not None and self.spike_limit_percentage >= self.limit_percentage:
                raise ValueError("spike_limit_percentage must be smaller than limit_percentage")
        return self

    def limits_bytes(self) -> tuple[int, int]:
        """(soft, hard) limits in bytes."""
        if self.limit_mib:
            hard = self.limit_mib * _MIB
            spike = (self.spike_limit_mib * _MIB if self.spike_limit_mib is not None
                     else int(hard * DEFAULT_SPIKE_FRACTION))
        else:
            total = available_memory_bytes()
            hard = total * self.limit_percentage // 100
            spike = (total * self.spike_limit_percentage // 100 if self.spike_limit_percentage is not None
                     else int(hard * DEFAULT_SPIKE_FRACTION))
        return hard - spike, hard


class MemoryLimiterProcessor(SpanProcessor):
    type: ClassVar[str] = "memory_limiter"
    Config = MemoryLimiterConfig

    def __init__(self, id: str, config: MemoryLimiterConfig, next: Any = None) -> None:
        super().__init__(id, config, next)
        self.soft, self.hard = config.limits_bytes()
        self.refusing = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def check(self) -> int:
        """One measurement; sets ``refusing``. Returns the RSS seen."""
        rss = process_rss_bytes()
        if rss >= self.hard:
            gc.collect()
            rss = process_rss_bytes()
        was = self.refusing
        self.refusing = rss >= self.soft
        if self.refusing != was:
            if self.refusing:
                _PRESSURE.set()
                log.warning("%s: RSS %d MiB above the soft limit %d MiB: refusing data", self.id, rss // _MIB,
                            self.soft // _MIB)
            else:
                _PRESSURE.clear()
                log.info("%s: RSS %d MiB below the soft limit again: accepting data", self.id, rss // _MIB)
        return rss

    def _run(self) -> None:
        while not self._stop.wait(self.config.check_interval):
            try:
                self.check()
            except Exception:  # /proc unreadable: keep data flowing rather than stall the node
                log.exception("%s: memory check failed", self.id)

    def start(self) -> None:
        self.check()
        self._thread = threading.Thread(target=self._run, name=f"{self.id}-check", daemon=True)
        self._thread.start()

    def shutdown(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self.refusing:
            _PRESSURE.clear()
        self.refusing = False

    def consume_spans(self, spans: list[Span]) -> None:
        if self.refusing:
            raise MemoryLimitExceeded(f"{self.id}: memory above the soft limit ({self.soft // _MIB} MiB)")
        self.next.consume_spans(spans)
