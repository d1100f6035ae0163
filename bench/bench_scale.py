"""Does the cost depend on the traffic's shape? ``wirespan replay`` CPU time and peak RSS, as ratios.

Run: ``python -m bench scale`` (or ``python -m bench.bench_scale [--repeats 3] [--quick]``).

Every figure is a child ``wirespan replay CAPTURE --output FILE`` (the whole service: pcap
receiver, reassembly, protocols stage, batch, file exporter), its CPU seconds from ``wait4``
(user + system, less the start-up CPU of replaying an empty capture, so ratios compare the
work) and its peak RSS (VmHWM, bench_replay's watcher). The runs of one table alternate
(A, B, C, A, B, C, ...) and medians of ``--repeats`` are printed, with ratios against the
table's first row, so the load of a shared machine shifts them all alike.

Tables:
1. packets: 10k, 100k and 1M packets of small HTTP/1 exchanges over 100 keep-alive
   connections (bench/gen_http_capture.py): CPU per packet and RSS must stay flat.
2. shape: the same 50k exchanges over 10 long connections, 5000 sequential connections of 10
   exchanges, and those 5000 open at once with their packets round-robin
   (bench/gen_shapes.py). The many-connection captures carry 30k more packets (handshakes
   and closes): their cost is part of the ratio.
3. message size: one POST of 1 MB, 10 MB and 100 MB: CPU per MB flat, RSS flat (the body
   is stepped over, never held).
0. state: bytes an idle HTTP/1 connection holds (after one exchange: reassembler, TLS layer
   and protocols stage together) and bytes a pending request adds, by tracemalloc over 2000
   connections fed in-process.
4. workers: the 1M-packet capture with ``--workers 1`` and ``--workers N`` (N = the cores),
   wall time (what sharding is for) and CPU; and what ``--workers auto`` chose.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
from collections.abc import Callable
from typing import Any

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from bench.bench_replay import _run

MB = 1_000_000


def _replay_cmd() -> list[str]:
    beside = os.path.join(os.path.dirname(sys.executable), "wirespan")
    return [beside] if os.access(beside, os.X_OK) else [sys.executable, "-m", "service.cli"]


class _Runner:
    def __init__(self, d: str, repeats: int) -> None:
        self.d = d
        self.repeats = repeats
        self.base = [*_replay_cmd(), "replay"]
        empty = os.path.join(d, "empty.pcap")
        with open(empty, "wb") as f:
            f.write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1))
        runs = [self.once(empty, ["--workers", "1"]) for _ in range(max(3, repeats))]
        self.startup_cpu = statistics.median(r[2] for r in runs)
        self.startup_rss = statistics.median(r[1] for r in runs)

    def once(self, cap: str, extra: list[str]) -> tuple[float, float, float, bytes]:
        """(wall s, peak RSS MiB, CPU s, stderr) of one replay."""
        wall, rss, err, cpu = _run([*self.base, cap, "--output", os.path.join(self.d, "out.jsonl"), *extra])
        return wall, rss, cpu, err

    def table(self, rows: list[tuple[str, str, list[str]]]) -> dict[str, list[tuple[float, float, float, bytes]]]:
        """Run every row ``repeats`` times, alternating; the runs by label."""
        got: dict[str, list[tuple[float, float, float, bytes]]] = {label: [] for label, _, _ in rows}
        for _ in range(self.repeats):
            for label, cap, extra in rows:
                got[label].append(self.once(cap, extra))
        return got

    def work(self, runs: list[tuple[float, float, float, bytes]]) -> float:
        return max(1e-3, statistics.median(r[2] for r in runs) - self.startup_cpu)


def _spans(err: bytes) -> int:
    m = re.search(rb"(\d+) spans in ", err)
    return int(m.group(1)) if m else -1


def _print_table(title: str, unit: str, rows: list[tuple[str, float]], runner: _Runner,
                 got: dict[str, list[tuple[float, float, float, bytes]]], per: Callable[[float], str]) -> None:
    print(f"\n{title}")
    print(f"{'':<34} {'CPU s':>7} {unit:>12} {'ratio':>6} {'peak RSS':>9} {'RSS ratio':>9} {'spans':>8}")
    first_per = first_rss = None
    for label, amount in rows:
        runs = got[label]
        cpu = runner.work(runs)
        rss = statistics.median(r[1] for r in runs)
        p = cpu / amount
        first_per = first_per or p
        first_rss = first_rss or rss
        print(f"{label:<34} {cpu:>7.2f} {per(p):>12} {p / first_per:>5.2f}x {rss:>7.0f}MB {rss / first_rss:>8.2f}x "
              f"{_spans(runs[0][3]):>8}", flush=True)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="a tenth of the sizes (a smoke run)")
    ap.add_argument("--tables", default="0,1,2,3,4", help="which tables to print (default: all)")
    args = ap.parse_args(argv if argv is not None else [])
    from bench.gen_http_capture import generate

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    subprocess.run([sys.executable, "-m", "compileall", "-q", *(os.path.join(root, p) for p in
                    ("service", "receivers", "processors", "exporters"))], check=False, stdout=subprocess.DEVNULL)
    q = 10 if args.quick else 1
    d = tempfile.mkdtemp(prefix="wirespan-bench-scale-")
    try:
        r = _Runner(d, args.repeats)
        print(f"start-up (replay of an empty capture): {r.startup_cpu:.2f} CPU s, {r.startup_rss:.0f} MB; "
              f"figures below are CPU less start-up, medians of {args.repeats}, runs alternating")

        tables = set(args.tables.split(","))
        if "0" in tables:
            idle, pending = state_bytes()
            print(f"\n0. state: an idle HTTP/1 connection {idle:.0f} bytes, a pending request {pending:.0f} bytes "
                  f"(tracemalloc, 2000 connections)")
        caps = []
        for n in (10_000, 100_000, 1_000_000):
            if "1" not in tables and n < 1_000_000:
                continue
            cap = os.path.join(d, f"p{n}.pcap")
            got_n = generate(cap, 100, max(1, (n // q // 100 - 6) // 2))
            caps.append((f"{got_n} packets", cap, got_n))
        if "1" in tables:
            got = r.table([(label, cap, ["--workers", "1"]) for label, cap, _ in caps])
            _print_table("1. packets (100 keep-alive connections, small HTTP/1 exchanges)", "µs/packet",
                         [(label, n) for label, _, n in caps], r, got, lambda p: f"{p * 1e6:.2f}")
        big = caps[-1][1]
        if "2" in tables:
            _shapes(r, d, 50_000 // q)
        if "3" in tables:
            _messages(r, d, q)
        if "4" in tables:
            _workers(r, big, caps[-1][0])
    finally:
        shutil.rmtree(d, ignore_errors=True)


def state_bytes(n: int = 2000) -> tuple[float, float]:
    """(bytes an idle connection holds, bytes a pending request adds): ``n`` HTTP/1 connections
    through the reassembler, the TLS layer and the protocols stage, each after a handshake and
    one exchange (then, for the second figure, one more request left unanswered)."""
    import gc
    import tracemalloc

    import processors.protocols as protocols
    from bench.gen_http_capture import request, response
    from processors.protocols.processor import ProtocolsProcessor
    from receivers.tcp_reassembly import TcpReassembler
    from receivers.tls import TlsLayer

    for name in protocols.PROTOCOLS:
        protocols.load(name)

    class Sink:
        def consume_spans(self, spans: list) -> None:
            pass

    def run(pending: bool) -> tuple[int, Any]:
        r, tls = TcpReassembler(), TlsLayer()
        proc = ProtocolsProcessor("protocols", {}, Sink())
        proc.start()
        srv, e = bytes([10, 2, 0, 1]), memoryview(b"")
        msgs = [(memoryview(request(c, 0)), memoryview(response(c, 0)), memoryview(request(c, 1))) for c in range(n)]
        gc.collect()
        tracemalloc.start()
        base = tracemalloc.get_traced_memory()[0]
        ts = 1_764_000_000_000_000_000
        for c, (q, a, q2) in enumerate(msgs):
            cli, cp = bytes([10, 1, c >> 8 & 255, c & 255]), 1024 + c
            r.segment(cli, cp, srv, 8080, 1000, 0, 0x02, e, ts)
            r.segment(srv, 8080, cli, cp, 5000, 1001, 0x12, e, ts)
            r.segment(cli, cp, srv, 8080, 1001, 5001, 0x10, e, ts)
            r.segment(cli, cp, srv, 8080, 1001, 5001, 0x18, q, ts)
            r.segment(srv, 8080, cli, cp, 5001, 1001 + len(q), 0x18, a, ts)
            if pending:
                r.segment(cli, cp, srv, 8080, 1001 + len(q), 5001 + len(a), 0x18, q2, ts)
            ts += 1000
            proc.consume_events(tls.process(r.events))
            r.events = []
        gc.collect()
        used = tracemalloc.get_traced_memory()[0] - base
        tracemalloc.stop()
        return used, (r, tls, proc)  # kept alive until measured

    idle, _keep = run(False)
    more, _keep = run(True)
    return idle / n, (more - idle) / n


def _shapes(r: _Runner, d: str, ex: int) -> None:
    """Table 2: the same exchanges over few, sequential and interleaved connections."""
    from bench.gen_shapes import shape

    rows = []
    for mode in ("few", "sequential", "interleaved"):
        cap = os.path.join(d, f"s_{mode}.pcap")
        n = shape(cap, mode, ex)
        label = {"few": "few (10 connections)", "sequential": f"sequential ({ex // 10} connections)",
                 "interleaved": f"interleaved ({ex // 10} live at once)"}[mode]
        rows.append((f"{label}", cap, n))
    got = r.table([(label, cap, ["--workers", "1"]) for label, cap, _ in rows])
    _print_table(f"2. shape: the same {ex} exchanges", "µs/exchange", [(label, ex) for label, _, _ in rows],
                 r, got, lambda p: f"{p * 1e6:.2f}")
    for label, _, n in rows:
        print(f"   {label}: {n} packets")



def _messages(r: _Runner, d: str, q: int) -> None:
    """Table 3: one POST of 1, 10 and 100 MB."""
    from bench.gen_shapes import big_messages
    rows = []
    for size in (1 * MB, 10 * MB, 100 * MB):
        size //= q
        cap = os.path.join(d, f"m{size}.pcap")
        big_messages(cap, size)
        rows.append((f"one {size / MB:g} MB POST", cap, size))
    got = r.table([(label, cap, ["--workers", "1"]) for label, cap, _ in rows])
    _print_table("3. message size", "ms/MB", [(label, size / MB) for label, _, size in rows], r, got,
                 lambda p: f"{p * 1e3:.1f}")
    for _, cap, _ in rows:
        os.unlink(cap)


def _workers(r: _Runner, big: str, what: str) -> None:
    """Table 4: one process vs a worker a core vs auto, on the largest capture."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    n = max(2, min(cores, 4))
    got = r.table([("--workers 1", big, ["--workers", "1"]), (f"--workers {n}", big, ["--workers", str(n)]),
                   ("--workers auto", big, [])])
    print(f"\n4. workers ({what}, {os.path.getsize(big) / MB:.0f} MB, {cores} cores)")
    print(f"{'':<34} {'wall s':>7} {'speed-up':>8} {'CPU s':>7} {'CPU ratio':>9}")
    w1 = statistics.median(x[0] for x in got["--workers 1"])
    c1 = r.work(got["--workers 1"])
    for label in got:
        w = statistics.median(x[0] for x in got[label])
        c = r.work(got[label])
        print(f"{label:<34} {w:>7.2f} {w1 / w:>7.2f}x {c:>7.2f} {c / c1:>8.2f}x")
    chosen = []
    for x in got["--workers auto"]:
        m = re.search(rb"\((\d+) workers\)", x[3])
        chosen.append(int(m.group(1)) if m else 1)
    print(f"--workers auto chose {'/'.join(map(str, chosen))} workers; wall times depend on what else runs "
          f"(CPU ratio > 1: every worker reads and decodes the whole file)")


if __name__ == "__main__":
    main(sys.argv[1:])
