"""Run fuzz campaigns over protocols of the table and report (``python -m bench fuzz``).

One worker process a protocol (tests/fuzz/worker.py), at most ``jobs`` at once, each under
``nice``; each writes ``WORKDIR/<protocol>/stats.json`` and saves failing inputs under
``WORKDIR/<protocol>/crashes``. The corpus libFuzzer grows (``WORKDIR/<protocol>/corpus``) is
kept between runs; the seeds are written anew from tests/fuzz/seeds.py each time.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass

__all__ = ["Result", "main", "run", "table"]

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEFAULT_WORKDIR = os.path.join(ROOT, "build", "fuzz")


@dataclass
class Result:
    protocol: str
    rc: int
    stats: dict
    workdir: str

    @property
    def failed(self) -> bool:
        s = self.stats
        return (self.rc != 0 or not s.get("final") or s.get("escapes", 0) > 0 or s.get("slow", 0) > 0
                or s.get("memory", 0) > 0)

    def artifacts(self) -> list[str]:
        d = os.path.join(self.workdir, "crashes")
        return sorted(os.path.join(d, f) for f in os.listdir(d)) if os.path.isdir(d) else []


def _worker_cmd(name: str, workdir: str, a: argparse.Namespace, engine: str, inputs: int, stats: str) -> list[str]:
    cmd = [sys.executable, "-m", "tests.fuzz.worker", name, workdir, "--engine", engine, "--stats", stats,
           "--max-len", str(a.max_len), "--max-pieces", str(a.max_pieces), "--per-byte-us", str(a.per_byte_us),
           "--floor-ms", str(a.floor_ms), "--rss-limit-mb", str(a.rss_limit_mb)]
    if inputs:
        cmd += ["--inputs", str(inputs)]
    if a.seconds:
        cmd += ["--seconds", str(a.seconds)]
    if a.seed:
        cmd += ["--seed", str(a.seed)]
    if a.nice:
        cmd = ["nice", "-n", str(a.nice), *cmd]
    return cmd


def _phases(a: argparse.Namespace) -> list[tuple[str, int, str]]:
    """(engine, inputs, stats file) in order: with ``--guided N`` (and ``--inputs``), the first N
    inputs coverage-guided, the rest mutated from the corpus that grew, uninstrumented (faster)."""
    if a.engine == "atheris" and a.guided and a.inputs > a.guided:
        return [("atheris", a.guided, "stats.json"), ("random", a.inputs - a.guided, "stats-unguided.json")]
    return [(a.engine, a.inputs, "stats.json")]


def merge(parts: list[dict]) -> dict:
    """One protocol's stats over its phases."""
    parts = [p for p in parts if p]
    if not parts:
        return {}
    if len(parts) == 1:
        return parts[0]
    m = dict(parts[0])
    m["engine"] = "+".join(p.get("engine", "?") for p in parts)
    for k in ("inputs", "bytes", "seconds", "escapes", "slow", "memory", "protocol_errors", "spans"):
        m[k] = round(sum(p.get(k, 0) for p in parts), 2)
    for k in ("max_us_per_byte", "max_input_ms"):
        m[k] = max(p.get(k, 0) for p in parts)
    m["exec_per_s"] = round(m["inputs"] / m["seconds"], 1) if m["seconds"] else 0.0
    m["phases"] = [{k: p.get(k) for k in ("engine", "inputs", "exec_per_s", "escapes", "slow")} for p in parts]
    fails: dict[str, int] = {}
    sigs: dict[str, dict] = {}
    for p in parts:
        for k, v in p.get("failures", {}).items():
            fails[k] = fails.get(k, 0) + v
        for sg in p.get("signatures", []):
            if sg["signature"] in sigs:
                sigs[sg["signature"]]["count"] += sg["count"]
            else:
                sigs[sg["signature"]] = dict(sg)
    m["failures"], m["signatures"] = fails, list(sigs.values())
    m["final"] = all(p.get("final") for p in parts)
    return m


def run(names: list[str], a: argparse.Namespace, progress: bool = True) -> list[Result]:
    phases = _phases(a)
    pending = list(names)
    running: dict[str, tuple[subprocess.Popen, str, object, int]] = {}
    results: dict[str, Result] = {}
    rcs: dict[str, int] = {}
    os.makedirs(a.workdir, exist_ok=True)
    last_print = 0.0

    def start(name: str, phase: int) -> None:
        wd = os.path.join(a.workdir, name)
        os.makedirs(wd, exist_ok=True)
        engine, inputs, stats = phases[phase]
        if phase == 0:
            for _, _, st in phases:
                with contextlib.suppress(OSError):
                    os.remove(os.path.join(wd, st))
        log = open(os.path.join(wd, "fuzz.log"), "ab" if phase else "wb")
        p = subprocess.Popen(_worker_cmd(name, wd, a, engine, inputs, stats), cwd=ROOT, stdout=log,
                             stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        running[name] = (p, wd, log, phase)

    while pending or running:
        while pending and len(running) < a.jobs:
            start(pending.pop(0), 0)
        time.sleep(0.2)
        for name, (p, wd, log, phase) in list(running.items()):
            rc = p.poll()
            if rc is None:
                continue
            log.close()  # type: ignore[attr-defined]
            del running[name]
            rcs[name] = rcs.get(name, 0) or rc
            if rc == 0 and phase + 1 < len(phases):
                start(name, phase + 1)
                continue
            r = results[name] = Result(name, rcs[name], merge([_stats(wd, st) for _, _, st in phases]), wd)
            if progress:
                print(f"  {name}: {r.stats.get('inputs', 0)} inputs, {r.stats.get('exec_per_s', 0)}/s, "
                      f"rc={r.rc}{'  FAILED' if r.failed else ''}", flush=True)
        now = time.monotonic()
        if progress and running and now - last_print > 60:
            last_print = now
            parts = [f"{n} {sum(_stats(wd, st).get('inputs', 0) for _, _, st in phases)}"
                     for n, (_, wd, _, _) in running.items()]
            print("  ... " + ", ".join(parts), flush=True)
    return [results[n] for n in names]


def _stats(wd: str, name: str = "stats.json") -> dict:
    try:
        with open(os.path.join(wd, name)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def table(results: list[Result]) -> str:
    head = (f"{'protocol':<11} {'engine':<8} {'inputs':>10} {'exec/s':>8} {'escapes':>8} {'slow':>5} {'mem':>4} "
            f"{'max us/B':>9} {'max ms':>8} {'spans':>9}  result")
    lines = [head, "-" * len(head)]
    for r in results:
        s = r.stats
        lines.append(f"{r.protocol:<11} {s.get('engine', '?'):<8} {s.get('inputs', 0):>10} {s.get('exec_per_s', 0):>8} "
                     f"{s.get('escapes', 0):>8} {s.get('slow', 0):>5} {s.get('memory', 0):>4} "
                     f"{s.get('max_us_per_byte', 0):>9} {s.get('max_input_ms', 0):>8} {s.get('spans', 0):>9}  "
                     f"{'FAIL' if r.failed else 'ok'}" + ("" if r.rc == 0 else f" (worker exit {r.rc})"))
    return "\n".join(lines)


def repro(name: str, path: str, a: argparse.Namespace) -> int:
    """Run one saved input (uninstrumented) and print what it does."""
    from tests.fuzz.encoding import decode
    from tests.fuzz.harness import Target

    with open(path, "rb") as f:
        raw = f.read()
    t = Target(name, per_byte_s=a.per_byte_us * 1e-6, floor_s=a.floor_ms * 1e-3, max_pieces=a.max_pieces)
    print(decode(raw).describe(a.max_pieces))
    t0 = time.perf_counter()
    try:
        fails = t.run(raw)
    finally:
        t.close()
    print(f"\n{time.perf_counter() - t0:.3f} s")
    for fl in fails:
        print(f"\n{fl.kind} in the {fl.drive} drive: {fl.detail}\n{fl.tb}")
    print("no failure" if not fails else f"{len(fails)} failure(s)")
    return 1 if fails else 0


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m bench fuzz",
                                 description="Coverage-guided fuzzing of every protocol parser of the table.")
    ap.add_argument("protocols", nargs="*", help="protocols of processors/protocols/__init__.PROTOCOLS (default: all)")
    ap.add_argument("--inputs", type=int, default=0, help="inputs per protocol")
    ap.add_argument("--seconds", type=float, default=0.0, help="seconds per protocol (default 30 without --inputs)")
    ap.add_argument("--jobs", "-j", type=int, default=1, help="protocols fuzzed at once")
    ap.add_argument("--engine", choices=("atheris", "random"), default="atheris",
                    help="atheris: coverage-guided (libFuzzer); random: the same mutator, unguided")
    ap.add_argument("--guided", type=int, default=0, metavar="N",
                    help="with --inputs: only the first N inputs coverage-guided, the rest unguided mutations "
                         "of the corpus they grew, uninstrumented (about twice as fast)")
    ap.add_argument("--workdir", default=DEFAULT_WORKDIR)
    ap.add_argument("--max-len", type=int, default=512, help="largest encoded input")
    ap.add_argument("--max-pieces", type=int, default=16,
                    help="segments cut per input, then the rest of each step goes whole (0: no bound)")
    ap.add_argument("--per-byte-us", type=float, default=1000.0, help="slow: above this many us a byte ...")
    ap.add_argument("--floor-ms", type=float, default=200.0, help="... and above this many ms an input")
    ap.add_argument("--rss-limit-mb", type=float, default=512.0, help="peak RSS growth allowed a worker")
    ap.add_argument("--nice", type=int, default=19)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repro", metavar="FILE", help="run one saved input of the (one) protocol given and print it")
    return ap


def main(argv: list[str]) -> int:
    from processors.protocols import PROTOCOLS

    a = parser().parse_args(argv)
    unknown = [p for p in a.protocols if p not in PROTOCOLS]
    if unknown:
        print(f"unknown protocol(s): {', '.join(unknown)}; known: {', '.join(PROTOCOLS)}", file=sys.stderr)
        return 2
    if a.repro:
        if len(a.protocols) != 1:
            print("--repro needs exactly one protocol", file=sys.stderr)
            return 2
        return repro(a.protocols[0], a.repro, a)
    if not a.inputs and not a.seconds:
        a.seconds = 30.0
    if a.engine == "atheris":
        try:
            import atheris  # noqa: F401
        except ImportError:
            print("atheris is not installed (pip install -e '.[test]'): running the unguided engine", file=sys.stderr)
            a.engine = "random"
    names = a.protocols or list(PROTOCOLS)
    budget = f"{a.inputs} inputs" if a.inputs else f"{a.seconds:g} s"
    if a.guided and a.inputs > a.guided:
        budget += f" ({a.guided} coverage-guided, then unguided from the corpus)"
    print(f"fuzzing {', '.join(names)}: {budget} each, {a.jobs} at a time, engine {a.engine}, "
          f"max_len {a.max_len}, max_pieces {a.max_pieces}; slow = over {a.per_byte_us:g} us/byte "
          f"and {a.floor_ms:g} ms; workdir {a.workdir}", flush=True)
    t0 = time.monotonic()
    results = run(names, a)
    print()
    print(table(results))
    print(f"({time.monotonic() - t0:.0f} s)")
    bad = [r for r in results if r.failed]
    for r in bad:
        for sig in r.stats.get("signatures", []):
            print(f"{r.protocol}: {sig['count']}x {sig['kind']} ({sig['drive']}): {sig['detail'][:200]}\n"
                  f"    input: {sig['file']} (reproducer and traceback in the .txt beside it)")
        for art in r.artifacts():
            if os.path.basename(art).startswith("libfuzzer-"):
                print(f"{r.protocol}: libFuzzer stopped the worker: {art} (see {r.workdir}/fuzz.log)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
