"""LargeBuffer reads vs struct.unpack_from on flat bytes, measured in the same run.

Run: ``python -m bench.bench_largebuf``. Prints the median ns per operation of
several repeats and the ratio to the flat ``struct`` baseline. The goal (issue 2):
a reader scalar read inside one chunk costs no more than 2x the flat read.
"""

from __future__ import annotations

import statistics
import struct
import timeit

from service.largebuf import LargeBuffer

N = 200_000
REPEATS = 7
U32 = struct.Struct(">I")


def _median_ns(stmt, number: int = N) -> float:
    times = timeit.repeat(stmt, number=number, repeat=REPEATS)
    return statistics.median(times) / number * 1e9


def run() -> list[tuple[str, float, float]]:
    flat = bytes(range(256)) * 64  # 16 KiB
    single = LargeBuffer(flat)
    multi = LargeBuffer(*[flat[i:i + 1399] for i in range(0, len(flat), 1399)])
    unpack = U32.unpack_from
    rows: list[tuple[str, float, float]] = []

    base_scalar = _median_ns(lambda: unpack(flat, 100))
    rows.append(("struct.unpack_from >I (flat bytes)", base_scalar, 1.0))

    # sequential reader reads: the hot path of every parser
    def seq_reader(buf: LargeBuffer):
        def f() -> None:
            r = buf.reader(0, 4000)
            rd = r.read_u32be
            for _ in range(1000):
                rd()
        return f

    def seq_flat() -> None:
        off = 0
        for _ in range(1000):
            unpack(flat, off)
            off += 4

    base_seq = _median_ns(seq_flat, N // 1000) / 1000
    rows.append(("flat: 1000 sequential unpack_from, per read", base_seq, 1.0))
    t = _median_ns(seq_reader(single), N // 1000) / 1000
    rows.append(("reader.read_u32be, single chunk, per read", t, t / base_seq))
    t = _median_ns(seq_reader(multi), N // 1000) / 1000
    rows.append(("reader.read_u32be, 1399-byte chunks, per read", t, t / base_seq))

    t = _median_ns(lambda: single.u32be_at(100))
    rows.append(("buf.u32be_at, single chunk", t, t / base_scalar))
    t = _median_ns(lambda: multi.u32be_at(1397))
    rows.append(("buf.u32be_at, straddling two chunks", t, t / base_scalar))

    mv = memoryview(flat)
    base_slice = _median_ns(lambda: mv[100:1100])
    rows.append(("memoryview slice [100:1100] (flat)", base_slice, 1.0))
    t = _median_ns(lambda: single.view_at(100, 1000))
    rows.append(("buf.view_at(100, 1000), single chunk", t, t / base_slice))
    t = _median_ns(lambda: multi.view_at(1000, 1000))
    rows.append(("buf.view_at(1000, 1000), straddling (scratch copy)", t, t / base_slice))

    def rd_single() -> None:
        r = single.reader()
        r.skip(100)
        r.read(1000)
    t = _median_ns(rd_single)
    rows.append(("reader(): skip(100)+read(1000), single chunk", t, t / base_slice))

    base_find = _median_ns(lambda: flat.find(b"\xfe\xff", 300), N // 10)
    rows.append(("bytes.find 2 bytes (flat)", base_find, 1.0))
    t = _median_ns(lambda: multi.find(b"\xfe\xff", 300), N // 10)
    rows.append(("buf.find 2 bytes, 1399-byte chunks", t, t / base_find))
    return rows


def main() -> None:
    print(f"LargeBuffer benchmark: median of {REPEATS} repeats")
    print(f"{'operation':<55} {'ns/op':>9} {'ratio':>7}")
    for name, ns, ratio in run():
        print(f"{name:<55} {ns:9.1f} {ratio:7.2f}x")


if __name__ == "__main__":
    main()
