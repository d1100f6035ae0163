"""HTTP/2 from real parts: nginx (cleartext h2), curl --http2-prior-knowledge and httpx(http2=True).

Traffic is recorded with tcpdump on loopback and replayed through the real
pcap receiver and protocols stage (tests/support/replay.py); spans asserted.
"""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

import httpx

from processors.protocols import grpc
from service.model import SpanKind, StatusCode
from tests.support.capture import tcpdump
from tests.support.h2c_server import h2c_server
from tests.support.nginx_h2 import nginx_h2_server
from tests.support.replay import replay, replay_spans

TP = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
BIG = bytes(range(256)) * 4096  # 1 MiB: many DATA frames, flow control, WINDOW_UPDATEs
FILES = {"index.html": b"<html>hello</html>\n", "big.bin": BIG}


def _h2_spans(pcap: Path) -> list:
    spans = replay_spans(pcap)
    return [s for s in spans if s.attributes.get("network.protocol.version") == "2"]


def test_curl_prior_knowledge(tmp_path: Path) -> None:
    with nginx_h2_server(FILES) as ng, tcpdump(ng.port, tmp_path / "curl.pcap") as pcap:
        base = ng.url()
        # One curl per URL: curl 7.88 (Debian 12) fails with "Error in the HTTP2
        # framing layer" when it reuses a prior-knowledge connection for a second URL.
        for path in ("index.html", "big.bin", "missing", "boom"):
            cmd = ["curl", "-s", "-o", "/dev/null", "--http2-prior-knowledge", "-A", "wirespan-test/1",
                   "-H", f"traceparent: {TP}", "-H", "Authorization: Bearer TOPSECRET",
                   "-H", "Cookie: s=TOPSECRET", base + path]
            subprocess.run(cmd, check=True, timeout=30)
        upload = tmp_path / "upload.bin"
        upload.write_bytes(bytes(range(256)) * 1200)  # 300 KiB: past the 64 KiB flow-control window
        subprocess.run(["curl", "-s", "-o", "/dev/null", "--http2-prior-knowledge", "--data-binary", f"@{upload}",
                        base + "api/post?a=1&b=2"], check=True, timeout=30)
    spans = _h2_spans(pcap)
    by_path = {s.attributes["url.path"]: s for s in spans}
    assert set(by_path) == {"/index.html", "/big.bin", "/missing", "/boom", "/api/post"}, spans
    idx = by_path["/index.html"]
    assert idx.name == "GET /index.html" and idx.kind == SpanKind.SERVER
    a = idx.attributes
    assert a["http.request.method"] == "GET" and a["http.response.status_code"] == 200
    assert a["http.response.body.size"] == len(FILES["index.html"])
    assert a["user_agent.original"] == "wirespan-test/1"
    assert a["url.scheme"] == "http" and a["server.address"] == "127.0.0.1" and a["server.port"] == ng.port
    assert a["client.address"] == "127.0.0.1"
    assert idx.trace_id.hex() == "0af7651916cd43dd8448eb211c80319c"
    assert idx.parent_span_id.hex() == "b7ad6b7169203331"
    assert by_path["/big.bin"].attributes["http.response.body.size"] == len(BIG)
    assert by_path["/missing"].attributes["http.response.status_code"] == 404
    assert by_path["/missing"].status_code == StatusCode.UNSET
    assert by_path["/boom"].attributes["http.response.status_code"] == 500
    assert by_path["/boom"].status_code == StatusCode.ERROR
    post = by_path["/api/post"]
    assert post.name == "POST /api/post" and post.attributes["url.query"] == "a=1&b=2"
    assert post.attributes["http.request.body.size"] == 256 * 1200
    for s in spans:
        assert "TOPSECRET" not in repr(s.attributes)
        assert s.end_ns >= s.start_ns > 0
    # the 1 MiB download takes longer than the tiny page
    assert by_path["/big.bin"].end_ns - by_path["/big.bin"].start_ns >= 0


def test_httpx_multiplexed(tmp_path: Path) -> None:
    """Concurrent requests on one connection: streams interleave on the wire."""
    files = {f"f{i}.txt": (b"%d" % i) * (1000 * (i + 1)) for i in range(8)}
    files["big.bin"] = BIG

    async def run(base: str) -> list[httpx.Response]:
        async with httpx.AsyncClient(http1=False, http2=True, base_url=base) as c:
            tasks = [c.get(f"/f{i}.txt", headers={"x-n": str(i)}) for i in range(8)]
            tasks += [c.get("/big.bin"), c.post("/api/p", content=b"y" * 60000), c.get("/nope")]
            return await asyncio.gather(*tasks)

    with nginx_h2_server(files) as ng, tcpdump(ng.port, tmp_path / "httpx.pcap") as pcap:
        resps = asyncio.run(run(ng.url()))
        assert all(r.http_version == "HTTP/2" for r in resps)
    spans = _h2_spans(pcap)
    assert len(spans) == 11, [s.attributes.get("url.path") for s in spans]
    by_path = {s.attributes["url.path"]: s for s in spans}
    for i in range(8):
        a = by_path[f"/f{i}.txt"].attributes
        assert a["http.response.status_code"] == 200
        assert a["http.response.body.size"] == len(files[f"f{i}.txt"])
        assert a["user_agent.original"].startswith("python-httpx/")
    assert by_path["/big.bin"].attributes["http.response.body.size"] == len(BIG)
    assert by_path["/api/p"].attributes["http.request.body.size"] == 60000
    assert by_path["/nope"].attributes["http.response.status_code"] == 404


def test_curl_h2c_upgrade(tmp_path: Path) -> None:
    """curl --http2 on http:// upgrades (HTTP/1.1 101 -> h2c); the second URL goes on stream 3.

    The server is tests/support/h2c_server.py (h2's real state machine behind a
    small socket loop): nginx 1.22 does not implement the h2c upgrade.
    """
    with h2c_server() as port, tcpdump(port, tmp_path / "h2c.pcap") as pcap:
        out = subprocess.run(["curl", "-sS", "--http2", "-H", f"traceparent: {TP}", f"http://127.0.0.1:{port}/up?q=1",
                              f"http://127.0.0.1:{port}/second"], check=True, timeout=30, capture_output=True)
        assert out.stdout == b"body:/up?q=1body:/second"
    spans, _, stats = replay(pcap)
    assert stats["switched"] == {"http->http2": 1}
    assert not stats.get("drops"), stats.get("drops")
    # The HTTP/1 session hands the upgraded request over (conn.extra["http2_upgrade_request"]):
    # one span per exchange, both HTTP/2, the first on stream 1 started by the HTTP/1 request.
    assert [s.attributes["network.protocol.version"] for s in spans] == ["2", "2"]
    h2 = {s.attributes["url.path"]: s for s in spans}
    up = h2["/up"]
    assert up.attributes["url.query"] == "q=1" and up.attributes["http.response.status_code"] == 200
    assert up.attributes["http.response.body.size"] == len(b"body:/up?q=1")
    assert up.attributes["user_agent.original"].startswith("curl/")
    assert up.trace_id.hex() == "0af7651916cd43dd8448eb211c80319c"
    second = h2["/second"]
    assert second.attributes["http.response.status_code"] == 200
    assert second.attributes["http.response.body.size"] == len(b"body:/second")
    assert second.start_ns >= up.start_ns


FIXTURES = Path(__file__).parent / "fixtures" / "http2"


def _tshark_streams(pcap: Path, port: int) -> dict[tuple[int, int], dict[str, str]]:
    """(tcp stream, h2 stream) -> the header fields tshark (Wireshark's HPACK decoder) read."""
    out = subprocess.run(
        ["tshark", "-r", str(pcap), "-d", f"tcp.port=={port},http2", "-Y", "http2.type==1", "-T", "fields",
         "-e", "tcp.stream", "-e", "http2.streamid", "-e", "http2.header.name", "-e", "http2.header.value",
         "-E", "separator=|", "-E", "aggregator=\x1f"],
        check=True, capture_output=True, text=True, timeout=60).stdout
    got: dict[tuple[int, int], dict[str, str]] = {}
    for line in out.splitlines():
        tcp, sids, names, values = line.split("|")
        sid = int(sids.split("\x1f")[0])
        fields = got.setdefault((int(tcp), sid), {})
        for n, v in zip(names.split("\x1f"), values.split("\x1f"), strict=False):
            fields.setdefault(n, v)
    return got


def test_fixtures_agree_with_tshark() -> None:
    """The stored captures (grpcio calls, curl against nginx) decode as Wireshark decodes them."""
    for name in ("grpc_calls.pcap", "nginx_curl.pcap"):
        pcap = FIXTURES / name
        spans = replay_spans(pcap)
        assert spans, name
        port = spans[0].attributes["server.port"]
        oracle = _tshark_streams(pcap, port)
        # the response's :status is in the same stream's other HEADERS frame
        by_stream = {}
        for key, f in oracle.items():
            by_stream.setdefault(key, {}).update(f)
        want = sorted((f[":path"], int(f[":status"]), f.get("grpc-status")) for f in by_stream.values())
        got = []
        for s in spans:
            a = s.attributes
            if a.get("rpc.system.name") == "grpc":
                code = grpc.STATUS_NAMES.index(a["rpc.response.status_code"])
                got.append(("/" + a["rpc.method"], 200, str(code)))
            else:
                got.append((a["url.path"], a["http.response.status_code"], None))
        assert sorted(got) == want, name


def test_stage_config_options() -> None:
    """Options under processors: protocols: http2: reach the session; typos are errors."""
    import pytest

    pcap = FIXTURES / "grpc_calls.pcap"
    spans, _, stats = replay(pcap, {"http2": {"max_streams": 1}})
    assert len(spans) == 5 and not stats.get("drops")  # grpcio runs one call at a time
    with pytest.raises(Exception, match="max_stream"):
        replay(pcap, {"http2": {"max_stream": 1}})
