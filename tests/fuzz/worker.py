"""One protocol's fuzz campaign in this process: ``python -m tests.fuzz.worker NAME WORKDIR [options]``.

Started by tests/fuzz/campaign.py (one process a protocol: libFuzzer owns the process and exits
it). With atheris, the protocol modules and ``service`` are instrumented for coverage and
libFuzzer drives the structure-aware mutator of tests/fuzz/encoding.py; without it (or with
``--engine random``) the same mutator runs from the seeds, unguided. Failures are recorded and
the campaign goes on: each distinct failure (tests/fuzz/harness.Failure.signature) is saved once
as ``WORKDIR/crashes/<kind>-<hash>.bin`` with a ``.txt`` beside it (the decoded input, the
traceback); the counters go to ``WORKDIR/stats.json`` every second and at the end.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import random
import sys
import time


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="tests.fuzz.worker")
    ap.add_argument("protocol")
    ap.add_argument("workdir")
    ap.add_argument("--inputs", type=int, default=0, help="stop after this many inputs (0: no limit)")
    ap.add_argument("--seconds", type=float, default=0.0, help="stop after this long (0: no limit)")
    ap.add_argument("--engine", choices=("atheris", "random"), default="atheris")
    ap.add_argument("--max-len", type=int, default=1024)
    ap.add_argument("--per-byte-us", type=float, default=1000.0)
    ap.add_argument("--floor-ms", type=float, default=200.0)
    ap.add_argument("--rss-limit-mb", type=float, default=512.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--stats", default="stats.json", help="file name (in WORKDIR) of the counters")
    ap.add_argument("--max-pieces", type=int, default=64, help="segments cut per input before the rest goes whole")
    a = ap.parse_args(argv)

    import processors.protocols.processor  # noqa: F401  (uninstrumented, before the parsers)
    from processors.protocols import PROTOCOLS

    engine = a.engine
    if engine == "atheris":
        try:
            import atheris
        except ImportError:
            engine = "random"
    if engine == "atheris":
        # Instrument the parsers (and what they call into) before anything imports them.
        # Not the stage's own bookkeeping (processor.py), the model or telemetry: coverage of the
        # parsers and the buffer they read is what guides, and instrumented code runs slower.
        with atheris.instrument_imports(include=["processors.protocols", "service.largebuf"],
                                        exclude=["processors.protocols.processor"]):
            for path in PROTOCOLS.values():
                try:
                    importlib.import_module(path)
                except Exception:
                    pass  # unavailable: the stage logs it, the target refuses it below

    from tests.fuzz import encoding, seeds
    from tests.fuzz.harness import Target

    target = Target(a.protocol, per_byte_s=a.per_byte_us * 1e-6, floor_s=a.floor_ms * 1e-3,
                    rss_limit_mb=a.rss_limit_mb, max_pieces=a.max_pieces, quiet=True)
    crashes = os.path.join(a.workdir, "crashes")
    corpus = os.path.join(a.workdir, "corpus")
    seed_dir = os.path.join(a.workdir, "seeds")
    for d in (crashes, corpus, seed_dir):
        os.makedirs(d, exist_ok=True)
    seed_inputs = seeds.seeds(a.protocol)
    for i, s in enumerate(seed_inputs):
        with open(os.path.join(seed_dir, f"seed-{i:04d}"), "wb") as f:
            f.write(s)

    stats_path = os.path.join(a.workdir, a.stats)
    counts: dict[str, int] = {}     # failure kind -> failing inputs
    sigs: dict[str, dict] = {}      # signature -> first one seen
    t_start = time.monotonic()
    state = {"last_write": 0.0}

    def write_stats(final: bool) -> None:
        el = time.monotonic() - t_start
        st = {"protocol": a.protocol, "engine": engine, "inputs": target.inputs, "bytes": target.nbytes,
              "seconds": round(el, 2), "exec_per_s": round(target.inputs / el, 1) if el > 0 else 0.0,
              "failures": counts, "signatures": list(sigs.values()),
              "escapes": sum(v for k, v in counts.items() if k not in ("slow", "memory")),
              "slow": counts.get("slow", 0), "memory": counts.get("memory", 0),
              "max_us_per_byte": round(target.max_per_byte_s * 1e6, 2),
              "max_input_ms": round(target.max_input_s * 1e3, 2), "protocol_errors": target.protocol_errors,
              "spans": target.spans, "per_byte_us": a.per_byte_us, "floor_ms": a.floor_ms,
              "max_len": a.max_len, "final": final}
        tmp = stats_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(st, f, indent=1)
        os.replace(tmp, stats_path)
        state["last_write"] = time.monotonic()

    def record(raw: bytes, fails: list) -> None:
        for fl in fails:
            counts[fl.kind] = counts.get(fl.kind, 0) + 1
            sig = fl.signature
            if sig in sigs:
                sigs[sig]["count"] += 1
                continue
            stem = os.path.join(crashes, f"{fl.kind}-{fl.sig_hash}")
            with open(stem + ".bin", "wb") as f:
                f.write(raw)
            with open(stem + ".txt", "w") as f:
                f.write(f"protocol {a.protocol}: {fl.kind} in the {fl.drive} drive: {fl.detail}\n")
                f.write(f"signature: {sig}\nreproduce: python -m bench fuzz {a.protocol} --repro {stem}.bin"
                        f" --max-pieces {a.max_pieces}\n\n")
                f.write(encoding.decode(raw).describe(a.max_pieces) + "\n\n" + fl.tb)
            sigs[sig] = {"signature": sig, "kind": fl.kind, "drive": fl.drive, "detail": fl.detail[:300],
                         "file": stem + ".bin", "count": 1}

    def done() -> bool:
        if a.inputs and target.inputs >= a.inputs:
            return True
        return bool(a.seconds and time.monotonic() - t_start >= a.seconds)

    worst = [0.0]

    def one(raw: bytes) -> None:
        fails = target.run(raw)
        if fails:
            record(raw, fails)
        if target.max_per_byte_s > worst[0]:  # the input behind "max us/B", to look at
            worst[0] = target.max_per_byte_s
            with open(os.path.join(a.workdir, "slowest-per-byte.bin"), "wb") as f:
                f.write(raw)
        now = time.monotonic()
        if now - state["last_write"] >= 1.0:
            write_stats(False)
        if done():
            write_stats(True)
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)

    write_stats(False)
    if engine == "atheris":
        def mutator(data: bytes, max_size: int, seed: int) -> bytes:
            return encoding.mutate(data, max_size, seed, atheris.Mutate)

        def crossover(d1: bytes, d2: bytes, max_out: int, seed: int) -> bytes:
            return encoding.crossover(d1, d2, max_out, seed)

        args = [sys.argv[0], f"-max_len={a.max_len}", "-timeout=120", "-rss_limit_mb=4096",
                f"-artifact_prefix={crashes}/libfuzzer-", f"-seed={a.seed}" if a.seed else "-seed=0",
                "-reload=0", "-print_final_stats=1", corpus, seed_dir]
        args = [x for x in args if x != "-seed=0"]
        atheris.Setup(args, one, custom_mutator=mutator, custom_crossover=crossover)
        atheris.Fuzz()
        return 0  # not reached: libFuzzer exits the process
    rnd = random.Random(a.seed or None)
    pool = list(seed_inputs)
    for f in sorted(os.listdir(corpus)):
        with open(os.path.join(corpus, f), "rb") as fh:
            pool.append(fh.read())
    for s in pool:
        one(s)
    while True:
        raw = rnd.choice(pool)
        for _ in range(rnd.randint(1, 4)):
            raw = encoding.mutate(raw, a.max_len, rnd.getrandbits(32))
        one(raw)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
