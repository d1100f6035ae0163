"""Persistent sending queue: unit behaviour, corruption handling, and kill -9 of a real exporter process."""

from __future__ import annotations

import ast
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from exporters.persistent_queue import _HDR, PersistentQueue
from tests.support.capture import free_port
from tests.support.otlp_sink import GrpcSink, metric

ROOT = Path(__file__).resolve().parents[1]


def drain(q: PersistentQueue) -> list[bytes]:
    out = []
    while (it := q.get(timeout=0)) is not None:
        out.append(it.data)
        q.ack(it)
    return out


def test_fifo_ack_and_reopen(tmp_path):
    q = PersistentQueue(tmp_path, 1000, "pq/a")
    for i in range(5):
        assert q.put(b"req%d" % i, 10)
    assert q.size == 50
    first = q.get(timeout=0)
    assert first.data == b"req0"
    q.ack(first)
    second = q.get(timeout=0)  # taken, never acked: the process "dies" with it in flight
    assert second.data == b"req1"
    q.close()
    q2 = PersistentQueue(tmp_path, 1000, "pq/a")
    assert q2.recovered_spans == 40 and q2.size == 40
    assert drain(q2) == [b"req1", b"req2", b"req3", b"req4"]
    q2.close()
    q3 = PersistentQueue(tmp_path, 1000, "pq/a")
    assert q3.size == 0 and drain(q3) == []
    q3.close()
    assert not list(tmp_path.glob("*.seg"))  # fully acked segments are deleted


def test_capacity_in_spans(tmp_path):
    q = PersistentQueue(tmp_path, 100, "pq/b")
    assert q.put(b"x", 60)
    assert not q.put(b"y", 60)
    assert q.put(b"z", 40)
    q.close()


def test_segments_rotate_and_are_deleted_when_acked(tmp_path):
    q = PersistentQueue(tmp_path, 10_000, "pq/c", segment_bytes=256)
    for i in range(50):
        q.put(bytes(100) + b"%d" % i, 1)
    assert len(list(tmp_path.glob("*.seg"))) > 10
    assert len(drain(q)) == 50
    assert len(list(tmp_path.glob("*.seg"))) <= 1
    q.close()


def test_one_process_per_directory(tmp_path):
    q = PersistentQueue(tmp_path, 10, "pq/d")
    with pytest.raises(RuntimeError, match="in use"):
        PersistentQueue(tmp_path, 10, "pq/d")
    q.close()


def _segment(tmp_path: Path) -> Path:
    (seg,) = [p for p in tmp_path.glob("*.seg") if p.stat().st_size]
    return seg


def test_corrupt_record_is_skipped_and_counted(tmp_path):
    q = PersistentQueue(tmp_path, 1000, "pq/e")
    for i in range(3):
        q.put(b"payload-%d" % i * 20, 1)
    q.close()
    seg = _segment(tmp_path)
    raw = bytearray(seg.read_bytes())
    rec = _HDR.size + len(b"payload-0" * 20)
    raw[rec + _HDR.size + 5] ^= 0xFF  # flip a byte inside the second record's payload
    seg.write_bytes(raw)
    before = metric("wirespan_exporter_queue_corrupt_records_total", exporter="pq/e")
    q2 = PersistentQueue(tmp_path, 1000, "pq/e")
    assert drain(q2) == [b"payload-0" * 20, b"payload-2" * 20]
    assert q2.corrupt_records == 1
    assert metric("wirespan_exporter_queue_corrupt_records_total", exporter="pq/e") == before + 1
    q2.close()


def test_truncated_tail_and_garbage_files(tmp_path):
    q = PersistentQueue(tmp_path, 1000, "pq/f")
    q.put(b"A" * 100, 1)
    q.put(b"B" * 100, 1)
    q.close()
    seg = _segment(tmp_path)
    seg.write_bytes(seg.read_bytes()[:-30])  # a torn last write
    (tmp_path / "000000000900.seg").write_bytes(os.urandom(5000))  # garbage
    (tmp_path / "000000000901.seg").write_bytes(b"WSQ1" + b"\xff" * 12)  # absurd length
    q2 = PersistentQueue(tmp_path, 1000, "pq/f")
    assert drain(q2) == [b"A" * 100]
    assert q2.corrupt_records >= 3
    q2.close()
    q3 = PersistentQueue(tmp_path, 1000, "pq/f")  # no crash loop: the bad files are gone or skipped
    assert drain(q3) == []
    q3.close()


def test_torn_ack_file_resends_rather_than_loses(tmp_path):
    q = PersistentQueue(tmp_path, 1000, "pq/g")
    for i in range(3):
        q.put(b"r%d" % i, 1)
    it = q.get(timeout=0)
    q.ack(it)
    q.close()
    ack = next(tmp_path.glob("*.ack"))
    ack.write_bytes(ack.read_bytes()[:5])  # torn: the ack is lost, the record comes back
    q2 = PersistentQueue(tmp_path, 1000, "pq/g")
    assert drain(q2) == [b"r0", b"r1", b"r2"]
    q2.close()


# ---------------------------------------------------------------------------
# kill -9 of a real exporter process (a small script: no CLI dependency here)
# ---------------------------------------------------------------------------
CHILD = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {root!r})
    from exporters.otlp import OtlpConfig, OtlpExporter
    from service.model import Span, SpanKind
    endpoint, storage, start, count = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    cfg = OtlpConfig.model_validate({{
        "endpoint": endpoint, "tls": {{"insecure": True}},
        "retry_on_failure": {{"initial_interval": "50ms", "max_interval": "200ms", "max_elapsed_time": 0}},
        "sending_queue": {{"storage": storage, "num_consumers": 2, "drain_timeout": "20s"}}}})
    e = OtlpExporter("otlp/kill9", cfg)
    e.start()
    spans = [Span("GET /k", SpanKind.SERVER, 1, 2, span_id=(i + 1).to_bytes(8, "big"))
             for i in range(start, start + count)]
    for i in range(0, len(spans), 100):
        e.consume_spans(spans[i:i + 100])
    print("queued", flush=True)
    if sys.argv[5] == "wait":
        time.sleep(3600)
    e.shutdown()
    print("done", flush=True)
""")


def _child(tmp_path: Path, endpoint: str, start: int, count: int, mode: str) -> subprocess.Popen:
    script = tmp_path / "child.py"
    script.write_text(CHILD.format(root=str(ROOT)))
    return subprocess.Popen([sys.executable, str(script), endpoint, str(tmp_path / "queue"), str(start), str(count),
                             mode], stdout=subprocess.PIPE, text=True)


def _wait_line(p: subprocess.Popen, want: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = p.stdout.readline()
        if line.strip() == want:
            return
        if not line and p.poll() is not None:
            raise AssertionError(f"child exited {p.returncode} before {want!r}")
    raise AssertionError(f"no {want!r} from child")


def test_kill_9_while_endpoint_down_then_restart_delivers_everything(tmp_path):
    port = free_port()
    endpoint = f"127.0.0.1:{port}"
    # Phase 1: endpoint up, 1000 spans delivered and acked.
    with GrpcSink(port=port) as sink:
        p = _child(tmp_path, endpoint, 0, 1000, "wait")
        _wait_line(p, "queued")
        assert sink.wait_spans(1000, 20)
        time.sleep(0.3)  # let the acks land
        # Phase 2: endpoint goes down; the same process queues 0 more, a new one 3000 more.
    p.send_signal(signal.SIGKILL)
    p.wait(10)
    p = _child(tmp_path, endpoint, 1000, 3000, "wait")
    _wait_line(p, "queued")
    time.sleep(0.5)  # consumers are retrying against a dead endpoint
    p.send_signal(signal.SIGKILL)  # kill -9 with 3000 spans only on disk
    assert p.wait(10) == -signal.SIGKILL
    assert list((tmp_path / "queue").rglob("*.seg"))
    # Phase 3: endpoint up, restart: everything not acked arrives.
    with GrpcSink(port=port) as sink2:
        p = _child(tmp_path, endpoint, 0, 0, "drain")
        _wait_line(p, "done", timeout=60)
        assert p.wait(10) == 0
        want = {(i + 1).to_bytes(8, "big") for i in range(1000, 4000)}
        assert sink2.unique_spans() == want
        assert sink2.span_count == 3000  # acked spans of phase 1 were not sent again
    assert sink.span_count == 1000


def test_exporter_with_storage_survives_restart_in_process(tmp_path):
    """Same scenario without a subprocess: shutdown with the endpoint down keeps spans on disk."""
    from exporters.otlp import OtlpConfig, OtlpExporter
    from tests.support.otlp_sink import make_spans

    port = free_port()
    cfg = OtlpConfig.model_validate({
        "endpoint": f"127.0.0.1:{port}", "tls": {"insecure": True},
        "retry_on_failure": {"initial_interval": "20ms", "max_interval": "50ms"},
        "sending_queue": {"storage": str(tmp_path), "drain_timeout": "200ms"}})
    e = OtlpExporter("otlp/pq-restart", cfg)
    e.start()
    spans = make_spans(700)
    for i in range(0, 700, 100):
        e.consume_spans(spans[i:i + 100])
    e.shutdown()
    assert metric("wirespan_exporter_send_failed_spans_total", exporter="otlp/pq-restart", reason="shutdown") == 0
    with GrpcSink(port=port) as sink:
        e = OtlpExporter("otlp/pq-restart", cfg)
        e.start()
        assert sink.wait_spans(700, 15)
        e.shutdown()
        assert sink.unique_spans() == {s.span_id for s in spans}


# ---------------------------------------------------------------------------
# kill -9 of the real `wirespan run` (pcap replay -> protocols -> batch -> otlp with storage)
# ---------------------------------------------------------------------------
RUN_CONFIG = """
receivers:
  pcap:
    path: {cap}
    filter: {{ports: [{ports}]}}
processors:
  protocols: {{}}
  batch: {{timeout: 50ms, send_batch_size: 50}}
exporters:
  otlp:
    endpoint: 127.0.0.1:{port}
    tls: {{insecure: true}}
    retry_on_failure: {{initial_interval: 100ms, max_interval: 500ms, max_elapsed_time: 0}}
    sending_queue: {{storage: {storage}, drain_timeout: 60s}}
service:
  pipelines:
    traces: {{receivers: [pcap], processors: [protocols, batch], exporters: [otlp]}}
  telemetry:
    metrics: {{address: "127.0.0.1:{mport}"}}
    health: {{address: ""}}
"""


def _queue_size(mport: int) -> float:
    import urllib.request
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=2).read().decode()
    except OSError:
        return -1
    for line in text.splitlines():
        if line.startswith('wirespan_exporter_queue_size{exporter="otlp"}'):
            return float(line.split()[-1])
    return -1


def test_kill_9_of_wirespan_run_then_restart_delivers_every_span(tmp_path):
    from bench.gen_http_capture import generate

    cap = tmp_path / "http.pcap"
    conns, reqs = 4, 50
    generate(str(cap), connections=conns, requests=reqs)
    port = free_port()
    storage = tmp_path / "queue"

    def run(ports: str) -> tuple[subprocess.Popen, int]:
        mport = free_port()
        cfg = tmp_path / f"run-{mport}.yaml"
        cfg.write_text(RUN_CONFIG.format(cap=cap, ports=ports, port=port, storage=storage, mport=mport))
        p = subprocess.Popen([sys.executable, "-m", "service.cli", "run", "--config", str(cfg)], cwd=ROOT,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        return p, mport

    # Endpoint down: every span of the capture ends up in the on-disk queue, then kill -9.
    p, mport = run("8080")
    deadline = time.monotonic() + 60
    while _queue_size(mport) != conns * reqs:
        assert p.poll() is None, p.stderr.read()
        assert time.monotonic() < deadline, "spans never reached the queue"
        time.sleep(0.1)
    p.send_signal(signal.SIGKILL)
    assert p.wait(10) == -signal.SIGKILL
    # Restart with the endpoint up; the receiver now matches nothing (port 1), so every span the
    # endpoint gets comes from the queue the killed process left on disk.
    with GrpcSink(port=port) as sink:
        p, mport = run("1")
        try:
            assert sink.wait_spans(conns * reqs, 60)
        finally:
            p.send_signal(signal.SIGTERM)
            p.wait(60)
        assert sink.span_count == conns * reqs
        assert len(sink.unique_spans()) == conns * reqs


DISK_FULL_CHILD = textwrap.dedent("""
    import resource, signal, sys
    sys.path.insert(0, {root!r})
    from exporters.persistent_queue import PersistentQueue
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG instead
    resource.setrlimit(resource.RLIMIT_FSIZE, (3000, 3000))  # "the disk is full" past 3000 bytes a file
    q = PersistentQueue(sys.argv[1], 10**6, "pq/full")
    results = []
    for i in range(6):
        try:
            results.append(q.put(bytes([65 + i]) * 1000, 1))
        except OSError:
            results.append("full")
    got = []
    while (it := q.get(timeout=0)) is not None:
        got.append(it.data[:1].decode())
        q.ack(it)
    print(results, "".join(got))
""")


def test_disk_full_is_an_error_not_a_corrupt_queue(tmp_path):
    script = tmp_path / "full.py"
    script.write_text(DISK_FULL_CHILD.format(root=str(ROOT)))
    out = subprocess.run([sys.executable, str(script), str(tmp_path / "q")], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    results, got = out.stdout.split("] ")
    # Two 1 KB records fit a segment, the third is cut short: refused with an error, and the queue
    # moves on to a new segment; every record that was accepted is read back intact, in order.
    accepted = [chr(65 + i) for i, r in enumerate(ast.literal_eval(results + "]")) if r is True]
    assert "full" in results and got.strip() == "".join(accepted) and len(accepted) >= 4
    q = PersistentQueue(tmp_path / "q", 10**6, "pq/full2")  # all acked: the torn segment was deleted
    assert drain(q) == [] and q.corrupt_records == 0
    q.close()
