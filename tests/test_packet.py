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
    assert decode(P.LINKTYPE_RAW, udp) == "not_tcp"
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
    b = bytearray(_SEEDS[i])
    for pos, val in flips:
        if pos < len(b):
            b[pos] = val
    b = b[:cut] if cut < len(b) else b
    _check(decode(_SEED_LT[i], memoryview(bytes(b))), len(b))


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
