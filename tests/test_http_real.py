"""HTTP/1 end to end with real parts: nginx (Debian) and Python's http.server serve,
curl and httpx (and a raw socket, for pipelining, which no maintained client
still does) make requests, tcpdump records loopback, and the capture is
replayed through the real pcap receiver and the protocols stage."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from service.model import SpanKind, StatusCode
from tests.support.capture import free_port, tcpdump, wait_port
from tests.support.nginx import nginx_server
from tests.support.replay import replay, replay_spans

pytestmark = pytest.mark.slow

BIG_TEXT = b"".join(b"line %06d of a compressible text file\n" % i for i in range(20000))  # ~800 KB
UPLOAD = os.urandom(1_500_000)
TP = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


class Run:
    """One recorded session against nginx: what each request was, and how long it took."""

    def __init__(self) -> None:
        self.wall: dict[str, float] = {}
        self.result: dict[str, object] = {}
        self.capture: Path | None = None
        self.spans: list = []
        self.rstats: dict = {}
        self.pstats: dict = {}
        self.port = 0

    def timed(self, tag: str, fn) -> object:
        t = time.monotonic()
        r = fn()
        self.wall[tag] = time.monotonic() - t
        self.result[tag] = r
        return r


def _curl(*args: str) -> None:
    subprocess.run(["curl", "-sS", "-o", "/dev/null", *args], check=True, timeout=30)


def _pipelined(port: int) -> bytes:
    """Three requests in one write, then read all three responses (RFC 9112 §9.3.2)."""
    reqs = b"".join(b"GET /index.html?pipe=%d HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n" % i for i in range(3))
    reqs += b"GET /index.html?pipe=close HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(reqs)
        got = bytearray()
        while True:
            b = s.recv(65536)
            if not b:
                break
            got += b
    return bytes(got)


@pytest.fixture(scope="module")
def nginx_run() -> Iterator[Run]:
    run = Run()
    files = {"index.html": b"<html>hello</html>\n", "big.txt": BIG_TEXT}
    with nginx_server(files) as ng:
        run.port = ng.port
        u = ng.url
        with tcpdump(ng.port) as cap:
            run.timed("curl-get", lambda: _curl(u("/index.html?q=search&lang=en")))
            run.timed("curl-head", lambda: _curl("-I", u("/index.html?head=1")))
            run.timed("curl-404", lambda: _curl(u("/nope?x=404")))
            run.timed("curl-500", lambda: _curl(u("/boom")))
            run.timed("curl-gzip", lambda: _curl("--compressed", u("/big.txt?gz=1")))
            run.timed("curl-post", lambda: _curl("-d", "a=1&b=2", u("/api/form")))
            run.timed("curl-delete", lambda: _curl("-X", "DELETE", u("/api/item/7")))
            with httpx.Client() as c:  # one keep-alive connection
                run.timed("httpx-ka1", lambda: c.get(u("/index.html?ka=1"), headers={"traceparent": TP}))
                run.timed("httpx-ka2", lambda: c.get(u("/index.html?ka=2")))
                run.timed("httpx-put", lambda: c.put(u("/api/put"), content=b"x" * 1000))
                run.timed("httpx-upload", lambda: c.post(u("/api/upload"), content=UPLOAD))
                run.timed("httpx-chunked", lambda: c.post(
                    u("/api/chunked"), content=iter([b"part-one;", b"part-two;", b"three"])))
                run.timed("httpx-ka3", lambda: c.get(u("/big.txt?ka=3")))
            run.timed("pipeline", lambda: _pipelined(ng.port))
        run.capture = cap
        run.spans, run.rstats, run.pstats = replay(cap)
    yield run


def _by_query(run: Run, query: str):
    got = [s for s in run.spans if s.attributes.get("url.query") == query]
    assert len(got) == 1, (query, [s.attributes for s in run.spans])
    return got[0]


def _by_path(run: Run, path: str):
    got = [s for s in run.spans if s.attributes.get("url.path") == path]
    assert len(got) == 1, (path, [s.attributes for s in run.spans])
    return got[0]


def _check_duration(run: Run, span, tag: str) -> None:
    assert 0 < span.duration_ns <= run.wall[tag] * 1e9, (tag, span.duration_ns, run.wall[tag])


def test_every_exchange_gives_one_span(nginx_run: Run) -> None:
    assert len(nginx_run.spans) == 17, [s.attributes.get("url.path") for s in nginx_run.spans]
    assert nginx_run.pstats["drops"] == {}
    assert nginx_run.rstats["drops"] == {} and not nginx_run.rstats["gap_bytes"]
    for s in nginx_run.spans:
        a = s.attributes
        assert s.kind == SpanKind.SERVER
        assert a["url.scheme"] == "http" and a["network.protocol.version"] == "1.1"
        assert a["server.port"] == nginx_run.port and a["client.address"] == "127.0.0.1"
        assert s.resource.attributes["service.name"] == "unknown_service"


def test_curl_get_query_and_user_agent(nginx_run: Run) -> None:
    s = _by_query(nginx_run, "q=search&lang=en")
    a = s.attributes
    assert s.name == "GET /index.html" and a["url.path"] == "/index.html" and a["http.response.status_code"] == 200
    assert a["http.response.body.size"] == len(b"<html>hello</html>\n")
    assert a["user_agent.original"].startswith("curl/")
    assert s.status_code == StatusCode.UNSET
    _check_duration(nginx_run, s, "curl-get")


def test_head_404_500(nginx_run: Run) -> None:
    h = _by_query(nginx_run, "head=1")
    assert h.name == "HEAD /index.html" and h.attributes["http.response.body.size"] == 0
    nf = _by_query(nginx_run, "x=404")
    assert nf.attributes["http.response.status_code"] == 404 and nf.status_code == StatusCode.UNSET
    assert nf.attributes["http.response.body.size"] > 0
    boom = _by_path(nginx_run, "/boom")
    assert boom.attributes["http.response.status_code"] == 500 and boom.status_code == StatusCode.ERROR
    assert boom.attributes["error.type"] == "500" and boom.attributes["http.response.body.size"] == 5
    for tag, s in (("curl-head", h), ("curl-404", nf), ("curl-500", boom)):
        _check_duration(nginx_run, s, tag)


def test_chunked_gzip_response(nginx_run: Run) -> None:
    s = _by_query(nginx_run, "gz=1")
    size = s.attributes["http.response.body.size"]
    assert 0 < size < len(BIG_TEXT) // 5  # gzip-compressed and chunked by nginx
    _check_duration(nginx_run, s, "curl-gzip")


def test_post_put_delete_bodies(nginx_run: Run) -> None:
    post = _by_path(nginx_run, "/api/form")
    assert post.name == "POST /api/form" and post.attributes["http.request.body.size"] == len("a=1&b=2")
    put = _by_path(nginx_run, "/api/put")
    assert put.name == "PUT /api/put" and put.attributes["http.request.body.size"] == 1000
    dele = _by_path(nginx_run, "/api/item/7")
    assert dele.name == "DELETE /api/item/{id}" and "http.request.body.size" not in dele.attributes
    up = _by_path(nginx_run, "/api/upload")
    assert up.attributes["http.request.body.size"] == len(UPLOAD)
    ch = _by_path(nginx_run, "/api/chunked")
    assert ch.attributes["http.request.body.size"] == len(b"part-one;part-two;three")
    for tag, s in (("curl-post", post), ("httpx-put", put), ("curl-delete", dele), ("httpx-upload", up)):
        _check_duration(nginx_run, s, tag)


def test_keep_alive_and_traceparent(nginx_run: Run) -> None:
    k1, k2 = _by_query(nginx_run, "ka=1"), _by_query(nginx_run, "ka=2")
    k3 = _by_query(nginx_run, "ka=3")
    assert k1.attributes["client.port"] == k2.attributes["client.port"] == k3.attributes["client.port"]
    assert k1.trace_id.hex() == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert k1.parent_span_id.hex() == "00f067aa0ba902b7"
    assert k2.parent_span_id == b"" and k2.trace_id != k1.trace_id
    assert k1.attributes["user_agent.original"].startswith("python-httpx/")
    # httpx asks for gzip: the body on the wire is what it downloaded, chunked by nginx.
    got = nginx_run.result["httpx-ka3"]
    assert k3.attributes["http.response.body.size"] == got.num_bytes_downloaded  # type: ignore[attr-defined]
    assert got.headers["transfer-encoding"] == "chunked"  # type: ignore[attr-defined]
    assert k1.end_ns <= k2.start_ns


def test_pipelining(nginx_run: Run) -> None:
    spans = [_by_query(nginx_run, f"pipe={i}") for i in (0, 1, 2, "close")]
    assert len({s.attributes["client.port"] for s in spans}) == 1
    starts = [s.start_ns for s in spans]
    assert starts == sorted(starts)
    assert all(s.attributes["http.response.status_code"] == 200 for s in spans)


def test_truncated_capture_keeps_spans_before_the_cut(nginx_run: Run, tmp_path: Path) -> None:
    data = nginx_run.capture.read_bytes()  # type: ignore[union-attr]
    cut = tmp_path / "cut.pcap"
    cut.write_bytes(data[: len(data) // 2])
    spans, rstats, _ = replay(cut)
    assert 0 < len(spans) < len(nginx_run.spans)
    assert rstats["errors"], "a cut file must be reported"


# -- Python's http.server: HTTP/1.0, close-delimited bodies -----------------------------------------------
_SERVER = textwrap.dedent("""
    import sys
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class H(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"
        def do_GET(self):
            if self.path.startswith("/stream"):
                self.send_response(200)
                self.send_header("Content-Type", "text/plain")
                self.end_headers()          # no Content-Length: the body ends at close
                for i in range(50):
                    self.wfile.write(b"chunk %d\\n" % i)
                return
            self.send_error(404)
        def log_message(self, *a):
            pass

    ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
""")


@pytest.fixture()
def python_server(tmp_path: Path) -> Iterator[int]:
    port = free_port()
    script = tmp_path / "srv.py"
    script.write_text(_SERVER)
    proc = subprocess.Popen([sys.executable, str(script), str(port)])
    try:
        wait_port(port)
        yield port
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_http_server_close_delimited(python_server: int) -> None:
    port = python_server
    with tcpdump(port) as cap:
        r = httpx.get(f"http://127.0.0.1:{port}/stream?n=50")
        assert r.status_code == 200
        _curl(f"http://127.0.0.1:{port}/missing")
    spans = replay_spans(cap)
    st = next(s for s in spans if s.attributes["url.path"] == "/stream")
    assert st.attributes["http.response.body.size"] == len(r.content)
    assert st.attributes["network.protocol.version"] == "1.0"
    assert st.status_code == StatusCode.UNSET
    nf = next(s for s in spans if s.attributes["url.path"] == "/missing")
    assert nf.attributes["http.response.status_code"] == 404


# -- a server that resets the connection in the middle of a response ------------------------------------
_RST_SERVER = textwrap.dedent("""
    import socket, struct, sys
    ls = socket.socket(); ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind(("127.0.0.1", int(sys.argv[1]))); ls.listen(8)
    while True:
        c, _ = ls.accept()
        data = b""
        while b"\\r\\n\\r\\n" not in data:
            more = c.recv(4096)
            if not more:
                break
            data += more
        if b"\\r\\n\\r\\n" in data:
            c.sendall(b"HTTP/1.1 200 OK\\r\\nContent-Length: 100000\\r\\n\\r\\n" + b"x" * 1000)
            c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        c.close()  # after a request: linger 0 makes it a RST
""")


def test_reset_mid_response_real_socket(tmp_path: Path) -> None:
    port = free_port()
    script = tmp_path / "rst.py"
    script.write_text(_RST_SERVER)
    proc = subprocess.Popen([sys.executable, str(script), str(port)])
    try:
        wait_port(port)
        with tcpdump(port) as cap, pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
            httpx.get(f"http://127.0.0.1:{port}/partial?r=1", timeout=5)
    finally:
        proc.kill()
        proc.wait()
    spans = [s for s in replay_spans(cap) if s.attributes.get("url.path") == "/partial"]
    assert len(spans) == 1
    s = spans[0]
    assert s.status_code == StatusCode.ERROR and s.attributes["error.type"] == "connection_reset"
    assert s.attributes["http.response.status_code"] == 200
    assert 0 < s.attributes["http.response.body.size"] <= 1000


def test_bundled_sample_capture() -> None:
    """The capture `wirespan run` replays by default: every exchange becomes a span."""
    sample = Path(__file__).resolve().parents[1] / "config" / "samples" / "http-sample.pcap"
    spans, rstats, pstats = replay(sample)
    assert len(spans) == 24 and pstats["drops"] == {} and rstats["drops"] == {}
    methods = {s.name.split(" ")[0] for s in spans}  # names are "{method} {http.route}"
    assert {"GET", "POST", "PUT", "DELETE", "HEAD"} <= methods
    codes = {s.attributes["http.response.status_code"] for s in spans}
    assert {200, 201, 204, 404, 500} <= codes
    assert any(s.attributes.get("url.query") == "page=2&sort=price" for s in spans)
    assert sum(s.status_code == StatusCode.ERROR for s in spans) == 2
    joined = [s for s in spans if s.parent_span_id]
    assert len(joined) == 1 and joined[0].trace_id.hex() == "7d3c2b1a0f9e8d7c6b5a493827160514"


# -- hostile clients against a real nginx --------------------------------------------------------------
def _raw(port: int, data: bytes, read: bool = True) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        try:
            s.sendall(data)
        except OSError:  # nginx may close while we are still sending: that is the point
            pass
        got = bytearray()
        if read:
            try:
                while True:
                    b = s.recv(65536)
                    if not b:
                        break
                    got += b
            except OSError:
                pass
    return bytes(got)


def test_hostile_requests_against_nginx() -> None:
    """Garbage, a 2^40 Content-Length and a 10 MB header line: bounded, counted, never a crash."""
    with nginx_server({"index.html": b"ok\n"}) as ng:
        with tcpdump(ng.port) as cap:
            _raw(ng.port, os.urandom(3000))
            _raw(ng.port, b"POST /huge HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % (1 << 40) + b"x" * 100000)
            _raw(ng.port, b"GET /big HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (10 * 1024 * 1024) + b"\r\n\r\n")
            _curl(ng.url("/index.html?after=1"))  # a normal request still works and is seen
        # nginx answers 400 once it has read ~9 KB of the oversized header line; a header
        # limit below that is always reached before the answer, whatever the timing.
        spans, _rstats, pstats = replay(cap, {"http": {"max_header_bytes": 4096}})
    paths = {s.attributes.get("url.path"): s for s in spans}
    assert "/index.html" in paths and paths["/index.html"].attributes["http.response.status_code"] == 200
    huge = paths["/huge"]  # nginx answers 413 at once; the span comes out when the connection ends
    assert huge.attributes["http.response.status_code"] == 413
    assert 0 < huge.attributes["http.request.body.size"] <= 100000
    assert "/big" not in paths
    drops = pstats["drops"]
    assert drops.get("http:header_too_large", 0) >= 1, drops
    assert sum(v for k, v in drops.items() if k.startswith(("http:", "undetected"))) >= 2, drops


# -- bare-LF requests, and a capture started after the connection opened (issue 16 classes 2, 3) ------
def _exchange(s: socket.socket, data: bytes) -> bytes:
    """Send one request on a keep-alive socket; read until one whole Content-Length response."""
    s.sendall(data)
    got = bytearray()
    while b"\r\n\r\n" not in got:
        got += s.recv(65536)
    head, _, body = bytes(got).partition(b"\r\n\r\n")
    n = int(next(ln.split(b":")[1] for ln in head.split(b"\r\n") if ln.lower().startswith(b"content-length")))
    while len(body) < n:
        body += s.recv(65536)
    return head


def test_nginx_bare_lf_requests_seen_from_mid_connection() -> None:
    """nginx answers requests whose lines end in a bare LF (RFC 9112 §2.2); tcpdump starts
    after the connection opened (no SYN, the first request unseen): every exchange it saw
    is a span, with nginx's own status."""
    with nginx_server({"index.html": b"hello\n", "b.txt": b"bee\n"}) as ng:
        with socket.create_connection(("127.0.0.1", ng.port), timeout=5) as s:
            assert _exchange(s, b"GET /index.html?before=1 HTTP/1.1\r\nHost: x\r\n\r\n").startswith(b"HTTP/1.1 200")
            with tcpdump(ng.port) as cap:
                assert _exchange(s, b"GET /index.html?lf=1 HTTP/1.1\nHost: x\nUser-Agent: nc\n\n").startswith(
                    b"HTTP/1.1 200")
                assert _exchange(s, b"GET /b.txt HTTP/1.1\r\nHost: x\nAccept: */*\r\n\n").startswith(b"HTTP/1.1 200")
                assert _exchange(s, b"GET   /nope   HTTP/1.1\nHost: x\n\n").startswith(b"HTTP/1.1 404")
                assert _exchange(s, b"GET /index.html?crlf=1 HTTP/1.1\r\nHost: x\r\n\r\n").startswith(b"HTTP/1.1 200")
    spans, _rstats, pstats = replay(cap)
    got = [(s.attributes["url.path"], s.attributes.get("url.query"), s.attributes["http.response.status_code"])
           for s in spans]
    assert got == [("/index.html", "lf=1", 200), ("/b.txt", None, 200), ("/nope", None, 404),
                   ("/index.html", "crlf=1", 200)], got
    assert spans[0].attributes["user_agent.original"] == "nc"
    assert all(s.kind == SpanKind.SERVER and s.attributes["server.port"] == ng.port for s in spans)
    assert not pstats["drops"], pstats


def test_nginx_http09_simple_requests() -> None:
    """nginx still answers an HTTP/0.9 Simple-Request (``GET /path`` CRLF, RFC 1945 §4.1) with
    the bare body, closing after it: each is a span (version 0.9, no status code), and a
    ``GET key`` line on the HTTP port is not taken for inline Redis."""
    with nginx_server({"index.html": b"hello\n", "b.txt": b"bee\n" * 100}) as ng:
        with tcpdump(ng.port) as cap:
            for line in (b"GET /index.html\r\n", b"GET /b.txt\n"):
                with socket.create_connection(("127.0.0.1", ng.port), timeout=5) as s:
                    s.sendall(line)
                    got = b""
                    while chunk := s.recv(65536):
                        got += chunk
                assert not got.startswith(b"HTTP/"), got[:40]
    spans, _rstats, pstats = replay(cap)
    got = [(s.attributes["url.path"], s.attributes["network.protocol.version"],
            s.attributes["http.response.body.size"], "http.response.status_code" in s.attributes) for s in spans]
    assert got == [("/index.html", "0.9", 6, False), ("/b.txt", "0.9", 400, False)], got
    assert all(s.kind == SpanKind.SERVER and s.status_code == StatusCode.UNSET for s in spans)
    assert not pstats["drops"], pstats


def test_nginx_bare_lf_chunked_request_body() -> None:
    """nginx reads a chunked body whose lines end in a bare LF from a client whose head did
    (and answers the request after it on the same connection): both are spans, sizes right."""
    with nginx_server({"index.html": b"hello\n"}) as ng:
        with tcpdump(ng.port) as cap:
            with socket.create_connection(("127.0.0.1", ng.port), timeout=5) as s:
                s.sendall(b"POST /index.html HTTP/1.1\nHost: x\nTransfer-Encoding: chunked\n\n5\nhello\n3\nabc\n0\n\n"
                          b"GET /index.html HTTP/1.1\nHost: x\nConnection: close\n\n")
                got = b""
                while chunk := s.recv(65536):
                    got += chunk
            assert got.count(b"HTTP/1.1 ") == 2, got
    spans, _rstats, pstats = replay(cap)
    got = [(s.attributes["http.request.method"], s.attributes["http.response.status_code"],
            s.attributes.get("http.request.body.size")) for s in spans]
    assert got == [("POST", 405, 8), ("GET", 200, None)], got
    assert not pstats["drops"], pstats
