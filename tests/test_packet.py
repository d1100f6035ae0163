"""Link-layer/IP/TCP decoding: every link type, VLANs, IPv6 extension headers, bad input.

Frames are built with tests/support/pcapgen.py; results are checked field by field and
against dpkt's decoding of the same bytes. Hypothesis feeds random and mutated frames:
the decoder must return a tuple with in-bounds offsets or a known reason, never raise.
"""

from __future__ import annotations

import struct

import dpkt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from receivers import packet as P
from receivers.packet import REASONS, decode
from tests.support import pcapgen as g

PAYLOAD = b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n"
V4 = g.ipv4("192.0.2.1", "198.51.100.2", g.tcp(40001, 8080, 0xDEADBEEF, 0x01020304, g.PSH | g.ACK, PAYLOAD))
V6 = g.ipv6("2001:db8::1", "2001:db8::2", g.tcp(40001, 8080, 7, 9, g.ACK, PAYLOAD))
A4 = (bytes([192, 0, 2, 1]), bytes([198, 51, 100, 2]))


def check_v4(res, frame):
    assert not isinstance(res, str), res
    src, dst, sport, dport, seq, ack, flags, poff, pend = res
    assert (src, dst) == A4
    assert (sport, dport, seq, ack, flags) == (40001, 8080, 0xDEADBEEF, 0x01020304, g.PSH | g.ACK)
    assert bytes(memoryview(frame)[poff:pend]) == PAYLOAD


@pytest.mark.parametrize("linktype,frame", [
    (P.LINKTYPE_ETHERNET, g.ether(V4)),
    (P.LINKTYPE_ETHERNET, g.ether(V4, vlans=[100])),
    (P.LINKTYPE_ETHERNET, g.ether(V4, vlans=[100, 200], outer_tpid=0x88A8)),  # 802.1ad QinQ
    (P.LINKTYPE_ETHERNET, g.ether(V4, vlans=[5, 6, 7], outer_tpid=0x9100)),
    (P.LINKTYPE_LINUX_SLL, g.sll(V4)),
    (P.LINKTYPE_LINUX_SLL2, g.sll2(V4)),
    (P.LINKTYPE_NULL, g.null(V4)),
    (P.LINKTYPE_NULL, g.null(V4, byteorder=">")),
    (P.LINKTYPE_LOOP, g.null(V4, byteorder=">")),
    (P.LINKTYPE_RAW, V4),
    (P.LINKTYPE_IPV4, V4),
], ids=["eth", "vlan", "qinq", "3tags", "sll", "sll2", "null-le", "null-be", "loop", "raw", "ipv4"])
def test_ipv4_over_every_link_type(linktype, frame):
    check_v4(decode(linktype, frame), frame)


@pytest.mark.parametrize("linktype,frame", [
    (P.LINKTYPE_ETHERNET, g.ether(V6)),
    (P.LINKTYPE_ETHERNET, g.ether(V6, vlans=[7])),
    (P.LINKTYPE_LINUX_SLL, g.sll(V6)),
    (P.LINKTYPE_LINUX_SLL2, g.sll2(V6)),
    (P.LINKTYPE_NULL, g.null(V6, family=24)),
    (P.LINKTYPE_NULL, g.null(V6, family=30)),
    (P.LINKTYPE_NULL, g.null(V6, family=10)),
    (P.LINKTYPE_NULL, g.null(V6, family=28, byteorder=">")),
    (P.LINKTYPE_RAW, V6),
    (P.LINKTYPE_IPV6, V6),
])
def test_ipv6_over_every_link_type(linktype, frame):
    res = decode(linktype, frame)
    assert not isinstance(res, str), res
    src, dst, sport, dport, seq, ack, flags, poff, pend = res
    assert len(src) == 16 and src[-1] == 1 and dst[-1] == 2
    assert (sport, dport, seq, ack, flags) == (40001, 8080, 7, 9, g.ACK)
    assert bytes(memoryview(frame)[poff:pend]) == PAYLOAD


def test_ipv6_extension_headers():
    t = g.tcp(1, 2, 3, 4, g.ACK, b"data")
    ext = [(0, b"\x01\x04\x00\x00\x00\x00"),        # hop-by-hop (PadN)
           (43, b"\x00\x00" + b"\x00" * 4 + b"\x00" * 16),  # routing type 0-ish, one address
           (44, b"\x00\x00" + b"\x12\x34\x56\x78"),  # atomic fragment: offset 0, M=0
           (51, b"\x00" * 10),                      # AH
           (60, b"\x01\x02\x00\x00")]               # destination options
    pkt = g.ipv6("::1", "::2", t, ext=ext)
    res = decode(P.LINKTYPE_RAW, pkt)
    assert not isinstance(res, str), res
    assert bytes(memoryview(pkt)[res[7]:res[8]]) == b"data"
    d = dpkt.ip6.IP6(pkt)
    assert isinstance(d.data, dpkt.tcp.TCP) and d.data.data == b"data"


def test_ipv6_real_fragment_is_counted_not_decoded():
    t = g.tcp(1, 2, 3, 4, g.ACK, b"data")
    first = g.ipv6("::1", "::2", t, ext=[(44, struct.pack("!HI", 0x0001, 99))])  # M=1
    later = g.ipv6("::1", "::2", t, ext=[(44, struct.pack("!HI", 185 << 3, 99))])
    assert decode(P.LINKTYPE_RAW, first) == "ip_fragment"
    assert decode(P.LINKTYPE_RAW, later) == "ip_fragment"


def test_ipv4_fragments_counted():
    t = g.tcp(1, 2, 3, 4, g.ACK, b"data")
    assert decode(P.LINKTYPE_RAW, g.ipv4("1.1.1.1", "2.2.2.2", t, frag=0x2000)) == "ip_fragment"  # MF
    assert decode(P.LINKTYPE_RAW, g.ipv4("1.1.1.1", "2.2.2.2", t, frag=0x0010)) == "ip_fragment"  # offset


def test_reasons():
    udp = g.ipv4("1.1.1.1", "2.2.2.2", b"\x00" * 8, proto=17)
    assert decode(P.LINKTYPE_RAW, udp) == "malformed"  # a UDP length under its header's
    assert decode(P.LINKTYPE_RAW, g.ipv4("1.1.1.1", "2.2.2.2", b"\x08\x00" + b"\x00" * 6, proto=1)) == "not_tcp"
    assert decode(P.LINKTYPE_ETHERNET, b"\xff" * 12 + b"\x08\x06" + b"\x00" * 28) == "not_ip"  # ARP
    assert decode(P.LINKTYPE_ETHERNET, g.ether(V4)[:30]) == "truncated"
    assert decode(P.LINKTYPE_RAW, V4[:-5]) == "truncated"  # snaplen cut the payload
    assert decode(P.LINKTYPE_RAW, b"") == "truncated"
    assert decode(147, g.ether(V4)) == "unsupported_linktype"
    bad_doff = bytearray(V4)
    bad_doff[20 + 12] = 0x20  # TCP data offset 2 words
    assert decode(P.LINKTYPE_RAW, bytes(bad_doff)) == "malformed"
    bad_ihl = bytearray(V4)
    bad_ihl[0] = 0x43
    assert decode(P.LINKTYPE_RAW, bytes(bad_ihl)) == "malformed"
    assert decode(P.LINKTYPE_ETHERNET, g.ether(V4, vlans=[1] * 9)) == "malformed"  # tag loop
    no_next = g.ipv6("::1", "::2", b"", nxt=59)
    assert decode(P.LINKTYPE_RAW, no_next) == "not_tcp"


def test_ethernet_padding_and_fcs_trimmed_by_ip_length():
    syn = g.ipv4("1.1.1.1", "2.2.2.2", g.tcp(1, 2, 3, 0, g.SYN))
    frame = g.ether(syn) + b"\xaa\xbb\xcc\xdd"  # 60-byte padded frame + FCS
    res = decode(P.LINKTYPE_ETHERNET, frame)
    assert res[7] == res[8]  # no payload


def test_offsets_within_a_larger_buffer():
    frame = g.ether(V4)
    buf = memoryview(b"junk" * 10 + frame + b"more")
    res = decode(P.LINKTYPE_ETHERNET, buf, 40, 40 + len(frame))
    assert bytes(buf[res[7]:res[8]]) == PAYLOAD


def _dpkt_payload(frame: bytes):
    ip = dpkt.ethernet.Ethernet(frame).data
    if isinstance(ip, (dpkt.ip.IP, dpkt.ip6.IP6)) and isinstance(ip.data, dpkt.tcp.TCP):
        t = ip.data
        return (t.sport, t.dport, t.seq, t.ack, t.flags & 0xFF, bytes(t.data))
    return None


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300), st.integers(0, 0xFFFFFFFF), st.integers(0, 0xFF), st.booleans(),
       st.lists(st.integers(0, 4095), max_size=2))
def test_agrees_with_dpkt(payload, seq, flags, v6, vlans):
    t = g.tcp(1234, 80, seq, seq ^ 0x5555, flags, payload)
    pkt = g.ipv6("2001:db8::a", "2001:db8::b", t) if v6 else g.ipv4("10.9.8.7", "10.1.2.3", t)
    frame = g.ether(pkt, vlans=vlans)
    res = decode(P.LINKTYPE_ETHERNET, frame)
    sport, dport, s, a, f, data = _dpkt_payload(frame)
    assert res[2:7] == (sport, dport, s, a, f)
    assert bytes(memoryview(frame)[res[7]:res[8]]) == data


LINKTYPES = [*sorted(P.LINK_DECODERS), 147]


def _check(res, n):
    if isinstance(res, str):
        assert res in REASONS
    else:
        assert len(res) == 9
        src, dst, _sport, _dport, _seq, _ack, _flags, poff, pend = res
        assert len(src) in (4, 16) and len(dst) == len(src)
        assert 0 <= poff <= pend <= n


@settings(max_examples=400, deadline=None)
@given(st.sampled_from(LINKTYPES), st.binary(max_size=200))
def test_fuzz_random_frames(linktype, data):
    _check(decode(linktype, data), len(data))


_SEEDS = [g.ether(V4), g.ether(V6, vlans=[3]), g.sll2(V4), g.null(V6, family=30),
          g.ipv6("::1", "::2", g.tcp(1, 2, 3, 4, g.ACK, b"x"), ext=[(0, b"\x00" * 6), (44, b"\x00" * 6)])]
_SEED_LT = [P.LINKTYPE_ETHERNET, P.LINKTYPE_ETHERNET, P.LINKTYPE_LINUX_SLL2, P.LINKTYPE_NULL, P.LINKTYPE_RAW]


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, len(_SEEDS) - 1), st.lists(st.tuples(st.integers(0, 400), st.integers(0, 255)), max_size=6),
       st.integers(0, 400))
def test_fuzz_mutated_frames(i, flips, cut):
    _check_mutated(_SEED_LT[i], _SEEDS[i], flips, cut)


def _check_mutated(linktype: int, frame: bytes, flips: list[tuple[int, int]], cut: int) -> None:
    """``frame`` with the bytes at ``flips`` overwritten and cut at ``cut``: a segment or a reason."""
    b = bytearray(frame)
    for pos, val in flips:
        if pos < len(b):
            b[pos] = val
    b = b[:cut] if cut < len(b) else b
    _check(decode(linktype, memoryview(bytes(b))), len(b))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(0, 80), st.integers(0, 255)), max_size=4), st.integers(0, 120),
       st.binary(max_size=40))
def test_ethernet_fast_path_agrees_with_general_path(flips, cut, payload):
    b = bytearray(g.ether(g.ipv4("10.0.0.1", "10.0.0.2", g.tcp(5, 6, 7, 8, g.ACK, payload))))
    for pos, val in flips:
        if pos < len(b):
            b[pos] = val
    b = bytes(b[:cut])
    fast = P._ethernet(b, 0, len(b))
    general = P._ethernet_general(b, 0, len(b))
    if not isinstance(fast, str) or not isinstance(general, str):
        assert fast == general


def test_ipv4_total_length_zero_from_segmentation_offload():
    big = b"b" * 70000
    pkt = bytearray(g.ipv4("1.1.1.1", "2.2.2.2", g.tcp(1, 2, 3, 4, g.ACK, b"")) + big)
    pkt[2:4] = b"\x00\x00"  # what the tap sees for a >64 KiB GSO packet
    res = decode(P.LINKTYPE_ETHERNET, g.ether(bytes(pkt)))
    assert res[8] - res[7] == len(big)


# -- encapsulations (issue 16 class 5): tunnels decoded to the innermost TCP -------------------------
def _udp(sport: int, dport: int, payload: bytes) -> bytes:
    return struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload


def _outer4(payload: bytes, proto: int) -> bytes:
    return g.ipv4("10.99.0.1", "10.99.0.2", payload, proto=proto)


def _eth(ethertype: int, payload: bytes) -> bytes:
    return b"\x02\x00\x00\x00\x00\x02\x02\x00\x00\x00\x00\x01" + struct.pack("!H", ethertype) + payload


def vxlan(inner_frame: bytes, vni: int = 42) -> bytes:
    return _outer4(_udp(51000, P.VXLAN_PORT, struct.pack("!B3xI", 0x08, vni << 8) + inner_frame), 17)


def geneve(inner: bytes, ptype: int = 0x6558, options: bytes = b"") -> bytes:
    hdr = struct.pack("!BBHI", len(options) // 4, 0, ptype, 7 << 8) + options
    return _outer4(_udp(51001, P.GENEVE_PORT, hdr + inner), 17)


def gre(inner: bytes, ptype: int, checksum: bool = False, key: bool = False, seq: bool = False,
        erspan: bytes = b"") -> bytes:
    flags = (0x8000 if checksum else 0) | (0x2000 if key else 0) | (0x1000 if seq else 0)
    hdr = struct.pack("!HH", flags, ptype) + (b"\0\0\0\0" if checksum else b"") + (b"\0\0\0\x07" if key else b"")
    hdr += b"\0\0\0\x01" if seq else b""
    return _outer4(hdr + erspan + inner, 47)


def mpls(inner: bytes, labels: list[int]) -> bytes:
    out = b""
    for i, lab in enumerate(labels):
        out += struct.pack("!I", (lab << 12) | (0x100 if i == len(labels) - 1 else 0) | 64)
    return out + inner


def nflog(packet: bytes, family: int = 2, order: str = "<") -> bytes:
    def tlv(t: int, v: bytes) -> bytes:
        raw = struct.pack(order + "HH", 4 + len(v), t) + v
        return raw + b"\0" * (-len(raw) % 4)
    return bytes([family, 0]) + b"\0\x01" + tlv(1, b"\x08\x00\x03\x00") + tlv(10, b"pfx\0\0") + tlv(9, packet)


TUNNELS = [
    ("vxlan", P.LINKTYPE_ETHERNET, g.ether(vxlan(g.ether(V4)))),
    ("vxlan-vlan-inner", P.LINKTYPE_ETHERNET, g.ether(vxlan(g.ether(V4, vlans=[12])))),
    ("geneve-eth", P.LINKTYPE_ETHERNET, g.ether(geneve(g.ether(V4), options=b"\x01\x02\x03\x01" + b"\0" * 4))),
    ("geneve-ip", P.LINKTYPE_ETHERNET, g.ether(geneve(V4, ptype=0x0800))),
    ("gre-ip", P.LINKTYPE_ETHERNET, g.ether(gre(V4, 0x0800))),
    ("gre-key-seq-csum", P.LINKTYPE_ETHERNET, g.ether(gre(V4, 0x0800, checksum=True, key=True, seq=True))),
    ("gre-teb", P.LINKTYPE_ETHERNET, g.ether(gre(g.ether(V4), 0x6558, key=True))),
    ("erspan-ii", P.LINKTYPE_ETHERNET, g.ether(gre(g.ether(V4), 0x88BE, seq=True, erspan=b"\x10\x01\0\0\0\0\0\0"))),
    ("erspan-i", P.LINKTYPE_ETHERNET, g.ether(gre(g.ether(V4), 0x88BE))),
    ("erspan-iii", P.LINKTYPE_ETHERNET, g.ether(gre(g.ether(V4), 0x22EB, seq=True, erspan=b"\x20" + b"\0" * 11))),
    ("erspan-iii-sub", P.LINKTYPE_ETHERNET,
     g.ether(gre(g.ether(V4), 0x22EB, seq=True, erspan=b"\x20" + b"\0" * 10 + b"\x01" + b"\0" * 8))),
    ("mpls-1", P.LINKTYPE_ETHERNET, _eth(0x8847, mpls(V4, [100]))),
    ("mpls-3", P.LINKTYPE_ETHERNET, _eth(0x8847, mpls(V4, [100, 200, 300]))),
    ("mpls-mc", P.LINKTYPE_ETHERNET, _eth(0x8848, mpls(V4, [16]))),
    ("mpls-pw-eth", P.LINKTYPE_ETHERNET, _eth(0x8847, mpls(b"\0\0\0\0" + g.ether(V4), [500, 600]))),
    ("mpls-sll", P.LINKTYPE_LINUX_SLL, g.sll(V4)[:14] + b"\x88\x47" + mpls(V4, [1])),
    ("gre-mpls", P.LINKTYPE_ETHERNET, g.ether(gre(mpls(V4, [77]), 0x8847))),
    ("ipip", P.LINKTYPE_ETHERNET, g.ether(_outer4(V4, 4))),
    ("vxlan-in-gre-in-mpls", P.LINKTYPE_ETHERNET, _eth(0x8847, mpls(gre(g.ether(vxlan(g.ether(V4))), 0x6558),
                                                                  [9]))),
    ("nflog", P.LINKTYPE_NFLOG, nflog(V4)),
    ("nflog-be", P.LINKTYPE_NFLOG, nflog(V4, order=">")),
    ("raw-vxlan", P.LINKTYPE_RAW, vxlan(g.ether(V4))),
]


@pytest.mark.parametrize("name,linktype,frame", TUNNELS, ids=[t[0] for t in TUNNELS])
def test_tunnels_decode_to_the_innermost_tcp(name, linktype, frame):
    check_v4(decode(linktype, frame), frame)


def test_tunnels_over_ipv6_and_carrying_ipv6():
    outer6 = g.ipv6("2001:db8:ff::1", "2001:db8:ff::2", _udp(40000, P.VXLAN_PORT, b"\x08\0\0\0\0\0\x2a\0"
                                                            + g.ether(V6)), nxt=17)
    res = decode(P.LINKTYPE_ETHERNET, g.ether(outer6))
    assert not isinstance(res, str) and res[1][-1] == 2 and bytes(memoryview(g.ether(outer6))[res[7]:res[8]]) == PAYLOAD
    six_in_four = g.ether(_outer4(V6, 41))
    res = decode(P.LINKTYPE_ETHERNET, six_in_four)
    assert not isinstance(res, str) and len(res[0]) == 16
    assert not isinstance(decode(P.LINKTYPE_NFLOG, nflog(V6, family=10)), str)
    assert not isinstance(decode(P.LINKTYPE_ETHERNET, _eth(0x8847, mpls(V6, [3]))), str)


def test_tunnel_depth_is_bounded_and_plain_udp_is_a_datagram():
    frame = V4
    for _ in range(P.MAX_TUNNEL_DEPTH):
        frame = _outer4(frame, 4)
    assert not isinstance(decode(P.LINKTYPE_RAW, frame), str)  # MAX_TUNNEL_DEPTH tunnels: decoded
    assert decode(P.LINKTYPE_RAW, _outer4(frame, 4)) == "malformed"  # one more: refused
    dgram = _outer4(_udp(5000, 53, b"\x12\x34" + b"\0" * 10), 17)
    res = decode(P.LINKTYPE_RAW, dgram)
    assert res[2:7] == (5000, 53, 0, 0, P.UDP) and bytes(dgram[res[7]:res[8]]) == b"\x12\x34" + b"\0" * 10
    assert decode(P.LINKTYPE_RAW, _outer4(_udp(5000, P.VXLAN_PORT, b"\0" * 8 + g.ether(V4)), 17)) == "malformed"
    assert decode(P.LINKTYPE_ETHERNET, _eth(0x8847, struct.pack("!I", 100 << 12) * 20)) == "malformed"  # no bottom
    assert decode(P.LINKTYPE_RAW, _outer4(b"\0\x01\x88\x0b" + b"\0" * 8, 47)) == "not_tcp"  # GRE v1 (PPTP)
    for cut in range(0, len(TUNNELS[0][2]), 7):
        _check(decode(P.LINKTYPE_ETHERNET, TUNNELS[0][2][:cut]), cut)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, len(TUNNELS) - 1), st.lists(st.tuples(st.integers(0, 200), st.integers(0, 255)), max_size=6),
       st.integers(0, 300))
def test_fuzz_mutated_tunnels(i, flips, cut):
    _check_mutated(TUNNELS[i][1], TUNNELS[i][2], flips, cut)


def test_tunnelled_capture_replays_to_spans(tmp_path):
    """A pcap whose HTTP exchange runs inside VXLAN (and one as NFLOG): the pcap receiver
    and the stage see the inner connection."""
    _replays_to_one_span(tmp_path, "/tunnelled", [(P.LINKTYPE_ETHERNET, lambda p: g.ether(vxlan(g.ether(p)))),
                                                   (P.LINKTYPE_NFLOG, nflog)])


def _replays_to_one_span(tmp_path, target: str, links) -> None:
    """One HTTP exchange (handshake, request, response) with each of ``links``' (link type,
    wrap an IPv4 packet) replays to its one span, the inner connection's."""
    from tests.support.replay import replay

    c, s = ("10.1.0.5", 41000), ("10.1.0.9", 80)
    req = b"GET " + target.encode() + b" HTTP/1.1\r\nHost: svc\r\n\r\n"
    resp = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    pkts = [g.ipv4(c[0], s[0], g.tcp(c[1], s[1], 1, 0, g.SYN)),
            g.ipv4(s[0], c[0], g.tcp(s[1], c[1], 100, 2, g.SYN | g.ACK)),
            g.ipv4(c[0], s[0], g.tcp(c[1], s[1], 2, 101, g.PSH | g.ACK, req)),
            g.ipv4(s[0], c[0], g.tcp(s[1], c[1], 101, 2 + len(req), g.PSH | g.ACK, resp))]
    for i, (lt, wrap) in enumerate(links):
        path = tmp_path / f"t{i}-{lt}.pcap"
        g.write_pcap(path, [wrap(p) for p in pkts], linktype=lt)
        spans, rstats, _ = replay(path)
        assert [(x.attributes["url.path"], x.attributes["http.response.status_code"]) for x in spans] == [
            (target, 200)], (lt, rstats)
        assert spans[0].attributes["client.address"] == "10.1.0.5"


# -- PPP, PPPoE, Cisco HDLC, 802.11 (encapsulations beyond Ethernet) ----------------------
def pppoe(ip: bytes, proto: int = 0x0021, session: int = 0x1234) -> bytes:
    return struct.pack("!BBHHH", 0x11, 0, session, len(ip) + 2, proto) + ip


def wlan(ip: bytes, fc0: int = 0x08, flags: int = 0x01, qos: bytes = b"", ethertype: int = 0x0800,
         snap: bytes = b"\xaa\xaa\x03\x00\x00\x00") -> bytes:
    """An 802.11 data frame: frame control, duration, three addresses, sequence control (a
    fourth address when to-DS and from-DS), QoS/HT control as given, LLC/SNAP, the packet."""
    hdr = bytes([fc0, flags]) + b"\0\0" + bytes(range(1, 19)) + b"\x10\x00"
    if flags & 3 == 3:
        hdr += b"\x0a" * 6
    return hdr + qos + snap + struct.pack("!H", ethertype) + ip


def radiotap(frame: bytes, flags: int | None = 0x10, tsft: bool = True, ext: bool = False) -> bytes:
    """A radiotap header: TSFT (aligned to 8) and Flags when asked; 0x10 says an FCS ends the frame."""
    present = (0x1 if tsft else 0) | (0x2 if flags is not None else 0) | (0x80000000 if ext else 0)
    body = struct.pack("<I", present) + (struct.pack("<I", 0) if ext else b"")
    fields = b""
    if tsft:
        fields += b"\0" * ((-(4 + len(body))) % 8) + struct.pack("<Q", 123456)
    if flags is not None:
        fields += bytes([flags])
    hlen = 4 + len(body) + len(fields)
    fcs = b"\xde\xad\xbe\xef" if flags is not None and flags & 0x10 else b""
    return struct.pack("<BxH", 0, hlen) + body + fields + frame + fcs


ENCAPSULATIONS = [
    ("pppoe", P.LINKTYPE_ETHERNET, _eth(0x8864, pppoe(V4)) + b"\0" * 6),  # Ethernet padding after it
    ("pppoe-vlan", P.LINKTYPE_ETHERNET, _eth(0x8100, struct.pack("!HH", 30, 0x8864) + pppoe(V4))),
    ("pppoe-sll", P.LINKTYPE_LINUX_SLL, g.sll(V4)[:14] + b"\x88\x64" + pppoe(V4)),
    ("ppp-ether", P.LINKTYPE_PPP_ETHER, pppoe(V4)),
    ("ppp", P.LINKTYPE_PPP, b"\xff\x03\x00\x21" + V4),
    ("ppp-no-address", P.LINKTYPE_PPP, b"\x00\x21" + V4),
    ("ppp-pfc", P.LINKTYPE_PPP, b"\xff\x03\x21" + V4),
    ("ppp-hdlc", P.LINKTYPE_PPP_HDLC, b"\xff\x03\x00\x21" + V4),
    ("ppp-hdlc-cisco", P.LINKTYPE_PPP_HDLC, b"\x0f\x00\x08\x00" + V4),
    ("c-hdlc", P.LINKTYPE_C_HDLC, b"\x8f\x00\x08\x00" + V4),
    ("wlan", P.LINKTYPE_IEEE802_11, wlan(V4)),
    ("wlan-from-ds", P.LINKTYPE_IEEE802_11, wlan(V4, flags=0x02)),
    ("wlan-4addr", P.LINKTYPE_IEEE802_11, wlan(V4, flags=0x03)),
    ("wlan-qos", P.LINKTYPE_IEEE802_11, wlan(V4, fc0=0x88, qos=b"\x00\x00")),
    ("wlan-qos-htc", P.LINKTYPE_IEEE802_11, wlan(V4, fc0=0x88, flags=0x81, qos=b"\x00\x00" + b"\0" * 4)),
    ("wlan-qos-4addr", P.LINKTYPE_IEEE802_11, wlan(V4, fc0=0x88, flags=0x03, qos=b"\x05\x00")),
    ("wlan-bridge-tunnel", P.LINKTYPE_IEEE802_11, wlan(V4, snap=b"\xaa\xaa\x03\x00\x00\xf8")),
    ("wlan-amsdu", P.LINKTYPE_IEEE802_11,
     wlan(b"", fc0=0x88, qos=b"\x80\x00", snap=b"")[:-2] + b"\x02" * 12 + struct.pack("!H", 8 + len(V4))
     + b"\xaa\xaa\x03\x00\x00\x00\x08\x00" + V4),
    ("radiotap", P.LINKTYPE_IEEE802_11_RADIOTAP, radiotap(wlan(V4))),
    ("radiotap-no-tsft", P.LINKTYPE_IEEE802_11_RADIOTAP, radiotap(wlan(V4), tsft=False)),
    ("radiotap-ext-present", P.LINKTYPE_IEEE802_11_RADIOTAP, radiotap(wlan(V4), ext=True)),
    ("radiotap-no-flags", P.LINKTYPE_IEEE802_11_RADIOTAP, radiotap(wlan(V4), flags=None)),
    ("ppi", P.LINKTYPE_PPI, struct.pack("<BBHI", 0, 0, 8, 105) + wlan(V4)),
    ("ppi-ethernet", P.LINKTYPE_PPI, struct.pack("<BBHI", 0, 0, 8, 1) + g.ether(V4)),
    ("prism", P.LINKTYPE_IEEE802_11_PRISM, struct.pack("<II", 0x41, 144) + b"\0" * 136 + wlan(V4)),
    ("avs", P.LINKTYPE_IEEE802_11_AVS, struct.pack("!II", 0x80211001, 64) + b"\0" * 56 + wlan(V4)),
    ("avs-under-prism", P.LINKTYPE_IEEE802_11_PRISM, struct.pack("!II", 0x80211001, 64) + b"\0" * 56 + wlan(V4)),
]


@pytest.mark.parametrize("name,linktype,frame", ENCAPSULATIONS, ids=[t[0] for t in ENCAPSULATIONS])
def test_ppp_hdlc_and_wifi_decode_to_the_tcp_inside(name, linktype, frame):
    check_v4(decode(linktype, frame), frame)


def test_ppp_and_wifi_carry_ipv6_and_say_why_not():
    res = decode(P.LINKTYPE_ETHERNET, _eth(0x8864, pppoe(V6, proto=0x0057)))
    assert not isinstance(res, str) and len(res[0]) == 16
    assert not isinstance(decode(P.LINKTYPE_PPP, b"\x57" + V6), str)
    assert not isinstance(decode(P.LINKTYPE_IEEE802_11, wlan(V6, ethertype=0x86DD)), str)
    assert not isinstance(decode(P.LINKTYPE_PPP, b"\x02\x81" + mpls(V4, [5])), str)  # MPLS over PPP
    # PPP's own negotiation, PPPoE discovery and 802.11 frames without a readable body are no IP.
    assert decode(P.LINKTYPE_PPP, b"\xff\x03\xc0\x21" + b"\x01\x01\x00\x04") == "not_ip"  # LCP
    assert decode(P.LINKTYPE_ETHERNET, _eth(0x8863, b"\x11\x09\0\0\0\0")) == "not_ip"  # PADI
    assert decode(P.LINKTYPE_IEEE802_11, b"\x80\x00" + b"\0" * 40) == "not_ip"  # beacon
    assert decode(P.LINKTYPE_IEEE802_11, wlan(V4, fc0=0x48)) == "not_ip"  # null data
    assert decode(P.LINKTYPE_IEEE802_11, wlan(V4, flags=0x41)) == "not_ip"  # protected: encrypted
    assert decode(P.LINKTYPE_IEEE802_11, wlan(V4, snap=b"\xf0\xf0\x03\x00\x00\x00")) == "not_ip"
    assert decode(P.LINKTYPE_IEEE802_11_RADIOTAP, radiotap(wlan(V4), flags=0x50)) == "malformed"  # bad FCS
    assert decode(P.LINKTYPE_IEEE802_11_RADIOTAP, b"\x01\x00\x08\x00\0\0\0\0" + wlan(V4)) == "malformed"
    assert decode(P.LINKTYPE_ETHERNET, _eth(0x8864, b"\x11\x00\x12\x34\xff\xff\x00\x21" + V4)) == "truncated"
    assert decode(P.LINKTYPE_ETHERNET, _eth(0x8864, b"\x12\x00\x12\x34\x00\x10\x00\x21" + V4)) == "malformed"
    assert decode(P.LINKTYPE_PPI, struct.pack("<BBHI", 0, 0, 8, 147) + V4) == "unsupported_linktype"
    for _n, lt, frame in ENCAPSULATIONS:  # every prefix of every frame: a reason or a segment, never a raise
        for cut in range(len(frame)):
            _check(decode(lt, frame[:cut]), cut)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, len(ENCAPSULATIONS) - 1),
       st.lists(st.tuples(st.integers(0, 200), st.integers(0, 255)), max_size=6), st.integers(0, 300))
def test_fuzz_mutated_encapsulations(i, flips, cut):
    _check_mutated(ENCAPSULATIONS[i][1], ENCAPSULATIONS[i][2], flips, cut)


def test_encapsulations_agree_with_tshark(tmp_path):
    """tshark (the reference dissector) reads the same ports, sequence number and payload
    length from each link type's frame as we do."""
    import shutil
    import subprocess

    tshark = shutil.which("tshark")
    if tshark is None:
        pytest.skip("tshark is not installed (tests/run.sh installs it)")
    for name, lt, frame in ENCAPSULATIONS:
        path = tmp_path / f"{name}.pcap"
        g.write_pcap(path, [frame], linktype=lt)
        out = subprocess.run([tshark, "-r", str(path), "-T", "fields", "-e", "tcp.srcport", "-e", "tcp.dstport",
                              "-e", "tcp.seq_raw", "-e", "tcp.len"], capture_output=True, text=True, timeout=60)
        res = decode(lt, frame)
        assert not isinstance(res, str), (name, res)
        ours = [str(res[2]), str(res[3]), str(res[4]), str(res[8] - res[7])]
        assert out.stdout.split() == ours, (name, out.stdout, out.stderr[-300:])


def test_pppoe_and_radiotap_captures_replay_to_spans(tmp_path):
    """A whole exchange over PPPoE, over radiotap 802.11 and over PPP: the receiver and the
    stage see the connection inside."""
    _replays_to_one_span(tmp_path, "/wifi", [
        (P.LINKTYPE_ETHERNET, lambda p: _eth(0x8864, pppoe(p))),
        (P.LINKTYPE_IEEE802_11_RADIOTAP, lambda p: radiotap(wlan(p, fc0=0x88, qos=b"\0\0"))),
        (P.LINKTYPE_PPP, lambda p: b"\xff\x03\x00\x21" + p)])
