"""Run the benchmarks: ``python -m bench`` (all) or ``python -m bench http1 kafka`` (by name).

Each ``bench/bench_<name>.py`` has a ``main()`` that prints medians and ratios
against peers measured in the same run. Benchmarks are not tests: they assert
nothing and are not run by CI.
"""

from __future__ import annotations

import importlib
import os
import pkgutil
import sys
import time
import traceback

import bench
from service.log import describe


def main(argv: list[str]) -> int:
    names = sorted(m.name[len("bench_"):] for m in pkgutil.iter_modules(bench.__path__)
                   if m.name.startswith("bench_"))
    argv = [a.replace("-", "_") if a.replace("-", "_") in names else a for a in argv]  # protocols-vs-tshark
    if argv and argv[0] in names:
        mod = importlib.import_module(f"bench.bench_{argv[0]}")
        if hasattr(mod, "cli"):  # a benchmark with options of its own: ``python -m bench fuzz redis --seconds 5``
            return mod.cli(argv[1:])
    wanted = argv or names
    unknown = [w for w in wanted if w not in names]
    if unknown:
        print(f"unknown benchmark(s): {', '.join(unknown)}; available: {', '.join(names)}", file=sys.stderr)
        return 2
    failed = []
    for name in wanted:
        print(f"\n=== bench_{name} ===", flush=True)
        t0 = time.monotonic()
        try:
            importlib.import_module(f"bench.bench_{name}").main()
        except KeyboardInterrupt:
            return 130
        except Exception as e:  # one benchmark's missing peer or bug: say so, go on with the others
            if os.environ.get("WIRESPAN_DEBUG"):
                traceback.print_exc()
            print(f"bench_{name} failed: {describe(e)} (WIRESPAN_DEBUG=1 shows the traceback)", file=sys.stderr)
            failed.append(name)
            continue
        print(f"(bench_{name}: {time.monotonic() - t0:.1f}s)", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
