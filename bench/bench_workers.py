"""Where ``replay --workers`` pays: CPU seconds per capture size, which do not depend on
what else the machine runs, and the wall time they imply on free cores.

Run: ``python -m bench.bench_workers [--requests 25,125,500,2000] [--repeats 3]`` (100
keep-alive connections x REQUESTS exchanges each: 1.3, 6.5, 26 and 104 MB by default).

Per size, as child processes (``wait4`` rusage covers a process and its reaped workers):
one process (``--workers 1``); each shard of two alone (``--shard k/2``, what one worker
does, plus the interpreter's start-up); ``--workers 2``. Every worker reads and decodes
the whole file and follows half the connections, so the two together use more CPU than
one process; on two free cores the replay takes about start-up + the slower shard's work
+ the parent's concatenation: ``est. wall, 2 free cores``, an upper bound on the gain (it
leaves out forking and the scheduler: measured walls gained less, 0.93x instead of the
estimated 1.39x at 6.5 MB, 1.54x instead of 1.64x at 104 MB). Start-up is measured as the CPU
of a replay of an empty capture. The measured wall times are printed too: on a machine
shared with other work they show what ``--workers 2`` costs when its cores are not free
(``--workers auto`` then uses one process).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def _run(cmd: list[str]) -> tuple[float, float]:
    """(wall s, CPU s of the process tree) of one child."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    assert p.stderr is not None
    err = p.stderr.read()
    _, status, ru = os.wait4(p.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} failed: {err.decode(errors='replace')[-1000:]}")
    return time.perf_counter() - t0, ru.ru_utime + ru.ru_stime


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", default="25,125,500,2000", help="exchanges per connection, one size each")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv if argv is not None else [])
    from bench.gen_http_capture import generate

    d = tempfile.mkdtemp(prefix="wirespan-bench-workers-")
    base = [sys.executable, "-m", "service.cli", "replay"]
    try:
        empty = os.path.join(d, "empty.pcap")
        with open(empty, "wb") as f:
            f.write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1))
        startup = statistics.median(_run([*base, empty, "--output", os.path.join(d, "e.jsonl")])[1]
                                    for _ in range(args.repeats))
        print(f"start-up (replay of an empty capture): {startup:.2f} CPU s")
        print(f"{'capture':>9} {'1 proc CPU':>10} {'shard CPU':>9} {'2 workers CPU':>13} "
              f"{'est. wall, 2 free cores':>23} {'speed-up':>8} {'wall 1':>7} {'wall 2':>7}")
        for req in (int(x) for x in args.requests.split(",")):
            cap = os.path.join(d, f"c{req}.pcap")
            generate(cap, 100, req)
            mb = os.path.getsize(cap) / 1e6
            one, shards, two = [], [], []
            for _ in range(args.repeats):
                one.append(_run([*base, cap, "--output", os.path.join(d, "o1.jsonl"), "--workers", "1"]))
                shards.append(max(_run([*base, cap, "--output", os.path.join(d, f"s{k}.jsonl"), "--workers", "1",
                                               "--shard", f"{k}/2", "--summary-json", os.path.join(d, f"s{k}.json")])
                                  for k in (0, 1)))
                two.append(_run([*base, cap, "--output", os.path.join(d, "o2.jsonl"), "--workers", "2"]))
            cpu1 = statistics.median(c for _, c in one)
            shard = statistics.median(c for _, c in shards)
            cpu2 = statistics.median(c for _, c in two)
            # the parent's own share of --workers 2: its total less the two workers' work
            parent = max(0.0, cpu2 - 2 * (shard - startup))
            est = parent + (shard - startup)
            print(f"{mb:>7.1f}MB {cpu1:>10.2f} {shard:>9.2f} {cpu2:>13.2f} {est:>23.2f} {cpu1 / est:>7.2f}x "
                  f"{statistics.median(w for w, _ in one):>7.2f} {statistics.median(w for w, _ in two):>7.2f}",
                  flush=True)
        print(f"medians of {args.repeats}; wall times measured with whatever else ran meanwhile")
    finally:
        shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    main(sys.argv[1:])
