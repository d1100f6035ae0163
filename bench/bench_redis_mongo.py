"""Redis and MongoDB parser throughput, against peers decoding the same bytes in the same run.

Run: ``python -m bench redis_mongo``. Prints medians of several repeats:

- Redis: a pipeline of GET/SET/HGETALL/LRANGE requests and their replies through
  our ``Session`` (scan, pair, build spans) vs redis-py's own pure-Python RESP2
  parser (``_RESP2Parser``, decoding the replies only) and, when installed, the
  ``hiredis`` C reader.
- MongoDB: OP_MSG find/insert exchanges through our ``Session`` vs ``bson.decode``
  (pymongo's C extension) of the same command and reply documents.
"""

from __future__ import annotations

import struct
from typing import Any

from bench.common import feed_session, median_seconds
from processors.protocols import mongodb, redis
from service.largebuf import LargeBuffer

REPEATS = 7


def _cmd(*args: bytes) -> bytes:
    return b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in args)


def redis_workload(n: int) -> tuple[list[bytes], list[bytes]]:
    reqs, reps = [], []
    for i in range(n):
        k = b"user:%d" % i
        match i % 4:
            case 0:
                reqs.append(_cmd(b"GET", k))
                reps.append(b"$12\r\nvalue-%06d\r\n" % i)
            case 1:
                reqs.append(_cmd(b"SET", k, b"x" * 32))
                reps.append(b"+OK\r\n")
            case 2:
                reqs.append(_cmd(b"HGETALL", k))
                reps.append(b"*4\r\n$4\r\nname\r\n$5\r\nalice\r\n$3\r\nage\r\n$2\r\n42\r\n")
            case _:
                reqs.append(_cmd(b"LRANGE", k, b"0", b"9"))
                reps.append(b"*10\r\n" + b"$8\r\nelement!\r\n" * 10)
    return reqs, reps


def _batches(reqs: list[bytes], reps: list[bytes], per: int = 256) -> list[tuple[bytes, bytes]]:
    return [(b"".join(reqs[i:i + per]), b"".join(reps[i:i + per])) for i in range(0, len(reqs), per)]


class _Buf:
    """redis-py's SocketBuffer interface over bytes (no socket), so only parsing is timed."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def readline(self, timeout: Any = None) -> bytes:
        end = self.data.index(b"\r\n", self.pos)
        line = self.data[self.pos:end]
        self.pos = end + 2
        return line

    def read(self, n: int, timeout: Any = None) -> bytes:
        d = self.data[self.pos:self.pos + n]
        self.pos += n + 2
        return d

    def get_pos(self) -> int:
        return self.pos

    def rewind(self, pos: int) -> None:
        self.pos = pos

    def purge(self) -> None:
        pass


def bench_redis() -> list[tuple[str, float]]:
    from redis._parsers import _RESP2Parser
    n = 20_000
    reqs, reps = redis_workload(n)
    batches = _batches(reqs, reps)
    rep = b"".join(reps)
    rows = []
    ours = median_seconds(lambda: feed_session(redis, batches))
    assert feed_session(redis, batches) == n
    rows.append(("wirespan redis Session (requests+replies -> spans)", n / ours))

    def scan_replies() -> None:
        sc = redis._Scanner(keep=3)
        buf = LargeBuffer()
        mv = memoryview(rep)
        for i in range(0, len(mv), 1400):
            buf.append(mv[i:i + 1400])
            sc.scan(buf, 0)
    rows.append(("wirespan RESP scanner (replies only, 1400-byte chunks)", n / median_seconds(scan_replies)))

    def peer() -> None:
        p = _RESP2Parser(socket_read_size=65536)
        p._buffer = _Buf(rep)
        p.encoder = None
        for _ in range(n):
            p._read_response(disable_decoding=True)
    rows.append(("redis-py _RESP2Parser (replies only)", n / median_seconds(peer)))
    try:
        import hiredis
    except ImportError:
        return rows

    def hi() -> None:
        r = hiredis.Reader()
        r.feed(rep)
        for _ in range(n):
            r.gets()
    rows.append(("hiredis C reader (replies only)", n / median_seconds(hi)))
    return rows


def mongo_workload(n: int) -> tuple[list[bytes], list[bytes], list[bytes]]:
    import bson
    hdr = struct.Struct("<iiii")
    reqs, reps, docs = [], [], []
    for i in range(n):
        if i % 2:
            cmd = {"find": "users", "filter": {"age": {"$gt": i}}, "limit": 10, "$db": "shop",
                   "lsid": {"id": bson.Binary(b"0" * 16, 4)}}
            reply = {"cursor": {"firstBatch": [{"_id": j, "name": "user"} for j in range(10)],
                                "id": bson.Int64(0), "ns": "shop.users"}, "ok": 1.0}
        else:
            cmd = {"insert": "orders", "ordered": True, "$db": "shop"}
            reply = {"n": 1, "ok": 1.0}
        c, r = bson.encode(cmd), bson.encode(reply)
        docs += [c, r]
        body = b"\0\0\0\0\0" + c
        reqs.append(hdr.pack(16 + len(body), i + 1, 0, 2013) + body)
        body = b"\0\0\0\0\0" + r
        reps.append(hdr.pack(16 + len(body), 100000 + i, i + 1, 2013) + body)
    return reqs, reps, docs


def bench_mongo() -> list[tuple[str, float]]:
    import bson
    n = 10_000
    reqs, reps, docs = mongo_workload(n)
    batches = _batches(reqs, reps, 64)
    ours = median_seconds(lambda: feed_session(mongodb, batches))
    assert feed_session(mongodb, batches) == n
    peer = median_seconds(lambda: [bson.decode(d) for d in docs])
    return [("wirespan mongodb Session (exchanges -> spans)", n / ours),
            ("pymongo bson.decode (C) of the same documents", n / peer)]


def main() -> None:
    for title, rows in (("Redis (20k commands, 1400-byte chunks)", bench_redis()),
                        ("MongoDB (10k OP_MSG exchanges, 1400-byte chunks)", bench_mongo())):
        print(f"{title}: median of {REPEATS} (pipelined batches)")
        for name, rate in rows:
            print(f"  {name:<58} {rate:>12,.0f} /s")
        if len(rows) > 2:
            print(f"  replies only, wirespan scanner / redis-py parser: {rows[1][1] / rows[2][1]:.2f}x")
        else:
            print(f"  wirespan / peer: {rows[0][1] / rows[1][1]:.2f}x")


if __name__ == "__main__":
    main()
