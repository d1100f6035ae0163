"""Generate the replay benchmark capture: keep-alive HTTP/1.1 connections, small GETs.

Usage: python bench/gen_http_capture.py OUT.pcap [--connections 100] [--requests 500] [--pcapng]

Each connection: SYN, SYN-ACK, ACK, then ``requests`` exchanges (one request segment,
one response segment whose ACK is piggybacked by the next request), then FIN/ACK both
ways. Connections are interleaved round-robin as a busy server would see them, with
realistic request/response bytes (Host, User-Agent, Accept, Date, Content-Type,
Content-Length, JSON bodies). Default: 100 x 500 -> ~100.6k packets, Ethernet, µs pcap.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from tests.support.pcapgen import ACK, FIN, PSH, PcapngWriter, PcapWriter, TcpFlow, ether

PATHS = ["/api/v1/users/{i}", "/api/v1/orders?page={i}&size=20", "/health", "/static/app.js?v={i}",
         "/api/v1/items/{i}/reviews"]
STATUSES = [(200, "OK"), (200, "OK"), (200, "OK"), (404, "Not Found"), (500, "Internal Server Error")]


def request(c: int, i: int) -> bytes:
    path = PATHS[(c + i) % len(PATHS)].format(i=i)
    return (f"GET {path} HTTP/1.1\r\nHost: shop.internal:8080\r\nUser-Agent: curl/8.5.0\r\n"
            f"Accept: application/json\r\ntraceparent: 00-{c:016x}{i:016x}-{i + 1:016x}-01\r\n\r\n").encode()


def response(c: int, i: int) -> bytes:
    code, reason = STATUSES[(c * 7 + i) % len(STATUSES)]
    body = f'{{"id": {i}, "conn": {c}, "ok": {"true" if code == 200 else "false"}}}'.encode()
    return (f"HTTP/1.1 {code} {reason}\r\nServer: nginx/1.24.0\r\nDate: Tue, 24 Nov 2026 20:00:00 GMT\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\nConnection: keep-alive\r\n\r\n"
            ).encode() + body


def generate(path: str, connections: int = 100, requests: int = 500, t0_ns: int = 1_764_000_000_000_000_000,
             pcapng: bool = False) -> int:
    flows = [TcpFlow(client=(f"10.1.{c // 250}.{c % 250 + 1}", 40000 + c), server=("10.2.0.1", 8080),
                     isn_client=(c * 2654435761) & 0xFFFFFFFF, isn_server=(c * 40503 + 17) & 0xFFFFFFFF)
             for c in range(connections)]
    t = t0_ns
    n = 0
    w: PcapWriter | PcapngWriter
    if pcapng:
        w = PcapngWriter(path)
        ifid = w.interface(1, name="eth0")
    else:
        w = PcapWriter(path)
    with w:
        def put(pkt: bytes) -> None:
            nonlocal t, n
            if pcapng:
                w.packet(ifid, ether(pkt), t)  # type: ignore[call-arg]
            else:
                w.packet(ether(pkt), t)  # type: ignore[call-arg]
            t += 10_000  # 10 µs apart
            n += 1
        for f in flows:
            for p in f.handshake():
                put(p)
        for i in range(requests):
            for c, f in enumerate(flows):
                put(f.send(True, request(c, i), PSH | ACK))
                put(f.send(False, response(c, i), PSH | ACK))
        for f in flows:
            put(f.send(True, b"", FIN | ACK))
            put(f.send(False, b"", FIN | ACK))
            put(f.ack(True))
    return n


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--connections", type=int, default=100)
    ap.add_argument("--requests", type=int, default=500)
    ap.add_argument("--pcapng", action="store_true", help="write pcapng (one Ethernet interface, µs) instead of pcap")
    a = ap.parse_args(argv)
    n = generate(a.out, a.connections, a.requests, pcapng=a.pcapng)
    print(f"{a.out}: {n} packets, {a.connections} connections x {a.requests} exchanges")


if __name__ == "__main__":
    main()
