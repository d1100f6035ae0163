"""The C segment walker (processors/protocols/_memcache.c) against memcached.py's ``_walk``.

``walk`` must take exactly the segments ``_walk`` takes, giving the same (op, key offset,
key length, status, opaque) of each packet, and decline (None) all the others, so that
``feed_whole`` does the same with the accelerator or without it. hypothesis builds packet
sequences of many shapes (each direction's magic and the others, lying lengths, over-long
keys, the opcodes the walk refuses, collection-id keys) and damages them (truncation, byte
flips, inserted bytes, random bytes); each is read as bytes, as a memoryview, as a view
ending at an inaccessible page (an over-read is a crash) and as a view of a longer buffer
(an over-read would find a packet the reference does not see).

Then the whole stage: exchanges.py's memcached conversations (binary and text) and
test_memcached's Couchbase conversation, whole, a byte a segment and in random pieces,
mutated, and hypothesis' conversations, give the same spans and drop counters with ``_C``,
with ``_C`` None (the pure-Python path) and with ``feed_whole`` off (the buffered path).

The C module is imported directly, so these run under WIRESPAN_PURE_PYTHON=1 too.
"""

from __future__ import annotations

import os
import random
import struct
from types import ModuleType

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from processors.protocols import memcached as mc
from tests.support.exchanges import EXCHANGES
from tests.support.speedup import Guarded, load_accelerator
from tests.support.whole import cut, run_stage

#: Raise for a long local run: WIRESPAN_FUZZ_EXAMPLES=20000 pytest tests/test_memcached_speedup.py
EXAMPLES = int(os.environ.get("WIRESPAN_FUZZ_EXAMPLES", "400"))


def _load_c() -> ModuleType:
    return load_accelerator("processors.protocols._memcache")


C = _load_c()
HDR = struct.Struct(">BBHBBHIIQ")


# -- buffers an over-read would betray ----------------------------------------------------------
_GUARD = Guarded(4)
_guarded = _GUARD.view


#: What a longer buffer goes on with: a whole request, a whole response, zeros.
_FENCES = (HDR.pack(0x80, 0x0A, 0, 0, 0, 0, 0, 0, 0), HDR.pack(0x81, 0x0A, 0, 0, 0, 0, 0, 0, 0), bytes(64))


def _ref(data: bytes, from_client: bool, collections: bool) -> tuple | None:
    got = mc._walk(memoryview(data), from_client, collections)
    return None if got is None else tuple(got)


def check(data: bytes, from_client: bool, collections: bool = False) -> tuple | None:
    """C == Python on ``data`` as every kind of buffer; returns the reference's answer."""
    want = _ref(data, from_client, collections)
    if want is not None and len(want) > C.MAX_PACKETS:
        want_c = None  # a long pipeline: left to the Python walk
    else:
        want_c = want
    views: list[object] = [data, memoryview(data), bytearray(data)]
    if len(data) <= _GUARD.size:
        views.append(_guarded(data))
    views += [memoryview(data + f)[:len(data)] for f in _FENCES]
    for v in views:
        got = C.walk(v, from_client, collections)
        assert got == want_c, (data.hex(), from_client, collections)
        if got is not None:
            assert all(type(x) is int for p in got for x in p)
    return want


# -- generated packets ---------------------------------------------------------------------------
_MAGICS = st.sampled_from([0x80, 0x81, 0x80, 0x81, 0x08, 0x18, 0x00, 0xFF])
_OPCODES = st.one_of(st.sampled_from(sorted(mc._OPS)), st.sampled_from([0xBB, 0x1F, 0x89, 0x20, 0xFE, 0x00]),
                     st.integers(0, 255))


@st.composite
def packet(draw: st.DrawFn, from_client: bool | None = None) -> bytes:
    """One binary packet, mostly well-formed; sometimes its lengths lie."""
    magic = (0x80 if from_client else 0x81) if from_client is not None and draw(st.booleans()) else draw(_MAGICS)
    op = draw(_OPCODES)
    key = draw(st.one_of(st.binary(max_size=12), st.binary(min_size=250, max_size=270),
                         st.just(b"\x08hotel_1"), st.just(b"user:1")))
    extras = draw(st.sampled_from([b"", b"\0" * 4, b"\0" * 8, b"\0" * 12]))
    value = draw(st.one_of(st.just(b""), st.binary(max_size=40)))
    status = draw(st.sampled_from([0, 1, 2, 0x21, 0x88, 0xFFFF]))
    opaque = draw(st.one_of(st.integers(0, 20), st.just(0xFFFFFFFF)))
    keylen, body = len(key), len(extras) + len(key) + len(value)
    lie = draw(st.integers(0, 9))
    if lie == 1:
        body = draw(st.integers(0, 2**32 - 1))
    elif lie == 2:
        body = draw(st.sampled_from([mc.MAX_BODY, mc.MAX_BODY + 1, max(0, body - 1), body + 1]))
    elif lie == 3:
        keylen = draw(st.integers(0, 0xFFFF))
    return HDR.pack(magic, op, keylen, len(extras), 0, status, body, opaque, 0) + extras + key + value


@st.composite
def damaged(draw: st.DrawFn, data: bytes) -> bytes:
    how = draw(st.integers(0, 6))
    if how == 0 or not data:
        return data
    if how == 6:  # the last packet a few bytes short: its body runs past the segment
        return data[:-draw(st.integers(1, min(3, len(data))))]
    pos = draw(st.integers(0, len(data) - 1))
    if how == 1:
        return data[:pos]
    if how == 2:
        return data[:pos] + bytes([draw(st.integers(0, 255))]) + data[pos + 1:]
    if how == 3:
        return data[:pos] + draw(st.binary(min_size=1, max_size=8)) + data[pos:]
    if how == 4:
        return data + draw(st.binary(min_size=1, max_size=30))
    return draw(st.binary(min_size=1, max_size=30)) + data


def test_the_bench_exchange_is_walked_in_c() -> None:
    (_, req), (_, res) = EXCHANGES["memcached"][0](16).steps
    assert check(req, True) == ((0x01, 32, 6, 0, 1),)
    assert check(res, False) == ((0x01, 24, 0, 0, 1),)


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.booleans(), st.booleans(), st.data())
def test_packet_sequences_match_the_reference(from_client: bool, collections: bool, data: st.DataObject) -> None:
    pkts = data.draw(st.lists(packet(from_client), max_size=8))
    raw = data.draw(damaged(b"".join(pkts)))
    check(raw, from_client, collections)
    check(raw, not from_client, collections)


def _bases() -> list[tuple[bool, bytes]]:
    from tests.test_memcached import _conversation
    (_, req), (_, res) = EXCHANGES["memcached"][0](16).steps
    two = HDR.pack(0x80, 0x00, 1, 0, 0, 0, 1, 3, 0) + b"k" + HDR.pack(0x80, 0x0A, 0, 0, 0, 0, 0, 4, 0)
    return [(True, req), (False, res), (True, two), *_conversation()[:4]]


@pytest.mark.parametrize("i", range(7))
def test_every_truncation_and_header_byte_matches_the_reference(i: int) -> None:
    """Exhaustive where it is cheap: each base segment cut at every length, and each byte of
    its first two headers set to the values the checks turn on (lengths one off included)."""
    from_client, data = _bases()[i]
    for n in range(len(data) + 1):
        check(data[:n], from_client)
        check(data[:n], from_client, True)
    for pos in range(min(len(data), 48)):
        for b in {0x00, 0x01, 0x02, 0x08, 0x0A, 0x18, 0x1F, 0x7F, 0x80, 0x81, 0x89, 0xBB, 0xFF,
                  (data[pos] + 1) & 0xFF, (data[pos] - 1) & 0xFF}:
            changed = data[:pos] + bytes([b]) + data[pos + 1:]
            check(changed, from_client)
            check(changed, from_client, True)
            check(changed, not from_client)


@settings(max_examples=EXAMPLES, deadline=None)
@given(st.binary(max_size=200), st.booleans(), st.booleans())
def test_random_bytes_match_the_reference(data: bytes, from_client: bool, collections: bool) -> None:
    check(data, from_client, collections)
    check(b"\x80" + data, from_client, collections)


@pytest.mark.parametrize("n", [0, 1, 2, 63, 64, 65, 200])
def test_pipelines_up_to_the_cap_are_walked_in_c(n: int) -> None:
    noops = HDR.pack(0x80, 0x0A, 0, 0, 0, 0, 0, 7, 0) * n
    want = check(noops, True)
    assert want is not None and len(want) == n
    assert (C.walk(noops, True, False) is None) == (n > C.MAX_PACKETS)


def test_the_checks_one_by_one() -> None:
    ok = HDR.pack(0x80, 0x00, 1, 0, 0, 0, 1, 9, 0) + b"k"
    assert check(ok, True) == ((0x00, 24, 1, 0, 9),)
    assert check(ok, False) is None  # a request's magic from the server
    assert check(ok, True, collections=True) is None  # its key would be a collection id
    assert check(HDR.pack(0x80, 0x89, 1, 0, 0, 0, 1, 9, 0) + b"b", True, collections=True) is not None
    assert check(HDR.pack(0x81, 0xBB, 0, 12, 0, 0, 12, 1, 0) + bytes(12), False) is None
    assert check(HDR.pack(0x81, 0x1F, 0, 0, 0, 0, 0, 1, 0), False) is None
    assert check(HDR.pack(0x81, 0x1F, 0, 0, 0, 0, 0, 1, 0), True) is None
    assert check(HDR.pack(0x81, 0x00, 0, 4, 0, 1, 6, 3, 0) + bytes(6), False) == ((0x00, 28, 0, 1, 3),)
    assert check(HDR.pack(0x80, 0x00, mc.MAX_KEY + 1, 0, 0, 0, mc.MAX_KEY + 1, 0, 0) + bytes(mc.MAX_KEY + 1),
                 True) is None
    assert check(HDR.pack(0x80, 0x00, mc.MAX_KEY, 0, 0, 0, mc.MAX_KEY, 0, 0) + bytes(mc.MAX_KEY), True) is not None
    assert check(HDR.pack(0x80, 0x01, 3, 8, 0, 0, 10, 0, 0) + bytes(10), True) is None  # extlen + keylen > body
    assert check(HDR.pack(0x80, 0x01, 0, 0, 0, 0, mc.MAX_BODY + 1, 0, 0), True) is None
    assert check(HDR.pack(0x80, 0x01, 0, 0, 0, 0, 2**32 - 1, 0, 0), True) is None
    assert check(ok + ok[:23], True) is None and check(ok + ok + b"\x80", True) is None
    assert check(ok[:-1], True) is None and check(ok + b"\0", True) is None  # a body one byte short/long
    assert check(b"", True) == ()


def test_a_body_of_max_body_bytes_and_one_more() -> None:
    """The MAX_BODY bound itself, with a segment that really holds the body (64 MiB)."""
    big = bytearray(24 + mc.MAX_BODY + 1)
    for body in (mc.MAX_BODY, mc.MAX_BODY + 1):
        big[:24] = HDR.pack(0x80, 0x01, 0, 0, 0, 0, body, 5, 0)
        view = memoryview(big)[:24 + body]
        want = mc._walk(view, True, False)
        assert C.walk(view, True, False) == (None if want is None else tuple(want))
        assert (want is None) == (body > mc.MAX_BODY)


def test_constants_and_arguments() -> None:
    assert (C.MAX_KEY, C.MAX_BODY) == (mc.MAX_KEY, mc.MAX_BODY)
    with pytest.raises(TypeError):
        C.walk(b"")  # type: ignore[call-arg]
    assert C.walk("not a buffer", True, False) is None
    assert C.walk(memoryview(bytes(48))[::2], True, False) is None  # not contiguous: Python decides
    assert C.walk(b"", 1, 0) == ()


# -- the whole stage ------------------------------------------------------------------------------
def _stage(segments: list[tuple[bool, bytes]]) -> tuple[list, dict]:
    return run_stage(11211, segments)


def _three_ways(segments: list[tuple[bool, bytes]]) -> tuple[list, dict, int]:
    """(spans, drops, C walks taken) through the stage, asserted equal with ``_C``, with ``_C``
    None and with ``feed_whole`` off."""
    taken = [0]

    class _Counting:
        MAX_PACKETS = C.MAX_PACKETS

        @staticmethod
        def walk(*a):  # type: ignore[no-untyped-def]
            r = C.walk(*a)
            taken[0] += r is not None
            return r

    with pytest.MonkeyPatch.context() as m:
        m.setattr(mc, "_C", _Counting)
        got = _stage(segments)
        m.setattr(mc, "_C", None)
        pure = _stage(segments)
        m.setattr(mc.Session, "feed_whole", None)
        buffered = _stage(segments)
    assert got == pure
    assert got == buffered
    return got[0], got[1], taken[0]


_cut = cut


def _conversations() -> list[tuple[str, list[tuple[bool, bytes]], int]]:
    from tests.test_memcached import _conversation
    out = [(f"{ex.__name__.strip('_')}-{size}", ex(size).steps, ex(size).spans)
           for ex in EXCHANGES["memcached"] for size in (16, 700, 20_000)]
    return [*out, ("couchbase", _conversation(), 9)]


@pytest.mark.parametrize("how", ["whole", "bytes", "random"])
@pytest.mark.parametrize("name", [c[0] for c in _conversations()])
def test_stage_same_spans_and_drops_with_and_without_c(name: str, how: str) -> None:
    _name, segs, nspans = next(c for c in _conversations() if c[0] == name)
    if how == "bytes" and sum(len(d) for _, d in segs) > 5000:
        segs = [(fc, d[:300]) for fc, d in segs]  # the 20 KB exchange a byte a segment says nothing more
        nspans = -1
    spans, drops, taken = _three_ways(_cut(segs, how, random.Random(name + how)))
    if nspans >= 0:
        assert len(spans) == nspans and not drops, (spans, drops)
    if how == "whole" and name.startswith("memcached-"):
        assert taken == 2  # the request and the response, both walked in C


@settings(max_examples=max(50, EXAMPLES // 4), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(["couchbase", "memcached-700", "memcached_text-700"]),
       st.lists(st.tuples(st.integers(0, 60), st.integers(0, 10_000), st.integers(0, 255), st.booleans()),
                max_size=4), st.integers(0, 2**32))
def test_stage_mutated_conversations_three_ways(name: str, mutations: list, seed: int) -> None:
    """Bytes changed and segments split in the conversations: the same spans and drops (any
    ProtocolError counted alike) with the walker, without it and without feed_whole."""
    from tests.support.whole import mutate
    segs = mutate(next(c for c in _conversations() if c[0] == name)[1], mutations)
    _three_ways(segs)
    _three_ways(_cut(segs, "random", random.Random(seed)))


def _req(op: int, key: bytes, opaque: int, value: bytes = b"") -> bytes:
    extras = b"\0" * 8 if op in (0x01, 0x11) else b""
    return HDR.pack(0x80, op, len(key), len(extras), 0, 0, len(extras) + len(key) + len(value), opaque, 0) \
        + extras + key + value


def _res(op: int, status: int, opaque: int, value: bytes = b"") -> bytes:
    return HDR.pack(0x81, op, 0, 0, 0, status, len(value), opaque, 0) + value


_TURN_OPS = st.sampled_from([0x00, 0x01, 0x04, 0x09, 0x0A, 0x0D, 0x11, 0x1C, 0x89, 0x42])


@settings(max_examples=max(50, EXAMPLES // 4), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.lists(st.tuples(_TURN_OPS, st.binary(max_size=6), st.integers(0, 4), st.sampled_from([0, 1, 2]),
                                   st.booleans(), st.binary(max_size=30)), min_size=1, max_size=6),
                min_size=1, max_size=5),
       st.integers(0, 2**32))
def test_stage_generated_conversations_three_ways(turns: list, seed: int) -> None:
    """hypothesis' turns of requests (quiet ones, repeated opaques, unknown opcodes) and the
    answers of some of them, in order: same spans and drops all three ways, in random pieces too."""
    segs: list[tuple[bool, bytes]] = []
    for turn in turns:
        segs.append((True, b"".join(_req(op, key, opq, val) for op, key, opq, _s, _a, val in turn)))
        answers = b"".join(_res(op, st_, opq, val[:8]) for op, _k, opq, st_, answered, val in turn if answered)
        if answers:
            segs.append((False, answers))
    _three_ways(segs)
    _three_ways(_cut(segs, "random", random.Random(seed)))


def test_a_finished_session_is_freed_without_the_cyclic_gc() -> None:
    """No reference cycle through the session (its queue's on_evict was a bound method once):
    a short connection's state goes when the connection does, not at the next GC pass."""
    import gc
    import weakref

    from processors.protocols.base import Conn
    from service.largebuf import LargeBuffer
    (_, req), (_, res) = EXCHANGES["memcached"][0](16).steps
    conn = Conn(1, "10.0.0.1", 40000, "10.0.0.2", 11211, [].append, settings=mc.Settings(), protocol=mc.NAME,
                bufs=(LargeBuffer(), LargeBuffer()))
    s = mc.Session(conn)
    assert s.feed_whole(True, memoryview(req), 1) and s.feed_whole(False, memoryview(res), 2)
    s.close(3)
    conn.release_stores()
    alive = weakref.ref(s)
    gc.disable()
    try:
        del s, conn
        assert alive() is None
    finally:
        gc.enable()
