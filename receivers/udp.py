"""UDP datagrams as ``DATAGRAM`` events: what the ``pcap`` and ``live`` receivers share.

Contract: ``UdpDatagrams(ports)``; ``datagram(src, sport, dst, dport, payload, ts_ns)``
(packed 4/16-byte addresses as the packet decoder gives them, ``payload`` a memoryview
handed on by reference) returns a ``TcpEvent`` of kind ``DATAGRAM`` or a drop reason:

- ``udp_port``: neither port is in ``ports`` (every UDP datagram when ``ports`` is empty).
  UDP is selected by port, not by content, because a capture's UDP is mostly not what a
  parser here reads (QUIC, syslog, NTP, VXLAN's own traffic); only DNS consumes UDP today.
- ``udp_empty``: a zero-length datagram (no protocol here has an empty message).

No state per flow: ``conn_id`` is the flow's 5-tuple in a canonical order,
``("udp", low address, its port, high address, its port)``, the same for both directions
and never equal to a TCP connection's id (the reassembler's are integers). The protocols
stage keeps the per-flow state and ends a flow when it is idle (processor.py).
"""

from __future__ import annotations

import socket
from typing import Any

from service.model import EventKind, TcpEvent

__all__ = ["UdpDatagrams", "DEFAULT_UDP_PORTS", "flow_id"]

#: UDP ports passed by default: DNS (RFC 1035 §4.2.1), the only UDP protocol parsed so far.
DEFAULT_UDP_PORTS = (53,)
_DATAGRAM = EventKind.DATAGRAM


def flow_id(src: Any, sport: int, dst: Any, dport: int) -> tuple:
    """The flow id of a datagram: the same for its reply (ends ordered by address, port)."""
    if (src, sport) <= (dst, dport):
        return ("udp", src, sport, dst, dport)
    return ("udp", dst, dport, src, sport)


class UdpDatagrams:
    """Turns decoded UDP datagrams into events, counting the ones not passed by reason."""

    __slots__ = ("_addr", "datagrams", "drops", "ports")

    def __init__(self, ports: Any = DEFAULT_UDP_PORTS) -> None:
        self.ports = frozenset(ports)
        #: Datagrams not passed, by reason (the receiver merges them into its drops).
        self.drops: dict[str, int] = {}
        #: Datagrams passed on.
        self.datagrams = 0
        self._addr: dict[bytes, str] = {}

    def _str(self, a: Any) -> str:
        s = self._addr.get(a)
        if s is None:
            if len(self._addr) > 65536:  # bounded: a scan must not grow it forever
                self._addr.clear()
            s = self._addr[a] = a if isinstance(a, str) else socket.inet_ntop(
                socket.AF_INET if len(a) == 4 else socket.AF_INET6, bytes(a))
        return s

    def datagram(self, src: Any, sport: int, dst: Any, dport: int, payload: memoryview,
                 ts_ns: int) -> TcpEvent | None:
        """The event for one datagram, or None when it is not passed (counted in ``drops``)."""
        ports = self.ports
        if sport not in ports and dport not in ports:
            self.drops["udp_port"] = self.drops.get("udp_port", 0) + 1
            return None
        if not len(payload):
            self.drops["udp_empty"] = self.drops.get("udp_empty", 0) + 1
            return None
        self.datagrams += 1
        s, d = self._str(src), self._str(dst)
        return TcpEvent(_DATAGRAM, flow_id(s, sport, d, dport), s, sport, d, dport, ts_ns, payload)
