"""The ``ebpf`` receiver against real servers and clients on loopback (root, real kernel).

Every test loads the real BPF object into this kernel, drives real processes
(Python http.server, curl, urllib clients, redis-server + redis-py) and asserts the
TcpEvents: both processes' views, exact payload bytes, pids, process names, ports,
truncation at the message cap, close and exit handling. Skipped only when the kernel
or machine truly lacks what the receiver needs (the reason is printed).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from collections import defaultdict

import pytest

from receivers.ebpf import BpfError, EbpfConfig, EbpfReceiver
from service.model import EventKind
from service.telemetry import EBPF_TRUNCATED_BYTES
from tests.support.capture import free_port, wait_port, wait_until
from tests.support.ebpf import needs_ebpf
from tests.support.live_http import BIG_BODY, EventCollector, ReceiverRunning, http_server, run_client

pytestmark = needs_ebpf(__name__)


class Collect(EventCollector):

    def stream(self, pid: int, egress: bool) -> bytes:
        """Everything process ``pid`` sent (egress) or received, in order (test-side copy)."""
        return b"".join(bytes(e.payload) for e in self.events
                        if e.kind == EventKind.DATA and e.pid == pid and e.egress == egress)

    def gaps(self, pid: int, egress: bool) -> int:
        return sum(e.gap for e in self.events if e.kind == EventKind.GAP and e.pid == pid and e.egress == egress)


wait_for = wait_until


class Running(ReceiverRunning):
    collector = Collect
    sink: Collect

    def make(self, cfg: dict, sink: EventCollector) -> EbpfReceiver:
        return EbpfReceiver("ebpf", EbpfConfig(**cfg), sink)


def truncated() -> float:
    return sum(EBPF_TRUNCATED_BYTES.labels(receiver="ebpf", where=w)._value.get() for w in ("message_cap", "kernel"))


CURL = shutil.which("curl")
#: the kernel's comm of a process exec'd as sys.executable
PY_COMM = os.path.basename(sys.executable)[:15]


@pytest.mark.parametrize("reader", ["mmap", "libbpf"])
def test_curl_and_http_server_both_views(reader: str) -> None:
    with http_server() as srv, Running(ports=[srv.port], ring_reader=reader) as r:
        p = subprocess.run([CURL, "-s", "-H", "X-Test: 1", f"{srv.url}/hello?q=1"], capture_output=True,
                           check=True)
        assert p.stdout == b"hello /hello?q=1\n"
        assert wait_for(lambda: len({e.pid for e in r.sink.events if e.kind == EventKind.CLOSE}) == 2)
    ev = r.sink.events
    curl_pid = next(e.pid for e in ev if e.comm == "curl")
    # the client's writes are the server's reads, byte for byte
    req = r.sink.stream(curl_pid, True)
    assert req.startswith(b"GET /hello?q=1 HTTP/1.1\r\n") and b"X-Test: 1\r\n" in req
    assert r.sink.stream(srv.pid, False) == req
    resp = r.sink.stream(srv.pid, True)
    assert resp.startswith(b"HTTP/1.1 200 OK\r\n") and resp.endswith(b"\r\n\r\nhello /hello?q=1\n")
    assert r.sink.stream(curl_pid, False) == resp
    for e in ev:
        assert e.pid in (curl_pid, srv.pid)
        assert e.comm == ("curl" if e.pid == curl_pid else PY_COMM), e.comm
        assert srv.port in (e.sport, e.dport)
        assert e.src == e.dst == "127.0.0.1"
        if e.kind == EventKind.DATA:
            # src is the sender: the server sends from its port
            assert (e.sport == srv.port) == (e.egress == (e.pid == srv.pid))
        assert abs(e.ts_ns - time.time_ns()) < 60e9  # epoch, not monotonic
    # one connection per process view, distinct ids, closed once each
    ids = {e.pid: e.conn_id for e in ev if e.kind == EventKind.DATA}
    assert len(set(ids.values())) == 2
    assert r.rx.kernel_counters()["ringbuf_reserve_failures"] == 0


def test_big_response_cap_and_override() -> None:
    client = "import urllib.request,sys; sys.stdout.buffer.write(urllib.request.urlopen(sys.argv[1]).read())"
    # default cap (64 KiB): the server's single 200 KB write is cut, the rest a counted gap
    before = truncated()
    with http_server() as srv, Running(ports=[srv.port]) as r:
        out = run_client(client, f"{srv.url}/big").stdout
        assert out == BIG_BODY
        assert wait_for(lambda: sum(1 for e in r.sink.events if e.kind == EventKind.CLOSE) >= 4)
    sent = r.sink.stream(srv.pid, True)
    assert len(sent) == 64 * 1024
    assert sent.startswith(b"HTTP/1.1 200 OK\r\n")
    hdr_len = sent.index(b"\r\n\r\n") + 4
    assert sent[hdr_len:] == BIG_BODY[:64 * 1024 - hdr_len]
    assert r.sink.gaps(srv.pid, True) == hdr_len + len(BIG_BODY) - 64 * 1024
    # both views were cut (the server's write in the kernel: only the cap is copied)
    assert truncated() - before >= 2 * (len(BIG_BODY) - 64 * 1024)

    # a per-port override keeps the whole response in both views, records reassembled in order
    with http_server() as srv, Running(ports=[srv.port], max_message_bytes_per_port={srv.port: 1 << 20}) as r:
        run_client(client, f"{srv.url}/big")
        assert wait_for(lambda: sum(1 for e in r.sink.events if e.kind == EventKind.CLOSE) >= 4)
    client_pid = next(e.pid for e in r.sink.events if e.pid != srv.pid)
    for pid, egress in ((srv.pid, True), (client_pid, False)):
        got = r.sink.stream(pid, egress)
        assert got[got.index(b"\r\n\r\n") + 4:] == BIG_BODY
        assert r.sink.gaps(pid, egress) == 0
    # the server wrote it in one syscall: several 16 KiB ring records, in order
    big = [e for e in r.sink.events if e.pid == srv.pid and e.egress and e.kind == EventKind.DATA]
    assert max(len(e.payload) for e in big) == 16384 and len(big) >= 13


def test_one_megabyte_upload() -> None:
    client = ("import urllib.request,sys; d=bytes(range(256))*4096; "
              "r=urllib.request.urlopen(urllib.request.Request(sys.argv[1], data=d, method='POST')); "
              "sys.stdout.buffer.write(r.read())")
    body = bytes(range(256)) * 4096
    with http_server() as srv, Running(ports=[srv.port], max_message_bytes_per_protocol={},
                                       max_message_bytes_per_port={srv.port: 1 << 20}) as r:
        assert run_client(client, f"{srv.url}/upload").stdout == b"got 1048576\n"
        assert wait_for(lambda: sum(1 for e in r.sink.events if e.kind == EventKind.CLOSE) >= 4)
        kc = r.rx.kernel_counters()
    client_pid = next(e.pid for e in r.sink.events if e.pid != srv.pid)
    up = r.sink.stream(client_pid, True)
    head = up.index(b"\r\n\r\n") + 4
    assert up.startswith(b"POST /upload HTTP/1.1\r\n")
    # cap 1 MiB: the headers plus the body run over it by the header length: that much is a gap
    assert up[head:] == body[:len(up) - head]
    assert len(up) == 1 << 20 and r.sink.gaps(client_pid, True) == head
    srv_in = r.sink.stream(srv.pid, False)
    assert srv_in == up
    assert kc["ringbuf_reserve_failures"] == 0

    # default 64 KiB cap: the upload is cut in both views and counted
    with http_server() as srv, Running(ports=[srv.port]) as r:
        run_client(client, f"{srv.url}/upload")
        assert wait_for(lambda: sum(1 for e in r.sink.events if e.kind == EventKind.CLOSE) >= 4)
    client_pid = next(e.pid for e in r.sink.events if e.pid != srv.pid)
    assert len(r.sink.stream(client_pid, True)) == 64 * 1024
    assert len(r.sink.stream(client_pid, True)) + r.sink.gaps(client_pid, True) == head + len(body)
    assert len(r.sink.stream(srv.pid, False)) == 64 * 1024


def test_many_short_connections() -> None:
    n = 150
    client = ("import urllib.request,sys\n"
              "for i in range(int(sys.argv[2])):\n"
              "    assert urllib.request.urlopen(f'{sys.argv[1]}/c{i}').read() == f'hello /c{i}\\n'.encode()\n")
    with http_server() as srv, Running(ports=[srv.port]) as r:
        run_client(client, srv.url, str(n))
        assert wait_for(lambda: sum(1 for e in r.sink.events if e.kind == EventKind.CLOSE) >= 4 * n)
    by_conn: dict = defaultdict(bytes)
    for e in r.sink.events:
        if e.kind == EventKind.DATA and e.pid == srv.pid and not e.egress:
            by_conn[e.conn_id] += bytes(e.payload)
    assert len(by_conn) == n
    paths = sorted(b.split(b" ", 2)[1] for b in by_conn.values())
    assert paths == sorted(f"/c{i}".encode() for i in range(n))
    closes = [e for e in r.sink.events if e.kind == EventKind.CLOSE]
    assert len({e.conn_id for e in closes}) == 2 * n


def test_process_exits_mid_request() -> None:
    # a client sends half a request and dies without close(): the kernel closes its
    # socket, no close() syscall is seen; housekeeping must still end its connection
    client = ("import socket,os,sys; s=socket.create_connection(('127.0.0.1', int(sys.argv[1]))); "
              "s.sendall(b'GET /half HTTP/1.1\\r\\nHost: x\\r\\n'); os._exit(0)")
    with http_server() as srv, Running(ports=[srv.port]) as r:
        p = subprocess.run([sys.executable, "-c", client, str(srv.port)], check=True)
        assert p.returncode == 0
        assert wait_for(lambda: any(e.kind == EventKind.CLOSE and e.comm is None for e in r.sink.events), 5)
    dead = [e for e in r.sink.events if e.kind == EventKind.DATA and e.egress and e.pid != srv.pid]
    assert bytes(dead[0].payload) == b"GET /half HTTP/1.1\r\nHost: x\r\n"
    closes = [e for e in r.sink.events if e.kind == EventKind.CLOSE and e.pid == dead[0].pid]
    assert {e.conn_id for e in closes} == {dead[0].conn_id} and len(closes) == 2


def test_filters_process_name_and_pid() -> None:
    with http_server() as srv:
        with Running(ports=[srv.port], process_names=["curl"]) as r:
            subprocess.run([CURL, "-s", f"{srv.url}/a"], check=True, capture_output=True)
            assert wait_for(lambda: any(e.kind == EventKind.CLOSE for e in r.sink.events))
        assert r.sink.events and {e.comm for e in r.sink.events} == {"curl"}
        with Running(pids=[srv.pid]) as r:
            subprocess.run([CURL, "-s", f"{srv.url}/b"], check=True, capture_output=True)
            assert wait_for(lambda: any(e.kind == EventKind.CLOSE for e in r.sink.events))
        assert {e.pid for e in r.sink.events} == {srv.pid}
        # a port filter that matches nothing: no events at all
        with Running(ports=[free_port()]) as r:
            subprocess.run([CURL, "-s", f"{srv.url}/c"], check=True, capture_output=True)
            time.sleep(0.5)
        assert r.sink.events == []


REDIS = shutil.which("redis-server")


@pytest.mark.skipif(REDIS is None, reason="redis-server not installed")
def test_redis_server_and_redis_py(tmp_path) -> None:
    port = free_port()
    srv = subprocess.Popen([REDIS, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                            "--dir", str(tmp_path)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(port)
        client = ("import redis,sys; r=redis.Redis(port=int(sys.argv[1])); r.set('k','v'*100); "
                  "assert r.get('k')==b'v'*100; r.close()")
        with Running(ports=[port]) as r:
            run_client(client, str(port))
            assert wait_for(lambda: b"$300\r\n" in r.sink.stream(srv.pid, False) + b"" or
                            b"v" * 100 in r.sink.stream(srv.pid, True))
            time.sleep(0.3)
    finally:
        srv.terminate()
        srv.wait(5)
    into_server = r.sink.stream(srv.pid, False)
    assert b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$100\r\n" + b"v" * 100 in into_server
    assert b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n" in into_server
    assert b"$100\r\n" + b"v" * 100 in r.sink.stream(srv.pid, True)
    comms = {e.comm for e in r.sink.events if e.pid == srv.pid}
    assert comms <= {"redis-server"} and comms


def test_clean_errors_not_tracebacks(tmp_path) -> None:
    rx = EbpfReceiver("ebpf", EbpfConfig(object_path=str(tmp_path / "nope.o")), Collect())
    with pytest.raises(BpfError) as ei:
        rx.start()
    assert "nope.o missing" in str(ei.value) and "\n" not in str(ei.value)
    rx.shutdown()
    # without root: one line naming what is missing
    # (imports first: this interpreter lives under /root, unreadable to nobody)
    code = ("import os,sys\n"
            "from receivers.ebpf import BpfError, EbpfConfig, EbpfReceiver\n"
            "os.setgid(65534); os.setuid(65534)\n"
            "try:\n    EbpfReceiver('ebpf', EbpfConfig(), None).start()\n"
            "except BpfError as e:\n    print(e); sys.exit(3)\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert p.returncode == 3, p.stderr
    assert "needs root" in p.stdout and p.stdout.count("\n") == 1


def test_reload_detaches_and_reattaches() -> None:
    with http_server() as srv:
        for _ in range(3):  # start/shutdown cycles leave no programs attached
            with Running(ports=[srv.port]) as r:
                subprocess.run([CURL, "-s", f"{srv.url}/r"], check=True, capture_output=True)
                assert wait_for(lambda: any(e.kind == EventKind.CLOSE for e in r.sink.events))
        progs = subprocess.run(["bpftool", "prog", "show"], capture_output=True, text=True).stdout
        assert "enter_read" not in progs and "exit_read" not in progs


# --------------------------------------------------------------------------- end to end
TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
PARENT_ID = "b7ad6b7169203331"
SERVER, CLIENT = 2, 3


def test_wirespan_run_http_spans_both_processes(tmp_path) -> None:
    from tests.support.nginx import nginx_server
    from tests.support.wirespan_proc import wirespan_run

    get = "import urllib.request,sys; urllib.request.urlopen(sys.argv[1]).read()"
    missing = ("import urllib.request,urllib.error,sys\n"
               "try:\n    urllib.request.urlopen(sys.argv[1])\nexcept urllib.error.HTTPError as e:\n"
               "    assert e.code == 404\n")
    upload = ("import urllib.request,sys; urllib.request.urlopen(urllib.request.Request(sys.argv[1], "
              "data=bytes(range(256))*4096)).read()")
    with http_server() as srv, nginx_server({"index.html": b"<p>hi</p>\n"}) as ng:
        # The default 64 KiB message cap: the middle of the 200 KB response and of the 1 MB
        # upload becomes counted gaps, which HTTP/1 steps over inside Content-Length bodies.
        cfg = {"ebpf": {"ports": [srv.port, ng.port]}}
        with wirespan_run(tmp_path, cfg) as w:
            subprocess.run([CURL, "-s", "-o", "/dev/null", "-H", f"traceparent: 00-{TRACE_ID}-{PARENT_ID}-01",
                            f"{srv.url}/traced?x=1"], check=True)
            run_client(missing, f"{srv.url}/missing")
            run_client(get, f"{srv.url}/big")
            run_client(upload, f"{srv.url}/upload")
            subprocess.run([CURL, "-s", "-o", "/dev/null", ng.url("/api/orders")], check=True)
            subprocess.run([CURL, "-s", "-o", "/dev/null", ng.url("/index.html")], check=True)
            time.sleep(1.5)
            srv_pid, ng_pid = srv.pid, ng.pid
    assert w.returncode == 0, w.log()
    spans = w.spans

    def find(path: str, kind: int) -> dict:
        got = [s for s in spans if s["attrs"].get("url.path") == path and s["kind"] == kind]
        assert len(got) == 1, (path, kind, [(s["name"], s["kind"], s["attrs"].get("url.path")) for s in spans])
        return got[0]

    # CLIENT (curl) and SERVER (http.server) spans of one request join the sent trace
    srv_span, cli_span = find("/traced", SERVER), find("/traced", CLIENT)
    for s in (srv_span, cli_span):
        assert s["trace_id"] == TRACE_ID and s["parent"] == PARENT_ID
        assert s["name"] == "GET /traced" and s["attrs"]["http.response.status_code"] == 200
        assert s["attrs"]["url.query"] == "x=1"
    assert srv_span["resource"]["process.executable.name"] == PY_COMM
    assert int(srv_span["resource"]["process.pid"]) == srv_pid
    assert srv_span["resource"]["service.name"] == PY_COMM
    assert cli_span["resource"]["process.executable.name"] == "curl"
    assert int(srv_span["attrs"]["server.port"]) == srv.port
    # 404: an error for the client, not for the server
    assert find("/missing", SERVER)["status"] == 0 and find("/missing", CLIENT)["status"] == 2
    assert find("/missing", SERVER)["attrs"]["http.response.status_code"] == 404
    # 200 KB response and 1 MB upload, both views, sizes from the parsed bodies
    for kind in (SERVER, CLIENT):
        assert find("/big", kind)["attrs"]["http.response.body.size"] == len(BIG_BODY)
        up = find("/upload", kind)
        assert up["name"] == "POST /upload" and up["attrs"]["http.request.body.size"] == 1 << 20
    # nginx, its own process name
    for path in ("/api/orders", "/index.html"):
        s = find(path, SERVER)
        assert s["resource"]["process.executable.name"] == "nginx"
        assert int(s["resource"]["process.pid"]) == ng_pid
        assert s["attrs"]["http.response.status_code"] == 200
        assert find(path, CLIENT)["resource"]["process.executable.name"] == "curl"


def test_wirespan_run_redis_spans(tmp_path) -> None:
    from tests.support.redis_server import redis_server
    from tests.support.wirespan_proc import wirespan_run

    client = ("import redis,sys; r=redis.Redis(port=int(sys.argv[1])); r.set('user:1','ada'); "
              "assert r.get('user:1')==b'ada'; p=r.pipeline(transaction=False); p.incr('n'); p.incr('n'); "
              "p.execute(); r.close()")
    with redis_server() as port:
        with wirespan_run(tmp_path, {"ebpf": {"ports": [port]}}) as w:
            run_client(client, str(port))
            time.sleep(1.5)
    assert w.returncode == 0, w.log()
    by_proc: dict = defaultdict(list)
    for s in w.spans:
        by_proc[s["resource"]["process.executable.name"]].append(s)
    cli = [s["name"] for s in by_proc[PY_COMM] if s["kind"] == CLIENT]
    for name in ("SET", "GET", "INCRBY"):
        assert name in cli, cli
    assert cli.count("INCRBY") == 2  # redis-py sends INCRBY; the pipeline gives one span per command
    assert {s["attrs"]["db.system.name"] for s in by_proc[PY_COMM]} == {"redis"}
    srv_names = [s["name"] for s in by_proc["redis-server"]]
    assert "SET" in srv_names and "GET" in srv_names


def test_wirespan_run_postgresql_spans(tmp_path) -> None:
    from tests.support.postgres import pg_bin, postgres_server
    from tests.support.wirespan_proc import wirespan_run

    if pg_bin() is None:
        pytest.skip("PostgreSQL server binaries not installed")
    client = ("import psycopg,sys\n"
              "with psycopg.connect(sys.argv[1]) as c:\n"
              "    c.execute('CREATE TABLE orders (id int, item text)')\n"
              "    c.execute('INSERT INTO orders VALUES (%s, %s)', (1, 'tea'))\n"
              "    assert c.execute('SELECT item FROM orders WHERE id = %s', (1,)).fetchone() == ('tea',)\n")
    with postgres_server() as pg:
        with wirespan_run(tmp_path, {"ebpf": {"ports": [pg.port]}}) as w:
            run_client(client, pg.dsn())
            time.sleep(1.5)
    assert w.returncode == 0, w.log()
    cli = [s for s in w.spans if s["resource"].get("process.executable.name") == PY_COMM and s["kind"] == CLIENT]
    assert cli and {s["attrs"].get("db.system.name") for s in cli} == {"postgresql"}
    ops = {s["attrs"].get("db.operation.name") for s in cli}
    assert {"CREATE TABLE", "INSERT", "SELECT", "COMMIT"} <= ops, ops
    sel = next(s for s in cli if s["attrs"].get("db.operation.name") == "SELECT")
    assert "orders" in sel["name"]
    # the server's view comes from the postgres backend process
    assert any(s["resource"].get("process.executable.name") == "postgres" for s in w.spans)


def test_wirespan_run_sighup_reload(tmp_path) -> None:
    import signal

    from tests.support.wirespan_proc import wirespan_run

    with http_server() as srv:
        with wirespan_run(tmp_path, {"ebpf": {"ports": [srv.port]}}) as w:
            subprocess.run([CURL, "-s", "-o", "/dev/null", f"{srv.url}/before"], check=True)
            time.sleep(1)
            os.kill(w.proc.pid, signal.SIGHUP)
            assert wait_for(lambda: w.log().count("pipelines running") >= 2, 20), w.log()
            subprocess.run([CURL, "-s", "-o", "/dev/null", f"{srv.url}/after"], check=True)
            time.sleep(1.5)
            # one set of programs attached after the reload, not two
            progs = subprocess.run(["bpftool", "prog", "show"], capture_output=True, text=True).stdout
            assert len(re.findall(r"name exit_read\s", progs)) == 1, (progs, w.log())
    assert w.returncode == 0, w.log()
    paths = sorted((s["attrs"].get("url.path"), s["kind"]) for s in w.spans)
    assert paths == [("/after", SERVER), ("/after", CLIENT), ("/before", SERVER), ("/before", CLIENT)], paths


def test_ring_full_losses_become_positioned_gaps() -> None:
    # a 64 KiB ring cannot hold the server's 200 KB write (13 records of 16 KiB at
    # once): records are lost in the kernel. Every lost byte must come out as a GAP
    # at its exact position, and every delivered byte must be where it belongs.
    client = "import urllib.request,sys; sys.stdout.buffer.write(urllib.request.urlopen(sys.argv[1]).read())"
    before = EBPF_TRUNCATED_BYTES.labels(receiver="ebpf", where="ring_full")._value.get()
    with http_server() as srv, Running(ports=[srv.port], ring_size=1 << 16,
                                       max_message_bytes_per_port={srv.port: 1 << 20}) as r:
        for _ in range(3):
            assert run_client(client, f"{srv.url}/big").stdout == BIG_BODY
        time.sleep(0.5)
        kc = r.rx.kernel_counters()
    assert kc["ringbuf_reserve_failures"] > 0
    assert EBPF_TRUNCATED_BYTES.labels(receiver="ebpf", where="ring_full")._value.get() > before
    by_conn: dict = defaultdict(list)
    for e in r.sink.events:
        if e.pid == srv.pid and e.egress and e.kind in (EventKind.DATA, EventKind.GAP):
            by_conn[e.conn_id].append(e)
    checked = 0
    for evs in by_conn.values():
        head = bytes(evs[0].payload) if evs[0].kind == EventKind.DATA else None
        if head is None or not head.startswith(b"HTTP/1.1 200"):
            continue  # the header record itself was lost: positions still add up below
        expected = head + BIG_BODY
        pos = 0
        for e in evs:
            if e.kind == EventKind.GAP:
                pos += e.gap
            else:
                assert bytes(e.payload) == expected[pos:pos + len(e.payload)]
                pos += len(e.payload)
        assert pos == len(expected)
        checked += 1
    assert checked >= 1


def test_a_client_dripping_a_byte_a_segment_costs_the_others_nothing() -> None:
    """Issue 20: a client dripping 28 KB a byte a write beside normal clients (the server's
    view): every normal request's span arrives, the dripped one too, and no record is lost."""
    from tests.support.live_http import drip_beside_normal_traffic

    got = drip_beside_normal_traffic(lambda srv, nxt: EbpfReceiver("ebpf", EbpfConfig(pids=[srv.pid]), nxt))
    assert got["normal"] == sorted(f"/n/{i}" for i in range(300))
    assert got["drip"] == 1
    assert not {k: v for k, v in got["receiver_drops"].items() if v}, got["receiver_drops"]
