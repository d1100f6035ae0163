"""The span summary (service/summary.py) and its CLI: ``replay --stats/--stats-json``, ``run --stats``.

The figures are checked against ones computed here, independently, from the spans the same
replay wrote with ``--output``: counts, errors, nearest-rank p50/p95/p99 (rank ``ceil(p*n/100)``
in integers), body bytes, per (protocol, service, operation) and in total. The capture is real:
a Python ``ThreadingHTTPServer`` (routes with 200/404/500 and server-side delays) driven by
``http.client`` and recorded with tcpdump on loopback, replayed in one directory with the
recorded real-server fixtures of PostgreSQL (psycopg), MySQL (PyMySQL), Kafka (Tansu with
kafka-python) and gRPC (grpcio). ``run --stats`` is a real ``wirespan run`` process with the
``live`` receiver (AF_PACKET on lo, root), sent SIGUSR1. The progress bar is read through a pty.
The reservoir and endpoint bounds are unit tests on synthetic spans (their point is numbers
of spans no capture here holds).
"""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import select
import shutil
import signal
import struct
import subprocess
import sys
import termios
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest

from service.model import Resource, Span, SpanKind, StatusCode
from service.summary import OTHER, SpanSummary, percentile, weighted_percentiles
from tests.support.capture import free_port, tcpdump, wait_port, wait_until
from tests.support.wirespan_proc import ROOT, WirespanRun, wirespan_run

FIXTURES = ROOT / "tests" / "fixtures"
REAL_CAPTURES = [FIXTURES / "postgresql" / "psycopg_session.pcap",
                 FIXTURES / "mysql" / "pymysql_connector_session.pcap",
                 FIXTURES / "kafka" / "tansu_kafka_python.pcap",
                 FIXTURES / "http2" / "grpc_calls.pcap"]

_SERVER = r'''
import sys, time, random
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
rnd = random.Random(7)
class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *a):
        pass
    def _send(self, code, body):
        self.send_response(code)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def do_GET(self):
        if self.path.startswith("/slow/"):
            time.sleep(rnd.uniform(0.002, 0.02))
            self._send(200, b"s" * rnd.randrange(10, 400))
        elif self.path == "/missing":
            self._send(404, b"not here\n")
        elif self.path == "/boom":
            time.sleep(0.003)
            self._send(500, b"boom\n")
        else:
            self._send(200, b"hello " + self.path.encode() + b"\n")
    def do_POST(self):
        n = int(self.headers.get("Content-Length", "0"))
        body = self.rfile.read(n)
        self._send(201, b"got " + str(len(body)).encode() + b"\n")
ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
'''

_CLIENT = r'''
import http.client, sys
port, n = int(sys.argv[1]), int(sys.argv[2])
for k in range(3):  # three keep-alive connections
    c = http.client.HTTPConnection("127.0.0.1", port)
    for i in range(n):
        j = k * n + i
        if j % 10 == 0:
            c.request("GET", "/missing")
        elif j % 17 == 0:
            c.request("GET", "/boom")
        elif j % 5 == 0:
            c.request("POST", "/orders", body=b"x" * (j % 300 + 1))
        elif j % 2:
            c.request("GET", f"/slow/{j}")
        else:
            c.request("GET", "/health")
        r = c.getresponse()
        r.read()
    c.close()
'''


def _server(port: int) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", _SERVER, str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    wait_port(port)
    return proc


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _drive(port: int, n: int) -> None:
    subprocess.run([sys.executable, "-c", _CLIENT, str(port), str(n)], check=True, timeout=120)


@pytest.fixture(scope="module")
def capture_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory of real captures: the HTTP one recorded now, the fixtures beside it."""
    d = tmp_path_factory.mktemp("captures")
    port = free_port()
    srv = _server(port)
    try:
        with tcpdump(port, path=d / "http_now.pcap"):
            _drive(port, 120)
    finally:
        _stop(srv)
    for p in REAL_CAPTURES:
        shutil.copy(p, d / p.name)
    return d


# -- the figures, computed here from the spans ----------------------------------------------
def _protocol(a: dict[str, Any]) -> str:
    for k in ("db.system.name", "messaging.system", "rpc.system.name"):
        if a.get(k):
            return str(a[k])
    if a.get("network.protocol.name") not in (None, "", "http"):
        return str(a["network.protocol.name"])
    if "http.request.method" in a:
        return "http2" if str(a.get("network.protocol.version")) == "2" else "http"
    return "other"


def _nearest_rank(values: list[float], p: int) -> float:
    v = sorted(values)
    return v[(p * len(v) + 99) // 100 - 1]  # ceil(p * n / 100), in integers


def _expected(spans: list[dict[str, Any]]) -> tuple[dict[tuple[str, str, str], dict[str, Any]], dict[str, Any]]:
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = defaultdict(list)
    for s in spans:
        groups[(_protocol(s["attrs"]), str(s["resource"].get("service.name", "")), s["name"])].append(s)

    def figures(ss: list[dict[str, Any]]) -> dict[str, Any]:
        ms = [(int(s["end"]) - int(s["start"])) / 1e6 for s in ss]
        req = sum(int(s["attrs"].get(k, 0)) for s in ss for k in ("http.request.body.size",
                                                                  "messaging.message.body.size"))
        resp = sum(int(s["attrs"].get("http.response.body.size", 0)) for s in ss)
        return {"count": len(ss), "errors": sum(s["status"] == StatusCode.ERROR for s in ss),
                "p50_ms": _nearest_rank(ms, 50), "p95_ms": _nearest_rank(ms, 95), "p99_ms": _nearest_rank(ms, 99),
                "request_bytes": req, "response_bytes": resp, "bytes": req + resp}

    return {k: figures(v) for k, v in groups.items()}, figures(spans)


def _check_row(row: dict[str, Any], want: dict[str, Any]) -> None:
    for k, v in want.items():
        if k.endswith("_ms"):
            assert row[k] == pytest.approx(v, abs=2e-6), (k, row, want)
        else:
            assert row[k] == v, (k, row, want)


def test_replay_stats_figures_are_the_spans(capture_dir: Path, tmp_path: Path) -> None:
    out, js = tmp_path / "spans.jsonl", tmp_path / "stats.json"
    r = subprocess.run([sys.executable, "-m", "service.cli", "replay", str(capture_dir), "--stats",
                        "--stats-json", str(js), "--output", str(out)], cwd=ROOT, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    spans = WirespanRun(None, out, out).read_spans()  # type: ignore[arg-type]
    want, total = _expected(spans)
    protos = {k[0] for k in want}
    assert {"http", "postgresql", "mysql", "kafka", "grpc"} <= protos, protos
    http = [k for k in want if k[0] == "http"]
    assert want[("http", "unknown_service", "GET /missing")]["errors"] == 0  # 404 is no server error
    booms = sum(1 for j in range(360) if j % 10 and j % 17 == 0)  # the client's /boom (500) requests
    assert sum(want[k]["errors"] for k in http) == booms

    rep = json.loads(js.read_text())
    # the shape the issue names
    assert set(rep) >= {"endpoints", "totals"}
    for row in rep["endpoints"]:
        assert {"protocol", "service", "operation", "count", "errors", "p50_ms", "p95_ms", "p99_ms",
                "bytes"} <= set(row)
    got = {(e["protocol"], e["service"], e["operation"]): e for e in rep["endpoints"]}
    assert set(got) == set(want)
    for k, w in want.items():
        _check_row(got[k], w)
        assert got[k]["exact"] is True
    _check_row(rep["totals"], total)
    assert rep["totals"]["endpoints"] == len(want)
    assert rep["totals"]["packets"] > 0 and rep["totals"]["elapsed_s"] > 0
    for pr in rep["protocols"]:
        spans_p = [s for s in spans if _protocol(s["attrs"]) == pr["protocol"]]
        _check_row(pr, _expected(spans_p)[1])

    # the table on stdout: a header, a block per protocol (its total first), one line per endpoint
    lines = r.stdout.splitlines()
    assert lines[0].startswith("spans by protocol and endpoint")
    assert re.match(r"protocol / service\s+operation\s+count\s+errors\s+p50 ms\s+p95 ms\s+p99 ms\s+bytes$",
                    lines[1])
    body = [re.split(r"\s{2,}", ln.strip()) for ln in lines[3:] if ln.strip()]
    assert body[-1][0] == "total" and body[-1][1] == f"{len(want)} endpoints"
    assert body[-1][2:4] == [str(total["count"]), str(total["errors"])]
    seen = 0
    for cells in body[:-1]:
        if len(cells) == 7:  # a protocol's line: name, count, errors, p50, p95, p99, bytes
            proto = cells[0]
            assert cells[1] == str(sum(w["count"] for k, w in want.items() if k[0] == proto))
            continue
        service, op = cells[0], cells[1]
        w = want[(proto, service, op)]
        assert cells[2:4] == [str(w["count"]), str(w["errors"])], cells
        for cell, key in zip(cells[4:7], ("p50_ms", "p95_ms", "p99_ms"), strict=True):
            assert float(cell) == pytest.approx(w[key], abs=0.051), (cells, w)
        seen += 1
    assert seen == len(want)


def _span(name: str, ms: float, proto: str = "redis", service: str = "svc", error: bool = False) -> Span:
    return Span(name, SpanKind.CLIENT, 0, int(ms * 1e6), {"db.system.name": proto},
                Resource({"service.name": service}), status_code=StatusCode.ERROR if error else StatusCode.UNSET)


def test_reservoir_past_max_samples() -> None:
    import random
    rnd = random.Random(3)
    values = list(range(1, 50_001))
    rnd.shuffle(values)
    s = SpanSummary(max_samples=2000)
    for i in range(0, len(values), 1000):
        s.add([_span("GET", v, error=v % 100 == 0) for v in values[i:i + 1000]])
    row = s.report()["endpoints"][0]
    assert row["count"] == 50_000 and row["errors"] == 500  # counts stay exact
    assert row["exact"] is False and s.kept_samples == 2000
    assert row["max_ms"] == 50_000 and row["mean_ms"] == pytest.approx(25_000.5)
    # a uniform sample of 2000: each percentile within a few % of the population's (binomial sd ~1.1 % at p50)
    assert row["p50_ms"] == pytest.approx(25_000, rel=0.05)
    assert row["p95_ms"] == pytest.approx(47_500, rel=0.02)
    assert row["p99_ms"] == pytest.approx(49_500, rel=0.01)
    # the sample is uniform over the whole run, not the first or last spans
    early = sum(1 for v in s._endpoints[("redis", "svc", "GET")].durations if v in set(values[:25_000]))
    assert 850 < early < 1150


def test_aggregates_weigh_sampled_endpoints() -> None:
    """A protocol's row and the totals weigh each endpoint's samples by the spans they stand for."""
    s = SpanSummary(max_samples=1000)
    s.add([_span("GET", 10.0) for _ in range(100_000)])  # sampled: 1000 kept, each stands for 100
    s.add([_span("SET", 1.0) for _ in range(1000)])      # exact
    rep = s.report()
    t = rep["totals"]
    assert t["count"] == 101_000 and t["exact"] is False
    assert t["p50_ms"] == 10.0 and t["p99_ms"] == 10.0  # 1 ms is under 1 % of the spans
    assert rep["protocols"][0]["p50_ms"] == 10.0
    s2 = SpanSummary(max_samples=1000)
    s2.add([_span("GET", 10.0) for _ in range(980)] + [_span("SET", 1.0) for _ in range(20)])
    assert s2.report()["totals"]["p95_ms"] == 10.0 and s2.report()["totals"]["exact"] is True
    assert weighted_percentiles([([1.0, 2.0], 10.0), ([3.0], 1.0)], (50, 95, 99)) == [2.0, 2.0, 3.0]


def test_total_sample_budget() -> None:
    s = SpanSummary(max_samples=5000, max_total_samples=6000, min_samples=100)
    for k in range(10):
        s.add([_span(f"OP{k}", float(i)) for i in range(3000)])
    assert s.kept_samples <= 6000 + 10 * 100
    rows = {r["operation"]: r for r in s.report()["endpoints"]}
    assert all(r["count"] == 3000 for r in rows.values())
    assert rows["OP0"]["exact"] and rows["OP1"]["exact"]  # 6000 kept: the budget is spent
    assert not rows["OP9"]["exact"] and rows["OP9"]["p50_ms"] == pytest.approx(1500, rel=0.25)


def test_other_row_past_max_endpoints() -> None:
    s = SpanSummary(max_endpoints=3)
    s.add([_span(f"GET key{i}", 1.0 + i, error=i % 2 == 0) for i in range(10)])
    s.add([_span("PING", 2.0, proto="memcached")])
    rows = s.report()["endpoints"]
    by = {(r["protocol"], r["operation"]): r for r in rows}
    assert set(by) == {("redis", "GET key0"), ("redis", "GET key1"), ("redis", "GET key2"),
                       ("redis", OTHER), ("memcached", OTHER)}
    other = by[("redis", OTHER)]
    assert other["service"] == OTHER and other["count"] == 7 and other["errors"] == 3  # keys 3..9: 4, 6, 8
    assert other["p50_ms"] == 7.0  # of 4..10 ms
    assert s.report()["totals"]["count"] == 11
    assert "(other)" in s.table()


def test_percentile_is_nearest_rank() -> None:
    for n in range(1, 400):
        v = list(range(1, n + 1))
        for p in (29, 50, 95, 99):
            assert percentile(v, p) == _nearest_rank(v, p), (n, p)
    assert percentile([], 50) == 0.0


def test_odd_attribute_values_do_not_raise() -> None:
    s = SpanSummary()
    sp = Span("GET /", SpanKind.SERVER, 0, 1_000_000, {"http.request.method": "GET", "http.request.body.size": "12",
                                                         "http.response.body.size": "n/a"})
    s.add([sp])
    row = s.report()["endpoints"][0]
    assert row["request_bytes"] == 12 and row["response_bytes"] == 0 and row["protocol"] == "http"


def test_run_stats_sigusr1_and_at_exit(tmp_path: Path) -> None:
    port = free_port()
    srv = _server(port)
    js = tmp_path / "stats.json"
    try:
        with wirespan_run(tmp_path, {"live": {"interface": "lo", "ports": [port]}},
                          cli_args=["--stats", "--stats-json", str(js)]) as run:
            time.sleep(0.5)
            _drive(port, 20)
            assert wait_until(lambda: len(run.read_spans()) >= 60, timeout=30), run.log()
            os.kill(run.proc.pid, signal.SIGUSR1)
            assert wait_until(lambda: js.exists() and "spans by protocol and endpoint" in run.log(), timeout=15)
            first = json.loads(js.read_text())
            assert first["totals"]["count"] == 60
            got = {e["operation"]: e for e in first["endpoints"]}
            want, _ = _expected(run.read_spans())
            assert {k[2] for k in want} == set(got)
            for k, w in want.items():
                _check_row(got[k[2]], w)
            _drive(port, 10)  # more after the report: the one at exit counts them too
            assert wait_until(lambda: len(run.read_spans()) >= 90, timeout=30), run.log()
    finally:
        _stop(srv)
    assert run.returncode == 0, run.log()
    final = json.loads(js.read_text())
    assert final["totals"]["count"] == len(run.spans) == 90
    assert run.log().count("spans by protocol and endpoint") == 2  # SIGUSR1 and at exit
    assert "GET /health" in run.log()


# -- the progress bar ---------------------------------------------------------------------
def _on_pty(cmd: list[str], stdin: Any = None, timeout: float = 120) -> str:
    """Run ``cmd`` with stderr on a pty (120 columns: a pty starts with 0, and tqdm draws nothing)."""
    m, s = pty.openpty()
    fcntl.ioctl(s, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    p = subprocess.Popen(cmd, stderr=s, stdout=subprocess.DEVNULL, stdin=stdin, cwd=ROOT)
    os.close(s)
    buf = b""
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            r, _, _ = select.select([m], [], [], 0.2)
            if r:
                try:
                    d = os.read(m, 65536)
                except OSError:  # EIO: the child closed its end
                    break
                if not d:
                    break
                buf += d
            elif p.poll() is not None:
                break
    finally:
        os.close(m)
        if p.poll() is None:
            p.kill()
        p.wait()
    assert p.returncode == 0, buf[-2000:]
    return buf.decode(errors="replace")


@pytest.fixture(scope="module")
def big_capture(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from bench.gen_http_capture import generate
    p = tmp_path_factory.mktemp("big") / "big.pcap"
    generate(str(p), connections=60, requests=400)  # ~48k packets, 12 MB
    return p


def test_progress_bar_says_rate_and_eta(big_capture: Path, tmp_path: Path) -> None:
    text = _on_pty([sys.executable, "-m", "service.cli", "replay", str(big_capture), "--workers", "2",
                    "--output", str(tmp_path / "o.jsonl")])
    frames = [f for f in re.split(r"[\r\n]", text) if "%|" in f]
    pat = re.compile(r"big\.pcap:\s+\d+%\|.*\| [\d.]+[kMG]?B of [\d.]+MB, [\d.]+[kMG]?B/s, [\d,]+ pkt/s, "
                     r"ETA \d\d:\d\d")
    assert any(pat.search(f) for f in frames), frames[:5]
    # one bar (worker 0's: each worker reads the whole file), its percentages never going back
    pcts = [int(m.group(1)) for f in frames if (m := re.search(r"(\d+)%\|", f))]
    assert pcts == sorted(pcts)
    assert re.search(r"replay: \d+ packets", text)  # the summary follows


def test_progress_bar_on_a_stream_without_size(big_capture: Path, tmp_path: Path) -> None:
    with open(big_capture, "rb") as f:
        cat = subprocess.Popen(["cat"], stdin=f, stdout=subprocess.PIPE)
        try:
            text = _on_pty([sys.executable, "-m", "service.cli", "replay", "-", "--output",
                            str(tmp_path / "o.jsonl")], stdin=cat.stdout)
        finally:
            assert cat.stdout is not None
            cat.stdout.close()
            cat.wait()
    frames = [f for f in re.split(r"[\r\n]", text) if "B read in" in f]
    assert any(re.search(r"[\d.]+[kMG]?B read in \d\d:\d\d, [\d.]+[kMG]?B/s, [\d,]+ pkt/s", f) for f in frames), \
        text[:1000]
    assert not any("ETA" in f for f in frames)


def test_each_replay_in_one_process_counts_its_own_spans(tmp_path: Path) -> None:
    from service.cli import main
    sample = str(ROOT / "config" / "samples" / "http-sample.pcap")
    counts = []
    for k in range(2):
        js = tmp_path / f"s{k}.json"
        assert main(["replay", sample, "--stats-json", str(js), "--output", str(tmp_path / f"o{k}.jsonl")]) == 0
        counts.append(json.loads(js.read_text())["totals"]["count"])
    assert counts[0] == counts[1] > 0


def test_protocol_of_each_kind_of_span() -> None:
    from service.summary import protocol_of
    assert protocol_of({"db.system.name": "postgresql", "network.protocol.name": "x"}) == "postgresql"
    assert protocol_of({"messaging.system": "kafka"}) == "kafka"
    assert protocol_of({"rpc.system.name": "grpc", "http.request.method": "POST"}) == "grpc"
    assert protocol_of({"http.request.method": "GET", "network.protocol.version": "2"}) == "http2"
    assert protocol_of({"http.request.method": "GET", "network.protocol.version": "1.1"}) == "http"
    assert protocol_of({"dns.question.name": "example.com"}) == "dns"
    assert protocol_of({"http.request.method": "GET", "network.protocol.name": "fastcgi"}) == "fastcgi"
    assert protocol_of({"http.request.method": "GET", "network.protocol.name": "http"}) == "http"
    assert protocol_of({"network.protocol.name": "smtp"}) == "smtp"
    assert protocol_of({}) == "other"
