"""What the spanmetrics connector costs end to end: replay with it on and off, in one run.

Run: ``python -m bench spanmetrics`` (``python -m bench.bench_spanmetrics [--connections 100]
[--requests 200] [--rounds 4]``).

The replay benchmark's capture (bench/gen_http_capture.py: keep-alive HTTP/1 GETs, ids in
paths) goes through one in-process pipeline, pcap -> protocols -> batch -> file (OTLP/JSON),
with and without ``spanmetrics`` (semconv histograms with exemplars, route templating, its
metrics pipeline writing to the same file), A/B alternating so both see the same machine
load. Printed: spans/s of each (median of the rounds) and the cost of spanmetrics as the
share of spans/s lost. Goal (issue 17): at most 15 %. The first row, the protocols stage without
route templating (``routes: {unmatched: unset}``), gives what naming spans by route costs.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def _config(cap: str, out: str, metrics: bool, calls: bool = False, routes: bool = True) -> dict:
    raw: dict = {
        "receivers": {"pcap": {"path": cap, "progress": False}},
        "processors": {"protocols": {} if routes else {"routes": {"unmatched": "unset"}}, "batch": {}},
        "exporters": {"file": {"path": out}},
        "service": {"pipelines": {"traces": {"receivers": ["pcap"], "processors": ["protocols", "batch"],
                                             "exporters": ["file"]}},
                    "telemetry": {"metrics": {"address": ""}, "health": {"address": ""}}},
    }
    if metrics:
        raw["connectors"] = {"spanmetrics": {"metrics": ["semconv", "calls"] if calls else ["semconv"]}}
        raw["service"]["pipelines"]["traces"]["exporters"].append("spanmetrics")
        raw["service"]["pipelines"]["metrics"] = {"receivers": ["spanmetrics"], "exporters": ["file"]}
    return raw


def run_once(cap: str, out: str, metrics: bool, calls: bool = False, routes: bool = True) -> tuple[float, int]:
    """(wall seconds, spans) of one replay through a fresh Service."""
    from service import config as c
    from service.pipeline import Service

    svc = Service(c.validate(_config(cap, out, metrics, calls, routes)))
    t0 = time.perf_counter()
    svc.start()
    svc.wait_receivers()
    svc.shutdown()
    wall = time.perf_counter() - t0
    return wall, sum(svc.stats()["spans"].values())


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--connections", type=int, default=100)
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=4)
    args = ap.parse_args(argv if argv is not None else [])
    from bench.gen_http_capture import generate

    d = tempfile.mkdtemp(prefix="wirespan-bench-spanmetrics-")
    try:
        cap = os.path.join(d, "http.pcap")
        packets = generate(cap, args.connections, args.requests)
        print(f"capture: {packets} packets, {args.connections * args.requests} exchanges")
        out = os.path.join(d, "out.jsonl")
        run_once(cap, out, True)   # warm-up: imports, caches
        rows: dict[str, list[float]] = {"noroutes": [], "off": [], "semconv": [], "semconv+calls": []}
        spans = 0
        for _ in range(args.rounds):   # A/B/C alternating: the machine's load falls on all alike
            for name, on, calls, routes in (("noroutes", False, False, False), ("off", False, False, True),
                                            ("semconv", True, False, True), ("semconv+calls", True, True, True)):
                wall, spans = run_once(cap, out, on, calls, routes)
                rows[name].append(spans / wall)
        base = statistics.median(rows["off"])
        print(f"{'pipeline':<44} {'spans/s':>10} {'cost':>7}")
        for name, v in rows.items():
            med = statistics.median(v)
            label = {"noroutes": "protocols (routes: unset) -> batch -> file",
                     "off": "protocols -> batch -> file",
                     "semconv": "... + spanmetrics (semconv, exemplars)",
                     "semconv+calls": "... + spanmetrics (semconv and calls)"}[name]
            cost = "" if name == "off" else f"{(1 - med / base) * 100:>6.1f}%"
            if name == "noroutes":
                cost = f"{(1 - base / med) * 100:>6.1f}%"   # what the stage's route templating costs
            print(f"{label:<44} {med:>10.0f} {cost:>7}   rounds: {', '.join(f'{x:.0f}' for x in v)}")
        print(f"{spans} spans a run; medians of {args.rounds} rounds, A/B alternating (goal: cost <= 15 %)")
    finally:
        shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    main(sys.argv[1:])
