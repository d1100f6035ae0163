"""LargeBuffer and LargeBufferReader: equal to the same reads on flat bytes, bounded, zero-copy."""

from __future__ import annotations

import io
import struct
import tracemalloc

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service.largebuf import SCALAR_FORMATS, BufferBoundsError, LargeBuffer, LargeBufferReader


def chunked(data: bytes, cuts: list[int]) -> LargeBuffer:
    buf = LargeBuffer()
    prev = 0
    for c in [*sorted(set(x % (len(data) + 1) for x in cuts)), len(data)]:
        buf.append(data[prev:c])
        prev = c
    return buf


message = st.binary(min_size=0, max_size=600)
cuts = st.lists(st.integers(min_value=0, max_value=600), max_size=30)


@settings(max_examples=300, deadline=None)
@given(data=message, cuts=cuts, offs=st.lists(st.integers(0, 600), min_size=1, max_size=20))
def test_absolute_scalar_reads_equal_flat(data: bytes, cuts: list[int], offs: list[int]) -> None:
    buf = chunked(data, cuts)
    assert len(buf) == len(data)
    for name, fmt in SCALAR_FORMATS:
        size = struct.calcsize(fmt)
        at = getattr(buf, f"{name}_at")
        for off in offs:
            if off + size <= len(data):
                assert at(off) == struct.unpack_from(fmt, data, off)[0]
            else:
                with pytest.raises(BufferBoundsError):
                    at(off)


@settings(max_examples=300, deadline=None)
@given(data=message, cuts=cuts, off=st.integers(0, 600), n=st.integers(0, 600))
def test_view_at_and_copy_at_equal_flat(data: bytes, cuts: list[int], off: int, n: int) -> None:
    buf = chunked(data, cuts)
    if off + n <= len(data):
        assert bytes(buf.view_at(off, n)) == data[off:off + n]
        dst = bytearray(n)
        assert buf.copy_at(off, dst) == n
        assert bytes(dst) == data[off:off + n]
        assert buf.bytes_at(off, n) == data[off:off + n]
    else:
        with pytest.raises(BufferBoundsError):
            buf.view_at(off, n)


@settings(max_examples=400, deadline=None)
@given(data=st.binary(max_size=300).map(lambda b: b.replace(b"\x07", b"ab")), cuts=cuts,
       sub=st.sampled_from([b"a", b"ab", b"\r\n", b"\r\n\r\n", b"abc", b"\x00\x01"]),
       start=st.integers(-5, 320), end=st.one_of(st.none(), st.integers(0, 320)))
def test_find_equals_flat(data: bytes, cuts: list[int], sub: bytes, start: int, end: int | None) -> None:
    buf = chunked(data, cuts)
    flat_end = len(data) if end is None else min(end, len(data))
    expect = data.find(sub, max(start, 0), flat_end)
    assert buf.find(sub, start, end) == expect


def test_find_across_many_tiny_chunks() -> None:
    data = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
    buf = LargeBuffer(*[data[i:i + 1] for i in range(len(data))])
    assert buf.find(b"\r\n\r\n") == data.find(b"\r\n\r\n")
    assert buf.index_at(ord("H")) == data.index(b"H")


@settings(max_examples=300, deadline=None)
@given(data=message, cuts=cuts, ops=st.lists(st.tuples(st.sampled_from(
    ["u8", "i16be", "u16be", "i32be", "u32be", "i64be", "u32le", "u64le", "read", "peek", "skip"]),
    st.integers(0, 40)), max_size=40))
def test_reader_sequence_equals_flat(data: bytes, cuts: list[int], ops: list[tuple[str, int]]) -> None:
    buf = chunked(data, cuts)
    r = buf.reader()
    flat = io.BytesIO(data)
    fmts = dict(SCALAR_FORMATS)
    for op, n in ops:
        pos = flat.tell()
        if op in fmts:
            size = struct.calcsize(fmts[op])
            if pos + size > len(data):
                with pytest.raises(BufferBoundsError):
                    getattr(r, f"read_{op}")()
                assert r.offset == pos  # a failed read does not move the cursor
                continue
            assert getattr(r, f"read_{op}")() == struct.unpack(fmts[op], flat.read(size))[0]
        elif pos + n > len(data):
            with pytest.raises(BufferBoundsError):
                getattr(r, op)(n)
            continue
        elif op == "read":
            assert bytes(r.read(n)) == flat.read(n)
        elif op == "peek":
            assert bytes(r.peek(n)) == data[pos:pos + n]
        else:
            r.skip(n)
            flat.seek(pos + n)
        assert r.offset == flat.tell()
        assert r.remaining == len(data) - flat.tell()


def _uvarint(v: int) -> bytes:
    out = bytearray()
    while True:
        b = v & 0x7F
        v >>= 7
        if v:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


@settings(max_examples=300, deadline=None)
@given(vals=st.lists(st.integers(-(1 << 63), (1 << 63) - 1), min_size=1, max_size=20), cuts=cuts)
def test_varints_round_trip(vals: list[int], cuts: list[int]) -> None:
    data = b"".join(_uvarint(((v << 1) ^ (v >> 63)) & ((1 << 64) - 1)) for v in vals)
    data += b"".join(_uvarint(abs(v)) for v in vals)
    buf = chunked(data, cuts)
    r = buf.reader()
    assert [r.read_varint() for _ in vals] == vals
    assert [r.read_uvarint() for _ in vals] == [abs(v) for v in vals]
    assert r.remaining == 0


def test_uvarint_too_long_is_an_error() -> None:
    with pytest.raises(BufferBoundsError, match="varint longer"):
        LargeBuffer(b"\xff" * 11 + b"\x01").reader().read_uvarint()
    with pytest.raises(BufferBoundsError):
        LargeBuffer(b"\xff\xff").reader().read_uvarint()  # truncated


def test_cstring_across_chunks() -> None:
    buf = LargeBuffer(b"user\0da", b"tabase\0", b"x")
    r = buf.reader()
    assert bytes(r.read_cstring()) == b"user"
    assert bytes(r.read_cstring()) == b"database"
    with pytest.raises(BufferBoundsError, match="NUL"):
        r.read_cstring()
    assert r.offset == 14  # unchanged after the failure


def test_empty_buffer() -> None:
    buf = LargeBuffer()
    assert len(buf) == 0
    assert bytes(buf.view_at(0, 0)) == b""
    assert buf.find(b"x") == -1
    assert buf.ts_at(0) == 0
    with pytest.raises(BufferBoundsError):
        buf.u8_at(0)
    r = buf.reader()
    assert r.remaining == 0
    with pytest.raises(BufferBoundsError):
        r.read_u8()
    assert r.readinto(bytearray(4)) == 0


@pytest.mark.parametrize("off,n", [(-1, 1), (0, -1), (0, 11), (10, 1), (5, 6), (2**62, 1), (0, 2**62)])
def test_bounds_are_errors(off: int, n: int) -> None:
    buf = LargeBuffer(b"01234", b"56789")
    with pytest.raises(BufferBoundsError):
        buf.view_at(off, n)
    if 0 <= n < 100:
        with pytest.raises(BufferBoundsError):
            buf.copy_at(off, bytearray(n))


def test_reader_negative_and_overflowing_sizes() -> None:
    r = LargeBuffer(b"abcdef").reader()
    for meth in (r.read, r.peek, r.skip, r.read_bytes, r.window):
        with pytest.raises(BufferBoundsError):
            meth(-2)
        with pytest.raises(BufferBoundsError):
            meth(7)
        with pytest.raises(BufferBoundsError):
            meth(2**63)
    assert r.offset == 0


def test_window_never_reads_outside() -> None:
    data = bytes(range(100))
    buf = chunked(data, [7, 13, 50, 51, 90])
    r = buf.reader(10, 20)
    assert r.remaining == 10
    assert r.read_u32be() == struct.unpack_from(">I", data, 10)[0]
    assert bytes(r.read(6)) == data[14:20]
    with pytest.raises(BufferBoundsError):
        r.read_u8()
    r.reset()
    assert r.offset == 10
    with pytest.raises(BufferBoundsError):
        r.read(11)
    sub = buf.reader(0, 50).window(5)
    assert (sub.start, sub.end) == (0, 5)
    with pytest.raises(BufferBoundsError):
        sub.read_u64be()
    with pytest.raises(BufferBoundsError):
        buf.reader(50, 40)
    with pytest.raises(BufferBoundsError):
        buf.reader(0, 101)
    with pytest.raises(BufferBoundsError):
        buf.reader(-1)
    # find() through a reader stays inside its window
    assert buf.reader(10, 20).find(bytes([25])) == -1
    assert buf.reader(10, 30).find(bytes([25])) == 25


def test_readinto_is_file_like() -> None:
    data = b"hello, large buffer"
    buf = chunked(data, [3, 9])
    r = buf.reader(7)
    dst = bytearray(5)
    assert r.readinto(dst) == 5 and bytes(dst) == data[7:12]
    assert buf.reader(7).as_file().read() == data[7:]
    import gzip
    z = gzip.compress(data * 50)
    zbuf = chunked(z, list(range(0, len(z), 17)))
    assert gzip.GzipFile(fileobj=zbuf.reader().as_file()).read() == data * 50


def test_release_and_timestamps() -> None:
    buf = LargeBuffer()
    buf.append(b"abc", 100)
    buf.append(b"defg", 200)
    buf.append(b"hi", 300)
    assert buf.ts_at(0) == 100 and buf.ts_at(3) == 200 and buf.ts_at(8) == 300
    buf.release(4)
    assert bytes(buf.view_at(0, len(buf))) == b"efghi"
    assert buf.ts_at(0) == 200 and buf.ts_at(3) == 300
    assert buf.u16be_at(2) == struct.unpack(">H", b"gh")[0]
    buf.release(len(buf))
    assert len(buf) == 0 and buf.chunk_count == 0
    with pytest.raises(BufferBoundsError):
        buf.release(1)


def test_append_does_not_copy_and_accepts_views() -> None:
    backing = bytearray(b"0123456789")
    buf = LargeBuffer()
    buf.append(memoryview(backing)[2:6])
    backing[2] = ord("X")  # the buffer holds a reference, not a copy
    assert bytes(buf.view_at(0, 4)) == b"X345"
    buf.append(memoryview(b"\x00\x01\x00\x02").cast("H"))  # non-byte formats are recast
    assert len(buf) == 8


def test_straddling_reads_reuse_the_scratch() -> None:
    buf = LargeBuffer(b"ab", b"cd", b"ef", b"gh")
    v1 = buf.view_at(1, 2)
    assert bytes(v1) == b"bc"
    scratch1 = v1.obj
    v2 = buf.view_at(3, 2)
    assert bytes(v2) == b"de" and v2.obj is scratch1
    # A larger straddling read grows the scratch; the old view stays valid.
    big = LargeBuffer(b"x" * 300, b"y" * 300)
    first = big.view_at(299, 2)
    assert bytes(first) == b"xy"
    large = big.view_at(0, 600)
    assert bytes(large) == b"x" * 300 + b"y" * 300
    assert bytes(first) == b"xy"
    again = big.view_at(298, 4)
    assert again.obj is large.obj  # the grown scratch is reused from then on


def _parse_like_a_protocol(buf: LargeBuffer) -> int:
    r = buf.reader()
    size = r.read_i32be()
    a = r.read_u16be()
    b = r.read_u16be()
    r.skip(size - 4)
    return a + b + r.offset


def _build(body_len: int) -> LargeBuffer:
    body = bytes(body_len)
    msg = struct.pack(">iHH", body_len + 4, 1, 2) + body
    buf = LargeBuffer()
    for i in range(0, len(msg), 1399):
        buf.append(msg[i:i + 1399])
    return buf


def _measure(buf: LargeBuffer) -> int:
    _parse_like_a_protocol(buf)  # warm up caches (struct, method lookups)
    tracemalloc.start()
    try:
        before = tracemalloc.take_snapshot()
        for _ in range(20):
            _parse_like_a_protocol(buf)
        after = tracemalloc.take_snapshot()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    grown = sum(s.size_diff for s in after.compare_to(before, "filename") if s.size_diff > 0)
    return max(peak, grown)


def test_zero_copy_parse_allocation_is_flat() -> None:
    small = _build(1024)
    large = _build(1024 * 1024)
    a_small = _measure(small)
    a_large = _measure(large)
    assert a_large < 16 * 1024, a_large
    assert a_large <= a_small * 1.10 + 512, (a_small, a_large)


def test_many_straddling_reads_allocate_nothing_new() -> None:
    buf = LargeBuffer(*[b"\x01\x02\x03" for _ in range(1000)])
    for off in range(0, 2990, 3):
        buf.u32be_at(off + 1)
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        for off in range(0, 2990, 3):
            buf.u32be_at(off + 1)
            buf.view_at(off + 2, 3)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2048, peak


def test_reader_is_exported() -> None:
    assert isinstance(LargeBuffer(b"x").reader(), LargeBufferReader)


@settings(max_examples=200, deadline=None)
@given(data=message, cuts=cuts, off=st.integers(0, 600), n=st.integers(0, 600))
def test_views_cover_the_range_without_scratch(data: bytes, cuts: list[int], off: int, n: int) -> None:
    buf = chunked(data, cuts)
    if off + n > len(data):
        with pytest.raises(BufferBoundsError):
            buf.views(off, n)
        return
    vs = buf.views(off, n)
    assert b"".join(bytes(v) for v in vs) == data[off:off + n]
    assert all(v.obj is not buf._scratch for v in vs)
    buf.release(len(buf))  # the views outlive the buffer's references
    assert b"".join(bytes(v) for v in vs) == data[off:off + n]


def test_peak_allocation_helper_sees_a_payload_copy() -> None:
    """The parsers' zero-copy tests compare peak_allocation figures: it must see a real copy."""
    from tests.support.driver import peak_allocation

    payload = bytes(1_000_000)
    assert peak_allocation(lambda: bytes(bytearray(payload))) >= 1_000_000
    assert peak_allocation(lambda: memoryview(payload)[10:900_000]) < 10_000


# -- a message dripped in tiny segments: coalescing tail, remembered find misses ------------
_op = st.one_of(
    st.tuples(st.just("append"), st.binary(min_size=1, max_size=700).map(lambda b: b.replace(b"\x07", b"\r\n"))),
    st.tuples(st.just("release"), st.integers(0, 2000)),
    st.tuples(st.just("find"), st.sampled_from([b"\r\n", b"\r\n\r\n", b"\0", b"ab", b"x"]), st.integers(0, 900),
              st.one_of(st.none(), st.integers(0, 2000))),
    st.tuples(st.just("read"), st.integers(0, 2000), st.integers(0, 80)),
    st.tuples(st.just("reset")),
)


@settings(max_examples=400, deadline=None)
@given(ops=st.lists(_op, max_size=120))
def test_any_appends_releases_and_finds_equal_flat(ops: list[tuple]) -> None:
    """Small appends are coalesced and failed finds resumed: every answer must still be
    the flat bytes' answer, and views handed out earlier must keep their bytes."""
    buf, flat = LargeBuffer(), b""
    kept: list[tuple[memoryview, bytes]] = []
    for op in ops:
        if op[0] == "append":
            buf.append(op[1])
            flat += op[1]
        elif op[0] == "release":
            n = min(op[1], len(flat))
            buf.release(n)
            flat = flat[n:]
        elif op[0] == "reset":
            buf.reset()
            flat = b""
        elif op[0] == "find":
            _, sub, start, end = op
            assert buf.find(sub, start, end) == flat.find(sub, start, len(flat) if end is None else end)
        else:
            _, off, n = op
            if off + n <= len(flat):
                v = buf.view_at(off, n)
                assert v == flat[off:off + n]
                if n and buf.views(off, n)[0].obj is not buf._scratch:
                    kept.append((buf.views(off, n)[0], bytes(buf.views(off, n)[0])))
        assert len(buf) == len(flat)
    for v, b in kept:  # chunk views (tail views included) never change under later appends
        assert v == b


def test_a_byte_a_segment_keeps_the_chunk_count_and_find_cost_bounded() -> None:
    buf = LargeBuffer()
    for _ in range(20_000):
        buf.append(b"a")
        assert buf.find(b"\r\n") == -1  # each call scans only the new byte
    assert buf.chunk_count <= 8 + 20_000 // 8192 + 1
    buf.append(b"\r\n")
    assert buf.find(b"\r\n") == 20_000
    buf.release(10_000)
    assert buf.find(b"\r\n") == 10_000 and buf.view_at(9_999, 3) == b"a\r\n"


def test_want_is_cleared_by_release_and_reset() -> None:
    buf = LargeBuffer(b"abcdef")
    buf.want = 100
    buf.release(1)
    assert buf.want == 0
    buf.want = 100
    buf.reset()
    assert buf.want == 0


def test_consumed_releases_then_asks() -> None:
    """A feed's end: the consumed bytes go, then ``want`` counts from the new start (a release
    resets it, so the order matters); nothing consumed and nothing wanted changes nothing."""
    b = LargeBuffer()
    b.append(memoryview(b"abcdef"), 1)
    b.want = 9
    b.consumed(0)
    assert len(b) == 6 and b.want == 9
    b.consumed(2, 5)
    assert bytes(b.view_at(0, 4)) == b"cdef" and b.want == 5
    b.consumed(4)
    assert len(b) == 0 and b.want == 0
