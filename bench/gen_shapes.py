"""Captures of one traffic in several shapes, for ``bench scale`` (issue 21).

- ``shape(path, mode, exchanges)``: the same small HTTP/1 exchanges (bench/gen_http_capture.py's
  requests and responses) carried three ways: ``few`` (10 keep-alive connections, round-robin),
  ``sequential`` (connections of ``per_conn`` exchanges one after another: handshake, exchanges,
  FINs) and ``interleaved`` (the same connections all open at once, their packets round-robin,
  as a busy server sees them). Many-connection shapes carry 6 more packets a connection
  (handshake and close), which is part of what they cost.
- ``big_messages(path, size, count)``: ``count`` POSTs of a ``size``-byte body in 1448-byte
  segments, each answered by a small 201: memory must not grow with ``size``.

Usage: python -m bench.gen_shapes OUT.pcap few|sequential|interleaved [--exchanges N]
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from bench.gen_http_capture import request, response
from tests.support.pcapgen import ACK, FIN, PSH, PcapWriter, TcpFlow, ether

__all__ = ["SHAPES", "big_messages", "shape"]

SHAPES = ("few", "sequential", "interleaved")
#: Connections of the ``few`` shape.
FEW_CONNECTIONS = 10
#: Segment payload of big bodies (a 1500-byte MTU less IPv4, TCP and timestamp options).
MSS = 1448
_T0 = 1_764_000_000_000_000_000


def _flow(c: int) -> TcpFlow:
    # Client ports spread over the whole unprivileged range, addresses over a /16.
    return TcpFlow(client=(f"10.1.{(c // 250) % 250}.{c % 250 + 1}", 1024 + (c * 7) % 64000),
                   server=("10.2.0.1", 8080), isn_client=(c * 2654435761) & 0xFFFFFFFF,
                   isn_server=(c * 40503 + 17) & 0xFFFFFFFF)


class _Out:
    """A pcap writer with a packet clock (10 µs a packet)."""

    def __init__(self, path: str) -> None:
        self.w = PcapWriter(path)
        self.t = _T0
        self.n = 0

    def put(self, pkt: bytes) -> None:
        self.w.packet(ether(pkt), self.t)
        self.t += 10_000
        self.n += 1

    def close(self) -> int:
        self.w.close()
        return self.n


def _open(out: _Out, flows: list[TcpFlow]) -> None:
    for f in flows:
        for p in f.handshake():
            out.put(p)


def _close(out: _Out, flows: list[TcpFlow]) -> None:
    for f in flows:
        out.put(f.send(True, b"", FIN | ACK))
        out.put(f.send(False, b"", FIN | ACK))
        out.put(f.ack(True))


def _round_robin(out: _Out, flows: list[TcpFlow], first: int, requests: int) -> None:
    for i in range(requests):
        for k, f in enumerate(flows):
            out.put(f.send(True, request(first + k, i), PSH | ACK))
            out.put(f.send(False, response(first + k, i), PSH | ACK))


def shape(path: str, mode: str, exchanges: int = 50_000, per_conn: int = 10) -> int:
    """Write ``exchanges`` exchanges in the shape ``mode``; returns the packet count."""
    out = _Out(path)
    if mode == "few":
        flows = [_flow(c) for c in range(FEW_CONNECTIONS)]
        _open(out, flows)
        _round_robin(out, flows, 0, exchanges // FEW_CONNECTIONS)
        _close(out, flows)
    elif mode == "sequential":
        for c in range(exchanges // per_conn):
            f = _flow(c)
            _open(out, [f])
            _round_robin(out, [f], c, per_conn)
            _close(out, [f])
    elif mode == "interleaved":
        flows = [_flow(c) for c in range(exchanges // per_conn)]
        _open(out, flows)
        _round_robin(out, flows, 0, per_conn)
        _close(out, flows)
    else:
        raise ValueError(f"unknown shape {mode!r}: {', '.join(SHAPES)}")
    return out.close()


def big_messages(path: str, size: int, count: int = 1) -> int:
    """``count`` POSTs of a ``size``-byte JSON-ish body each, on one connection; packets written."""
    out = _Out(path)
    f = _flow(0)
    _open(out, [f])
    seg = (b'{"k":"' + b"x" * (MSS - 8) + b'"}')[:MSS]
    for i in range(count):
        head = (f"POST /upload/{i} HTTP/1.1\r\nHost: files.internal:8080\r\nContent-Type: application/json\r\n"
                f"Content-Length: {size}\r\n\r\n").encode()
        out.put(f.send(True, head, PSH | ACK))
        left = size
        while left > 0:
            n = min(MSS, left)
            out.put(f.send(True, seg if n == MSS else seg[:n], ACK))
            left -= n
            if left // MSS % 2 == 0:
                out.put(f.ack(False))  # the server acknowledges every other segment
        out.put(f.send(False, b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\nServer: nginx/1.24.0\r\n\r\n",
                       PSH | ACK))
    _close(out, [f])
    return out.close()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("mode", choices=SHAPES)
    ap.add_argument("--exchanges", type=int, default=50_000)
    a = ap.parse_args(argv)
    print(f"{a.out}: {shape(a.out, a.mode, a.exchanges)} packets")


if __name__ == "__main__":
    main()
