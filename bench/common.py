"""What several benchmarks share: a median timer and a stage-like Session feeder."""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Callable
from types import ModuleType
from typing import Any

from processors.protocols.base import Conn

__all__ = ["ItemCounter", "feed_session", "median_seconds"]


def median_seconds(fn: Callable[[], Any], repeats: int = 7) -> float:
    """Median wall seconds of ``repeats`` calls of ``fn``."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def feed_session(mod: ModuleType, batches: list[tuple[bytes, bytes]], chunk: int = 1400) -> int:
    """Feed (requests, replies) batches through ``mod.Session`` in ``chunk``-byte pieces; spans made."""
    spans: list[Any] = []
    conn = Conn(1, "127.0.0.1", 1, "127.0.0.1", 2, spans.append, protocol=mod.NAME)
    s = mod.Session(conn)
    for req, rep in batches:
        for data, side, buf in ((req, True, conn.client_buf), (rep, False, conn.server_buf)):
            mv = memoryview(data)
            for i in range(0, len(mv), chunk):
                buf.append(mv[i:i + chunk], i)
                s.feed(side, buf, i)
    return len(spans)


class ItemCounter:
    """A sink that counts what reaches it (events or spans), from any thread."""

    def __init__(self) -> None:
        self.n = 0
        self.lock = threading.Lock()

    def consume_events(self, events: list) -> None:
        with self.lock:
            self.n += len(events)

    def consume_spans(self, spans: list) -> None:
        with self.lock:
            self.n += len(spans)
