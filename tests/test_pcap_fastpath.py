"""The C replay loop (receivers/_fastpath.c) against its pure-Python twin.

The pcap receiver hands the common packet of a classic Ethernet capture to C and every
other one to the Python path; both must give the same events in the same batches, the
same counters and the same errors. Each case is replayed both ways (``pcap.c_scan`` set
to None for the reference) and compared field by field: the fixtures, the shared corpus
when it is here, and generated captures full of what the C loop must hand back
(reordering, duplicates, losses, RSTs, port reuse, VLAN tags, IPv6, UDP, fragments, idle
sweeps, tiny batches, cut and damaged files), plus hypothesis-shuffled flows.
"""

from __future__ import annotations

import io
import random
import struct
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import receivers.pcap as pcap
from receivers.pcap import PcapReceiver
from receivers.tcp_reassembly import c_scan
from tests.support import pcapgen as g
from tests.support.corpus import corpus_captures

FIX = Path(__file__).parent / "fixtures"
T0 = 1_700_000_000_000_000_000

needs_c = pytest.mark.skipif(c_scan is None, reason="receivers._fastpath not built (or WIRESPAN_PURE_PYTHON)")


class _Sink:
    def __init__(self) -> None:
        self.events: list[Any] = []
        self.batches: list[int] = []

    def consume_events(self, events: list) -> None:
        self.batches.append(len(events))
        self.events.extend(events)


def _run(path: Path, **cfg: Any) -> tuple[list[tuple], list[int], dict[str, Any]]:
    sink = _Sink()
    rc = PcapReceiver("pcap/fast", {"path": str(path), "progress": False, **cfg}, sink)
    rc.run()
    ids: dict[Any, int] = {}
    evs = []
    for e in sink.events:
        cid = ids.setdefault(e.conn_id, len(ids))  # conn ids come from one process-wide counter
        evs.append((int(e.kind), cid, e.src, e.sport, e.dst, e.dport, e.ts_ns,
                    None if e.payload is None else bytes(e.payload), type(e.payload).__name__, e.gap,
                    e.client_is_src, e.egress, e.pid, e.tid, e.comm))
    stats = rc.stats
    stats.pop("tls")
    return evs, sink.batches, stats


def both(path: Path, **cfg: Any) -> tuple[list[tuple], dict[str, Any]]:
    """Replay ``path`` with the C loop and without; assert they agree; the events and stats."""
    fast = _run(path, **cfg)
    saved = pcap.c_scan
    pcap.c_scan = None
    try:
        ref = _run(path, **cfg)
    finally:
        pcap.c_scan = saved
    assert fast[2] == ref[2]
    assert fast[1] == ref[1]
    assert fast[0] == ref[0]
    return ref[0], ref[2]


def _write(tmp_path: Path, frames: list[bytes], name: str = "c.pcap", **kw: Any) -> Path:
    p = tmp_path / name
    buf = io.BytesIO()
    w = g.PcapWriter(buf, g.LINKTYPE_ETHERNET, **kw)
    for i, fr in enumerate(frames):
        w.packet(fr, T0 + i * 1_000_003)
    p.write_bytes(buf.getvalue())
    return p


def _flow(c: int, v6: bool = False, n_req: int = 4) -> tuple[g.TcpFlow, list[bytes]]:
    cli = (f"2001:db8::{c + 10:x}" if v6 else f"10.0.{c // 200}.{c % 200 + 10}", 40000 + c)
    srv = ("2001:db8::1" if v6 else "10.0.0.1", 8080)
    f = g.TcpFlow(cli, srv, isn_client=(c * 2654435761) & 0xFFFFFFFF, isn_server=(c * 40503) & 0xFFFFFFFF)
    pk = f.handshake()
    for i in range(n_req):
        pk.append(f.send(True, b"GET /%d/%d HTTP/1.1\r\nHost: x\r\n\r\n" % (c, i)))
        pk.append(f.send(False, b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc"))
    pk += [f.fin(True), f.fin(False), f.ack(True)]
    return f, pk


@needs_c
@pytest.mark.parametrize("fixture", sorted(str(p.relative_to(FIX)) for p in FIX.rglob("*.pcap*")))
def test_fixtures_replay_the_same(fixture: str) -> None:
    _, stats = both(FIX / fixture)
    assert stats["packets"] > 0


@needs_c
def test_the_shared_corpus_replays_the_same() -> None:
    for cap in corpus_captures():
        both(cap)


@needs_c
@pytest.mark.parametrize("nanos", [False, True])
@pytest.mark.parametrize("big_endian", [False, True])
def test_byte_orders_and_resolutions(tmp_path: Path, nanos: bool, big_endian: bool) -> None:
    frames = [g.ether(p) for c in range(3) for p in _flow(c)[1]]
    evs, stats = both(_write(tmp_path, frames, nanos=nanos, big_endian=big_endian))
    assert sum(1 for e in evs if e[0] == 0) == 3 * 8 and stats["packets"] == len(frames)


@needs_c
@pytest.mark.parametrize("batch_size", [1, 3, 256])
def test_everything_the_c_loop_hands_back(tmp_path: Path, batch_size: int) -> None:
    rnd = random.Random(7)
    frames: list[bytes] = []
    for c in range(40):
        f, pk = _flow(c, v6=c % 7 == 3)
        data = pk[3:-3]
        k = c % 6
        if k == 1:  # out of order and duplicated
            rnd.shuffle(data)
            data += data[:2]
        elif k == 2:  # a lost segment, then the peer ACKs past it
            del data[2]
        elif k == 3:  # a retransmission overlapping what was delivered
            data.insert(3, f.at(True, f.seq[True] - 5, b"12345678"))
        elif k == 4:  # reset midway
            data = [*data[:3], f.rst(False)]
        elif k == 5:  # port reuse: a new SYN on the same 4-tuple
            data += g.TcpFlow(f.client, f.server, isn_client=77, isn_server=88).handshake()
        tags = (100,) if c % 5 == 0 else ()
        pkts = pk[:3] + data + (pk[-3:] if k != 4 else [])
        frames += [g.ether(p, vlans=tags) for p in pkts]
    # capture started midway (no SYN), UDP (DNS and not), an IPv4 fragment, an ARP frame
    mid = g.TcpFlow(("10.9.0.1", 5555), ("10.9.0.2", 6379), isn_client=4_294_967_000, isn_server=1)
    frames += [g.ether(mid.send(True, b"*1\r\n$4\r\nPING\r\n")), g.ether(mid.send(False, b"+PONG\r\n")),
               g.ether(mid.send(True, b"x" * 500))]  # the sequence numbers wrap
    udp = struct.pack("!HHHH", 5353, 53, 8 + 12, 0) + b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00"
    frames += [g.ether(g.ipv4("10.0.0.5", "10.0.0.53", udp, proto=17)),
               g.ether(g.ipv4("10.0.0.5", "10.0.0.54", struct.pack("!HHHH", 1, 2, 8, 0), proto=17)),
               g.ether(g.ipv4("10.0.0.5", "10.0.0.1", g.tcp(1, 2, 3, payload=b"frag"), frag=0x2000)),
               b"\xff" * 12 + b"\x08\x06" + b"\x00" * 28]
    _, stats = both(_write(tmp_path, frames), batch_size=batch_size)
    assert stats["drops"].get("retransmission") and stats["evicted"].get("port_reuse")
    assert stats["gap_bytes"] and stats["drops"].get("ip_fragment") and stats["drops"].get("not_ip")


@needs_c
def test_idle_sweeps_and_connection_limits(tmp_path: Path) -> None:
    flows = [_flow(c)[1][:6] for c in range(30)]  # never closed
    frames = [g.ether(pk[i]) for k in range(0, 30, 10) for i in range(6) for pk in flows[k:k + 10]]
    p = tmp_path / "idle.pcap"
    buf = io.BytesIO()
    w = g.PcapWriter(buf, g.LINKTYPE_ETHERNET)
    for i, fr in enumerate(frames):
        w.packet(fr, T0 + i * 300_000_000 + (i // 60) * 10**10)  # sweeps every few packets, idle gaps
    p.write_bytes(buf.getvalue())
    _, stats = both(p, idle_timeout=3, max_connections=8, batch_size=5)
    assert stats["evicted"].get("idle_timeout") and stats["evicted"].get("max_connections")


@needs_c
@pytest.mark.parametrize("damage", ["cut_record", "cut_header", "huge_caplen"])
def test_cut_and_damaged_files(tmp_path: Path, damage: str) -> None:
    frames = [g.ether(p) for c in range(4) for p in _flow(c)[1]]
    data = _write(tmp_path, frames).read_bytes()
    if damage == "cut_record":
        data = data[:-7]
    elif damage == "cut_header":
        data = data + b"\x01\x02\x03"
    else:
        at = 24 + 16 + len(frames[0]) + 16 + len(frames[1])  # the third record's header
        data = data[:at + 8] + struct.pack("<I", 1 << 30) + data[at + 12:]
    p = tmp_path / "bad.pcap"
    p.write_bytes(data)
    _, stats = both(p)
    assert stats["truncated"]


@needs_c
def test_options_that_keep_the_python_loop(tmp_path: Path) -> None:
    frames = [g.ether(p) for c in range(5) for p in _flow(c)[1]]
    p = _write(tmp_path, frames)
    both(p, filter={"ports": [8080]})
    both(p, bpf_filter="tcp port 8080")
    both(p, loop=False, shard={"index": 1, "count": 2})


@needs_c
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**32 - 1), drop=st.floats(0, 0.3), dup=st.floats(0, 0.3), swap=st.floats(0, 0.5))
def test_shuffled_flows_replay_the_same(tmp_path: Path, seed: int, drop: float, dup: float, swap: float) -> None:
    rnd = random.Random(seed)
    frames = []
    for c in range(4):
        for p in _flow(c, n_req=3)[1]:
            if rnd.random() < drop:
                continue
            frames.append(g.ether(p))
            if rnd.random() < dup:
                frames.append(g.ether(p))
    for i in range(len(frames) - 1):
        if rnd.random() < swap:
            frames[i], frames[i + 1] = frames[i + 1], frames[i]
    both(_write(tmp_path, frames, name=f"h{seed}.pcap"), batch_size=rnd.choice([1, 4, 256]))


@needs_c
def test_the_c_loop_takes_the_common_packets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Not only equal: the whole of a short connection is C's (handshake, data, ACKs, FINs)."""
    taken = [0, 0]

    def counting(*args: Any) -> Any:
        res = c_scan(*args)  # type: ignore[misc]
        taken[0] += res[2] - (res[6] is not None)
        taken[1] += res[6] is not None
        return res

    monkeypatch.setattr(pcap, "c_scan", counting)
    frames = [g.ether(p) for c in range(20) for p in _flow(c)[1]]
    _run(_write(tmp_path, frames))
    # per connection 14 packets, all C's: SYN, SYN-ACK, ACKs, 8 data, two FINs and the ACK after
    # the close (of a forgotten connection: ignored); Python's only the first (the first sweep)
    assert taken == [20 * 14 - 1, 1]


@needs_c
def test_answers_captured_before_their_requests_replay_the_same_and_in_order(tmp_path: Path) -> None:
    """A merged capture's order (each response before the request its ACK acknowledges): the
    C loop hands the held direction to Python, both loops give the same events, requests first;
    the protocols stage pairs every exchange."""
    from service.model import EventKind
    from tests.support.replay import replay

    frames = []
    for c in range(6):
        _f, pk = _flow(c, n_req=3)
        body = pk[3:-3]  # request, response, request, response, ...
        for i in range(0, len(body), 2):
            body[i], body[i + 1] = body[i + 1], body[i]
        frames += [g.ether(p) for p in pk[:3] + body + pk[-3:]]
    path = _write(tmp_path, frames)
    evs, _stats = both(path)
    data = [(e[1], e[3]) for e in evs if e[0] == int(EventKind.DATA)]
    for cid in range(6):
        ports = [sport for c, sport in data if c == cid]
        assert ports == [40000 + cid, 8080] * 3, ports
    spans, _r, ps = replay(path)
    assert len(spans) == 18 and not ps["drops"], ps["drops"]


def _short(c: int, isn: int | None = None) -> g.TcpFlow:
    """A short connection's flow: its own client address and port (a new one each ``c``)."""
    return g.TcpFlow((f"10.{c // 60000 % 250}.{c // 250 % 240}.{c % 250 + 1}", 1024 + c % 60000),
                     ("10.0.0.1", 80), isn_client=isn if isn is not None else (c * 2654435761) & 0xFFFFFFFF,
                     isn_server=(c * 40503 + 9) & 0xFFFFFFFF)


def _req(f: g.TcpFlow) -> list[bytes]:
    return [f.send(True, b"GET / HTTP/1.1\r\n\r\n"), f.send(False, b"HTTP/1.1 204 No Content\r\n\r\n")]


def _hostile_cases() -> dict[str, list[bytes]]:
    """Handshakes and closes the C loop takes (or must hand back): each a list of IP packets."""
    cases: dict[str, list[bytes]] = {}
    f = _short(1)
    old = f.seq[True]
    cases["syn_on_an_existing_connection"] = [*f.handshake(), *_req(f), f.at(True, old + 99, b"", g.SYN),
                                              f.at(True, old + 100, b"x", g.PSH | g.ACK)]
    f = _short(2)
    syn = f.handshake()[0]
    f = _short(2)
    cases["retransmitted_syn"] = [syn, syn, *f.handshake()[1:], syn, *_req(f), f.fin(True), syn, f.fin(False)]
    f = _short(3)
    cases["syn_with_payload"] = [f._pkt(True, g.SYN, b"GET /fastopen HTTP/1.1\r\n\r\n"), f.synack(), f.ack(),
                                 f.send(False, b"HTTP/1.1 204 No Content\r\n\r\n"), f.fin(True), f.fin(False)]
    f = _short(4)
    cases["syn_with_fin"] = [f._pkt(True, g.SYN | g.FIN), f.synack(), f.ack(), f.fin(False)]
    f = _short(5)
    cases["simultaneous_open"] = [f.syn(), f._pkt(False, g.SYN), f.synack(), f._pkt(True, g.SYN | g.ACK),
                                  *_req(f), f.fin(True), f.fin(False)]
    f = _short(6)
    cases["synack_first"] = [f.synack(), f.ack(), f.synack(), *_req(f), f.fin(False), f.fin(True), f.ack(False)]
    f = _short(7)
    sa = f.handshake()
    cases["synack_retransmitted_and_late"] = [sa[0], sa[1], sa[1], sa[2], *_req(f), sa[1], f.fin(True),
                                              f.fin(False)]
    f = _short(8)
    cases["rst_mid_stream"] = [*f.handshake(), *_req(f), f.send(True, b"GET /a HTTP/1.1\r\n\r\n"), f.rst(False),
                               f.send(True, b"late"), f.rst(True), f.ack(False)]
    f = _short(9)
    hs = f.handshake()
    cases["rst_with_a_hole"] = [*hs, f.send(True, b"lost"), f.send(True, b"after the hole"), f.rst(True)]
    f = _short(10)
    cases["rst_after_half_close"] = [*f.handshake(), *_req(f), f.fin(True), f.rst(False),
                                     f._pkt(True, g.RST, b"rst data")]
    f = _short(11)
    cases["rst_bare_and_syn_rst"] = [f._pkt(True, g.RST), f._pkt(True, g.SYN | g.RST), *f.handshake(),
                                     f._pkt(False, g.RST | g.SYN | g.ACK), f.ack(True)]
    f = _short(12)
    cases["fin_with_data"] = [*f.handshake(), f.send(True, b"GET / HTTP/1.1\r\n\r\n", g.FIN | g.PSH | g.ACK),
                              f.send(False, b"HTTP/1.1 204 No Content\r\n\r\n", g.FIN | g.PSH | g.ACK), f.ack(True)]
    f = _short(13)
    hs = f.handshake()
    r = _req(f)
    fin_c = f.fin(True)
    fin_s = f.fin(False)
    cases["fin_retransmitted_and_out_of_order"] = [*hs, r[0], fin_c, r[1], r[0], fin_c, fin_s,
                                                   fin_s, f.ack(True)]
    f = _short(14)
    hs = f.handshake()
    lost = f.send(True, b"lost bytes")
    cases["fin_beyond_a_hole_then_acked"] = [*hs, f.send(True, b"x", g.FIN | g.ACK), f.fin(False),
                                             f.ack(False), lost]
    f = _short(15)
    hs = f.handshake()
    req, resp = _req(f)
    cases["fin_while_the_peer_holds"] = [*hs, resp, f.fin(False), req, f.fin(True), f.ack(False)]
    f = _short(16)
    cases["fin_without_ack"] = [*f.handshake(), *_req(f), f._pkt(True, g.FIN), f._pkt(False, g.FIN, b"bye"),
                                f.send(False, b"after close")]
    f = _short(17)
    cases["data_without_ack_then_fin"] = [*f.handshake(), f._pkt(True, g.PSH, b"no ack"), f.fin(False),
                                          f._pkt(True, g.PSH, b"again"), f.fin(True)]
    f = _short(18)
    hs = f.handshake()
    f2 = _short(18, isn=5)
    cases["port_reuse_after_close"] = [*hs, *_req(f), f.fin(True), f.fin(False), f.ack(True), *f2.handshake(),
                                       *_req(f2), f2.rst(True)]
    f = _short(19)
    cases["fin_first_then_handshake"] = [f.fin(True), f.fin(False), *f.handshake(), f.fin(True), f.fin(False)]
    return cases


@needs_c
@pytest.mark.parametrize("case", sorted(_hostile_cases()))
def test_hostile_handshakes_and_closes_replay_the_same(tmp_path: Path, case: str) -> None:
    pk = _hostile_cases()[case]
    both(_write(tmp_path, [g.ether(p) for p in pk]))
    both(_write(tmp_path, [g.ether(p) for p in pk], name="b.pcap"), batch_size=1)


@needs_c
def test_hostile_cases_together_and_interleaved(tmp_path: Path) -> None:
    cases = list(_hostile_cases().values())
    frames = [g.ether(p) for pk in cases for p in pk]
    both(_write(tmp_path, frames))
    longest = max(len(pk) for pk in cases)
    frames = [g.ether(pk[i]) for i in range(longest) for pk in cases if i < len(pk)]
    _, stats = both(_write(tmp_path, frames, name="i.pcap"), batch_size=2)
    assert stats["evicted"].get("port_reuse") and stats["drops"].get("after_close") and stats["gap_bytes"]


@needs_c
@pytest.mark.parametrize("max_connections", [1, 3, 50])
def test_max_connections_evicts_the_same(tmp_path: Path, max_connections: int) -> None:
    flows = [_short(100 + c) for c in range(40)]
    opened = [f.handshake() for f in flows]
    frames = [g.ether(p) for hs in opened for p in hs[:2]]  # 40 SYN, SYN-ACK pairs, none closed
    for f in flows:
        frames += [g.ether(p) for p in [*_req(f), f.fin(True), f.fin(False)]]
    _, stats = both(_write(tmp_path, frames), max_connections=max_connections, batch_size=7)
    if max_connections < 40:
        assert stats["evicted"]["max_connections"]


@needs_c
def test_address_cache_overflow_replays_the_same(tmp_path: Path) -> None:
    """More client addresses than the reassembler's address cache holds (65536): it starts over."""
    frames = []
    for c in range(67000):
        f = _short(c)
        frames += [g.ether(f.syn()), g.ether(f.rst(True))]
    _, stats = both(_write(tmp_path, frames))
    assert stats["connections"] == 67000


@needs_c
@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**32 - 1), flip=st.floats(0, 0.4), swap=st.floats(0, 0.4), dup=st.floats(0, 0.2))
def test_short_connections_with_mangled_flags_replay_the_same(tmp_path: Path, seed: int, flip: float, swap: float,
                                                              dup: float) -> None:
    """Short connections, interleaved, their flags rewritten at random (SYN, FIN, RST, ACK in any mix,
    data on any of them), reordered and duplicated: C and Python agree."""
    rnd = random.Random(seed)
    flows = [_short(c, isn=rnd.choice([None, 0xFFFFFFF0])) for c in range(rnd.randint(1, 6))]
    per = []
    for f in flows:
        pk = [*f.handshake(), *_req(f), *(_req(f) if rnd.random() < 0.5 else []), f.fin(True), f.fin(False),
              f.ack(True)]
        per.append(pk)
    frames = []
    while any(per):
        pk = rnd.choice([p for p in per if p])
        ip_pkt = bytearray(pk.pop(0))
        if rnd.random() < flip:  # the TCP flags byte: IPv4 header (20) + 13
            ip_pkt[33] = rnd.choice([0x02, 0x12, 0x01, 0x11, 0x19, 0x04, 0x14, 0x06, 0x03, 0x10, 0x18, 0x00,
                                     0x17, 0x13])
        frames.append(g.ether(bytes(ip_pkt)))
        if rnd.random() < dup:
            frames.append(frames[-1])
    for i in range(len(frames) - 1):
        if rnd.random() < swap:
            frames[i], frames[i + 1] = frames[i + 1], frames[i]
    both(_write(tmp_path, frames, name=f"m{seed}.pcap"), max_connections=rnd.choice([2, 4, 65536]),
         batch_size=rnd.choice([1, 3, 256]))
