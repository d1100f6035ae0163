"""The C record walk (processors/protocols/_fcgi.c) against the pure-Python reference.

_fcgi.c's ``pairs`` must give exactly ``_walk_pairs``' pairs (None wherever it raises), and
``walk`` plus ``Session._walked`` must do to a session exactly what ``feed_whole``'s Python
loop does, so spans and drop counts are the same with the accelerator on or off. hypothesis
generates record streams of many shapes (one request or several, PARAMS in one record or
split, 4-byte lengths, heads with and without ``Status:``, END with any status) and damages
them (truncation, byte flips, random bytes). The whole stage is held to the same over
tests/support/exchanges.py's FastCGI conversation, whole, a byte a segment and in random
segments.

The C module is imported directly, so the C == Python tests run under WIRESPAN_PURE_PYTHON=1
too (the session and stage tests then compare the Python path with itself).
"""

from __future__ import annotations

import os
import random
import struct
from types import ModuleType

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from processors.protocols import fastcgi as f
from processors.protocols.base import Conn
from processors.protocols.errors import Malformed, ProtocolError
from tests.support.exchanges import EXCHANGES
from tests.support.speedup import load_accelerator
from tests.support.whole import run_stage

#: Raise for a long local run: WIRESPAN_FUZZ_EXAMPLES=20000 pytest tests/test_fastcgi_speedup.py
EXAMPLES = int(os.environ.get("WIRESPAN_FUZZ_EXAMPLES", "300"))


def _load_c() -> ModuleType:
    return load_accelerator("processors.protocols._fcgi")


C = _load_c()
FAST = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))


# -- building records ------------------------------------------------------------------------
def rec(t: int, rid: int, content: bytes = b"", pad: int = 0, version: int = 1) -> bytes:
    return struct.pack(">BBHHBB", version, t, rid, len(content), pad, 0) + content + b"\0" * pad


def _len(x: int, four: bool) -> bytes:
    return struct.pack(">I", x | 0x80000000) if four or x > 127 else bytes([x])


def nv(name: bytes, value: bytes, four_n: bool = False, four_v: bool = False) -> bytes:
    return _len(len(name), four_n) + _len(len(value), four_v) + name + value


NAMES = [*sorted(f._WANTED), b"HTTP_COOKIE", b"CONTENT_LENGTH", b"X", b"", b"HTTP_X_FIELD_1", b"REQUEST_URX"]
pair = st.tuples(st.sampled_from(NAMES) | st.binary(max_size=20),
                 st.binary(max_size=40) | st.sampled_from([b"", b"GET", b"HTTP/1.1", b"x" * 3000]),
                 st.booleans(), st.booleans())
stream = st.lists(pair, max_size=12).map(lambda ps: b"".join(nv(*p) for p in ps))


def damage(data: bytes, cuts: list[tuple[int, int]]) -> bytes:
    b = bytearray(data)
    for pos, byte in cuts:
        if not b:
            break
        if byte < 0:
            del b[pos % len(b):]
        else:
            b[pos % len(b)] = byte
    return bytes(b)


damages = st.lists(st.tuples(st.integers(0, 1 << 16), st.integers(-1, 255)), max_size=3)


def ref_pairs(data: bytes) -> dict | None:
    try:
        return f._walk_pairs(memoryview(data))
    except Malformed:
        return None


def test_names_and_bounds_match_python() -> None:
    assert set(C.WANTED) == f._WANTED and len(C.WANTED) == len(f._WANTED)
    assert C.MAX_VALUE == 2048
    assert (C.MAX_STDERR_EVENTS, C.MAX_STDERR_BYTES) == (f.MAX_STDERR_EVENTS, f.MAX_STDERR_BYTES)
    big = nv(b"REQUEST_URI", b"u" * 5000)
    assert C.pairs(big) == ref_pairs(big) == {b"REQUEST_URI": b"u" * 2048}


@FAST
@given(stream, damages)
def test_pairs_equal_python(data: bytes, cuts: list[tuple[int, int]]) -> None:
    for d in (data, damage(data, cuts)):
        assert C.pairs(d) == ref_pairs(d)
        assert C.pairs(memoryview(d)) == ref_pairs(d)


@FAST
@given(st.binary(max_size=64))
def test_pairs_of_garbage(data: bytes) -> None:
    assert C.pairs(data) == ref_pairs(data)


def test_hostile_lengths() -> None:
    for d in (b"\xff\xff\xff\xff\x01", b"\x0e\xff\xff\xff\xffREQUEST_METHOD", b"\x80\x00\x00", b"\x05",
              nv(b"HTTPS", b"on")[:-1], b"\x7f\x7f", b"\x80\x00\x00\x05\x80\x00\x00\x02HTTPSon"):
        assert C.pairs(d) == ref_pairs(d)
    # a PARAMS record whose 4-byte length points past the record, inside one segment
    seg = rec(f.BEGIN_REQUEST, 1, b"\0\1" + b"\0" * 6) + rec(f.PARAMS, 1, b"\x85\x00\x00\x00ab") + rec(f.PARAMS, 1)
    assert C.walk(seg) is None
    assert C.walk(rec(f.STDOUT, 1, b"x")[:-1]) is False
    assert C.walk(rec(f.STDOUT, 1, b"x", version=2)) is False
    assert C.walk(rec(12, 1, b"x")) is False


# -- sessions: the C walk and the Python loop do the same -------------------------------------
#: STDERR contents: empty (no event), over MAX_STDERR_BYTES, not UTF-8 (and cut inside a character).
STDERRS = st.sampled_from([b"warn", b"", b"PHP Warning: x" * 100, b"\xff\xfe bad", "\u00e9".encode() * 600,
                           b"w" * 1024, b"w" * 1025]) | st.binary(max_size=20)
HEADS = [b"Status: 404 Not Found\r\nContent-Type: text/html\r\n\r\nbody", b"Content-Type: x\r\n\r\n",
         b"status:500\n\nx", b"Status: abc\r\n\r\n", b"STATUS:  201\t \r\n\r\n", b"Status: +5\r\n\r\n",
         b"Status: 0\r\n\r\n", b"Status:\r\nStatus: 302 Found\r\n\r\n", b"no head here", b"X: 1\n\nStatus: 1\r\n\r\n",
         b"Status: 2_00\r\n\r\n", b"Status: 1234567890\r\n\r\n"]


@st.composite
def records(draw: st.DrawFn) -> list[tuple[bool, bytes]]:
    """A few requests' records (from the side that sends each type), in order or shuffled."""
    out: list[tuple[bool, bytes]] = []
    for _ in range(draw(st.integers(1, 3))):
        rid = draw(st.sampled_from([1, 1, 2, 0, 300]))
        pad = draw(st.integers(0, 7))
        recs = [(True, rec(f.BEGIN_REQUEST, rid, struct.pack(">HB5x", 1, 0), pad))]
        s = draw(stream)
        split = draw(st.integers(0, 3))
        parts = [s] if not split or not s else [s[i:i + split * 7] for i in range(0, len(s), split * 7)]
        recs += [(True, rec(f.PARAMS, rid, p, draw(st.integers(0, 7)))) for p in parts if p]
        recs.append((True, rec(f.PARAMS, rid)))
        for _ in range(draw(st.integers(0, 2))):
            recs.append((True, rec(draw(st.sampled_from([f.STDIN, f.DATA])), rid, b"i" * draw(st.integers(0, 50)))))
        recs.append((True, rec(f.STDIN, rid)))
        out_parts = [draw(st.sampled_from(HEADS))] + [b"o" * draw(st.integers(0, 30))
                                                       for _ in range(draw(st.integers(0, 2)))]
        outs = [(False, rec(f.STDOUT, rid, p)) for p in out_parts]
        for _ in range(draw(st.sampled_from([0, 0, 1, 2, 9]))):  # before, between or after STDOUT
            outs.insert(draw(st.integers(0, len(outs))), (False, rec(f.STDERR, rid, draw(STDERRS))))
        recs += outs
        if draw(st.integers(0, 9)) == 0:
            recs.append((True, rec(f.ABORT_REQUEST, rid)))
        recs.append((False, rec(f.STDOUT, rid)))
        endc = struct.pack(">iB3x", draw(st.sampled_from([0, 1, -1, 255])), draw(st.sampled_from([0, 0, 1, 3, 9])))
        recs.append((False, rec(f.END_REQUEST, rid, endc[:draw(st.sampled_from([8, 8, 5, 4, 0]))])))
        out += recs
    if draw(st.integers(0, 4)) == 0:
        out = draw(st.permutations(out))
    return out


def segments(recs: list[tuple[bool, bytes]], rnd: random.Random) -> list[tuple[bool, bytes]]:
    """Consecutive records of one side joined into segments of random length."""
    segs: list[tuple[bool, bytes]] = []
    for fc, data in recs:
        if segs and segs[-1][0] == fc and rnd.random() < 0.7:
            segs[-1] = (fc, segs[-1][1] + data)
        else:
            segs.append((fc, data))
    return segs


def _span_key(s: object) -> tuple:
    return (s.name, int(s.kind), s.start_ns, s.end_ns, int(s.status_code), s.status_message,  # type: ignore[attr-defined]
            sorted(s.attributes.items(), key=str), s.parent_span_id,  # type: ignore[attr-defined]
            [(e.name, e.attributes) for e in s.events or ()])  # type: ignore[attr-defined]


def drive(segs: list[tuple[bool, bytes]], stderr_events: bool = True) -> tuple:
    """The segments as the stage gives them: ``feed_whole`` while the side's buffer is empty,
    else buffered for ``feed``; a ProtocolError is recorded and answered with a gap."""
    spans: list = []
    drops: list[str] = []
    conn = Conn(1, "127.0.0.1", 50000, "127.0.0.1", 9000, spans.append, lambda _p, r: drops.append(r),
                settings=f.Settings(stderr_events=stderr_events), protocol=f.NAME)
    s = f.Session(conn)
    took: list = []
    ts = 0
    for fc, data in segs:
        ts += 100
        buf = conn.client_buf if fc else conn.server_buf
        try:
            if not len(buf) and s.feed_whole(fc, memoryview(data) if ts % 200 else data, ts):
                took.append(True)
                continue
            took.append(False)
            buf.append(data, ts)
            s.feed(fc, buf, ts)
        except ProtocolError as e:
            took.append((type(e).__name__, str(e)))
            buf.reset()
            s.gap(fc, ts)
    state = sorted((rid, r.stdin, r.stdout, r.head_done, r.head_len, r.params_done, r.aborted)
                   for rid, r in s.reqs.items())
    done = sorted(s.done.items())
    s.close(ts + 100)
    return [_span_key(x) for x in spans], drops, took, state, done


def both(segs: list[tuple[bool, bytes]], monkeypatch: pytest.MonkeyPatch, stderr_events: bool = True) -> tuple:
    with monkeypatch.context() as m:
        m.setattr(f, "_C", C)
        got = drive(segs, stderr_events)
    with monkeypatch.context() as m:
        m.setattr(f, "_C", None)
        want = drive(segs, stderr_events)
    assert got == want
    return got


@FAST
@given(records(), st.integers(0, 1 << 30), st.booleans())
def test_sessions_equal(recs: list[tuple[bool, bytes]], seed: int, stderr_events: bool) -> None:
    with pytest.MonkeyPatch.context() as mp:
        both(segments(recs, random.Random(seed)), mp, stderr_events)


@FAST
@given(records(), st.integers(0, 1 << 30), damages)
def test_sessions_equal_damaged(recs: list[tuple[bool, bytes]], seed: int, cuts: list[tuple[int, int]]) -> None:
    rnd = random.Random(seed)
    segs = segments(recs, rnd)
    i = rnd.randrange(len(segs))
    segs[i] = (segs[i][0], damage(segs[i][1], cuts) or b"\0")
    with pytest.MonkeyPatch.context() as mp:
        both(segs, mp)


@FAST
@given(st.lists(st.tuples(st.booleans(), st.binary(min_size=1, max_size=64)), min_size=1, max_size=6))
def test_sessions_equal_garbage(segs: list[tuple[bool, bytes]]) -> None:
    with pytest.MonkeyPatch.context() as mp:
        both(segs, mp)


@FAST
@given(st.binary(max_size=300))
def test_walk_false_only_where_python_declines(data: bytes) -> None:
    r = C.walk(data)
    if r is False:
        conn = Conn(1, "a", 1, "b", 9000, lambda s: None, lambda p, r: None, settings=f.Settings(), protocol=f.NAME)
        with pytest.MonkeyPatch.context() as m:
            m.setattr(f, "_C", None)
            assert f.Session(conn).feed_whole(True, memoryview(data), 1) is False


def test_common_shapes_are_taken() -> None:
    """The bench's conversation is the shape the C walk takes: one call a segment."""
    ex = EXCHANGES["fastcgi"][0](200)
    (_, req), (_, resp) = ex.steps
    r = C.walk(req)
    assert r is not None and r is not False and r[:2] == (1, 1) and r[2][b"REQUEST_METHOD"] == b"POST"
    assert C.walk(resp) == (1, 0, None, 0, 0, 243, 43, 200, 1, 0, 0, None)


def test_stderr_reply_is_taken(monkeypatch: pytest.MonkeyPatch) -> None:
    """php-fpm's warning before the STDOUT it goes with (the real capture's shape, a ninth of
    its replies) is one C walk, its events the Python loop's: bounded in number and bytes."""
    req = rec(f.BEGIN_REQUEST, 1, b"\0\1" + b"\0" * 6) + rec(f.PARAMS, 1, nv(b"REQUEST_METHOD", b"GET")) + \
        rec(f.PARAMS, 1) + rec(f.STDIN, 1)
    errs = [b"PHP Warning: 1", b"", b"e" * 2000] + [b"x%d" % i for i in range(9)]
    resp = b"".join(rec(f.STDERR, 1, e, 3) for e in errs) + rec(f.STDOUT, 1, b"Status: 500\r\n\r\nx") + \
        rec(f.STDERR, 1, b"late") + rec(f.END_REQUEST, 1, b"\0" * 8)
    r = C.walk(resp)
    kept = (b"PHP Warning: 1", b"e" * 1024, *(b"x%d" % i for i in range(6)))
    assert r == (1, 0, None, 0, 0, 16, 15, 500, 1, 0, 0, kept)
    spans = both([(True, req), (False, resp)], monkeypatch)[0]
    assert [e[1]["message"] for e in spans[0][-1]][:2] == ["PHP Warning: 1", "e" * 1024]
    assert len(spans[0][-1]) == f.MAX_STDERR_EVENTS
    assert both([(True, req), (False, resp)], monkeypatch, False)[0][0][-1] == []


# -- the whole stage, with and without the accelerator -----------------------------------------
def _stage_both(segs: list[tuple[bool, bytes]], monkeypatch: pytest.MonkeyPatch) -> tuple:
    with monkeypatch.context() as m:
        m.setattr(f, "_C", C)
        got = run_stage(9000, segs)
    with monkeypatch.context() as m:
        m.setattr(f, "_C", None)
        want = run_stage(9000, segs)
    assert got == want
    return got


@pytest.mark.parametrize("size", [200, 3000, 70000])
def test_stage_exchange_whole_bytewise_random(size: int, monkeypatch: pytest.MonkeyPatch) -> None:
    ex = EXCHANGES["fastcgi"][0](size)
    spans, drops = _stage_both(ex.steps, monkeypatch)
    assert len(spans) == ex.spans
    if size <= 3000:
        bytewise = [(fc, data[i:i + 1]) for fc, data in ex.steps for i in range(len(data))]
        got = _stage_both(bytewise, monkeypatch)  # times differ from the whole run's: a segment a byte
        assert len(got[0]) == ex.spans and got[1] == drops
    rnd = random.Random(size)
    for _ in range(5):
        segs = []
        for fc, data in ex.steps:
            i = 0
            while i < len(data):
                n = rnd.choice((1, 7, 8, 100, 1448, 5000))
                segs.append((fc, data[i:i + n]))
                i += n
        got = _stage_both(segs, monkeypatch)
        assert len(got[0]) == ex.spans and got[1] == drops
