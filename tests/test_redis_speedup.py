"""The C whole-value reader (processors/protocols/_resp.c) against the pure-Python reference.

_resp.c's ``values`` must take exactly the values redis._whole_values takes, stop where it
stops, and give the same tuples (type, kept args, count, null, error text), so the session
gives the same spans and drop counts with the accelerator on or off. hypothesis generates
commands and replies of every shape the two read (RESP2 and RESP3 flat aggregates, bulk and
line types) and some they decline (nesting, attributes, inline commands), then damages them
(truncation, byte flips, inserted and deleted bytes, hostile declared lengths) and adds
random bytes. Each is read from bytes, from a view, from a view of a longer buffer whose
next bytes would complete a value, and from a view ending at a PROT_NONE page.

The whole stage is held too: the redis conversations of tests/support/exchanges.py (whole,
a byte a segment, in random pieces, mutated) and generated ones give the same spans and
drops with ``_C``, with ``_C`` None, with ``feed_whole`` off and with no whole-value reading
at all (the resumable scanner alone).

The C module is imported directly, so these run under WIRESPAN_PURE_PYTHON=1 too.
"""

from __future__ import annotations

import os
import random
from types import ModuleType

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from processors.protocols import redis as r
from tests.support.exchanges import EXCHANGES
from tests.support.speedup import Guarded, damage, load_accelerator
from tests.support.whole import cut, run_stage

#: Raise for a long local run: WIRESPAN_FUZZ_EXAMPLES=20000 pytest tests/test_redis_speedup.py
EXAMPLES = int(os.environ.get("WIRESPAN_FUZZ_EXAMPLES", "400"))


def _load_c() -> ModuleType:
    return load_accelerator("processors.protocols._resp")


C = _load_c()


# -- the reference: what the pure-Python path decides ---------------------------------------
def ref(data: bytes, start: int, keep: int) -> tuple[int, list]:
    saved = r._C
    r._C = None
    try:
        out: list = []
        return r._whole_values(memoryview(data), start, keep, out), out
    finally:
        r._C = saved


def _c(data: object, start: int, keep: int) -> tuple[int, list]:
    out: list = []
    return C.values(data, start, keep, out), out


def _same(got: tuple[int, list], want: tuple[int, list]) -> None:
    assert got == want
    for g, w in zip(got[1], want[1], strict=True):  # and the same types (True is not 1, str is not bytes)
        assert [type(x) for x in g] == [type(x) for x in w]
        assert all(type(a) is bytes for a in g[1])


# A buffer that ends at an inaccessible page: any read past a view's end is a SIGSEGV
# (a test crash), even a one-byte over-read that stays inside a Python object's memory.
_GUARD = Guarded(32)
_guarded = _GUARD.view


#: What a buffer might go on with: a read past the view's end would complete a line, a
#: count, a bulk's CRLF, or a whole next value the reference never saw.
_FENCES = (b"\r\n", b"\n", b"0\r\n", b"\r\n:1\r\n$1\r\nx\r\n", b"x" * 64 + b"\r\n")


def check(data: bytes, start: int = 0, keep: int = 8) -> tuple[int, list]:
    start = min(start, len(data))
    want = ref(data, start, keep)
    _same(_c(data, start, keep), want)
    _same(_c(memoryview(data), start, keep), want)
    for fence in _FENCES:
        _same(_c(memoryview(data + fence)[:len(data)], start, keep), want)
    if len(data) <= _GUARD.size:
        _same(_c(_guarded(data), start, keep), want)
    return want


# -- generated values --------------------------------------------------------------------
_text = st.one_of(st.sampled_from([b"", b"OK", b"QUEUED", b"ERR unknown command 'FOO'", b"WRONGTYPE x", b"1",
                                   b"-1", b"3.14", b"inf", b"t", b"f", b"12345678901234567890123", b"\xc3\xa9\xff"]),
                  st.binary(max_size=40).filter(lambda b: b"\r" not in b and b"\n" not in b))
_body = st.one_of(st.sampled_from([b"", b"x", b"GET", b"message", b"subscribe", b"0", b"txt:hello", b"\r\n",
                                   b"ERR bulky", b"\xff\xfe" * 140]), st.binary(max_size=300))
_LINE_T = st.sampled_from(b"+-:_,#(")
_BULK_T = st.sampled_from(b"$!=")


@st.composite
def _count(draw: st.DrawFn, n: int) -> bytes:
    """A declared length or count: mostly right, sometimes off, signed, padded, too long."""
    how = draw(st.integers(0, 12))
    if how <= 7:
        return b"%d" % n
    return draw(st.sampled_from([b"%d" % (n + 1), b"%d" % max(n - 1, 0), b"-1", b"-0", b"0%d" % n, b"+%d" % n,
                                 b"%d " % n, b"", b"-", b"999999999", b"1000000000", b"536870912", b"536870913",
                                 b"-999999999", b"00000000%d" % n, b"12a", b"%d" % (n * 7)]))


@st.composite
def line_value(draw: st.DrawFn) -> bytes:
    return bytes([draw(_LINE_T)]) + draw(_text) + b"\r\n"


@st.composite
def bulk_value(draw: st.DrawFn) -> bytes:
    t = bytes([draw(_BULK_T)])
    if draw(st.integers(0, 6)) == 0:
        return t + draw(st.sampled_from([b"-1", b"-5", b"-0"])) + b"\r\n"
    body = draw(_body)
    return t + draw(_count(len(body))) + b"\r\n" + body + b"\r\n"


_flat = st.one_of(bulk_value(), line_value())
_odd = st.sampled_from([b"*1\r\n:1\r\n", b"*0\r\n", b"|1\r\n+a\r\n:1\r\n", b"%1\r\n+k\r\n$1\r\nv\r\n", b"\r\n",
                        b">2\r\n+a\r\n+b\r\n", b"PING\r\n", b"?x\r\n", b"*-1\r\n",
                        # empty and null aggregates inside one (HELLO's "modules" *0), taken whole
                        b"%0\r\n", b"~-1\r\n", b">0\r\n", b"%-1\r\n", b"*-0\r\n", b"|0\r\n"])


@st.composite
def aggregate(draw: st.DrawFn) -> bytes:
    t = draw(st.sampled_from(b"**%~>"))
    elems = draw(st.lists(st.one_of(_flat, _flat, _flat, _odd), max_size=10))
    n = len(elems) // 2 if t == 0x25 else len(elems)
    if t == 0x25 and len(elems) % 2:
        elems = elems[:-1]
    return bytes([t]) + draw(_count(n)) + b"\r\n" + b"".join(elems)


_ARG = st.one_of(st.sampled_from([b"GET", b"SET", b"MGET", b"SELECT", b"CLIENT", b"AUTH", b"SUBSCRIBE", b"MULTI",
                                  b"EXEC", b"k", b"REPLY", b"OFF", b"2", b"", b"x" * 200]),
                 st.binary(max_size=200))


def _cmd(*args: bytes) -> bytes:
    return b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in args)


command = st.lists(_ARG, min_size=1, max_size=14).map(lambda a: _cmd(*a))
value = st.one_of(command, aggregate(), bulk_value(), line_value(), _odd)


@st.composite
def damaged(draw: st.DrawFn, values: st.SearchStrategy[bytes]) -> bytes:
    return damage(draw, b"".join(draw(st.lists(values, min_size=1, max_size=5))), _framing)


def _framing(draw: st.DrawFn, data: bytes, i: int) -> bytes:
    """A line end or a type byte where none belongs."""
    return data[:i] + draw(st.sampled_from([b"\r", b"\n", b"\r\n", b"*", b"$", b"-"])) + data[i:]


_keep = st.sampled_from([0, 1, 3, 8, 16])


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=damaged(value), start=st.integers(0, 40), keep=_keep)
@example(data=b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n", start=0, keep=8)
@example(data=b"%1\r\n+k\r\n:1\r\n~2\r\n#t\r\n,1.5\r\n>3\r\n$7\r\nmessage\r\n$1\r\nc\r\n$1\r\nm\r\n", start=0, keep=3)
@example(data=b"!9\r\nERR bulky\r\n=8\r\ntxt:abcd\r\n_\r\n(123\r\n", start=0, keep=3)
@example(data=b"*1\r\n$536870912\r\n", start=0, keep=8)
@example(data=b"*1\r\n$536870913\r\n", start=0, keep=8)
@example(data=b"$999999999\r\nab\r\n", start=0, keep=8)
@example(data=b"*999999999\r\n:1\r\n", start=0, keep=8)
@example(data=b"%999999999\r\n:1\r\n", start=0, keep=8)
@example(data=b"$1000000000\r\nab\r\n", start=0, keep=8)
@example(data=b"*3\r\n$-1\r\n$-7\r\n$0\r\n\r\n", start=0, keep=1)
@example(data=b"$3\r\nabcXY:1\r\n", start=0, keep=8)
def test_values_match_the_reference(data: bytes, start: int, keep: int) -> None:
    check(data, start, keep)


@settings(max_examples=EXAMPLES, deadline=None)
@given(data=st.binary(max_size=200), start=st.integers(0, 10), keep=_keep,
       prefix=st.sampled_from([b"", b"+OK\r\n", b"*2\r\n", b"*1\r\n$", b"$5\r\n", b":1\r\n*3\r\n$1\r\na\r\n"]))
def test_random_bytes_match_the_reference(data: bytes, start: int, keep: int, prefix: bytes) -> None:
    check(prefix + data, start, keep)


@pytest.mark.parametrize("base", [_cmd(b"SET", b"big", b"v" * 100), b"+OK\r\n", b"*3\r\n$-1\r\n+s\r\n:7\r\n",
                                  b"-ERR no such key\r\n", b"!9\r\nERR bulky\r\n", b"%1\r\n+k\r\n$1\r\nv\r\n",
                                  _cmd(b"MGET", *[b"key:%06d" % i for i in range(6)])])
def test_every_truncation_and_byte_matches_the_reference(base: bytes) -> None:
    for i in range(len(base) + 1):
        check(base[:i])
        check(base[:i] + base)
    for i in range(len(base)):
        for byte in (0x00, 0x0A, 0x0D, 0x2A, 0x24, 0x2D, 0x30, 0x39, 0x7C, 0xFF):
            check(base[:i] + bytes([byte]) + base[i + 1:])


HELLO_REPLY = (b"%7\r\n$6\r\nserver\r\n$5\r\nredis\r\n$7\r\nversion\r\n$6\r\n7.0.15\r\n$5\r\nproto\r\n:3\r\n"
               b"$2\r\nid\r\n:4\r\n$4\r\nmode\r\n$10\r\nstandalone\r\n$4\r\nrole\r\n$6\r\nmaster\r\n$7\r\nmodules\r\n*0\r\n")


def test_an_empty_aggregate_inside_one_is_taken_whole() -> None:
    """HELLO 3's reply (once a connection from redis-py, ~20 elements) ends in an empty array:
    taken whole, by both walks alike, rather than left to the scanner element by element (it
    was a sixth of a real session's parse). One with elements inside stays the scanner's."""
    end, vals = check(HELLO_REPLY, 0, 3)
    assert end == len(HELLO_REPLY) and vals == [(0x25, [b"server", b"redis", b"version"], 14, False, None)]
    for inner in (b"*-1\r\n", b"%0\r\n", b"~0\r\n", b">-1\r\n"):
        assert check(b"*2\r\n:1\r\n" + inner, 0, 3)[0] == 8 + len(inner)
    for inner in (b"*1\r\n:1\r\n", b"|0\r\n:1\r\n", b"*x\r\n"):
        assert check(b"*2\r\n:1\r\n" + inner, 0, 3)[0] == 0


def test_the_limits() -> None:
    """The line, bulk and argument limits are redis.py's: taken and declined at the same byte."""
    for n in (r.MAX_LINE - 1, r.MAX_LINE, r.MAX_LINE + 1):
        for t in b"+-:":
            check(bytes([t]) + b"a" * n + b"\r\n")
        check(b"*1\r\n+" + b"a" * n + b"\r\n")
    big = b"$%d\r\n" % r.MAX_BULK
    assert check(big + b"x" * 10)[0] == 0  # under the limit, and not all here: not taken
    assert _c(b"*1\r\n$%d\r\n" % (r.MAX_BULK + 1), 0, 8)[0] == 0
    end, vals = check(_cmd(b"a" * 300, b"b" * 128, b"c" * 129), 0, 3)
    assert end > 0 and [len(a) for a in vals[0][1]] == [r.MAX_ARG_BYTES] * 3
    end, vals = check(b"-" + b"E" * 700 + b"\r\n!300\r\n" + b"F" * 300 + b"\r\n")
    assert [len(v[4]) for v in vals] == [512, 256]


def test_the_arguments() -> None:
    assert _c(memoryview(b"+OK\r\n+OK\r\n")[::2], 0, 3) == (0, [])  # not contiguous: the scanner reads it
    assert _c(b"+OK\r\n", 5, 3) == (5, [])
    out = [("before",)]
    assert C.values(b"+OK\r\n:1\r\n", 5, 3, out) == 9 and out == [("before",), (0x3A, [], 0, False, None)]
    with pytest.raises(ValueError):
        C.values(b"+OK\r\n", 6, 3, [])
    with pytest.raises(ValueError):
        C.values(b"+OK\r\n", -1, 3, [])
    with pytest.raises(ValueError):
        C.values(b"+OK\r\n", 0, 17, [])
    with pytest.raises(TypeError):
        C.values(b"+OK\r\n", 0, 3, ())
    with pytest.raises(TypeError):
        C.values(b"+OK\r\n", 0, 3)
    with pytest.raises(TypeError):
        C.values("+OK\r\n", 0, 3, [])


# -- the whole stage with and without the accelerator -------------------------------------
def _stage(segments: list[tuple[bool, bytes]]) -> tuple[list, dict]:
    return run_stage(6379, segments)


def _four_ways(segments: list[tuple[bool, bytes]]) -> tuple[list, dict, int]:
    """(spans, drops, values C took) through the stage, asserted equal with ``_C``, with ``_C``
    None, with ``feed_whole`` off, and with no whole-value reading (the scanner alone)."""
    taken = [0]

    class _Counting:
        @staticmethod
        def values(data: object, start: int, keep: int, out: list) -> int:
            before = len(out)
            end = C.values(data, start, keep, out)
            taken[0] += len(out) - before
            return end  # type: ignore[no-any-return]

    with pytest.MonkeyPatch.context() as m:
        m.setattr(r, "_C", _Counting)
        got = _stage(segments)
        m.setattr(r, "_C", None)
        pure = _stage(segments)
        m.setattr(r.Session, "feed_whole", None)
        buffered = _stage(segments)
        m.setattr(r, "_whole_values", lambda c, p, keep, out: p)
        scanner = _stage(segments)
    assert got == pure
    assert got == buffered
    assert got == scanner
    return got[0], got[1], taken[0]


_cut = cut


def _conversations() -> list[tuple[str, list[tuple[bool, bytes]], int]]:
    return [(f"{ex.__name__.strip('_')}-{size}", ex(size).steps, ex(size).spans)
            for ex in EXCHANGES["redis"] for size in (16, 200, 700, 20_000)]


@pytest.mark.parametrize("how", ["whole", "bytes", "random"])
@pytest.mark.parametrize("name", [c[0] for c in _conversations()])
def test_stage_same_spans_and_drops_with_and_without_c(name: str, how: str) -> None:
    _name, segs, nspans = next(c for c in _conversations() if c[0] == name)
    if how == "bytes" and sum(len(d) for _, d in segs) > 5000:
        segs = [(fc, d[:300]) for fc, d in segs]  # the 20 KB exchange a byte a segment says nothing more
        nspans = -1
    spans, drops, taken = _four_ways(_cut(segs, how, random.Random(name + how)))
    if nspans >= 0:
        assert len(spans) == nspans and not drops, (spans, drops)
    if how == "whole" and name in ("redis-200", "redis-700"):
        assert taken == 4  # both commands and both replies read in C (the bench's conversation)


@settings(max_examples=max(50, EXAMPLES // 4), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(["redis-200", "redis_pipeline-700"]),
       st.lists(st.tuples(st.integers(0, 60), st.integers(0, 10_000), st.integers(0, 255), st.booleans()),
                max_size=4), st.integers(0, 2**32))
def test_stage_mutated_conversations_four_ways(name: str, mutations: list, seed: int) -> None:
    """Bytes changed and segments split in the conversations: the same spans and drops (any
    ProtocolError counted alike) all four ways."""
    from tests.support.whole import mutate
    segs = mutate(next(c for c in _conversations() if c[0] == name)[1], mutations)
    _four_ways(segs)
    _four_ways(_cut(segs, "random", random.Random(seed)))


_reply = st.one_of(line_value(), bulk_value(), aggregate(), st.sampled_from(
    [b"+OK\r\n", b"+QUEUED\r\n", b"*-1\r\n", b"*3\r\n$9\r\nsubscribe\r\n$2\r\nch\r\n:1\r\n",
     b">3\r\n$7\r\nmessage\r\n$2\r\nch\r\n$1\r\nm\r\n", b"*3\r\n$11\r\nunsubscribe\r\n$2\r\nch\r\n:0\r\n",
     b"*2\r\n*1\r\n:1\r\n$1\r\nb\r\n", b"|1\r\n+ttl\r\n:3\r\n+OK\r\n",
     # HELLO 3's reply as redis-server 7 sends it: a map whose last value is an empty array
     b"%7\r\n$6\r\nserver\r\n$5\r\nredis\r\n$7\r\nversion\r\n$6\r\n7.0.15\r\n$5\r\nproto\r\n:3\r\n$2\r\nid"
     b"\r\n:4\r\n$4\r\nmode\r\n$10\r\nstandalone\r\n$4\r\nrole\r\n$6\r\nmaster\r\n$7\r\nmodules\r\n*0\r\n",
     b"*3\r\n:1\r\n*-1\r\n%0\r\n"]))
_named = st.sampled_from([_cmd(b"SET", b"k", b"v"), _cmd(b"GET", b"k"), _cmd(b"MULTI"), _cmd(b"EXEC"),
                          _cmd(b"SELECT", b"2"), _cmd(b"SUBSCRIBE", b"ch"), _cmd(b"UNSUBSCRIBE", b"ch"),
                          _cmd(b"CLIENT", b"REPLY", b"SKIP"), _cmd(b"AUTH", b"pw"), b"PING\r\n",
                          _cmd(b"CLIENT", b"SETNAME", b"x")])


@settings(max_examples=max(50, EXAMPLES // 4), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.lists(st.one_of(_named, command), min_size=1, max_size=3),
                          st.lists(_reply, min_size=0, max_size=3)), min_size=1, max_size=5),
       st.integers(0, 2**32))
def test_stage_generated_conversations_four_ways(turns: list, seed: int) -> None:
    """hypothesis' commands (pub/sub, transactions, CLIENT REPLY) and replies of every type
    (RESP3, nested, attributes, damaged lengths): the same spans and drops all four ways, in
    random pieces too."""
    segs: list[tuple[bool, bytes]] = [(True, _cmd(b"SET", b"k", b"v")), (False, b"+OK\r\n")]  # detected as Redis
    for reqs, reps in turns:
        segs.append((True, b"".join(reqs)))
        if reps:
            segs.append((False, b"".join(reps)))
    _four_ways(segs)
    _four_ways(_cut(segs, "random", random.Random(seed)))
