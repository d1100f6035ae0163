"""Record config/samples/http-sample.pcap: the capture the default pipeline replays.

A real HTTP/1.1 server (Python's http.server, a small shop API) and real
clients (httpx over keep-alive connections, urllib for HTTP/1.0-style
one-shot requests) talk over loopback while tcpdump records. The result is a
few dozen exchanges: GET/POST/PUT/DELETE/HEAD, query strings, a 404, a 500, a
chunked response, a traceparent header joining a caller's trace.

Run as root (tcpdump on lo): ``python config/samples/make_http_sample.py``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx

OUT = Path(__file__).with_name("http-sample.pcap")
PORT = 8080  # the default port the HTTP detector hints; any port works
TRACEPARENT = "00-7d3c2b1a0f9e8d7c6b5a493827160514-a1b2c3d4e5f60718-01"

PRODUCTS = {str(i): {"id": i, "name": f"product {i}", "price": 10 * i} for i in range(1, 13)}


class Shop(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "sample-shop/1.0"

    def _send(self, status: int, body: bytes, ctype: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _body(self) -> bytes:
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def do_GET(self) -> None:
        path, _, _query = self.path.partition("?")
        if path == "/":
            self._send(200, b"<html><body>sample shop</body></html>\n", "text/html")
        elif path == "/products":
            self._send(200, json.dumps(list(PRODUCTS.values())[:5]).encode())
        elif path.startswith("/products/") and path[10:] in PRODUCTS:
            self._send(200, json.dumps(PRODUCTS[path[10:]]).encode())
        elif path == "/report":
            self.send_response(200)  # a chunked response
            self.send_header("Content-Type", "text/csv")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for i in range(3):
                part = b"row,%d\n" % i
                self.wfile.write(b"%x\r\n%s\r\n" % (len(part), part))
            self.wfile.write(b"0\r\n\r\n")
        elif path == "/error":
            self._send(500, b'{"error":"database unavailable"}')
        else:
            self._send(404, b'{"error":"not found"}')

    do_HEAD = do_GET

    def do_POST(self) -> None:
        body = self._body()
        self._send(201, b'{"created":true,"bytes":%d}' % len(body))

    def do_PUT(self) -> None:
        self._body()
        self._send(200, b'{"updated":true}')

    def do_DELETE(self) -> None:
        self._send(204, b"")

    def log_message(self, *args: object) -> None:
        pass


def _port() -> int:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", PORT))
            return PORT
        except OSError:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]


def _traffic(base: str) -> None:
    with httpx.Client(base_url=base, headers={"User-Agent": "sample-shop-client/1.0"}) as c:
        c.get("/")
        c.get("/products", params={"page": "2", "sort": "price"})
        for i in (1, 2, 3, 42):
            c.get(f"/products/{i}")
        c.post("/cart", json={"product": 3, "qty": 2})
        c.post("/checkout", json={"cart": 1}, headers={"traceparent": TRACEPARENT})
        c.get("/error")
        c.get("/report")
    with httpx.Client(base_url=base) as c:
        c.put("/cart/1", json={"qty": 5})
        c.delete("/cart/1")
        c.head("/")
        c.get("/search", params={"q": "lamp"})
        for i in range(4, 10):
            c.get(f"/products/{i}")
        c.get("/error")
    for path in ("/products/11", "/nope", "/products?page=1"):  # one connection each
        _urlopen(base + path)


def _urlopen(url: str) -> None:
    try:
        with urllib.request.urlopen(url) as r:
            r.read()
    except urllib.error.HTTPError as e:  # 4xx/5xx are part of the sample
        e.read()


def main() -> int:
    tcpdump = shutil.which("tcpdump")
    if tcpdump is None:
        print("tcpdump is needed", file=sys.stderr)
        return 1
    port = _port()
    srv = ThreadingHTTPServer(("127.0.0.1", port), Shop)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    tmp = OUT.with_suffix(".tmp")
    cmd = [tcpdump, "-i", "lo", "--immediate-mode", "-U", "-s", "262144", "-w", str(tmp),
           "--time-stamp-precision=nano", f"tcp port {port}"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        assert proc.stderr is not None
        line = proc.stderr.readline().decode()
        if "listening" not in line:
            print(f"tcpdump did not start: {line}", file=sys.stderr)
            return 1
        _traffic(f"http://127.0.0.1:{port}")
        time.sleep(0.3)
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=10)
        srv.shutdown()
    os.replace(tmp, OUT)
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
