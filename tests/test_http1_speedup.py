"""The C head parser (processors/protocols/_http1.c) against the pure-Python reference.

_http1.c must accept exactly the heads http1.py's whole-head regexes accept, and
extract exactly what ``_fields`` extracts (None wherever ``_fields`` raises), so the
session gives the same spans and drop counts with the accelerator on or off.
hypothesis generates heads of many shapes (header-name case, OWS, repeated and
conflicting lengths, obs-text, header-count limits) and damages them (truncation,
byte flips, inserted bytes, random bytes).

The C module is imported directly, so these run under WIRESPAN_PURE_PYTHON=1 too.
``WIRESPAN_HTTP1_SO=/tmp/x.so`` loads another build of it (the ASAN check; PYTHONMALLOC=malloc
so that ASAN sees the bounds of small bytes objects, which pymalloc would otherwise hide):
  LD_PRELOAD=$(gcc -print-file-name=libasan.so) ASAN_OPTIONS=detect_leaks=0 PYTHONMALLOC=malloc \\
  WIRESPAN_HTTP1_SO=/tmp/_http1_asan.so WIRESPAN_FUZZ_EXAMPLES=20000 pytest tests/test_http1_speedup.py
"""

from __future__ import annotations

import os
from types import ModuleType

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from processors.protocols import http1
from processors.protocols.base import Conn
from processors.protocols.errors import ProtocolError
from service.largebuf import LargeBuffer
from tests.support.driver import pieces
from tests.support.speedup import Guarded, damage, load_accelerator

#: Raise for a long local run: WIRESPAN_FUZZ_EXAMPLES=20000 pytest tests/test_http1_speedup.py
EXAMPLES = int(os.environ.get("WIRESPAN_FUZZ_EXAMPLES", "400"))


def _load_c() -> ModuleType:
    return load_accelerator("processors.protocols._http1", "WIRESPAN_HTTP1_SO")


C = _load_c()


# -- the reference: what the pure-Python path decides ---------------------------------------
def ref_request(data: bytes, max_headers: int) -> tuple | None:
    _b, req_head, _r = http1._head_patterns(max_headers)
    m = req_head.match(data)
    if m is None:
        return None
    end = m.end()
    try:
        length, te, chunked, upgrade, host, ua, tp = http1._fields(memoryview(data), m.start(4) - 2, end - 2)
    except ProtocolError:
        return None
    method, target, minor = m.group(1, 2, 3)
    meth, original = http1._method(method)
    path = query = None
    if target[:1] == b"/":  # what _span decodes for an origin-form target
        q = target.find(b"?")
        if q < 0:
            path = target.decode("utf-8", "replace")
        else:
            path, query = target[:q].decode("utf-8", "replace"), target[q + 1:].decode("utf-8", "replace")
    return (end, meth, original, target, "1.1" if minor == b"1" else "1.0", length, te, chunked, upgrade, host, ua,
            tp, path, query)


def ref_response(data: bytes, max_headers: int, limit: int) -> tuple | None:
    _b, _q, resp_head = http1._head_patterns(max_headers)
    m = resp_head.match(data, 0, limit)
    if m is None:
        return None
    end = m.end()
    try:
        length, te, chunked, upgrade, _h, _u, _t = http1._fields(memoryview(data), m.start(3) - 2, end - 2)
    except ProtocolError:
        return None
    return end, int(m.group(2)), "1.1" if m.group(1) == b"1" else "1.0", length, te, chunked, upgrade


def _same(got: tuple | None, want: tuple | None) -> None:
    assert got == want
    if got is not None and want is not None:  # and the same types (True is not 1, str is not bytes)
        assert [type(x) for x in got] == [type(x) for x in want]


_FENCES = (b"\r\n\r\n", b"\n\r\n0\r\n\r\n")

# A buffer that ends at an inaccessible page: any read past a view's end is a SIGSEGV
# (a test crash), even a one-byte over-read that stays inside a Python object's memory.
_GUARD = Guarded(16)
_guarded = _GUARD.view


def _fenced(data: bytes, fence: bytes = _FENCES[0]) -> memoryview:
    """``data`` as a view whose buffer goes on with ``fence``: a read past the view's end
    would complete a head or body the reference rejects (ASAN cannot see that inside one object)."""
    return memoryview(data + fence)[:len(data)]


def check_request(data: bytes, max_headers: int) -> None:
    want = ref_request(data, max_headers)
    _same(C.parse_request(memoryview(data), max_headers), want)
    _same(C.parse_request(data, max_headers), want)
    for fence in _FENCES:
        _same(C.parse_request(_fenced(data, fence), max_headers), want)
    _same(C.parse_request(_guarded(data), max_headers), want)


def check_response(data: bytes, max_headers: int, limit: int) -> None:
    want = ref_response(data, max_headers, limit)
    _same(C.parse_response(memoryview(data), max_headers, limit), want)
    for fence in _FENCES:
        _same(C.parse_response(_fenced(data, fence), max_headers, limit), want)
    _same(C.parse_response(_guarded(data), max_headers, limit), want)


# -- generated heads ---------------------------------------------------------------------------
_INTEREST = ["content-length", "transfer-encoding", "upgrade", "host", "user-agent", "traceparent"]
_OTHER_NAMES = ["Accept", "X-Foo", "Authorization", "Cookie", "Hostname", "Content-Length-X",
                "Upgrade-Insecure-Requests", "Connection", "X-Host", "hos", "Content-Lengt", "te"]
_TCHARS = b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"


@st.composite
def _case(draw: st.DrawFn, name: str) -> bytes:
    mode = draw(st.integers(0, 3))
    if mode == 0:
        return name.encode()
    if mode == 1:
        return name.title().encode()
    if mode == 2:
        return name.upper().encode()
    flips = draw(st.lists(st.booleans(), min_size=len(name), max_size=len(name)))
    return "".join(c.upper() if f else c for c, f in zip(name, flips, strict=True)).encode()


_ows = st.sampled_from([b"", b" ", b"\t", b"  ", b" \t ", b"\t\t"])
_obs = st.binary(min_size=0, max_size=6).map(lambda b: bytes((c | 0x80) for c in b))
_vtext = st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=12).map(str.encode)
_digits = st.one_of(st.integers(0, 10**6), st.integers(0, 10**19)).map(lambda n: str(n).encode())
_zpad = st.tuples(st.sampled_from([b"", b"0", b"00"]), _digits).map(b"".join)


@st.composite
def _cl_value(draw: st.DrawFn) -> bytes:
    n = draw(st.integers(0, 5))
    if n == 0:
        return draw(st.sampled_from([b"", b"x", b"5x", b"-1", b"+5", b"0x10", b"1_0", b"5,", b",5", b"5,,5",
                                     b"\xd9\xa3", b"1" * 18, b"1" * 19, b"9" * 18 + b", " + b"9" * 18]))
    base = draw(_zpad)  # "5, 05, 5" repeats are legal; a different number conflicts
    parts = [draw(st.sampled_from([base, base, base, base.lstrip(b"0") or b"0", b"0" + base, b"5"])) for _ in range(n)]
    seps = [draw(st.sampled_from([b",", b", ", b" ,", b" , ", b",\t"])) for _ in range(n - 1)]
    out = parts[0]
    for s, p in zip(seps, parts[1:], strict=True):
        out += s + p
    return out


def _value_for(name: str) -> st.SearchStrategy[bytes]:
    if name == "content-length":
        return _cl_value()
    if name == "transfer-encoding":
        return st.sampled_from([b"chunked", b"CHUNKED", b"gzip, chunked", b"chunked, gzip", b"gzip", b"",
                                b"gzip,chunked ", b"x, Chunked", b"chunked,", b"chunke", b" ,chunked",
                                b"chunkeds", b"gzip, chunked2", b"xchunked"])
    if name == "upgrade":
        return st.sampled_from([b"h2c", b"H2C", b"websocket", b"WebSocket, h2c", b" h2c ,x", b"", b",h2c",
                                b"TLS/1.2, HTTP/2.0"])
    return st.one_of(_vtext, st.tuples(_vtext, _obs, _vtext).map(b"".join),
                     st.just(b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
                     st.just(b"a b\tc"), st.just(b"shop.internal:8080"))


@st.composite
def _field(draw: st.DrawFn) -> bytes:
    kind = draw(st.integers(0, 29))
    if kind <= 15:
        name = draw(st.sampled_from(_INTEREST))
        value = draw(_value_for(name))
        nb = draw(_case(name))
    elif kind <= 25:
        nb = draw(st.sampled_from(_OTHER_NAMES)).encode()
        value = draw(st.one_of(_vtext, _obs))
    elif kind <= 28:
        nb = draw(st.binary(min_size=1, max_size=8).map(lambda b: bytes(_TCHARS[c % len(_TCHARS)] for c in b)))
        value = draw(_vtext)
    else:  # a rarely-bad line: space before the colon, empty name, a control byte, bare LF
        return draw(st.sampled_from([b"Host : x\r\n", b": x\r\n", b"Host: a\x01b\r\n", b"Host: x\n",
                                     b"Host: a\x7fb\r\n", b"Ho st: x\r\n", b" Host: x\r\n", b"Host:\r\n",
                                     b"Content-Length:\t\r\n", b"Host: a\rb\r\n"]))
    return nb + b":" + draw(_ows) + value + draw(_ows) + b"\r\n"


_methods = st.one_of(
    st.sampled_from([b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"CONNECT", b"OPTIONS", b"TRACE", b"PATCH",
                     b"QUERY", b"get", b"PROPFIND", b"M-SEARCH", b"G" * 32, b"G" * 33, b"", b"GE T", b"G\x80T"]),
    st.binary(min_size=1, max_size=34).map(lambda b: bytes(_TCHARS[c % len(_TCHARS)] for c in b)))
_targets = st.one_of(
    st.sampled_from([b"/", b"/a?q=1", b"/p?", b"?x", b"*", b"http://h:81/x?y", b"h:443", b"/\xc3\xa9\xff?\xfe=1",
                     b"/a b", b"", b"/a\x7f", b"/%20?sig=x&a=b"]),
    st.tuples(st.just(b"/"), st.binary(max_size=30).map(lambda b: bytes((c % 0x5E) + 0x21 for c in b))).map(b"".join),
    st.binary(min_size=1, max_size=12))
_versions = st.sampled_from([b"HTTP/1.1"] * 6 + [b"HTTP/1.0"] * 3 + [b"HTTP/1.2", b"HTTP/2.0", b"http/1.1",
                                                                       b"HTTP/1.1 "])
_reasons = st.one_of(st.sampled_from([b"", b" OK", b" ", b"\tOK", b" Not Found", b" \xff\xfe obs", b"x", b" a\x01",
                                      b"  two  spaces"]), _vtext.map(lambda v: b" " + v))
_statuses = st.one_of(st.integers(100, 599).map(lambda n: b"%d" % n),
                      st.sampled_from([b"099", b"2000", b"20", b"abc", b"1000", b"000"]))


@st.composite
def request_heads(draw: st.DrawFn) -> bytes:
    fields = draw(st.lists(_field(), max_size=12))
    line = draw(_methods) + b" " + draw(_targets) + b" " + draw(_versions) + b"\r\n"
    return line + b"".join(fields) + b"\r\n" + draw(st.sampled_from([b"", b"", b"body", b"GET / HTTP/1.1\r\n\r\n"]))


@st.composite
def response_heads(draw: st.DrawFn) -> bytes:
    fields = draw(st.lists(_field(), max_size=12))
    v = draw(st.sampled_from([b"HTTP/1.1"] * 6 + [b"HTTP/1.0"] * 3 + [b"HTTP/1.2", b"HTTP/2"]))
    line = v + b" " + draw(_statuses) + draw(_reasons) + b"\r\n"
    return line + b"".join(fields) + b"\r\n" + draw(st.sampled_from([b"", b"", b"{\"ok\": 1}", b"\r\n"]))


@st.composite
def damaged(draw: st.DrawFn, heads: st.SearchStrategy[bytes]) -> bytes:
    return damage(draw, draw(heads))


_max_headers = st.one_of(st.just(http1.MAX_HEADERS), st.integers(1, 14))


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=damaged(request_heads()), max_headers=_max_headers)
@example(data=b"GET / HTTP/1.1\r\nContent-Length: 5, 5\r\nContent-Length: 05\r\n\r\n", max_headers=256)
@example(data=b"GET / HTTP/1.1\r\nContent-Length: 5, 6\r\n\r\n", max_headers=256)
@example(data=b"GET / HTTP/1.1\r\nContent-Length: 123456789012345678\r\n\r\n", max_headers=256)
@example(data=b"GET / HTTP/1.1\r\nContent-Length: 1234567890123456789\r\n\r\n", max_headers=256)
@example(data=b"GET / HTTP/1.1\r\nContent-Length: 5, 0000000000000000005\r\n\r\n", max_headers=256)
@example(data=b"GET / HTTP/1.1\r\nA: 1\r\nB: 2\r\n\r\n", max_headers=2)
@example(data=b"GET / HTTP/1.1\r\nA: 1\r\nB: 2\r\n\r\n", max_headers=1)
def test_request_heads_match_the_reference(data: bytes, max_headers: int) -> None:
    check_request(data, max_headers)


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=damaged(response_heads()), max_headers=_max_headers, cut=st.integers(0, 400))
@example(data=b"HTTP/1.1 200\r\n\r\n", max_headers=256, cut=400)
@example(data=b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", max_headers=256, cut=37)
def test_response_heads_match_the_reference(data: bytes, max_headers: int, cut: int) -> None:
    check_response(data, max_headers, cut)
    check_response(data, max_headers, 1 << 20)


@settings(max_examples=EXAMPLES, deadline=None)
@given(data=st.binary(max_size=200), max_headers=_max_headers, limit=st.integers(0, 300))
def test_random_bytes_match_the_reference(data: bytes, max_headers: int, limit: int) -> None:
    check_request(data, max_headers)
    check_response(data, max_headers, limit)
    for prefix in (b"GET / HTTP/1.1\r\n", b"HTTP/1.1 200 OK\r\n"):
        check_request(prefix + data, max_headers)
        check_response(prefix + data, max_headers, limit + 17)


def test_limits_and_the_bounds() -> None:
    many = b"GET / HTTP/1.1\r\n" + b"X: y\r\n" * 300 + b"\r\n"
    assert C.parse_request(many, 300) is not None and C.parse_request(many, 299) is None
    check_request(many, 256)
    resp = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    assert C.parse_response(resp, 256, len(resp) - 2)[0] == len(resp) - 2
    assert C.parse_response(resp, 256, len(resp) - 3) is None  # the head must end by ``limit``
    assert C.parse_response(resp, 256, 0) is None and C.parse_response(resp, 256, -5) is None
    assert C.parse_request(memoryview(b"x" * 10)[::2], 256) is None  # not contiguous: Python decides
    with pytest.raises(TypeError):
        C.parse_request(b"GET / HTTP/1.1\r\n\r\n")


# -- the session with and without the accelerator -----------------------------------------
def _run_session(segments: list[tuple[bool, bytes]], use_c: bool, monkeypatch: pytest.MonkeyPatch) -> tuple:
    """Feed like the protocols stage (feed_whole when the direction's buffer is empty)."""
    with monkeypatch.context() as m:
        m.setattr(http1, "_C_REQUEST", C.parse_request if use_c else None)
        m.setattr(http1, "_C_RESPONSE", C.parse_response if use_c else None)
        m.setattr(http1, "_C_CHUNKED", C.chunked_body if use_c else None)
        spans: list = []
        drops: list[str] = []
        conn = Conn("t", "10.0.0.1", 40000, "10.0.0.2", 8080, spans.append,
                    drop=lambda _p, r: drops.append(r), protocol="http")
        s = http1.Session(conn)
        errors: list[str] = []
        for i, (fc, payload) in enumerate(segments):
            buf = conn.client_buf if fc else conn.server_buf
            try:
                if len(buf) or not s.feed_whole(fc, memoryview(payload), i):
                    buf.append(memoryview(payload), i)
                    s.feed(fc, buf, i)
            except ProtocolError as e:
                errors.append(str(e))
                buf.release(len(buf))
        s.close(10**6)
    return ([(sp.name, int(sp.kind), sp.start_ns, sp.end_ns, int(sp.status_code), sorted(sp.attributes.items()),
              sp.parent_span_id) for sp in spans], drops, errors, conn.extra.get("switch_to", "-"))


_resp_bodies = st.sampled_from([b"", b"ok", b"0123456789"])


@st.composite
def _response(draw: st.DrawFn) -> bytes:
    head = draw(response_heads())
    how = draw(st.integers(0, 2))
    if how == 2:  # a chunked body
        head = head.replace(b"\r\n\r\n", b"\r\nTransfer-Encoding: chunked\r\n\r\n", 1)
        return head + draw(damaged(chunked_bodies()))
    body = draw(_resp_bodies)
    if how == 1:
        head = head.replace(b"\r\n\r\n", b"\r\nContent-Length: %d\r\n\r\n" % len(body), 1)
    return head + body


@st.composite
def _request(draw: st.DrawFn) -> bytes:
    head = draw(damaged(request_heads()))
    how = draw(st.integers(0, 3))
    if how == 2:
        head = head.replace(b"\r\n\r\n", b"\r\nTransfer-Encoding: chunked\r\n\r\n", 1)
        return head + draw(damaged(chunked_bodies()))
    if how == 3:
        body = draw(_resp_bodies)
        return head.replace(b"\r\n\r\n", b"\r\nContent-Length: %d\r\n\r\n" % len(body), 1) + body
    return head


@settings(max_examples=max(50, EXAMPLES // 4), deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(exchanges=st.lists(st.tuples(_request(), _response()), min_size=1, max_size=4),
       cuts=st.lists(st.integers(1, 60), max_size=4))
def test_session_same_spans_and_drops_with_and_without_c(exchanges: list[tuple[bytes, bytes]], cuts: list[int],
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    segs: list[tuple[bool, bytes]] = []
    for q, r in exchanges:
        segs.append((True, q))
        segs += [(False, piece) for piece in pieces(r, cuts)]
    assert _run_session(segs, True, monkeypatch) == _run_session(segs, False, monkeypatch)


def test_session_uses_c_for_the_common_exchange(monkeypatch: pytest.MonkeyPatch) -> None:
    """The small GET goes through C on both sides and gives the span the Python path gives."""
    calls: list[str] = []
    monkeypatch.setattr(http1, "_C_REQUEST", lambda *a: calls.append("q") or C.parse_request(*a))
    monkeypatch.setattr(http1, "_C_RESPONSE", lambda *a: calls.append("r") or C.parse_response(*a))
    monkeypatch.setattr(http1, "_C_CHUNKED", C.chunked_body)
    spans: list = []
    conn = Conn("t", "10.0.0.1", 40000, "10.0.0.2", 8080, spans.append, protocol="http")
    s = http1.Session(conn)
    assert s.feed_whole(True, memoryview(b"GET /a/b?sig=1&x=2 HTTP/1.1\r\nHost: h:81\r\nUser-Agent: u\r\n\r\n"), 1)
    assert s.feed_whole(False, memoryview(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"), 2)
    assert calls == ["q", "r"]
    a = spans[0].attributes
    assert (a["http.request.method"], a["url.path"], a["url.query"], a["server.address"], a["server.port"],
            a["user_agent.original"], a["http.response.body.size"]) == ("GET", "/a/b", "sig=REDACTED&x=2", "h", 81,
                                                                         "u", 2)


# -- whole chunked bodies: _http1.chunked_body against _Body's walker ------------------------
def ref_chunked(data: bytes, start: int, limit: int) -> tuple | None:
    """What the buffered path decides: (end, body size) once the walker completes, else None."""
    buf = LargeBuffer()
    if start < len(data):
        buf.append(memoryview(data)[start:], 0)
    body = http1._Body(http1._CHUNKED, 0, limit)
    try:
        if not body.consume(buf):
            return None
    except ProtocolError:
        return None
    return len(data) - len(buf), body.size


@st.composite
def chunked_bodies(draw: st.DrawFn) -> bytes:
    out = b""
    for _ in range(draw(st.integers(0, 4))):
        data = draw(st.binary(max_size=20).filter(len))
        hx = draw(st.sampled_from(["%x", "%X", "%04x", "%016x"])) % len(data)
        ext = draw(st.sampled_from([b"", b";a=b", b" ;x", b"\t", b"; q=\"v\"", b" "]))
        out += hx.encode() + ext + b"\r\n" + data + b"\r\n"
    out += draw(st.sampled_from([b"0", b"000", b"0 ", b"0;end"])) + b"\r\n"
    for _ in range(draw(st.integers(0, 2))):
        out += draw(st.sampled_from([b"Expires: never", b"X-T: 1", b"weird trailer \x80"])) + b"\r\n"
    return out + b"\r\n" + draw(st.sampled_from([b"", b"", b"HTTP/1.1 200 OK\r\n"]))


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=damaged(chunked_bodies()), prefix=st.sampled_from([b"", b"HTTP/1.1 200 OK\r\n\r\n"]),
       limit=st.sampled_from([http1.MAX_HEADER_BYTES, 2, 20]))
@example(body=b"1" * 17 + b"\r\n", prefix=b"", limit=65536)
@example(body=b"fffffffffffffffff\r\n", prefix=b"", limit=65536)
@example(body=b"ffffffffffffffff\r\nab\r\n", prefix=b"", limit=65536)
@example(body=b"2\r\nab\r\n0\r\nX: 1\r\n\r\n", prefix=b"", limit=8)
@example(body=b"2\r\nab\r\n0\r\nX: 1\r\n\r\n", prefix=b"", limit=9)
@example(body=b"2;a\rb\r\nab\r\n0\r\n\r\n", prefix=b"", limit=99)
@example(body=b"2;a\nb\r\nab\r\n0\r\n\r\n", prefix=b"", limit=99)
@example(body=b"00000000000000002\r\nab\r\n0\r\n\r\n", prefix=b"", limit=99)
@example(body=b"0000000000000002\r\nab\r\n0\r\n\r\n", prefix=b"", limit=99)
@example(body=b"2\r\nab\r", prefix=b"", limit=99)
@example(body=b"2\r\nabX\n0\r\n\r\n", prefix=b"", limit=99)
def test_chunked_bodies_match_the_walker(body: bytes, prefix: bytes, limit: int) -> None:
    data = prefix + body
    want = ref_chunked(data, len(prefix), limit)
    for view in (memoryview(data), _fenced(data), _fenced(data, _FENCES[1]), _guarded(data)):
        _same(C.chunked_body(view, len(prefix), limit), want)


def test_chunked_body_declines_long_lines_and_bad_starts() -> None:
    long_ext = b"2;" + b"e" * 2000 + b"\r\nab\r\n0\r\n\r\n"
    assert ref_chunked(long_ext, 0, 65536) == (len(long_ext), 2)  # Python takes it (4096 allowed) ...
    assert C.chunked_body(long_ext, 0, 65536) is None  # ... C leaves it to Python
    assert C.chunked_body(b"0\r\n\r\n", 6, 99) is None and C.chunked_body(b"0\r\n\r\n", -1, 99) is None
    assert C.chunked_body(b"0\r\n\r\n", 0, 99) == (5, 0)


def test_whole_bodies_take_feed_whole_with_c(monkeypatch: pytest.MonkeyPatch) -> None:
    """A POST with its whole body and a whole chunked response skip the buffers (C on)."""
    monkeypatch.setattr(http1, "_C_REQUEST", C.parse_request)
    monkeypatch.setattr(http1, "_C_RESPONSE", C.parse_response)
    monkeypatch.setattr(http1, "_C_CHUNKED", C.chunked_body)
    spans: list = []
    conn = Conn("t", "10.0.0.1", 40000, "10.0.0.2", 8080, spans.append, protocol="http")
    s = http1.Session(conn)
    assert s.feed_whole(True, memoryview(b"POST /p HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc"), 1)
    assert s.feed_whole(False, memoryview(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                                          b"2;x=1\r\nok\r\n3\r\nabc\r\n0\r\nX-T: 1\r\n\r\n"), 2)
    assert s.feed_whole(True, memoryview(b"PUT /c HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
                                         b"1\r\nz\r\n0\r\n\r\n"), 3)
    assert s.feed_whole(False, memoryview(b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n"), 4)
    assert not s.feed_whole(False, memoryview(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok"), 5)
    a, b = spans[0].attributes, spans[1].attributes
    assert (a["http.request.body.size"], a["http.response.body.size"], spans[0].end_ns) == (3, 5, 2)
    assert (b["http.request.body.size"], b["http.response.body.size"]) == (1, 0)
    assert not len(conn.client_buf) and not len(conn.server_buf)


# -- heads and their bodies in separate segments: feed_whole against the buffered path -------
def _at_head(data: bytes, cuts: list[int], at_head: bool) -> list[bytes]:
    """``data`` in pieces, the first ending where the head does when ``at_head`` (how servers
    write a head and its body: two segments)."""
    e = data.find(b"\r\n\r\n")
    if at_head and 0 <= e < len(data) - 4:
        return [data[:e + 4], *pieces(data[e + 4:], cuts)]
    return pieces(data, cuts)


@settings(max_examples=max(50, EXAMPLES // 4), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(exchanges=st.lists(st.tuples(_request(), _response(), st.booleans(), st.booleans()), min_size=1, max_size=3),
       cuts=st.lists(st.integers(1, 30), max_size=3), use_c=st.booleans(), close_body=st.booleans())
@example(exchanges=[(b"POST / HTTP/1.1\r\nContent-Length: 10\r\n\r\n0123456789",
                     b"HTTP/1.0 200 OK\r\nContent-Length: 10\r\n\r\n0123456789", True, True)],
         cuts=[3], use_c=True, close_body=False)
@example(exchanges=[(b"GET / HTTP/1.1\r\n\r\n", b"HTTP/1.0 200 OK\r\n\r\n0123456789", True, True)],
         cuts=[3], use_c=False, close_body=True)
def test_split_bodies_same_through_feed_whole_and_buffers(exchanges: list[tuple[bytes, bytes, bool, bool]],
                                                          cuts: list[int], use_c: bool, close_body: bool) -> None:
    """feed_whole's head-then-body-pieces steps (both parsers) give the buffered path's spans and
    drops, including pipelined pieces (a body's end and the next message in one segment), which
    it declines, and a close-delimited body cut by the close."""
    from tests.support.whole import run_both_ways

    segs: list[tuple[bool, bytes]] = []
    for q, r, q_at, r_at in exchanges:
        segs += [(True, p) for p in _at_head(q, cuts, q_at)]
        segs += [(False, p) for p in _at_head(r, cuts, r_at)]
    if close_body and len(segs) > 2 and segs[-2][0] == segs[-1][0]:
        segs[-2:] = [(segs[-1][0], segs[-2][1] + segs[-1][1])]  # pipelined: a body's end and what follows
    with pytest.MonkeyPatch.context() as m:
        m.setattr(http1, "_C_REQUEST", C.parse_request if use_c else None)
        m.setattr(http1, "_C_RESPONSE", C.parse_response if use_c else None)
        m.setattr(http1, "_C_CHUNKED", C.chunked_body if use_c else None)
        run_both_ways(http1.Session, 8080, segs)


@pytest.mark.parametrize("use_c", [True, False])
def test_heads_and_body_pieces_take_feed_whole(use_c: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """A POST's head and body, a response's head and body pieces, a close-delimited body: no
    segment buffered; a piece running past its body's end is declined, nothing changed."""
    monkeypatch.setattr(http1, "_C_REQUEST", C.parse_request if use_c else None)
    monkeypatch.setattr(http1, "_C_RESPONSE", C.parse_response if use_c else None)
    monkeypatch.setattr(http1, "_C_CHUNKED", C.chunked_body if use_c else None)
    spans: list = []
    conn = Conn("t", "10.0.0.1", 40000, "10.0.0.2", 8080, spans.append, protocol="http")
    s = http1.Session(conn)
    assert s.feed_whole(True, memoryview(b"POST /p HTTP/1.1\r\nContent-Length: 5\r\n\r\nab"), 1)
    assert not s.feed_whole(True, memoryview(b"cdeGET / HTTP/1.1\r\n\r\n"), 2)  # the body's end and more
    assert s.feed_whole(True, memoryview(b"cde"), 2)
    assert s.feed_whole(False, memoryview(b"HTTP/1.0 200 OK\r\nContent-Length: 4\r\n\r\n"), 3)
    assert s.feed_whole(False, memoryview(b"ok"), 4)
    assert not s.feed_whole(False, memoryview(b"okHTTP/1.1 200 OK\r\n\r\n"), 5)
    assert s.feed_whole(False, memoryview(b"ok"), 5)
    assert s.feed_whole(True, memoryview(b"GET /c HTTP/1.1\r\n\r\n"), 6)
    assert s.feed_whole(False, memoryview(b"HTTP/1.0 200 OK\r\n\r\nsome"), 7)
    assert s.feed_whole(False, memoryview(b"more"), 8)
    s.close(9)
    a, b = spans[0].attributes, spans[1].attributes
    assert (a["http.request.body.size"], a["http.response.body.size"], spans[0].end_ns) == (5, 4, 5)
    assert (b["http.response.body.size"], spans[1].end_ns) == (8, 8)
    assert not len(conn.client_buf) and not len(conn.server_buf)
