"""The C segment walker (processors/protocols/_pgwire.c) against the pure-Python reference.

_pgwire.client/server must frame a segment exactly as feed_whole's Python loop frames it
(False where it declines; in the buffered form, stop where feed's loop would read a message
itself) and read each body exactly as ``Session._client_view`` and feed_whole's server
loop read it, from the same capped bodies (None wherever the Python reader would raise),
so the stage gives the same spans and drop counts with the accelerator on or off.
hypothesis builds message streams of every type either side sends and damages them
(truncation, byte flips, inserted bytes, hostile lengths, random bytes); the whole stage
then runs exchanges.py's conversation, the hand-built extended-protocol one and the
recorded psycopg session whole, a byte a segment and in random segments, both ways.

The C module is imported directly, so the reference tests run under WIRESPAN_PURE_PYTHON=1
too. ``WIRESPAN_PGWIRE_SO=/tmp/x.so`` loads another build (the ASAN check, as
tests/test_http1_speedup.py describes).
"""

from __future__ import annotations

import os
import random
import struct
from types import ModuleType

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from processors.protocols import postgresql as pg
from service.largebuf import LargeBuffer
from tests.support.driver import pieces
from tests.support.exchanges import EXCHANGES
from tests.support.speedup import load_accelerator
from tests.support.whole import cut, run_stage

#: Raise for a long local run: WIRESPAN_FUZZ_EXAMPLES=20000 pytest tests/test_postgresql_speedup.py
EXAMPLES = int(os.environ.get("WIRESPAN_FUZZ_EXAMPLES", "400"))


def _load_c() -> ModuleType:
    return load_accelerator("processors.protocols._pgwire", "WIRESPAN_PGWIRE_SO")


C = _load_c()
LIMITS = (pg.MAX_QUERY_BYTES, pg.MAX_NAME, pg.MAX_ERROR_HEAD)
C.limits(*LIMITS)


# -- the reference: what the Python readers read --------------------------------------------
def _frame(data: bytes, client: bool, partial: bool) -> int | None:
    """Where feed_whole's framing loop (whole) or feed's read-on point (partial) leaves the
    C walker: the end of the whole messages, None where feed_whole declines."""
    heads = pg._CLIENT_HEAD if client else pg._SERVER_HEAD
    n, pos = len(data), 0
    while pos < n:
        if n - pos < 5:
            break
        t = data[pos]
        ln = struct.unpack_from(">i", data, pos + 1)[0]
        if t not in heads or ln < 4 or ln > pg.MAX_MESSAGE_LEN or pos + 1 + ln > n:
            break
        pos += ln + 1
    return pos if partial or pos == n else None


def _decoded(view: memoryview, max_query: int) -> str:
    """sql.decode_query with the walker's cap (the same as decode_query's but in the small-caps test)."""
    return pg.decode_query(view) if max_query == pg.MAX_QUERY_BYTES else str(view[:max_query], "utf-8", "replace")


def ref_client(data: bytes, limits: tuple[int, int, int] = LIMITS, partial: bool = False) -> object:
    """What _pgwire.client must return, from _client_view's reads (its helpers, its caps)."""
    max_query, max_name, _eh = limits
    caps = {ord("Q"): max_query + 1, ord("P"): max_name + max_query + 2, ord("B"): 2 * max_name + 2,
            ord("E"): max_name + 5, ord("D"): max_name + 2, ord("C"): max_name + 2}
    end_all = _frame(data, True, partial)
    if end_all is None:
        return False
    view = memoryview(data)
    cend = pg._cstr_end_view
    out: list[tuple] = []
    pos = 0
    while pos < end_all:
        t = data[pos]
        ln = struct.unpack_from(">i", data, pos + 1)[0]
        off = pos + 5
        end = off + min(ln - 4, caps.get(t, 0))
        pos += ln + 1
        if t == 81:
            z = cend(view, off, end)
            out.append((81, _decoded(view[off:z - 1 if z > 0 else end], max_query)))
        elif t == 80:
            p = cend(view, off, end)
            if p < 0:
                return None  # _client_view raises bad_parse
            z = cend(view, p, end)
            text = _decoded(view[p:z - 1 if z > 0 else end], max_query)
            out.append((80, data[off:off + min(p - 1 - off, max_name)], text))
        elif t == 66:
            p = cend(view, off, end)
            q = cend(view, p, end) if p > 0 else -1
            if q < 0:
                return None  # bad_bind
            out.append((66, data[off:p - 1], data[p:q - 1] if q - 1 > p else b""))
        elif t == 69:
            p = cend(view, off, end)
            out.append((69, data[off:p - 1 if p > 0 else end]))
        elif t == 67:
            p = cend(view, off + 1, end)
            out.append((67, data[off] if end > off else 0, data[off + 1:p - 1] if p > 0 else None))
        elif t in (68, 83, 70):
            out.append((t,))
    return (end_all, tuple(out)) if partial else tuple(out)


def ref_server(data: bytes, limits: tuple[int, int, int] = LIMITS, partial: bool = False) -> object:
    """What _pgwire.server must return: feed_whole's server loop's acts, DataRows in runs."""
    end_all = _frame(data, False, partial)
    if end_all is None:
        return False
    out: list[int] = []
    pos = prev = 0
    while pos < end_all:
        t = data[pos]
        ln = struct.unpack_from(">i", data, pos + 1)[0]
        if t == 68:
            if prev == 68:  # the run goes on (a skipped type between DataRows ends it)
                out[-1] -= 1
            else:
                out.append(-1)
        elif t == 69:
            out += [69, *pg._error_fields_view(memoryview(data), pos + 5, pos + 5 + min(ln - 4, limits[2]))]
        elif t in b"CZ123TnIsV":
            out.append(t)
        prev = t
        pos += ln + 1
    return (end_all, tuple(out)) if partial else tuple(out)


def _both(data: bytes, limits: tuple[int, int, int] = LIMITS) -> None:
    for partial in (False, True):
        args = (data, True) if partial else (data,)
        assert C.client(*args) == ref_client(data, limits, partial), (data, partial)
        assert C.server(*args) == ref_server(data, limits, partial), (data, partial)


# -- message streams ---------------------------------------------------------------------------
def _msg(t: bytes, body: bytes) -> bytes:
    return t + struct.pack(">i", len(body) + 4) + body


_names = st.one_of(st.just(b""), st.binary(max_size=12).map(lambda b: b.replace(b"\0", b"n")))
_text = st.binary(max_size=40)  # NULs in it too: the text stops at the first one


@st.composite
def client_message(draw: st.DrawFn) -> bytes:
    t = draw(st.sampled_from(b"QPBEDCSHXdcfpF"))
    if t == 81:
        body = draw(_text) + draw(st.sampled_from([b"\0", b""]))
    elif t == 80:
        body = draw(_names) + b"\0" + draw(_text) + b"\0" + draw(st.sampled_from([b"\0\0", b"\0\1\0\0\0\x17"]))
    elif t == 66:
        body = draw(_names) + b"\0" + draw(_names) + b"\0" + b"\0\0\0\1" + struct.pack(">i", 3) + b"abc" + b"\0\0"
    elif t == 69:
        body = draw(_names) + b"\0" + b"\0\0\0\0"
    elif t in (68, 67):
        body = draw(st.sampled_from([b"S", b"P", b"x"])) + draw(_names) + b"\0"
    else:
        body = draw(st.binary(max_size=8)) if t in b"dpF" else b""
    if draw(st.integers(0, 9)) == 0:  # a body cut or grown at random: names without NULs, etc.
        body = draw(st.binary(max_size=30))
    return _msg(bytes([t]), body)


@st.composite
def server_message(draw: st.DrawFn) -> bytes:
    t = draw(st.sampled_from(b"ENCZRSKTDI123ntsGHWdcAvV"))
    if t in (69, 78):
        body = b"SERROR\0C" + draw(st.binary(max_size=7)) + b"\0M" + draw(_text) + b"\0\0"
    elif t == 68:
        body = b"\0\1" + struct.pack(">i", 2) + b"ab"
    elif t == 90:
        body = draw(st.sampled_from([b"I", b"T", b"E"]))
    elif t == 67:
        body = draw(_text) + b"\0"
    else:
        body = draw(st.binary(max_size=12))
    return _msg(bytes([t]), body)


def _damage(data: bytes, how: list[tuple[int, int, int]]) -> bytes:
    b = bytearray(data)
    for kind, at, v in how:
        if not b:
            break
        at %= len(b)
        if kind == 0:
            b[at] = v
        elif kind == 1:
            b.insert(at, v)
        elif kind == 2:
            del b[at:]
        else:  # a hostile length where a header may be
            b[at:at + 4] = struct.pack(">i", [-1, 0, 3, 1 << 30, (1 << 31) - 1, v][v % 6])
    return bytes(b)


_damages = st.lists(st.tuples(st.integers(0, 3), st.integers(0, 10_000), st.integers(0, 255)), max_size=3)


@settings(max_examples=EXAMPLES, deadline=None)
@given(st.lists(client_message(), max_size=8), st.lists(server_message(), max_size=8), _damages)
@example([b"P\0\0\0\x05x"], [], [])  # a Parse whose name has no NUL: Python decides
@example([b"B\0\0\0\x06\0x"], [], [])  # a Bind whose statement has no NUL
@example([b"C\0\0\0\x04"], [b"D\0\0\0\x04", b"N\0\0\0\x04", b"D\0\0\0\x04"], [])  # empty Close; split runs
def test_streams_match_the_reference(client: list[bytes], server: list[bytes], damage: list) -> None:
    for data in (b"".join(client), b"".join(server)):
        _both(data)
        _both(_damage(data, damage))


@settings(max_examples=EXAMPLES, deadline=None)
@given(st.binary(max_size=200))
@example(b"Q\x7f\xff\xff\xff")
@example(b"D\0\0\0\x04D\x80\0\0\0")
def test_random_bytes_match_the_reference(data: bytes) -> None:
    _both(data)


@settings(max_examples=max(50, EXAMPLES // 2), deadline=None)
@given(st.lists(client_message(), max_size=6), st.lists(server_message(), max_size=6),
       st.tuples(st.integers(0, 6), st.integers(0, 6), st.integers(0, 8)), _damages)
def test_small_caps_match_the_reference(client: list[bytes], server: list[bytes], limits: tuple[int, int, int],
                                        damage: list) -> None:
    """With tiny caps every read runs into its body's cap (text, names, error heads)."""
    C.limits(*limits)
    try:
        for data in (b"".join(client), b"".join(server)):
            _both(data, limits)
            _both(_damage(data, damage), limits)
    finally:
        C.limits(*LIMITS)


def test_buffers_and_arguments() -> None:
    seg = _msg(b"Q", b"SELECT 1\0") + _msg(b"S", b"")
    assert C.client(memoryview(seg)) == C.client(bytearray(seg)) == ((81, "SELECT 1"), (83,))
    assert C.client(memoryview(seg)[5:]) is False  # a body is no header
    assert C.client(memoryview(seg)[:-1], True) == (14, ((81, "SELECT 1"),))
    err = _msg(b"E", b"SERROR\0C42P01\0Mrelation \xff does not exist\0\0")
    assert C.server(err) == (69, "42P01", "relation \ufffd does not exist")
    assert C.server(_msg(b"E", b"C4\xe9\0\0")) == (69, "4\ufffd", "")  # the code is ASCII, else replaced
    assert C.client(b"") == () and C.server(b"", True) == (0, ())
    assert C.server(_msg(b"D", b"") * 3 + _msg(b"Z", b"I")) == (-3, 90)
    with pytest.raises(TypeError):
        C.client("not bytes")
    with pytest.raises(TypeError):
        C.client()
    with pytest.raises(ValueError):
        C.limits(-1, 0, 0)
    with pytest.raises(BufferError):  # not contiguous: refused, never read out of bounds
        C.client(memoryview(seg * 2)[::2])


def test_op_is_the_python_op() -> None:
    """_pgwire.Op, what the session makes its ops with when the walker is in, reads and writes
    like _Op: the same attributes, the same defaults, nothing else settable."""
    info = pg.analyze("SELECT 1")
    fields = ("kind", "info", "start", "rows", "err_code", "err_msg", "begun")
    c, py = C.Op(81, info, 7), pg._Op(81, info, 7)
    assert [getattr(c, f) for f in fields] == [getattr(py, f) for f in fields] == [81, info, 7, 0, "", "", False]
    for o in (c, py):
        o.rows += 3
        o.err_code, o.err_msg, o.begun = "42P01", "no", True
        with pytest.raises(AttributeError):
            o.other = 1  # type: ignore[union-attr]
    assert [getattr(c, f) for f in fields] == [getattr(py, f) for f in fields]
    assert C.Op(83, None, 1).info is None
    with pytest.raises(TypeError):
        C.Op(81, info)
    with pytest.raises(TypeError):
        C.Op(81, info, 7, kind=1)
    assert pg._new_op is (pg._C.Op if pg._C is not None else pg._Op)


# -- detect and resync's chain ------------------------------------------------------------------
@st.composite
def wellformed(draw: st.DrawFn) -> bytes:
    """Messages _valid_body accepts (mostly): the shapes a chain is made of, either side."""
    k = draw(st.integers(0, 11))
    i16, i32 = (lambda v: struct.pack(">h", v)), (lambda v: struct.pack(">i", v))
    name = draw(_names) + b"\0"
    if k == 0:  # T
        n = draw(st.integers(0, 3))
        return _msg(b"T", i16(n) + b"".join(draw(_names) + b"\0" + b"\0" * 18 for _ in range(n)))
    if k == 1:  # D
        vals = draw(st.lists(st.one_of(st.just(None), st.binary(max_size=6)), max_size=3))
        return _msg(b"D", i16(len(vals)) + b"".join(i32(-1) if v is None else i32(len(v)) + v for v in vals))
    if k == 2:  # B
        pars = draw(st.lists(st.binary(max_size=5), max_size=3))
        return _msg(b"B", name + name + i16(1) + b"\0\0" + i16(len(pars))
                    + b"".join(i32(len(v)) + v for v in pars) + i16(0))
    if k == 3:  # P
        n = draw(st.integers(0, 2))
        return _msg(b"P", name + draw(_text).replace(b"\0", b" ") + b"\0" + i16(n) + b"\0\0\0\x17" * n)
    if k == 4:
        return _msg(b"R", i32(draw(st.sampled_from([0, 1, 2, 3, 5, 7, 10, 12, 13]))) + draw(st.binary(max_size=4)))
    if k == 5:
        return _msg(b"S", name + name)
    if k == 6:
        return _msg(b"K", b"\0" * draw(st.sampled_from([4, 8, 12, 260, 261])))
    if k == 7:
        n = draw(st.integers(0, 2))
        return _msg(b"t", i16(n) + b"\0\0\0\x17" * n)
    if k == 8:
        n = draw(st.integers(0, 2))
        return _msg(draw(st.sampled_from([b"G", b"H", b"W"])), bytes([draw(st.integers(0, 2))]) + i16(n) + b"\0\0" * n)
    if k == 9:
        return _msg(b"A", b"\0\0\0\1" + name + name)
    if k == 10:
        return _msg(b"Q", draw(_text).replace(b"\0", b" ") + b"\0")
    return _msg(b"E", b"SERROR\0C42601\0M" + draw(_text).replace(b"\0", b" ") + b"\0\0")


def _py_boundary(data: bytes, client: bool, limit: int, cuts: list[int]) -> tuple[int, int]:
    buf = LargeBuffer(*pieces(data, cuts)) if data else LargeBuffer()
    undecided = -1
    for off in range(min(limit, len(data))):
        r, _ = pg._chain(buf, off, client)
        if r == 1:
            return off, undecided
        if r == -1 and undecided < 0:
            undecided = off
    return -1, undecided


@settings(max_examples=EXAMPLES, deadline=None)
@given(st.lists(st.one_of(wellformed(), client_message(), server_message()), max_size=6), st.binary(max_size=6),
       _damages, st.lists(st.integers(1, 20), max_size=4), st.integers(0, 300))
@example([b"T\0\0\0\x05"], b"", [], [], 300)  # a body under 2 bytes: Python reads past it, False anyway
@example([b"D\0\0\0\x04", b"\0\0"], b"", [], [], 300)
def test_chain_and_boundary_match_the_reference(msgs: list[bytes], garbage: bytes, damage: list, cuts: list[int],
                                                limit: int) -> None:
    """_pgwire.chain_at == _chain at every offset and _pgwire.boundary == _find_boundary's scan,
    over chains of messages joined mid-stream (a garbage prefix), damaged, any chunking."""
    data = _damage(garbage + b"".join(msgs), damage)
    buf = LargeBuffer(*pieces(data, cuts)) if data else LargeBuffer()
    for client in (True, False):
        for off in range(len(data) + 2):
            assert C.chain_at(data, off, client) == pg._chain(buf, off, client), (data, off, client)
        assert C.boundary(data, client, limit) == _py_boundary(data, client, limit, cuts), (data, client)


# -- the stage with and without the accelerator ----------------------------------------------
def _stage(segments: list[tuple[bool, bytes]]) -> tuple[list, dict]:
    return run_stage(5432, segments)


def _both_ways(segments: list[tuple[bool, bytes]], expect_c: bool = False) -> tuple[list, dict]:
    """(spans, drops) through the stage, asserted equal with ``_C`` and without it (and, when
    ``expect_c``, the walker called at all: a conversation never detected never calls it)."""
    calls = [0]

    def counted(f):  # type: ignore[no-untyped-def]
        def call(*a):  # type: ignore[no-untyped-def]
            calls[0] += 1
            return f(*a)
        return call

    class _Counting:
        client = staticmethod(counted(C.client))
        server = staticmethod(counted(C.server))
        boundary = staticmethod(counted(C.boundary))

    with pytest.MonkeyPatch.context() as m:
        m.setattr(pg, "_C", _Counting)
        got = _stage(segments)
        m.setattr(pg, "_C", None)
        want = _stage(segments)
    assert got == want
    assert calls[0] or not expect_c
    return got


_cut = cut


def _recorded() -> list[tuple[bool, bytes]]:
    from tests.support.dbdrive import pcap_script
    return pcap_script(os.path.join(os.path.dirname(__file__), "fixtures", "postgresql", "psycopg_session.pcap"))[0]


def _conversations() -> list[tuple[str, list[tuple[bool, bytes]], int]]:
    from tests.test_postgresql import _extended_conversation
    out = [(f"exchange{i}-{size}", ex(size).steps, ex(size).spans)
           for i, ex in enumerate(EXCHANGES["postgresql"]) for size in (16, 700, 20_000)]
    return [*out, ("extended", _extended_conversation(), 9), ("recorded", _recorded(), 13)]


@pytest.mark.parametrize("how", ["whole", "bytes", "random"])
@pytest.mark.parametrize("name", [c[0] for c in _conversations()])
def test_stage_same_spans_and_drops_with_and_without_c(name: str, how: str) -> None:
    _name, segs, nspans = next(c for c in _conversations() if c[0] == name)
    if how == "bytes" and sum(len(d) for _, d in segs) > 5000:
        segs = segs[:6]  # the 20 KB exchange a byte a segment is slow and says nothing more
        nspans = -1
    spans, drops = _both_ways(_cut(segs, how, random.Random(name + how)), True)
    if nspans >= 0:
        assert len(spans) == nspans and not drops, (spans, drops)


@settings(max_examples=max(50, EXAMPLES // 4), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(["extended", "recorded", "exchange0-700"]),
       st.lists(st.tuples(st.integers(0, 60), st.integers(0, 10_000), st.integers(0, 255), st.booleans()),
                max_size=4), st.integers(0, 2**32))
def test_stage_mutated_conversations_both_ways(name: str, mutations: list, seed: int) -> None:
    """Bytes changed and segments split in the conversations: the same spans and drops (any
    ProtocolError counted alike) with the walker and without it, in random segments too."""
    from tests.support.whole import mutate
    segs = mutate(next(c for c in _conversations() if c[0] == name)[1], mutations)
    _both_ways(segs)
    _both_ways(_cut(segs, "random", random.Random(seed)))


@settings(max_examples=max(50, EXAMPLES // 4), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.lists(client_message(), min_size=1, max_size=5),
                          st.lists(server_message(), min_size=1, max_size=6)), min_size=1, max_size=5),
       st.integers(0, 2**32))
def test_stage_generated_streams_both_ways(turns: list, seed: int) -> None:
    """hypothesis' messages after a startup, as turns of the two sides: same spans and drops."""
    from tests.test_postgresql import AUTH_OK, READY, startup
    segs: list[tuple[bool, bytes]] = [(True, startup()), (False, AUTH_OK + READY)]
    for client, server in turns:
        segs += [(True, b"".join(client)), (False, b"".join(server))]
    _both_ways(segs)
    _both_ways(_cut(segs, "random", random.Random(seed)))


def test_the_common_segments_go_through_c() -> None:
    """The recorded session: every segment after the handshake is walked in C (feed_whole),
    the server's first one too (feed, after the resync) - nothing falls back to Python."""
    seen: list[tuple[str, object]] = []

    class _Spy:
        @staticmethod
        def client(*a):  # type: ignore[no-untyped-def]
            r = C.client(*a)
            seen.append(("c", r))
            return r

        @staticmethod
        def server(*a):  # type: ignore[no-untyped-def]
            r = C.server(*a)
            seen.append(("s", r))
            return r

        @staticmethod
        def boundary(*a):  # type: ignore[no-untyped-def]
            r = C.boundary(*a)
            seen.append(("b", r))
            return r

    feeds: list[bool] = []
    feed = pg.Session.feed

    def counted_feed(self, from_client, buf, ts):  # type: ignore[no-untyped-def]
        feeds.append(from_client)
        return feed(self, from_client, buf, ts)

    with pytest.MonkeyPatch.context() as m:
        m.setattr(pg, "_C", _Spy)
        m.setattr(pg.Session, "feed", counted_feed)
        spans, drops = _stage(_recorded())
    assert len(spans) == 13 and not drops
    assert all(r is not None for _, r in seen), seen
    assert ("b", (0, -1)) in seen, seen  # the server's first segment: a boundary at its start
    assert sum(1 for _, r in seen if r is not False) >= 30, seen
    # Only the SSLRequest, the segment the connection was detected on, is buffered: the N, the
    # startup packet and the server's first segment go through feed_whole's handshake path.
    assert feeds == [True], feeds
