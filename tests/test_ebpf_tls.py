"""The ``ebpf`` receiver's OpenSSL plaintext (issue 15) against real TLS servers and clients.

Every test loads the real BPF object, attaches the OpenSSL uprobes this receiver finds, drives
real processes over TLS on loopback (nginx with ``ssl``, curl, Python urllib/httpx and
http.server, psycopg against PostgreSQL with ``ssl=on``, Node.js, grpcio) into a real protocols
stage, and compares the spans with those of the same requests in plaintext: same operation,
path or table, status, from both processes where both are traced, with ``url.scheme=https`` and
the TLS version. The syscall ciphertext of those connections is skipped and counted, never
parsed. Skipped only when the kernel truly lacks what the receiver needs (printed).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from processors.protocols.processor import ProtocolsProcessor
from receivers.ebpf import EbpfConfig, EbpfReceiver
from service.model import EventKind
from tests.support.capture import wait_until
from tests.support.ebpf import needs_ebpf
from tests.support.live_http import BIG_BODY, SpanSink, run_client
from tests.support.tls_servers import HTTPX_CLIENT as _HTTPX
from tests.support.tls_servers import URLLIB_CLIENT as _URLLIB
from tests.support.tls_servers import https_server, nginx_tls, tls_files

pytestmark = needs_ebpf(__name__)

CURL = shutil.which("curl") or "curl"
NODE = shutil.which("node")
PY_COMM = os.path.basename(sys.executable)[:15]
SERVER, CLIENT = 2, 3


class Events:
    """Keeps every event and hands them on to a real protocols stage."""

    def __init__(self, stage: ProtocolsProcessor) -> None:
        self.stage = stage
        self.events: list[Any] = []

    def consume_events(self, events: list[Any]) -> None:
        self.events.extend(events)
        self.stage.consume_events(events)


class Traced:
    """``with Traced(**ebpf_config) as t``: the receiver feeding a protocols stage into ``t.spans``."""

    def __init__(self, **cfg: Any) -> None:
        self.sink = SpanSink()
        self.stage = ProtocolsProcessor("protocols", {}, self.sink)
        self.ev = Events(self.stage)
        self.rx = EbpfReceiver("ebpf", EbpfConfig(**cfg), self.ev)

    def __enter__(self) -> Traced:
        self.rx.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.rx.shutdown()
        self.stage.shutdown()

    @property
    def spans(self) -> list[Any]:
        with self.sink.lock:
            return list(self.sink.spans)

    def wait(self, n: int, timeout: float = 15) -> None:
        assert wait_until(lambda: len(self.spans) >= n, timeout), self.summary()

    def summary(self, port: int | None = None) -> list[tuple]:
        """(kind, process, name, path, status) of each span (on ``port`` if given), sorted."""
        out = []
        for s in self.spans:
            a = s.attributes
            if port is not None and a.get("server.port") != port:
                continue
            op = a.get("http.request.method") or a.get("db.operation.name") or s.name
            out.append((int(s.kind), s.resource.attributes.get("process.executable.name"), op,
                        a.get("url.path") or a.get("db.collection.name") or a.get("rpc.method"),
                        a.get("http.response.status_code") or a.get("db.response.status_code")))
        return sorted(out, key=repr)

    def on(self, port: int) -> list[Any]:
        return [s for s in self.spans if s.attributes.get("server.port") == port]


def _files(tmp_path: Path, key: str = "ec"):
    return tls_files(tmp_path / f"certs-{key}", key)


def _curl(url: str, ca: Path, *extra: str) -> None:
    subprocess.run([CURL, "-s", "--fail-with-body", "-o", "/dev/null", "--cacert", str(ca), *extra, url],
                   check=False, timeout=30)




@pytest.mark.parametrize("protocols,version", [("TLSv1.3", "1.3"), ("TLSv1.2", "1.2")])
def test_nginx_curl_urllib_httpx_same_spans_as_plaintext(tmp_path, protocols: str, version: str) -> None:
    files = _files(tmp_path)
    with nginx_tls(files, {"index.html": b"<p>hi</p>\n"}, protocols=protocols) as ng, \
            Traced(ports=[ng.port, ng.plain_port]) as t:
        for tls in (True, False):
            _curl(ng.url("/index.html", tls), files.ca_cert)
            _curl(ng.url("/boom", tls), files.ca_cert)
            run_client(_URLLIB, str(files.ca_cert), ng.url("/api/u?q=1", tls), ng.url("/missing", tls))
            run_client(_HTTPX, str(files.ca_cert), ng.url("/api/x", tls))
        # 5 requests, both views each, both ports
        t.wait(20)
        time.sleep(0.3)
    tls_spans, plain = t.summary(ng.port), t.summary(ng.plain_port)
    assert tls_spans == plain and len(tls_spans) == 10, (tls_spans, plain)
    assert {(k, p) for k, p, *_ in tls_spans} == {(SERVER, "nginx"), (CLIENT, "curl"), (CLIENT, PY_COMM)}
    for s in t.on(ng.port):
        a = s.attributes
        assert a["url.scheme"] == "https" and a["tls.protocol.version"] == version, a
        assert a["tls.protocol.name"] == "tls" and a["tls.cipher"].startswith("TLS_")
        if "url.full" in a:
            assert a["url.full"].startswith("https://")
    for s in t.on(ng.plain_port):
        assert s.attributes["url.scheme"] == "http" and "tls.protocol.version" not in s.attributes
    # nothing parsed as garbage: no drop at all in the stage; the ciphertext was skipped, counted
    assert t.stage.stats["drops"] == {}, t.stage.stats["drops"]
    st = t.rx.stats["tls"]
    assert st["connections"] >= 5 and st["ciphertext_records"] > 0 and st["uncovered_connections"] == 0
    kc = t.rx.kernel_counters()
    assert kc["tls_calls"] >= 20 and kc["tls_ciphertext_calls"] > 0 and kc["ringbuf_reserve_failures"] == 0
    # the plaintext events carry the caller's thread, the 4-tuple and the call's direction
    data = [e for e in t.ev.events if e.kind == EventKind.DATA and getattr(e.conn_id, "tls", None)]
    assert data and all(e.tid and e.pid for e in data)
    for e in data:
        assert ng.port in (e.sport, e.dport)
        assert (e.sport == ng.port) == (e.egress == (e.comm == "nginx"))


def test_python_client_and_server_both_views_exact_bytes(tmp_path) -> None:
    """Python's ssl on both ends (SSL_read_ex/SSL_write_ex, SSL_set_fd): the bytes one process
    wrote are the bytes the other read, a 200 KB response and a 1 MB upload included."""
    files = _files(tmp_path)
    client = ("import urllib.request,ssl,sys\n"
              "ctx = ssl.create_default_context(cafile=sys.argv[1])\n"
              "assert urllib.request.urlopen(sys.argv[2] + '/big', context=ctx).read() == sys.stdin.buffer.read()\n"
              "d = bytes(range(256)) * 4096\n"
              "r = urllib.request.urlopen(urllib.request.Request(sys.argv[2] + '/upload', data=d), context=ctx)\n"
              "assert r.read() == b'got 1048576\\n'\n")
    with https_server(files) as srv, Traced(ports=[srv.port], max_message_bytes_per_port={srv.port: 2 << 20}) as t:
        subprocess.run([sys.executable, "-c", client, str(files.ca_cert), srv.url], input=BIG_BODY, check=True,
                       timeout=60)
        t.wait(4)
        assert wait_until(lambda: sum(e.kind == EventKind.CLOSE for e in t.ev.events) >= 8, 10)
    ev = t.ev.events
    cli = next(e.pid for e in ev if e.pid != srv.pid)

    def stream(pid: int, egress: bool) -> bytes:
        return b"".join(bytes(e.payload) for e in ev if e.kind == EventKind.DATA and e.pid == pid
                        and e.egress == egress and getattr(e.conn_id, "tls", None) is not None)

    up = stream(cli, True)
    assert up.startswith(b"GET /big HTTP/1.1\r\n") and up == stream(srv.pid, False)
    down = stream(srv.pid, True)
    assert BIG_BODY in down and down == stream(cli, False)
    assert (bytes(range(256)) * 4096) in up
    assert not [e for e in ev if e.kind == EventKind.GAP], "no bytes lost"
    got = sorted((s.kind, s.attributes.get("http.request.method"), s.attributes.get("url.path"),
                  s.attributes.get("http.request.body.size"),
                  s.attributes.get("http.response.body.size")) for s in t.spans)
    assert got == sorted([(SERVER, "GET", "/big", None, len(BIG_BODY)), (CLIENT, "GET", "/big", None, len(BIG_BODY)),
                          (SERVER, "POST", "/upload", 1 << 20, 12), (CLIENT, "POST", "/upload", 1 << 20, 12)]), got
    assert t.stage.stats["drops"] == {}


def test_postgresql_ssl_same_spans_as_plaintext(tmp_path) -> None:
    from tests.support.postgres import pg_bin, postgres_server

    if pg_bin() is None:
        pytest.skip("PostgreSQL server binaries not installed")
    client = ("import psycopg,sys\n"
              "with psycopg.connect(sys.argv[1]) as c:\n"
              "    c.execute('CREATE TABLE IF NOT EXISTS orders (id int, item text)')\n"
              "    c.execute('INSERT INTO orders VALUES (%s, %s)', (1, 'tea'))\n"
              "    assert c.execute('SELECT item FROM orders WHERE id = %s', (1,)).fetchone() == ('tea',)\n"
              "    c.execute('DELETE FROM orders')\n")
    import importlib.util

    # psycopg's wheel bundles libpq and a libssl, loaded at import: given to the receiver, so it is
    # attached before the client starts (test_dlopened_library_found_after_exec finds it by itself)
    spec = importlib.util.find_spec("psycopg_binary")
    libs = Path(spec.origin).parent.parent / "psycopg_binary.libs" if spec and spec.origin else Path("/nonexistent")
    bundled = [str(p) for p in libs.glob("libssl*")]
    with postgres_server(ssl=True) as pg:
        views: dict[str, list[tuple]] = {}
        for mode in ("require", "disable"):
            with Traced(ports=[pg.port], tls={"libraries": bundled}) as t:
                run_client(client, pg.dsn(sslmode=mode))
                t.wait(8)
                time.sleep(0.5)
            views[mode] = [(k, p, n, c) for k, p, n, c, _st in t.summary()]
            if mode == "require":
                spans = t.spans
                stage_drops = t.stage.stats["drops"]
                tls_stats = t.rx.stats["tls"]
    assert views["require"] == views["disable"], views
    procs = {p for _k, p, *_ in views["require"]}
    assert procs == {PY_COMM, "postgres"}, procs  # the client and the server's backend
    ops = {s.attributes.get("db.operation.name") for s in spans}
    assert {"CREATE TABLE", "INSERT", "SELECT", "DELETE"} <= ops, ops
    assert all(s.attributes["tls.protocol.version"] == "1.3" for s in spans)
    # the SSLRequest exchange is cleartext: the parser stops there (counted "tls"); the rest
    # is the plaintext connection; nothing else dropped
    assert set(stage_drops) <= {"postgresql:tls"}, stage_drops
    assert tls_stats["connections"] == 2 and tls_stats["uncovered_connections"] == 0


def test_dlopened_library_found_after_exec(tmp_path) -> None:
    """psycopg's bundled libssl is loaded by an import (dlopen), not named anywhere: the looks
    at the process after its exec (and the periodic rescan) attach to it."""
    from tests.support.postgres import pg_bin, postgres_server

    if pg_bin() is None:
        pytest.skip("PostgreSQL server binaries not installed")
    client = ("import psycopg,sys,time\n"
              "time.sleep(1.5)  # the receiver looks at a new process 0, 0.05, 0.5 and 3 s after its exec\n"
              "with psycopg.connect(sys.argv[1]) as c:\n"
              "    c.execute('SELECT 1')\n")
    with postgres_server(ssl=True) as pg, Traced(ports=[pg.port], tls={"rescan_interval": "1h"}) as t:
        before = t.rx._probes.stats["files_attached"]  # type: ignore[union-attr]
        run_client(client, pg.dsn(sslmode="require"))
        t.wait(2)
        time.sleep(0.3)
        probes = dict(t.rx._probes.stats)  # type: ignore[union-attr]
    mine = [s for s in t.spans if s.resource.attributes.get("process.executable.name") == PY_COMM]
    assert any(s.attributes.get("db.operation.name") == "SELECT" for s in mine), t.summary()
    assert probes["execs_seen"] >= 1
    # attached now, if it was not already mapped by another process when the receiver started
    assert probes["files_attached"] >= before


@pytest.mark.skipif(NODE is None, reason="Debian's nodejs not installed")
def test_nodejs_static_openssl(tmp_path) -> None:
    """Node.js links OpenSSL statically and exports its symbols: attached by symbol in the executable."""
    files = _files(tmp_path)
    js = ("const fs = require('fs');\n"
          "const ca = fs.readFileSync(process.argv[1]);  // node -e: argv[1] is the first argument\n"
          "function get(u) { const m = require(u.startsWith('https:') ? 'https' : 'http');\n"
          "  return new Promise((ok, ko) => m.get(u, {ca, agent: false}, r => {\n"
          "  r.resume(); r.on('end', () => ok(r.statusCode)); }).on('error', ko)); }\n"
          "(async () => { for (const u of process.argv.slice(2)) await get(u); })();\n")
    with nginx_tls(files, {"index.html": b"<p>hi</p>\n"}) as ng, Traced(ports=[ng.port, ng.plain_port]) as t:
        for tls in (True, False):
            subprocess.run([NODE, "-e", js, str(files.ca_cert), ng.url("/index.html", tls), ng.url("/api/n", tls)],
                           check=True, timeout=60)
        t.wait(8)
        time.sleep(0.3)
    tls_spans, plain = t.summary(ng.port), t.summary(ng.plain_port)
    assert tls_spans == plain, (tls_spans, plain)
    assert (CLIENT, "node", "GET", "/index.html", 200) in tls_spans
    assert (SERVER, "nginx", "GET", "/api/n", 200) in tls_spans
    assert t.stage.stats["drops"] == {}


def test_filters_apply_to_tls(tmp_path) -> None:
    files = _files(tmp_path)
    with nginx_tls(files, {"index.html": b"x"}) as ng:
        with Traced(ports=[ng.port], process_names=["curl"]) as t:
            _curl(ng.url("/index.html"), files.ca_cert)
            run_client(_URLLIB, str(files.ca_cert), ng.url("/api/py"))
            t.wait(1)
            time.sleep(0.5)
        assert [(k, p) for k, p, *_ in t.summary()] == [(CLIENT, "curl")]
        assert {e.comm for e in t.ev.events} == {"curl"}
        with Traced(ports=[ng.plain_port]) as t:  # the TLS port is filtered out: nothing from it
            _curl(ng.url("/index.html"), files.ca_cert)
            time.sleep(0.5)
        assert t.ev.events == []


def test_tls_disabled_skips_ciphertext(tmp_path) -> None:
    """Without the uprobes, a TLS connection is recognised by its handshake and skipped (counted), never
    handed to a parser."""
    files = _files(tmp_path)
    with nginx_tls(files, {"index.html": b"x"}) as ng, Traced(ports=[ng.port], tls={"enabled": False}) as t:
        _curl(ng.url("/index.html"), files.ca_cert)
        assert wait_until(lambda: sum(e.kind == EventKind.CLOSE for e in t.ev.events) >= 4, 10)
    assert t.spans == [] and t.stage.stats["drops"] == {}
    assert not [e for e in t.ev.events if e.kind == EventKind.DATA]
    st = t.rx.stats["tls"]
    assert st["connections"] == 2 and st["uncovered_connections"] == 2 and st["ciphertext_records"] > 0
    progs = subprocess.run(["bpftool", "prog", "show"], capture_output=True, text=True).stdout
    assert "up_ssl_write" not in progs


def test_grpcio_boringssl_counted_asyncio_memory_bio_traced(tmp_path) -> None:
    """grpcio carries BoringSSL linked in and stripped (nothing to attach to): its connections are
    counted uncovered and nothing of them is parsed. asyncio drives OpenSSL through memory BIOs (no
    syscall inside the SSL calls): the SSL* is bound by the thread's next TLS write, so it is traced."""
    from tests.support.otlp_sink import make_tls

    grpc_files = make_tls(tmp_path / "g")
    server = ("import grpc,sys,time\nfrom concurrent import futures\n"
              "def h(req, ctx): return req\n"
              "s = grpc.server(futures.ThreadPoolExecutor(2))\n"
              "s.add_generic_rpc_handlers([grpc.method_handlers_generic_handler('t.Echo', "
              "{'Say': grpc.unary_unary_rpc_method_handler(h)})])\n"
              "cert, key = open(sys.argv[2], 'rb').read(), open(sys.argv[3], 'rb').read()\n"
              "s.add_secure_port('127.0.0.1:' + sys.argv[1], grpc.ssl_server_credentials([(key, cert)]))\n"
              "s.start(); s.wait_for_termination()\n")
    client = ("import grpc,sys\n"
              "creds = grpc.ssl_channel_credentials(open(sys.argv[2], 'rb').read())\n"
              "with grpc.secure_channel('localhost:' + sys.argv[1], creds) as ch:\n"
              "    say = ch.unary_unary('/t.Echo/Say')\n"
              "    for _ in range(3):\n"
              "        assert say(b'hi', timeout=10) == b'hi'\n")
    aio = ("import asyncio,ssl,sys\n"
           "async def main():\n"
           "    ctx = ssl.create_default_context(cafile=sys.argv[2])\n"
           "    r, w = await asyncio.open_connection('127.0.0.1', int(sys.argv[1]), ssl=ctx,\n"
           "                                         server_hostname='localhost')\n"
           "    w.write(b'GET /index.html HTTP/1.1\\r\\nHost: x\\r\\nConnection: close\\r\\n\\r\\n')\n"
           "    await r.read()\n"
           "    w.close()\n"
           "asyncio.run(main())\n")
    from tests.support.capture import free_port, wait_port

    port = free_port()
    srv = subprocess.Popen([sys.executable, "-c", server, str(port), str(grpc_files.server_cert),
                            str(grpc_files.server_key)])
    files = _files(tmp_path)
    try:
        wait_port(port)
        with nginx_tls(files, {"index.html": b"x"}) as ng, Traced(ports=[port, ng.port]) as t:
            run_client(client, str(port), str(grpc_files.ca_cert))
            run_client(aio, str(ng.port), str(files.ca_cert))
            assert wait_until(lambda: t.rx.stats["tls"]["uncovered_connections"] >= 2, 10), t.rx.stats
            t.wait(2)
            time.sleep(0.3)
            kc = t.rx.kernel_counters()
    finally:
        srv.terminate()
        srv.wait(10)
    # grpcio: no span and no parse of its ciphertext (both processes' views counted uncovered)
    assert not [s for s in t.spans if s.attributes.get("server.port") == port]
    assert t.rx.stats["tls"]["uncovered_connections"] == 2
    assert [(k, p, path, st) for k, p, _n, path, st in t.summary(ng.port)] == [
        (SERVER, "nginx", "/index.html", 200), (CLIENT, PY_COMM, "/index.html", 200)]
    assert kc["tls_no_socket_calls"] == 0
    assert t.stage.stats["drops"] == {}, t.stage.stats["drops"]
    assert Counter(e.kind for e in t.ev.events if e.sport == port or e.dport == port)[EventKind.DATA] == 0


def test_wirespan_run_tls_option(tmp_path) -> None:
    """``receivers: ebpf: tls:`` through the config file and a real ``wirespan run``."""
    from tests.support.wirespan_proc import wirespan_run

    files = _files(tmp_path)
    with nginx_tls(files, {"index.html": b"<p>hi</p>\n"}) as ng:
        with wirespan_run(tmp_path, {"ebpf": {"ports": [ng.port], "tls": {"enabled": True, "libraries": [],
                                                                          "rescan_interval": "30s"}}}) as w:
            _curl(ng.url("/index.html"), files.ca_cert)
            time.sleep(1.5)
    assert w.returncode == 0, w.log()
    got = sorted((s["kind"], s["resource"]["process.executable.name"], s["attrs"]["url.scheme"],
                  s["attrs"]["tls.protocol.version"]) for s in w.spans)
    assert got == [(SERVER, "nginx", "https", "1.3"), (CLIENT, "curl", "https", "1.3")], got
