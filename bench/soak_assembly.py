"""Trace assembly's memory over a long run: bounded, flat, evictions counted.

Run: ``python -m bench.soak_assembly [--minutes 10]``. Plays eBPF-shaped traffic
(tests/support/ebpfsim.py) through one protocols stage as fast as it goes: a
thread-per-request frontend taking requests from short-lived clients on fresh ports,
each calling redis and a backend; some requests are never answered, some clients die
mid-request, pids are reused, and an untraced caller's requests pile up on a 4-tuple.
Every 10 s it samples RSS, the assembler's table sizes and the requests done; at the end
it prints the RSS spread after warm-up (PASS when within 10 %) and the counts.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from tests.support.ebpfsim import OK, World, get, rget

FE, BE, REDIS = (200, "python3"), (300, "python3"), (400, "redis-server")


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def one_round(w: World, n: int, r: int) -> None:
    """``n`` client connections, each with a few requests, through the frontend's threads."""
    be = w.connect(FE, BE, 9090)
    rd = w.connect(FE, REDIS, 6379)
    for c in range(n):
        client = (1000 + (r * n + c) % 50_000, "curl")  # pids come back (reuse)
        a = w.connect(client, FE, 8080)
        tid = 201 + c % 8
        for k in range(3):
            a.call(client[0], tid, get(f"/r/{c}/{k}"))
            rd.call(tid, 401, rget(f"key:{c}"))
            rd.answer(401, tid, b"$-1\r\n")
            if (c + k) % 17 == 0:
                continue  # never answered: its context must go with its connection
            be.call(tid, 301, get(f"/b/{c}"))
            be.answer(301, tid, OK)
            a.answer(tid, client[0], OK)
        a.close()
    be.close()
    rd.close()
    ext = w.connect((None, ""), FE, 8081)  # an untraced caller; and a caller whose callee is not traced
    out = w.connect(FE, (None, ""), 5432)
    for k in range(50):
        ext.call(0, 250, get(f"/ext/{k}"))
        out.call(250, 0, rget(f"k{k}"))
        out.answer(0, 250, b"$-1\r\n")
        ext.answer(250, 0, OK)
    ext.close()
    out.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench.soak_assembly")
    ap.add_argument("--minutes", type=float, default=10.0)
    args = ap.parse_args(argv)
    w = World()
    asm = w.stage._assembler
    t_end = time.monotonic() + args.minutes * 60
    warm = time.monotonic() + min(60.0, args.minutes * 6)
    samples: list[float] = []
    next_sample = time.monotonic() + 10
    rounds = 0
    while time.monotonic() < t_end:
        one_round(w, 40, rounds)
        rounds += 1
        w.sink.spans.clear()  # an exporter would have shipped them
        if time.monotonic() >= next_sample:
            next_sample += 10
            gc.collect()
            rss = rss_mib()
            if time.monotonic() >= warm:
                samples.append(rss)
            print(f"  {rounds:6d} rounds  rss {rss:6.1f} MiB  threads {len(asm._threads)}  links {len(asm._links)}  "
                  f"conns {len(w.stage._conns)}  budget entries {w.stage._budget.entries}", flush=True)
    stats = dict(asm.stats)
    if not samples:
        print("too short to judge (needs a minute after warm-up)")
        return 0
    lo, hi = min(samples), max(samples)
    spread = (hi - lo) / lo
    drift = (samples[-1] - samples[0]) / samples[0]
    ok = spread <= 0.10
    print(f"rounds {rounds}, requests {rounds * 40 * 3 + rounds * 50}; RSS after warm-up {lo:.1f}-{hi:.1f} MiB "
          f"(spread {spread:.1%}, drift {drift:+.1%}): {'PASS' if ok else 'FAIL'}")
    print(f"assembly: {stats}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
