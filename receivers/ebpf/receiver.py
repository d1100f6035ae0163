"""The ``ebpf`` receiver: every traced process's TCP reads and writes (and its UDP datagrams
on ``udp_ports``), from the kernel.

Contract: ``start()`` loads ``bpf/wirespan.bpf.o`` (syscall tracepoints, see the C
file's header), writes the filters into its config maps, attaches, and starts two
threads: one moves raw records out of the kernel ring into a bounded queue (and
nothing else, so the ring never waits for parsing), the other decodes them and
hands ``TcpEvent``s to ``self.next`` in batches, in ring order. Each process's view of
a socket is its own connection: ``conn_id`` is
``(pid, socket address, generation)``; ``egress`` is True for the process's writes;
``src`` is the sender. A ``close()`` ends both directions (CLOSE events) and the
next use of that socket address starts a new generation. Bytes beyond the
per-message cap (the run of bytes in one direction before the other speaks, as OBI's
large buffers) and bytes the kernel side did not copy become GAP events, counted.
``shutdown()`` detaches everything; a reload is shutdown + a new instance.

TLS (issue 15, ``tls.enabled``): uprobes on OpenSSL's SSL_read/SSL_write (ssl_probes.py) send
the plaintext as TLS_DATA records on the same ring. They become the events of a connection of
their own, ``TlsConnId(conn_id)`` (receivers/tls.py: the protocols stage adds the ``tls.*``
attributes and ``url.scheme=https``), with the same 4-tuple, pid, the calling thread's tid and
the call's direction. A connection is known to be TLS from its first handshake record at the
syscall level (``looks_like_tls``: the ServerHello gives the version and cipher) or its first
TLS_DATA record; from then on its syscall payloads are ciphertext: skipped and counted
(``tls_ciphertext``), never handed to a parser. A TLS connection that ends without plaintext
from a probe (Go's crypto/tls, GnuTLS, Java, a stripped static OpenSSL) is counted
``tls_uncovered``.

UDP (``udp_ports``, default [53]: DNS; ``[]`` turns it off): the program reports each datagram
a traced process sends or receives on a UDP socket whose local or peer port is listed
(read/write, sendto/recvfrom, sendmsg/recvmsg, sendmmsg/recvmmsg: the C file's header) as one
record; it becomes one ``DATAGRAM`` event whose ``conn_id`` is ``("udp", pid, socket address,
peer address, peer port)`` (a server's unconnected socket talks to many peers: one flow each).
A datagram longer than what the kernel side copied (16 KiB, or its first iovec) is dropped,
counted ``udp_truncated``. An unconnected socket's local address is the wildcard the process
bound (the kernel picks the source per packet): a client's ``client.address`` may read
``0.0.0.0``; the server's address and port, the peer's, are exact.

Why a run cap rather than a per-syscall cap: a 200 KB response is one write on the
server and many reads on the client; capping the run gives both views the same bytes.
"""

from __future__ import annotations

import ctypes
import logging
import os
import socket
import struct
import threading
import time
from collections import OrderedDict, deque
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from receivers.tls import HelloSniffer, TlsConnId, looks_like_tls
from service.component import ComponentConfig, Receiver
from service.model import EventKind, TcpEvent
from service.resource_detect import process_changed
from service.telemetry import (
    CONNECTIONS_EVICTED,
    EBPF_KERNEL_COUNTERS,
    EBPF_TRUNCATED_BYTES,
    RECEIVER_ACCEPTED,
    RECEIVER_DROPPED,
)

from .libbpf import BpfError, BpfObject, MmapRing, RingBuffer, check_environment, iter_chunk
from .ssl_probes import SslProbes

__all__ = ["EbpfReceiver", "EbpfConfig", "BpfError", "OBJECT_PATH", "HDR", "COUNTER_NAMES"]

log = logging.getLogger("wirespan.receivers.ebpf")

OBJECT_PATH = Path(__file__).parent / "bpf" / "wirespan.bpf.o"

#: struct rec_hdr in wirespan.bpf.c (keep in sync):
#: ts_enter, ts_exit, sock, pid, tid, total, offset, len, lport, rport, kind, egress,
#: family, last, pad, laddr, raddr, comm, stream_off, recv_end
HDR = struct.Struct("<QQQIIIIIHHBBBBI16s16s16sQQ")
#: struct ws_cfg: self_pid, filter_pids, filter_comms, filter_ports, max_call_bytes, tls, udp
CFG = struct.Struct("<7I")
#: enum counter in wirespan.bpf.c, by index (metric label ``counter``).
COUNTER_NAMES = ("ringbuf_reserve_failures", "truncated_calls", "truncated_bytes", "records",
                 "user_read_failures", "inflight_table_full", "ringbuf_reserve_failures_with_room",
                 "tls_ciphertext_calls", "tls_ciphertext_bytes", "tls_calls", "tls_no_socket_calls",
                 "tls_no_socket_bytes", "udp_datagrams", "udp_truncated")
N_COUNTERS = 14

CHUNK = 16384                     #: payload bytes per ring record (issue 9)
MAX_CALL_BYTES = 64 * CHUNK       #: MAX_RECORDS * CHUNK in the C file: 1 MiB per syscall
#: 64 MiB: room for ~4 s of 100k records/s while the process is stalled (GC, CPU
#: shared with the traced workload). The rare drops once blamed on a small ring
#: were the consumer position being rewritten non-atomically (fixed in
#: libbpf.MmapRing, issue 9); a 16 MiB ring still filled in some runs on a loaded
#: 2-core machine (bench/bench_ebpf.py prints both). It costs 64 MiB of locked
#: kernel memory per node: lower it with ``ring_size`` where memory matters more.
DEFAULT_RING_SIZE = 64 << 20
DEFAULT_MESSAGE_CAP = 64 << 10    #: OBI's large-buffer default order of magnitude (issue 9)
#: Largest configurable message cap: bounds what one connection can make us hold.
MAX_MESSAGE_CAP = 64 << 20
COMM_LEN = 16                     #: TASK_COMM_LEN, including the NUL
AF_INET, AF_INET6 = 2, 10
K_DATA, K_CLOSE, K_TLS_DATA, K_TLS_CLOSE, K_EXEC, K_DGRAM = 0, 1, 2, 3, 4, 5
#: Programs attached only with ``tls.enabled`` (the uprobes are attached per library by ssl_probes.py).
TLS_PROGRAMS = ("on_exec",)
#: A connection's syscall payloads are looked at for a TLS handshake while it has moved fewer
#: bytes than this either way (a STARTTLS-style switch, as PostgreSQL's SSLRequest, comes early).
TLS_SNIFF_BYTES = 16 << 10
_DATA, _GAP, _DATAGRAM = EventKind.DATA, EventKind.GAP, EventKind.DATAGRAM
#: Connections tracked before the least recently used one is closed (as the reassembler).
MAX_CONNECTIONS = 65536
#: How often dead processes' connections are closed and kernel counters exported.
HOUSEKEEPING_S = 1.0
#: Bytes the ring thread copies out of the kernel ring per slice (then frees them).
TAKE_BYTES = 1 << 20
#: Pause after a small take, so records are moved in batches rather than one per
#: wakeup: 5 ms is ~85 KB at 100k records/s, against a ring that holds seconds.
DRAIN_INTERVAL_S = 0.005

#: Well-known ports of the protocols wirespan parses, for per-protocol caps when the
#: protocol module is not importable (each module's DEFAULT_PORTS wins when it is).
_FALLBACK_PORTS: dict[str, tuple[int, ...]] = {
    "http": (80, 8080, 8000), "http2": (), "grpc": (50051,), "kafka": (9092,),
    "postgresql": (5432,), "mysql": (3306,), "redis": (6379,), "mongodb": (27017,),
    "mqtt": (1883,), "fastcgi": (9000,), "memcached": (11211,), "couchbase": (11210,),
}


def _protocol_ports(name: str) -> tuple[int, ...]:
    """The protocol module's DEFAULT_PORTS (via the protocol table), else well-known ones."""
    try:
        from processors.protocols import load

        mod = load(name)
        if mod is not None and mod.DEFAULT_PORTS:
            return tuple(mod.DEFAULT_PORTS)
    except Exception:
        pass  # a missing/broken module only loses the hint
    return _FALLBACK_PORTS.get(name, ())


class TlsConfig(ComponentConfig):
    """``tls:`` of the ``ebpf`` receiver: OpenSSL plaintext through uprobes."""

    #: Attach uprobes to OpenSSL's SSL_read/SSL_write in the traced processes.
    enabled: bool = True
    #: More ELF files defining SSL_read/SSL_write to attach to (a vendored libssl, a static binary).
    libraries: list[str] = []
    #: How often every process's mappings are looked at again, for libraries loaded with dlopen.
    rescan_interval: float = Field(10.0, gt=0)

    @field_validator("rescan_interval", mode="before")
    @classmethod
    def _duration(cls, v: Any) -> Any:
        from receivers.pcap import _seconds  # Go-style durations, as the other receivers' options

        return _seconds(v)


class EbpfConfig(ComponentConfig):
    """Options of the ``ebpf`` receiver (all filters are ANDed; empty = everything)."""

    #: Only these process ids (thread-group ids).
    pids: list[int] = []
    #: Only processes whose name (``comm``, first 15 bytes) is one of these.
    process_names: list[str] = []
    #: Only sockets whose local or remote port is one of these.
    ports: list[int] = []
    #: UDP datagrams to or from these ports are reported, one DATAGRAM event each (filtered in the
    #: kernel: other UDP never reaches the ring); ``[]``: no UDP. The process filters apply too.
    udp_ports: list[int] = Field(default_factory=lambda: [53])
    #: Ring buffer bytes (a power of two, at least one page).
    ring_size: int = DEFAULT_RING_SIZE
    #: Bytes kept per message (a run of bytes in one direction); the rest is a counted gap.
    max_message_bytes: int = Field(DEFAULT_MESSAGE_CAP, ge=1, le=MAX_MESSAGE_CAP)
    #: Per-protocol overrides of ``max_message_bytes``, applied by the protocol's ports.
    max_message_bytes_per_protocol: dict[str, int] = {}
    #: Per-port overrides (win over per-protocol ones).
    max_message_bytes_per_port: dict[int, int] = {}
    #: How long one ring-buffer poll waits, in milliseconds.
    poll_timeout_ms: int = Field(100, ge=1, le=5000)
    #: Events handed on per ``consume_events`` call at most.
    batch_size: int = Field(1024, ge=1)
    #: How records are read: ``mmap`` (the ring read in place, no per-record callback:
    #: ~2x faster here) or ``libbpf`` (``ring_buffer__poll`` with a ctypes callback).
    ring_reader: Literal["mmap", "libbpf"] = "mmap"
    #: Ring records copied out of the kernel and waiting to be decoded, at most (a burst
    #: buffer in pageable memory; beyond it batches are dropped, counted as ``queue_full``).
    queue_max_events: int = Field(1 << 18, ge=1)
    #: Record bytes waiting to be decoded at most.
    queue_max_bytes: int = Field(256 << 20, ge=1 << 16)
    #: Never trace wirespan's own process (it exports over TCP: tracing itself would loop).
    exclude_self: bool = True
    #: The compiled object (default: the one built by build.sh / shipped).
    object_path: str = str(OBJECT_PATH)
    #: TLS plaintext from OpenSSL (uprobes); ``{enabled: false}`` sees TLS connections as skipped ciphertext.
    tls: TlsConfig = TlsConfig()

    @field_validator("ring_size")
    @classmethod
    def _pow2(cls, v: int) -> int:
        if v < 4096 or v & (v - 1):
            raise ValueError("must be a power of two >= 4096")
        return v

    @field_validator("process_names")
    @classmethod
    def _comm(cls, v: list[str]) -> list[str]:
        for n in v:
            if not n or len(n.encode()) > COMM_LEN - 1:
                raise ValueError(f"process name {n!r}: 1 to {COMM_LEN - 1} bytes (the kernel's comm)")
        return v

    @model_validator(mode="after")
    def _caps(self) -> EbpfConfig:
        for k, cap in {**self.max_message_bytes_per_protocol, **self.max_message_bytes_per_port}.items():
            if not 1 <= cap <= MAX_MESSAGE_CAP:
                raise ValueError(f"max_message_bytes override {k}: must be 1..{MAX_MESSAGE_CAP}")
        for p in [*self.ports, *self.max_message_bytes_per_port, *self.udp_ports]:
            if not 0 < p < 65536:
                raise ValueError(f"port {p} out of range")
        return self


class _Conn:
    """One process's view of one socket."""

    __slots__ = ("cap", "hello", "id", "laddr", "lport", "pid", "plain", "pos", "raddr", "rport", "run_bytes",
                 "run_egress", "sniff", "tls", "tls_attrs")

    def __init__(self, cid: tuple, pid: int, laddr: str, lport: int, raddr: str, rport: int, cap: int) -> None:
        self.id = cid
        self.pid = pid
        self.laddr, self.lport, self.raddr, self.rport = laddr, lport, raddr, rport
        self.cap = cap
        self.run_egress: int = -1
        self.run_bytes = 0
        #: next expected stream position per direction ([0] received, [1] sent), None until seen
        self.pos: list[int | None] = [None, None]
        #: True once the connection is known to be TLS (its syscall payloads are ciphertext)
        self.tls = False
        #: payloads are still looked at for a TLS handshake (the connection's first bytes)
        self.sniff = True
        #: the ServerHello reader while a TLS connection's version is not known yet
        self.hello: HelloSniffer | None = None
        #: the connection of its TLS plaintext (TLS_DATA records), once one came
        self.plain: _Conn | None = None
        #: span attributes of a TLS connection (its plaintext's TlsConnId holds the same dict)
        self.tls_attrs: dict[str, Any] | None = None


def _addr(family: int, raw: bytes) -> str:
    if family == AF_INET:
        return socket.inet_ntop(socket.AF_INET, raw[:4])
    if raw[:12] == b"\0" * 10 + b"\xff\xff":  # v4-mapped: report as IPv4
        return socket.inet_ntop(socket.AF_INET, raw[12:16])
    return socket.inet_ntop(socket.AF_INET6, raw)


class EbpfReceiver(Receiver):
    """Syscall-level capture of TCP payloads with eBPF (syscall tracepoints + ring buffer)."""

    type = "ebpf"
    Config = EbpfConfig

    def __init__(self, id: str, config: EbpfConfig, next: Any = None) -> None:
        super().__init__(id, config, next)
        self._obj: BpfObject | None = None
        self._probes: SslProbes | None = None
        self._rb: RingBuffer | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._ring: MmapRing | None = None
        #: raw records waiting for the dispatcher: (MmapRing chunk or list of records, records, bytes)
        self._q: deque[tuple[bytes | list[bytes], int, int]] = deque()
        self._q_cv = threading.Condition()
        self._q_events = self._q_bytes = 0
        self._q_busy = False
        self._rb_records: list[bytes] = []
        self._ring_done = False
        self._dispatcher: threading.Thread | None = None
        self._out: list[TcpEvent] = []
        self._gap_cap = self._gap_kernel = self._gap_lost = self._nrec = 0
        self._tls_skipped = 0
        self._conns: OrderedDict[tuple, _Conn] = OrderedDict()
        self._gen: dict[tuple, int] = {}
        self._last_counters = [0] * N_COUNTERS
        self._mono_to_epoch = time.time_ns() - time.monotonic_ns()
        self._cap_by_port: dict[int, int] = {}
        for proto, cap in config.max_message_bytes_per_protocol.items():
            for p in _protocol_ports(proto):
                self._cap_by_port[p] = cap
        self._cap_by_port.update(config.max_message_bytes_per_port)
        #: ring_fill_max: the most bytes seen waiting in the kernel ring (mmap reader)
        self.stats = {"records": 0, "events": 0, "gap_bytes": 0, "closes": 0, "queue_dropped": 0,
                      "ring_fill_max": 0, "tls": {"connections": 0, "plaintext_records": 0, "ciphertext_records": 0,
                                                  "ciphertext_bytes": 0, "uncovered_connections": 0}}
        self._comm_cache: dict[bytes, str] = {}
        self._addr_cache: dict[tuple[int, bytes], str] = {}  # UDP peers' raw addresses -> text (bounded)
        self._pending_close: list[TcpEvent] = []
        self._counter_snapshot: dict[str, int] = {}
        self._labels = {
            "accepted": RECEIVER_ACCEPTED.labels(receiver=id),
            "trunc_cap": EBPF_TRUNCATED_BYTES.labels(receiver=id, where="message_cap"),
            "trunc_kernel": EBPF_TRUNCATED_BYTES.labels(receiver=id, where="kernel"),
            "trunc_lost": EBPF_TRUNCATED_BYTES.labels(receiver=id, where="ring_full"),
        }

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        c = self.config
        check_environment()
        # the kernel copies at most this per syscall (and never more than 1 MiB)
        max_call = min(MAX_CALL_BYTES, max([c.max_message_bytes, *self._cap_by_port.values()]))
        self._obj = obj = BpfObject(c.object_path, {"events": c.ring_size})
        try:
            self._write_filters(max_call)
            tls = c.tls.enabled
            # uprobes (up_*/uret_*) are attached per library below, not by their section name
            obj.attach_all(skip=lambda n: n.startswith(("up_", "uret_")) or (not tls and n in TLS_PROGRAMS))
            if tls:
                self._probes = SslProbes(obj, c.tls.libraries, c.tls.rescan_interval, self._want_pid, self.id)
                self._probes.start()
            if c.ring_reader == "mmap":
                self._ring = MmapRing(obj.map_fd("events"), c.ring_size)
            else:
                self._rb = RingBuffer(obj, "events", self._on_record)
        except BaseException:
            self._close_bpf()
            raise
        self._stop.clear()
        self._ring_done = False
        self._dispatcher = threading.Thread(target=self._dispatch, name=f"ebpf-{self.id}-out", daemon=True)
        self._dispatcher.start()
        self._thread = threading.Thread(target=self._run, name=f"ebpf-{self.id}", daemon=True)
        self._thread.start()
        log.info("%s: attached to syscall tracepoints (ring %d MiB)%s", self.id, c.ring_size >> 20,
                 f", OpenSSL uprobes on {self._probes.stats['files_attached']} files" if self._probes else "")

    def _want_pid(self, pid: int) -> bool:
        """The process filters, for the TLS library scans (the BPF side applies them per call too)."""
        c = self.config
        if c.pids and pid not in c.pids:
            return False
        if c.process_names:
            try:
                with open(f"/proc/{pid}/comm", "rb") as f:
                    comm = f.read().rstrip(b"\n").decode(errors="replace")
            except OSError:
                return False
            return comm in c.process_names
        return True

    def _write_filters(self, max_call: int) -> None:
        c, obj = self.config, self._obj
        assert obj is not None
        for pid in c.pids:
            obj.update("pid_filter", struct.pack("<I", pid), b"\1")
        for name in c.process_names:
            obj.update("comm_filter", name.encode().ljust(COMM_LEN, b"\0"), b"\1")
        for port in c.ports:
            obj.update("port_filter", struct.pack("<H", port), b"\1")
        for port in c.udp_ports:
            obj.update("udp_port_filter", struct.pack("<H", port), b"\1")
        self_pid = os.getpid() if c.exclude_self else 0
        obj.update("ws_config", struct.pack("<I", 0),
                   CFG.pack(self_pid, bool(c.pids), bool(c.process_names), bool(c.ports), max_call,
                            bool(c.tls.enabled), bool(c.udp_ports)))

    def shutdown(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        else:
            self._close_bpf()
        self._finish_dispatch()

    def _finish_dispatch(self) -> None:
        with self._q_cv:
            self._ring_done = True
            self._q_cv.notify_all()
        if self._dispatcher is not None:
            self._dispatcher.join(timeout=30)
            self._dispatcher = None

    def flush(self) -> None:
        """Wait until what the ring thread queued has been decoded and handed on."""
        deadline = time.monotonic() + 10
        while (self._q or self._q_busy) and time.monotonic() < deadline:
            time.sleep(0.01)

    def _close_bpf(self) -> None:
        if self._probes is not None:
            self._probes.stop()  # before the object goes: its thread attaches to it
            self.stats["tls"]["probes"] = dict(self._probes.stats)
        if self._rb is not None:
            self._rb.free()
            self._rb = None
        if self._ring is not None:
            self._ring.free()
            self._ring = None
        if self._obj is not None:
            self._export_counters()
            self._counter_snapshot = dict(zip(COUNTER_NAMES, self._last_counters, strict=False))
            self._obj.close()
            self._obj = None

    # ------------------------------------------------------------------ ring thread
    # Two threads: this one only moves raw records from the kernel ring into a
    # bounded queue (one slice per batch with the mmap reader), so the ring is
    # emptied at memcpy speed whatever the protocols stage costs; the dispatcher
    # decodes them into TcpEvents and hands them on. A queue of bytes rather than
    # of events also keeps a backlog out of the GC's way (issue 9: a backlog of
    # ~150k queued TcpEvents made gen-2 collections take up to 300 ms).
    def _on_record(self, addr: int, size: int) -> int:
        """libbpf callback (fallback reader): the ring memory is released when this
        returns, so the record is copied once (at most 16 KiB + header)."""
        self._rb_records.append(ctypes.string_at(addr, size))
        return 0

    def _run(self) -> None:
        next_house = time.monotonic() + HOUSEKEEPING_S
        timeout_s = self.config.poll_timeout_ms / 1000
        limit = TAKE_BYTES
        ring, rb = self._ring, self._rb
        try:
            while not self._stop.is_set():
                taken = 0
                if ring is not None:
                    ring.wait(timeout_s)
                    while (got := ring.take(limit)) is not None:
                        taken += len(got[0])
                        self._enqueue(got[0], got[1], len(got[0]))
                else:
                    assert rb is not None
                    rc = rb.poll(self.config.poll_timeout_ms)
                    if rc < 0 and rc != -4:  # -EINTR is harmless
                        log.error("%s: ring buffer poll failed: %s", self.id, os.strerror(-rc))
                        time.sleep(0.1)
                    taken = self._enqueue_records()
                if 0 < taken < limit // 4:
                    # Caught up: the kernel wakes a caught-up reader for every record,
                    # so let records gather first (the ring holds seconds of traffic).
                    self._stop.wait(DRAIN_INTERVAL_S)
                now = time.monotonic()
                if now >= next_house:
                    next_house = now + HOUSEKEEPING_S
                    self._export_counters()
                    if ring is not None:
                        self.stats["ring_fill_max"] = ring.max_fill
            # drain what is left, then detach
            if ring is not None:
                while (got := ring.take(limit)) is not None:
                    self._enqueue(got[0], got[1], len(got[0]))
                self.stats["ring_fill_max"] = ring.max_fill
            elif rb is not None:
                while rb.poll(0) > 0:
                    self._enqueue_records()
                self._enqueue_records()
        except Exception:
            log.exception("%s: receiver loop failed", self.id)
        finally:
            self._close_bpf()
            self.done.set()

    def _enqueue_records(self) -> int:
        recs, self._rb_records = self._rb_records, []
        if not recs:
            return 0
        nbytes = sum(len(r) for r in recs)
        self._enqueue(recs, len(recs), nbytes)
        return nbytes

    def _enqueue(self, item: bytes | list[bytes], nrec: int, nbytes: int) -> None:
        """Queue raw records for the dispatcher; a full queue drops them, counted as
        ``queue_full`` (the stream positions turn the loss into gaps downstream)."""
        cfg = self.config
        with self._q_cv:
            if (self._q_events + nrec > cfg.queue_max_events
                    or self._q_bytes + nbytes > cfg.queue_max_bytes):
                RECEIVER_DROPPED.labels(receiver=self.id, reason="queue_full").inc(nrec)
                self.stats["queue_dropped"] += nrec
                return
            self._q.append((item, nrec, nbytes))
            self._q_events += nrec
            self._q_bytes += nbytes
            self._q_cv.notify()

    # ------------------------------------------------------------------ dispatcher thread
    def _dispatch(self) -> None:
        """Decode queued records and hand the events on in order, until the ring thread has finished."""
        q, cv = self._q, self._q_cv
        next_house = time.monotonic() + HOUSEKEEPING_S
        overdue = HOUSEKEEPING_S * 10
        hdr, hlen = HDR.unpack_from, HDR.size
        while True:
            with cv:
                while not q and not self._ring_done:
                    cv.wait(HOUSEKEEPING_S / 2)
                    if not q and time.monotonic() >= next_house:
                        break
                if q:
                    item, nrec, nbytes = q.popleft()
                    self._q_events -= nrec
                    self._q_bytes -= nbytes
                    self._q_busy = True
                elif self._ring_done:
                    return
                else:
                    item = None
            try:
                if item is not None:
                    one = self._one
                    if isinstance(item, bytes):
                        for off, _size in iter_chunk(item):
                            h = hdr(item, off)
                            n = h[7]
                            # one copy per payload, so a message a parser keeps does not pin the chunk
                            one(h, item[off + hlen:off + hlen + n] if n else None)
                    else:
                        for rec in item:
                            h = hdr(rec)
                            n = h[7]
                            one(h, memoryview(rec)[hlen:hlen + n] if n else None)
                    self._flush_out()
                now = time.monotonic()
                # processes that exited: only once their queued records are decoded
                if now >= next_house and (not q or now >= next_house + overdue):
                    next_house = now + HOUSEKEEPING_S
                    self._housekeeping()
            except Exception:
                log.exception("%s: decoding ring records failed", self.id)
            finally:
                self._q_busy = False

    def _one(self, h: tuple, payload: Any) -> None:
        """One ring record -> DATA/GAP/CLOSE events appended to ``self._out``."""
        (ts_in, ts_out, sk, pid, tid, total, offset, n, lport, rport, kind, egress, family, last, _p,
         laddr, raddr, comm, stream_off, recv_end) = h
        out = self._out
        key = (pid, sk)
        c = self._conns.get(key)
        epoch = self._mono_to_epoch
        if kind != K_DATA and kind != K_TLS_DATA:
            if kind == K_DGRAM:
                self._datagram(h, payload)
            elif kind == K_CLOSE:
                if c is not None:
                    # Where each direction ended (stream_off: sent, recv_end: received): the
                    # records of a tail lost to a full ring leave no later record to show the hole.
                    if not c.tls:
                        self._tail_gaps(c, (recv_end, stream_off), ts_out + epoch, out, tid, comm)
                    self._close(c, ts_out + epoch, out, tid, comm)
            elif kind == K_TLS_CLOSE:
                if c is not None and c.plain is not None:
                    self._tail_gaps(c.plain, (recv_end, stream_off), ts_out + epoch, out, tid, comm)
            elif kind == K_EXEC:
                process_changed(pid)  # its cached resource (service/resource_detect.py) is another's now
                if self._probes is not None:
                    self._probes.exec(pid)
            return
        if c is None:
            c = self._new_conn(key, pid, family, laddr, lport, raddr, rport)
        else:
            self._conns.move_to_end(key)
        if kind == K_TLS_DATA:
            if c.plain is None:
                self._plain_conn(c)
            self.stats["tls"]["plaintext_records"] += 1
            c = c.plain  # the plaintext: positions, caps and gaps of its own
        elif c.tls or (c.sniff and self._sniff(c, offset, stream_off, payload)):
            # ciphertext at the syscall level: skipped and counted; its handshake says the version
            t = self.stats["tls"]
            t["ciphertext_records"] += 1
            t["ciphertext_bytes"] += n
            self._tls_skipped += 1
            if c.hello is not None and n and c.hello.feed(egress & 1, payload):
                c.tls_attrs.update(c.hello.attrs())  # type: ignore[union-attr]
                c.hello = None
            return
        if egress:
            src, sport, dst, dport, ts = c.laddr, c.lport, c.raddr, c.rport, ts_in + epoch
        else:
            src, sport, dst, dport, ts = c.raddr, c.rport, c.laddr, c.lport, ts_out + epoch
        name = self._comm_cache.get(comm)
        if name is None:
            name = self._comm_cache[comm] = comm.split(b"\0", 1)[0].decode(errors="replace")
        if c.run_egress != egress:
            c.run_egress = egress
            c.run_bytes = 0
        # Stream positions: a record starting past where the last one ended means
        # records were lost (ring full): a gap, so the parser resyncs instead of
        # splicing unrelated bytes. A position behind (the kernel's table entry was
        # recycled) just restarts the count.
        start = stream_off + offset
        d = egress & 1
        expect = c.pos[d]
        gap = 0
        if expect is not None and start > expect:
            lost = start - expect
            self._gap_lost += lost
            c.run_bytes += lost
            out.append(TcpEvent(_GAP, c.id, src, sport, dst, dport, ts, None, lost, None,
                                bool(egress), pid, tid, name))
        if n:
            room = c.cap - c.run_bytes
            if room < n:
                gap = n - max(room, 0)
                payload = memoryview(payload)[:room] if room > 0 else None
            c.run_bytes += n
            if payload is not None:
                out.append(TcpEvent(_DATA, c.id, src, sport, dst, dport, ts, payload, 0, None,
                                    bool(egress), pid, tid, name))
            self._gap_cap += gap
        end = start + n
        if last:
            missing = total - offset - n  # bytes the kernel side did not copy
            if missing > 0:
                gap += missing
                self._gap_kernel += missing
                c.run_bytes += missing
                end += missing
        c.pos[d] = end
        if gap:
            out.append(TcpEvent(_GAP, c.id, src, sport, dst, dport, ts, None, gap, None,
                                bool(egress), pid, tid, name))
        self._nrec += 1

    def _datagram(self, h: tuple, payload: Any) -> None:
        """One UDP datagram record -> one DATAGRAM event (or a counted drop when cut short)."""
        (ts_in, ts_out, sk, pid, tid, total, _o, n, lport, rport, _k, egress, family, _l, _p,
         laddr, raddr, comm, _so, _re) = h
        self._nrec += 1
        if n < total or payload is None:
            RECEIVER_DROPPED.labels(receiver=self.id, reason="udp_truncated").inc()
            self.stats["udp_truncated"] = self.stats.get("udp_truncated", 0) + 1
            return
        cache = self._addr_cache
        la = cache.get((family, laddr))
        if la is None:
            if len(cache) > 65536:
                cache.clear()
            la = cache[(family, laddr)] = _addr(family, laddr)
        ra = cache.get((family, raddr))
        if ra is None:
            ra = cache[(family, raddr)] = _addr(family, raddr)
        name = self._comm_cache.get(comm)
        if name is None:
            name = self._comm_cache[comm] = comm.split(b"\0", 1)[0].decode(errors="replace")
        cid = ("udp", pid, sk, ra, rport)
        epoch = self._mono_to_epoch
        if egress:
            ev = TcpEvent(_DATAGRAM, cid, la, lport, ra, rport, ts_in + epoch, payload, 0, None, True, pid, tid, name)
        else:
            ev = TcpEvent(_DATAGRAM, cid, ra, rport, la, lport, ts_out + epoch, payload, 0, None, False, pid, tid,
                          name)
        self._out.append(ev)
        self.stats["datagrams"] = self.stats.get("datagrams", 0) + 1

    def _sniff(self, c: _Conn, offset: int, stream_off: int, payload: Any) -> bool:
        """Is this syscall record the start of a TLS handshake? (Then the connection is TLS.)"""
        if stream_off + offset >= TLS_SNIFF_BYTES:
            c.sniff = False  # past where a handshake (or a STARTTLS switch) would start
            return False
        if offset or payload is None or not looks_like_tls(payload):
            return False
        self._mark_tls(c)
        return True

    def _mark_tls(self, c: _Conn) -> None:
        c.tls = True
        c.sniff = False
        c.hello = HelloSniffer()
        c.tls_attrs = {"tls.protocol.name": "tls"}
        self.stats["tls"]["connections"] += 1

    def _plain_conn(self, c: _Conn) -> None:
        """The first TLS_DATA record of a connection: its plaintext's own connection."""
        if not c.tls:
            self._mark_tls(c)  # began before wirespan did, or its handshake was not seen
            c.hello = None
        p = _Conn(TlsConnId(c.id, c.tls_attrs), c.pid, c.laddr, c.lport, c.raddr, c.rport, c.cap)
        p.tls, p.sniff = True, False
        c.plain = p

    def _tail_gaps(self, c: _Conn, ends: tuple[int, int], ts: int, out: list[TcpEvent], tid: int | None,
                   comm: bytes) -> None:
        """GAP events for bytes a direction moved after the last record received of it."""
        for d in (0, 1):
            expect = c.pos[d]
            if expect is None or ends[d] <= expect:
                continue  # nothing seen that way (no position to anchor), or nothing missing
            lost = ends[d] - expect
            self._gap_lost += lost
            c.pos[d] = ends[d]
            name = comm.split(b"\0", 1)[0].decode(errors="replace")
            if d:  # sent by this process
                out.append(TcpEvent(_GAP, c.id, c.laddr, c.lport, c.raddr, c.rport, ts, None, lost, None,
                                    True, c.pid, tid, name))
            else:
                out.append(TcpEvent(_GAP, c.id, c.raddr, c.rport, c.laddr, c.lport, ts, None, lost, None,
                                    False, c.pid, tid, name))

    def _flush_out(self) -> None:
        if self._gap_cap or self._gap_kernel or self._gap_lost:
            self.stats["gap_bytes"] += self._gap_cap + self._gap_kernel + self._gap_lost
            if self._gap_cap:
                self._labels["trunc_cap"].inc(self._gap_cap)
            if self._gap_kernel:
                self._labels["trunc_kernel"].inc(self._gap_kernel)
            if self._gap_lost:
                self._labels["trunc_lost"].inc(self._gap_lost)
            self._gap_cap = self._gap_kernel = self._gap_lost = 0
        self.stats["records"] += self._nrec
        self._nrec = 0
        if self._tls_skipped:
            RECEIVER_DROPPED.labels(receiver=self.id, reason="tls_ciphertext").inc(self._tls_skipped)
            self._tls_skipped = 0
        if self._out:
            out, self._out = self._out, []
            self._deliver(out)

    def _deliver(self, out: list[TcpEvent]) -> None:
        """Hand events downstream in batches (dispatcher thread)."""
        if not out:
            return
        self.stats["events"] += len(out)
        self._labels["accepted"].inc(len(out))
        if self.next is None:
            return
        bs = self.config.batch_size
        for i in range(0, len(out), bs):
            try:
                self.next.consume_events(out[i:i + bs] if len(out) > bs else out)
            except Exception:
                log.exception("%s: downstream consume_events failed", self.id)
                RECEIVER_DROPPED.labels(receiver=self.id, reason="downstream_error").inc(
                    min(bs, len(out) - i))

    def _new_conn(self, key: tuple, pid: int, family: int, laddr: bytes, lport: int, raddr: bytes,
                  rport: int) -> _Conn:
        gen = self._gen.get(key, 0)
        cap = self._cap_by_port.get(lport) or self._cap_by_port.get(rport) or self.config.max_message_bytes
        c = _Conn((pid, key[1], gen), pid, _addr(family, laddr), lport, _addr(family, raddr), rport, cap)
        self._conns[key] = c
        if len(self._conns) > MAX_CONNECTIONS:
            _, old = self._conns.popitem(last=False)
            CONNECTIONS_EVICTED.labels(component=self.id, reason="lru").inc()
            self._close(old, time.time_ns(), self._pending_close, None, None, forget=False)
        return c

    def _close(self, c: _Conn, ts: int, out: list[TcpEvent], tid: int | None, comm: bytes | str | None,
               forget: bool = True) -> None:
        key = (c.pid, c.id[1])
        if forget:
            self._conns.pop(key, None)
        self._gen[key] = c.id[2] + 1
        if len(self._gen) > 4 * MAX_CONNECTIONS:
            self._gen.clear()  # addresses get reused anyway; generations only need to differ locally
        name = comm.split(b"\0", 1)[0].decode(errors="replace") if isinstance(comm, bytes) else comm
        self.stats["closes"] += 1
        ids = [c.id]
        if c.plain is not None:
            ids.append(c.plain.id)
            c.plain = None
        elif c.tls:
            # TLS seen at the syscall level, never a plaintext record: a library the probes do not cover
            self.stats["tls"]["uncovered_connections"] += 1
            RECEIVER_DROPPED.labels(receiver=self.id, reason="tls_uncovered").inc()
        for cid in ids:
            out.append(TcpEvent(EventKind.CLOSE, cid, c.laddr, c.lport, c.raddr, c.rport, ts, None, 0, None,
                                True, c.pid, tid, name))
            out.append(TcpEvent(EventKind.CLOSE, cid, c.raddr, c.rport, c.laddr, c.lport, ts, None, 0, None,
                                False, c.pid, tid, name))

    # ------------------------------------------------------------------ housekeeping
    def _housekeeping(self) -> None:
        """Close connections of processes that exited (the kernel closes their fds
        without a close() syscall). Dispatcher thread: it owns the connection table."""
        self._mono_to_epoch = time.time_ns() - time.monotonic_ns()
        out: list[TcpEvent] = []
        pids = {c.pid for c in self._conns.values()}
        dead = {p for p in pids if not os.path.exists(f"/proc/{p}")}
        for p in dead:
            process_changed(p)  # its pid may be reused: the cached resource goes with it
        if dead:
            now = time.time_ns()
            for c in [c for c in self._conns.values() if c.pid in dead]:
                CONNECTIONS_EVICTED.labels(component=self.id, reason="process_exited").inc()
                self._close(c, now, out, None, None)
        if self._pending_close:
            out.extend(self._pending_close)
            self._pending_close = []
        self._deliver(out)

    def _export_counters(self) -> None:
        if self._obj is None:
            return
        try:
            vals = self._obj.percpu_u64_sums("counters", N_COUNTERS)
        except Exception:
            return
        for i, name in enumerate(COUNTER_NAMES):
            d = vals[i] - self._last_counters[i]
            if d > 0:
                EBPF_KERNEL_COUNTERS.labels(receiver=self.id, counter=name).inc(d)
                if name == "ringbuf_reserve_failures":
                    RECEIVER_DROPPED.labels(receiver=self.id, reason="ringbuf_full").inc(d)
        self._last_counters = vals

    def kernel_counters(self) -> dict[str, int]:
        """The BPF-side counters so far (for tests, benchmarks and debugging)."""
        if self._obj is not None:
            try:
                return dict(zip(COUNTER_NAMES, self._obj.percpu_u64_sums("counters", N_COUNTERS), strict=False))
            except Exception:
                pass
        return dict(self._counter_snapshot)
