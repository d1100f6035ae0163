"""Capture reading speed: our mmap+struct reader vs dpkt and tshark on the same file.

Run: ``python -m bench.bench_pcap [CAPTURE]`` (or ``python bench/bench_pcap.py``). Without
CAPTURE it generates bench/gen_http_capture.py's default file (100 keep-alive connections
x 500 GETs, ~100k packets) in a temp dir. Prints median packets/s over several runs for:

- ``wirespan read+decode``: records + Ethernet/IP/TCP decode to the payload offsets;
- ``wirespan receiver``: the same plus TCP reassembly into ``TcpEvent``s (what the
  ``pcap`` receiver does, downstream a no-op);
- ``wirespan read+decode (pcapng)``: the same packets written as pcapng (EPBs);
- ``dpkt``: ``dpkt.pcap.Reader`` + ``dpkt.ethernet.Ethernet`` down to ``tcp.data``;
- ``tshark -T fields -e tcp.len`` (whole process, one field: its cheapest useful run);

and the ratios to ours.
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from receivers.packet import link_decoder
from receivers.pcap import PcapReceiver, open_capture

REPEATS = 7
PEER_REPEATS = 3


def ours_decode(path: str) -> int:
    r = open_capture(path)
    view = r.view
    n = 0
    dec = None
    last_lt = -1
    for lt, _ts, off, end in r:
        if lt != last_lt:
            dec, last_lt = link_decoder(lt), lt
        res = dec(view, off, end)
        if res.__class__ is not str:
            _p = view[res[7]:res[8]]
        n += 1
    return n


class _Sink:
    def __init__(self) -> None:
        self.events = 0

    def consume_events(self, events: list) -> None:
        self.events += len(events)


def ours_receiver(path: str) -> int:
    sink = _Sink()
    rc = PcapReceiver("pcap/bench", {"path": path, "progress": False}, sink)
    rc.start()
    rc.done.wait()
    rc.shutdown()
    return rc.stats["packets"]


def dpkt_decode(path: str) -> int:
    import dpkt

    n = 0
    with open(path, "rb") as f:
        for _ts, buf in dpkt.pcap.Reader(f):
            eth = dpkt.ethernet.Ethernet(buf)
            ip = eth.data
            if isinstance(ip, (dpkt.ip.IP, dpkt.ip6.IP6)) and isinstance(ip.data, dpkt.tcp.TCP):
                _p = ip.data.data
            n += 1
    return n


def tshark_fields(path: str) -> int:
    out = subprocess.run(["tshark", "-r", path, "-T", "fields", "-e", "tcp.len"], capture_output=True, check=True)
    return out.stdout.count(b"\n")


def _timed(fn, path: str, repeats: int) -> tuple[float, int]:
    times = []
    n = 0
    for _ in range(repeats):
        t0 = time.perf_counter()
        n = fn(path)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), n


def main(argv: list[str] | None = None) -> None:
    # ``python -m bench pcap`` calls main() with no arguments: its own sys.argv is not ours
    argv = [] if argv is None else argv
    from bench.gen_http_capture import generate

    tmp = tempfile.mkdtemp(prefix="wirespan-bench-")
    ng_path = os.path.join(tmp, "http.pcapng")
    if argv:
        path = argv[0]
    else:
        path = os.path.join(tmp, "http.pcap")
        generate(path)
        generate(ng_path, pcapng=True)
    try:
        size = os.path.getsize(path)
        print(f"capture: {path} ({size / 1e6:.1f} MB)")
        rows = [("wirespan read+decode", ours_decode, REPEATS),
                ("wirespan receiver (reassembly)", ours_receiver, REPEATS)]
        if os.path.exists(ng_path):
            rows.append(("wirespan read+decode (pcapng)", lambda _p: ours_decode(ng_path), REPEATS))
        try:
            import dpkt  # noqa: F401
            rows.append(("dpkt Reader+Ethernet", dpkt_decode, PEER_REPEATS))
        except ImportError:
            print("dpkt not installed: skipped")
        if shutil.which("tshark"):
            rows.append(("tshark -T fields -e tcp.len", tshark_fields, PEER_REPEATS))
        else:
            print("tshark not installed: skipped")
        results = []
        for name, fn, rep in rows:
            t, n = _timed(fn, path, rep)
            results.append((name, n, t))
        base = results[0][1] / results[0][2]
        recv = results[1][1] / results[1][2]
        print(f"{'reader':34s} {'packets':>8s} {'median s':>9s} {'packets/s':>11s} "
              f"{'decode/this':>11s} {'recv/this':>9s}")
        for name, n, t in results:
            pps = n / t
            print(f"{name:34s} {n:8d} {t:9.3f} {pps:11,.0f} {base / pps:10.1f}x {recv / pps:8.1f}x")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main(sys.argv[1:])
