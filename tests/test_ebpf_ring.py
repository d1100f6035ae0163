"""The mmap ring reader's contract with the kernel's producers (root, real BPF ring map).

Producers on every CPU read the consumer position without a lock; if they ever see
a value the consumer did not publish (e.g. 0 while the field is being rewritten),
``bpf_ringbuf_output`` fails as if the ring were full. Issue 9's rare ring drops at
any ring size were exactly that: ``struct.pack_into`` zero-fills the field before
writing it. This test watches the consumer page from a second process while
``MmapRing.consume`` publishes, on a real ``BPF_MAP_TYPE_RINGBUF``.
"""

from __future__ import annotations

import ctypes
import os
import struct
import time

from receivers.ebpf.libbpf import RINGBUF_DISCARD, MmapRing, _load, iter_chunk
from tests.support.ebpf import needs_ebpf

pytestmark = needs_ebpf(__name__)

BPF_MAP_TYPE_RINGBUF = 27
RING = 1 << 16
#: a position past 4 GiB with low bits set: any partial or zero-filled write shows
POS = (1 << 32) + (1 << 20) + 8
WATCH_S = 0.6


def _ring_map() -> int:
    lib = _load()
    fn = lib.bpf_map_create
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32, ctypes.c_uint32, ctypes.c_uint32, ctypes.c_void_p]
    fd = fn(BPF_MAP_TYPE_RINGBUF, b"ws_test_ring", 0, 0, RING, None)
    assert fd >= 0, f"bpf_map_create(RINGBUF) failed: {fd}"
    return fd


def test_consumer_position_is_published_whole() -> None:
    fd = _ring_map()
    ring = MmapRing(fd, RING)
    try:
        ctypes.c_uint64.from_buffer(ring._cons, 0).value = POS  # no producer: the kernel never checks it
        rd, wr = os.pipe()
        pid = os.fork()
        if pid == 0:  # watcher: a second process reading the shared page with 8-byte loads
            bad = seen = 0
            cell = ctypes.c_uint64.from_buffer(ring._cons, 0)
            os.write(wr, b"r")
            end = time.monotonic() + WATCH_S
            while time.monotonic() < end:
                for _ in range(1000):
                    seen += 1
                    if cell.value != POS:
                        bad += 1
            os.write(wr, f"{seen} {bad}".encode())
            os._exit(0)
        os.close(wr)
        assert os.read(rd, 1) == b"r"
        calls = 0
        end = time.monotonic() + WATCH_S
        while time.monotonic() < end:
            for _ in range(1000):
                ring.consume(lambda *_: None)  # nothing to read: it republishes POS each call
            calls += 1000
        seen, bad = map(int, os.read(rd, 64).split())
        os.waitpid(pid, 0)
        os.close(rd)
        assert calls > 10_000 and seen > 10_000
        assert bad == 0, f"a producer could read a consumer position never published ({bad} of {seen} reads)"
    finally:
        ring.free()
        os.close(fd)


def test_iter_chunk_walks_kernel_records_and_skips_discarded() -> None:
    """``MmapRing.take`` chunks keep the kernel's layout: 8-byte header, records padded to 8."""
    def rec(data: bytes, flags: int = 0) -> bytes:
        return struct.pack("<II", len(data) | flags, 0) + data + b"\0" * (-len(data) % 8)

    chunk = rec(b"first") + rec(b"dropped!", RINGBUF_DISCARD) + rec(b"") + rec(b"x" * 16)
    got = [chunk[off:off + n] for off, n in iter_chunk(chunk)]
    assert got == [b"first", b"", b"x" * 16]


def test_close_positions_turn_a_lost_tail_into_gaps() -> None:
    """The records at the end of a write lost to a full ring leave no later data record to
    show the hole: the close record's end positions must (sent: stream_off, received: recv_end)."""
    import socket as _socket

    from receivers.ebpf.receiver import K_CLOSE, K_DATA, EbpfConfig, EbpfReceiver
    from service.model import EventKind

    rx = EbpfReceiver("ebpf", EbpfConfig(), None)
    v4 = _socket.inet_aton("127.0.0.1") + bytes(12)
    comm = b"srv".ljust(16, b"\0")

    def rec(kind: int, egress: int, stream_off: int, n: int, total: int, last: int, recv_end: int = 0) -> tuple:
        # (ts_in, ts_out, sk, pid, tid, total, offset, n, lport, rport, kind, egress, family, last, pad,
        #  laddr, raddr, comm, stream_off, recv_end)
        return (1, 2, 0xABC, 42, 42, total, 0, n, 8080, 50000, kind, egress, _socket.AF_INET, last, 0,
                v4, v4, comm, stream_off, recv_end)

    rx._one(rec(K_DATA, 0, 0, 20, 20, 1), memoryview(b"GET / HTTP/1.1\r\n\r\n\0\0"))  # 20 bytes received
    rx._one(rec(K_DATA, 1, 0, 100, 5000, 0), memoryview(bytes(100)))  # first record of a 5000-byte write
    rx._one(rec(K_CLOSE, 0, 5000, 0, 0, 1, recv_end=20), None)  # the other records of the write were lost
    kinds = [(e.kind, e.egress, e.gap if e.kind == EventKind.GAP else len(e.payload or b"")) for e in rx._out]
    assert kinds == [
        (EventKind.DATA, False, 20),
        (EventKind.DATA, True, 100),
        (EventKind.GAP, True, 4900),  # sent 5000, delivered 100: the lost tail, at its position
        (EventKind.CLOSE, True, 0),
        (EventKind.CLOSE, False, 0),
    ]
