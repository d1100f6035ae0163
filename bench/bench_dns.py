"""DNS parser and UDP path throughput, against dnspython decoding the same bytes in the same run.

Run: ``python -m bench dns``. Prints medians of several repeats:

- parse: a mix of queries and answers (A with 2 addresses, AAAA, MX, NXDOMAIN with an SOA,
  an EDNS query) through ``dns._parse`` (header, question name decoded, every record stepped
  over, A/AAAA data read) vs ``dns.message.from_wire`` (dnspython builds the whole message);
- pair: each query/answer pair through a ``Session`` (``feed_datagram`` twice, one span);
- stage: the same pairs as ``DATAGRAM`` events through the protocols stage (flows, detection,
  pairing, spans).

``python -m bench dns --ab`` adds the TCP hot path before/after UDP support: a 100k-packet HTTP/1
capture (bench/gen_http_capture.py) through the pcap receiver and the protocols stage, with the
current receivers/pcap.py and processor.py and with copies whose UDP branches are cut out,
alternating A/B in child processes (medians of 3 each).
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.common import median_seconds

REPEATS = 7


def workload(n: int = 2000) -> list[tuple[bytes, bytes]]:
    import dns.message
    import dns.rrset

    pairs = []
    for i in range(n):
        k = i % 4
        if k == 0:
            q = dns.message.make_query(f"host{i}.svc.cluster.local", "A")
            r = dns.message.make_response(q)
            r.answer.append(dns.rrset.from_text(q.question[0].name, 30, "IN", "A", "10.0.0.1", "10.0.0.2"))
        elif k == 1:
            q = dns.message.make_query(f"api{i}.example.com", "AAAA", use_edns=0)
            r = dns.message.make_response(q)
            r.answer.append(dns.rrset.from_text(q.question[0].name, 30, "IN", "AAAA", "2001:db8::1"))
        elif k == 2:
            q = dns.message.make_query("example.com", "MX")
            r = dns.message.make_response(q)
            r.answer.append(dns.rrset.from_text("example.com.", 300, "IN", "MX", "10 mx1.example.com.",
                                                "20 mx2.example.com."))
        else:
            q = dns.message.make_query(f"missing{i}.example.com", "A")
            r = dns.message.make_response(q)
            r.set_rcode(3)
            r.authority.append(dns.rrset.from_text("example.com.", 300, "IN", "SOA",
                                                   "ns1.example.com. host.example.com. 1 7200 900 1209600 86400"))
        q.id = r.id = i & 0xFFFF
        pairs.append((q.to_wire(), r.to_wire()))
    return pairs


def main(argv: list[str] | None = None) -> None:
    import dns.message

    from processors.protocols import dns as D
    from processors.protocols.base import Conn
    from processors.protocols.processor import ProtocolsProcessor
    from receivers.udp import flow_id
    from service.model import EventKind, TcpEvent

    argv = argv or []
    pairs = workload()
    raw = [m for p in pairs for m in p]
    msgs = [memoryview(m) for m in raw]  # ours reads views in place; dnspython takes bytes
    nbytes = sum(len(m) for m in msgs)

    def ours() -> None:
        for m in msgs:
            D._parse(m, len(m), True)

    def theirs() -> None:
        fw = dns.message.from_wire
        for m in raw:
            fw(m)

    t_ours, t_theirs = median_seconds(ours, REPEATS), median_seconds(theirs, REPEATS)
    n = len(msgs)
    print(f"parse {n} messages ({nbytes / n:.0f} B avg): wirespan {t_ours / n * 1e6:.2f} us/msg, "
          f"dnspython from_wire {t_theirs / n * 1e6:.2f} us/msg: {t_theirs / t_ours:.1f}x")

    spans: list = []

    def pair() -> None:
        spans.clear()
        s = D.Session(Conn(1, "10.0.0.5", 40000, "10.0.0.53", 53, spans.append))
        s.transport = "udp"
        for i, (q, r) in enumerate(pairs):
            s.feed_datagram(True, memoryview(q), i)
            s.feed_datagram(False, memoryview(r), i + 1)

    t_pair = median_seconds(pair, REPEATS)
    assert len(spans) == len(pairs)
    print(f"pair + span: {t_pair / len(pairs) * 1e6:.2f} us/exchange (dnspython: {2 * t_theirs / n * 1e6:.2f} us "
          f"to decode the two messages alone)")

    a, b = ("10.0.0.5", 40000), ("10.0.0.53", 53)
    fid = flow_id(a[0], a[1], b[0], b[1])
    evs = []
    for i, (q, r) in enumerate(pairs):
        evs.append(TcpEvent(EventKind.DATAGRAM, fid, a[0], a[1], b[0], b[1], i * 1000, memoryview(q)))
        evs.append(TcpEvent(EventKind.DATAGRAM, fid, b[0], b[1], a[0], a[1], i * 1000 + 1, memoryview(r)))

    class _Count:
        n = 0

        def consume_spans(self, s: list) -> None:
            self.n += len(s)

    def stage() -> None:
        sink = _Count()
        p = ProtocolsProcessor("protocols", {}, sink)
        for i in range(0, len(evs), 256):
            p.consume_events(evs[i:i + 256])
        assert sink.n == len(pairs), sink.n

    t_stage = median_seconds(stage, REPEATS)
    print(f"stage: {len(pairs) / t_stage:,.0f} exchanges/s ({t_stage / len(evs) * 1e6:.2f} us/datagram)")
    if "--ab" in argv:
        ab()


# -- the TCP hot path, before/after -------------------------------------------------------------------
_CUTS = {
    "receivers/pcap.py": [
        ('''                if flags == UDP:  # a UDP datagram (packet.py): one event, no reassembly
                    uev = udp(src, sport, dst, dport, view[poff:pend], ts)
                    if uev is not None:
                        r.events.append(uev)
                    continue
''', ""),
    ],
    "processors/protocols/processor.py": [
        ('''        if ev.kind == _DATAGRAM:
            self._datagram(ev)
            return
''', ""),
    ],
}

_TIMER = """
import sys, time
sys.path.insert(0, sys.argv[1])
from processors.protocols.processor import ProtocolsProcessor
from receivers.pcap import PcapReceiver
class C:
    n = 0
    def consume_spans(self, s): self.n += len(s)
c = C()
p = ProtocolsProcessor("protocols", {}, c)
r = PcapReceiver("pcap", {"path": sys.argv[2], "progress": False}, p)
t = time.process_time()
r.run(); p.shutdown()
print(time.process_time() - t, c.n)
"""


def ab(rounds: int = 3) -> None:
    from bench.gen_http_capture import generate

    here = Path(__file__).resolve().parents[1]
    with tempfile.TemporaryDirectory(prefix="wirespan-dns-ab-") as d:
        cap = os.path.join(d, "http.pcap")
        generate(cap)
        old = Path(d) / "old"
        old.mkdir()
        for pkg in ("processors", "receivers", "service"):  # what the replay imports
            subprocess.run(["cp", "-a", str(here / pkg), str(old / pkg)], check=True)
        for rel, cuts in _CUTS.items():
            f = old / rel
            s = f.read_text()
            for a, b in cuts:
                assert s.count(a) == 1, (rel, a[:40])
                s = s.replace(a, b)
            f.write_text(s)
        times: dict[str, list[float]] = {"before": [], "after": []}
        for _ in range(rounds):
            for name, root in (("before", old), ("after", here)):
                out = subprocess.run([sys.executable, "-c", _TIMER, str(root), cap], capture_output=True, text=True,
                                     check=True, env={**os.environ, "PYTHONPATH": str(root)}).stdout.split()
                times[name].append(float(out[0]))
        b, a = statistics.median(times["before"]), statistics.median(times["after"])
        print(f"TCP hot path (100k-packet HTTP/1 replay, pcap receiver + protocols stage, CPU s, median of {rounds}"
              f", A/B alternating): before UDP {b:.3f} s, after {a:.3f} s ({(a / b - 1) * 100:+.1f}%); "
              f"runs: before {' '.join(f'{x:.3f}' for x in times['before'])}, "
              f"after {' '.join(f'{x:.3f}' for x in times['after'])}")


def cli(argv: list[str]) -> int:
    """``python -m bench dns [--ab]``."""
    main(argv)
    return 0


if __name__ == "__main__":
    main(sys.argv[1:])
