"""TLS decryption of captures with a key log: wirespan against tshark on the same capture, one run.

Run: ``python -m bench tls``. Records on loopback (tcpdump) a real nginx with ``ssl`` serving
curl, which writes the NSS key log (SSLKEYLOGFILE), for three suites: TLS 1.3
TLS_AES_256_GCM_SHA384, TLS 1.3 TLS_CHACHA20_POLY1305_SHA256 and TLS 1.2
ECDHE-ECDSA-AES128-GCM-SHA256. Each capture holds two workloads on separate connections:
``bulk`` (BULK_FILES responses of BULK_BYTES: records of 16 KiB, most of them split across
64 KiB loopback segments) and ``small`` (SMALL_REQUESTS keep-alive GETs of a 100-byte file:
one record per message, the per-record cost). Then, A/B alternating, median of REPEATS:

- ``wirespan decrypt``: the pcap receiver with ``keylog_file``, a no-op consumer (read,
  reassembly, the TLS record layer: what decryption costs on the receiver's path);
- ``wirespan no keys``: the same capture without the key log (every session counted
  ``tls_no_keys``, records stepped over): the receiver's cost without decryption;
- ``wirespan spans``: receiver + decryption + the protocols stage (HTTP spans);
- ``tshark decrypt``: ``tshark -o tls.keylog_file:FILE -Y http -T fields -e http.response.code``
  (its cheapest run that must decrypt: the HTTP fields are in the plaintext);
- ``tshark no keys``: the same fields without the key log (nothing to decrypt).

MB/s are TCP payload megabytes (ciphertext, the TLS records) of the capture per second.
Benchmarks are noisy here (2 cores shared): medians, peers in the same run.
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from bench.common import ItemCounter

REPEATS = 5
PEER_REPEATS = 3
BULK_FILES = 12
BULK_BYTES = 4 << 20
SMALL_REQUESTS = 2000
SUITES = [
    ("TLS 1.3 AES-256-GCM", ["--tlsv1.3", "--tls13-ciphers", "TLS_AES_256_GCM_SHA384"]),
    ("TLS 1.3 ChaCha20-Poly1305", ["--tlsv1.3", "--tls13-ciphers", "TLS_CHACHA20_POLY1305_SHA256"]),
    ("TLS 1.2 ECDHE AES-128-GCM", ["--tls-max", "1.2", "--ciphers", "ECDHE-ECDSA-AES128-GCM-SHA256"]),
]
CURL = shutil.which("curl") or "curl"
TSHARK = shutil.which("tshark") or "tshark"


def record(d: Path, name: str, opts: list[str]) -> tuple[Path, Path, int]:
    """(capture, key log, TCP payload bytes) of both workloads over one suite."""
    from tests.support.capture import tcpdump
    from tests.support.tls_servers import keylog_env, nginx_tls, tls_files

    files = tls_files(d / "certs")
    kl = d / f"{name}.log"
    env = keylog_env(kl)
    www = {"bulk.bin": os.urandom(BULK_BYTES), "small.txt": b"x" * 100}
    base = [CURL, "-s", "-o", "/dev/null", "--cacert", str(files.ca_cert), *opts]
    with nginx_tls(files, www) as ng, tcpdump([ng.port], d / f"{name}.pcap") as cap:
        for _ in range(BULK_FILES):
            subprocess.run([*base, ng.url("/bulk.bin")], env=env, check=True, timeout=120)
        # one curl, one keep-alive connection, many URLs (curl's globbing: small.txt?[1-N])
        subprocess.run([*base, "-o", "/dev/null", ng.url(f"/small.txt?[1-{SMALL_REQUESTS}]")], env=env, check=True,
                       timeout=300)
    return cap, kl, payload_bytes(cap)


def payload_bytes(cap: Path) -> int:
    """The capture's reassembled TCP payload (the TLS records), counted before the TLS layer."""
    from receivers.pcap import PcapReceiver

    class Count:
        n = 0

        def consume_events(self, events: list) -> None:
            self.n += sum(len(e.payload) for e in events if e.payload is not None)

    sink = Count()
    rx = PcapReceiver("pcap", {"path": str(cap), "progress": False}, sink)
    rx.tls.process = lambda ev: ev  # type: ignore[method-assign]  # the ciphertext itself
    rx.run()
    return sink.n


class _Plain(ItemCounter):
    """Counts the plaintext bytes (to check that the run decrypted everything)."""

    def __init__(self) -> None:
        super().__init__()
        self.plain = 0

    def consume_events(self, events: list) -> None:
        for e in events:
            if e.payload is not None and getattr(e.conn_id, "tls", None) is not None:
                self.plain += len(e.payload)


def ours(cap: Path, kl: Path | None, spans: bool = False) -> tuple[float, Any]:
    from processors.protocols.processor import ProtocolsProcessor
    from receivers.pcap import PcapReceiver

    cfg: dict[str, Any] = {"path": str(cap), "progress": False}
    if kl is not None:
        cfg["keylog_file"] = str(kl)
    if spans:
        sink: Any = ItemCounter()
        nxt: Any = ProtocolsProcessor("protocols", {}, sink)
        nxt.start()
    else:
        sink = nxt = _Plain()
    rx = PcapReceiver("pcap", cfg, nxt)
    t0 = time.perf_counter()
    rx.run()
    if spans:
        nxt.shutdown()
    return time.perf_counter() - t0, (sink, rx)


def tshark(cap: Path, kl: Path | None) -> tuple[float, int]:
    args = [TSHARK, "-n", "-r", str(cap), "-Y", "http", "-T", "fields", "-e", "http.response.code"]
    if kl is not None:
        args += ["-o", f"tls.keylog_file:{kl}"]
    t0 = time.perf_counter()
    out = subprocess.run(args, capture_output=True, text=True, check=True, timeout=1200).stdout
    return time.perf_counter() - t0, sum(1 for x in out.split() if x == "200")


def main() -> None:
    if not shutil.which("tshark") or not shutil.which("nginx"):
        raise RuntimeError("needs tshark and nginx")
    d = Path(tempfile.mkdtemp(prefix="wirespan-bench-tls-"))
    try:
        for name, opts in SUITES:
            tag = name.replace(" ", "_").replace(".", "")
            cap, kl, nbytes = record(d, tag, opts)
            mb = nbytes / 1e6
            runs: dict[str, list[float]] = {k: [] for k in ("decrypt", "nokeys", "spans", "tshark", "tshark_nokeys")}
            checks: dict[str, Any] = {}
            for i in range(REPEATS):  # A/B alternating
                t, (sink, rx) = ours(cap, kl)
                runs["decrypt"].append(t)
                checks["plaintext"] = sink.plain
                checks["drops"] = rx.stats["drops"]
                checks["records"] = rx.stats["tls"]["records"]
                runs["nokeys"].append(ours(cap, None)[0])
                t, (sink, _rx) = ours(cap, kl, spans=True)
                runs["spans"].append(t)
                checks["spans"] = sink.n
                if i < PEER_REPEATS:
                    t, ok = tshark(cap, kl)
                    runs["tshark"].append(t)
                    checks["tshark_200s"] = ok
                    runs["tshark_nokeys"].append(tshark(cap, None)[0])
            med = {k: statistics.median(v) for k, v in runs.items()}
            print(f"{name}: {mb:.1f} MB of TLS records ({BULK_FILES} x {BULK_BYTES >> 20} MiB bulk, "
                  f"{SMALL_REQUESTS} small GETs), plaintext {checks['plaintext'] / 1e6:.1f} MB, "
                  f"{checks['spans']} spans, tshark {checks['tshark_200s']} responses, "
                  f"drops {checks['drops'] or 'none'}")
            for k, label in (("decrypt", "wirespan decrypt (receiver)"), ("nokeys", "wirespan no keys (receiver)"),
                             ("spans", "wirespan decrypt + spans"), ("tshark", "tshark decrypt (-T fields)"),
                             ("tshark_nokeys", "tshark no keys")):
                print(f"  {label:32s} {med[k]:7.2f} s  {mb / med[k]:8.1f} MB/s   "
                      f"(runs: {', '.join(f'{x:.2f}' for x in runs[k])})")
            print(f"  {checks['records']} records: {checks['records'] / med['decrypt']:,.0f} records/s decrypted")
            print(f"  wirespan decrypt vs tshark decrypt: {med['tshark'] / med['decrypt']:.1f}x; "
                  f"decrypt + spans vs tshark: {med['tshark'] / med['spans']:.1f}x", flush=True)
        plain_overhead(d)
    finally:
        shutil.rmtree(d, ignore_errors=True)


def plain_overhead(d: Path) -> None:
    """What the TLS layer costs a capture without TLS (it looks at each connection's first bytes,
    then passes its events untouched), on bench/gen_http_capture.py's file: the layer alone on the
    receiver's own event batches (its share is small enough to vanish in A/B noise here), and the
    receiver with and without it, A/B alternating."""
    from bench.gen_http_capture import generate
    from receivers.pcap import PcapReceiver
    from receivers.tls import TlsLayer

    path = str(d / "http.pcap")
    generate(path)
    batches: list[list[Any]] = []

    class Keep:
        def consume_events(self, ev: list) -> None:
            batches.append(list(ev))

    rx = PcapReceiver("pcap", {"path": path, "progress": False}, Keep())
    rx.tls.process = lambda ev: ev  # type: ignore[method-assign]
    rx.run()
    n = sum(len(b) for b in batches)
    alone = []
    for _ in range(REPEATS):
        layer = TlsLayer()
        t0 = time.perf_counter()
        for b in batches:
            layer.process(b)
        alone.append(time.perf_counter() - t0)
    runs: dict[bool, list[float]] = {True: [], False: []}
    for _ in range(REPEATS):
        for on in (True, False):
            rx = PcapReceiver("pcap", {"path": path, "progress": False}, ItemCounter())
            if not on:
                rx.tls.process = lambda ev: ev  # type: ignore[method-assign]
            t0 = time.perf_counter()
            rx.run()
            runs[on].append(time.perf_counter() - t0)
    pk = rx.stats["packets"]
    a, on_s, off_s = statistics.median(alone), statistics.median(runs[True]), statistics.median(runs[False])
    print(f"plain HTTP capture ({pk} packets, {n} events): the TLS layer alone {a * 1e9 / n:.0f} ns an event, "
          f"{100 * a / off_s:.1f}% of the receiver's time; receiver with it {pk / on_s:,.0f} packets/s, without "
          f"{pk / off_s:,.0f} ({100 * (on_s - off_s) / off_s:+.1f}%, median of {REPEATS}, A/B alternating)")


if __name__ == "__main__":
    main()
