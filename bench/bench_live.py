"""The ``live`` receiver's two read paths, recv vs the TPACKET_V3 ring, same run (root).

Run: ``python -m bench live`` (or ``python bench/bench_live.py [burst] [concurrent]``).
Readers: ``recv`` (``ring: {enabled: false}``: one ``recv`` per packet, batched),
``ring/packet`` (the default: the ring, one copy of each payload), ``ring/runNK`` (the
ring, one copy per run of consecutive frames of up to N KiB, payloads as views of it)
and ``ring/block`` (runs as large as a whole 256 KiB block). Each is run receiver-only
(events into a counter) and with the protocols stage
(events -> HTTP spans into a counter).

1. **burst** (the receiver's own capacity): the consumer is held while a load generator
   (separate processes on loopback) runs to completion into a kernel buffer big enough
   to keep every packet (256 MiB socket buffer or ring); then it is released and this
   process's CPU time to drain the backlog is measured (the kernel's copy into the
   buffer is charged to the sender, so this is the reader's cost alone). Two shapes:
   ``small`` (HTTP/1.1 keep-alive ping-pong, ~100-byte payloads) and ``bulk`` (one HTTP
   POST of 96 MiB, 64 KiB loopback segments). Prints median packets per CPU-second,
   CPU microseconds per packet and the ratio against ``recv``.
2. **concurrent**: the generator and the receiver run at once for DURATION s with the
   default buffers (the 2 cores are shared by the generator, the server and the
   receiver); prints median captured packets/s, kernel drops and CPU per packet.

Medians of REPEATS runs, readers alternating within each repeat.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import threading
import time
from typing import Any

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from bench.common import ItemCounter
from receivers.live import LiveConfig, LiveReceiver
from tests.support.capture import free_port, wait_port

REPEATS = 3
DURATION = 3.0
PAIRS = 2
#: exchanges per client process in a small burst
BURST_EXCHANGES = 15_000
BULK_BYTES = 96 << 20
#: big enough to hold a whole burst: nothing dropped, the drain is the reader's work only
BURST_BUFFER = 256 << 20
READERS: list[tuple[str, dict[str, Any], int]] = [
    ("recv", {"enabled": False}, 0),
    ("ring/packet", {"enabled": True}, 0),
    ("ring/run16K", {"enabled": True}, 16 << 10),
    ("ring/run64K", {"enabled": True}, 64 << 10),
    ("ring/block", {"enabled": True}, 1 << 18),
]

#: The loopback HTTP server and clients (bench/loadgen.py), each in its own process.
LOADGEN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "loadgen.py")
_HEADERS = ["--header", "User-Agent: bench-live/1", "--header", "Accept: */*"]


class Gate:
    """Holds the receiver's first hand-off until released, then passes events on."""

    def __init__(self, next: Any) -> None:
        self.next = next
        self.open = threading.Event()

    def consume_events(self, events: list) -> None:
        self.open.wait(60)
        self.next.consume_events(events)


def make_stage(sink: ItemCounter) -> Any:
    from processors.protocols.processor import ProtocolsProcessor

    p = ProtocolsProcessor("protocols", {"enabled": ["http"]}, sink)
    p.start()
    return p


def receiver(port: int, ring: dict[str, Any], copy_unit: int, nxt: Any, buffer: int | None) -> LiveReceiver:
    cfg: dict[str, Any] = {"ports": [port], "ring": dict(ring)}
    if buffer and ring["enabled"]:
        cfg["ring"]["block_count"] = buffer // (1 << 18)
    elif buffer:
        cfg["buffer_size"] = buffer
    rx = LiveReceiver("live", LiveConfig(**cfg), nxt)
    rx.copy_unit = copy_unit
    return rx


def generate(port: int, shape: str, duration: float = 0.0) -> float:
    if shape == "bulk":
        args = [["bulk", str(port), str(BULK_BYTES)]]
    else:
        count = BURST_EXCHANGES if not duration else 10**9
        args = [["client", "--port", str(port), "--count", str(count), "--duration", str(duration), *_HEADERS]] * PAIRS
    procs = [subprocess.Popen([sys.executable, LOADGEN, *a], stdout=subprocess.PIPE, text=True) for a in args]
    return sum(float(p.communicate()[0].strip() or 0) for p in procs)


def wait_drained(rx: LiveReceiver, quiet: float = 0.3) -> None:
    seen, since = -1, time.monotonic()
    while True:
        n = rx.stats["packets"]
        now = time.monotonic()
        if n != seen:
            seen, since = n, now
        elif now - since >= quiet:
            return
        time.sleep(0.01)


def burst_run(port: int, shape: str, ring: dict, copy_unit: int, stage: bool) -> dict[str, float]:
    sink = ItemCounter()
    st = make_stage(sink) if stage else None
    gate = Gate(st if st is not None else sink)
    rx = receiver(port, ring, copy_unit, gate, BURST_BUFFER)
    rx.start()
    try:
        generate(port, shape)
        time.sleep(0.3)  # the last packets land
        p0, b0 = rx.stats["packets"], rx.stats["bytes"]
        c0 = time.process_time()
        gate.open.set()
        wait_drained(rx)
        cpu = time.process_time() - c0
        pk = rx.stats["packets"] - p0
        nbytes = rx.stats["bytes"] - b0
    finally:
        gate.open.set()
        rx.shutdown()
        if st is not None:
            st.shutdown()
    drops = sum(rx.stats["drops"].values())
    return {"packets": pk, "bytes": nbytes, "cpu": cpu, "drops": drops, "out": sink.n}


def concurrent_run(port: int, ring: dict, copy_unit: int, stage: bool) -> dict[str, float]:
    sink = ItemCounter()
    st = make_stage(sink) if stage else None
    rx = receiver(port, ring, copy_unit, st if st is not None else sink, None)
    rx.start()
    try:
        c0 = time.process_time()
        rate = generate(port, "small", DURATION)
        wait_drained(rx, 0.2)
        cpu = time.process_time() - c0
    finally:
        rx.shutdown()
        if st is not None:
            st.shutdown()
    pk = rx.stats["packets"]
    return {"packets": pk, "cpu": cpu, "drops": rx.stats["drops"].get("kernel_buffer_full", 0),
            "gen": rate, "out": sink.n}


def _print(label: str, name: str, runs: list[dict[str, float]], base: float | None, extra: str = "") -> float:
    us = statistics.median(r["cpu"] / max(r["packets"], 1) * 1e6 for r in runs)
    pps = 1e6 / us
    ratio = f"{pps / base:5.2f}x recv" if base else "  (base)  "
    drops = ",".join(str(int(r["drops"])) for r in runs)
    pk = statistics.median(r["packets"] for r in runs)
    print(f"  {label:22s} {name:12s} {pps:9.0f} pkts/CPU-s  {us:6.2f} us/pkt  {ratio}  "
          f"packets {pk:8.0f}  drops per run {drops}{extra}", flush=True)
    return pps


def burst() -> None:
    port = free_port()
    srv = subprocess.Popen([sys.executable, LOADGEN, "server", str(port)])
    wait_port(port)
    try:
        for shape in ("small", "bulk"):
            for stage in (False, True):
                runs: dict[str, list[dict[str, float]]] = {n: [] for n, _, _ in READERS}
                for _ in range(REPEATS):
                    for name, ring, unit in READERS:
                        runs[name].append(burst_run(port, shape, ring, unit, stage))
                label = f"{shape} {'+ protocols' if stage else 'receiver only'}"
                base = None
                for name, _, _ in READERS:
                    rs = runs[name]
                    # bulk segment sizes vary run to run (GSO): bytes per CPU-second is the fair figure
                    mbs = statistics.median(r["bytes"] / r["cpu"] / 2**20 for r in rs)
                    pps = _print(label, name, rs, base, f"  {mbs:6.0f} MiB/CPU-s" if shape == "bulk" else "")
                    base = base or pps
    finally:
        srv.terminate()
        srv.wait()


def concurrent() -> None:
    port = free_port()
    srv = subprocess.Popen([sys.executable, LOADGEN, "server", str(port)])
    wait_port(port)
    try:
        for stage in (False, True):
            runs: dict[str, list[dict[str, float]]] = {n: [] for n, _, _ in READERS}
            for _ in range(REPEATS):
                for name, ring, unit in READERS:
                    runs[name].append(concurrent_run(port, ring, unit, stage))
            label = f"small {'+ protocols' if stage else 'receiver only'}"
            base = None
            for name, _, _ in READERS:
                rs = runs[name]
                cap = statistics.median(r["packets"] / DURATION for r in rs)
                gen = statistics.median(r["gen"] for r in rs)
                pps = _print(label, name, rs, base, f"  captured {cap:7.0f} pkts/s  generator {gen:6.0f} req/s")
                base = base or pps
    finally:
        srv.terminate()
        srv.wait()


def main(sections: list[str] | None = None) -> None:
    if os.geteuid() != 0:
        print("bench_live: needs root or CAP_NET_RAW (AF_PACKET)")
        return
    want = set(sections or ("burst", "concurrent"))
    print(f"load average {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f}, {os.cpu_count()} cores")
    if "burst" in want:
        print(f"burst: backlog drained by the reader alone (median of {REPEATS}; small = {PAIRS} x "
              f"{BURST_EXCHANGES} HTTP exchanges, bulk = one {BULK_BYTES >> 20} MiB POST):")
        burst()
    if "concurrent" in want:
        print(f"concurrent: {PAIRS} HTTP ping-pong clients for {DURATION:.0f}s with the receiver at its "
              f"defaults (median of {REPEATS}):")
        concurrent()
    print(f"load average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main(sys.argv[1:])
