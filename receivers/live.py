"""The ``live`` receiver: TCP from a network interface with an AF_PACKET socket (no eBPF).

Contract: ``start()`` opens a raw ``AF_PACKET`` socket bound to the interface (``lo``
by default), attaches a classic BPF socket filter (``SO_ATTACH_FILTER``) that keeps
only TCP over IPv4/IPv6 to or from the configured ports, and UDP to or from ``udp_ports``
(default [53]: DNS; each datagram one ``DATAGRAM`` event, receivers/udp.py; no other UDP
reaches user space), and starts one thread that
reads the packets, decodes them (receivers/packet.py), reassembles the streams
(receivers/tcp_reassembly.py, the same code as the ``pcap`` receiver) and hands
ordered ``TcpEvent``s to ``self.next``. ``shutdown()`` first drains what the kernel
already holds (below), then stops the thread, flushes the reassembler (pending holes
become GAPs, open directions CLOSE), unmaps the ring and closes the socket.

Draining at shutdown. Packets that passed the tap before ``shutdown()`` are the
service's to deliver (SIGTERM drains everything). The ``recv`` path reads the socket
until it is empty. The ring path has one more wait: the kernel hands over a partly
filled block only when its retire timer fires (``retire_timeout_ms`` after the block's
first packet at most), and a kernel-owned block cannot be read safely; so the thread
keeps reading blocks until ``retire_timeout_ms`` + ``DRAIN_MARGIN_S`` after the stop has
passed with no block ready. Either drain ends after ``DRAIN_MAX_S`` whatever arrives (a
busy interface never runs dry), so a ``retire_timeout_ms`` above it loses the last block.

Two read paths, the same filter, decoding and reassembly:
- ``ring`` (default): a TPACKET_V3 ``PACKET_RX_RING`` mapped into the process. The
  kernel fills blocks of frames and hands a block over when it is full or after
  ``retire_timeout_ms``; the thread walks the block's ``tpacket3_hdr`` frames (kernel
  timestamps), then returns it (``TP_STATUS_KERNEL``). The kernel reuses a returned
  block, so each payload is copied out first: one copy per packet, of the payload only
  (``copy_unit = 0``), the same one allocation as ``recv`` and nothing else kept alive.
  ``copy_unit = N`` copies runs of consecutive frames up to N bytes once and hands out
  views (a kept view then holds at most N bytes besides its own); 16 KiB runs to whole
  blocks measured 0.83-1.21x the per-packet copy's cost, within run-to-run noise, so
  per-packet copies (memory exactly like recv) stay.
- ``recv`` (``ring: {enabled: false}``): one ``recv`` per packet, in batches (one
  allocation per packet, the only copy; payloads are views of it; timestamped on read).

Why the ring is the default, measured by bench/bench_live.py (two runs, medians of 3,
2 cores shared with the load generator, load average 0.9-3.8): reader CPU per packet
on small HTTP exchanges, receiver only, recv 4.4-5.4 us vs ring 2.4-3.0 us (1.7-1.9x
packets per CPU-second, burst and concurrent); with the protocols stage 9.7-10.8 vs
7.4-9.7 us (1.1-1.34x). 64 KiB bulk segments: parity (0.96-1.34x MiB per CPU-second).
Under concurrent load with the protocols stage both paths drop at times (at 7-10 us a
packet the stage does 100-135k packets per CPU-second, about what the generator offers). The ring
costs its memory up front (block_size x block_count = 32 MiB by default, kernel
pages), where ``buffer_size`` is only a cap.

Loopback duplicates: on ``lo`` every packet passes the tap twice, once leaving
(``PACKET_OUTGOING``) and once arriving (``PACKET_HOST``); the filter drops the
outgoing copy in the kernel (the ancillary ``pkttype`` load), so each is seen once.
Kernel drops (socket buffer or ring full) are read from ``PACKET_STATISTICS``
(``tpacket_stats_v3`` for the ring, whose ``tp_freeze_q_cnt`` is kept as
``stats["ring_freezes"]``) and counted (``reason=kernel_buffer_full``); the
reassembler turns the holes into GAPs.
"""

from __future__ import annotations

import logging
import mmap
import os
import select
import socket
import struct
import threading
import time
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from receivers.packet import LINKTYPE_ETHERNET, LINKTYPE_RAW, UDP, decode
from receivers.tcp_reassembly import ReassemblyLimits, TcpReassembler
from receivers.tls import KeyLog, KeyLogError, TlsLayer
from receivers.udp import DEFAULT_UDP_PORTS, UdpDatagrams
from service.component import ComponentConfig, Receiver
from service.telemetry import CONNECTIONS_EVICTED, RECEIVER_ACCEPTED, RECEIVER_DROPPED

__all__ = ["LiveConfig", "LiveReceiver", "LiveError", "RingConfig", "build_filter", "expression_filter"]

log = logging.getLogger("wirespan.receivers.live")

ETH_P_ALL = 0x0003
SOL_PACKET = 263
PACKET_STATISTICS = 6           #: struct tpacket_stats {u32 tp_packets; u32 tp_drops}
PACKET_OUTGOING = 4             #: linux/if_packet.h
SO_ATTACH_FILTER = 26           #: asm-generic/socket.h
ARPHRD_ETHER, ARPHRD_LOOPBACK, ARPHRD_NONE = 1, 772, 0xFFFE
SKF_AD_PKTTYPE = -0x1000 + 4    #: SKF_AD_OFF + SKF_AD_PKTTYPE (linux/filter.h)
#: Largest frame kept (tcpdump's default snap length); lo's MTU is 65536.
DEFAULT_SNAPLEN = 262144
#: Socket receive buffer: absorbs bursts while the thread parses (SO_RCVBUFFORCE as root).
DEFAULT_RCVBUF = 32 << 20
#: Classic BPF jump offsets are 8 bits: beyond this many ports, filter ports in Python.
MAX_FILTER_PORTS = 48
DEFAULT_BATCH = 1024

# TPACKET_V3 ring (linux/if_packet.h)
PACKET_RX_RING = 5
PACKET_VERSION = 10
TPACKET_V3 = 2
TP_STATUS_KERNEL, TP_STATUS_USER = 0, 1
#: struct tpacket_req3: block_size, block_nr, frame_size, frame_nr, retire_blk_tov, sizeof_priv, feature_req_word
_REQ3 = struct.Struct("7I")
#: struct tpacket_block_desc up to blk_len: version, offset_to_priv, then tpacket_hdr_v1's
#: block_status, num_pkts, offset_to_first_pkt, blk_len
_BLOCK = struct.Struct("6I")
_BLOCK_STATUS_OFF = 8
_U32 = struct.Struct("I")
#: struct tpacket3_hdr up to tp_net: next_offset, sec, nsec, snaplen, len, status, mac, net
_FRAME = struct.Struct("6I2H")
#: struct tpacket_stats_v3: tp_packets, tp_drops, tp_freeze_q_cnt
_STATS_V3 = struct.Struct("3I")
#: Ring block size: libpcap's choice for TPACKET_V3 (the smallest page multiple that holds
#: a 262144-byte snap), so a 64 KiB loopback packet always fits a block.
DEFAULT_BLOCK_SIZE = 1 << 18
#: Blocks: DEFAULT_RCVBUF worth of memory, the same burst room as the recv path.
DEFAULT_BLOCK_COUNT = DEFAULT_RCVBUF // DEFAULT_BLOCK_SIZE
#: Ring mode copy strategy (measured in bench/bench_live.py; see the module doc).
COPY_UNIT = 0
#: Shutdown drain (module doc): after the stop, wait the ring's retire timeout plus this for the
#: kernel's last partly filled block (its timer has jiffy granularity and fires late under load) ...
DRAIN_MARGIN_S = 0.05
#: ... and never drain longer than this, however much keeps arriving.
DRAIN_MAX_S = 2.0
_EMPTY = memoryview(b"")

# classic BPF opcodes (linux/bpf_common.h)
_LD_H_ABS, _LD_B_ABS, _LD_W_ABS = 0x28, 0x30, 0x20
_LD_H_IND = 0x48
_LDX_B_MSH = 0xB1
_JEQ_K, _JSET_K, _JA = 0x15, 0x45, 0x05
_RET_K = 0x06
_SOCK_FILTER = struct.Struct("HBBI")


class LiveError(RuntimeError):
    """A one-line reason the live receiver cannot capture."""


def build_filter(ports: list[int], snaplen: int, drop_outgoing: bool,
                 udp_ports: list[int] | tuple[int, ...] = ()) -> list[tuple[int, int, int, int]]:
    """Classic BPF for Ethernet-framed packets: TCP over IPv4 (unfragmented) or IPv6
    (TCP as first next-header) with either port in ``ports`` (all TCP when empty), and UDP
    with either port in ``udp_ports`` (no UDP when empty: other UDP never leaves the kernel).

    Written as (op, jt-label, jf-label, k) with labels resolved at the end, so the
    port lists can grow without hand-counting jumps.
    """
    prog: list[list[Any]] = []
    labels: dict[str, int] = {}

    def ins(op: int, k: Any = 0, jt: Any = 0, jf: Any = 0) -> None:
        prog.append([op, jt, jf, k if isinstance(k, str) else k & 0xFFFFFFFF])

    def label(name: str) -> None:
        labels[name] = len(prog)

    def port_tests(load_off_ind: bool, sport_off: int) -> None:
        for which in (0, 2):
            ins(_LD_H_IND if load_off_ind else _LD_H_ABS, sport_off + which)
            for p in ports:
                ins(_JEQ_K, p, "accept", 0)
        ins(_JA, "drop")

    def udp_tests(load_off_ind: bool, sport_off: int) -> None:
        for which in (0, 2):
            ins(_LD_H_IND if load_off_ind else _LD_H_ABS, sport_off + which)
            for p in udp_ports:
                ins(_JEQ_K, p, "accept", 0)
        ins(_JA, "drop")

    if drop_outgoing:
        ins(_LD_W_ABS, SKF_AD_PKTTYPE)
        ins(_JEQ_K, PACKET_OUTGOING, "drop", 0)
    ins(_LD_H_ABS, 12)
    ins(_JEQ_K, 0x86DD, "v6", 0)
    ins(_JEQ_K, 0x0800, 0, "drop")
    ins(_LD_B_ABS, 23)
    if udp_ports:
        ins(_JEQ_K, 6, "tcp4", 0)
        ins(_JEQ_K, 17, 0, "drop")
        ins(_LD_H_ABS, 20)
        ins(_JSET_K, 0x1FFF, "drop", 0)
        ins(_LDX_B_MSH, 14)
        udp_tests(True, 14)
        label("tcp4")
    else:
        ins(_JEQ_K, 6, 0, "drop")
    ins(_LD_H_ABS, 20)
    ins(_JSET_K, 0x1FFF, "drop", 0)  # a fragment past the first has no TCP header
    if ports:
        ins(_LDX_B_MSH, 14)
        port_tests(True, 14)
    else:
        ins(_JA, "accept")
    label("v6")
    ins(_LD_B_ABS, 20)
    if udp_ports:
        ins(_JEQ_K, 6, "tcp6", 0)
        ins(_JEQ_K, 17, 0, "drop")
        udp_tests(False, 54)
        label("tcp6")
    else:
        ins(_JEQ_K, 6, 0, "drop")
    if ports:
        port_tests(False, 54)
    label("accept")
    ins(_RET_K, snaplen)
    label("drop")
    ins(_RET_K, 0)

    out = []
    for i, (op, jt, jf, k) in enumerate(prog):
        if op == _JA:
            target = labels[k] if isinstance(k, str) else k
            out.append((op, 0, 0, target - i - 1))
            continue
        jt = labels[jt] - i - 1 if isinstance(jt, str) else jt
        jf = labels[jf] - i - 1 if isinstance(jf, str) else jf
        if not (0 <= jt <= 255 and 0 <= jf <= 255):
            raise ValueError("filter too large for classic BPF jumps")
        out.append((op, jt, jf, k))
    return out


class RingConfig(BaseModel):
    """``ring:`` of the ``live`` receiver: a TPACKET_V3 ``PACKET_RX_RING`` instead of ``recv``."""

    model_config = ConfigDict(extra="forbid", validate_default=True)

    #: On by default: measured cheaper per packet than recv (module doc).
    enabled: bool = True
    #: Bytes per block (a page multiple; a block is handed to user space whole).
    block_size: int = Field(DEFAULT_BLOCK_SIZE, ge=mmap.PAGESIZE, le=1 << 26)
    block_count: int = Field(DEFAULT_BLOCK_COUNT, ge=2, le=1 << 16)
    #: Nominal frame size (TPACKET_V3 packs frames of any size; the kernel only checks it);
    #: default = block_size, as libpcap.
    frame_size: int | None = Field(None, ge=64)
    #: Milliseconds before the kernel hands over a partly filled block (the latency bound at low rate).
    retire_timeout_ms: int = Field(100, ge=1, le=60000)

    @model_validator(mode="after")
    def _check(self) -> RingConfig:
        if self.block_size % mmap.PAGESIZE:
            raise ValueError(f"ring.block_size must be a multiple of the page size ({mmap.PAGESIZE})")
        fs = self.frame_size if self.frame_size is not None else self.block_size
        if fs % 16 or fs > self.block_size:
            raise ValueError("ring.frame_size must be a multiple of 16 and at most ring.block_size")
        if self.block_size * self.block_count > 1 << 32:
            raise ValueError("ring is larger than 4 GiB")
        return self


class LiveConfig(ComponentConfig):
    """Options of the ``live`` receiver."""

    #: Interface to capture on.
    interface: str = "lo"
    #: TCP ports to keep (either end); empty keeps all TCP.
    ports: list[int] = []
    #: A BPF filter expression (tcpdump's language), compiled by libpcap and attached in the kernel
    #: together with the TCP/ports test: ``tcp and (EXPR) [and (port P or ...)]`` (and the UDP one:
    #: ``or (udp and (EXPR) and (port U or ...))``).
    bpf_filter: str | None = None
    #: UDP ports passed on (either end), each datagram one DATAGRAM event (receivers/udp.py); the
    #: kernel filter lets no other UDP through. ``[]``: no UDP.
    udp_ports: list[int] = Field(default_factory=lambda: list(DEFAULT_UDP_PORTS))
    #: Bytes kept per frame.
    snaplen: int = Field(DEFAULT_SNAPLEN, ge=128, le=1 << 20)
    #: Socket receive buffer in bytes (the recv path; the ring's memory is ring.block_size x ring.block_count).
    buffer_size: int = Field(DEFAULT_RCVBUF, ge=1 << 16)
    #: Events per ``consume_events`` call at most.
    batch_size: int = Field(DEFAULT_BATCH, ge=1)
    #: How long one read waits for the first packet of a batch, in milliseconds.
    poll_timeout_ms: int = Field(100, ge=1, le=5000)
    max_connections: int = Field(default=ReassemblyLimits.max_connections, ge=1)
    max_buffered_bytes_per_connection: int = Field(default=ReassemblyLimits.max_buffered_bytes_per_connection, ge=0)
    max_buffered_bytes_total: int = Field(default=ReassemblyLimits.max_buffered_bytes_total, ge=0)
    #: Seconds without a packet before a connection is expired.
    idle_timeout: float = Field(default=ReassemblyLimits.idle_timeout, gt=0)
    #: Read through a mapped TPACKET_V3 ring (default) or, with ``enabled: false``, with ``recv``.
    ring: RingConfig = RingConfig()
    #: An NSS key log (``SSLKEYLOGFILE``) the traced clients append to while the receiver runs; TLS is
    #: decrypted with it (receivers/tls.py). It may not exist yet at start (its directory must).
    keylog_file: str | None = None
    #: Seconds a TLS session may wait for its secrets to appear in the key log (the client writes
    #: them as it derives them, a moment before or after its records are captured).
    keylog_wait: float = Field(default=2.0, ge=0, le=300)

    @field_validator("ports", "udp_ports")
    @classmethod
    def _ports(cls, v: list[int]) -> list[int]:
        for p in v:
            if not 0 < p < 65536:
                raise ValueError(f"port {p} out of range")
        return sorted(set(v))

    @field_validator("bpf_filter")
    @classmethod
    def _compiles(cls, v: str | None) -> str | None:
        if v is None or not v.strip():
            return None
        from receivers.bpf_filter import compile_filter
        compile_filter(v, LINKTYPE_ETHERNET)  # FilterError (a ValueError): libpcap's message on the user's text
        return v


def expression_filter(expression: str, ports: list[int], linktype: int, snaplen: int, drop_outgoing: bool,
                      udp_ports: list[int] | tuple[int, ...] = ()) -> list[tuple[int, int, int, int]]:
    """The kernel program for a user's BPF expression: libpcap's code for
    ``tcp and (EXPR)`` (and the ports, when configured) behind the loopback test that drops
    the outgoing copy of each packet (``build_filter``'s first two instructions).

    Classic BPF jumps are relative, so libpcap's program works unchanged behind a prefix.

    Raises:
        FilterError: the expression does not compile for this link type.
    """
    from receivers.bpf_filter import compile_filter
    text = f"tcp and ({expression})"
    if ports:
        text += " and (" + " or ".join(f"port {p}" for p in ports) + ")"
    if udp_ports:
        text = f"({text}) or (udp and ({expression}) and (" + " or ".join(f"port {p}" for p in udp_ports) + "))"
    prog = compile_filter(text, linktype, snaplen).instructions
    if drop_outgoing:
        # ld [pkttype]; jeq #OUTGOING jt 0 jf 1; ret #0; then libpcap's program
        prefix = [(_LD_W_ABS, 0, 0, SKF_AD_PKTTYPE & 0xFFFFFFFF), (_JEQ_K, 0, 1, PACKET_OUTGOING), (_RET_K, 0, 0, 0)]
        prog = prefix + prog
    return prog


class LiveReceiver(Receiver):
    """Live TCP capture from an interface (AF_PACKET + classic BPF + the shared reassembly)."""

    type = "live"
    Config = LiveConfig

    def __init__(self, id: str, config: LiveConfig, next: Any = None) -> None:
        super().__init__(id, config, next)
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        c = config
        self.reassembler = TcpReassembler(ReassemblyLimits(
            max_connections=c.max_connections, max_buffered_bytes_per_connection=c.max_buffered_bytes_per_connection,
            max_buffered_bytes_total=c.max_buffered_bytes_total, idle_timeout=c.idle_timeout))
        self._linktype = LINKTYPE_ETHERNET
        self._py_ports: frozenset[int] | None = None
        self.stats: dict[str, Any] = {"packets": 0, "bytes": 0, "events": 0, "drops": {}}
        self.udp = UdpDatagrams(c.udp_ports)
        self.udp.drops = self.stats["drops"]  # its reasons (udp_port, udp_empty) counted with the rest
        self._published: dict[tuple[str, str], int] = {}
        self._kernel_drops = 0
        self._mm: mmap.mmap | None = None
        #: TLS record layer (receivers/tls.py): keys from keylog_file, re-read as it grows
        self.tls = TlsLayer()
        #: Ring mode: 0 copies each payload; N > 0 copies runs of consecutive frames of up
        #: to N bytes once and hands out views of them. See the module doc for the figures.
        self.copy_unit = COPY_UNIT
        #: When the loop last found nothing to read, having handed on all it had (``settle``).
        self._idle_at = 0.0

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        c = self.config
        if c.keylog_file:
            try:
                self.tls = TlsLayer(KeyLog(c.keylog_file, must_exist=False), wait_for_keys=c.keylog_wait)
            except KeyLogError as e:
                raise LiveError(str(e)) from None
        try:
            s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        except PermissionError:
            raise LiveError("the live receiver needs root or CAP_NET_RAW (AF_PACKET raw socket)") from None
        except OSError as e:
            raise LiveError(f"cannot open an AF_PACKET socket: {e.strerror}") from None
        try:
            try:
                s.bind((c.interface, 0))
            except OSError as e:
                raise LiveError(f"interface {c.interface!r}: {e.strerror}") from None
            hatype = s.getsockname()[3]
            if hatype in (ARPHRD_ETHER, ARPHRD_LOOPBACK):
                self._linktype = LINKTYPE_ETHERNET
                if c.bpf_filter:  # libpcap's code, ports included: nothing left to check in Python
                    prog = expression_filter(c.bpf_filter, c.ports, LINKTYPE_ETHERNET, c.snaplen,
                                             drop_outgoing=hatype == ARPHRD_LOOPBACK, udp_ports=c.udp_ports)
                else:
                    ports = c.ports if len(c.ports) <= MAX_FILTER_PORTS else []
                    if c.ports and not ports:
                        self._py_ports = frozenset(c.ports)
                    if len(c.udp_ports) > MAX_FILTER_PORTS:
                        raise LiveError(f"udp_ports: at most {MAX_FILTER_PORTS} (the kernel filter tests each)")
                    prog = build_filter(ports, c.snaplen, drop_outgoing=hatype == ARPHRD_LOOPBACK,
                                        udp_ports=c.udp_ports)
                self._attach(s, prog)
            elif hatype == ARPHRD_NONE:  # tun and friends: bare IP, filter in Python
                self._linktype = LINKTYPE_RAW
                if c.bpf_filter:
                    self._attach(s, expression_filter(c.bpf_filter, c.ports, LINKTYPE_RAW, c.snaplen, False,
                                                      udp_ports=c.udp_ports))
                else:
                    self._py_ports = frozenset(c.ports) if c.ports else None
            else:
                raise LiveError(f"interface {c.interface!r}: link type {hatype} not supported "
                                "(Ethernet, loopback and raw-IP interfaces are)")
            for opt in (33, socket.SO_RCVBUF) if not c.ring.enabled else ():  # SO_RCVBUFFORCE (root) first
                try:
                    s.setsockopt(socket.SOL_SOCKET, opt, c.buffer_size)
                    break
                except OSError:
                    continue
            # non-blocking, waited on with poll(): a socket timeout would make every
            # recv wait first, even the draining ones
            s.setblocking(False)
            try:  # discard what queued between socket() and the filter
                while True:
                    s.recv(1)
            except OSError:
                pass
            if c.ring.enabled:
                self._mm = self._map_ring(s, c.ring)
            self._read_kernel_stats(s)  # reading resets the kernel's counters
        except BaseException:
            s.close()
            raise
        self._sock = s
        self._stop.clear()
        run = self._run_ring if self._mm is not None else self._run
        self._thread = threading.Thread(target=run, name=f"live-{self.id}", daemon=True)
        self._thread.start()
        log.info("%s: capturing on %s (%s, %s)", self.id, c.interface,
                 f"ports {c.ports}" if c.ports else "all TCP",
                 f"TPACKET_V3 ring {c.ring.block_count} x {c.ring.block_size} B" if self._mm is not None else "recv")

    @staticmethod
    def _map_ring(s: socket.socket, rc: RingConfig) -> mmap.mmap:
        """Switch ``s`` to TPACKET_V3, create its RX ring and map it (after the filter is on)."""
        fs = rc.frame_size if rc.frame_size is not None else rc.block_size
        req = _REQ3.pack(rc.block_size, rc.block_count, fs, rc.block_count * (rc.block_size // fs),
                         rc.retire_timeout_ms, 0, 0)
        try:
            s.setsockopt(SOL_PACKET, PACKET_VERSION, TPACKET_V3)
        except OSError as e:
            raise LiveError(f"the kernel refused TPACKET_V3 (PACKET_VERSION): {e.strerror}") from None
        try:
            s.setsockopt(SOL_PACKET, PACKET_RX_RING, req)
        except OSError as e:
            raise LiveError(f"the kernel refused a PACKET_RX_RING of {rc.block_count} x {rc.block_size} bytes: "
                            f"{e.strerror}") from None
        try:
            return mmap.mmap(s.fileno(), rc.block_size * rc.block_count, mmap.MAP_SHARED,
                             mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError as e:
            raise LiveError(f"cannot map the packet ring ({rc.block_size * rc.block_count} bytes): "
                            f"{e.strerror}") from None

    @staticmethod
    def _attach(s: socket.socket, prog: list[tuple[int, int, int, int]]) -> None:
        import ctypes

        raw = b"".join(_SOCK_FILTER.pack(*i) for i in prog)
        buf = ctypes.create_string_buffer(raw)
        fprog = struct.pack("HL", len(prog), ctypes.addressof(buf))  # struct sock_fprog
        s.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)

    def shutdown(self) -> None:
        self._stop.set()
        alive = False
        if self._thread is not None:
            self._thread.join(timeout=10)
            alive = self._thread.is_alive()
            self._thread = None
        if self._mm is not None:
            if alive:  # the loop is stuck downstream: leave the map to the garbage collector
                log.warning("%s: capture thread still running at shutdown; ring left mapped", self.id)
            else:
                self._mm.close()  # munmap (no view of the map outlives a loop pass)
            self._mm = None
        if self._sock is not None:
            self._sock.close()  # frees the ring
            self._sock = None

    def flush(self) -> None:
        pass  # the thread flushes at shutdown; events are handed on per batch

    def settle(self, timeout: float = 2.0) -> bool:
        """Wait until every packet that passed the tap before this call has been handed on.

        A reload calls it before it pauses this (kept) receiver and swaps the stages behind
        it: a request delivered to the old protocols stage whose response still sat in the
        ring would otherwise reach the new stage alone, and the span would be lost (counted,
        but lost). The kernel hands over a partly filled block only at its retire timer, so
        the ring path waits for an empty read after ``retire_timeout_ms`` has passed.
        """
        if self._thread is None or not self._thread.is_alive():
            return True
        wait = self.config.ring.retire_timeout_ms / 1000 if self._mm is not None else 0.0
        ready = time.monotonic() + wait
        end = ready + timeout
        while self._idle_at < ready:
            if time.monotonic() >= end or self._thread is None:
                return False
            time.sleep(0.005)
        return True

    # ------------------------------------------------------------------ loop
    def _run(self) -> None:
        s = self._sock
        assert s is not None
        r = self.reassembler
        seg = r.segment
        udp = self.udp.datagram
        lt = self._linktype
        bs = self.config.batch_size
        snap = self.config.snaplen
        drops = self.stats["drops"]
        py_ports = self._py_ports
        next_house = time.monotonic() + 1.0
        recv = s.recv
        poller = select.poll()
        poller.register(s.fileno(), select.POLLIN)
        timeout_ms = self.config.poll_timeout_ms
        stop = self._stop
        drain_end = None  # set at the stop: read what the socket holds, up to DRAIN_MAX_S
        try:
            while True:
                pkt = None
                if stop.is_set():
                    if drain_end is None:
                        drain_end = time.monotonic() + DRAIN_MAX_S
                    elif time.monotonic() >= drain_end:
                        break
                    try:
                        pkt = recv(snap)
                    except (BlockingIOError, InterruptedError):
                        break  # the kernel holds nothing more: drained
                else:
                    t = time.monotonic()
                    if poller.poll(timeout_ms):
                        try:
                            pkt = recv(snap)
                        except (BlockingIOError, InterruptedError):
                            pass
                    else:
                        self._idle_at = t  # nothing came since t, all before it is handed on (settle)
                n = nbytes = 0
                while pkt is not None:
                    n += 1
                    nbytes += len(pkt)
                    res = decode(lt, pkt)
                    if res.__class__ is str:
                        drops[res] = drops.get(res, 0) + 1
                    else:
                        src, dst, sport, dport, sq, ack, flags, poff, pend = res
                        if flags == UDP:  # a datagram (packet.py): an event of its own, no reassembly
                            uev = udp(src, sport, dst, dport, memoryview(pkt)[poff:pend], time.time_ns())
                            if uev is not None:
                                r.events.append(uev)
                        elif py_ports is None or sport in py_ports or dport in py_ports:
                            seg(src, sport, dst, dport, sq, ack, flags,
                                memoryview(pkt)[poff:pend] if pend > poff else memoryview(b""), time.time_ns())
                    if len(r.events) >= bs:
                        break
                    try:
                        pkt = recv(snap)
                    except (BlockingIOError, InterruptedError):
                        pkt = None
                self.stats["packets"] += n
                self.stats["bytes"] += nbytes
                self._flush_events()
                now = time.monotonic()
                if now >= next_house:
                    next_house = now + 1.0
                    self._housekeeping(s)
        except Exception:
            log.exception("%s: capture loop failed", self.id)
        finally:
            self._finish(s)

    def _run_ring(self) -> None:
        """The TPACKET_V3 loop: wait for the next block to be user-owned, walk its frames,
        copy what must outlive the block, give the block back (``TP_STATUS_KERNEL``)."""
        s = self._sock
        mm = self._mm
        assert s is not None and mm is not None
        r = self.reassembler
        seg = r.segment
        udp = self.udp.datagram
        lt = self._linktype
        bs = self.config.batch_size
        bsize = self.config.ring.block_size
        nblocks = self.config.ring.block_count
        drops = self.stats["drops"]
        py_ports = self._py_ports
        unit = self.copy_unit
        unpack_block = _BLOCK.unpack_from
        unpack_frame = _FRAME.unpack_from
        kernel = _U32.pack_into
        poller = select.poll()
        poller.register(s.fileno(), select.POLLIN | select.POLLERR)
        timeout_ms = self.config.poll_timeout_ms
        next_house = time.monotonic() + 1.0
        pending: list[tuple[Any, int]] = []
        run_start = run_end = 0

        def flush_run() -> None:
            # One copy for a run of consecutive frames; their payloads are views of it, so a
            # payload kept downstream keeps at most max(unit, its own frame) bytes alive.
            view = memoryview(mm[run_start:run_end])
            for (src, dst, sport, dport, sq, ack, flags, poff, pend), ts in pending:
                seg(src, sport, dst, dport, sq, ack, flags,
                    view[poff - run_start:pend - run_start] if pend > poff else _EMPTY, ts)
            pending.clear()

        cur = 0
        stop = self._stop
        retire_s = self.config.ring.retire_timeout_ms / 1000
        soft_end = hard_end = None  # set at the stop (module doc: draining at shutdown)
        try:
            while True:
                if stop.is_set() and hard_end is None:
                    t = time.monotonic()
                    hard_end = t + DRAIN_MAX_S
                    soft_end = min(t + retire_s + DRAIN_MARGIN_S, hard_end)
                if hard_end is not None and time.monotonic() >= hard_end:
                    break
                base = cur * bsize
                _ver, _priv, status, npkts, first, blen = unpack_block(mm, base)
                if status & TP_STATUS_USER:
                    n = nbytes = 0
                    if not (0 < first <= blen <= bsize):  # never from this kernel; refuse, don't walk
                        drops["malformed"] = drops.get("malformed", 0) + npkts
                        npkts = 0
                    off = base + first
                    lim = base + blen
                    for _ in range(npkts):
                        nxt, sec, nsec, snap, _wire, _st, mac, _net = unpack_frame(mm, off)
                        start = off + mac
                        end = start + snap
                        if end > lim:
                            drops["malformed"] = drops.get("malformed", 0) + 1
                            break
                        n += 1
                        nbytes += snap
                        res = decode(lt, mm, start, end)
                        if res.__class__ is str:
                            drops[res] = drops.get(res, 0) + 1
                        elif res[6] == UDP:  # a datagram: copied out of the block, an event of its own
                            poff, pend = res[7], res[8]
                            uev = udp(res[0], res[2], res[1], res[3], memoryview(mm[poff:pend]),
                                      sec * 1_000_000_000 + nsec)
                            if uev is not None:
                                r.events.append(uev)
                        elif py_ports is None or res[2] in py_ports or res[3] in py_ports:
                            ts = sec * 1_000_000_000 + nsec
                            if not unit:
                                src, dst, sport, dport, sq, ack, flags, poff, pend = res
                                # the one copy per packet, of the payload only (the block is reused)
                                seg(src, sport, dst, dport, sq, ack, flags,
                                    memoryview(mm[poff:pend]) if pend > poff else _EMPTY, ts)
                            else:
                                if pending and end - run_start > unit:
                                    flush_run()
                                if not pending:
                                    run_start = start
                                pending.append((res, ts))
                                run_end = end
                        if not nxt:
                            break
                        off += nxt
                    if pending:
                        flush_run()
                    kernel(mm, base + _BLOCK_STATUS_OFF, TP_STATUS_KERNEL)
                    cur = cur + 1 if cur + 1 < nblocks else 0
                    self.stats["packets"] += n
                    self.stats["bytes"] += nbytes
                    if len(r.events) >= bs:
                        self._flush_events()
                else:
                    self._flush_events()
                    self._idle_at = time.monotonic()  # no block ready, all read is handed on (settle)
                    if soft_end is None:
                        poller.poll(timeout_ms)
                    else:  # stopping: wait for the kernel to retire the block it is filling
                        left = soft_end - time.monotonic()
                        if left <= 0:
                            break
                        poller.poll(max(1, min(timeout_ms, int(left * 1000) + 1)))
                now = time.monotonic()
                if now >= next_house:
                    next_house = now + 1.0
                    self._housekeeping(s)
        except Exception:
            log.exception("%s: capture loop failed", self.id)
        finally:
            self._finish(s)

    def _housekeeping(self, s: socket.socket) -> None:
        """Once a second, both read loops: expire idle connections, read kernel drops, publish."""
        self._flush_events()
        self.reassembler.expire(time.time_ns())
        self._flush_events()
        self._deliver(self.tls.tick(time.time_ns()))  # TLS sessions waiting for keys: retried or given up
        self._read_kernel_stats(s)
        self._publish()

    def _finish(self, s: socket.socket) -> None:
        """End of either read loop: pending holes become GAPs, open directions CLOSE."""
        self.reassembler.finish()
        self._flush_events()
        self._deliver(self.tls.finish())  # TLS sessions still waiting for keys: a last look, their ends
        self._read_kernel_stats(s)
        self._publish()
        self.done.set()

    def _flush_events(self) -> None:
        r = self.reassembler
        ev = r.events
        if not ev:
            return
        r.events = []
        self._deliver(self.tls.process(ev))  # TLS connections' ciphertext -> plaintext; the rest as it is

    def _deliver(self, ev: list[Any]) -> None:
        if not ev:
            return
        self.stats["events"] += len(ev)
        if self.next is not None:
            try:
                self.next.consume_events(ev)
            except Exception:
                log.exception("%s: downstream consume_events failed", self.id)
                d = self.stats["drops"]
                d["downstream_error"] = d.get("downstream_error", 0) + len(ev)

    def _read_kernel_stats(self, s: socket.socket) -> None:
        try:
            if self._mm is not None:  # tpacket_stats_v3
                _pkts, dropped, freezes = _STATS_V3.unpack(s.getsockopt(SOL_PACKET, PACKET_STATISTICS, 12))
                if freezes:  # times every block was user-owned (not a loss by itself: drops say that)
                    self.stats["ring_freezes"] = self.stats.get("ring_freezes", 0) + freezes
            else:
                _pkts, dropped = struct.unpack("II", s.getsockopt(SOL_PACKET, PACKET_STATISTICS, 8))
        except OSError:
            return
        if dropped:
            self._kernel_drops += dropped
            d = self.stats["drops"]
            d["kernel_buffer_full"] = d.get("kernel_buffer_full", 0) + dropped

    def _publish(self) -> None:
        pub = self._published
        r = self.reassembler
        self.stats["tls"] = {**self.tls.stats, "drops": dict(self.tls.drops), "keylog": dict(self.tls.keylog.stats)}
        for source, d in (("rx", self.stats["drops"]), ("reasm", r.drops), ("tls", self.tls.drops)):
            for reason, n in list(d.items()):
                delta = n - pub.get((source, reason), 0)
                if delta:
                    pub[(source, reason)] = n
                    RECEIVER_DROPPED.labels(receiver=self.id, reason=reason).inc(delta)
        for reason, n in list(r.evictions.items()):
            delta = n - pub.get(("evict", reason), 0)
            if delta:
                pub[("evict", reason)] = n
                CONNECTIONS_EVICTED.labels(component=self.id, reason=reason).inc(delta)
        delta = self.stats["events"] - pub.get(("accepted", ""), 0)
        if delta:
            pub[("accepted", "")] = self.stats["events"]
            RECEIVER_ACCEPTED.labels(receiver=self.id).inc(delta)


if os.name != "posix":  # pragma: no cover
    raise ImportError("the live receiver needs Linux AF_PACKET sockets")
