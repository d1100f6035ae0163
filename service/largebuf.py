"""Zero-copy message buffer: the Python form of OBI's LargeBuffer.

A message arrives as TCP payload chunks. ``LargeBuffer`` keeps a reference to
each chunk (no copy, earlier chunks never move) and reads scalars, slices and
strings at absolute offsets across chunk boundaries. A read that lies inside
one chunk is a ``struct.unpack_from`` or a memoryview slice of that chunk; only
a read that straddles two chunks copies, and then into one reusable scratch
``bytearray`` owned by the buffer, so the memory a parse allocates does not
grow with the payload.

``LargeBufferReader`` is a cursor over an optional bounded window of a buffer.
It caches the chunk it is in, so sequential reads cost one bounds check and one
``unpack_from``.

Every out-of-range access raises ``BufferBoundsError`` (a ``ValueError``);
nothing is silently clamped.
"""

from __future__ import annotations

import io
import re
import struct
from bisect import bisect_right
from collections.abc import Callable
from typing import Any

__all__ = ["BufferBoundsError", "LargeBuffer", "LargeBufferReader", "MAX_VARINT_BYTES", "SCALAR_FORMATS"]

#: A uvarint of a 64-bit value needs at most 10 bytes (protobuf, Kafka KIP-482).
MAX_VARINT_BYTES = 10

#: Scratch starts at this size and grows (never shrinks) when a straddling
#: read is larger: OBI's large-buffer scratch uses the same idea.
_SCRATCH_MIN = 256

_Bytes = bytes | bytearray | memoryview

#: Appends of at most this many bytes are copied into a coalescing tail once a buffer
#: holds COALESCE_AFTER chunks (a message dripped in tiny segments): TCP segments of
#: real traffic are larger, and a buffer of a few chunks keeps every chunk's own time.
COALESCE_MAX = 512
COALESCE_AFTER = 8
#: Size of one coalescing tail.
TAIL_SIZE = 8192
#: ``find`` misses remembered per buffer (the delimiters a parser looks for: CRLF, NUL, ...).
_MAX_MISSES = 4
#: What a buffer starts with instead of its own scratch and miss table: a connection has two
#: buffers and most never straddle a read or miss a search (a whole request per segment), so
#: each gets its own on first use (issue 21: 1.3 KB of an idle connection's 7.3 KB was these).
_NO_SCRATCH = bytearray()
_NO_SCRATCH_MV = memoryview(_NO_SCRATCH)
_NO_MISSES: dict[bytes, tuple[int, int]] = {}


class BufferBoundsError(ValueError):
    """A read outside the buffer or window, or a negative/overflowing size."""


# (method suffix, struct format). Byte order is part of the format, as dpkt's
# __byte_order__: one table drives both the absolute and the cursor reads.
SCALAR_FORMATS: tuple[tuple[str, str], ...] = (
    ("u8", "B"),
    ("i8", "b"),
    ("u16be", ">H"),
    ("i16be", ">h"),
    ("u16le", "<H"),
    ("i16le", "<h"),
    ("u32be", ">I"),
    ("i32be", ">i"),
    ("u32le", "<I"),
    ("i32le", "<i"),
    ("u64be", ">Q"),
    ("i64be", ">q"),
    ("u64le", "<Q"),
    ("i64le", "<q"),
)


def _as_view(chunk: _Bytes) -> memoryview:
    mv = chunk if isinstance(chunk, memoryview) else memoryview(chunk)
    if mv.ndim != 1 or mv.format not in ("B", "b", "c"):
        mv = mv.cast("B")
    elif mv.format != "B":
        mv = mv.cast("B")
    return mv


class LargeBuffer:
    """A message held as a list of chunks, read in place.

    Offsets are absolute from the first byte still held. ``release(n)`` drops a
    consumed prefix (whole chunks are forgotten, a partly consumed one is
    re-sliced) so a connection's pending bytes can be kept in one buffer.
    """

    __slots__ = ("_chunks", "_hc", "_he", "_hint", "_hs", "_len", "_misses", "_scratch", "_scratch_mv", "_starts",
                 "_tail", "_tail_base", "_tail_used", "_ts", "want")

    def __init__(self, *chunks: _Bytes) -> None:
        self._chunks: list[memoryview] = []
        self._starts: list[int] = []
        self._ts: list[int] = []
        self._len = 0
        self._scratch = _NO_SCRATCH  # made at the first straddling read (_gather)
        self._scratch_mv = _NO_SCRATCH_MV
        self._hint = 0
        # The last chunk looked up (view, start, end): most reads hit it again.
        self._hc: memoryview = _NO_SCRATCH_MV
        self._hs = 0
        self._he = -1
        #: Coalescing tail (see ``append``): a fixed-size bytearray, how much of it is
        #: written, and where in it the last chunk's view begins.
        self._tail: memoryview | None = None
        self._tail_used = 0
        self._tail_base = 0
        #: ``find`` misses: sub -> (start, upto): ``sub`` starts nowhere in [start, upto - len(sub)].
        self._misses: dict[bytes, tuple[int, int]] = _NO_MISSES  # its own dict at the first miss (find)
        #: Bytes a session needs before its next ``feed`` can make progress (0: unknown).
        #: The stage skips ``feed`` while ``len(buf) < want``; ``release``/``reset`` clear it.
        self.want = 0
        if chunks:  # two buffers a connection are made empty: no loop set up for them
            for c in chunks:
                self.append(c)

    # -- building ---------------------------------------------------------
    def append(self, chunk: _Bytes, ts_ns: int = 0) -> None:
        """Add a chunk by reference. The caller must not mutate it afterwards.

        ``ts_ns`` is when the chunk arrived: ``ts_at`` tells a parser when a
        message's first byte was seen, for span start times.
        """
        mv = chunk
        if mv.__class__ is not memoryview or mv.format != "B" or mv.ndim != 1:  # (a byte view: no call)
            mv = _as_view(chunk)
        n = mv.nbytes
        if n == 0:
            return
        if n <= COALESCE_MAX and len(self._chunks) >= COALESCE_AFTER:
            # Many small segments (a byte a segment, at worst): copy them into a tail
            # instead of keeping a view each, so the chunk count, and with it every
            # walk over the chunks (find, release), stays proportional to the bytes
            # over TAIL_SIZE, not to the segments. A copy of at most COALESCE_MAX
            # bytes an append: linear, and less memory than a memoryview per byte.
            self._coalesce(mv, n, ts_ns)
            return
        self._tail = None  # the tail is only ever the last chunk
        self._chunks.append(mv)
        self._starts.append(self._len)
        self._ts.append(ts_ns)
        self._len += n

    def _coalesce(self, mv: memoryview, n: int, ts_ns: int) -> None:
        tail = self._tail
        used = self._tail_used
        if tail is not None and used + n <= TAIL_SIZE:
            tail[used:used + n] = mv
            self._tail_used = used + n
            # The last chunk is a view of the tail: widen it (earlier bytes stay where they are,
            # so views handed out before remain valid). Its time stays its first byte's.
            self._chunks[-1] = tail[self._tail_base:used + n]
            if self._hs == self._starts[-1]:
                self._he = -1
            self._len += n
            return
        # A new tail, never a reused one: views of an old tail may still be held.
        tail = self._tail = memoryview(bytearray(TAIL_SIZE))
        tail[:n] = mv
        self._tail_used = n
        self._tail_base = 0
        self._chunks.append(tail[:n])
        self._starts.append(self._len)
        self._ts.append(ts_ns)
        self._len += n

    def reset(self) -> None:
        """Forget all chunks; the scratch is kept for the next message."""
        self._chunks.clear()
        self._starts.clear()
        self._ts.clear()
        self._len = 0
        self._hint = 0
        self._he = -1
        self._tail = None
        self.want = 0
        if self._misses:
            self._misses.clear()

    def consumed(self, n: int, want: int = 0) -> None:
        """A feed's end for a parser that walks with a cursor and releases once: drop the ``n``
        bytes it consumed, then, when ``want``, ask for that many bytes (from the new start)
        before the stage feeds again (base.py's contract)."""
        if n:
            self.release(n)
        if want:
            self.want = want

    def release(self, n: int) -> None:
        """Drop the first ``n`` bytes (a parsed message); later offsets shift by ``n``."""
        if n < 0 or n > self._len:
            raise BufferBoundsError(f"release({n}) outside buffer of {self._len} bytes")
        if n == 0:
            return
        if n == self._len:
            self.reset()
            return
        i = bisect_right(self._starts, n) - 1
        chunks = self._chunks
        rel = n - self._starts[i]
        first = chunks[i][rel:]
        if i == len(chunks) - 1 and self._tail is not None:
            self._tail_base += rel  # the re-sliced last chunk is still the tail's view
        del chunks[:i]
        del self._ts[:i]
        chunks[0] = first  # non-empty: bisect puts n strictly inside chunk i
        starts = []
        pos = 0
        for c in chunks:
            starts.append(pos)
            pos += c.nbytes
        self._starts = starts
        self._len = pos
        self._hint = 0
        self._he = -1
        self.want = 0
        if self._misses:
            # What was searched stays searched: shift the ranges with the bytes.
            self._misses = {sub: (max(a - n, 0), b - n) for sub, (a, b) in self._misses.items() if b - n > 0}

    def __len__(self) -> int:
        return self._len

    def ts_at(self, off: int) -> int:
        """Arrival time of the chunk holding ``off`` (0 for an empty buffer)."""
        if not self._chunks:
            return 0
        if off >= self._len:
            return self._ts[-1]
        return self._ts[self._locate(max(off, 0))]

    @property
    def chunk_count(self) -> int:
        return len(self._chunks)

    def chunks(self) -> list[memoryview]:
        """The chunks as views (read-only use)."""
        return list(self._chunks)

    # -- locating -------------------------------------------------------
    def _locate(self, off: int) -> int:
        """Index of the chunk holding absolute offset ``off`` (0 <= off < len)."""
        starts = self._starts
        h = self._hint
        if h < len(starts) and starts[h] <= off and (h + 1 == len(starts) or off < starts[h + 1]):
            return h
        h = bisect_right(starts, off) - 1
        self._hint = h
        return h

    def _cache(self, i: int) -> None:
        c = self._chunks[i]
        self._hc = c
        self._hs = s = self._starts[i]
        self._he = s + c.nbytes

    def chunk_at(self, off: int) -> tuple[memoryview, int]:
        """(the chunk holding ``off``, that chunk's absolute start): for scanners that tokenise
        a chunk in place (``re`` on a memoryview) and fall back to ``find``/``view_at`` only at seams."""
        if not 0 <= off < self._len:
            raise BufferBoundsError(f"offset {off} outside buffer of {self._len} bytes")
        if not (self._hs <= off < self._he):
            self._cache(self._locate(off))
        return self._hc, self._hs

    def _check(self, off: int, n: int) -> None:
        if n < 0:
            raise BufferBoundsError(f"negative size {n}")
        if off < 0 or off + n > self._len:
            raise BufferBoundsError(f"read of {n} bytes at {off} outside buffer of {self._len} bytes")

    # -- slices -----------------------------------------------------------
    def view_at(self, off: int, n: int) -> memoryview:
        """``n`` bytes at ``off``: a view into the chunk, or into the scratch if they straddle.

        A scratch view is valid until the next straddling read on this buffer.
        """
        hs = self._hs
        if hs <= off and off + n <= self._he and n >= 0:
            rel = off - hs
            return self._hc[rel:rel + n]
        self._check(off, n)
        if n == 0:
            return self._scratch_mv[:0]
        i = self._locate(off)
        self._cache(i)
        rel = off - self._hs
        if off + n <= self._he:
            return self._hc[rel:rel + n]
        return self._gather(i, rel, n)

    def _gather(self, i: int, rel: int, n: int) -> memoryview:
        if n > len(self._scratch):
            # A new, larger scratch: views of the old one stay valid (a
            # bytearray with exported views cannot be resized anyway).
            size = max(n, 2 * len(self._scratch), _SCRATCH_MIN)
            self._scratch = bytearray(size)
            self._scratch_mv = memoryview(self._scratch)
        dst = self._scratch_mv
        got = 0
        chunks = self._chunks
        while got < n:
            c = chunks[i]
            take = min(c.nbytes - rel, n - got)
            dst[got:got + take] = c[rel:rel + take]
            got += take
            i += 1
            rel = 0
        return dst[:n]

    def views(self, off: int, n: int) -> list[memoryview]:
        """The chunk slices covering ``[off, off+n)``, like an iovec: no copy and, unlike
        ``view_at``, no scratch, so they stay valid after ``release`` (a memoryview keeps
        its chunk alive). For content kept across messages (e.g. FastCGI PARAMS)."""
        self._check(off, n)
        out: list[memoryview] = []
        if n == 0:
            return out
        i = self._locate(off)
        rel = off - self._starts[i]
        while n > 0:
            c = self._chunks[i]
            take = min(c.nbytes - rel, n)
            out.append(c[rel:rel + take])
            n -= take
            i += 1
            rel = 0
        return out

    def copy_at(self, off: int, dst: bytearray | memoryview) -> int:
        """Copy ``len(dst)`` bytes at ``off`` into ``dst`` (the caller's explicit copy)."""
        out = _as_view(dst)
        n = out.nbytes
        self._check(off, n)
        if n == 0:
            return 0
        i = self._locate(off)
        rel = off - self._starts[i]
        got = 0
        while got < n:
            c = self._chunks[i]
            take = min(c.nbytes - rel, n - got)
            out[got:got + take] = c[rel:rel + take]
            got += take
            i += 1
            rel = 0
        return n

    def bytes_at(self, off: int, n: int) -> bytes:
        """A copy of ``n`` bytes: only for small fields kept beyond the parse (names, ids)."""
        return self.view_at(off, n).tobytes()

    def find(self, sub: bytes, start: int = 0, end: int | None = None) -> int:
        """Lowest offset of ``sub`` in ``[start, end)``, across chunk boundaries, or -1."""
        if end is None or end > self._len:
            end = self._len
        if start < 0:
            start = 0
        m = len(sub)
        if m == 0:
            return start if start <= end else -1
        if end - start < m:
            return -1
        # Resume a search that failed before (the same ``sub`` from a start at or before
        # this one): a parser that re-asks on every segment then scans only the new bytes.
        miss = self._misses.get(sub)
        begin = start
        if miss is not None and miss[0] <= start <= miss[1]:
            begin = max(start, miss[1] - m + 1)
            if end - begin < m:
                if end > miss[1]:
                    self._misses[sub] = (miss[0], end)
                return -1
        hit = self._find(sub, begin, end)
        if hit < 0:
            if miss is not None and miss[0] <= start <= miss[1]:
                if end > miss[1]:
                    self._misses[sub] = (miss[0], end)
            elif len(self._misses) < _MAX_MISSES or sub in self._misses:
                if self._misses is _NO_MISSES:
                    self._misses = {}
                self._misses[sub] = (start, end)
        return hit

    def _find(self, sub: bytes, start: int, end: int) -> int:
        m = len(sub)
        pat = _pattern(sub)
        i = self._locate(start)
        chunks = self._chunks
        starts = self._starts
        nchunks = len(chunks)
        while i < nchunks:
            cs = starts[i]
            if cs >= end:
                break
            c = chunks[i]
            lo = max(start - cs, 0)
            hi = min(c.nbytes, end - cs)
            if hi - lo >= m:
                hit = pat.search(c, lo, hi)
                if hit is not None:
                    return cs + hit.start()
            # A match that begins in the last m-1 bytes of this chunk and ends
            # in a later one: look in a small gathered window around the seam.
            seam_lo = max(cs + hi - (m - 1), cs + lo, start)
            seam_hi = min(cs + hi + (m - 1), end)
            if cs + hi < end and seam_hi - seam_lo >= m:
                w = self.view_at(seam_lo, seam_hi - seam_lo)
                hit = pat.search(w)
                if hit is not None:
                    return seam_lo + hit.start()
            i += 1
        return -1

    def index_at(self, byte: int, off: int = 0, end: int | None = None) -> int:
        """Offset of a single byte value in ``[off, end)``, or -1."""
        return self.find(bytes((byte,)), off, end)

    def reader(self, start: int = 0, end: int | None = None) -> LargeBufferReader:
        return LargeBufferReader(self, start, end)

    def __repr__(self) -> str:
        return f"LargeBuffer(len={self._len}, chunks={len(self._chunks)})"


_PATTERNS: dict[bytes, re.Pattern[bytes]] = {}


def _pattern(sub: bytes) -> re.Pattern[bytes]:
    # re searches memoryviews in place; bytes.find would need a copy.
    p = _PATTERNS.get(sub)
    if p is None:
        if len(_PATTERNS) > 256:
            _PATTERNS.clear()
        p = _PATTERNS[sub] = re.compile(re.escape(sub))
    return p


def _make_at(fmt: str) -> Callable[[LargeBuffer, int], int]:
    st = struct.Struct(fmt)
    unpack = st.unpack_from
    size = st.size

    def at(self: LargeBuffer, off: int) -> int:
        hs = self._hs
        if hs <= off and off + size <= self._he:
            return unpack(self._hc, off - hs)[0]
        if off < 0 or off + size > self._len:
            raise BufferBoundsError(f"read of {size} bytes at {off} outside buffer of {self._len} bytes")
        i = self._locate(off)
        self._cache(i)
        if off + size <= self._he:
            return unpack(self._hc, off - self._hs)[0]
        return unpack(self._gather(i, off - self._hs, size))[0]

    at.__doc__ = f"Unsigned/signed scalar ``{fmt}`` at absolute offset."
    return at


for _name, _fmt in SCALAR_FORMATS:
    setattr(LargeBuffer, f"{_name}_at", _make_at(_fmt))


def _u8_at(self: LargeBuffer, off: int) -> int:
    # The parsers' most frequent read (type bytes, flags, varints): a byte is an index into the
    # cached chunk, not an unpack and a tuple (a third of the time of the generic read).
    hs = self._hs
    if hs <= off < self._he:
        return self._hc[off - hs]
    if off < 0 or off >= self._len:
        raise BufferBoundsError(f"read of 1 bytes at {off} outside buffer of {self._len} bytes")
    self._cache(self._locate(off))
    return self._hc[off - self._hs]


_u8_at.__doc__ = "Unsigned/signed scalar ``B`` at absolute offset."
LargeBuffer.u8_at = _u8_at  # type: ignore[attr-defined]


class LargeBufferReader:
    """A cursor over ``buf[start:end]``.

    ``offset`` is absolute in the buffer. The chunk under the cursor is cached,
    so reads inside it skip the chunk lookup. File-like (``read``/``readinto``)
    so stdlib decoders can consume it.
    """

    __slots__ = ("_buf", "_c", "_ce", "_cs", "_end", "_pos", "_start")

    def __init__(self, buf: LargeBuffer, start: int = 0, end: int | None = None) -> None:
        blen = len(buf)
        if end is None:
            end = blen
        if start < 0 or end < start or end > blen:
            raise BufferBoundsError(f"window [{start}, {end}) outside buffer of {blen} bytes")
        self._buf = buf
        self._start = start
        self._end = end
        self._pos = start
        self._c: memoryview | None = None
        self._cs = 0
        self._ce = 0

    # -- position --------------------------------------------------------
    @property
    def offset(self) -> int:
        return self._pos

    @property
    def start(self) -> int:
        return self._start

    @property
    def end(self) -> int:
        return self._end

    @property
    def remaining(self) -> int:
        return self._end - self._pos

    @property
    def buffer(self) -> LargeBuffer:
        return self._buf

    def reset(self) -> None:
        self._pos = self._start

    def seek(self, off: int) -> None:
        if off < self._start or off > self._end:
            raise BufferBoundsError(f"seek to {off} outside window [{self._start}, {self._end})")
        self._pos = off

    def _need(self, n: int) -> int:
        if n < 0:
            raise BufferBoundsError(f"negative size {n}")
        p = self._pos
        if p + n > self._end:
            raise BufferBoundsError(f"need {n} bytes at {p}, window ends at {self._end}")
        return p

    def skip(self, n: int) -> None:
        self._pos = self._need(n) + n

    def window(self, n: int) -> LargeBufferReader:
        """A sub-reader over the next ``n`` bytes; this reader skips past them."""
        p = self._need(n)
        self._pos = p + n
        return LargeBufferReader(self._buf, p, p + n)

    # -- slices ----------------------------------------------------------
    def read(self, n: int = -1) -> memoryview:
        """The next ``n`` bytes as a view (see ``LargeBuffer.view_at``); ``-1`` reads the rest."""
        if n == -1:
            n = self._end - self._pos
        p = self._need(n)
        self._pos = p + n
        return self._buf.view_at(p, n)

    def peek(self, n: int) -> memoryview:
        return self._buf.view_at(self._need(n), n)

    def read_bytes(self, n: int) -> bytes:
        """The one explicit copy: for small values kept beyond the parse."""
        return self.read(n).tobytes()

    def readinto(self, b: bytearray | memoryview) -> int:
        out = _as_view(b)
        n = min(out.nbytes, self._end - self._pos)
        if n:
            self._buf.copy_at(self._pos, out[:n])
            self._pos += n
        return n

    def as_file(self) -> io.BufferedReader:
        """A real binary file over the rest of the window, for stdlib decoders (gzip, zlib, json)."""
        return io.BufferedReader(_RawReader(self))

    def find(self, sub: bytes) -> int:
        """Absolute offset of ``sub`` between the cursor and the window end, or -1."""
        return self._buf.find(sub, self._pos, self._end)

    def read_cstring(self) -> memoryview:
        """Bytes up to a NUL (not included); the cursor moves past the NUL."""
        z = self._buf.find(b"\0", self._pos, self._end)
        if z < 0:
            raise BufferBoundsError(f"no NUL terminator between {self._pos} and {self._end}")
        v = self._buf.view_at(self._pos, z - self._pos)
        self._pos = z + 1
        return v

    def read_uvarint(self) -> int:
        """Unsigned LEB128 (protobuf/Kafka); more than 10 bytes is an error."""
        result = 0
        shift = 0
        for _ in range(MAX_VARINT_BYTES):
            b = self.read_u8()
            result |= (b & 0x7F) << shift
            if b < 0x80:
                return result
            shift += 7
        raise BufferBoundsError(f"varint longer than {MAX_VARINT_BYTES} bytes at {self._pos}")

    def read_varint(self) -> int:
        """Zigzag-encoded signed varint."""
        v = self.read_uvarint()
        return (v >> 1) ^ -(v & 1)

    def __repr__(self) -> str:
        return f"LargeBufferReader(offset={self._pos}, window=[{self._start}, {self._end}))"


class _RawReader(io.RawIOBase):
    """Adapts a reader to the raw-file protocol (``readinto`` copies; it is the caller's explicit copy)."""

    def __init__(self, reader: LargeBufferReader) -> None:
        self._r = reader

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        return self._r.readinto(b)


def _make_read(fmt: str) -> Callable[[LargeBufferReader], int]:
    st = struct.Struct(fmt)
    unpack = st.unpack_from
    size = st.size

    def read(self: LargeBufferReader) -> int:
        p = self._pos
        q = p + size
        # _ce is min(chunk end, window end): one comparison covers both bounds.
        if q <= self._ce and p >= self._cs:
            self._pos = q
            return unpack(self._c, p - self._cs)[0]
        if q > self._end:
            raise BufferBoundsError(f"need {size} bytes at {p}, window ends at {self._end}")
        buf = self._buf
        i = buf._locate(p)
        c = buf._chunks[i]
        cs = buf._starts[i]
        self._c = c
        self._cs = cs
        self._ce = min(cs + c.nbytes, self._end)
        self._pos = q
        if q <= cs + c.nbytes:
            return unpack(c, p - cs)[0]
        return unpack(buf._gather(i, p - cs, size))[0]

    read.__doc__ = f"Read scalar ``{fmt}`` and advance."
    return read


def _make_peek(fmt: str) -> Callable[[LargeBufferReader], int]:
    size = struct.calcsize(fmt)
    at_name = None
    for name, f in SCALAR_FORMATS:
        if f == fmt:
            at_name = f"{name}_at"

    def peek(self: LargeBufferReader) -> int:
        p = self._pos
        if p + size > self._end:
            raise BufferBoundsError(f"need {size} bytes at {p}, window ends at {self._end}")
        at: Any = getattr(self._buf, at_name)  # type: ignore[arg-type]
        return at(p)

    return peek


for _name, _fmt in SCALAR_FORMATS:
    setattr(LargeBufferReader, f"read_{_name}", _make_read(_fmt))
    setattr(LargeBufferReader, f"peek_{_name}", _make_peek(_fmt))
