"""pcap/pcapng readers and the ``pcap`` receiver.

Checked against dpkt and tshark on the same files: real captures (tcpdump of a real
``http.server`` with urllib and curl clients) and generated ones (tests/support/pcapgen.py).
Hand-built files cover both byte orders, µs/ns, pcapng interfaces with their own link
types and resolutions, simple/obsolete packet blocks, unknown blocks and cut files.
Hypothesis mutates valid files: readers must never raise while iterating.
"""

from __future__ import annotations

import io
import logging
import mmap
import os
import re
import shutil
import struct
import subprocess
import sys
import time
import tracemalloc
import urllib.request
from collections import defaultdict
from pathlib import Path

import dpkt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from receivers.packet import LINKTYPE_ETHERNET, LINKTYPE_LINUX_SLL2, LINKTYPE_NULL, LINKTYPE_RAW, decode
from receivers.pcap import (
    MAX_CAPLEN,
    CaptureError,
    PcapConfig,
    PcapngReader,
    PcapReader,
    PcapReceiver,
    check_capture,
    open_capture,
    reader_for,
)
from service.model import EventKind
from service.telemetry import REGISTRY
from tests.support import pcapgen as g
from tests.support.capture import free_port, tcpdump, wait_port

T0 = 1_700_000_000_123_456_789
TSHARK = shutil.which("tshark")


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------
class Sink:
    def __init__(self) -> None:
        self.events: list = []
        self.batches: list[int] = []

    def consume_events(self, events: list) -> None:
        self.batches.append(len(events))
        self.events.extend(events)


def replay(path, **cfg) -> tuple[PcapReceiver, Sink]:
    sink = Sink()
    rc = PcapReceiver("pcap/test", {"path": str(path), "progress": False, **cfg}, sink)
    rc.start()
    assert rc.done.wait(60), "receiver did not finish"
    rc.shutdown()
    return rc, sink


def by_direction(events) -> dict[tuple, bytes]:
    out: dict[tuple, bytearray] = defaultdict(bytearray)
    for e in events:
        if e.kind == EventKind.DATA:
            out[(e.src, e.sport, e.dst, e.dport)] += e.payload
    return {k: bytes(v) for k, v in out.items()}


def tshark_directions(path) -> tuple[int, dict[tuple, bytes]]:
    """Packet count and TCP payload bytes per direction, as Wireshark's dissectors see them."""
    out = subprocess.run(
        [TSHARK, "-r", str(path), "-T", "fields", "-E", "separator=|", "-e", "ip.src", "-e", "ipv6.src",
         "-e", "tcp.srcport", "-e", "ip.dst", "-e", "ipv6.dst", "-e", "tcp.dstport", "-e", "tcp.payload"],
        capture_output=True, check=True, text=True).stdout
    lines = out.splitlines()
    d: dict[tuple, bytearray] = defaultdict(bytearray)
    for ln in lines:
        s4, s6, sp, d4, d6, dp, pl = ln.split("|")
        if pl:
            d[(s4 or s6, int(sp), d4 or d6, int(dp))] += bytes.fromhex(pl.replace(":", ""))
    return len(lines), {k: bytes(v) for k, v in d.items()}


def frames(reader) -> list[tuple[int, int, bytes]]:
    return [(lt, ts, bytes(reader.view[o:e])) for lt, ts, o, e in reader]


def http_flow_packets(n_conns: int = 3, n_req: int = 4, v6: bool = False) -> list[bytes]:
    pk = []
    flows = []
    for c in range(n_conns):
        cli = (f"2001:db8::{c + 10:x}" if v6 else f"10.0.0.{c + 10}", 50000 + c)
        srv = ("2001:db8::1" if v6 else "10.0.0.1", 8080)
        flows.append(g.TcpFlow(cli, srv, isn_client=1000 * c + 7, isn_server=99 * c + 3))
    for f in flows:
        pk += f.handshake()
    for i in range(n_req):
        for c, f in enumerate(flows):
            pk.append(f.send(True, f"GET /item/{c}/{i} HTTP/1.1\r\nHost: x\r\n\r\n".encode()))
            body = b"z" * (i * 10)
            pk.append(f.send(False, b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)))
    for f in flows:
        pk += [f.fin(True), f.fin(False), f.ack(True)]
    return pk


# ---------------------------------------------------------------------------
# classic pcap
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("nanos", [False, True])
@pytest.mark.parametrize("big_endian", [False, True])
def test_pcap_byte_orders_and_resolutions(nanos, big_endian):
    pk = http_flow_packets(2, 2)
    buf = io.BytesIO()
    w = g.PcapWriter(buf, g.LINKTYPE_ETHERNET, nanos=nanos, big_endian=big_endian)
    for i, p in enumerate(pk):
        w.packet(g.ether(p), T0 + i * 1_000_001)
    r = reader_for(buf.getvalue())
    assert isinstance(r, PcapReader) and r.linktype == 1
    got = frames(r)
    assert r.error is None
    assert [f[2] for f in got] == [g.ether(p) for p in pk]
    exp_ts = [T0 + i * 1_000_001 for i in range(len(pk))]
    if not nanos:
        exp_ts = [t // 1000 * 1000 for t in exp_ts]
    assert [f[1] for f in got] == exp_ts
    # dpkt reads the same records
    dp = list(dpkt.pcap.Reader(io.BytesIO(buf.getvalue())))
    assert [bytes(b) for _, b in dp] == [f[2] for f in got]
    assert all(abs(float(t) - f[1] / 1e9) < 2e-6 for (t, _), f in zip(dp, got, strict=True))


def test_pcap_truncated_in_record_header_and_in_data():
    data = g.write_pcap(None, [g.ether(p) for p in http_flow_packets(1, 3)])
    full = list(reader_for(data))
    n = len(full)
    last_off = full[-1][2] - 16
    r = reader_for(data[:last_off + 7])  # cut inside the last record header
    assert len(list(r)) == n - 1 and "truncated record header" in r.error
    r = reader_for(data[:last_off + 20])  # header complete, data cut
    assert len(list(r)) == n - 1 and "truncated packet record" in r.error
    r = reader_for(data[:24])
    assert list(r) == [] and r.error is None


def test_not_a_capture():
    with pytest.raises(CaptureError):
        reader_for(b"hello world, not a capture")
    with pytest.raises(CaptureError):
        reader_for(b"\xd4\xc3\xb2\xa1\x02\x00")  # pcap magic, header cut
    with pytest.raises(CaptureError):
        reader_for(b"")


# ---------------------------------------------------------------------------
# pcapng
# ---------------------------------------------------------------------------
def build_pcapng(big_endian: bool = False) -> tuple[bytes, list[tuple[int, int, bytes]]]:
    """Three interfaces (Ethernet µs, SLL2 ns, raw 2^-20 s with a 10 s offset), every block kind."""
    buf = io.BytesIO()
    w = g.PcapngWriter(buf, big_endian=big_endian)
    e0 = w.interface(g.LINKTYPE_ETHERNET, name="eth0")
    e1 = w.interface(g.LINKTYPE_LINUX_SLL2, tsresol=9, snaplen=65535)
    e2 = w.interface(g.LINKTYPE_RAW, tsresol=0x80 | 20, tsoffset=10)
    w.block(4, b"\x00" * 8)  # name resolution block: skipped
    w.block(0x00000BAD, b"vendor stuff")  # unknown block type: skipped
    w.block(0x40000BAD, b"\x00\x00\x7e\x3c" + b"custom")  # custom block: skipped
    exp = []
    pk = http_flow_packets(2, 2)
    for i, p in enumerate(pk):
        ts = T0 + i * 333_333
        k = i % 3
        if k == 0:
            fr = g.ether(p)
            w.packet(e0, fr, ts)
            exp.append((1, ts // 1000 * 1000, fr))
        elif k == 1:
            fr = g.sll2(p)
            w.packet(e1, fr, ts)
            exp.append((276, ts, fr))
        else:
            w.packet(e2, p, ts - 10 * 10**9)
            ticks = ((ts - 10 * 10**9) << 20) // 10**9
            exp.append((101, (ticks * 10**9 >> 20) + 10 * 10**9, p))
    w.obsolete_packet(e1, g.sll2(pk[0]), T0 + 10**9)
    exp.append((276, T0 + 10**9, g.sll2(pk[0])))
    w.simple_packet(g.ether(pk[1]))
    exp.append((1, T0 + 10**9, g.ether(pk[1])))  # no time of its own: the previous packet's
    # A second section: interfaces start over (id 0 is now a NULL interface).
    w.section()
    n0 = w.interface(g.LINKTYPE_NULL, tsresol=3)
    w.packet(n0, g.null(pk[2]), T0)
    exp.append((0, T0 // 10**6 * 10**6, g.null(pk[2])))
    return buf.getvalue(), exp


@pytest.mark.parametrize("big_endian", [False, True])
def test_pcapng_interfaces_resolutions_and_blocks(big_endian):
    data, exp = build_pcapng(big_endian)
    r = reader_for(data)
    assert isinstance(r, PcapngReader)
    got = frames(r)
    assert r.error is None and r.skipped == 0
    assert got == exp
    for lt, _ts, fr in got:
        res = decode(lt, fr)
        assert not isinstance(res, str), res


@pytest.mark.skipif(TSHARK is None, reason="tshark not installed")
def test_pcapng_agrees_with_tshark(tmp_path):
    data, exp = build_pcapng()
    p = tmp_path / "multi.pcapng"
    p.write_bytes(data)
    # tshark lists unknown/custom blocks as frames without an interface: compare the packets only.
    out = subprocess.run([TSHARK, "-r", str(p), "-T", "fields", "-E", "separator=|", "-e", "frame.interface_id",
                          "-e", "frame.len", "-e", "frame.time_epoch", "-e", "tcp.srcport"],
                         capture_output=True, text=True, check=True).stdout.splitlines()
    rows = [ln.split("|") for ln in out]
    rows = [r for r in rows if r[3]]
    assert [int(r[1]) for r in rows] == [len(f) for _, _, f in exp]
    for r, (_lt, ts, _f) in zip(rows, exp, strict=True):
        if r[2]:  # the simple packet block has no time
            assert abs(float(r[2]) * 1e9 - ts) < 2000


def test_pcapng_cut_and_corrupt_blocks():
    data, exp = build_pcapng()
    r = reader_for(data[:-7])
    got = frames(r)
    assert got == exp[:-1] and "truncated block" in r.error
    bad = bytearray(data)
    # Corrupt the first EPB's length field to an odd value: the reader stops there, with a reason.
    off = 0
    while True:
        bt, bl = struct.unpack_from("<II", bad, off)
        if bt == 6:
            break
        off += bl
    struct.pack_into("<I", bad, off + 4, 13)
    r = reader_for(bytes(bad))
    assert frames(r) == [] and "corrupt block length" in r.error
    # An EPB naming an interface that does not exist: skipped and counted.
    bad = bytearray(data)
    struct.pack_into("<I", bad, off + 8, 99)
    r = reader_for(bytes(bad))
    assert len(frames(r)) == len(exp) - 1 and r.skipped == 1


# ---------------------------------------------------------------------------
# the receiver
# ---------------------------------------------------------------------------
def test_receiver_events_batches_and_stats(tmp_path):
    pk = http_flow_packets(3, 4)
    path = tmp_path / "gen.pcap"
    g.write_pcap(path, [g.ether(p, vlans=[42]) for p in pk])
    rc, sink = replay(path, batch_size=5)
    ev = sink.events
    assert max(sink.batches) <= 5
    assert sum(e.kind == EventKind.OPEN for e in ev) == 3
    assert sum(e.kind == EventKind.CLOSE for e in ev) == 6
    assert sum(e.kind == EventKind.DATA for e in ev) == 3 * 4 * 2
    ts = [e.ts_ns for e in ev]
    assert ts == sorted(ts)
    st = rc.stats
    assert st["packets"] == len(pk) and st["connections"] == 3 and st["events"] == len(ev)
    assert st["drops"] == {} and st["errors"] == []
    assert st["bytes"] == sum(len(g.ether(p, vlans=[42])) for p in pk)
    # payloads are views into the mapped file
    d = next(e for e in ev if e.kind == EventKind.DATA)
    assert isinstance(d.payload, memoryview) and isinstance(d.payload.obj, mmap.mmap)
    assert REGISTRY.get_sample_value("wirespan_receiver_accepted_events_total", {"receiver": "pcap/test"}) >= len(ev)


@pytest.mark.skipif(TSHARK is None, reason="tshark not installed")
@pytest.mark.parametrize("v6", [False, True])
def test_generated_capture_agrees_with_tshark_and_dpkt(tmp_path, v6):
    pk = http_flow_packets(4, 6, v6=v6)
    path = tmp_path / "gen.pcap"
    g.write_pcap(path, [g.ether(p) for p in pk])
    n, dirs = tshark_directions(path)
    rc, sink = replay(path)
    assert rc.stats["packets"] == n == len(list(dpkt.pcap.Reader(open(path, "rb")))) == len(pk)
    assert by_direction(sink.events) == dirs


@pytest.fixture(scope="module")
def real_capture(tmp_path_factory):
    """A real http.server, real urllib and curl clients, recorded with tcpdump on lo."""
    d = tmp_path_factory.mktemp("www")
    (d / "small.txt").write_text("hello from http.server\n")
    (d / "big.bin").write_bytes(os.urandom(300_000))
    port = free_port()
    srv = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1",
                            "--directory", str(d)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(port)
        time.sleep(0.2)
        cap = d / "real.pcap"
        with tcpdump(port, path=cap):
            base = f"http://127.0.0.1:{port}"
            for path in ("/small.txt", "/big.bin", "/missing"):
                try:
                    urllib.request.urlopen(base + path, timeout=10).read()
                except urllib.error.HTTPError:
                    pass
            try:
                urllib.request.urlopen(urllib.request.Request(base + "/small.txt", data=b"x" * 5000, method="POST"),
                                       timeout=10).read()
            except urllib.error.HTTPError:
                pass  # http.server answers POST with 501: real bytes either way
            if shutil.which("curl"):
                subprocess.run(["curl", "-s", "-o", "/dev/null", "-o", "/dev/null", base + "/small.txt",
                                base + "/big.bin"], check=True, timeout=20)
        yield cap
    finally:
        srv.terminate()
        srv.wait(timeout=10)


@pytest.mark.skipif(TSHARK is None, reason="tshark not installed")
def test_real_capture_agrees_with_tshark_and_dpkt(real_capture):
    n, dirs = tshark_directions(real_capture)
    r = open_capture(real_capture)
    ours = list(r)
    assert r.error is None
    with open(real_capture, "rb") as f:
        dp = list(dpkt.pcap.Reader(f))
    assert len(ours) == len(dp) == n > 20
    rc, sink = replay(real_capture)
    assert by_direction(sink.events) == dirs
    big = max(dirs.values(), key=len)
    assert len(big) > 300_000  # the big download went through whole
    opens = sum(e.kind == EventKind.OPEN for e in sink.events)
    assert opens == len(dirs) // 2 >= 5  # each connection carried a request and a response
    assert all(e.client_is_src is not None for e in sink.events)
    assert not rc.stats["gap_bytes"]


@pytest.mark.skipif(TSHARK is None, reason="tshark not installed")
def test_real_capture_as_pcapng_gives_the_same_events(real_capture, tmp_path):
    ng = tmp_path / "real.pcapng"
    subprocess.run([TSHARK, "-r", str(real_capture), "-F", "pcapng", "-w", str(ng)], check=True,
                   capture_output=True)
    assert isinstance(open_capture(ng), PcapngReader)
    _, a = replay(real_capture)
    _, b = replay(ng)
    key = [(e.kind, e.src, e.sport, e.ts_ns, bytes(e.payload or b"")) for e in a.events]
    assert key == [(e.kind, e.src, e.sport, e.ts_ns, bytes(e.payload or b"")) for e in b.events]


def test_truncated_file_keeps_events_before_the_cut(tmp_path, caplog):
    pk = http_flow_packets(2, 5)
    data = g.write_pcap(None, [g.ether(p) for p in pk])
    path = tmp_path / "cut.pcap"
    path.write_bytes(data[: len(data) * 2 // 3])
    with caplog.at_level(logging.INFO, logger="wirespan.receivers.pcap"):
        rc, sink = replay(path)
    assert rc.done.is_set()
    assert any("truncated" in m and "cut.pcap" in m for m in caplog.messages)
    assert rc.stats["drops"].get("truncated_file") == 1
    # where it stopped, for the command's exit-3 line
    assert len(rc.truncated) == 1 and rc.stats["truncated"] == rc.truncated
    assert rc.truncated[0].startswith(f"{path}: cut short: truncated ") and " at offset " in rc.truncated[0]
    assert f"the {rc.stats['packets']} packets before it were replayed" in rc.truncated[0]
    whole_rc, whole = replay_bytes(tmp_path, data)
    n_before = rc.stats["packets"]
    assert 0 < n_before < whole_rc.stats["packets"]
    # Every DATA event before the cut is there, byte for byte.
    got = [bytes(e.payload) for e in sink.events if e.kind == EventKind.DATA]
    exp = [bytes(e.payload) for e in whole.events if e.kind == EventKind.DATA]
    assert got == exp[: len(got)] and len(got) > 5
    assert sum(e.kind == EventKind.CLOSE for e in sink.events) == 4  # connections closed at end of input


def replay_bytes(tmp_path, data: bytes, name: str = "whole.pcap", **cfg):
    p = tmp_path / name
    p.write_bytes(data)
    return replay(p, **cfg)


def test_unreadable_file_sets_done_and_counts(tmp_path, caplog):
    p = tmp_path / "junk.pcap"
    p.write_bytes(b"this is not a capture file at all")
    e = tmp_path / "empty.pcap"
    e.write_bytes(b"")
    # start() refuses these (test_unreadable_inputs_refuse_to_start); a file that turns bad after
    # the start (replaced meanwhile) still meets the reader thread's own check: run() is that thread
    sink = Sink()
    rc = PcapReceiver("pcap/test", {"path": str(tmp_path / "*.pcap"), "progress": False}, sink)
    with caplog.at_level(logging.ERROR, logger="wirespan.receivers.pcap"):
        rc.run()
    assert rc.done.is_set()
    assert rc.stats["drops"] == {"unreadable_file": 2} and sink.events == []
    assert len(rc.stats["errors"]) == 2 and len(rc.unreadable) == 2


def test_unreadable_inputs_refuse_to_start(tmp_path):
    """start() reads each file's first bytes: no capture, no start (a one-line reason naming the file)."""
    import gzip
    good = g.write_pcap(None, [g.ether(p) for p in http_flow_packets(1, 1)])
    cases = {"text.pcap": (b"hello world, a text file\n", "not a pcap or pcapng file (it starts with 68 65 6c 6c"),
             "empty.pcap": (b"", "empty file (0 bytes), not a capture"),
             # compressed captures are replayed (streamed); what counts is what they hold
             "c.pcap.gz": (gzip.compress(b"hello world, a text file\n"),
                           "gzip-compressed, and what it holds is not a pcap or pcapng file (it starts with 68 65"),
             "c.pcap.zst": (b"\x28\xb5\x2f\xfd" + bytes(20), "zstd-compressed, but it holds no data or is damaged"),
             "c.pcap.lz4": (b"\x04\x22\x4d\x18" + bytes(20), "lz4-compressed, not a capture; decompress it first"),
             "short.pcap": (good[:3], "3 bytes long, shorter than a capture file header"),
             "hdr.pcap": (good[:20], "pcap file header cut short (20 of 24 bytes)")}
    for name, (body, says) in cases.items():
        p = tmp_path / name
        p.write_bytes(body)
        with pytest.raises(CaptureError) as ei:
            check_capture(p)
        assert says in str(ei.value) and "\n" not in str(ei.value)
        rc = PcapReceiver("pcap", {"path": str(p)}, Sink())
        with pytest.raises(CaptureError, match=re.escape(f"{p}: {says}")):
            rc.start()
        assert rc._thread is None
    ok = tmp_path / "ok.pcap"
    ok.write_bytes(good)
    check_capture(ok)                                  # a capture: no error
    # a glob with one bad file among good ones refuses too: an unreadable input is an error
    rc = PcapReceiver("pcap", {"path": str(tmp_path / "*.pcap")}, Sink())
    with pytest.raises(CaptureError):
        rc.start()


def test_missing_path_refuses_to_start(tmp_path):
    rc = PcapReceiver("pcap/x", {"path": str(tmp_path / "nope.pcap")}, Sink())
    with pytest.raises(FileNotFoundError, match=r"nope\.pcap"):
        rc.start()


def test_directory_and_glob_in_name_order(tmp_path):
    f1, f2 = g.TcpFlow(client=("10.0.0.1", 1111)), g.TcpFlow(client=("10.0.0.1", 2222))
    g.write_pcap(tmp_path / "b.pcap", [g.ether(p) for p in [*f2.handshake(), f2.send(True, b"second")]],
                 ts0_ns=T0 + 10**9)
    g.write_pcap(tmp_path / "a.pcap", [g.ether(p) for p in [*f1.handshake(), f1.send(True, b"first")]])
    (tmp_path / "notes.txt").write_text("ignored")
    for path in (tmp_path, tmp_path / "*.pcap"):
        _, sink = replay(path)
        assert [bytes(e.payload) for e in sink.events if e.kind == EventKind.DATA] == [b"first", b"second"]


def test_filter_ports_and_addresses(tmp_path):
    a = g.TcpFlow(client=("10.0.0.5", 1000), server=("10.0.0.1", 80))
    b = g.TcpFlow(client=("10.0.0.6", 1001), server=("10.0.0.1", 5432))
    c = g.TcpFlow(client=("192.168.1.9", 1002), server=("192.168.1.1", 80))
    pk = [*a.handshake(), a.send(True, b"a"), *b.handshake(), b.send(True, b"b"), *c.handshake(), c.send(True, b"c")]
    path = tmp_path / "f.pcap"
    g.write_pcap(path, [g.ether(p) for p in pk])

    def data(**flt):
        rc, sink = replay(path, filter=flt)
        return sorted(bytes(e.payload) for e in sink.events if e.kind == EventKind.DATA), rc

    assert data(ports=[80])[0] == [b"a", b"c"]
    got, rc = data(addresses=["10.0.0.0/24"])
    assert got == [b"a", b"b"] and rc.stats["drops"] == {"filtered": 4}
    assert data(ports=[80], addresses=["192.168.1.1"])[0] == [b"c"]


def test_config_validation():
    c = PcapConfig(path="x.pcap", idle_timeout="5m")
    assert c.idle_timeout == 300.0 and c.rate == 0 and c.loop is False and c.progress == "auto"
    assert PcapConfig(path="x", progress=False).progress is False
    with pytest.raises(ValidationError):
        PcapConfig(path="x", progress="sometimes")
    with pytest.raises(ValidationError):
        PcapConfig(path="x.pcap", rat=1)  # typo: unknown key
    with pytest.raises(ValidationError):
        PcapConfig(path="x.pcap", filter={"addresses": ["not-an-ip"]})
    with pytest.raises(ValidationError):
        PcapConfig(path="x.pcap", filter={"ports": [70000]})
    with pytest.raises(ValidationError):
        PcapConfig(path="x.pcap", rate=-1)


def test_rate_real_time_and_shutdown(tmp_path):
    f = g.TcpFlow()
    pk = [*f.handshake()] + [f.send(True, b"tick") for _ in range(5)]
    path = tmp_path / "slow.pcap"
    g.write_pcap(path, [g.ether(p) for p in pk], step_ns=50_000_000)  # 350 ms of capture
    t0 = time.monotonic()
    _, sink = replay(path, rate=1.0)
    took = time.monotonic() - t0
    assert 0.3 <= took < 3, took
    assert sum(e.kind == EventKind.DATA for e in sink.events) == 5
    t0 = time.monotonic()
    replay(path, rate=4.0)
    assert time.monotonic() - t0 < took
    # shutdown interrupts a slow replay promptly
    g.write_pcap(path, [g.ether(p) for p in pk], step_ns=10**9)
    rc = PcapReceiver("pcap/slow", {"path": str(path), "rate": 1.0}, Sink())
    rc.start()
    time.sleep(0.2)
    t0 = time.monotonic()
    rc.shutdown()
    assert rc.done.wait(2) and time.monotonic() - t0 < 2


def test_loop_replays_until_shutdown_with_new_ids_and_moving_time(tmp_path):
    f = g.TcpFlow()
    path = tmp_path / "l.pcap"
    g.write_pcap(path, [g.ether(p) for p in [*f.handshake(), f.send(True, b"again"), f.fin(True), f.fin(False)]])
    sink = Sink()
    rc = PcapReceiver("pcap/loop", {"path": str(path), "loop": True}, sink)
    rc.start()
    deadline = time.monotonic() + 5
    while sum(e.kind == EventKind.OPEN for e in sink.events) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    rc.shutdown()
    assert rc.done.wait(2)
    opens = [e for e in sink.events if e.kind == EventKind.OPEN]
    assert len(opens) >= 3
    assert len({e.conn_id for e in opens}) == len(opens)
    assert opens[1].ts_ns > opens[0].ts_ns and opens[2].ts_ns > opens[1].ts_ns


def test_progress_bar_when_asked(tmp_path, capsys):
    path = tmp_path / "p.pcap"
    g.write_pcap(path, [g.ether(p) for p in http_flow_packets(1, 1)])
    sink = Sink()
    rc = PcapReceiver("pcap/p", {"path": str(path), "progress": True}, sink)
    rc.start()
    assert rc.done.wait(10)
    assert "p.pcap" in capsys.readouterr().err


def test_link_types_in_the_receiver(tmp_path):
    """Same flows over SLL2, NULL and raw IPv6 give the same streams."""
    pk4, pk6 = http_flow_packets(2, 2), http_flow_packets(2, 2, v6=True)
    results = []
    for name, lt, wrap, pk in [("sll2", LINKTYPE_LINUX_SLL2, g.sll2, pk4), ("null", LINKTYPE_NULL, g.null, pk4),
                               ("eth", LINKTYPE_ETHERNET, g.ether, pk4), ("raw6", LINKTYPE_RAW, bytes, pk6)]:
        path = tmp_path / f"{name}.pcap"
        g.write_pcap(path, [wrap(p) for p in pk], linktype=lt)
        _, sink = replay(path)
        results.append(sorted(by_direction(sink.events).values()))
    assert results[0] == results[1] == results[2] == results[3] and len(results[0]) == 4


def test_zero_copy_allocation_flat_when_payload_grows_100x(tmp_path):
    def run(size: int) -> tuple[int, int]:
        f = g.TcpFlow()
        pk = f.handshake()
        for i in range(1500):
            pk.append(f.send(i % 2 == 0, b"p" * size))
        path = tmp_path / f"z{size}.pcap"
        g.write_pcap(path, [g.ether(p) for p in pk])

        class Drop:
            def consume_events(self, events):
                pass

        rc = PcapReceiver("pcap/zc", {"path": str(path), "progress": False}, Drop())
        tracemalloc.start()
        rc.run()  # synchronously, so only this replay is traced
        _cur, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert rc.stats["packets"] == len(pk)
        return peak, os.path.getsize(path)

    small, small_size = run(100)
    large, large_size = run(10_000)
    assert large_size > 50 * small_size
    assert large < small * 1.5 + 16384, (small, large)


# ---------------------------------------------------------------------------
# fuzzing the readers (plus decoding what they yield)
# ---------------------------------------------------------------------------
_PCAP_SEED = g.write_pcap(None, [g.ether(p) for p in http_flow_packets(1, 2)])
_PCAPNG_SEED = build_pcapng()[0]
_PCAPNG_BE_SEED = build_pcapng(big_endian=True)[0]


def _drain(data: bytes) -> None:
    try:
        r = reader_for(data)
    except CaptureError:
        return
    n = len(r.view)
    for lt, _ts, off, end in r:
        assert 0 <= off <= end <= n
        res = decode(lt, r.view, off, end)
        if not isinstance(res, str):
            assert off <= res[7] <= res[8] <= end
    assert r.error is None or isinstance(r.error, str)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from([_PCAP_SEED, _PCAPNG_SEED, _PCAPNG_BE_SEED]),
       st.lists(st.tuples(st.integers(0, 4000), st.integers(0, 255)), max_size=8), st.integers(0, 5000),
       st.binary(max_size=64), st.integers(0, 4000))
def test_fuzz_mutated_captures(seed, flips, cut, insert, at):
    b = bytearray(seed)
    for pos, val in flips:
        if pos < len(b):
            b[pos] = val
    b[at:at] = insert
    _drain(bytes(b[:cut]))


@settings(max_examples=200, deadline=None)
@given(st.sampled_from([b"\xd4\xc3\xb2\xa1", b"\xa1\xb2\xc3\xd4", b"M<\xb2\xa1", b"\n\r\r\n"]), st.binary(max_size=400))
def test_fuzz_random_bodies_after_a_magic(magic, body):
    _drain(magic + body)


def test_regression_fuzz_huge_caplen_and_zero_length_block():
    # A pcap record claiming 4 GiB and a pcapng block of length 0 stop cleanly with a reason.
    data = bytearray(_PCAP_SEED[:24]) + b"\x00" * 8 + b"\xff\xff\xff\xff" + b"\x00" * 4
    r = reader_for(bytes(data))
    assert list(r) == [] and r.error
    ng = bytearray(_PCAPNG_SEED[:28]) + b"\x06\x00\x00\x00" + b"\x00" * 8
    r = reader_for(bytes(ng))
    assert list(r) == [] and "corrupt block length 0" in r.error


def test_receiver_on_fuzzed_file_never_raises(tmp_path):
    b = bytearray(_PCAPNG_SEED)
    for i in range(40, len(b), 97):
        b[i] ^= 0x5A
    p = tmp_path / "fz.pcapng"
    p.write_bytes(bytes(b))
    rc, _sink = replay(p)
    assert rc.done.is_set() and "internal_error" not in rc.stats["drops"]


def test_fixture_dir_exists_or_not_needed():
    assert Path(__file__).parent.joinpath("support", "pcapgen.py").exists()


def test_drops_and_evictions_reach_the_self_metrics(tmp_path):
    f = g.TcpFlow(client=("10.0.0.1", 1234))
    idle = g.TcpFlow(client=("10.0.0.1", 4321))
    pk = [*idle.handshake(), idle.send(True, b"x"), *f.handshake()]
    req = f.send(True, b"req")
    pk += [req, req,
          g.ipv4("10.0.0.1", "10.0.0.2", b"\x13\x88\x13\x89\x00\x0c\x00\x00ntp?", proto=17),  # UDP 5000 -> 5001
          g.ipv4("10.0.0.1", "10.0.0.2", g.tcp(1, 2, 3), frag=0x2000)]
    path = tmp_path / "m.pcap"
    buf = io.BytesIO()
    w = g.PcapWriter(buf, g.LINKTYPE_ETHERNET, nanos=True)
    for i, p in enumerate(pk):
        w.packet(g.ether(p), T0 + (i * 10**9 if i >= 4 else i))  # the idle flow goes quiet for seconds
    path.write_bytes(buf.getvalue())

    def val(name, **labels):
        return REGISTRY.get_sample_value(name, labels) or 0

    before = {r: val("wirespan_receiver_dropped_events_total", receiver="pcap/test", reason=r)
              for r in ("udp_port", "ip_fragment", "retransmission")}
    ev_before = val("wirespan_connections_evicted_total", component="pcap/test", reason="idle_timeout")
    rc, _sink = replay(path, idle_timeout="2s")
    assert rc.stats["drops"] == {"udp_port": 1, "ip_fragment": 1, "retransmission": 1}
    assert rc.stats["evicted"] == {"idle_timeout": 1}
    for r, b in before.items():
        assert val("wirespan_receiver_dropped_events_total", receiver="pcap/test", reason=r) == b + 1
    assert val("wirespan_connections_evicted_total", component="pcap/test", reason="idle_timeout") == ev_before + 1


def test_downstream_failure_is_counted_and_replay_goes_on(tmp_path, caplog):
    class Flaky:
        def __init__(self):
            self.calls = 0
            self.events = []

        def consume_events(self, events):
            self.calls += 1
            if self.calls == 1:
                raise RuntimeError("bug downstream")
            self.events += events

    path = tmp_path / "d.pcap"
    g.write_pcap(path, [g.ether(p) for p in http_flow_packets(2, 6)])
    sink = Flaky()
    rc = PcapReceiver("pcap/flaky", {"path": str(path), "batch_size": 4}, sink)
    with caplog.at_level(logging.ERROR, logger="wirespan.receivers.pcap"):
        rc.run()
    assert rc.stats["drops"] == {"downstream_error": 4}
    assert len(sink.events) == rc.stats["events"] - 4 and sink.calls > 3
    assert any("downstream" in m for m in caplog.messages)


@pytest.mark.skipif(TSHARK is None, reason="tshark not installed")
def test_real_sll2_capture_on_the_any_interface(tmp_path):
    """tcpdump -i any writes LINKTYPE_LINUX_SLL2: a real file of that link type."""
    (tmp_path / "f.txt").write_text("sll2 " * 2000)
    port = free_port()
    srv = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1",
                            "--directory", str(tmp_path)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(port)
        with tcpdump(port, path=tmp_path / "any.pcap", iface="any") as cap:
            for _ in range(2):
                urllib.request.urlopen(f"http://127.0.0.1:{port}/f.txt", timeout=10).read()
    finally:
        srv.terminate()
        srv.wait(timeout=10)
    r = open_capture(cap)
    assert r.linktype == LINKTYPE_LINUX_SLL2
    n, dirs = tshark_directions(cap)
    rc, sink = replay(cap)
    assert rc.stats["packets"] == n and rc.stats["drops"] == {}
    assert by_direction(sink.events) == dirs and len(dirs) == 4
    assert sum(len(v) for v in dirs.values()) > 20_000


FIXTURES = Path(__file__).parent / "fixtures" / "pcap"


@pytest.mark.parametrize("name", ["http_server_lo.pcap", "http_server_lo.pcapng"])
def test_committed_real_capture(name):
    """Recorded by tests/fixtures/pcap/record_http_server.py (real http.server, curl, urllib)."""
    rc, sink = replay(FIXTURES / name)
    assert rc.stats["packets"] == 39 and rc.stats["connections"] == 3 and rc.stats["drops"] == {}
    dirs = by_direction(sink.events)
    reqs = sorted(v.split(b"\r\n")[0] for v in dirs.values() if not v.startswith(b"HTTP/"))
    assert reqs == [b"GET /index.json?x=1 HTTP/1.1", b"GET /missing HTTP/1.1", b"POST /index.json HTTP/1.1"]
    statuses = sorted(v.split(b" ")[1] for v in dirs.values() if v.startswith(b"HTTP/"))
    assert statuses == [b"200", b"404", b"501"]
    assert [e.kind.name for e in sink.events].count("OPEN") == 3
    assert all(e.client_is_src == (e.dport == sink.events[0].dport) for e in sink.events)
    if TSHARK:
        assert tshark_directions(FIXTURES / name)[1] == dirs


def test_hand_built_pcapng_scenario_through_the_receiver(tmp_path):
    """Two interfaces (VLAN Ethernet µs, SLL2 ns) carrying: an IPv6 flow with extension headers,
    reordered, retransmitted and overlapping segments and a wrapping sequence space; an IPv4
    flow with a segment missing from the capture, then a RST; and a reused 4-tuple."""
    buf = io.BytesIO()
    w = g.PcapngWriter(buf)
    eth = w.interface(g.LINKTYPE_ETHERNET)
    cooked = w.interface(g.LINKTYPE_LINUX_SLL2, tsresol=9)
    t = [T0]

    def put(ifid, pkt):
        t[0] += 1_000_000
        w.packet(ifid, g.ether(pkt, vlans=[10]) if ifid == eth else g.sll2(pkt), t[0])

    ext = [(0, b"\x00" * 6), (60, b"\x00" * 6)]
    a = g.TcpFlow(("2001:db8::10", 33000), ("2001:db8::20", 443), isn_client=0xFFFFFF00)
    for p in a.handshake():
        put(eth, p)
    segs = [a.send(True, bytes([65 + i]) * 100, ext=ext) for i in range(5)]  # crosses 2^32
    for i in (0, 2, 1, 1, 4, 3):
        put(cooked if i % 2 else eth, segs[i])
    put(eth, a.at(True, 0xFFFFFF01 + 50, b"x" * 100))  # overlap of delivered bytes: first-seen wins
    put(eth, a.fin(True))
    put(cooked, a.fin(False))

    b = g.TcpFlow(("10.1.1.1", 5000), ("10.1.1.2", 6379))
    for p in b.handshake():
        put(cooked, p)
    put(cooked, b.send(True, b"*1\r\n$4\r\nPING\r\n"))
    b.send(True, b"*1\r\n$4\r\nLOST\r\n")  # not in the capture
    put(cooked, b.send(True, b"*1\r\n$4\r\nPING\r\n"))
    put(eth, b.ack(False))  # the server had it all: the hole is final
    put(eth, b.rst(False))

    c = g.TcpFlow(("10.1.1.1", 5000), ("10.1.1.2", 6379), isn_client=777777)  # same 4-tuple again
    for p in [*c.handshake(), c.send(True, b"again")]:
        put(eth, p)
    path = tmp_path / "scenario.pcapng"
    path.write_bytes(buf.getvalue())

    rc, sink = replay(path)
    ev = sink.events
    v6 = [e for e in ev if e.sport == 33000]
    assert v6[0].kind == EventKind.OPEN and v6[-1].kind == EventKind.CLOSE and v6[0].client_is_src is True
    assert b"".join(bytes(e.payload) for e in v6 if e.kind == EventKind.DATA) == b"".join(
        bytes([65 + i]) * 100 for i in range(5))
    red = [e for e in ev if e.sport in (5000, 6379)]
    assert [e.kind.name for e in red] == ["OPEN", "DATA", "GAP", "DATA", "RESET", "OPEN", "DATA", "CLOSE", "CLOSE"]
    assert red[2].gap == 14 and red[4].src == "10.1.1.2"
    assert red[0].conn_id != red[5].conn_id
    assert rc.stats["drops"] == {"retransmission": 2}
    assert rc.stats["gap_bytes"] == {"ack_above_hole": 14}
    assert rc.stats["connections"] == 3


def test_pcapng_trailing_length_mismatch_stops_with_reason():
    data, _exp = build_pcapng()
    r = reader_for(data)
    offs = [o for _lt, _ts, o, _e in r]
    bad = bytearray(data)
    # The 4th packet's block: its trailing length sits just before the 5th packet's block header.
    epb_start = offs[3] - 28
    (blen,) = struct.unpack_from("<I", bad, epb_start + 4)
    struct.pack_into("<I", bad, epb_start + blen - 4, blen + 4)
    r = reader_for(bytes(bad))
    assert len(frames(r)) == 3 and "trailing length" in r.error


def test_rate_keeps_the_time_between_files(tmp_path):
    f1, f2 = g.TcpFlow(client=("10.0.0.1", 1111)), g.TcpFlow(client=("10.0.0.1", 2222))
    g.write_pcap(tmp_path / "a.pcap", [g.ether(p) for p in [*f1.handshake(), f1.send(True, b"a")]])
    g.write_pcap(tmp_path / "b.pcap", [g.ether(p) for p in [*f2.handshake(), f2.send(True, b"b")]],
                 ts0_ns=T0 + 400_000_000)
    t0 = time.monotonic()
    _, sink = replay(tmp_path, rate=1.0)
    assert time.monotonic() - t0 >= 0.35
    assert [bytes(e.payload) for e in sink.events if e.kind == EventKind.DATA] == [b"a", b"b"]


def test_hostile_declared_lengths_allocate_nothing_big():
    """Lengths come from the file but nothing is allocated from them: views and offsets only."""
    hostile = [
        bytearray(_PCAP_SEED[:24]) + struct.pack("<IIII", 0, 0, MAX_CAPLEN - 1, 0xFFFFFFFF) + b"\x00" * 64,
        bytearray(_PCAPNG_SEED[:28]) + struct.pack("<II", 1, 0xFFFFFFF0) + b"\x00" * 64,  # IDB claiming 4 GiB
        bytearray(_PCAPNG_SEED),
    ]
    # An IDB option claiming 65535 bytes inside a small block.
    ng = hostile[2]
    off = 28
    bt, _bl = struct.unpack_from("<II", ng, off)
    assert bt == 1
    struct.pack_into("<HH", ng, off + 16, 9, 0xFFFF)
    tracemalloc.start()
    for data in hostile:
        _drain(bytes(data))
    _cur, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 256 * 1024, peak


def test_shards_partition_the_connections(tmp_path) -> None:
    """``replay --workers N``: shard k of N follows its connections only; together, all of them."""
    from bench.gen_http_capture import generate
    from receivers.pcap import PcapReceiver

    cap = tmp_path / "many.pcap"
    generate(str(cap), 12, 3)

    class Collect:
        def __init__(self) -> None:
            self.events: list = []

        def consume_events(self, evs: list) -> None:
            self.events.extend(evs)

    def conns(shard: dict | None) -> set:
        sink = Collect()
        cfg = {"path": str(cap), "progress": False, **({"shard": shard} if shard else {})}
        PcapReceiver("pcap", cfg, sink).run()
        return {frozenset(((e.src, e.sport), (e.dst, e.dport))) for e in sink.events}

    every = conns(None)
    parts = [conns({"index": k, "count": 3}) for k in range(3)]
    assert len(every) == 12
    assert set().union(*parts) == every
    assert sum(len(p) for p in parts) == len(every)  # disjoint
    assert sum(1 for p in parts if p) >= 2  # the ports really spread them


def test_shards_balance_even_client_ports(tmp_path) -> None:
    """Issue 19 item 13's sibling: every client port even (and the server's, 8080): with
    ``(sport ^ dport) % 2`` one shard got every connection. Each shard must get its share."""
    from receivers.pcap import shard_of

    cap = tmp_path / "even.pcap"
    flows = [g.TcpFlow((f"10.1.0.{c // 50 + 1}", 40000 + 2 * c), ("10.2.0.1", 8080), isn_client=7 * c, isn_server=3)
             for c in range(200)]
    pk = [p for f in flows for p in (*f.handshake(), f.send(True, b"GET / HTTP/1.1\r\n\r\n"), f.fin(True))]
    g.write_pcap(cap, [g.ether(p) for p in pk])
    for n in (2, 3, 4):
        sizes = []
        for k in range(n):
            sink = Sink()
            PcapReceiver("pcap", {"path": str(cap), "progress": False, "shard": {"index": k, "count": n}}, sink).run()
            sizes.append(len({e.conn_id for e in sink.events}))
        assert sum(sizes) == 200
        assert max(sizes) <= 1.3 * 200 / n and min(sizes) >= 0.7 * 200 / n, (n, sizes)
    # and on other real-world shapes: strided ports, one port and many clients, IPv6; both directions alike
    a4, srv = bytes([10, 1, 0, 1]), bytes([10, 2, 0, 1])
    shapes = {"stride 4": [(a4, srv, 40000 + 4 * i, 80) for i in range(400)],
              "stride 1024": [(a4, srv, 1024 * (i + 1), 80) for i in range(60)],
              "one port, many clients": [(bytes([10, 1, i // 250, i % 250 + 1]), srv, 50000, 443)
                                         for i in range(400)],
              "ipv6, even ports": [(bytes(15) + bytes([i + 1]) if i < 255 else bytes(14) + i.to_bytes(2, "big"),
                                    bytes(15) + b"\xff", 40000 + 2 * i, 80) for i in range(400)]}
    for name, conns in shapes.items():
        counts = [0, 0]
        for s, d, sp, dp in conns:
            k = shard_of(s, d, sp, dp, 2)
            assert k == shard_of(d, s, dp, sp, 2)
            counts[k] += 1
        assert min(counts) >= 0.35 * len(conns), (name, counts)


def _mapping_rss_kib(path: str) -> int:
    """Rss of this process's mapping(s) of ``path``, from /proc/self/smaps."""
    total, inside = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            first = line.split(" ", 1)[0]
            if "-" in first and ":" not in first:  # a mapping's header line
                inside = line.rstrip().endswith(path)
            elif inside and line.startswith("Rss:"):
                total += int(line.split()[1])
    return total


def test_drop_behind_releases_read_pages_and_keeps_the_data(tmp_path) -> None:
    """A looping replay must not carry the capture's read pages in RSS; the bytes stay readable."""
    import mmap as _mmap

    from receivers.pcap import DROP_MARGIN_BYTES, _drop_behind

    size = 8 << 20
    path = str(tmp_path / "big.bin")
    data = bytes(range(256)) * (size // 256)
    with open(path, "wb") as f:
        f.write(data)
    with open(path, "rb") as f:
        mm = _mmap.mmap(f.fileno(), 0, access=_mmap.ACCESS_READ)
    view = memoryview(mm)
    assert sum(view[i] + 1 for i in range(0, size, _mmap.PAGESIZE)) > 0  # touch every page
    before = _mapping_rss_kib(path)
    assert before >= (size >> 10) * 9 // 10
    new_start = _drop_behind(mm, 0, size)
    assert new_start == (size - DROP_MARGIN_BYTES) & ~(_mmap.PAGESIZE - 1)
    after = _mapping_rss_kib(path)
    assert after <= (DROP_MARGIN_BYTES >> 10) + 64, (before, after)
    assert view[:size] == data  # pages dropped from the process come back from the file
    assert _drop_behind(mm, new_start, new_start + 10) == new_start  # nothing (whole pages) to drop
    view.release()
    mm.close()
