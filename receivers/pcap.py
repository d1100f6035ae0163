"""Capture-file replay: pcap/pcapng readers over ``mmap`` and the ``pcap`` receiver.

Contract (readers): ``open_capture(path)`` (or ``reader_for(buffer)``) returns a reader
whose iteration yields ``(linktype, ts_ns, off, end)`` per packet, the frame being
``reader.view[off:end]`` (a memoryview of the mapped file: nothing is copied). A damaged
or cut file ends the iteration early with ``reader.error`` set to a message naming the
offset; packets before the damage are all yielded. Readers never raise while iterating.

- pcap: both byte orders, µs and ns magics; the link type is the header's low 16 bits.
- pcapng: SHB in either byte order (a new SHB starts a new section and interface list),
  IDB with ``if_tsresol`` (10^-n or 2^-n) and ``if_tsoffset``, EPB, SPB, the obsolete
  Packet Block; other blocks (NRB, ISB, DSB, custom, unknown) are skipped by length.
  Several interfaces each keep their own link type and resolution.

Contract (receiver ``pcap``): ``PcapReceiver(id, config, next)``; ``start()`` runs a
reader thread that decodes packets (receivers/packet.py), reassembles TCP
(receivers/tcp_reassembly.py) and calls ``next.consume_events(batch)`` with ordered
lists of ``TcpEvent`` whose payloads are views into the mapped files, then sets
``done``. Mapped files are never closed explicitly: views handed downstream keep them
alive and the garbage collector unmaps them once the last view is gone. ``stats`` holds
packets, bytes, connections, events and drops by reason; the same counts go to the
self-metrics in service/telemetry.py.

Options (``receivers: pcap:``):
- ``path``: a file, a glob or a directory (its .pcap/.pcapng/.cap/.dmp files by name); required.
  Files are replayed in name order through one reassembler, so a connection may span rotated files.
- ``rate`` (default = 0): 0 as fast as possible, 1.0 real time, 2.0 twice as fast.
- ``loop`` (default = false): replay again until shutdown; capture time keeps moving forward.
- ``filter.ports`` / ``filter.addresses`` (default = all): keep packets with either port listed /
  either address in one of the addresses or CIDRs; the rest count as drop ``filtered``.
- ``max_connections`` (65536), ``max_buffered_bytes_per_connection`` (1 MiB),
  ``max_buffered_bytes_total`` (64 MiB), ``idle_timeout`` (300s): reassembly limits.
- ``batch_size`` (256): events per ``consume_events`` call.
- ``udp_ports`` (default = [53]): UDP datagrams with either port listed are passed on, one
  ``DATAGRAM`` event each (receivers/udp.py); other UDP counts as drop ``udp_port``; ``[]``
  passes no UDP.
- ``progress`` (default = auto): a tqdm bar on stderr; auto shows it only when stderr is a terminal.

    receivers:
      pcap:
        path: /var/captures/*.pcapng
        filter: {ports: [80, 8080], addresses: [10.0.0.0/8]}
        idle_timeout: 5m

Drop reasons: the decoder's (``truncated``, ``not_ip``, ``not_tcp``, ``ip_fragment``,
``malformed``, ``unsupported_linktype``), ``filtered``, ``udp_port``, ``udp_empty``, reassembly's (``retransmission``,
``out_of_window``, ``after_close``), ``bad_block`` (a pcapng packet block naming no
interface), ``truncated_file``, ``unreadable_file``, ``downstream_error``. Bytes given up
as GAPs are in ``stats["gap_bytes"]`` by reason; early connection ends in
``stats["evicted"]`` and ``wirespan_connections_evicted``.
"""

from __future__ import annotations

import glob
import ipaddress
import logging
import mmap
import os
import re
import struct
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar, Literal
from zlib import crc32

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from receivers.capture_stream import NEW_VIEW
from receivers.packet import LINK_DECODERS, UDP, link_decoder
from receivers.tcp_reassembly import ReassemblyLimits, TcpReassembler, c_scan
from receivers.tls import DSB_TLS_KEYLOG, KeyLog, TlsLayer
from receivers.udp import DEFAULT_UDP_PORTS, UdpDatagrams
from service.component import ComponentConfig, Receiver
from service.log import describe
from service.telemetry import CONNECTIONS_EVICTED, RECEIVER_ACCEPTED, RECEIVER_DROPPED

__all__ = ["CaptureError", "PcapReader", "PcapngReader", "PcapReceiver", "capture_files", "check_capture",
           "open_capture", "reader_for"]

log = logging.getLogger("wirespan.receivers.pcap")

# pcap magic numbers, as read little-endian from the first 4 bytes -> (byte order, ns per tick).
_PCAP_MAGICS = {
    0xA1B2C3D4: ("<", 1000),   # little-endian file, microseconds
    0xD4C3B2A1: (">", 1000),   # big-endian file, microseconds
    0xA1B23C4D: ("<", 1),      # little-endian file, nanoseconds
    0x4D3CB2A1: (">", 1),      # big-endian file, nanoseconds
}
_PCAPNG_SHB = 0x0A0D0D0A
_PCAPNG_BOM = 0x1A2B3C4D
_BT_IDB, _BT_OPB, _BT_SPB, _BT_EPB = 1, 2, 3, 6
_BT_DSB = 0x0A  #: Decryption Secrets Block (secrets type, length, data): ``editcap --inject-secrets``
#: Where a PcapngReader created without ``on_secrets`` (inside a stream reader) hands a DSB's
#: secrets: the receiver replaying in this thread sets ``cb`` (secrets type, bytes).
_dsb_local = threading.local()
_OPT_IF_TSRESOL, _OPT_IF_TSOFFSET = 9, 14

#: A record claiming more than this is corrupt (libpcap refuses captured lengths above its
#: 256 KiB maximum snapshot length for most link types; we allow far more, but not gigabytes).
MAX_CAPLEN = 64 << 20

_U32LE = struct.Struct("<I")
_U32BE = struct.Struct(">I")


class CaptureError(Exception):
    """The file is not a capture we can read (bad magic, empty, unreadable)."""


#: Leading bytes of compressed files (someone's ``capture.pcap.gz``): named, so the error says
#: what the file is and what to do, instead of showing a magic number.
_COMPRESSED = ((b"\x1f\x8b", "gzip", "gunzip -k"), (b"\x28\xb5\x2f\xfd", "zstd", "zstd -d"),
               (b"\xfd7zXZ\x00", "xz", "xz -dk"), (b"BZh", "bzip2", "bunzip2 -k"),
               (b"\x04\x22\x4d\x18", "lz4", "lz4 -d"))


def _not_a_capture(head: bytes) -> str:
    """Why bytes starting with ``head`` are no capture, in words (a compressed file is named)."""
    for magic, name, cmd in _COMPRESSED:
        if head.startswith(magic):
            return f"{name}-compressed, not a capture; decompress it first ({cmd} FILE)"
    shown = "".join(chr(b) if 32 <= b < 127 else "." for b in head[:8])
    return f"not a pcap or pcapng file (it starts with {head[:4].hex(' ')}, {shown!r})"


def check_capture(path: str | os.PathLike[str]) -> None:
    """Raise ``CaptureError`` with one line of why ``path`` cannot be replayed (unreadable,
    empty, compressed, not a capture, header cut); return if its header is a capture's.

    Reads only the first bytes, so a receiver can refuse to start (and ``replay`` exit 1)
    before anything runs, rather than reporting zero packets as a success.
    """
    from receivers.capture_stream import STDIN, sniff, stream_head
    kind = None
    try:
        if str(path) == STDIN:
            head = stream_head(STDIN)
            if not head:
                raise CaptureError("standard input is empty or not a capture")
        else:
            with open(path, "rb") as f:
                head = f.read(32)
            kind = sniff(head)
            if kind is not None:  # compressed: what counts is the capture inside
                head = stream_head(str(path))
                if not head:
                    raise CaptureError(f"{kind}-compressed, but it holds no data or is damaged")
    except OSError as e:
        raise CaptureError(f"cannot read: {e.strerror or e}") from None
    try:
        _check_head(head)
    except CaptureError as e:
        if kind is None:
            raise
        raise CaptureError(f"{kind}-compressed, and what it holds is {e}") from None


def _check_head(head: bytes) -> None:
    if not head:
        raise CaptureError("empty file (0 bytes), not a capture")
    if len(head) < 4:
        raise CaptureError(f"{len(head)} bytes long, shorter than a capture file header")
    (magic,) = _U32LE.unpack_from(head, 0)
    if magic in _PCAP_MAGICS:
        if len(head) < 24:
            raise CaptureError(f"pcap file header cut short ({len(head)} of 24 bytes)")
    elif magic == _PCAPNG_SHB:
        if len(head) < 28:
            raise CaptureError(f"pcapng section header cut short ({len(head)} of 28 bytes)")
    else:
        raise CaptureError(_not_a_capture(head))


class PcapReader:
    """Classic pcap records; iterate for ``(linktype, ts_ns, off, end)``."""

    format = "pcap"

    def __init__(self, view: memoryview) -> None:
        self.view = view
        self.error: str | None = None
        if len(view) < 24:
            raise CaptureError("pcap header truncated")
        (magic,) = _U32LE.unpack_from(view, 0)
        order, self._tick = _PCAP_MAGICS[magic]
        self.big_endian = order == ">"
        self._hdr = struct.Struct(order + "HHiIII")
        self._rec = struct.Struct(order + "IIII")
        _vmaj, _vmin, _zone, _sig, self.snaplen, lt = self._hdr.unpack_from(view, 4)
        self.linktype = lt & 0xFFFF  # upper bits: FCS length flags (draft-ietf-opsawg-pcap)

    def __iter__(self) -> Iterator[tuple[int, int, int, int]]:
        return self.records(24)

    def records(self, off: int) -> Iterator[tuple[int, int, int, int]]:
        """The records from file offset ``off`` (a record's start): where the C replay loop
        (receivers/_fastpath.c) stopped at a damaged record, this says what is wrong."""
        view, size, lt, tick = self.view, len(self.view), self.linktype, self._tick
        unpack = self._rec.unpack_from
        while off + 16 <= size:
            sec, frac, caplen, _orig = unpack(view, off)
            end = off + 16 + caplen
            if end > size or caplen > MAX_CAPLEN:
                if caplen > MAX_CAPLEN:
                    self.error = f"corrupt record at offset {off}: captured length {caplen} over {MAX_CAPLEN}"
                else:
                    self.error = f"truncated packet record at offset {off}: file ends at {size}"
                return
            yield lt, sec * 1_000_000_000 + frac * tick, off + 16, end
            off = end
        if off != size:
            self.error = f"truncated record header at offset {off}: file ends at {size}"


class _Iface:
    __slots__ = ("div", "fast", "linktype", "mul", "offset_ns", "shift", "snaplen")

    def __init__(self, linktype: int, snaplen: int, resol: int, offset_s: int) -> None:
        self.linktype = linktype
        self.snaplen = snaplen
        self.mul, self.div, self.shift = 1000, 1, 0  # default resolution: microseconds
        if resol & 0x80:  # 2^-n seconds
            self.mul, self.div, self.shift = 1_000_000_000, 1, resol & 0x7F
        elif resol <= 9:
            self.mul = 10 ** (9 - resol)
        else:
            self.mul, self.div = 1, 10 ** (resol - 9)
        self.offset_ns = offset_s * 1_000_000_000
        self.fast = self.shift == 0 and self.div == 1 and not self.offset_ns  # ts = ticks * mul

    def ts(self, ticks: int) -> int:
        return ((ticks * self.mul) >> self.shift) // self.div + self.offset_ns


class PcapngReader:
    """pcapng blocks; iterate for ``(linktype, ts_ns, off, end)``."""

    format = "pcapng"

    def __init__(self, view: memoryview) -> None:
        self.view = view
        self.error: str | None = None
        if len(view) < 28:
            raise CaptureError("pcapng section header truncated")
        self.interfaces: list[_Iface] = []
        #: Called with (secrets type, data) for each Decryption Secrets Block, in file order.
        self.on_secrets: Any = None

    def _options(self, view: memoryview, off: int, end: int, order: str) -> dict[int, memoryview]:
        """Option TLVs of a block body (code, length, value padded to 32 bits)."""
        opts: dict[int, memoryview] = {}
        hdr = struct.Struct(order + "HH")
        while off + 4 <= end:
            code, ln = hdr.unpack_from(view, off)
            off += 4
            if code == 0 or off + ln > end:
                break
            opts[code] = view[off:off + ln]
            off += (ln + 3) & ~3
        return opts

    def __iter__(self) -> Iterator[tuple[int, int, int, int]]:
        view, size = self.view, len(self.view)
        off = 0
        ifaces = self.interfaces
        last_ts = 0
        order = "<"
        bh = struct.Struct("<II")
        epb = struct.Struct("<IIIII")
        tl = _U32LE.unpack_from
        while off < size:
            if off + 12 > size:
                self.error = f"truncated block header at offset {off}: file ends at {size}"
                return
            btype, blen = bh.unpack_from(view, off)
            if btype == _PCAPNG_SHB:  # palindromic: reads the same in either byte order
                (bom,) = _U32LE.unpack_from(view, off + 8)
                if bom == _PCAPNG_BOM:
                    order = "<"
                elif bom == 0x4D3C2B1A:
                    order = ">"
                else:
                    self.error = f"bad section header byte-order magic at offset {off}"
                    return
                bh = struct.Struct(order + "II")
                epb = struct.Struct(order + "IIIII")
                tl = struct.Struct(order + "I").unpack_from
                ifaces.clear()
                btype, blen = bh.unpack_from(view, off)
            if blen < 12 or blen & 3:
                self.error = f"corrupt block length {blen} at offset {off}"
                return
            bend = off + blen
            if bend > size:
                self.error = f"truncated block (type {btype:#x}) at offset {off}: file ends at {size}"
                return
            body_end = bend - 4
            if tl(view, body_end)[0] != blen:  # the trailing copy of the length must agree
                self.error = f"corrupt block (type {btype:#x}) at offset {off}: trailing length differs"
                return
            if btype == _BT_EPB:
                if off + 28 <= body_end:
                    ifid, hi, lo, caplen, _orig = epb.unpack_from(view, off + 8)
                    data = off + 28
                    if ifid < len(ifaces) and data + caplen <= body_end:
                        ifc = ifaces[ifid]
                        t = (hi << 32) | lo
                        last_ts = t * ifc.mul if ifc.fast else ifc.ts(t)
                        yield ifc.linktype, last_ts, data, data + caplen
                    else:
                        self._skipped("epb", off)
                else:
                    self._skipped("epb", off)
            elif btype == _BT_IDB:
                if off + 16 <= body_end:
                    lt, _res, snap = struct.unpack_from(order + "HHI", view, off + 8)
                    opts = self._options(view, off + 16, body_end, order)
                    resol = opts.get(_OPT_IF_TSRESOL)
                    tsoff = opts.get(_OPT_IF_TSOFFSET)
                    ifaces.append(_Iface(
                        lt, snap, resol[0] if resol is not None and len(resol) >= 1 else 6,
                        struct.unpack_from(order + "q", tsoff)[0] if tsoff is not None and len(tsoff) >= 8 else 0))
                else:
                    self.error = f"truncated interface description block at offset {off}"
                    return
            elif btype == _BT_SPB:
                if ifaces and off + 12 <= body_end:
                    (orig,) = struct.unpack_from(order + "I", view, off + 8)
                    data = off + 12
                    caplen = min(orig, body_end - data)
                    if ifaces[0].snaplen:
                        caplen = min(caplen, ifaces[0].snaplen)
                    # An SPB has no timestamp: it gets the previous packet's (0 before any).
                    yield ifaces[0].linktype, last_ts, data, data + caplen
                else:
                    self._skipped("spb", off)
            elif btype == _BT_OPB:
                if off + 28 <= body_end:
                    ifid, _drops, hi, lo, caplen, _orig = struct.unpack_from(order + "HHIIII", view, off + 8)
                    data = off + 28
                    if ifid < len(ifaces) and data + caplen <= body_end:
                        ifc = ifaces[ifid]
                        last_ts = ifc.ts((hi << 32) | lo)
                        yield ifc.linktype, last_ts, data, data + caplen
                    else:
                        self._skipped("opb", off)
                else:
                    self._skipped("opb", off)
            elif btype == _BT_DSB:
                cb = self.on_secrets or getattr(_dsb_local, "cb", None)
                if cb is not None and off + 16 <= body_end:
                    stype, slen = struct.unpack_from(order + "II", view, off + 8)
                    if off + 16 + slen <= body_end:
                        cb(stype, bytes(view[off + 16:off + 16 + slen]))  # a copy: the secrets outlive the view
            # Anything else (NRB, ISB, custom, unknown): skipped by its length.
            off = bend

    skipped = 0

    def _skipped(self, what: str, off: int) -> None:
        # A malformed packet block is skipped; the count shows up as drop reason "bad_block".
        self.skipped += 1


def reader_for(buf: Any) -> PcapReader | PcapngReader:
    """A reader over a buffer (bytes, mmap, memoryview); raises ``CaptureError`` if it is no capture."""
    view = memoryview(buf)
    if view.ndim != 1 or view.itemsize != 1:
        view = view.cast("B")
    if len(view) < 4:
        raise CaptureError("not a capture file: shorter than a header")
    (magic,) = _U32LE.unpack_from(view, 0)
    if magic in _PCAP_MAGICS:
        return PcapReader(view)
    if magic == _PCAPNG_SHB:
        return PcapngReader(view)
    raise CaptureError(_not_a_capture(bytes(view[:8])))


def open_capture(path: str | os.PathLike[str]) -> Any:
    """Map ``path`` read-only and return its reader; for a compressed file or ``-``
    (standard input), a ``StreamReader`` (receivers/capture_stream.py: streamed, whose
    ``view`` changes between chunks).

    The mapping is not closed here: the reader's view and every payload view handed on
    keep it alive; it is unmapped when the last of them is collected.
    """
    from receivers.capture_stream import STDIN, open_stream, sniff
    if str(path) == STDIN:
        return open_stream(STDIN)
    with open(path, "rb") as f:
        if sniff(f.read(6)) is not None:
            return open_stream(str(path))
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            raise CaptureError("empty file (0 bytes), not a capture")
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        mm.madvise(mmap.MADV_SEQUENTIAL)
    except (AttributeError, OSError):
        pass
    return reader_for(mm)


#: Let go of the mapped pages already read every this many bytes, keeping the last
#: DROP_MARGIN_BYTES (payloads still pending in the stage are likeliest there).
DROP_BEHIND_BYTES = 1 << 20
DROP_MARGIN_BYTES = 256 << 10
_PAGE = mmap.PAGESIZE


def _drop_behind(mm: mmap.mmap, start: int, off: int) -> int:
    """Drop the mapped pages of ``[start, off - DROP_MARGIN_BYTES)`` from this process (MADV_DONTNEED).

    Read pages of a mapped file count in RSS until unmapped, so a looping replay of a
    large capture would show RSS growing by the file's size each pass and falling back.
    The data is not lost: a payload view still pending in the protocols stage faults its
    page back in from the file. Returns the new start.
    """
    end = (off - DROP_MARGIN_BYTES) & ~(_PAGE - 1)
    if end <= start:
        return start
    try:
        mm.madvise(mmap.MADV_DONTNEED, start, end - start)
    except (AttributeError, OSError, ValueError):
        return off  # not supported here: skip this stretch
    return end


# ---------------------------------------------------------------------------
# The receiver
# ---------------------------------------------------------------------------
_DURATION = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*(ns|us|µs|ms|s|m|h)?\s*$")
_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}

DEFAULT_BATCH = 256
#: The progress bar (tqdm's fields): position, rate, the postfix's packets/s, ETA (remaining time).
PROGRESS_FORMAT = "{desc}: {percentage:3.0f}%|{bar}| {n_fmt}B of {total_fmt}B, {rate_fmt}{postfix}, ETA {remaining}"
PROGRESS_FORMAT_UNSIZED = "{desc}: {n_fmt}B read in {elapsed}, {rate_fmt}{postfix}"
#: Packets between looks at shutdown/progress when no batch filled up meanwhile.
CHECK_EVERY = 4096
CAPTURE_SUFFIXES = (".pcap", ".pcapng", ".cap", ".dmp")
#: ... also compressed (``.pcap.gz``, ``.pcapng.zst``, ``.cap.xz``, ``.pcap.bz2``): streamed.
COMPRESSED_SUFFIXES = (".gz", ".zst", ".zstd", ".xz", ".bz2")


def is_capture_name(name: str) -> bool:
    """Whether a directory's file ``name`` is one the receiver replays (by its suffixes)."""
    n = name.lower()
    for c in COMPRESSED_SUFFIXES:
        if n.endswith(c):
            n = n[:-len(c)]
            break
    return n.endswith(CAPTURE_SUFFIXES)


def _seconds(v: Any) -> Any:
    if isinstance(v, str):
        m = _DURATION.match(v)
        if not m:
            raise ValueError(f"not a duration: {v!r} (e.g. 300s, 5m, 250ms)")
        return float(m.group(1)) * _UNITS[m.group(2)]
    return v


class FilterConfig(ComponentConfig):
    #: Keep packets whose source or destination port is listed (empty = all ports).
    ports: list[int] = Field(default_factory=list)
    #: Keep packets whose source or destination address is in one of these addresses/CIDRs (empty = all).
    addresses: list[str] = Field(default_factory=list)

    @field_validator("ports")
    @classmethod
    def _ports(cls, v: list[int]) -> list[int]:
        for p in v:
            if not 0 <= p <= 65535:
                raise ValueError(f"port out of range: {p}")
        return v

    @field_validator("addresses")
    @classmethod
    def _addresses(cls, v: list[str]) -> list[str]:
        for a in v:
            ipaddress.ip_network(a, strict=False)  # raises ValueError with the culprit
        return v


#: 2^32 / golden ratio: multiplying by it spreads any stride of inputs over the top bits
#: (Fibonacci hashing, Knuth 6.4), which pick the shard.
_GOLDEN32 = 0x9E3779B1


def shard_of(src: bytes, dst: bytes, sport: int, dport: int, count: int) -> int:
    """The shard (0..count-1) of a connection, the same for both directions.

    Both addresses and both ports go in (CRC-32 of each address, XORed, so direction does
    not matter), then a multiplicative mix whose top bits choose. ``(sport ^ dport) % count``
    used to put every connection with even client ports to an even server port in shard 0.
    """
    x = crc32(src) ^ crc32(dst) ^ sport ^ dport
    return (((x * _GOLDEN32) & 0xFFFFFFFF) * count) >> 32


class ShardConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    index: int = Field(ge=0)
    count: int = Field(ge=1, le=256)

    @model_validator(mode="after")
    def _in_range(self) -> ShardConfig:
        if self.index >= self.count:
            raise ValueError(f"shard index {self.index} must be below count {self.count}")
        return self


class PcapConfig(ComponentConfig):
    #: A capture file, a glob (``/var/cap/*.pcap``) or a directory (its .pcap/.pcapng/.cap files, by name).
    path: str
    #: Replay speed: 0 = as fast as possible, 1.0 = real time, 2.0 = twice as fast.
    rate: float = Field(default=0.0, ge=0.0)
    #: Replay the files again and again until shutdown (timestamps keep increasing).
    loop: bool = False
    filter: FilterConfig = Field(default_factory=FilterConfig)
    #: A BPF filter expression (tcpdump's language: ``tcp port 8080 and host 10.0.0.5``), run by
    #: libpcap on each frame as ``pcap_offline_filter`` does; packets it rejects count as ``filtered``.
    bpf_filter: str | None = None
    max_connections: int = Field(default=ReassemblyLimits.max_connections, ge=1)
    max_buffered_bytes_per_connection: int = Field(default=ReassemblyLimits.max_buffered_bytes_per_connection, ge=0)
    max_buffered_bytes_total: int = Field(default=ReassemblyLimits.max_buffered_bytes_total, ge=0)
    #: Idle connections are expired after this long in capture time (seconds or "5m", "300s").
    idle_timeout: float = Field(default=ReassemblyLimits.idle_timeout, gt=0)
    #: Events per ``consume_events`` call.
    batch_size: int = Field(default=DEFAULT_BATCH, ge=1)
    #: UDP datagrams with either port in this list become DATAGRAM events (receivers/udp.py);
    #: the rest count as ``udp_port``. ``[]`` passes no UDP.
    udp_ports: list[int] = Field(default_factory=lambda: list(DEFAULT_UDP_PORTS))
    #: A progress bar on stderr: "auto" (or null) = only when stderr is a terminal.
    progress: bool | Literal["auto"] | None = "auto"
    #: An NSS key log (``SSLKEYLOGFILE``) to decrypt TLS with (receivers/tls.py); pcapng
    #: Decryption Secrets Blocks are used without it.
    keylog_file: str | None = None
    #: Follow only the connections of one shard, ``index`` of ``count`` (``shard_of``: addresses and ports,
    #: the same for both directions): ``wirespan replay --workers N`` runs N shards in parallel.
    shard: ShardConfig | None = None

    _idle = field_validator("idle_timeout", mode="before")(classmethod(lambda cls, v: _seconds(v)))

    @field_validator("bpf_filter")
    @classmethod
    def _compiles(cls, v: str | None) -> str | None:
        if v is not None and v.strip():
            from receivers.bpf_filter import compile_filter
            compile_filter(v, 1)  # FilterError (a ValueError) with libpcap's message; Ethernet, the usual case
        return v if v is not None and v.strip() else None


class _AddrFilter:
    """Port/address filter with a bounded per-address decision cache."""

    __slots__ = ("cache", "nets", "ports")

    def __init__(self, cfg: FilterConfig) -> None:
        self.ports = frozenset(cfg.ports)
        self.nets = [ipaddress.ip_network(a, strict=False) for a in cfg.addresses]
        self.cache: dict[bytes, bool] = {}

    def _addr_ok(self, a: bytes) -> bool:
        ok = self.cache.get(a)
        if ok is None:
            ip = ipaddress.ip_address(bytes(a))
            ok = any(ip in n for n in self.nets)
            if len(self.cache) > 65536:
                self.cache.clear()
            self.cache[a] = ok
        return ok

    def keep(self, src: bytes, dst: bytes, sport: int, dport: int) -> bool:
        if self.ports and sport not in self.ports and dport not in self.ports:
            return False
        if self.nets and not (self._addr_ok(src) or self._addr_ok(dst)):
            return False
        return True


def capture_files(path: str) -> list[str]:
    """The files ``path`` names, as the receiver replays them: itself, a glob's matches or a
    directory's capture files, in name order (empty if none)."""
    if path == "-":
        return [path]  # standard input
    p = Path(path)
    if p.is_dir():
        return sorted(str(f) for f in p.iterdir() if f.is_file() and is_capture_name(f.name))
    if glob.has_magic(path):
        return sorted(f for f in glob.glob(path) if os.path.isfile(f))
    return [path] if p.is_file() else []


_EMPTY = memoryview(b"")
_LT_ETHERNET = 1
_SCAN_END = 2  #: c_scan's status: the end of the records, or a damaged one


class PcapReceiver(Receiver):
    """Replays capture files as TCP events (see the module docstring)."""

    type: ClassVar[str] = "pcap"
    finite: ClassVar[bool] = True
    Config = PcapConfig

    def __init__(self, id: str, config: PcapConfig | dict, next: Any = None) -> None:
        if isinstance(config, dict):
            config = PcapConfig(**config)
        super().__init__(id, config, next)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.limits = ReassemblyLimits(
            max_connections=config.max_connections,
            max_buffered_bytes_per_connection=config.max_buffered_bytes_per_connection,
            max_buffered_bytes_total=config.max_buffered_bytes_total,
            idle_timeout=config.idle_timeout,
        )
        self.reassembler = TcpReassembler(self.limits)
        self.udp = UdpDatagrams(config.udp_ports)
        self.files: list[str] = []
        self.errors: list[str] = []
        #: Files that ended early (cut short or damaged), one message each saying where; what
        #: came before was replayed. ``wirespan replay``/``run`` exit 3 on these.
        self.truncated: list[str] = []
        #: Files that could not be read at all once the replay ran (start() refuses those it sees first).
        self.unreadable: list[str] = []
        self._drops: dict[str, int] = {}
        self._published: dict[tuple[str, str], int] = {}
        self._packets = 0
        self._bytes = 0
        self._events = 0
        self._pace: tuple[float | None, int | None] = (None, None)
        self._filter = _AddrFilter(config.filter) if (config.filter.ports or config.filter.addresses) else None
        #: TLS record layer (receivers/tls.py): keys from keylog_file (loaded at start) and DSBs
        self.tls = TlsLayer()

    # -------------------------------------------------------------- lifecycle
    def _resolve_files(self) -> None:
        self.files = capture_files(self.config.path)
        if not self.files:
            raise FileNotFoundError(f"receivers::{self.id}::path: no capture file matches {self.config.path!r}")

    def _load_keylog(self) -> None:
        """Read ``keylog_file`` (a start error when it cannot be read at all)."""
        path = self.config.keylog_file
        if path and self.tls.keylog.path is None:
            self.tls.keylog = kl = KeyLog(path)
            if kl.stats["bad_lines"]:
                log.warning("receiver %s: key log %s: %d lines not understood (of %d), skipped", self.id, path,
                            kl.stats["bad_lines"], kl.stats["lines"])

    def _on_secrets(self, stype: int, data: bytes) -> None:
        if stype == DSB_TLS_KEYLOG:
            self.tls.add_secrets(data)
        else:
            self._drop("unsupported_secrets")

    def start(self) -> None:
        self._load_keylog()
        self._resolve_files()
        for path in self.files:  # an unreadable input is a start error, not "0 packets" and success
            try:
                check_capture(path)
            except CaptureError as e:
                raise CaptureError(f"{path}: {e}") from None
        self._thread = threading.Thread(target=self._run, name=f"receiver-{self.id}", daemon=True)
        self._thread.start()

    def shutdown(self) -> None:
        self._stop.set()
        t = self._thread
        if t is not None and t is not threading.current_thread():
            t.join(timeout=10)

    def run(self) -> None:
        """Replay in the calling thread (what ``start()``'s thread runs): for one-shot tools and tests."""
        self._load_keylog()
        self._resolve_files()
        self._run()

    def wait(self, timeout: float | None = None) -> bool:
        return self.done.wait(timeout)

    # -------------------------------------------------------------- stats
    @property
    def stats(self) -> dict[str, Any]:
        r = self.reassembler
        drops = dict(self._drops)
        for k, v in dict(r.drops).items():  # copied first: the reader thread may add keys meanwhile
            drops[k] = drops.get(k, 0) + v
        for k, v in dict(self.udp.drops).items():
            drops[k] = drops.get(k, 0) + v
        for k, v in dict(self.tls.drops).items():
            drops[k] = drops.get(k, 0) + v
        return {
            "packets": self._packets,
            "bytes": self._bytes,
            "connections": r.stats["connections"],
            "events": self._events,
            "datagrams": self.udp.datagrams,
            "drops": drops,
            "gap_bytes": dict(r.gaps),
            "evicted": dict(r.evictions),
            "errors": list(self.errors),
            "truncated": list(self.truncated),
            "tls": {**self.tls.stats, "keylog": dict(self.tls.keylog.stats)},
        }

    def _publish(self) -> None:
        """Push counter deltas to the self-metrics (per batch, not per packet)."""
        pub = self._published
        r = self.reassembler
        for source, counts in (("receiver", self._drops), ("reassembly", r.drops), ("evicted", r.evictions),
                               ("udp", self.udp.drops),
                               ("tls", self.tls.drops)):
            for reason, n in counts.items():
                key = (source, reason)
                delta = n - pub.get(key, 0)
                if delta:
                    pub[key] = n
                    if source == "evicted":
                        CONNECTIONS_EVICTED.labels(component=self.id, reason=reason).inc(delta)
                    else:
                        RECEIVER_DROPPED.labels(receiver=self.id, reason=reason).inc(delta)
        delta = self._events - pub.get(("accepted", ""), 0)
        if delta:
            pub[("accepted", "")] = self._events
            RECEIVER_ACCEPTED.labels(receiver=self.id).inc(delta)

    def _drop(self, reason: str, n: int = 1) -> None:
        self._drops[reason] = self._drops.get(reason, 0) + n

    def _flush_events(self) -> None:
        r = self.reassembler
        ev = r.events
        if not ev:
            return
        r.events = []
        ev = self.tls.process(ev)  # TLS connections' ciphertext -> plaintext; the rest as it is
        self._events += len(ev)
        bs = self.config.batch_size
        nxt = self.next
        if nxt is not None:
            for i in range(0, len(ev), bs):
                batch = ev[i:i + bs] if len(ev) > bs else ev
                try:
                    nxt.consume_events(batch)
                except Exception:
                    # A downstream bug must not stop the replay: count the batch as dropped, go on.
                    log.exception("receiver %s: downstream consume_events failed; %d events dropped",
                                  self.id, len(batch))
                    self._drop("downstream_error", len(batch))
        self._publish()

    # -------------------------------------------------------------- reader thread
    def _run(self) -> None:
        ts_shift = 0
        try:
            while not self._stop.is_set():
                first = last = None
                for path in self.files:
                    if self._stop.is_set():
                        break
                    span = self._replay(path, ts_shift)
                    if span is not None:
                        first = span[0] if first is None else first
                        last = span[1]
                self.reassembler.finish()
                self._flush_events()
                if not self.config.loop or first is None:
                    break
                # Next pass: shift capture time so it keeps moving forward.
                ts_shift += (last - first) + 1_000_000_000
        except Exception as e:  # a bug, not bad input: keep the pipeline alive, say what happened
            log.exception("receiver %s: replay failed", self.id)
            text = describe(e)
            self.errors.append(text if text.startswith("internal error") else f"internal error: {text}")
            self._drop("internal_error")
        finally:
            try:
                self._flush_events()
            except Exception:
                log.exception("receiver %s: downstream failed while flushing", self.id)
            self._publish()
            self.done.set()

    def _replay(self, path: str, ts_shift: int) -> tuple[int, int] | None:
        try:
            reader = open_capture(path)
        except (OSError, ValueError, CaptureError) as e:
            msg = f"{path}: cannot read capture: {e.strerror if isinstance(e, OSError) and e.strerror else e}"
            log.error("receiver %s: %s", self.id, msg)
            self.errors.append(msg)
            if msg not in self.unreadable:
                self.unreadable.append(msg)
            self._drop("unreadable_file")
            return None
        if isinstance(reader, PcapngReader):
            reader.on_secrets = self._on_secrets
        _dsb_local.cb = self._on_secrets  # pcapng read by a stream reader
        view = reader.view
        seg = self.reassembler.segment
        r = self.reassembler
        udp = self.udp.datagram
        flt = self._filter
        drops = self._drops
        decoders = dict(LINK_DECODERS)
        bs = self.config.batch_size
        stop = self._stop
        rate = self.config.rate
        shard = self.config.shard
        shard_count = shard.count if shard is not None and shard.count > 1 else 0
        shard_index = shard.index if shard is not None else 0
        streaming = getattr(reader, "streaming", False)  # compressed or stdin: ``view`` changes (NEW_VIEW)
        total = reader.size if streaming else len(view)
        bpf = None
        if self.config.bpf_filter:
            from receivers.bpf_filter import OfflineFilter
            bpf = OfflineFilter(self.config.bpf_filter)
            bpf.rebase(view)
        bar = self._progress_bar(path, total) if shard_index == 0 else None  # workers read it all: one bar
        # Pacing (rate > 0) is anchored once per run, so gaps between files and loop passes are kept too.
        wall0, ts0 = self._pace
        first: int | None = None
        last = 0
        packets = nbytes = 0  # not yet added to self._packets / self._bytes
        last_off = 0
        last_lt = -1
        dec = link_decoder(-1)
        mm = view.obj if isinstance(view.obj, mmap.mmap) else None
        dropped = 0  # pages of the file before this offset were let go (see _drop_behind)
        packets_before = self._packets

        def checkpoint(at: int, off: int) -> bool:
            """A flush point: events handed on, the progress bar moved, read pages let go;
            True when shutdown was asked for."""
            nonlocal last_off, dropped
            self._flush_events()
            if stop.is_set():
                return True
            if bar is not None and at - last_off > 1 << 20:
                bar.update(at - last_off)
                rate_pkts = (self._packets - packets_before) / max(1e-9, bar.format_dict["elapsed"])
                bar.set_postfix_str(f"{rate_pkts:,.0f} pkt/s", refresh=False)
                last_off = at
            if mm is not None and off - dropped >= DROP_BEHIND_BYTES:
                dropped = _drop_behind(mm, dropped, off)
            return False

        # The C loop (receivers/_fastpath.c) takes the common packet of a classic Ethernet
        # capture: record, frame and in-order segment (handshake and close included) in one
        # go. It stops at each flush point (as this loop does) and at every other packet, which
        # it hands back for the code below; so it runs only where that code has no per-packet
        # option to apply.
        fast = (c_scan is not None and reader.__class__ is PcapReader and reader.linktype == _LT_ETHERNET
                and bpf is None and flt is None and not shard_count and not rate and 0 <= ts_shift < 1 << 62)
        records: Any = reader
        try:
            if fast:
                pos = 24
                halves, touch, rstats, tick, big = r._halves, r._touch, r.stats, reader._tick, reader.big_endian
                lru, addr_cache, max_conns = r._lru, r._addr_cache, r.limits.max_connections
                eth = decoders.get(_LT_ETHERNET) or link_decoder(_LT_ETHERNET)
                while True:
                    if len(r.events) >= bs or packets >= CHECK_EVERY:
                        self._packets += packets
                        self._bytes += nbytes
                        packets = nbytes = 0
                        if checkpoint(pos, pos):
                            records = ()
                            break
                    status, pos, n, nb, t0, t1, slow = c_scan(view, pos, tick, big, ts_shift, halves, touch, r.events,
                                                              bs, CHECK_EVERY - packets, r._next_sweep, rstats,
                                                              lru, addr_cache, max_conns)
                    if n:
                        packets += n
                        nbytes += nb
                        if first is None:
                            first = t0
                        last = t1
                    if slow is None:
                        if status == _SCAN_END:  # the Python reader goes on there: says what is wrong, if anything
                            records = reader.records(pos)
                            break
                        continue
                    ts, off, end = slow  # counted, timed: the rest as in the loop below
                    try:
                        res = eth(view, off, end)
                    except (struct.error, ValueError, IndexError):
                        res = "malformed"
                    if res.__class__ is str:
                        if shard_index == 0:
                            drops[res] = drops.get(res, 0) + 1
                        continue
                    src, dst, sport, dport, seq, ack, flags, poff, pend = res
                    if flags == UDP:
                        uev = udp(src, sport, dst, dport, view[poff:pend], ts)
                        if uev is not None:
                            r.events.append(uev)
                        continue
                    seg(src, sport, dst, dport, seq, ack, flags, view[poff:pend] if pend > poff else _EMPTY, ts)
            for lt, ts, off, end in records:
                if lt == NEW_VIEW:  # a streamed input's next chunk of whole records
                    view = reader.view
                    if bpf is not None:
                        bpf.rebase(view)
                    continue
                # Hand events on in batches; look at shutdown and the progress bar at the same
                # points (at least every CHECK_EVERY packets, so a capture that yields no events
                # still stops promptly).
                if len(r.events) >= bs or packets >= CHECK_EVERY:
                    self._packets += packets
                    self._bytes += nbytes
                    packets = nbytes = 0
                    if checkpoint(reader.position if streaming else off, off):
                        break
                packets += 1
                nbytes += end - off
                ts += ts_shift
                if first is None:
                    first = ts
                last = ts
                if rate:
                    if wall0 is None:
                        wall0, ts0 = time.monotonic(), ts
                        self._pace = (wall0, ts0)
                    delay = wall0 + (ts - ts0) / 1e9 / rate - time.monotonic()
                    if delay > 0.001:
                        self._flush_events()
                        if stop.wait(delay):
                            break
                if bpf is not None and not bpf.keep(lt, off, end):
                    if shard_index == 0:  # every worker sees it: one of them counts it
                        drops["filtered"] = drops.get("filtered", 0) + 1
                    continue
                if lt != last_lt:  # pcapng interfaces may differ packet to packet
                    dec = decoders.get(lt)
                    if dec is None:
                        dec = decoders[lt] = link_decoder(lt)
                    last_lt = lt
                try:
                    res = dec(view, off, end)
                except (struct.error, ValueError, IndexError):  # never expected: decoders check lengths
                    res = "malformed"
                if res.__class__ is str:
                    if shard_index == 0:  # every worker sees it: one of them counts it
                        drops[res] = drops.get(res, 0) + 1
                    continue
                src, dst, sport, dport, seq, ack, flags, poff, pend = res
                if shard_count and shard_of(src, dst, sport, dport, shard_count) != shard_index:
                    continue  # another worker's connection: not a drop
                if flt is not None and not flt.keep(src, dst, sport, dport):
                    drops["filtered"] = drops.get("filtered", 0) + 1
                    continue
                if flags == UDP:  # a UDP datagram (packet.py): one event, no reassembly
                    uev = udp(src, sport, dst, dport, view[poff:pend], ts)
                    if uev is not None:
                        r.events.append(uev)
                    continue
                seg(src, sport, dst, dport, seq, ack, flags, view[poff:pend] if pend > poff else _EMPTY, ts)
        except ValueError as e:  # FilterError: the expression does not apply to a link type of this file
            if bpf is None or not e.__class__.__name__ == "FilterError":
                raise
            msg = f"{path}: bpf_filter: {e}; the file's remaining packets were not replayed"
            log.error("receiver %s: %s", self.id, msg)
            self.errors.append(msg)
        finally:
            self._packets += packets
            self._bytes += nbytes
            if bpf is not None:
                bpf.close()
            if bar is not None:
                bar.update(max(0, total - last_off))
                bar.close()
        if getattr(reader, "skipped", 0) and shard_index == 0:  # every worker reads the file: one counts
            self._drop("bad_block", reader.skipped)
        if reader.error:
            how = "cut short" if reader.error.startswith("truncated") else "damaged"
            msg = (f"{path}: {how}: {reader.error}; the {self._packets - packets_before} packets "
                   "before it were replayed")
            # info: the command that ran the replay reports it as its error (exit 3) when done
            log.info("receiver %s: %s", self.id, msg)
            self.errors.append(msg)
            if msg not in self.truncated:  # a looping replay meets the same cut every pass
                self.truncated.append(msg)
            if shard_index == 0:
                self._drop("truncated_file")
        self._flush_events()
        return None if first is None else (first, last)

    def _progress_bar(self, path: str, total: int) -> Any:
        show = self.config.progress
        if show is None or show == "auto":
            show = sys.stderr.isatty()
        if not show:
            return None
        try:
            from tqdm import tqdm
        except ImportError:
            return None
        # Said in words: the rate (file bytes and, as postfix, packets a second) and the ETA. A
        # stream of unknown size (standard input) has no ETA: bytes read and the rate.
        fmt = (PROGRESS_FORMAT if total else PROGRESS_FORMAT_UNSIZED)
        return tqdm(total=total or None, unit="B", unit_scale=True, desc=os.path.basename(path) or path,
                    file=sys.stderr, leave=False, bar_format=fmt)
