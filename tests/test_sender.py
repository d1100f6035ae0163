"""The shared send/retry loop and sending queue, driven by a scripted ``send`` callable.

These check the loop's arithmetic and bookkeeping deterministically (the backoff
waits are recorded instead of slept); the same loop against real gRPC and HTTP
endpoints is exercised in tests/test_otlp.py and tests/test_otlphttp.py.
"""

from __future__ import annotations

import itertools
import threading
import time

import pytest

from exporters.sender import MAX_SERVER_DELAY, MemoryQueue, QueueConfig, RetryConfig, Sender, SendError
from service.pipeline import blocking
from tests.support.otlp_sink import metric

_ids = itertools.count()


class RecordingStop(threading.Event):
    """Stands in for the stop event: records each backoff wait instead of sleeping."""

    def __init__(self) -> None:
        super().__init__()
        self.waits: list[float] = []

    def wait(self, timeout: float | None = None) -> bool:
        if timeout is not None and timeout > 0.5:  # the consumers' idle polls are not backoff waits
            self.waits.append(timeout)
            return self.is_set()
        return super().wait(timeout)


def scripted(*outcomes):
    """A send() that raises/returns the given outcomes in turn, then succeeds."""
    it = iter(outcomes)
    calls = []

    def send(data: bytes) -> int:
        calls.append(data)
        o = next(it, 0)
        if isinstance(o, Exception):
            raise o
        return o
    send.calls = calls
    return send


def sender(send, retry=None, queue=None) -> Sender:
    r = RetryConfig.model_validate({"initial_interval": "1s", "max_interval": "8s", "multiplier": 2,
                                    "randomization_factor": 0, "max_elapsed_time": "60s", **(retry or {})})
    q = QueueConfig.model_validate({"enabled": False, **(queue or {})})
    s = Sender(f"sender/t{next(_ids)}", send, r, q)
    s._stop = RecordingStop()
    return s


def unavailable(delay=None) -> SendError:
    return SendError("UNAVAILABLE", True, delay)


def test_backoff_is_exponential_and_capped():
    send = scripted(*[unavailable() for _ in range(6)])
    s = sender(send)
    assert s.submit(b"x", 10)
    assert s._stop.waits == [1, 2, 4, 8, 8, 8]
    assert len(send.calls) == 7
    assert metric("wirespan_exporter_retries_total", exporter=s.id) == 6
    assert metric("wirespan_exporter_sent_spans_total", exporter=s.id) == 10


def test_jitter_stays_within_the_randomization_factor():
    s = sender(scripted(*[unavailable() for _ in range(200)]),
               retry={"randomization_factor": 0.5, "max_interval": "1s", "max_elapsed_time": 0})
    s.submit(b"x", 1)
    assert all(0.5 <= w <= 1.5 for w in s._stop.waits) and len(set(s._stop.waits)) > 100


def test_server_delay_wins_when_longer():
    s = sender(scripted(unavailable(delay=7.0), unavailable(delay=0.1)))
    s.submit(b"x", 1)
    assert s._stop.waits == [7.0, 2.0]


def test_server_delay_is_capped():
    s = sender(scripted(unavailable(delay=10 * 86400.0)), retry={"max_elapsed_time": 0})
    s.submit(b"x", 1)
    assert s._stop.waits == [MAX_SERVER_DELAY]


def test_max_elapsed_time_with_real_time():
    s = sender(scripted(*[unavailable() for _ in range(1000)]),
               retry={"initial_interval": "10ms", "max_interval": "20ms", "max_elapsed_time": "200ms"})
    s._stop = threading.Event()  # really sleep
    t0 = time.monotonic()
    assert not s.submit(b"x", 5)
    assert 0.1 < time.monotonic() - t0 < 1.0
    assert metric("wirespan_exporter_send_failed_spans_total", exporter=s.id, reason="retries_exhausted") == 5


def test_permanent_error_is_not_retried():
    send = scripted(SendError("INVALID_ARGUMENT", False))
    s = sender(send)
    assert not s.submit(b"x", 3)
    assert len(send.calls) == 1 and s._stop.waits == []
    assert metric("wirespan_exporter_send_failed_spans_total", exporter=s.id, reason="INVALID_ARGUMENT") == 3


def test_retry_disabled_means_one_attempt():
    send = scripted(unavailable())
    s = sender(send, retry={"enabled": False})
    assert not s.submit(b"x", 2)
    assert len(send.calls) == 1
    assert metric("wirespan_exporter_send_failed_spans_total", exporter=s.id, reason="UNAVAILABLE") == 2


def test_partial_success_counts():
    s = sender(scripted(4))
    s.submit(b"x", 10)
    assert metric("wirespan_exporter_sent_spans_total", exporter=s.id) == 6
    assert metric("wirespan_exporter_send_failed_spans_total", exporter=s.id, reason="rejected") == 4


def test_a_bug_in_send_does_not_kill_the_consumer():
    send = scripted(RuntimeError("boom"))
    s = sender(send, queue={"enabled": True, "num_consumers": 1})
    s._stop = threading.Event()
    s.start()
    s.submit(b"a", 1)
    s.submit(b"b", 2)
    assert s.flush(5)
    s.shutdown()
    assert metric("wirespan_exporter_send_failed_spans_total", exporter=s.id, reason="internal") == 1
    assert metric("wirespan_exporter_sent_spans_total", exporter=s.id) == 2


def test_memory_queue_bounds_in_spans():
    q = MemoryQueue(100, "mq/a")
    assert q.put(b"a", 60) and not q.put(b"b", 41) and q.put(b"c", 40)
    it = q.get(0)
    assert it.data == b"a" and q.size == 100 and q.queued == 40
    q.ack(it)
    assert q.size == 40 and q.put(b"d", 60)


def test_finite_producer_waits_on_a_full_queue_instead_of_dropping():
    gate = threading.Event()

    def send(data: bytes) -> int:
        gate.wait(10)
        return 0
    s = sender(send, queue={"enabled": True, "num_consumers": 1, "queue_size": 100})
    s._stop = threading.Event()
    s.start()
    for _ in range(2):
        assert s.submit(b"x", 50)
    # A live producer is refused (counted) ...
    assert not s.submit(b"x", 50)
    assert metric("wirespan_exporter_enqueue_failed_spans_total", exporter=s.id) == 50
    # ... a finite one (what the pipeline marks for capture files) waits for room.
    done = []

    def finite_producer() -> None:
        with blocking(True):
            done.append(s.submit(b"x", 50))
    t = threading.Thread(target=finite_producer, daemon=True)
    t.start()
    time.sleep(0.2)
    assert done == []
    gate.set()
    t.join(5)
    assert done == [True]
    s.shutdown()
    assert metric("wirespan_exporter_sent_spans_total", exporter=s.id) == 150


@pytest.mark.parametrize("bad", [
    {"initial_interval": "0s"},
    {"initial_interval": "10s", "max_interval": "1s"},
    {"multiplier": 0.5},
    {"randomization_factor": 2},
    {"max_elapsed_time": "1s", "initial_interval": "5s"},
    {"initial_intervall": "1s"},
])
def test_retry_config_errors(bad):
    with pytest.raises(ValueError):
        RetryConfig.model_validate(bad)


def test_queue_config_errors():
    with pytest.raises(ValueError):
        QueueConfig.model_validate({"enabled": False, "storage": "/tmp/x"})
    with pytest.raises(ValueError):
        QueueConfig.model_validate({"num_consumers": 0})
