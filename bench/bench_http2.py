"""HTTP/2 request decoding: wirespan's session vs h2's connection state machine, same frames.

Run: ``python -m bench.bench_http2`` (or ``python -m bench http2``). The bytes are
a real conversation made by ``h2``'s client (gRPC-style requests: 9 header fields,
a varying traceparent and grpc-timeout, one small DATA frame each), cut into
1400-byte TCP-like segments. Each peer gets the client's bytes:

- wirespan: ``H2Session.feed`` (frames, HPACK, stream state, gRPC message counting);
- h2: ``H2Connection(server side).receive_data`` (frames, HPACK, stream state, events);
- HPACK alone on the same header blocks: wirespan's ``_Hpack`` vs ``hpack.Decoder``
  (the measurement behind decoding HPACK ourselves, besides mid-stream pickup).

Prints the median µs per stream over several repeats and the ratio to h2.
"""

from __future__ import annotations

import statistics
import time

import h2.config
import h2.connection
import h2.settings
import hpack

from processors.protocols.base import Conn
from processors.protocols.http2 import H2Session, Settings, _Hpack
from tests.support.h2drive import H2Pair, grpc_msg

STREAMS = 500
SEGMENT = 1400
REPEATS = 7


def _server() -> h2.connection.H2Connection:
    """An h2 server that allows all the streams at once (the bench never answers them)."""
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
    conn.local_settings = h2.settings.Settings(client=False, initial_values={
        h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: 2 * STREAMS})
    conn.initiate_connection()
    return conn


def _conversation() -> tuple[list[bytes], list[bytes]]:
    p = H2Pair.__new__(H2Pair)
    p.client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    p.server = _server()
    p.log = []
    p.client.initiate_connection()
    p.pump()
    for i in range(STREAMS):
        sid = p.client.get_next_available_stream_id()
        p.client.send_headers(sid, [
            (":method", "POST"), (":scheme", "http"), (":path", f"/shop.Cart/Add{i % 7}"),
            (":authority", "cart.svc:50051"), ("content-type", "application/grpc"), ("te", "trailers"),
            ("user-agent", "grpc-python/1.85 grpc-c/58.0.0 (linux; chttp2)"), ("grpc-timeout", f"{100 + i}m"),
            ("traceparent", f"00-{i:032x}-{i + 1:016x}-01"),
        ])
        p.client.send_data(sid, grpc_msg(b"m" * 40), end_stream=True)
        if i % 50 == 49:
            p.pump()
    p.pump()
    client = b"".join(d for fc, d in p.log if fc)
    segs = [client[i:i + SEGMENT] for i in range(0, len(client), SEGMENT)]
    # header blocks as sent (for the HPACK-only comparison): re-encode the same fields
    enc = hpack.Encoder()
    blocks = []
    for i in range(STREAMS):
        blocks.append(enc.encode([
            (":method", "POST"), (":scheme", "http"), (":path", f"/shop.Cart/Add{i % 7}"),
            (":authority", "cart.svc:50051"), ("content-type", "application/grpc"), ("te", "trailers"),
            ("user-agent", "grpc-python/1.85 grpc-c/58.0.0 (linux; chttp2)"), ("grpc-timeout", f"{100 + i}m"),
            ("traceparent", f"00-{i:032x}-{i + 1:016x}-01"),
        ]))
    return segs, blocks


def _wirespan(segs: list[bytes]) -> float:
    conn = Conn("b", "10.0.0.1", 1, "10.0.0.2", 2, lambda s: None, settings=Settings(), protocol="http2")
    sess = H2Session(conn)
    buf = conn.client_buf
    t = time.perf_counter()
    for s in segs:
        buf.append(s, 0)
        sess.feed(True, buf, 0)
    dt = time.perf_counter() - t
    assert len(sess.streams) == STREAMS and not len(buf)
    return dt


def _h2(segs: list[bytes]) -> float:
    conn = _server()
    n = 0
    t = time.perf_counter()
    for s in segs:
        n += sum(1 for e in conn.receive_data(s) if e.__class__.__name__ == "RequestReceived")
    dt = time.perf_counter() - t
    assert n == STREAMS
    return dt


def _our_hpack(blocks: list[bytes]) -> float:
    hp = _Hpack(True)
    t = time.perf_counter()
    for b in blocks:
        hp.decode(memoryview(b), {})
    return time.perf_counter() - t


def _hpack_decoder(blocks: list[bytes]) -> float:
    d = hpack.Decoder()
    t = time.perf_counter()
    for b in blocks:
        d.decode(b)
    return time.perf_counter() - t


def _median_us(fn, arg) -> float:  # type: ignore[no-untyped-def]
    return statistics.median(fn(arg) for _ in range(REPEATS)) / STREAMS * 1e6


def main() -> None:
    segs, blocks = _conversation()
    print(f"{STREAMS} gRPC-style request streams, {sum(map(len, segs))} client bytes in {len(segs)} segments")
    ws = _median_us(_wirespan, segs)
    h2t = _median_us(_h2, segs)
    print(f"  {'h2 H2Connection.receive_data (server side)':<52} {h2t:8.2f} µs/stream  1.00x")
    print(f"  {'wirespan H2Session.feed':<52} {ws:8.2f} µs/stream  {h2t / ws:.2f}x faster")
    hd = _median_us(_hpack_decoder, blocks)
    ours = _median_us(_our_hpack, blocks)
    print(f"  {'hpack.Decoder.decode (header block only)':<52} {hd:8.2f} µs/block   1.00x")
    print(f"  {'wirespan _Hpack.decode (header block only)':<52} {ours:8.2f} µs/block   {hd / ours:.2f}x faster")


if __name__ == "__main__":
    main()
