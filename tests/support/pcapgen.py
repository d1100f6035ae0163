"""A small writer of synthetic pcap/pcapng captures for tests and benchmarks.

Packets are built bottom-up from plain bytes: ``tcp()`` -> ``ipv4()``/``ipv6()`` ->
``ether()``/``sll()``/``sll2()``/``null()`` (or raw), then written with ``PcapWriter``
or ``PcapngWriter`` (several interfaces, own link types and ``if_tsresol``).
``TcpFlow`` keeps both sequence numbers of one connection so tests can build a
handshake, data and FINs, then reorder, duplicate or drop segments at will.
Checksums are left zero: readers of captures do not verify them (tshark does not by default).
"""

from __future__ import annotations

import io
import ipaddress
import os
import struct
from collections.abc import Iterable
from typing import BinaryIO

__all__ = [
    "FIN", "SYN", "RST", "PSH", "ACK",
    "tcp", "ipv4", "ipv6", "ether", "sll", "sll2", "null", "ip",
    "PcapWriter", "PcapngWriter", "TcpFlow", "write_pcap",
]

FIN, SYN, RST, PSH, ACK = 0x01, 0x02, 0x04, 0x08, 0x10

LINKTYPE_NULL, LINKTYPE_ETHERNET, LINKTYPE_RAW = 0, 1, 101
LINKTYPE_LINUX_SLL, LINKTYPE_IPV4, LINKTYPE_IPV6, LINKTYPE_LINUX_SLL2 = 113, 228, 229, 276


def _packed(a: str) -> bytes:
    return ipaddress.ip_address(a).packed


def tcp(sport: int, dport: int, seq: int, ack: int = 0, flags: int = ACK, payload: bytes = b"",
        window: int = 65535, options: bytes = b"") -> bytes:
    """A TCP header (+ options padded to 32 bits) and payload."""
    options = options + b"\x00" * (-len(options) % 4)
    doff = (20 + len(options)) // 4
    return struct.pack("!HHIIBBHHH", sport, dport, seq & 0xFFFFFFFF, ack & 0xFFFFFFFF, doff << 4, flags,
                       window, 0, 0) + options + payload


def ipv4(src: str, dst: str, payload: bytes, proto: int = 6, ident: int = 1, frag: int = 0x4000,
         ttl: int = 64) -> bytes:
    """An IPv4 packet; ``frag`` is the flags+offset word (default DF)."""
    return struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), ident, frag, ttl, proto, 0,
                       _packed(src), _packed(dst)) + payload


def ipv6(src: str, dst: str, payload: bytes, nxt: int = 6,
         ext: Iterable[tuple[int, bytes]] = ()) -> bytes:
    """An IPv6 packet; ``ext`` is [(header type, body)] for extension headers in order.

    Hop-by-hop (0), routing (43) and destination options (60) bodies are padded to a
    multiple of 8 bytes (with the 2-byte next/len prefix); a fragment header (44) body
    is the 6 bytes after next-header (offset/flags + identification).
    """
    ext = list(ext)
    chain = b""
    types = [t for t, _ in ext] + [nxt]
    for i, (t, body) in enumerate(ext):
        n = types[i + 1]
        if t == 44:
            chain += struct.pack("!BB", n, 0) + body[:6].ljust(6, b"\x00")
        elif t == 51:
            total = 2 + len(body)
            total += -total % 4
            chain += struct.pack("!BB", n, total // 4 - 2) + body.ljust(total - 2, b"\x00")
        else:
            total = 2 + len(body)
            total += -total % 8
            chain += struct.pack("!BB", n, total // 8 - 1) + body.ljust(total - 2, b"\x00")
    first = types[0]
    body = chain + payload
    return struct.pack("!IHBB16s16s", 6 << 28, len(body), first, 64, _packed(src), _packed(dst)) + body


def ip(src: str, dst: str, payload: bytes, **kw: object) -> bytes:
    """IPv4 or IPv6 by the address family of ``src``."""
    return (ipv6 if ":" in src else ipv4)(src, dst, payload, **kw)  # type: ignore[arg-type]


def _ethertype(packet: bytes) -> int:
    return 0x86DD if packet[0] >> 4 == 6 else 0x0800


def ether(packet: bytes, vlans: Iterable[int] = (), src_mac: bytes = b"\x02\x00\x00\x00\x00\x01",
          dst_mac: bytes = b"\x02\x00\x00\x00\x00\x02", outer_tpid: int = 0x8100, pad_to: int = 60) -> bytes:
    """An Ethernet II frame; ``vlans`` adds 802.1Q tags (the first with ``outer_tpid``, e.g. 0x88A8 for QinQ)."""
    hdr = dst_mac + src_mac
    for i, vid in enumerate(vlans):
        hdr += struct.pack("!HH", outer_tpid if i == 0 else 0x8100, vid & 0x0FFF)
    frame = hdr + struct.pack("!H", _ethertype(packet)) + packet
    return frame.ljust(pad_to, b"\x00")  # short frames are padded on the wire; the IP length trims it


def sll(packet: bytes, pkttype: int = 0) -> bytes:
    """Linux cooked capture v1 header (16 bytes)."""
    return struct.pack("!HHH8sH", pkttype, 1, 6, b"\x02\x00\x00\x00\x00\x01\x00\x00", _ethertype(packet)) + packet


def sll2(packet: bytes, ifindex: int = 1, pkttype: int = 0) -> bytes:
    """Linux cooked capture v2 header (20 bytes)."""
    return struct.pack("!HHIHBB8s", _ethertype(packet), 0, ifindex, 1, pkttype, 6,
                       b"\x02\x00\x00\x00\x00\x01\x00\x00") + packet


def null(packet: bytes, family: int | None = None, byteorder: str = "<") -> bytes:
    """BSD loopback: a 4-byte address family in the capturing host's byte order."""
    if family is None:
        family = 24 if packet[0] >> 4 == 6 else 2
    return struct.pack(byteorder + "I", family) + packet


class PcapWriter:
    """Classic pcap. ``nanos`` picks the ns magic; ``big_endian`` the byte order."""

    def __init__(self, out: str | os.PathLike[str] | BinaryIO, linktype: int = LINKTYPE_ETHERNET,
                 nanos: bool = False, big_endian: bool = False, snaplen: int = 262144) -> None:
        self._own = not hasattr(out, "write")
        self.f: BinaryIO = open(out, "wb") if self._own else out  # type: ignore[arg-type, assignment]
        self.o = ">" if big_endian else "<"
        self.nanos = nanos
        magic = 0xA1B23C4D if nanos else 0xA1B2C3D4
        self.f.write(struct.pack(self.o + "IHHiIII", magic, 2, 4, 0, 0, snaplen, linktype))
        self.count = 0

    def packet(self, frame: bytes, ts_ns: int, origlen: int | None = None, caplen: int | None = None) -> None:
        sec, rem = divmod(ts_ns, 1_000_000_000)
        frac = rem if self.nanos else rem // 1000
        data = frame if caplen is None else frame[:caplen]
        self.f.write(struct.pack(self.o + "IIII", sec, frac, len(data), len(frame) if origlen is None else origlen))
        self.f.write(data)
        self.count += 1

    def close(self) -> None:
        if self._own:
            self.f.close()
        else:
            self.f.flush()

    def __enter__(self) -> PcapWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class PcapngWriter:
    """pcapng: one section; ``interface()`` adds an IDB and returns its id."""

    def __init__(self, out: str | os.PathLike[str] | BinaryIO, big_endian: bool = False) -> None:
        self._own = not hasattr(out, "write")
        self.f: BinaryIO = open(out, "wb") if self._own else out  # type: ignore[arg-type, assignment]
        self.o = ">" if big_endian else "<"
        self.ifaces: list[tuple[int, int]] = []  # (base, exponent) per interface
        self.count = 0
        self.section()

    def block(self, btype: int, body: bytes) -> None:
        """Any block (also unknown types, to test skipping)."""
        body = body + b"\x00" * (-len(body) % 4)
        n = 12 + len(body)
        self.f.write(struct.pack(self.o + "II", btype, n) + body + struct.pack(self.o + "I", n))

    def _opt(self, code: int, value: bytes) -> bytes:
        return struct.pack(self.o + "HH", code, len(value)) + value + b"\x00" * (-len(value) % 4)

    def section(self) -> None:
        """A (new) section header block: interfaces start over."""
        self.block(0x0A0D0D0A, struct.pack(self.o + "IHHq", 0x1A2B3C4D, 1, 0, -1))
        self.ifaces = []

    def interface(self, linktype: int, tsresol: int | None = None, snaplen: int = 0,
                  tsoffset: int | None = None, name: str | None = None) -> int:
        """``tsresol`` is the raw if_tsresol byte (6 = µs default, 9 = ns, 0x80|n = 2^-n)."""
        opts = b""
        if name is not None:
            opts += self._opt(2, name.encode())
        if tsresol is not None:
            opts += self._opt(9, bytes([tsresol]))
        if tsoffset is not None:
            opts += self._opt(14, struct.pack(self.o + "q", tsoffset))
        if opts:
            opts += self._opt(0, b"")
        self.block(1, struct.pack(self.o + "HHI", linktype, 0, snaplen) + opts)
        r = 6 if tsresol is None else tsresol
        self.ifaces.append((2, r & 0x7F) if r & 0x80 else (10, r))
        return len(self.ifaces) - 1

    def _ticks(self, ifid: int, ts_ns: int) -> int:
        base, exp = self.ifaces[ifid]
        if base == 2:
            return (ts_ns << exp) // 1_000_000_000
        return ts_ns * 10**exp // 1_000_000_000

    def packet(self, ifid: int, frame: bytes, ts_ns: int, origlen: int | None = None) -> None:
        """An Enhanced Packet Block."""
        t = self._ticks(ifid, ts_ns)
        self.block(6, struct.pack(self.o + "IIIII", ifid, t >> 32, t & 0xFFFFFFFF, len(frame),
                                  len(frame) if origlen is None else origlen) + frame)
        self.count += 1

    def simple_packet(self, frame: bytes) -> None:
        """A Simple Packet Block (interface 0, no timestamp)."""
        self.block(3, struct.pack(self.o + "I", len(frame)) + frame)
        self.count += 1

    def obsolete_packet(self, ifid: int, frame: bytes, ts_ns: int) -> None:
        """The obsolete Packet Block (type 2)."""
        t = self._ticks(ifid, ts_ns)
        self.block(2, struct.pack(self.o + "HHIIII", ifid, 0, t >> 32, t & 0xFFFFFFFF, len(frame), len(frame))
                   + frame)
        self.count += 1

    def close(self) -> None:
        if self._own:
            self.f.close()
        else:
            self.f.flush()

    def __enter__(self) -> PcapngWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class TcpFlow:
    """Both directions of one TCP connection: builds IP packets with the right seq/ack.

    Every method returns the IP packet (bytes) and advances the sender's sequence
    number, so tests can write the packets in any order, twice, or not at all.
    """

    def __init__(self, client: tuple[str, int] = ("10.0.0.1", 40000), server: tuple[str, int] = ("10.0.0.2", 80),
                 isn_client: int = 1000, isn_server: int = 5000) -> None:
        self.client, self.server = client, server
        self.seq = {True: isn_client & 0xFFFFFFFF, False: isn_server & 0xFFFFFFFF}

    def _pkt(self, from_client: bool, flags: int, payload: bytes = b"", seq: int | None = None,
             **ipkw: object) -> bytes:
        (sa, sp), (da, dp) = (self.client, self.server) if from_client else (self.server, self.client)
        s = self.seq[from_client] if seq is None else seq
        a = self.seq[not from_client] if flags & ACK else 0
        if seq is None:
            self.seq[from_client] = (s + len(payload) + (1 if flags & (SYN | FIN) else 0)) & 0xFFFFFFFF
        return ip(sa, da, tcp(sp, dp, s, a, flags, payload), **ipkw)

    def syn(self) -> bytes:
        return self._pkt(True, SYN)

    def synack(self) -> bytes:
        return self._pkt(False, SYN | ACK)

    def ack(self, from_client: bool = True) -> bytes:
        return self._pkt(from_client, ACK)

    def handshake(self) -> list[bytes]:
        return [self.syn(), self.synack(), self.ack()]

    def send(self, from_client: bool, payload: bytes, flags: int = PSH | ACK, **ipkw: object) -> bytes:
        return self._pkt(from_client, flags, payload, **ipkw)

    def at(self, from_client: bool, seq: int, payload: bytes, flags: int = PSH | ACK) -> bytes:
        """A segment at an explicit sequence number (retransmission/overlap); does not advance."""
        return self._pkt(from_client, flags, payload, seq=seq & 0xFFFFFFFF)

    def fin(self, from_client: bool) -> bytes:
        return self._pkt(from_client, FIN | ACK)

    def rst(self, from_client: bool) -> bytes:
        return self._pkt(from_client, RST | ACK)


def write_pcap(path: str | os.PathLike[str] | None, frames: Iterable[bytes], linktype: int = LINKTYPE_ETHERNET,
               ts0_ns: int = 1_700_000_000_000_000_000, step_ns: int = 1000, nanos: bool = True) -> bytes:
    """Write ``frames`` with evenly spaced timestamps; returns the file bytes."""
    buf = io.BytesIO()
    w = PcapWriter(buf, linktype, nanos=nanos)
    for i, fr in enumerate(frames):
        w.packet(fr, ts0_ns + i * step_ns)
    data = buf.getvalue()
    if path is not None:
        with open(path, "wb") as f:
            f.write(data)
    return data
