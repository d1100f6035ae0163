"""Link-layer, IPv4/IPv6 and TCP decoding from a buffer and offsets (no file format here).

Contract: ``decode(linktype, buf, off, end)`` looks at ``buf[off:end]`` (one captured
frame, ``buf`` a memoryview/bytes) and returns either a ``Segment`` tuple

    (src, dst, sport, dport, seq, ack, flags, payload_off, payload_end)

with ``src``/``dst`` the packed addresses (4 or 16 ``bytes``: small fields, copied on
purpose because they become dict keys) and the TCP payload at
``buf[payload_off:payload_end]`` (not copied: the caller slices the view), or a ``str``
drop reason (one of ``REASONS``). A UDP datagram (not a tunnel's) is a ``Segment`` too,
with ``flags == UDP`` (a value no TCP flags byte has), ``seq``/``ack`` 0 and the datagram's
payload, cut to the UDP length: one tuple shape, so the TCP path unpacks as before and the
receiver tells UDP by one integer comparison. It never raises on bad input (given ``end <=
len(buf)``): every length is checked before it is used. Shared by the ``pcap`` and
AF_PACKET ``live`` receivers. Untagged Ethernet + IPv4 + TCP, by far the most common
frame, has a fast path (two unpacks, no calls) checked against the general path in tests.

Headers are tables of precompiled ``struct.Struct``s read with ``unpack_from``
(dpkt-style); link types dispatch through ``LINK_DECODERS`` keyed by the LINKTYPE_*
number (https://www.tcpdump.org/linktypes.html).

IPv4 fragments are counted and dropped (reason ``ip_fragment``), not reassembled: TCP
stacks use path-MTU discovery and set DF, so fragmented TCP is rare, and reassembly
would add per-flow state, timers and payload copies for almost no traffic; the lost
segment becomes a GAP downstream like any other capture loss. The same holds for
IPv6 fragment headers, except atomic fragments (offset 0, no more fragments), which
carry the whole packet and are decoded.

Tunnels are decoded down to the TCP inside them, recursively and at most
``MAX_TUNNEL_DEPTH`` deep (a tunnel in a tunnel ... is hostile past that: ``malformed``):
VXLAN (UDP 4789, RFC 7348), GENEVE (UDP 6081, RFC 8926, options skipped), GRE (RFC 2784/
2890, checksum/key/sequence fields) carrying IPv4, IPv6, Ethernet (0x6558), MPLS or
ERSPAN type II (0x88BE) and III (0x22EB), IP-in-IP and IPv6-in-IP (protocols 4, 41),
MPLS label stacks (Ethernet types 0x8847 unicast, 0x8848 multicast; the payload told by
its first nibble, a pseudowire control word before an Ethernet frame), and NFLOG
(LINKTYPE_NFLOG 239: the NFULA_PAYLOAD TLV holds the IP packet). The 4-tuple is the
innermost one: the outer addresses are the tunnel's, not the connection's.

Beyond Ethernet: PPPoE sessions (Ethernet type 0x8864, RFC 2516, and LINKTYPE_PPP_ETHER
51), PPP (LINKTYPE_PPP 9 and PPP_HDLC 50, RFC 1661/1662: address and control optional,
the protocol field compressed or not), Cisco HDLC (LINKTYPE_C_HDLC 104), and Wi-Fi data
frames (IEEE 802.11, LINKTYPE_IEEE802_11 105, under a radiotap 127, PPI 192, Prism 119 or
AVS 163 header: the 802.11 header's length from its frame control, then LLC/SNAP).
Management, control, null and protected (encrypted) 802.11 frames carry no IP we can
read: ``not_ip``; a radiotap header that says the frame failed its FCS: ``malformed``.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

__all__ = [
    "LINKTYPE_NULL", "LINKTYPE_ETHERNET", "LINKTYPE_RAW", "LINKTYPE_LOOP", "LINKTYPE_LINUX_SLL",
    "LINKTYPE_IPV4", "LINKTYPE_IPV6", "LINKTYPE_LINUX_SLL2", "LINKTYPE_NFLOG", "LINKTYPE_PPP", "LINKTYPE_PPP_HDLC",
    "LINKTYPE_PPP_ETHER", "LINKTYPE_C_HDLC", "LINKTYPE_IEEE802_11", "LINKTYPE_IEEE802_11_PRISM",
    "LINKTYPE_IEEE802_11_RADIOTAP", "LINKTYPE_IEEE802_11_AVS", "LINKTYPE_PPI", "LINK_DECODERS", "REASONS",
    "TCP_FIN", "TCP_SYN", "TCP_RST", "TCP_PSH", "TCP_ACK", "TCP_URG", "UDP",
    "Segment", "decode", "decode_l3", "supported_linktype",
]

# LINKTYPE_* numbers (tcpdump.org/linktypes.html). 12 and 14 are historical aliases of RAW.
LINKTYPE_NULL = 0
LINKTYPE_ETHERNET = 1
LINKTYPE_RAW = 101
LINKTYPE_LOOP = 108
LINKTYPE_LINUX_SLL = 113
LINKTYPE_IPV4 = 228
LINKTYPE_IPV6 = 229
LINKTYPE_LINUX_SLL2 = 276
LINKTYPE_NFLOG = 239
LINKTYPE_PPP = 9
LINKTYPE_PPP_HDLC = 50
LINKTYPE_PPP_ETHER = 51
LINKTYPE_C_HDLC = 104
LINKTYPE_IEEE802_11 = 105
LINKTYPE_IEEE802_11_PRISM = 119
LINKTYPE_IEEE802_11_RADIOTAP = 127
LINKTYPE_IEEE802_11_AVS = 163
LINKTYPE_PPI = 192

ETH_P_IP = 0x0800
ETH_P_IPV6 = 0x86DD
# 802.1Q, 802.1ad (QinQ) and the pre-standard 0x9100 QinQ tag.
_VLAN_TPIDS = frozenset((0x8100, 0x88A8, 0x9100))
#: Stacked VLAN tags beyond this are refused (QinQ uses 2; a loop would be hostile input).
MAX_VLAN_TAGS = 8
#: IPv6 extension headers walked before giving up (RFC 8200 §4.1 recommends each appear at most once or twice).
MAX_IPV6_EXT_HEADERS = 10

IPPROTO_TCP = 6
IPPROTO_UDP = 17
IPPROTO_GRE = 47
IPPROTO_IPIP = 4
IPPROTO_IPV6 = 41
#: UDP ports of the tunnels decoded (IANA): VXLAN (RFC 7348) and GENEVE (RFC 8926).
VXLAN_PORT = 4789
GENEVE_PORT = 6081
#: Tunnels inside tunnels decoded before a frame is refused (``malformed``): real
#: networks stack two or three (VXLAN in GRE in MPLS); more is a loop or hostile input.
MAX_TUNNEL_DEPTH = 5
#: MPLS label stack entries walked before the bottom of stack must have come (RFC 3032).
MAX_MPLS_LABELS = 16
ETH_P_TEB = 0x6558      # transparent Ethernet bridging (GRE, GENEVE)
ETH_P_MPLS_UC = 0x8847
ETH_P_MPLS_MC = 0x8848
ETH_P_ERSPAN2 = 0x88BE  # ERSPAN type II (and type I, without a sequence number)
ETH_P_ERSPAN3 = 0x22EB
ETH_P_PPPOE = 0x8864    # PPPoE session stage (RFC 2516); 0x8863, discovery, carries no IP
#: PPP protocol numbers (RFC 1661, IANA): IPv4, IPv6, MPLS unicast and multicast.
PPP_IP = 0x0021
PPP_IPV6 = 0x0057
_PPP_MPLS = frozenset((0x0281, 0x0283))
_TUNNEL_PROTOS = frozenset((IPPROTO_UDP, IPPROTO_GRE, IPPROTO_IPIP, IPPROTO_IPV6))
_IPV6_EXT_LEN8 = frozenset((0, 43, 60))  # hop-by-hop, routing, destination options: (len+1)*8
_IPPROTO_FRAGMENT = 44
_IPPROTO_AH = 51
_IPPROTO_NONE = 59

# TCP flags (RFC 9293 §3.1), low byte of the offset/flags word.
TCP_FIN = 0x01
TCP_SYN = 0x02
TCP_RST = 0x04
TCP_PSH = 0x08
TCP_ACK = 0x10
TCP_URG = 0x20
#: ``flags`` of a UDP datagram's Segment: above any TCP flags byte (0..0xFF).
UDP = 0x100

# BSD loopback address families, in either byte order (AF_INET6 is 24, 28 or 30 on the BSDs, 10 on Linux).
_NULL_AF_INET = frozenset((2, 0x02000000))
_NULL_AF_INET6 = frozenset((10, 24, 28, 30, 0x0A000000, 0x18000000, 0x1C000000, 0x1E000000))

REASONS = (
    "truncated",          # shorter than its headers say (snaplen or a cut file)
    "not_ip",             # ARP, LLDP, ... anything that is neither IPv4 nor IPv6
    "not_tcp",            # neither TCP nor UDP: ICMP, SCTP, ESP, ...
    "ip_fragment",        # see module docstring
    "malformed",          # impossible header values
    "unsupported_linktype",
)

# (sport, dport, seq, ack, data offset<<4 | reserved, flags, window)
_TCP = struct.Struct("!HHIIBBH")
# (version<<4|ihl, tos, total length, id, flags|fragment offset, ttl, proto, checksum, src, dst)
_IP4 = struct.Struct("!BBHHHBB2x4s4s")
# (version|class|flow, payload length, next header, hop limit, src, dst)
_IP6 = struct.Struct("!IHBB16s16s")
# Ethernet type followed by an IPv4 header (the fast path of _ethernet)
_ETH_IP4 = struct.Struct("!12xHBBHHHBB2x4s4s")
_U16 = struct.Struct("!H")
_U32LE = struct.Struct("<I")
_U32BE = struct.Struct("!I")
_EXT = struct.Struct("!BB")
_FRAG6 = struct.Struct("!BxH")

Buf = memoryview | bytes | bytearray
Segment = tuple  # (src, dst, sport, dport, seq, ack, flags, payload_off, payload_end)
Result = Segment | str


def _tcp(buf: Buf, off: int, end: int, src: bytes, dst: bytes) -> Result:
    if end - off < 20:
        return "truncated"
    sport, dport, seq, ack, doff, flags, _win = _TCP.unpack_from(buf, off)
    hl = (doff >> 4) << 2
    if hl < 20:
        return "malformed"
    if off + hl > end:
        return "truncated"
    return (src, dst, sport, dport, seq, ack, flags, off + hl, end)


def _ip4(buf: Buf, off: int, end: int, depth: int = 0) -> Result:
    if end - off < 20:
        return "truncated"
    vhl, _tos, total, _id, frag, _ttl, proto, src, dst = _IP4.unpack_from(buf, off)
    hl = (vhl & 0x0F) << 2
    if total == 0:
        # Segmentation offload (TSO/BIG TCP) hands the tap packets over 64 KiB with a zero total
        # length; Wireshark reads those to the end of the frame, so do we.
        total = end - off
    if vhl >> 4 != 4 or hl < 20 or total < hl:
        return "malformed"
    if off + total > end:
        # The frame was cut by the snaplen: the TCP payload is incomplete. Dropping it leaves a
        # hole that reassembly reports as a GAP instead of handing on short, misaligned bytes.
        return "truncated"
    if frag & 0x3FFF:  # more-fragments flag or a non-zero offset
        return "ip_fragment"
    if proto != IPPROTO_TCP:
        if proto in _TUNNEL_PROTOS:
            return _tunnel(proto, buf, off + hl, off + total, depth, src, dst)
        return "not_tcp"
    # `total` also trims Ethernet padding off short frames. TCP is decoded inline (as in _tcp):
    # one call less on every IPv4 packet.
    t = off + hl
    end = off + total
    if end - t < 20:
        return "truncated"
    sport, dport, seq, ack, doff, flags, _win = _TCP.unpack_from(buf, t)
    thl = (doff >> 4) << 2
    if thl < 20:
        return "malformed"
    if t + thl > end:
        return "truncated"
    return (src, dst, sport, dport, seq, ack, flags, t + thl, end)


def _ip6(buf: Buf, off: int, end: int, depth: int = 0) -> Result:
    if end - off < 40:
        return "truncated"
    vtf, plen, nxt, _hlim, src, dst = _IP6.unpack_from(buf, off)
    if vtf >> 28 != 6:
        return "malformed"
    off += 40
    if plen:  # 0 means a jumbogram (RFC 2675): the frame length is all we have
        if off + plen > end:
            return "truncated"
        end = off + plen
    for _ in range(MAX_IPV6_EXT_HEADERS):
        if nxt == IPPROTO_TCP:
            return _tcp(buf, off, end, src, dst)
        if nxt in _TUNNEL_PROTOS:
            return _tunnel(nxt, buf, off, end, depth, src, dst)
        if end - off < 8:
            return "truncated" if nxt in _IPV6_EXT_LEN8 or nxt in (_IPPROTO_FRAGMENT, _IPPROTO_AH) else "not_tcp"
        if nxt in _IPV6_EXT_LEN8:
            n, ln = _EXT.unpack_from(buf, off)
            nxt = n
            off += (ln + 1) << 3
        elif nxt == _IPPROTO_FRAGMENT:
            n, fo = _FRAG6.unpack_from(buf, off)
            if fo & 0xFFF9:  # offset != 0 or M flag: a real fragment
                return "ip_fragment"
            nxt = n
            off += 8
        elif nxt == _IPPROTO_AH:
            n, ln = _EXT.unpack_from(buf, off)
            nxt = n
            off += (ln + 2) << 2
        else:
            return "not_tcp"
        if off > end:
            return "truncated"
    return "malformed"


def decode_l3(ethertype: int, buf: Buf, off: int, end: int, depth: int = 0) -> Result:
    """Decode from the network layer given an Ethernet type (IPv4, IPv6, MPLS)."""
    if ethertype == ETH_P_IP:
        return _ip4(buf, off, end, depth)
    if ethertype == ETH_P_IPV6:
        return _ip6(buf, off, end, depth)
    if ethertype == ETH_P_MPLS_UC or ethertype == ETH_P_MPLS_MC:
        return _mpls(buf, off, end, depth)
    if ethertype == ETH_P_PPPOE:
        return _pppoe_session(buf, off, end, depth)
    return "not_ip"


# -- tunnels ----------------------------------------------------------------------------
_UDP = struct.Struct("!HHHH")
_GRE = struct.Struct("!HH")


def _tunnel(proto: int, buf: Buf, off: int, end: int, depth: int, src: bytes = b"", dst: bytes = b"") -> Result:
    """The packet inside an IP payload of protocol ``proto`` (UDP tunnels, GRE, IP in IP),
    or a plain UDP datagram's Segment (``src``/``dst``: the IP header's addresses)."""
    if depth >= MAX_TUNNEL_DEPTH:
        return "malformed"
    depth += 1
    if proto == IPPROTO_IPIP:
        return _ip4(buf, off, end, depth)
    if proto == IPPROTO_IPV6:
        return _ip6(buf, off, end, depth)
    if proto == IPPROTO_GRE:
        return _gre(buf, off, end, depth)
    # UDP: only the tunnels' ports; anything else is plain UDP.
    if end - off < 8:
        return "truncated"
    sport, dport, ulen, _ck = _UDP.unpack_from(buf, off)
    if dport != VXLAN_PORT and dport != GENEVE_PORT:
        # Plain UDP. The UDP length is the datagram's (the IP length may include padding); a
        # length past the IP payload was cut by the snaplen, one under the header is corrupt.
        if ulen < 8:
            return "malformed"
        if off + ulen > end:
            return "truncated"
        return (src, dst, sport, dport, 0, 0, UDP, off + 8, off + ulen)
    if ulen >= 8 and off + ulen <= end:
        end = off + ulen
    off += 8
    if dport == VXLAN_PORT:
        # flags (I bit 0x08 set), 3 reserved, VNI (3), reserved: 8 bytes, then an Ethernet frame
        if end - off < 8:
            return "truncated"
        if not buf[off] & 0x08:
            return "malformed"
        return _ethernet_general(buf, off + 8, end, depth)
    if dport == GENEVE_PORT:
        # version (2 bits) | options length in 4-byte words (6), flags, protocol type, VNI, reserved
        if end - off < 8:
            return "truncated"
        vo = buf[off]
        if vo >> 6:
            return "malformed"  # only version 0 exists
        (ptype,) = _U16.unpack_from(buf, off + 2)
        off += 8 + ((vo & 0x3F) << 2)
        if off > end:
            return "truncated"
        if ptype == ETH_P_TEB:
            return _ethernet_general(buf, off, end, depth)
        return decode_l3(ptype, buf, off, end, depth)
    return "not_tcp"  # not reached: the two tunnel ports are handled above


def _gre(buf: Buf, off: int, end: int, depth: int) -> Result:
    if end - off < 4:
        return "truncated"
    flags, ptype = _GRE.unpack_from(buf, off)
    if flags & 0x0007:
        return "not_tcp"  # version 1 is PPTP's enhanced GRE (PPP inside): not decoded
    seq = flags & 0x1000
    off += 4 + (4 if flags & 0x8000 else 0) + (4 if flags & 0x2000 else 0) + (4 if seq else 0)
    if off > end:
        return "truncated"
    if ptype == ETH_P_TEB:
        return _ethernet_general(buf, off, end, depth)
    if ptype == ETH_P_ERSPAN2:
        # Type II has a sequence number and an 8-byte header; type I has neither.
        if seq:
            off += 8
        return _ethernet_general(buf, off, end, depth) if off <= end else "truncated"
    if ptype == ETH_P_ERSPAN3:
        # 12-byte header; its O bit (the last byte's low bit) adds an 8-byte platform subheader.
        if end - off < 12:
            return "truncated"
        off += 12 + (8 if buf[off + 11] & 0x01 else 0)
        return _ethernet_general(buf, off, end, depth) if off <= end else "truncated"
    return decode_l3(ptype, buf, off, end, depth)


def _mpls(buf: Buf, off: int, end: int, depth: int) -> Result:
    """An MPLS label stack (RFC 3032): 4-byte entries to the one with the bottom-of-stack
    bit, then IPv4/IPv6 by the first nibble, or a pseudowire's control word (nibble 0,
    RFC 4385) before an Ethernet frame."""
    if depth >= MAX_TUNNEL_DEPTH:
        return "malformed"
    for _ in range(MAX_MPLS_LABELS):
        if end - off < 4:
            return "truncated"
        bottom = buf[off + 2] & 0x01
        off += 4
        if bottom:
            break
    else:
        return "malformed"
    if end <= off:
        return "truncated"
    nib = buf[off] >> 4
    if nib == 4:
        return _ip4(buf, off, end, depth + 1)
    if nib == 6:
        return _ip6(buf, off, end, depth + 1)
    if nib == 0:
        return _ethernet_general(buf, off + 4, end, depth + 1)
    return "not_ip"


def _ethernet(buf: Buf, off: int, end: int) -> Result:
    # Fast path for the common frame (untagged Ethernet, IPv4 without options, unfragmented
    # TCP): two unpacks and no further calls. Anything else takes the general path below,
    # which also names the reason when a frame is refused.
    if end - off >= 54:
        et, vhl, _tos, total, _id, frag, _ttl, proto, src, dst = _ETH_IP4.unpack_from(buf, off)
        if et == ETH_P_IP and vhl == 0x45 and proto == IPPROTO_TCP and not frag & 0x3FFF and total >= 40:
            ip_end = off + 14 + total
            if ip_end <= end:
                t = off + 34
                sport, dport, seq, ack, doff, flags, _win = _TCP.unpack_from(buf, t)
                hl = (doff >> 4) << 2
                if hl >= 20 and t + hl <= ip_end:
                    return (src, dst, sport, dport, seq, ack, flags, t + hl, ip_end)
    return _ethernet_general(buf, off, end)


def _ethernet_general(buf: Buf, off: int, end: int, depth: int = 0) -> Result:
    if end - off < 14:
        return "truncated"
    (et,) = _U16.unpack_from(buf, off + 12)
    off += 14
    if et in _VLAN_TPIDS:
        for _ in range(MAX_VLAN_TAGS):
            if end - off < 4:
                return "truncated"
            (et,) = _U16.unpack_from(buf, off + 2)
            off += 4
            if et not in _VLAN_TPIDS:
                break
        else:
            return "malformed"
    if et == ETH_P_IP:
        return _ip4(buf, off, end, depth)
    if et == ETH_P_IPV6:
        return _ip6(buf, off, end, depth)
    if et == ETH_P_MPLS_UC or et == ETH_P_MPLS_MC:
        return _mpls(buf, off, end, depth)
    if et == ETH_P_PPPOE:
        return _pppoe_session(buf, off, end, depth)
    return "not_ip"


def _raw(buf: Buf, off: int, end: int) -> Result:
    if end <= off:
        return "truncated"
    v = buf[off] >> 4
    if v == 4:
        return _ip4(buf, off, end)
    if v == 6:
        return _ip6(buf, off, end)
    return "not_ip"


def _null(buf: Buf, off: int, end: int) -> Result:
    # The family is in the capturing host's byte order, which the file does not record.
    if end - off < 4:
        return "truncated"
    (af,) = _U32LE.unpack_from(buf, off)
    if af in _NULL_AF_INET:
        return _ip4(buf, off + 4, end)
    if af in _NULL_AF_INET6:
        return _ip6(buf, off + 4, end)
    return "not_ip"


def _loop(buf: Buf, off: int, end: int) -> Result:
    # OpenBSD loopback: like NULL but always network byte order.
    if end - off < 4:
        return "truncated"
    (af,) = _U32BE.unpack_from(buf, off)
    if af == 2:
        return _ip4(buf, off + 4, end)
    if af in (10, 24, 28, 30):
        return _ip6(buf, off + 4, end)
    return "not_ip"


def _sll(buf: Buf, off: int, end: int) -> Result:
    # Linux cooked v1: pkttype, arphrd, addr len, 8-byte addr, protocol (16 bytes).
    if end - off < 16:
        return "truncated"
    (et,) = _U16.unpack_from(buf, off + 14)
    return decode_l3(et, buf, off + 16, end)


def _sll2(buf: Buf, off: int, end: int) -> Result:
    # Linux cooked v2: protocol, reserved, ifindex, arphrd, pkttype, addr len, 8-byte addr (20 bytes).
    if end - off < 20:
        return "truncated"
    (et,) = _U16.unpack_from(buf, off)
    return decode_l3(et, buf, off + 20, end)


# TLV length and type are in the capturing host's byte order, which the file does not
# record: little-endian (x86, arm64) first, big-endian when that reading cannot be right.
_NFLOG_TLV_LE = struct.Struct("<HH")
_NFLOG_TLV_BE = struct.Struct(">HH")
_NFULA_PAYLOAD = 9


def _nflog(buf: Buf, off: int, end: int) -> Result:
    """LINKTYPE_NFLOG: family, version, resource id (4 bytes), then TLVs (length including
    its 4-byte header, padded to 4) until NFULA_PAYLOAD, the packet from its IP header."""
    if end - off < 4:
        return "truncated"
    family = buf[off]
    off += 4
    if end - off < 4:
        return "truncated"
    tlv = _NFLOG_TLV_LE
    tlen, ttype = tlv.unpack_from(buf, off)
    if tlen < 4 or off + tlen > end or ttype > 0xFF:
        tlv = _NFLOG_TLV_BE
    for _ in range(64):  # a handful of TLVs in practice (prefix, uid, timestamp, payload, ...)
        if end - off < 4:
            return "truncated"
        tlen, ttype = tlv.unpack_from(buf, off)
        if tlen < 4:
            return "malformed"
        if ttype & 0x7FFF == _NFULA_PAYLOAD:
            pend = min(off + tlen, end)
            if family == 2:
                return _ip4(buf, off + 4, pend)
            if family == 10:
                return _ip6(buf, off + 4, pend)
            return _raw(buf, off + 4, pend)
        off += (tlen + 3) & ~3
    return "malformed"


# -- PPP, PPPoE, Cisco HDLC ------------------------------------------------------------
def _ppp_payload(proto: int, buf: Buf, off: int, end: int, depth: int) -> Result:
    """What a PPP frame of protocol ``proto`` carries from ``off``: IP, IPv6 or MPLS; LCP,
    IPCP, CHAP and the rest of PPP's own negotiation carry no IP."""
    if proto == PPP_IP:
        return _ip4(buf, off, end, depth)
    if proto == PPP_IPV6:
        return _ip6(buf, off, end, depth)
    if proto in _PPP_MPLS:
        return _mpls(buf, off, end, depth)
    return "not_ip"


def _pppoe_session(buf: Buf, off: int, end: int, depth: int = 0) -> Result:
    """A PPPoE session packet (RFC 2516 §4): version/type 0x11, code 0, session id, the
    payload's length (which also trims Ethernet padding), then the PPP protocol field."""
    if depth >= MAX_TUNNEL_DEPTH:
        return "malformed"
    if end - off < 8:
        return "truncated"
    if buf[off] != 0x11 or buf[off + 1] != 0:
        return "malformed"
    (length,) = _U16.unpack_from(buf, off + 4)
    if length < 2:
        return "malformed"
    if off + 6 + length > end:
        return "truncated"
    (proto,) = _U16.unpack_from(buf, off + 6)
    return _ppp_payload(proto, buf, off + 8, off + 6 + length, depth + 1)


def _ppp(buf: Buf, off: int, end: int) -> Result:
    """LINKTYPE_PPP / PPP_HDLC: an optional 0xFF 0x03 address and control (RFC 1662), then
    the protocol, one byte when compressed (an odd first byte: RFC 1661 §6.5). PPP_HDLC
    files may also hold Cisco HDLC frames (address 0x0F or 0x8F)."""
    if end - off < 2:
        return "truncated"
    b0 = buf[off]
    if b0 == 0x0F or b0 == 0x8F:
        return _c_hdlc(buf, off, end)
    if b0 == 0xFF and buf[off + 1] == 0x03:
        off += 2
        if end - off < 1:
            return "truncated"
    if buf[off] & 1:
        return _ppp_payload(buf[off], buf, off + 1, end, 0)
    if end - off < 2:
        return "truncated"
    (proto,) = _U16.unpack_from(buf, off)
    return _ppp_payload(proto, buf, off + 2, end, 0)


def _ppp_ether(buf: Buf, off: int, end: int) -> Result:
    """LINKTYPE_PPP_ETHER: a PPPoE header without the Ethernet one."""
    return _pppoe_session(buf, off, end)


def _c_hdlc(buf: Buf, off: int, end: int) -> Result:
    """Cisco HDLC: address (0x0F unicast, 0x8F broadcast), control 0, an Ethernet type."""
    if end - off < 4:
        return "truncated"
    (et,) = _U16.unpack_from(buf, off + 2)
    return decode_l3(et, buf, off + 4, end)


# -- IEEE 802.11 --------------------------------------------------------------------------
#: The LLC/SNAP header before an Ethernet type (RFC 1042 and 802.1H bridge tunnel OUIs).
_SNAP = (b"\xaa\xaa\x03\x00\x00\x00", b"\xaa\xaa\x03\x00\x00\xf8")
_U16LE = struct.Struct("<H")
_RADIOTAP = struct.Struct("<BxHI")  # version, pad, header length, first present word
_PPI = struct.Struct("<BBHI")  # version, flags, header length, the inner link type
_RADIOTAP_BAD_FCS = 0x40


def _wlan(buf: Buf, off: int, end: int) -> Result:
    """An 802.11 frame (IEEE 802.11-2020 §9.2): data frames only, their header's length from
    the frame control (a fourth address when to-DS and from-DS, QoS control for QoS
    subtypes, HT control when a QoS frame has the order bit), then LLC/SNAP and an Ethernet
    type. An A-MSDU's first subframe is read (its own 14-byte header, then LLC/SNAP)."""
    if end - off < 24:
        return "truncated"
    fc, flags = buf[off], buf[off + 1]
    if (fc >> 2) & 3 != 2 or fc & 3:  # not a data frame (or a protocol version but 0)
        return "not_ip"
    subtype = fc >> 4
    if subtype & 0x4 or flags & 0x40:  # null data (no body), or protected: encrypted
        return "not_ip"
    hl = 24
    if flags & 3 == 3:
        hl += 6
    amsdu = False
    if subtype & 0x8:  # QoS data
        if end - off < hl + 2:
            return "truncated"
        amsdu = bool(buf[off + hl] & 0x80)
        hl += 2
        if flags & 0x80:
            hl += 4
    off += hl
    if amsdu:
        if end - off < 14:
            return "truncated"
        (sub,) = _U16.unpack_from(buf, off + 12)
        off += 14
        if off + sub > end:
            return "truncated"
        end = off + sub
    if end - off < 8:
        return "truncated"
    if bytes(buf[off:off + 6]) not in _SNAP:
        return "not_ip"
    (et,) = _U16.unpack_from(buf, off + 6)
    return decode_l3(et, buf, off + 8, end)


def _radiotap(buf: Buf, off: int, end: int) -> Result:
    """A radiotap header (radiotap.org), its length in it, before the 802.11 frame. Its
    Flags field (present bit 1) is read when there: a frame that failed its FCS is corrupt."""
    if end - off < 8:
        return "truncated"
    version, hlen, present = _RADIOTAP.unpack_from(buf, off)
    if version != 0 or hlen < 8:
        return "malformed"
    if off + hlen > end:
        return "truncated"
    if present & 0x2:
        p = 8
        word = present
        while word & 0x80000000:  # extended present bitmaps
            if p + 4 > hlen:
                return "malformed"
            (word,) = _U32LE.unpack_from(buf, off + p)
            p += 4
        if present & 0x1:  # TSFT: 8 bytes, aligned to 8
            p = ((p + 7) & ~7) + 8
        if p < hlen and buf[off + p] & _RADIOTAP_BAD_FCS:
            return "malformed"
    return _wlan(buf, off + hlen, end)


def _ppi(buf: Buf, off: int, end: int) -> Result:
    """A PPI header (Per-Packet Information): its length and the link type after it."""
    if end - off < 8:
        return "truncated"
    version, _flags, hlen, dlt = _PPI.unpack_from(buf, off)
    if version != 0 or hlen < 8:
        return "malformed"
    if off + hlen > end:
        return "truncated"
    if dlt == LINKTYPE_IEEE802_11:
        return _wlan(buf, off + hlen, end)
    if dlt == LINKTYPE_ETHERNET:
        return _ethernet_general(buf, off + hlen, end)
    return "unsupported_linktype"


def _prism(buf: Buf, off: int, end: int) -> Result:
    """LINKTYPE_IEEE802_11_PRISM: a Prism header (message code, length, little-endian), or
    an AVS header (magic 0x8021100x, length big-endian) which some drivers write under it."""
    if end - off < 8:
        return "truncated"
    (magic,) = _U32BE.unpack_from(buf, off)
    if magic & 0xFFFFFFF0 == 0x80211000:
        return _avs(buf, off, end)
    return _after_header(buf, off, end, _U32LE.unpack_from(buf, off + 4)[0])


def _avs(buf: Buf, off: int, end: int) -> Result:
    """LINKTYPE_IEEE802_11_AVS: version/magic then the header's length, big-endian."""
    if end - off < 8:
        return "truncated"
    return _after_header(buf, off, end, _U32BE.unpack_from(buf, off + 4)[0])


def _after_header(buf: Buf, off: int, end: int, hlen: int) -> Result:
    """The 802.11 frame after a capture header of ``hlen`` bytes (Prism, AVS)."""
    if hlen < 8:
        return "malformed"
    if off + hlen > end:
        return "truncated"
    return _wlan(buf, off + hlen, end)


LINK_DECODERS: dict[int, Callable[[Buf, int, int], Result]] = {
    LINKTYPE_NULL: _null,
    LINKTYPE_ETHERNET: _ethernet,
    LINKTYPE_RAW: _raw,
    12: _raw,  # DLT_RAW on some BSDs
    14: _raw,  # DLT_RAW on OpenBSD
    LINKTYPE_LOOP: _loop,
    LINKTYPE_LINUX_SLL: _sll,
    LINKTYPE_IPV4: _ip4,
    LINKTYPE_IPV6: _ip6,
    LINKTYPE_LINUX_SLL2: _sll2,
    LINKTYPE_NFLOG: _nflog,
    LINKTYPE_PPP: _ppp,
    LINKTYPE_PPP_HDLC: _ppp,
    LINKTYPE_PPP_ETHER: _ppp_ether,
    LINKTYPE_C_HDLC: _c_hdlc,
    LINKTYPE_IEEE802_11: _wlan,
    LINKTYPE_IEEE802_11_PRISM: _prism,
    LINKTYPE_IEEE802_11_RADIOTAP: _radiotap,
    LINKTYPE_IEEE802_11_AVS: _avs,
    LINKTYPE_PPI: _ppi,
}


def _unsupported(buf: Buf, off: int, end: int) -> Result:
    return "unsupported_linktype"


def supported_linktype(linktype: int) -> bool:
    return linktype in LINK_DECODERS


def link_decoder(linktype: int) -> Callable[[Buf, int, int], Result]:
    """The decoder for a link type; unknown ones get a decoder that always says why."""
    return LINK_DECODERS.get(linktype, _unsupported)


def decode(linktype: int, buf: Buf, off: int = 0, end: int | None = None) -> Result:
    """Decode one frame; see the module docstring for the result."""
    if end is None:
        end = len(buf)
    return LINK_DECODERS.get(linktype, _unsupported)(buf, off, end)
