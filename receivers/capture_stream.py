"""Captures read as a stream: compressed files (gzip, zstd, xz, bzip2) and standard input.

Contract: ``open_stream(path)`` (``"-"`` = standard input) returns a ``StreamReader``
that iterates like the mapped readers of receivers/pcap.py, ``(linktype, ts_ns, off, end)``
per packet with the frame at ``reader.view[off:end]``, except that the view changes: the
stream is decompressed (never to disk) into chunks of about ``CHUNK_BYTES`` of whole
records, and before the packets of a new chunk the reader sets ``reader.view`` to it and
yields ``(NEW_VIEW, 0, 0, 0)``. A chunk is a fresh ``bytes`` object, never reused, so
payload views handed downstream stay valid; it is freed when the last of them goes.
A stream cut short or damaged ends the iteration with ``reader.error`` set, as the mapped
readers do; a decompressor's error (a gzip file cut short: "Compressed file ended before
the end-of-stream marker") is reported the same way, after every whole record before it.

Each chunk is parsed by the mapped readers themselves (``PcapReader``/``PcapngReader``)
with the state a chunk needs from before it put in front: the 24-byte file header for
pcap, the current section header and its interface descriptions for pcapng. So both
formats and every block type behave exactly as in a mapped file.

``sniff(path)`` names the compression of a file (by its first bytes, whatever its name);
``STDIN`` is the name of standard input.
"""

from __future__ import annotations

import bz2
import lzma
import os
import struct
import sys
import zlib
from collections.abc import Iterator
from typing import IO, Any

__all__ = ["CHUNK_BYTES", "COMPRESSED_SUFFIXES", "NEW_VIEW", "STDIN", "StreamReader", "open_stream", "sniff"]

#: The name of standard input (``tcpdump -w - | wirespan replay -``).
STDIN = "-"
#: The link type of the marker tuple a ``StreamReader`` yields when ``view`` changed.
NEW_VIEW = -2
#: Decompressed bytes read per chunk. A payload view pending downstream (a request
#: awaiting its response) keeps its whole chunk alive, so chunks are kept small; 1 MiB
#: costs about 0.1 ms of copying and one read call per chunk.
CHUNK_BYTES = 1 << 20
#: Bytes asked of the decompressor at a time: a stream cut short raises at the read that meets
#: the cut and that read's bytes are lost, so reads are small enough to lose little.
READ_BYTES = 32 << 10
#: Compressed bytes read at a time.
INPUT_BYTES = 64 << 10
#: Suffixes of compressed captures (``capture.pcapng.zst``); the content decides, not the name.
COMPRESSED_SUFFIXES = (".gz", ".zst", ".zstd", ".xz", ".bz2")

_MAGICS = ((b"\x1f\x8b", "gzip"), (b"\x28\xb5\x2f\xfd", "zstd"), (b"\xfd7zXZ\x00", "xz"), (b"BZh", "bzip2"))
_PCAPNG_SHB = 0x0A0D0D0A
_BT_IDB = 1


def sniff(head: bytes) -> str | None:
    """The compression whose magic ``head`` starts with (``gzip``, ``zstd``, ``xz``, ``bzip2``), or None."""
    for magic, name in _MAGICS:
        if head.startswith(magic):
            return name
    return None


def _decompressor(kind: str) -> Any:
    """A fresh incremental decompressor of one gzip member, xz/bzip2 stream or zstd frame.

    All four have the same shape: ``decompress(data, max_length)``, ``needs_input``, ``eof``
    and ``unused_data`` (zlib's object is wrapped to give it), so output is bounded per call
    (a small input that inflates to gigabytes is read a piece at a time) and a stream cut
    short is told apart from one that ended (``eof`` never came).
    """
    if kind == "gzip":
        return _Zlib()
    if kind == "xz":
        return lzma.LZMADecompressor()
    if kind == "bzip2":
        return bz2.BZ2Decompressor()
    try:
        from compression import zstd  # type: ignore[import-not-found]  # Python 3.14
    except ImportError:
        try:
            from backports import zstd  # type: ignore[import-not-found,no-redef]
        except ImportError:
            raise OSError("a zstd-compressed capture needs the backports.zstd package "
                          "(pip install backports.zstd)") from None
    return zstd.ZstdDecompressor()


class _Zlib:
    """zlib's gzip decompressor with the lzma/bz2/zstd decompressors' interface."""

    def __init__(self) -> None:
        self._d = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
        self.needs_input = True

    @property
    def eof(self) -> bool:
        return self._d.eof

    @property
    def unused_data(self) -> bytes:
        return self._d.unused_data

    def decompress(self, data: bytes, max_length: int) -> bytes:
        data = self._d.unconsumed_tail + data if self._d.unconsumed_tail else data
        out = self._d.decompress(data, max_length)
        self.needs_input = not self._d.unconsumed_tail
        return out


class _Inflating:
    """A file-like ``read(n)`` over a compressed stream, one member/frame after another."""

    def __init__(self, raw: Any, kind: str) -> None:
        self.raw = raw
        self.kind = kind
        self._d = _decompressor(kind)
        self._started = False   # the current member has input (a new one starts only if more comes)
        self._input_done = False

    def read(self, n: int) -> bytes:
        """Up to ``n`` bytes (b"" at the end). Raises EOFError when the stream was cut short,
        OSError (or the decompressor's error) when it is damaged."""
        d = self._d
        while True:
            if d.eof:
                rest = d.unused_data
                if not rest:
                    if self._input_done:
                        return b""
                    rest = self.raw.read(INPUT_BYTES)
                    if not rest:
                        self._input_done = True
                        return b""
                d = self._d = _decompressor(self.kind)  # the next member/stream/frame
                out = d.decompress(rest, n)
            elif d.needs_input:
                data = b"" if self._input_done else self.raw.read(INPUT_BYTES)
                if not data:
                    self._input_done = True
                    raise EOFError("compressed stream ended before its end-of-stream marker (cut short)")
                out = d.decompress(data, n)
            else:
                out = d.decompress(b"", n)
            if out:
                return out

    def close(self) -> None:
        pass


def _decompressed(raw: Any, kind: str | None) -> Any:
    return raw if kind is None else _Inflating(raw, kind)


class _Counting:
    """A raw file that counts what was read from it (the progress bar's position)."""

    def __init__(self, f: IO[bytes]) -> None:
        self.f = f
        self.position = 0

    def read(self, n: int = -1) -> bytes:
        b = self.f.read(n)
        self.position += len(b)
        return b

    def readinto(self, buf: Any) -> int:
        n = self.f.readinto(buf)  # type: ignore[attr-defined]
        self.position += n or 0
        return n or 0

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        pass  # the owner closes the file itself

    @property
    def closed(self) -> bool:
        return False

    def flush(self) -> None:
        pass


class StreamReader:
    """Packets of a compressed file or of standard input (see the module docstring)."""

    streaming = True

    def __init__(self, path: str, stdin: IO[bytes] | None = None) -> None:
        self.path = path
        self.error: str | None = None
        self.skipped = 0
        self.view = memoryview(b"")
        self.format = "pcap"
        if path == STDIN:
            src: Any = stdin if stdin is not None else sys.stdin.buffer
            self.size = 0  # unknown
            self._own = None
        else:
            src = open(path, "rb", buffering=1 << 16)  # closed when the iteration ends
            self.size = os.fstat(src.fileno()).st_size
            self._own = src
        self._raw = _Counting(src)
        # one read at most: the magic of a pipe's first write is there
        head = bytes(src.peek(6)[:6]) if hasattr(src, "peek") else b""
        self.compression = sniff(head)
        self._f = _decompressed(self._raw, self.compression)  # type: ignore[arg-type]

    @property
    def position(self) -> int:
        """Bytes of the (compressed) input read so far."""
        return self._raw.position

    def _read(self, n: int) -> bytes:
        """Up to ``n`` decompressed bytes (fewer only at the end); a decompressor error is the end."""
        parts = []
        got = 0
        while got < n:
            try:
                b = self._f.read(min(n - got, READ_BYTES))
            except EOFError:
                self.error = self.error or f"truncated {self.compression} stream: it ends after " \
                                           f"{self.position} compressed bytes, before its end-of-stream marker"
                break
            except Exception as e:  # zlib.error, lzma.LZMAError, OSError, zstd.ZstdError: the data is bad
                self.error = self.error or f"damaged {self.compression} stream after {self.position} " \
                                           f"compressed bytes: {e}"
                break
            if not b:
                break
            parts.append(b)
            got += len(b)
        return b"".join(parts)

    def close(self) -> None:
        try:
            self._f.close()
        except Exception:  # a damaged stream may refuse to close cleanly: it is gone either way
            pass
        if self._own is not None:
            self._own.close()

    def __iter__(self) -> Iterator[tuple[int, int, int, int]]:
        try:
            yield from self._records()
        finally:
            self.close()

    def _records(self) -> Iterator[tuple[int, int, int, int]]:
        from receivers.pcap import _PCAP_MAGICS, CaptureError, PcapngReader, PcapReader, _not_a_capture

        buf = self._read(CHUNK_BYTES)
        if not buf:
            if self.error is None:
                self.error = "truncated: empty input, no capture header"
            return
        if len(buf) < 4:
            self.error = f"truncated: {len(buf)} bytes, shorter than a capture file header"
            return
        (magic,) = struct.unpack_from("<I", buf, 0)
        if magic in _PCAP_MAGICS:
            fmt = "pcap"
        elif magic == _PCAPNG_SHB:
            fmt = "pcapng"
        else:
            self.error = f"damaged: {_not_a_capture(buf[:8])}"
            return
        self.format = fmt
        prefix = b""   # what a chunk needs in front: pcap's file header, pcapng's SHB and IDBs
        if fmt == "pcap":
            if len(buf) < 24:
                self.error = f"truncated: pcap file header cut short ({len(buf)} of 24 bytes)"
                return
            prefix, buf = buf[:24], buf[24:]
        pending = buf  # bytes read, not yet handed out as whole records
        eof = self.error is not None or len(pending) + len(prefix) < CHUNK_BYTES
        order = "<"
        while True:
            data = prefix + pending
            if fmt == "pcap":
                cut, new_prefix = 24 + _whole_pcap_records(data, 24, magic), prefix
            else:
                cut, new_prefix, order = _whole_pcapng_blocks(data, len(prefix), prefix, order)
            end = len(data) if eof else cut
            if end > len(prefix):
                chunk = data if end == len(data) else data[:end]
                try:
                    reader: Any = PcapReader(memoryview(chunk)) if fmt == "pcap" else PcapngReader(memoryview(chunk))
                except CaptureError as e:
                    self.error = self.error or f"truncated: {e}"
                    return
                self.view = reader.view
                yield NEW_VIEW, 0, 0, 0
                yield from reader
                self.skipped += getattr(reader, "skipped", 0)
                if reader.error is not None:
                    # whole records only, unless at the end: an error here is the input's
                    self.error = self.error or self._where(reader.error)
                    return
            if eof:
                return
            prefix, pending = new_prefix, data[cut:]
            more = self._read(CHUNK_BYTES)
            eof = self.error is not None or len(more) < CHUNK_BYTES
            pending += more

    def _where(self, error: str) -> str:
        """A chunk reader's message (its offsets are the chunk's) with where the input was."""
        name = "stdin" if self.path == STDIN else "the file"
        return f"{error} (offset in a decompressed chunk; {self.position} bytes of {name} read)"


def _whole_pcap_records(data: bytes, off: int, magic: int) -> int:
    """Bytes of whole records in ``data`` from ``off`` (a record cut by the chunk's end is left)."""
    from receivers.pcap import _PCAP_MAGICS, MAX_CAPLEN
    order = _PCAP_MAGICS[magic][0]
    cap = struct.Struct(order + "I").unpack_from
    start, size = off, len(data)
    while off + 16 <= size:
        (caplen,) = cap(data, off + 8)
        if caplen > MAX_CAPLEN:  # damaged: hand it all to the reader, which says so
            return size - start
        end = off + 16 + caplen
        if end > size:
            break
        off = end
    return off - start


def _whole_pcapng_blocks(data: bytes, off: int, prefix: bytes, order: str) -> tuple[int, bytes, str]:
    """(end of the whole blocks of ``data`` from ``off``, the prefix the rest needs, byte order).

    The prefix is the section's state: the last section header block and the interface
    descriptions after it (``prefix`` extended by this chunk's, or a new section's).
    """
    size = len(data)
    u32 = struct.Struct(order + "I").unpack_from
    parts = [prefix]
    while off + 12 <= size:
        (btype,) = struct.unpack_from("<I", data, off)  # the SHB type reads the same either way
        if btype == _PCAPNG_SHB:
            (bom,) = struct.unpack_from("<I", data, off + 8)
            order = "<" if bom == 0x1A2B3C4D else ">"
            u32 = struct.Struct(order + "I").unpack_from
        else:
            (btype,) = u32(data, off)
        (blen,) = u32(data, off + 4)
        if blen < 12 or blen & 3:  # damaged: hand it all to the reader, which says so
            return size, b"".join(parts), order
        if off + blen > size:
            break
        if btype == _PCAPNG_SHB:
            parts = [data[off:off + blen]]
        elif btype == _BT_IDB:
            parts.append(data[off:off + blen])
        off += blen
    return off, b"".join(parts), order


def open_stream(path: str, stdin: IO[bytes] | None = None) -> StreamReader:
    """A ``StreamReader`` over ``path`` (``"-"``: standard input, or ``stdin`` when given)."""
    return StreamReader(path, stdin)


def stream_head(path: str, n: int = 32, stdin: IO[bytes] | None = None) -> bytes:
    """The first ``n`` bytes of the capture in ``path`` once decompressed, without consuming
    standard input (its buffered bytes are peeked at and decompressed on the side).

    Raises:
        OSError: the file cannot be read.
    """
    if path == STDIN:
        src: Any = stdin if stdin is not None else sys.stdin.buffer
        raw = bytes(src.peek(INPUT_BYTES)) if hasattr(src, "peek") else b""
    else:
        with open(path, "rb") as f:
            raw = f.read(INPUT_BYTES)
    kind = sniff(raw)
    if kind is None:
        return raw[:n]
    try:
        return bytes(_decompressor(kind).decompress(raw, n))
    except Exception:  # damaged from the start: the caller says it is no capture
        return b""
