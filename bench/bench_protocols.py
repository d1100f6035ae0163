"""Messages/s of the MQTT, FastCGI and memcached parsers on realistic traffic.

Run: ``python -m bench protocols`` (or ``python -m bench`` for every benchmark).
Each workload is a connection's worth of traffic, cut into 1400-byte TCP-sized
chunks and fed through the protocol's real ``Session`` (parse, pair, build
spans), median of several repeats. A message is one request/response exchange
(one span).
"""

from __future__ import annotations

import statistics
import struct
import time
from collections.abc import Callable

from bench.common import feed_session
from processors.protocols import fastcgi, memcached, mqtt
from tests.support.exchanges import mqtt_vbi

REPEATS = 7
CHUNK = 1400


def mqtt_workload(n: int) -> list[tuple[bytes, bytes]]:
    """QoS 1 publishes of ~200-byte JSON payloads, acknowledged in batches of 64."""
    out = []
    for b0 in range(0, n, 64):
        reqs, acks = [], []
        for i in range(b0, min(n, b0 + 64)):
            topic = f"sensors/building-{i % 7}/floor-{i % 3}/temp".encode()
            payload = b'{"t":%d,"v":21.5,"unit":"C","id":"' % i + b"x" * 150 + b'"}'
            body = struct.pack(">H", len(topic)) + topic + struct.pack(">H", i % 65535 + 1) + payload
            reqs.append(b"\x32" + mqtt_vbi(len(body)) + body)
            acks.append(b"\x40\x02" + struct.pack(">H", i % 65535 + 1))
        out.append((b"".join(reqs), b"".join(acks)))
    return out


def fastcgi_workload(n: int) -> list[tuple[bytes, bytes]]:
    """nginx-like requests (~25 params) and 2 KB PHP responses, one at a time."""
    def rec(t: int, rid: int, c: bytes = b"") -> bytes:
        return struct.pack(">BBHHBB", 1, t, rid, len(c), 0, 0) + c

    def nv(k: bytes, v: bytes) -> bytes:
        return bytes([len(k), len(v)]) + k + v

    params = {b"QUERY_STRING": b"id=42&sort=desc", b"REQUEST_METHOD": b"GET", b"CONTENT_TYPE": b"",
              b"CONTENT_LENGTH": b"", b"SCRIPT_NAME": b"/shop/item.php", b"REQUEST_URI": b"/shop/item.php?id=42",
              b"DOCUMENT_URI": b"/shop/item.php", b"DOCUMENT_ROOT": b"/var/www/html", b"SERVER_PROTOCOL": b"HTTP/1.1",
              b"REQUEST_SCHEME": b"http", b"GATEWAY_INTERFACE": b"CGI/1.1", b"SERVER_SOFTWARE": b"nginx/1.22.1",
              b"REMOTE_ADDR": b"10.0.0.7", b"REMOTE_PORT": b"51234", b"SERVER_ADDR": b"10.0.0.1",
              b"SERVER_PORT": b"80", b"SERVER_NAME": b"shop.example", b"REDIRECT_STATUS": b"200",
              b"SCRIPT_FILENAME": b"/var/www/html/shop/item.php", b"HTTP_HOST": b"shop.example",
              b"HTTP_USER_AGENT": b"Mozilla/5.0 (X11; Linux x86_64) Firefox/120.0", b"HTTP_ACCEPT": b"*/*",
              b"HTTP_ACCEPT_ENCODING": b"gzip, deflate", b"HTTP_CONNECTION": b"keep-alive"}
    pstream = b"".join(nv(k, v) for k, v in params.items())
    req = (rec(1, 1, struct.pack(">HB5x", 1, 1)) + rec(4, 1, pstream) + rec(4, 1) + rec(5, 1))
    rep = rec(6, 1, b"Content-type: text/html; charset=UTF-8\r\n\r\n" + b"<p>item</p>" * 180) + rec(6, 1) \
        + rec(3, 1, struct.pack(">IB3x", 0, 0))
    return [(req, rep)] * n


def memcached_binary_workload(n: int) -> list[tuple[bytes, bytes]]:
    hdr = struct.Struct(">BBHBBHIIQ")
    out = []
    for b0 in range(0, n, 32):
        reqs, reps = [], []
        for i in range(b0, min(n, b0 + 32)):
            key = b"session:%08d" % i
            if i % 3:
                reqs.append(hdr.pack(0x80, 0, len(key), 0, 0, 0, len(key), i, 0) + key)
                val = b"v" * 120
                reps.append(hdr.pack(0x81, 0, 0, 4, 0, 0, 4 + len(val), i, 1) + b"\0\0\0\0" + val)
            else:
                val = b"d" * 120
                reqs.append(hdr.pack(0x80, 1, len(key), 8, 0, 0, 8 + len(key) + len(val), i, 0) + b"\0" * 8
                            + key + val)
                reps.append(hdr.pack(0x81, 1, 0, 0, 0, 0, 0, i, 1))
        out.append((b"".join(reqs), b"".join(reps)))
    return out


def memcached_text_workload(n: int) -> list[tuple[bytes, bytes]]:
    out = []
    for b0 in range(0, n, 32):
        reqs, reps = [], []
        for i in range(b0, min(n, b0 + 32)):
            key = b"session:%08d" % i
            if i % 3:
                reqs.append(b"get " + key + b"\r\n")
                reps.append(b"VALUE " + key + b" 0 120\r\n" + b"v" * 120 + b"\r\nEND\r\n")
            else:
                reqs.append(b"set " + key + b" 0 300 120\r\n" + b"d" * 120 + b"\r\n")
                reps.append(b"STORED\r\n")
        out.append((b"".join(reqs), b"".join(reps)))
    return out


def _median_rate(fn: Callable[[], int], n: int) -> float:
    times = []
    for _ in range(REPEATS):
        t0 = time.perf_counter()
        got = fn()
        times.append(time.perf_counter() - t0)
        assert got == n, (got, n)
    return n / statistics.median(times)


def main() -> None:
    cases = [
        ("MQTT 3.1.1 QoS 1 publish + PUBACK", mqtt, mqtt_workload, 20_000),
        ("FastCGI request (25 params) + 2 KB response", fastcgi, fastcgi_workload, 5_000),
        ("memcached binary GET/SET", memcached, memcached_binary_workload, 20_000),
        ("memcached text get/set", memcached, memcached_text_workload, 20_000),
    ]
    print(f"Protocol parsers, messages (exchanges -> spans) per second, median of {REPEATS}, {CHUNK}-byte chunks")
    for title, mod, gen, n in cases:
        batches = gen(n)
        nbytes = sum(len(a) + len(b) for a, b in batches)
        rate = _median_rate(lambda mod=mod, batches=batches: feed_session(mod, batches, CHUNK), n)
        print(f"  {title:<46} {rate:>10,.0f} msg/s  {rate * nbytes / n / 1e6:8.1f} MB/s")


if __name__ == "__main__":
    main()
