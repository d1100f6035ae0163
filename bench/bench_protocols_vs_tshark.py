"""Every protocol against tshark on the same capture, and where wirespan's time goes.

Run: ``python -m bench protocols-vs-tshark`` (or ``python -m bench.bench_protocols_vs_tshark
[--packets 40000] [--repeats 3] [--only mqtt,kafka]``).

Captures (one per protocol, ~``--packets`` packets each):
- real servers: the fixtures recorded from real servers and clients (tests/fixtures: nginx
  and curl over h2c, grpcio, psycopg against PostgreSQL, PyMySQL/mysql-connector against
  MariaDB, kafka-python against Tansu, Python's http.server, redis-py against redis-server,
  paho-mqtt against mosquitto, pika against RabbitMQ, nginx against php-fpm, pymemcache
  against memcached) copied as many times as it takes, each copy its own client port and
  later in time, the server port set to the protocol's well-known one so tshark dissects it
  without help (``-d`` is given anyway);
- built from the specification: the protocols without a recorded fixture (MongoDB, whose
  server Debian does not ship, and NATS) from tests/support/exchanges.py's conversation,
  one connection a copy (marked ``spec`` in the table). One exchange a connection is the
  shortest connection there is: ``bench scale`` measures that shape for every protocol.

Table 1, per protocol, one run, runs alternating, medians of ``--repeats``: CPU seconds
(user + system, ``wait4``) of ``wirespan replay CAP --output FILE --workers 1`` and of
``tshark -r CAP -Y PROTO -T fields -e frame.number`` (every packet dissected, the protocol's
filter applied), and their ratio; then the same less each tool's start-up (an empty capture),
which is what grows with the traffic.

Table 2, per protocol: where wirespan's time goes, as shares of the replay's CPU less
start-up, against the floor (a plain Python loop reading each record and unpacking its
Ethernet/IPv4/TCP headers with ``struct``, nothing else): pcap decode, reassembly, the TLS
layer and dispatch (the protocols stage outside the parser), parse, span build (measured
in-process; cProfile's split of the stage scaled to its unprofiled time), and encode + write
(the child replay less the in-process stage: batch, OTLP JSON encoding, the file).
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import re
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from bench.bench_replay import _run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIX = os.path.join(ROOT, "tests", "fixtures")

#: protocol: (fixture pcap or None for exchanges.py, wirespan protocol, port, tshark dissector/filter)
PROTOCOLS: dict[str, tuple[str | None, str, int, str]] = {
    "http": ("pcap/http_server_lo.pcap", "http", 80, "http"),
    "http2": ("http2/nginx_curl.pcap", "http2", 8080, "http2"),
    "grpc": ("http2/grpc_calls.pcap", "http2", 50051, "http2"),
    "postgresql": ("postgresql/psycopg_session.pcap", "postgresql", 5432, "pgsql"),
    "mysql": ("mysql/pymysql_connector_session.pcap", "mysql", 3306, "mysql"),
    "kafka": ("kafka/tansu_kafka_python.pcap", "kafka", 9092, "kafka"),
    "mqtt": ("mqtt/paho_mosquitto_session.pcap", "mqtt", 1883, "mqtt"),
    "redis": ("redis/redis_py_session.pcap", "redis", 6379, "resp"),
    "mongodb": (None, "mongodb", 27017, "mongo"),
    "memcached": ("memcached/pymemcache_session.pcap", "memcached", 11211, "memcache"),
    "fastcgi": ("fastcgi/nginx_php_fpm_session.pcap", "fastcgi", 9000, "fcgi"),
    "amqp": ("amqp/pika_rabbitmq_session.pcap", "amqp", 5672, "amqp"),
    "nats": (None, "nats", 4222, ""),  # no NATS dissector in tshark 4.0
}
#: tshark's filter when it differs from the dissector given to -d (gRPC rides on HTTP/2).
TSHARK_FILTER = {"grpc": "grpc"}
_NS_MAGIC = 0xA1B23C4D


def _fixture_records(path: str) -> tuple[bytes, list[tuple[int, bytes]]]:
    """(global header, [(ts ns, frame)]) of a little-endian pcap."""
    with open(path, "rb") as f:
        data = f.read()
    magic = struct.unpack_from("<I", data)[0]
    scale = 1 if magic == _NS_MAGIC else 1000
    recs = []
    off = 24
    while off + 16 <= len(data):
        s, sub, incl, _orig = struct.unpack_from("<IIII", data, off)
        recs.append((s * 1_000_000_000 + sub * scale, data[off + 16:off + 16 + incl]))
        off += 16 + incl
    return data[:24], recs


def _tcp_ports(frame: bytes) -> tuple[int, int, int] | None:
    """(offset of the TCP header, sport, dport) of an Ethernet/IPv4 TCP frame."""
    if len(frame) < 34 or frame[12:14] != b"\x08\x00" or frame[23] != 6:
        return None
    t = 14 + (frame[14] & 0x0F) * 4
    sport, dport = struct.unpack_from(">HH", frame, t)
    return t, sport, dport


def replicate(fixture: str, out: str, port: int, packets: int) -> int:
    """Copy a fixture's TCP packets until ``packets``: each copy later in time, its own client
    ports, the server's port set to ``port``. Returns the packets written."""
    _hdr, recs = _fixture_records(fixture)
    tcp = [(ts, fr, p) for ts, fr in recs if (p := _tcp_ports(fr)) is not None]
    # The server is where the first SYN goes (the fixtures record one server each); without one,
    # the port every connection shares (a one-connection fixture's two ports tie: hence the SYN).
    syn = next((dp for _, fr, (t, _sp, dp) in tcp if fr[t + 13] & 0x12 == 0x02), None)
    counts: dict[int, int] = {}
    for _, _, (_, sp, dp) in tcp:
        counts[sp] = counts.get(sp, 0) + 1
        counts[dp] = counts.get(dp, 0) + 1
    server = syn if syn is not None else max(counts, key=counts.__getitem__)
    clients = sorted({sp if dp == server else dp for _, _, (_, sp, dp) in tcp})
    t0, t1 = tcp[0][0], tcp[-1][0]
    span = t1 - t0 + 1_000_000
    copies = max(1, -(-packets // len(tcp)))
    n = 0
    with open(out, "wb") as f:
        f.write(struct.pack("<IHHiIII", _NS_MAGIC, 2, 4, 0, 0, 262144, 1))
        for k in range(copies):
            shift = k * span
            for ts, fr, (t, sp, dp) in tcp:
                b = bytearray(fr)
                cp = 1024 + (k * len(clients) + clients.index(sp if dp == server else dp)) % 64000
                new_sp, new_dp = (port, cp) if sp == server else (cp, port)
                struct.pack_into(">HH", b, t, new_sp, new_dp)
                tt = ts - t0 + 1_764_000_000_000_000_000 + shift
                f.write(struct.pack("<IIII", tt // 1_000_000_000, tt % 1_000_000_000, len(b), len(b)))
                f.write(b)
                n += 1
    return n


def from_exchange(name: str, out: str, port: int, packets: int) -> int:
    """One connection a copy of exchanges.py's conversation for ``name``, until ``packets``."""
    from tests.support.exchanges import EXCHANGES
    from tests.support.pcapgen import ACK, FIN, PSH, PcapWriter, TcpFlow, ether

    ex = EXCHANGES[name][0](200)
    w = PcapWriter(out)
    t = 1_764_000_000_000_000_000
    n = c = 0
    with w:
        while n < packets:
            f = TcpFlow(client=(f"10.1.{(c // 250) % 250}.{c % 250 + 1}", 1024 + c % 64000),
                        server=("10.2.0.1", port), isn_client=(c * 2654435761) & 0xFFFFFFFF, isn_server=c * 7)
            pk = list(f.handshake())
            for from_client, data in ex.steps:
                for i in range(0, len(data), 1448):
                    pk.append(f.send(from_client, data[i:i + 1448], PSH | ACK))
            pk += [f.send(True, b"", FIN | ACK), f.send(False, b"", FIN | ACK), f.ack(True)]
            for p in pk:
                w.packet(ether(p), t)
                t += 10_000
            n += len(pk)
            c += 1
    return n


def _floor(cap: str) -> float:
    """CPU seconds of the plain Python loop over the capture's packets: read + decode headers."""
    with open(cap, "rb") as f:
        data = memoryview(f.read())
    rec = struct.Struct("<IIII").unpack_from
    eth = struct.Struct("!12xH").unpack_from
    ip4 = struct.Struct("!BxH5xB2x4s4s").unpack_from
    tcp = struct.Struct("!HHIIBB").unpack_from
    t = time.process_time()
    off, end, n = 24, len(data), 0
    while off + 16 <= end:
        _s, _us, incl, _ = rec(data, off)
        p = off + 16
        if eth(data, p)[0] == 0x0800:
            vihl, _tl, _proto, _src, _dst = ip4(data, p + 14)
            tcp(data, p + 14 + (vihl & 15) * 4)
        n += 1
        off = p + incl
    return time.process_time() - t


class _Null:
    def consume_events(self, events: list) -> None:
        pass

    def consume_spans(self, spans: list) -> None:
        pass


def _inprocess(cap: str, profile: bool = False) -> tuple[float, float, pstats.Stats | None]:
    """(CPU s of the pcap receiver alone, CPU s of receiver + protocols stage, profile of the latter)."""
    from processors.protocols.processor import ProtocolsProcessor
    from receivers.pcap import PcapReceiver

    t = time.process_time()
    PcapReceiver("pcap", {"path": cap, "progress": False}, _Null()).run()
    recv = time.process_time() - t
    proc = ProtocolsProcessor("protocols", {}, _Null())
    proc.start()
    r = PcapReceiver("pcap", {"path": cap, "progress": False}, proc)
    pr = cProfile.Profile() if profile else None
    t = time.process_time()
    if pr is not None:
        pr.enable()
    r.run()
    proc.shutdown()
    if pr is not None:
        pr.disable()
    return recv, time.process_time() - t, (pstats.Stats(pr) if pr is not None else None)


def _shares(st: pstats.Stats) -> dict[str, float]:
    """Cumulative profiled seconds of the stage's parts (see the module docstring)."""
    cum: dict[str, float] = {}
    sess = 0.0
    for (fn, _line, name), (_cc, _nc, _tt, ct, _callers) in st.stats.items():  # type: ignore[attr-defined]
        base = os.path.basename(fn)
        key = None
        if base == "pcap.py" and name == "_replay":
            key = "replay"
        elif base == "pcap.py" and name == "_flush_events":
            key = "flush"
        elif base == "tcp_reassembly.py" and name in ("segment", "finish"):
            key = "reassembly"
        elif base == "tls.py" and name == "process":
            key = "tls"
        elif base == "processor.py" and name in ("consume_events", "shutdown"):
            key = "stage"
        elif base == "base.py" and name == "span":
            key = "span"
        elif base == "processor.py" and name == "e":
            key = "emit"
        if key is not None:
            cum[key] = cum.get(key, 0.0) + ct
        if "/protocols/" in fn and base not in ("processor.py", "base.py") and name in (
                "feed", "feed_whole", "close", "gap", "skip_gap"):
            sess = max(sess, ct) if name == "feed" else sess
            cum.setdefault("_sess", 0.0)
            cum["_sess"] += ct if name != "feed" else 0.0
    cum["session"] = cum.pop("_sess", 0.0) + sess
    return cum


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--packets", type=int, default=40_000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--only", default="", help="comma-separated protocols of the table")
    args = ap.parse_args(argv if argv is not None else [])
    names = [n for n in PROTOCOLS if not args.only or n in args.only.split(",")]
    subprocess.run([sys.executable, "-m", "compileall", "-q", *(os.path.join(ROOT, p) for p in
                    ("service", "receivers", "processors", "exporters"))], check=False, stdout=subprocess.DEVNULL)
    beside = os.path.join(os.path.dirname(sys.executable), "wirespan")
    ws = [beside] if os.access(beside, os.X_OK) else [sys.executable, "-m", "service.cli"]
    tshark = shutil.which("tshark") or "/usr/bin/tshark"
    d = tempfile.mkdtemp(prefix="wirespan-bench-pvt-")
    try:
        caps: dict[str, tuple[str, int, str]] = {}
        for name in names:
            fixture, _proto, port, _diss = PROTOCOLS[name]
            cap = os.path.join(d, f"{name}.pcap")
            n = (replicate(os.path.join(FIX, fixture), cap, port, args.packets) if fixture
                 else from_exchange(name, cap, port, args.packets))
            caps[name] = (cap, n, "real" if fixture else "spec")
        empty = os.path.join(d, "empty.pcap")
        with open(empty, "wb") as f:
            f.write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1))
        out = os.path.join(d, "out.jsonl")

        def ws_cmd(cap: str) -> list[str]:
            return [*ws, "replay", cap, "--output", out, "--workers", "1"]

        def ts_cmd(name: str, cap: str) -> list[str] | None:
            _f, _p, port, diss = PROTOCOLS[name]
            if not diss:
                return None
            return [tshark, "-r", cap, "-d", f"tcp.port=={port},{diss}", "-Y", TSHARK_FILTER.get(name, diss),
                    "-T", "fields", "-e", "frame.number"]

        res: dict[tuple[str, str], list[float]] = {}
        found: dict[tuple[str, str], int] = {}
        for _ in range(args.repeats):
            res.setdefault(("ws", "empty"), []).append(_run(ws_cmd(empty))[3])
            res.setdefault(("ts", "empty"), []).append(_run([tshark, "-r", empty, "-T", "fields", "-e",
                                                             "frame.number"])[3])
            for name in names:
                cap = caps[name][0]
                r = _run(ws_cmd(cap))
                res.setdefault(("ws", name), []).append(r[3])
                m = re.search(rb"(\d+) spans in ", r[2])
                found[("ws", name)] = int(m.group(1)) if m else -1
                tc = ts_cmd(name, cap)
                if tc is not None:
                    tout = os.path.join(d, "tshark.txt")
                    with open(tout, "wb") as f:
                        res.setdefault(("ts", name), []).append(_run(tc, stdout=f.fileno())[3])
                    with open(tout, "rb") as f:
                        found[("ts", name)] = sum(1 for _ in f)
        med = {k: statistics.median(v) for k, v in res.items()}
        ws0, ts0 = med[("ws", "empty")], med[("ts", "empty")]
        print(f"start-up CPU: wirespan {ws0:.2f} s, tshark {ts0:.2f} s; medians of {args.repeats}, one run")
        print(f"{'protocol':<11} {'traffic':<5} {'packets':>8} {'wirespan CPU s':>14} {'tshark CPU s':>12} "
              f"{'ratio':>6} {'less start-up':>13} {'spans':>7} {'tshark pkts':>11}")
        for name in names:
            _cap, n, kind = caps[name]
            w = med[("ws", name)]
            t = med.get(("ts", name))
            if t is None:
                print(f"{name:<11} {kind:<5} {n:>8} {w:>14.2f} {'(none)':>12} {'':>6} {'':>13} "
                      f"{found[('ws', name)]:>7}")
                continue
            print(f"{name:<11} {kind:<5} {n:>8} {w:>14.2f} {t:>12.2f} {t / w:>5.2f}x "
                  f"{(t - ts0) / max(1e-3, w - ws0):>12.2f}x {found[('ws', name)]:>7} {found[('ts', name)]:>11}",
                  flush=True)

        print("\nwhere the time goes (share of wirespan's CPU less start-up; floor = a plain loop over the "
              "packets, read + struct-decode headers)")
        print(f"{'protocol':<11} {'total s':>7} {'floor':>6} {'decode':>6} {'reasm':>6} {'tls+disp':>8} "
              f"{'parse':>6} {'span':>6} {'enc+write':>9}")
        for name in names:
            cap = caps[name][0]
            floor = statistics.median(_floor(cap) for _ in range(args.repeats))
            runs = [_inprocess(cap) for _ in range(args.repeats)]
            recv = statistics.median(r[0] for r in runs)
            stage = statistics.median(r[1] for r in runs)
            _, _, st = _inprocess(cap, profile=True)
            # encode + write: the child less its start-up less the in-process part (never below 0: noise)
            enc = max(0.0, med[("ws", name)] - ws0 - stage)
            total = max(1e-3, stage + enc)
            sh = _shares(st)  # type: ignore[arg-type]
            prof_total = sh.get("replay", 0.0) + sh.get("stage", 0.0) - sh.get("flush", 0.0) + sh.get("tls", 0.0)
            prof_recv = sh.get("replay", 0.0) - sh.get("flush", 0.0) + sh.get("tls", 0.0)
            # the receiver's measured time split by the profile: reassembly vs the rest (decode)
            reasm = recv * sh.get("reassembly", 0.0) / max(1e-9, prof_recv)
            tls = recv * sh.get("tls", 0.0) / max(1e-9, prof_recv)
            decode = recv - reasm - tls
            st_time = max(0.0, stage - recv)
            prof_stage = max(1e-9, prof_total - prof_recv)
            span = st_time * (sh.get("span", 0.0) + sh.get("emit", 0.0)) / prof_stage
            parse = max(0.0, st_time * sh.get("session", 0.0) / prof_stage - span)
            disp = max(0.0, st_time - parse - span) + tls

            def pct(x: float, total: float = total) -> str:
                return f"{100 * x / total:>5.0f}%"
            print(f"{name:<11} {total:>7.2f} {pct(floor)} {pct(decode)} {pct(reasm)} {pct(disp):>8} {pct(parse)} "
                  f"{pct(span)} {pct(enc):>9}", flush=True)
        print("floor and stages are in-process CPU (no interpreter start-up); enc+write = the child replay "
              "less the in-process receiver + stage")
    finally:
        shutil.rmtree(d, ignore_errors=True)


def cli(argv: list[str]) -> int:
    main(argv)
    return 0


if __name__ == "__main__":
    main(sys.argv[1:])

