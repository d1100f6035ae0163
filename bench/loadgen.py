"""Loopback HTTP load for the live-capture benchmarks (bench_ebpf, bench_live).

Run as a script in its own process, so the traffic's CPU is not the benchmark's:

- ``server PORT [CERT KEY]``: a keep-alive server answering every request head with a fixed
  2-byte response (one ``sendall`` per ``recv``, so a syscall moves whole messages); over
  TLS (Python's ssl, OpenSSL) with a certificate and key.
- ``client --port P [--duration S] [--rate R] [--count N] [--resp-len B] [--path /x]
  [--header "Name: value" ...] [--cafile CA]``: one connection of request/response ping-pong
  (over TLS with ``--cafile``), paced
  to R exchanges/s when R > 0, until S seconds or N exchanges; reconnects when the
  server ends keep-alive (nginx's keepalive_requests). Prints exchanges per second.
- ``bulk PORT SIZE``: one POST of SIZE zero bytes (no CRLFCRLF inside), one response.

Small fixed messages: the generator, not parsing, bounds the rate.
"""

from __future__ import annotations

import argparse
import socket
import sys
import threading
import time

RESP = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Type: text/plain\r\n\r\nok"


_TLS: dict = {}


def _conn(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    ctx = _TLS.get("client")
    return ctx.wrap_socket(s, server_hostname="localhost") if ctx is not None else s


def server(port: int, cert: str | None = None, key: str | None = None) -> None:
    ls = socket.socket()
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind(("127.0.0.1", port))
    ls.listen(64)
    ctx = None
    if cert:
        import ssl

        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(cert, key)

    def serve(c: socket.socket) -> None:
        c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if ctx is not None:
            try:
                c = ctx.wrap_socket(c, server_side=True)
            except OSError:
                c.close()
                return
        while True:
            d = c.recv(1 << 20)
            if not d:
                c.close()
                return
            k = d.count(b"\r\n\r\n")
            if k:
                c.sendall(RESP * k)

    while True:
        c, _ = ls.accept()
        threading.Thread(target=serve, args=(c,), daemon=True).start()


def client(port: int, duration: float, rate: float, count: int, resp_len: int, req: bytes) -> float:
    s = _conn(port)
    n = 0
    t0 = time.monotonic()
    end = t0 + duration if duration else float("inf")
    while n < count:
        now = time.monotonic()
        if now >= end:
            break
        if rate and n > (now - t0) * rate:
            time.sleep(min(0.001, (n / rate) - (now - t0)))
            continue
        s.sendall(req)
        got = 0
        while got < resp_len:
            d = s.recv(65536)
            if not d:  # keep-alive ended by the server: reconnect and ask again
                s.close()
                s = _conn(port)
                s.sendall(req)
                got = 0
                continue
            got += len(d)
        n += 1
    s.close()
    return n / (time.monotonic() - t0)


def bulk(port: int, size: int) -> None:
    s = _conn(port)
    s.sendall(b"POST /bulk HTTP/1.1\r\nHost: bench\r\nContent-Length: %d\r\n\r\n" % size)
    chunk = bytes(1 << 16)
    for _ in range(size >> 16):
        s.sendall(chunk)
    got = 0
    while got < len(RESP):
        got += len(s.recv(65536))
    s.close()


def main(argv: list[str]) -> None:
    mode = argv[0]
    if mode == "server":
        server(int(argv[1]), *argv[2:4])
    elif mode == "bulk":
        bulk(int(argv[1]), int(argv[2]))
        print(1)
    else:
        ap = argparse.ArgumentParser(prog="loadgen client")
        ap.add_argument("--port", type=int, required=True)
        ap.add_argument("--duration", type=float, default=0.0)
        ap.add_argument("--rate", type=float, default=0.0)
        ap.add_argument("--count", type=int, default=10**12)
        ap.add_argument("--resp-len", type=int, default=len(RESP))
        ap.add_argument("--path", default="/bench")
        ap.add_argument("--header", action="append", default=[])
        ap.add_argument("--cafile")
        a = ap.parse_args(argv[1:])
        if a.cafile:
            import ssl

            _TLS["client"] = ssl.create_default_context(cafile=a.cafile)
        head = "".join(f"{h}\r\n" for h in ["Host: bench", *a.header])
        req = f"GET {a.path} HTTP/1.1\r\n{head}\r\n".encode()
        print(client(a.port, a.duration, a.rate, a.count, a.resp_len, req))


if __name__ == "__main__":
    main(sys.argv[1:])
