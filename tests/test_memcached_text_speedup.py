"""The text protocol's segment walker in C (_memcache.c ``text_walk``) against memcached.py's
``_text_walk``, and the text ``feed_whole`` against the buffered path.

``text_walk`` must take exactly the segments ``_text_walk`` takes, with the same items (a
command's (name, key, get family, noreply), a reply's code or error text, of the same types)
and the same data bytes left to skip, and decline (None) the others; it may also decline the
few the reference reads that it leaves alone (a meta block length of 13 digits or more, a skip
past a C long). hypothesis builds command and reply lines of every shape the readers turn on
(storage commands with their blocks, retrievals, VALUE/END, meta commands, noreply, errors,
numbers, odd case and whitespace, non-UTF-8 keys, over-long and lying lengths) and damages
them; each is read as bytes, a memoryview, a bytearray, a view ending at an inaccessible page
(an over-read is a crash) and a view of a longer buffer (an over-read would find a CRLF or a
block the reference does not see).

Then the whole stage: the real pymemcache session (tests/fixtures/memcached), exchanges.py's
text conversation and generated ones, whole, a byte a segment, in random pieces, and mutated,
give the same spans and drops with the C walker, with it None (the pure-Python walk) and with
``feed_whole`` off (the buffered path), and the real session is walked in C segment by segment.

The C module is imported directly, so these run under WIRESPAN_PURE_PYTHON=1 too (or the .so
WIRESPAN_MEMCACHE_SO names: a mutant or sanitizer build).
"""

from __future__ import annotations

import os
import random
import re
from types import ModuleType

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from processors.protocols import memcached as mc
from tests.support.exchanges import EXCHANGES
from tests.support.speedup import Guarded, damage, load_accelerator
from tests.support.whole import cut, mutate, run_stage

#: Raise for a long local run: WIRESPAN_FUZZ_EXAMPLES=20000 pytest tests/test_memcached_text_speedup.py
EXAMPLES = int(os.environ.get("WIRESPAN_FUZZ_EXAMPLES", "400"))


def _load_c() -> ModuleType:
    return load_accelerator("processors.protocols._memcache", "WIRESPAN_MEMCACHE_SO")


C = _load_c()
_GUARD = Guarded(4)
_guarded = _GUARD.view
#: What a longer buffer goes on with: a CRLF completing a cut line, a line, a block's end.
_FENCES = (b"\r\n", b"\n", b"END\r\n", b"x" * 40 + b"\r\n", b"\r\nSTORED\r\n")
#: A run of digits long enough to pass the C walker's meta length bound (2**40).
_LONG_NUMBER = re.compile(rb"\d{13,}")


def ref(data: bytes, from_client: bool, skip: int = 0) -> tuple[list, int] | None:
    return mc._text_walk(memoryview(data), from_client, skip)


def check(data: bytes, from_client: bool, skip: int = 0) -> tuple[list, int] | None:
    """C == Python on ``data`` as every kind of buffer; returns the reference's answer."""
    want = ref(data, from_client, skip)
    may_decline = bool(_LONG_NUMBER.search(data)) or skip >= 2**63
    views: list[object] = [data, memoryview(data), bytearray(data)]
    if len(data) <= _GUARD.size:
        views.append(_guarded(data))
    views += [memoryview(data + f)[:len(data)] for f in _FENCES]
    for v in views:
        got = C.text_walk(v, from_client, skip)
        if got is None and may_decline:
            continue
        assert got == want, (data, from_client, skip)
        if got is not None:
            assert type(got) is tuple and type(got[0]) is list and type(got[1]) is int
            for g, w in zip(got[0], want[0], strict=True):  # and the same types (True is not 1)
                assert type(g) is type(w)
                if type(g) is tuple:
                    assert [type(x) for x in g] == [type(x) for x in w]
    return want


# -- generated lines ------------------------------------------------------------------------------
_KEYS = st.one_of(st.sampled_from([b"k", b"session:42", b"user:42:name", "caf\u00e9".encode(), b"\xff\xfe",
                                   b"K" * 250]), st.binary(min_size=1, max_size=8).filter(lambda b: not any(
                                       c in b" \t\r\n\x0b\x0c" for c in b)))
_SP = st.sampled_from([b" ", b" ", b" ", b"  ", b"\t", b" \x0b"])
_NUM = st.one_of(st.integers(0, 40).map(lambda i: b"%d" % i), st.sampled_from(
    [b"0", b"007", b"-1", b"1x", b"", b"%d" % mc.MAX_BODY, b"%d" % (mc.MAX_BODY - 2), b"%d" % (mc.MAX_BODY - 1),
     b"99999999999999999999", b"1099511627776", b"1099511627775", b"\xd9\xa3"]))


def _join(draw: st.DrawFn, words: list[bytes]) -> bytes:
    out = words[0]
    for w in words[1:]:
        out += draw(_SP) + w
    return out


@st.composite
def command(draw: st.DrawFn) -> bytes:
    """One command line and, for the storage and ms commands, a block (of its declared
    length, mostly)."""
    word = draw(st.sampled_from([*sorted(mc._TEXT_CMDS), b"SET", b"Get", b"bogus", b"", b"mG", b"gat"]))
    key = draw(_KEYS)
    n = draw(st.integers(0, 12))
    block = b"v" * n
    size = b"%d" % n if draw(st.integers(0, 5)) else draw(_NUM)
    tail = draw(st.sampled_from([[], [], [b"noreply"], [b"q"], [b"T1", b"q"], [b"x", b"noreply"]]))
    if word in mc._TEXT_STORAGE or word == b"SET":
        words = [word, key, draw(_NUM), draw(_NUM), size] + ([draw(_NUM)] if word == b"cas" else []) + tail
        line = _join(draw, words) + b"\r\n" + block + b"\r\n"
    elif word == b"ms":
        line = _join(draw, [word, key, size, *tail]) + b"\r\n" + block + b"\r\n"
    elif word in (b"gat", b"gats"):
        line = _join(draw, [word, draw(_NUM), key, *draw(st.lists(_KEYS, max_size=2))]) + b"\r\n"
    elif word == b"":
        line = draw(st.sampled_from([b"", b" ", b"\t "])) + b"\r\n"
    else:
        line = _join(draw, [word, *draw(st.lists(st.one_of(_KEYS, _NUM), max_size=3)), *tail]) + b"\r\n"
    if draw(st.integers(0, 30)) == 0:  # a line past MAX_TEXT_LINE (the readers see its start) or MAX_LINE
        line = line[:-2] + b" " + b"a" * draw(st.sampled_from([600, mc.MAX_LINE - 10, mc.MAX_LINE + 10])) + b"\r\n"
    return line


@st.composite
def reply(draw: st.DrawFn) -> bytes:
    """One reply line (a VALUE or VA line with its block)."""
    how = draw(st.integers(0, 9))
    n = draw(st.integers(0, 12))
    size = b"%d" % n if draw(st.integers(0, 5)) else draw(_NUM)
    if how == 0:
        return _join(draw, [b"VALUE", draw(_KEYS), draw(_NUM), size, *draw(st.lists(_NUM, max_size=1))]) \
            + b"\r\n" + b"v" * n + b"\r\n"
    if how == 1:
        return _join(draw, [b"VA", size, *draw(st.lists(st.sampled_from([b"f1", b"k"]), max_size=2))]) \
            + b"\r\n" + b"v" * n + b"\r\n"
    if how == 2:
        err = draw(st.sampled_from([b"ERROR", b"CLIENT_ERROR", b"SERVER_ERROR"]))
        text = draw(st.one_of(st.just(b""), st.binary(max_size=20).map(lambda b: b.replace(b"\r\n", b"")),
                              st.just("\u00e9".encode() * 300)))
        return err + (b" " + text if text else b"") + b"\r\n"
    if how == 3:
        return draw(_NUM) + b"\r\n"
    if how == 4:
        return b"STAT " + draw(_KEYS) + b" 1\r\n"
    if how == 5:
        return draw(st.sampled_from([b"VERSION 1.6.18", b"VALUE", b"VA", b"VALUE\tk 0 1", b"stored", b"", b"END ",
                                     b"OK", b"HD", b"HD f", b"MN", b"RESET", b"EN", b"NF", b"NS", b"EX"])) + b"\r\n"
    return draw(st.sampled_from(sorted(mc._REPLY_CODES))) + b"\r\n"


def _harm_length(draw: st.DrawFn, data: bytes, i: int) -> bytes:
    """A declared length made hostile: the first number after ``i`` replaced."""
    m = re.compile(rb"\d+").search(data, i)
    if m is None:
        return data
    return data[:m.start()] + draw(_NUM) + data[m.end():]


def _harm_crlf(draw: st.DrawFn, data: bytes, i: int) -> bytes:
    """A CRLF after ``i`` broken (a lone CR or LF), or one added."""
    j = data.find(b"\r\n", i)
    if j < 0:
        return data[:i] + b"\r\n" + data[i:]
    return data[:j] + draw(st.sampled_from([b"\r", b"\n", b"\r\r\n", b"\n\r"])) + data[j + 2:]


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data(), st.integers(0, 20))
def test_commands_match_the_reference(data: st.DataObject, skip: int) -> None:
    raw = data.draw(st.lists(command(), max_size=6).map(b"".join))
    raw = damage(data.draw, raw, _harm_length, _harm_crlf)
    check(raw, True, skip)
    check(raw, False, skip)


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data(), st.integers(0, 20))
def test_replies_match_the_reference(data: st.DataObject, skip: int) -> None:
    raw = data.draw(st.lists(reply(), max_size=6).map(b"".join))
    raw = damage(data.draw, raw, _harm_length, _harm_crlf)
    check(raw, False, skip)
    check(raw, True, skip)


@settings(max_examples=EXAMPLES, deadline=None)
@given(st.binary(max_size=200), st.booleans(), st.integers(0, 300))
def test_random_bytes_match_the_reference(data: bytes, from_client: bool, skip: int) -> None:
    check(data, from_client, skip)
    check(data + b"\r\n", from_client, skip)
    check(b"get " + data + b"\r\n", from_client)
    check(b"VALUE " + data + b"\r\n", from_client)


def _fixture_segments() -> list[tuple[bool, bytes]]:
    from tests.test_memcached_fixture import _segments
    return _segments()


def test_the_real_session_every_cut_and_byte() -> None:
    """Exhaustive where it is cheap: each of the real session's segments cut at every length,
    and each of its bytes set to the values the readers turn on."""
    for fc, data in _fixture_segments():
        assert check(data, fc) is not None
        for n in range(len(data) + 1):
            check(data[:n], fc)
            check(data[n:], fc, 0)
        for skip in (1, 5, len(data) - 1, len(data), len(data) + 1, 2**62, 2**63, 2**70):
            check(data, fc, skip)
        for pos in range(len(data)):
            for b in {0x20, 0x09, 0x0D, 0x0A, 0x0B, 0x00, 0x30, 0x39, 0x41, 0x61, 0x6D, 0x71, 0x80, 0xFF,
                      (data[pos] + 1) & 0xFF, (data[pos] - 1) & 0xFF, data[pos] ^ 0x20}:
                check(data[:pos] + bytes([b]) + data[pos + 1:], fc)


def test_the_readers_one_by_one() -> None:
    assert check(b"", True) == ([], 0) and check(b"", False) == ([], 0)
    assert check(b"set k 0 0 1\r\nv\r\n", True) == ([("set", "k", False, False)], 0)
    assert check(b"SET k 0 0 1 noreply\r\nv\r\n", True) == ([("SET", "k", False, True)], 0)
    assert check(b"set k 0 0 5\r\nab", True) == ([("set", "k", False, False)], 5)  # the block (and CRLF) goes on
    assert check(b"set k 0 0 x\r\nab", True) is None
    assert check(b"set k 0 0\r\n", True) is None
    assert check(b"set k 0 0 %d\r\n" % (mc.MAX_BODY - 2), True) is not None
    assert check(b"set k 0 0 %d\r\n" % (mc.MAX_BODY - 1), True) is None
    assert check(b"gat 10 k1 k2\r\ngets a\r\nmg k v q\r\n", True) == (
        [("gat", "k1", True, False), ("gets", "a", True, False), ("mg", "k", True, True)], 0)
    assert check(b"\r\n \r\nversion\r\nstats items\r\n", True) == (
        [("version", "", False, False), ("stats", "", False, False)], 0)
    assert check(b"get caf\xc3\xa9 \xff\r\n", True) == ([("get", "caf\u00e9", True, False)], 0)
    assert check(b"bogus\r\n", True) is None and check(b"get k", True) is None
    assert check(b"ms k 2 T0\r\nab\r\nms k x\r\n", True) == ([("ms", "k", False, False), ("ms", "k", False, False)], 0)
    assert check(b"ms k 99999999999999999999\r\n", True) == ([("ms", "k", False, False)], 10**20 + 1)
    assert check(b"VALUE k 0 2\r\nab\r\nVALUE j 0 1 7\r\nc\r\nEND\r\n", False) == ([-1, -1, 0], 0)
    assert check(b"STAT pid 1\r\nEND\r\nHD\r\nNOT_FOUND\r\nEXISTS\r\nNOT_STORED\r\n42\r\n", False) == (
        [0, mc._HD, 1, 2, 5, 0], 0)
    assert check(b"SERVER_ERROR out of memory\r\n", False) == (["SERVER_ERROR out of memory"], 0)
    long_err = b"ERROR " + "\u00e9".encode() * 300 + b"\r\n"
    assert check(long_err, False) == ([("ERROR " + "\u00e9" * 300)[:256]], 0)
    assert check(b"VA 2 f\r\nab\r\nEN\r\n", False) == ([-1, 1], 0)
    assert check(b"VA\r\n", False) is None and check(b"VALUE k 0\r\n", False) is None
    assert check(b"\r\n", False) is None and check(b"stored\r\n", False) is None
    assert check(b"x" * (mc.MAX_LINE + 1) + b"\r\n", False) is None
    assert check(b"get " + b"k" * (mc.MAX_LINE - 4) + b"\r\n", True) is not None  # MAX_LINE exactly
    assert check(b"get " + b"k" * (mc.MAX_LINE - 3) + b"\r\n", True) is None


def test_constants_and_arguments() -> None:
    assert (C.MAX_LINE, C.MAX_TEXT_LINE) == (mc.MAX_LINE, mc.MAX_TEXT_LINE)
    with pytest.raises(TypeError):
        C.text_walk(b"")  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        C.text_walk(b"", True, "0")
    assert C.text_walk("not a buffer", True, 0) is None
    assert C.text_walk(memoryview(b"END\r\n" * 4)[::2], False, 0) is None  # not contiguous: Python decides
    assert C.text_walk(b"", 1, 0) == ([], 0)
    assert C.text_walk(b"abc", True, 10) == ([], 7)
    assert C.text_walk(b"END\r\n", False, -1) is None


# -- the whole stage ------------------------------------------------------------------------------
def _three_ways(segments: list[tuple[bool, bytes]], port: int = 11211) -> tuple[list, dict, int]:
    """(spans, drops, C walks taken) through the stage, asserted equal with the C text walker,
    with it None and with ``feed_whole`` off."""
    taken = [0]

    def counting(*a: object) -> object:
        r = C.text_walk(*a)
        taken[0] += r is not None
        return r

    with pytest.MonkeyPatch.context() as m:
        m.setattr(mc, "_C_TEXT", counting)
        got = run_stage(port, segments)
        m.setattr(mc, "_C_TEXT", None)
        pure = run_stage(port, segments)
        m.setattr(mc.Session, "feed_whole", None)
        buffered = run_stage(port, segments)
    assert got == pure
    assert got == buffered
    return got[0], got[1], taken[0]


def _conversations() -> dict[str, list[tuple[bool, bytes]]]:
    out = {f"text-{size}": EXCHANGES["memcached"][1](size).steps for size in (16, 700, 20_000)}
    out["pymemcache"] = _fixture_segments()
    return out


@pytest.mark.parametrize("how", ["whole", "bytes", "random"])
@pytest.mark.parametrize("name", ["text-16", "text-700", "text-20000", "pymemcache"])
def test_stage_same_spans_and_drops_three_ways(name: str, how: str) -> None:
    segs = _conversations()[name]
    if how == "bytes" and sum(len(d) for _, d in segs) > 5000:
        segs = [(fc, d[:300]) for fc, d in segs]
    spans, drops, taken = _three_ways(cut(segs, how, random.Random(name + how)))
    if name == "pymemcache" and how != "bytes":
        assert len(spans) == 29 and not drops, drops
    if name == "pymemcache" and how == "whole":
        assert taken == len(segs)  # every segment, the detected first one too


@settings(max_examples=max(50, EXAMPLES // 4), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(["text-700", "pymemcache"]),
       st.lists(st.tuples(st.integers(0, 60), st.integers(0, 10_000), st.integers(0, 255), st.booleans()),
                max_size=4), st.integers(0, 2**32))
def test_stage_mutated_conversations_three_ways(name: str, mutations: list, seed: int) -> None:
    """Bytes changed and segments split in the conversations: the same spans and drops (any
    ProtocolError counted alike) with the C walker, without it and without feed_whole."""
    segs = mutate(_conversations()[name], mutations)
    _three_ways(segs)
    _three_ways(cut(segs, "random", random.Random(seed)))


@settings(max_examples=max(50, EXAMPLES // 4), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.lists(command(), min_size=1, max_size=4), st.lists(reply(), max_size=4)),
                min_size=1, max_size=5),
       st.integers(0, 2**32))
def test_stage_generated_conversations_three_ways(turns: list, seed: int) -> None:
    """hypothesis' turns of commands and replies (unpaired, extra, erroneous, blocks over
    several segments): same spans and drops all three ways, in random pieces too."""
    segs: list[tuple[bool, bytes]] = []
    for i, (cmds, replies) in enumerate(turns):
        segs.append((True, (b"" if i else b"get first\r\n") + b"".join(cmds)))  # detected as memcached
        if replies:
            segs.append((False, b"".join(replies)))
    _three_ways(segs)
    _three_ways(cut(segs, "random", random.Random(seed)))
