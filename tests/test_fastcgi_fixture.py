"""The stored real FastCGI capture (tests/fixtures/fastcgi, re-recorded by record.py), replayed.

nginx 1.22 in front of php-fpm 8.2, the FastCGI port alone: nine requests, each on its own
connection (nginx keeps no pool without an ``upstream`` keepalive), request id 1 each time.
The exact spans are asserted, nothing may be dropped, and tshark's dissection of the same
file is the oracle for what each connection carried (params, body sizes, the response
head's status, STDERR, the END_REQUEST statuses and the frames' times). The C record walk
(_fcgi.c) and the Python one must give the same spans; under WIRESPAN_PURE_PYTHON=1 both
runs are the Python one.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import subprocess
import xml.etree.ElementTree as ET
from typing import Any

import pytest

from processors.protocols import fastcgi as fcgi
from service.model import Span, SpanKind, StatusCode
from tests.support.replay import assert_clean, conversations, epoch_ns, replay
from tests.support.whole import cut, run_stage

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "fastcgi", "nginx_php_fpm_session.pcap")
#: php-fpm's port in the stored capture, nginx's HTTP port (SERVER_PORT) and the HTTP client's
#: port (REMOTE_PORT): record.py prints the first two when it re-records.
FPM_PORT = 52605
HTTP_PORT = 41093
CLIENT_PORT = 43708
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"

#: (name, url.path, url.query, status code, request body, response body, STDERR messages)
EXPECTED: list[tuple[str, str, str | None, int, int, int, list[str]]] = [
    ("GET /index.php", "/index.php", "page=1", 200, 0, 13, []),
    ("GET /index.php", "/index.php", "page=2&sort=name", 200, 0, 23, []),
    ("GET /index.php", "/index.php", "q=green+tea", 200, 0, 18, []),
    ("GET /index.php", "/index.php", None, 200, 0, 7, []),
    ("POST /index.php", "/index.php", None, 200, 69, 9, []),  # the form
    ("POST /index.php", "/index.php", "api=orders", 200, 74, 19, []),  # the JSON body
    ("GET /error.php", "/error.php", None, 500, 0, 4, []),
    ("GET /stderr.php", "/stderr.php", None, 200, 0, 2, ["PHP message: something odd happened"]),
    ("GET /missing.php", "/missing.php", None, 404, 0, 16, ["Primary script unknown"]),  # php-fpm's own 404
]


def _row(s: Span) -> tuple[str, str, str | None, int, int, int, list[str]]:
    a = s.attributes
    return (s.name, a["url.path"], a.get("url.query"), a["http.response.status_code"],
            a["http.request.body.size"], a["http.response.body.size"],
            [str(e.attributes["message"]) for e in s.events or []])


@pytest.fixture(scope="module", params=["c_walk", "python_walk"])
def replayed(request: pytest.FixtureRequest) -> tuple[list[Span], dict, dict]:
    """The replay with _fcgi.c's walk as the build has it, and with it set aside (``_C`` is read
    at each call: the Python reference then takes every segment)."""
    with pytest.MonkeyPatch.context() as m:
        if request.param == "python_walk":
            m.setattr(fcgi, "_C", None)
        return replay(FIXTURE, {"enabled": ["fastcgi"]})


def test_replay_gives_exactly_these_spans(replayed) -> None:
    spans, _, _ = replayed
    assert [_row(s) for s in spans] == EXPECTED
    for s in spans:
        a = s.attributes
        method = s.name.split(" ")[0]
        assert s.kind == SpanKind.SERVER  # the app's side of the HTTP request
        assert a["http.request.method"] == method and a["http.route"] == a["url.path"]
        assert a["network.protocol.name"] == "fastcgi" and a["network.protocol.version"] == "1.1"
        assert a["url.scheme"] == "http"
        assert a["server.address"] == "127.0.0.1" and a["server.port"] == HTTP_PORT
        assert a["client.address"] == "127.0.0.1" and a["client.port"] == CLIENT_PORT
        assert a["user_agent.original"].startswith("python-httpx/")
        assert "fastcgi.app_status" not in a  # every script exited 0
        if a["http.response.status_code"] >= 500:
            assert s.status_code == StatusCode.ERROR and a["error.type"] == "500"
        else:  # 404 is the client's error: a SERVER span stays unset (semantic conventions)
            assert s.status_code == StatusCode.UNSET and "error.type" not in a
        assert 0 < s.end_ns - s.start_ns < 1_000_000_000
    assert [s.status_code for s in spans].count(StatusCode.ERROR) == 1
    traced = spans[2]
    assert traced.trace_id.hex() == TRACE_ID and traced.parent_span_id.hex() == PARENT_ID
    assert all(s.parent_span_id == b"" for s in spans if s is not traced)


def test_nothing_is_dropped(replayed) -> None:
    _, recv, stats = replayed
    assert_clean(recv, stats, "fastcgi", connections=9, packets=90, spans=len(EXPECTED))


def test_every_protocol_enabled_still_detects_fastcgi(replayed) -> None:
    """The default configuration: detection picks FastCGI by content (the port is no FastCGI port)."""
    spans, _, stats = replay(FIXTURE, {})
    assert [_row(s) for s in spans] == [_row(s) for s in replayed[0]]
    assert stats["drops"] == {} and stats["protocols"] == {"fastcgi": 9}


def _connections() -> list[list[tuple[bool, bytes]]]:
    return conversations(FIXTURE)


def _comparable(got: tuple[list, dict]) -> tuple[list, dict]:
    """A span less what differs between two runs (its times, made from the segments' order)."""
    spans, drops = got
    return [(s[0], s[1], s[4], s[5], s[6], s[7]) for s in spans], drops


@pytest.mark.parametrize("how", ["bytes", "random"])
@pytest.mark.parametrize("walk", ["c_walk", "python_walk"])
def test_real_connections_cut_anywhere_give_the_same_spans(how: str, walk: str, monkeypatch) -> None:
    """The recorded bytes re-cut a byte a segment or in random 1-40 byte pieces: records and
    PARAMS split anywhere (every reply's head and its STDOUT a byte at a time) give the spans
    of the recorded segments and no drops."""
    if walk == "python_walk":
        monkeypatch.setattr(fcgi, "_C", None)
    rng = random.Random(7)
    conns = _connections()
    assert len(conns) == 9
    for segs in conns:
        want = _comparable(run_stage(FPM_PORT, segs))
        assert len(want[0]) == 1 and want[1] == {}
        got = _comparable(run_stage(FPM_PORT, cut(segs, how, rng)))
        assert got == want


# -- tshark, the oracle ----------------------------------------------------------------------
def _tshark_requests() -> list[dict[str, Any]]:
    """Per connection, from tshark's FastCGI dissector (PDML): the PARAMS pairs, STDIN and
    STDOUT sizes, the first STDOUT record's content, STDERR texts, END_REQUEST's statuses, and
    the times of the frames with BEGIN_REQUEST and END_REQUEST."""
    tshark = shutil.which("tshark")
    if tshark is None:
        pytest.skip("tshark not installed: the oracle needs it")
    out = subprocess.run([tshark, "-r", FIXTURE, "-d", f"tcp.port=={FPM_PORT},fcgi", "-Y", "fcgi", "-T", "pdml"],
                         capture_output=True, check=True).stdout
    reqs: dict[int, dict[str, Any]] = {}
    for pkt in ET.fromstring(out).iter("packet"):
        f = {e.get("name"): e for e in pkt.iter("field")}
        r = reqs.setdefault(int(f["tcp.stream"].get("show")), {
            "params": {}, "stdin": 0, "stdout": 0, "head": None, "stderr": [], "keep_conn": None})
        t = epoch_ns(f["frame.time_epoch"].get("show"))
        for rec in pkt.iter("proto"):
            if rec.get("name") != "fcgi":
                continue
            fields = {e.get("name"): e for e in rec.iter("field")}
            kind = int(fields["fcgi.type"].get("show"))
            clen = int(fields["fcgi.content.length"].get("show"))
            data = fields.get("fcgi.content.data")
            content = bytes.fromhex(data.get("value")) if data is not None else b""
            if kind == fcgi.BEGIN_REQUEST:
                r["begin_ns"] = t
                r["keep_conn"] = fields["fcgi.begin_request.keep_conn"].get("show") == "1"
            elif kind == fcgi.PARAMS:
                for nv in rec.iter("field"):
                    if nv.get("name") == "fcgi.nv_name":
                        name, _, value = nv.get("showname").partition(" = ")
                        r["params"][name] = value
            elif kind == fcgi.STDIN:
                r["stdin"] += clen
            elif kind == fcgi.STDOUT:
                r["stdout"] += clen
                if r["head"] is None:
                    r["head"] = content
            elif kind == fcgi.STDERR:
                r["stderr"].append(content.decode())
            elif kind == fcgi.END_REQUEST:
                r["end_ns"] = t
                r["app_status"] = int(fields["fcgi.end_request.app_status"].get("show"))
                r["protocol_status"] = int(fields["fcgi.end_request.protocol_status"].get("show"))
    return [reqs[k] for k in sorted(reqs)]


def test_spans_agree_with_tshark(replayed) -> None:
    spans = replayed[0]
    reqs = _tshark_requests()
    assert len(reqs) == len(spans) == 9
    for s, r in zip(spans, reqs, strict=True):
        a, p = s.attributes, r["params"]
        path, _, query = p["REQUEST_URI"].partition("?")
        assert (a["http.request.method"], a["url.path"], a.get("url.query", "")) == (p["REQUEST_METHOD"], path, query)
        assert query == p.get("QUERY_STRING", "")
        assert a["server.port"] == int(p["SERVER_PORT"]) and a["client.port"] == int(p["REMOTE_PORT"])
        assert a["http.request.body.size"] == r["stdin"] == int(p.get("CONTENT_LENGTH") or 0)
        head_len = r["head"].index(b"\r\n\r\n") + 4  # php-fpm's head is always in its first record
        assert a["http.response.body.size"] == r["stdout"] - head_len
        m = re.search(rb"^Status: (\d+)", r["head"][:head_len], re.M)
        assert a["http.response.status_code"] == (int(m.group(1)) if m else 200)
        assert [e.attributes["message"] for e in s.events or []] == r["stderr"]
        assert r["app_status"] == 0 and r["protocol_status"] == 0  # FCGI_REQUEST_COMPLETE
        assert r["keep_conn"] is True  # the support's fastcgi_keep_conn on; one request a connection all the same
        assert (s.start_ns, s.end_ns) == (r["begin_ns"], r["end_ns"])
        assert ("HTTP_TRACEPARENT" in p) == (s.parent_span_id != b"")
