"""DNS (processors/protocols/dns.py) and UDP through the protocols stage.

Messages are built by dnspython (a real DNS library); the real-server tests run Debian's
unbound on loopback (tests/support/unbound.py) with dnspython, dig and glibc's resolver
(``getent hosts`` in a mount namespace whose /etc/resolv.conf names unbound) as clients,
record them with tcpdump, replay the capture and hold the spans to tshark's dns dissector.
"""

from __future__ import annotations

import os
import random
import shutil
import socket
import struct
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import dns.flags
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import dns.rrset
import pytest

from processors.protocols import dns as D
from processors.protocols.base import Conn, Detection
from processors.protocols.errors import ProtocolError
from processors.protocols.processor import ProtocolsProcessor
from receivers.udp import flow_id
from service.largebuf import LargeBuffer
from service.model import EventKind, SpanKind, StatusCode, TcpEvent
from tests.support.capture import tcpdump
from tests.support.replay import replay

CLIENT, SERVER = ("10.0.0.5", 40000), ("10.0.0.53", 53)


class Sink:
    def __init__(self) -> None:
        self.spans: list = []

    def consume_spans(self, spans: list) -> None:
        self.spans.extend(spans)


def query(name: str, rdtype: str = "A", mid: int = 4242) -> dns.message.Message:
    q = dns.message.make_query(name, rdtype)
    q.id = mid
    return q


def answer(q: dns.message.Message, *rdatas: str, rcode: int = 0) -> dns.message.Message:
    r = dns.message.make_response(q)
    if rdatas:
        qq = q.question[0]
        r.answer.append(dns.rrset.from_text(qq.name, 60, "IN", qq.rdtype, *rdatas))
    r.set_rcode(rcode)
    return r


def dgram(from_client: bool, wire: bytes, ts: int, client: tuple = CLIENT, server: tuple = SERVER) -> TcpEvent:
    src, dst = (client, server) if from_client else (server, client)
    return TcpEvent(EventKind.DATAGRAM, flow_id(src[0], src[1], dst[0], dst[1]), src[0], src[1], dst[0], dst[1],
                    ts, memoryview(wire))


def stage(config: dict | None = None) -> tuple[ProtocolsProcessor, Sink]:
    sink = Sink()
    return ProtocolsProcessor("protocols", config or {}, sink), sink


# -- UDP through the stage ------------------------------------------------------------------------
def test_udp_query_and_answer_make_a_client_span() -> None:
    p, sink = stage()
    q = query("www.example.com", "A")
    r = answer(q, "10.0.0.1", "10.0.0.2")
    p.consume_events([dgram(True, q.to_wire(), 1_000), dgram(False, r.to_wire(), 5_000)])
    (s,) = sink.spans
    assert s.name == "A" and s.kind == SpanKind.CLIENT and s.status_code == StatusCode.UNSET
    assert (s.start_ns, s.end_ns) == (1_000, 5_000)
    a = s.attributes
    assert a["dns.question.name"] == "www.example.com" and a["dns.question.type"] == "A"
    assert a["dns.response.status_code"] == "NOERROR" and a["dns.answer.count"] == 2
    assert sorted(a["dns.answers"]) == ["10.0.0.1", "10.0.0.2"]
    assert a["network.transport"] == "udp" and a["network.protocol.name"] == "dns"
    assert (a["server.address"], a["server.port"]) == SERVER
    assert p.stats["udp_flows"] == 1 and p.stats["protocols"] == {"dns": 1}


@pytest.mark.parametrize("rcode,name", [(3, "NXDOMAIN"), (2, "SERVFAIL"), (5, "REFUSED")])
def test_error_rcodes(rcode: int, name: str) -> None:
    p, sink = stage()
    q = query("nope.example.com", "AAAA")
    p.consume_events([dgram(True, q.to_wire(), 1), dgram(False, answer(q, rcode=rcode).to_wire(), 2)])
    (s,) = sink.spans
    assert s.name == "AAAA" and s.status_code == StatusCode.ERROR
    assert s.attributes["error.type"] == name == s.attributes["dns.response.status_code"]
    assert s.attributes["dns.answer.count"] == 0 and "dns.answers" not in s.attributes


def test_edns_extended_rcode_badvers() -> None:
    q = query("x.example", "A")
    q.use_edns(0)
    r = dns.message.make_response(q)
    r.set_rcode(dns.rcode.BADVERS)
    p, sink = stage()
    p.consume_events([dgram(True, q.to_wire(), 1), dgram(False, r.to_wire(), 2)])
    assert sink.spans[0].attributes["error.type"] == "BADVERS"


def test_pairing_by_id_answers_out_of_order_and_per_flow() -> None:
    p, sink = stage()
    q1, q2 = query("a.example", "A", 1), query("b.example", "MX", 2)
    other = ("10.0.0.6", 41000)
    q3 = query("c.example", "TXT", 1)  # the same id on another flow
    p.consume_events([dgram(True, q1.to_wire(), 10), dgram(True, q2.to_wire(), 11),
                      dgram(True, q3.to_wire(), 12, client=other),
                      dgram(False, answer(q2, "10 mx.example.").to_wire(), 20),
                      dgram(False, answer(q3, '"t"').to_wire(), 21, client=other),
                      dgram(False, answer(q1, "1.2.3.4").to_wire(), 22)])
    got = [(s.name, s.attributes["dns.question.name"], s.start_ns) for s in sink.spans]
    assert got == [("MX", "b.example", 11), ("TXT", "c.example", 12), ("A", "a.example", 10)]
    assert p.stats["udp_flows"] == 2


def test_unanswered_queries_counted_at_idle_timeout_and_retransmission_keeps_first_send() -> None:
    p, sink = stage({"udp_idle_timeout": "2s"})
    q = query("lost.example", "A", 9)
    q2 = query("retry.example", "A", 10)
    s = 1_000_000_000
    p.consume_events([dgram(True, q.to_wire(), 1 * s), dgram(True, q2.to_wire(), 1 * s),
                      dgram(True, q2.to_wire(), 2 * s)])  # a retry of q2
    p.consume_events([dgram(False, answer(q2, "1.1.1.1").to_wire(), 2 * s + 5)])
    assert [x.start_ns for x in sink.spans] == [1 * s]  # the first send starts the span
    assert p.stats["drops"] == {"dns:retransmitted_query": 1}
    # Another flow's traffic moves event time on: the first flow idles out, its query counted.
    p.consume_events([dgram(True, query("z.example").to_wire(), 10 * s, client=("10.0.0.9", 50000))])
    assert p.stats["drops"]["dns:no_response"] == 1
    assert len(p._flows) == 1
    p.shutdown()
    assert p.stats["drops"]["dns:no_response"] == 2


def test_query_timeout_counts_while_the_flow_is_busy() -> None:
    p, sink = stage({"dns": {"query_timeout": 1.0}})
    s = 1_000_000_000
    evs = [dgram(True, query("a.example", "A", 1).to_wire(), 0)]
    q = query("b.example", "A", 2)
    evs += [dgram(True, q.to_wire(), 2 * s), dgram(False, answer(q).to_wire(), 2 * s + 1)]
    p.consume_events(evs)
    assert p.stats["drops"] == {"dns:no_response": 1} and len(sink.spans) == 1


def test_unmatched_response_and_other_udp_counted() -> None:
    p, sink = stage()
    q = query("a.example")
    p.consume_events([dgram(False, answer(q, "1.2.3.4").to_wire(), 1)])
    assert sink.spans == [] and p.stats["drops"] == {"dns:unmatched_response": 1}
    p2, _ = stage()
    p2.consume_events([dgram(True, b"\x17\x00\x03\x2a" + os.urandom(40), 1, server=("10.0.0.53", 123))])
    assert p2.stats["drops"] == {"udp_undetected": 1}
    p3, _ = stage({"enabled": ["http"]})  # no UDP protocol enabled: still counted
    p3.consume_events([dgram(True, q.to_wire(), 1)])
    assert p3.stats["drops"] == {"udp_undetected": 1}


def test_malformed_datagrams_after_detection_counted_then_flow_abandoned() -> None:
    p, _ = stage()
    q = query("a.example")
    evs = [dgram(True, q.to_wire(), 1)] + [dgram(True, q.to_wire()[:14], i) for i in range(2, 6)]
    p.consume_events(evs)
    d = p.stats["drops"]
    assert d["dns:truncated_name"] == 3 and d["evicted:too_many_errors"] == 1 and d["udp_ignored"] == 1
    assert d["dns:no_response"] == 1  # the abandoned flow's query


def test_max_udp_flows_lru() -> None:
    p, _ = stage({"max_udp_flows": 2})
    evs = [dgram(True, query(f"h{i}.example").to_wire(), i, client=("10.0.1.1", 30000 + i)) for i in range(4)]
    p.consume_events(evs)
    assert len(p._flows) == 2 and p.stats["drops"]["evicted:max_udp_flows"] == 2
    assert p.stats["drops"]["dns:no_response"] == 2


# -- TCP ------------------------------------------------------------------------------------------
def framed(m: dns.message.Message) -> bytes:
    w = m.to_wire()
    return struct.pack("!H", len(w)) + w


def tcp_events(steps: list[tuple[bool, bytes]], seg: int = 0) -> list[TcpEvent]:
    out, ts = [], 1000
    for fc, data in steps:
        src, dst = (CLIENT, SERVER) if fc else (SERVER, CLIENT)
        n = seg or len(data) or 1
        for i in range(0, len(data), n):
            out.append(TcpEvent(EventKind.DATA, 7, src[0], src[1], dst[0], dst[1], ts, memoryview(data[i:i + n])))
            ts += 1
    return out


@pytest.mark.parametrize("seg", [0, 1, 5])
def test_tcp_pipelined_queries_answered_out_of_order(seg: int) -> None:
    qs = [query(f"n{i}.example", t, 100 + i) for i, t in enumerate(["A", "AAAA", "SRV", "CAA"])]
    rs = [answer(qs[3], rcode=3), answer(qs[0], "1.2.3.4"), answer(qs[2], "0 5 80 srv.example."),
          answer(qs[1], "2001:db8::5")]
    p, sink = stage()
    p.consume_events(tcp_events([(True, b"".join(framed(q) for q in qs)), (False, b"".join(framed(r) for r in rs))],
                                seg))
    p.shutdown()
    got = [(s.name, s.attributes["dns.question.name"], s.attributes["network.transport"], int(s.status_code))
           for s in sink.spans]
    assert got == [("CAA", "n3.example", "tcp", 2), ("A", "n0.example", "tcp", 0), ("SRV", "n2.example", "tcp", 0),
                   ("AAAA", "n1.example", "tcp", 0)]
    assert sink.spans[3].attributes["dns.answers"] == ["2001:db8::5"]
    assert p.stats["drops"] == {}


@pytest.mark.parametrize("keep", [1, 3, 20])
def test_tcp_answer_cut_by_the_end_of_the_capture_is_an_incomplete_span(keep: int) -> None:
    """base.py's rule over TCP: the answer whose bytes had begun (its ID in sight from the
    fourth byte, else the oldest query's) is a span of the question, marked incomplete; the
    other query, unanswered, is counted."""
    qs = [query("a.example", "A", 11), query("b.example", "AAAA", 12)]
    cut = framed(answer(qs[1], "2001:db8::1"))[:keep]
    p, sink = stage()
    p.consume_events(tcp_events([(True, framed(qs[0]) + framed(qs[1])), (False, cut)]))
    p.shutdown()
    (s,) = sink.spans
    want = "b.example" if keep >= 4 else "a.example"
    assert s.attributes["dns.question.name"] == want and s.attributes["wirespan.incomplete"] is True
    assert "dns.response.status_code" not in s.attributes and "error.type" not in s.attributes
    assert p.stats["drops"]["dns:no_response"] == 1


def test_tcp_detect_needs_more_then_decides() -> None:
    wire = framed(query("www.example.com"))
    for cut in range(1, len(wire)):
        assert D.detect(LargeBuffer(wire[:cut]), None) == Detection.NEED_MORE, cut
    assert D.detect(LargeBuffer(wire), None) == Detection.REQUEST
    assert D.detect(LargeBuffer(framed(answer(query("x.example"), "1.1.1.1"))), None) == Detection.RESPONSE
    assert D.detect(LargeBuffer(b"\x00\x05hello"), None) == Detection.NO


# -- the parser's bounds ----------------------------------------------------------------------------
def _hdr(mid: int = 1, flags: int = 0x0100, qd: int = 1, an: int = 0, ns: int = 0, ar: int = 0) -> bytes:
    return struct.pack("!6H", mid, flags, qd, an, ns, ar)


def test_compression_pointer_loops_and_forward_pointers_refused() -> None:
    loop = _hdr() + b"\xc0\x0c" + b"\x00\x01\x00\x01"  # the question's name points at itself
    assert D.detect_datagram(memoryview(loop), None) == Detection.NO
    two = _hdr() + b"\x01a\xc0\x0e" + b"\x00\x01\x00\x01"  # a label, then a pointer back into it
    assert D.detect_datagram(memoryview(two), None) == Detection.NO
    with pytest.raises(ProtocolError) as e:
        D._parse(memoryview(loop), len(loop), True)
    assert e.value.reason == "bad_pointer"
    # A valid backward pointer in an answer: fine.
    ok = answer(query("a.example"), "1.2.3.4").to_wire()
    assert b"\xc0\x0c" in ok and D.detect_datagram(memoryview(ok), None) == Detection.RESPONSE


def test_huge_counts_and_long_names_refused_cheaply() -> None:
    q = query("a.example").to_wire()
    huge = bytearray(q)
    huge[6:12] = b"\xff\xff\xff\xff\xff\xff"
    t = time.process_time()
    assert D.detect_datagram(memoryview(bytes(huge)), None) == Detection.NO
    assert time.process_time() - t < 0.01
    long = _hdr() + (b"\x3f" + b"a" * 63) * 4 + b"\x00" + b"\x00\x01\x00\x01"  # 257 bytes of name
    with pytest.raises(ProtocolError) as e:
        D._parse(memoryview(long), len(long), True)
    assert e.value.reason == "name_too_long"
    assert D.detect_datagram(memoryview(_hdr() + b"\x40abc\x00\x00\x01\x00\x01"), None) == Detection.NO


def test_truncated_response_with_fewer_records_than_counted_is_a_span() -> None:
    q = query("big.example", "TXT")
    r = answer(q, '"x"')
    w = bytearray(r.to_wire())
    w[2] |= 0x02  # TC
    w[6:8] = struct.pack("!H", 9)  # claims nine answers, holds one
    p, sink = stage()
    p.consume_events([dgram(True, q.to_wire(), 1), dgram(False, bytes(w), 2)])
    assert sink.spans[0].attributes["dns.answer.count"] == 9


def test_names_escaped_as_the_conventions_say() -> None:
    wire = _hdr() + b"\x04a.b\\\x03c\x01d\x07example\x00" + b"\x00\x01\x00\x01"
    m = D._parse(memoryview(wire), len(wire), True)
    assert m.qname == "a\\.b\\\\.c\\001d.example"
    root = _hdr() + b"\x00\x00\x02\x00\x01"
    assert D._parse(memoryview(root), len(root), True).qname == "."
    unknown = query("t.example", "TYPE65280")
    p, sink = stage()
    p.consume_events([dgram(True, unknown.to_wire(), 1), dgram(False, answer(unknown).to_wire(), 2)])
    assert sink.spans[0].name == "TYPE65280"


def test_detection_is_strict_on_random_bytes() -> None:
    rnd = random.Random(5)
    hits = 0
    for _ in range(100_000):
        b = rnd.randbytes(rnd.randint(0, 80))
        if D.detect_datagram(memoryview(b), None) != Detection.NO:
            hits += 1
        if D.detect(LargeBuffer(b), None) in (Detection.REQUEST, Detection.RESPONSE):
            hits += 1
    assert hits == 0


def test_other_protocols_in_the_shared_corpus_are_never_dns() -> None:
    from tests.support.corpus import corpus_captures

    files = [p for p in corpus_captures() if "dns" not in p.name.lower()]
    assert files
    checked = 0
    for f in files:
        spans, _, pstats = replay(f, {})
        assert not [s for s in spans if s.attributes.get("network.protocol.name") == "dns"], f
        assert "dns" not in pstats["protocols"], f
        checked += 1
    assert checked == len(files)


# -- fuzzing: ≥ 100k mutated datagrams and streams, nothing escapes ----------------------------------
def _seeds() -> list[bytes]:
    q = query("www.example.com", "A")
    q.use_edns(0, payload=1232)
    out = [q.to_wire(), answer(q, "10.0.0.1", "10.0.0.2").to_wire(), answer(query("m.example", "MX"),
           "10 mx.example.").to_wire(), answer(query("x.example", "AAAA"), rcode=3).to_wire()]
    r = answer(query("c.example", "CNAME"), "www.example.com.")
    r.authority.append(dns.rrset.from_text("example.com.", 60, "IN", "SOA", "ns. h. 1 2 3 4 5"))
    out.append(r.to_wire())
    return out


def _mutate(rnd: random.Random, b: bytes) -> bytes:
    b = bytearray(b)
    for _ in range(rnd.randint(1, 4)):
        op = rnd.randrange(4)
        if op == 0 and b:
            b[rnd.randrange(len(b))] = rnd.randrange(256)
        elif op == 1 and b:
            del b[rnd.randrange(len(b)):]
        elif op == 2:
            i = rnd.randrange(len(b) + 1)
            b[i:i] = rnd.randbytes(rnd.randint(1, 8))
        elif len(b) > 13:
            i = rnd.randrange(12, len(b) - 1)
            b[i:i + 2] = struct.pack("!H", 0xC000 | rnd.randrange(len(b)))  # a pointer anywhere
    return bytes(b)


def test_fuzz_100k_datagrams_and_streams() -> None:
    rnd = random.Random(18)
    seeds = _seeds()
    p, sink = stage()
    n = 0
    evs = []
    for i in range(100_000):
        m = _mutate(rnd, rnd.choice(seeds))
        D.detect_datagram(memoryview(m), None)  # must not raise
        cl = (f"10.2.{i % 7}.{i % 5}", 30000 + i % 11)
        evs.append(dgram(rnd.random() < 0.5, m, i, client=cl))
        if len(evs) == 256:
            p.consume_events(evs)
            evs = []
        n += 1
    p.consume_events(evs)
    for i in range(2000):  # TCP streams of mutated framed messages, cut anywhere
        conv = [(True, b"".join(struct.pack("!H", len(x)) + x for x in (_mutate(rnd, rnd.choice(seeds)),) * 2)),
                (False, _mutate(rnd, struct.pack("!H", 40) + rnd.choice(seeds)))]
        evs = tcp_events(conv, rnd.choice([0, 1, 3, 17]))
        for e in evs:
            e.conn_id = ("fuzz", i)
        p.consume_events(evs)
        n += 1
    p.shutdown()
    assert n >= 100_000
    assert not any(k.endswith("internal_error") for k in p.stats["drops"]), p.stats["drops"]
    assert sink.spans  # some mutations stay valid: they still pair


# -- allocation: flat when the payload grows 100x -----------------------------------------------------
def _big_answer(n: int) -> tuple[bytes, bytes]:
    q = query("big.example", "TXT", 77)
    r = dns.message.make_response(q)
    r.answer.append(dns.rrset.from_text("big.example.", 60, "IN", "TXT",
                                        *[f'"{i:05d}{"x" * 195}"' for i in range(n)]))
    return q.to_wire(), r.to_wire()


def test_allocation_flat_in_payload_size() -> None:
    def cost(n: int) -> int:
        qw, rw = _big_answer(n)
        sess = D.Session(Conn(1, "10.0.0.5", 40000, "10.0.0.53", 53, lambda s: None))
        sess.conn.transport = "udp"
        mv_q, mv_r = memoryview(qw), memoryview(rw)
        for _ in range(3):  # warm caches
            sess.feed_datagram(True, mv_q, 1)
            sess.feed_datagram(False, mv_r, 2)
        tracemalloc.start()
        base = tracemalloc.take_snapshot()
        sess.feed_datagram(True, mv_q, 1)
        sess.feed_datagram(False, mv_r, 2)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        del base
        return peak

    small, big = cost(3), cost(300)  # ~600 bytes vs ~60 KB of answers
    assert len(_big_answer(300)[1]) > 90 * len(_big_answer(3)[1])
    assert big <= small + 2048, (small, big)


# -- the real thing: unbound, dnspython, dig and glibc -------------------------------------------------
DIG = shutil.which("dig")
TSHARK = shutil.which("tshark")


def _clients(u) -> list[tuple[str, str, str, str]]:
    """Run every client against unbound ``u``; returns what was asked (transport, name, type, rcode)."""
    asked = []
    a = u.address
    for name, t, rc in [("www.wirespan.test", "A", "NOERROR"), ("www.wirespan.test", "AAAA", "NOERROR"),
                        ("mail.wirespan.test", "MX", "NOERROR"), ("nope.wirespan.test", "A", "NXDOMAIN"),
                        ("x.refused.test", "A", "REFUSED")]:
        r = dns.query.udp(dns.message.make_query(name, t), a, timeout=5)
        assert dns.rcode.to_text(r.rcode()) == rc
        asked.append(("udp", name, t, rc))
        r = dns.query.tcp(dns.message.make_query(name, t), a, timeout=5)
        assert dns.rcode.to_text(r.rcode()) == rc
        asked.append(("tcp", name, t, rc))
    # SERVFAIL: the stub zone's server is a closed port.
    r = dns.query.udp(dns.message.make_query("x.fail.test", "A"), a, timeout=10)
    assert r.rcode() == dns.rcode.SERVFAIL
    asked.append(("udp", "x.fail.test", "A", "SERVFAIL"))
    # Pipelined on one TCP connection: three queries written at once, then the answers read.
    with socket.create_connection((a, 53), timeout=5) as s:
        qs = [dns.message.make_query(n, t) for n, t in [("www.wirespan.test", "A"), ("txt.wirespan.test", "TXT"),
                                                        ("gone.wirespan.test", "AAAA")]]
        s.sendall(b"".join(framed(q) for q in qs))
        for _ in qs:
            dns.query.receive_tcp(s, time.time() + 5)
    asked += [("tcp", "www.wirespan.test", "A", "NOERROR"), ("tcp", "txt.wirespan.test", "TXT", "NOERROR"),
              ("tcp", "gone.wirespan.test", "AAAA", "NXDOMAIN")]
    assert DIG, "dig (bind9-dnsutils) is needed: tests/run.sh installs it"
    for extra, tr in (([], "udp"), (["+tcp"], "tcp")):
        out = subprocess.run([DIG, "+tries=1", "+time=5", *extra, f"@{a}", "www.wirespan.test", "A"],
                             capture_output=True, text=True, timeout=20).stdout
        assert "status: NOERROR" in out
        asked.append((tr, "www.wirespan.test", "A", "NOERROR"))
    # glibc: getent in a mount namespace whose /etc/resolv.conf names unbound (nothing outside changes).
    conf = Path(u.dir) / "resolv.conf"
    conf.write_text(f"nameserver {a}\noptions timeout:5 attempts:1\n")
    out = subprocess.run(["unshare", "-m", "sh", "-c",
                          f"mount --bind {conf} /etc/resolv.conf && getent ahosts www.wirespan.test"],
                         capture_output=True, text=True, timeout=30)
    assert "10.1.2.3" in out.stdout and "2001:db8::1" in out.stdout, out
    # ahosts: an A and an AAAA query, sent together (one sendmmsg)
    asked += [("udp", "www.wirespan.test", "A", "NOERROR"), ("udp", "www.wirespan.test", "AAAA", "NOERROR")]
    return asked


def _tshark_answers(cap: Path) -> list[tuple[str, str, int, int, str]]:
    fields = ["dns.qry.name", "dns.qry.type", "dns.flags.rcode", "dns.count.answers", "udp.srcport"]
    out = subprocess.run([TSHARK, "-r", str(cap), "-Y", "dns.flags.response == 1", "-T", "fields",
                          "-E", "separator=|", "-E", "occurrence=a", *[x for f in fields for x in ("-e", f)]],
                         capture_output=True, text=True, timeout=120, check=True).stdout
    rows = []
    for line in out.splitlines():
        names, types, rcode, ans, usp = line.split("|")
        # One message a row (tshark puts two pipelined TCP messages of one segment on one row, comma-separated).
        for n, t, rc, a in zip(names.split(","), types.split(","), rcode.split(","), ans.split(","), strict=True):
            rows.append((n, D._type_name(int(t)), int(rc), int(a), "udp" if usp else "tcp"))
    return rows


def test_real_unbound_recorded_and_replayed_agrees_with_tshark() -> None:
    from tests.support.unbound import unbound_server

    with unbound_server() as u, tcpdump([53], udp=True) as cap:
        asked = _clients(u)
    spans, rstats, pstats = replay(cap, {})
    dspans = [s for s in spans if s.attributes.get("network.protocol.name") == "dns"]
    got = sorted((s.attributes["network.transport"], s.attributes["dns.question.name"], s.name,
                  s.attributes["dns.response.status_code"]) for s in dspans)
    assert got == sorted(asked)
    for s in dspans:
        assert s.kind == SpanKind.CLIENT
        assert s.attributes["server.address"] == u.address and s.attributes["server.port"] == 53
        err = s.attributes["dns.response.status_code"] != "NOERROR"
        assert (s.status_code == StatusCode.ERROR) == err
        if err:
            assert s.attributes["error.type"] == s.attributes["dns.response.status_code"]
        if s.name == "A" and s.attributes["dns.question.name"] == "www.wirespan.test":
            assert sorted(s.attributes["dns.answers"]) == ["10.1.2.3", "10.1.2.4"]
    assert rstats["datagrams"] > 0
    assert not {k: v for k, v in pstats["drops"].items() if k.startswith("dns:")}, pstats["drops"]
    if TSHARK:
        theirs = sorted(_tshark_answers(cap))
        code = {v: k for k, v in D.RCODES.items()}
        ours = sorted((s.attributes["dns.question.name"], s.name, code[s.attributes["dns.response.status_code"]],
                       s.attributes["dns.answer.count"], s.attributes["network.transport"]) for s in dspans)
        assert ours == theirs


def _live_spans(u, recv_cfg: dict) -> tuple[list, dict, dict]:
    from receivers.live import LiveReceiver

    sink = Sink()
    p = ProtocolsProcessor("protocols", {}, sink)
    r = LiveReceiver("live/dns", LiveReceiver.Config(**recv_cfg), p)
    r.start()
    try:
        for t in ("A", "AAAA"):
            dns.query.udp(dns.message.make_query("www.wirespan.test", t), u.address, timeout=5)
        dns.query.tcp(dns.message.make_query("mail.wirespan.test", "MX"), u.address, timeout=5)
        dns.query.udp(dns.message.make_query("nope.wirespan.test", "A"), u.address, timeout=5)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:  # other UDP: kept in the kernel
            s.sendto(b"not dns", ("127.0.0.1", 9))
        time.sleep(0.5)
    finally:
        r.shutdown()
        p.shutdown()
    return sink.spans, r.stats, p.stats


@pytest.mark.parametrize("ring", [True, False])
def test_live_receiver_passes_dns_over_udp_and_tcp(ring: bool) -> None:
    from tests.support.unbound import unbound_server

    with unbound_server() as u:
        spans, rstats, _ = _live_spans(u, {"interface": "lo", "ports": [53], "ring": {"enabled": ring}})
        got = sorted((s.attributes["network.transport"], s.attributes["dns.question.name"], s.name,
                      s.attributes["dns.response.status_code"]) for s in spans
                     if s.attributes.get("server.address") == u.address)
        assert got == [("tcp", "mail.wirespan.test", "MX", "NOERROR"), ("udp", "nope.wirespan.test", "A", "NXDOMAIN"),
                       ("udp", "www.wirespan.test", "A", "NOERROR"), ("udp", "www.wirespan.test", "AAAA", "NOERROR")]
        assert "udp_port" not in rstats["drops"]  # port 9 never left the kernel
        # udp_ports: [] passes no UDP at all; the TCP query still gives its span.
        cfg = {"interface": "lo", "ports": [53], "udp_ports": [], "ring": {"enabled": ring}}
        spans, rstats, _ = _live_spans(u, cfg)
        mine = [s for s in spans if s.attributes.get("server.address") == u.address]
        assert [s.attributes["network.transport"] for s in mine] == ["tcp"]


def test_live_kernel_filter_with_udp_ports_matches_tcpdump() -> None:
    from receivers.live import build_filter

    prog = build_filter([8080], 65535, False, udp_ports=[53, 5353])
    # Run the program on real frames through libpcap's offline filter semantics: decode each
    # verdict with a tiny classic-BPF interpreter of the ops used here.
    def frame(proto: int, sport: int, dport: int) -> bytes:
        l4 = struct.pack("!HHHH", sport, dport, 8, 0) if proto == 17 else struct.pack("!HHIIBBHHH", sport, dport,
                                                                                      0, 0, 0x50, 0x18, 0, 0, 0)
        ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(l4), 0, 0, 64, proto, 0, b"\x7f\0\0\1", b"\x7f\0\0\2")
        return b"\0" * 12 + b"\x08\x00" + ip + l4

    def run(p: list, pkt: bytes) -> int:
        a = x = pc = 0
        while True:
            op, jt, jf, k = p[pc]
            pc += 1
            if op == 0x28:
                a = struct.unpack_from("!H", pkt, k)[0]
            elif op == 0x30:
                a = pkt[k]
            elif op == 0x48:
                a = struct.unpack_from("!H", pkt, x + k)[0]
            elif op == 0xB1:
                x = (pkt[k] & 0xF) * 4
            elif op == 0x15:
                pc += jt if a == k else jf
            elif op == 0x45:
                pc += jt if a & k else jf
            elif op == 0x05:
                pc += k
            elif op == 0x06:
                return k
            else:
                raise AssertionError(hex(op))

    assert run(prog, frame(17, 40000, 53)) and run(prog, frame(17, 5353, 40000))
    assert not run(prog, frame(17, 40000, 123)) and not run(prog, frame(17, 40000, 8080))
    assert run(prog, frame(6, 40000, 8080)) and not run(prog, frame(6, 40000, 53))
    assert not run(build_filter([8080], 65535, False), frame(17, 40000, 53))


# -- the same traffic through the ebpf receiver -------------------------------------------------------
CLIENT_SCRIPT = """
import socket, struct, sys, time
import dns.message, dns.query
a = sys.argv[1]
for name, t in [("www.wirespan.test", "A"), ("nope.wirespan.test", "AAAA"), ("x.refused.test", "A")]:
    dns.query.udp(dns.message.make_query(name, t), a, timeout=5)
dns.query.tcp(dns.message.make_query("mail.wirespan.test", "MX"), a, timeout=5)
with socket.create_connection((a, 53), timeout=5) as s:  # pipelined on one connection
    qs = [dns.message.make_query(n, "TXT") for n in ("txt.wirespan.test", "gone.wirespan.test")]
    s.sendall(b"".join(struct.pack("!H", len(w)) + w for w in (q.to_wire() for q in qs)))
    for _ in qs:
        dns.query.receive_tcp(s, time.time() + 5)
"""


def test_real_unbound_through_the_ebpf_receiver() -> None:
    """Each process's view: the clients' CLIENT spans (dnspython over UDP, TCP and pipelined TCP
    in a child process, dig, glibc's getent whose A and AAAA go out in one sendmmsg) and unbound's
    SERVER spans of the same queries."""
    from receivers.ebpf import EbpfConfig, EbpfReceiver
    from tests.support.ebpf import needs_ebpf
    from tests.support.unbound import unbound_server

    assert not needs_ebpf(__name__).args[0], "eBPF is needed here (tests run as root on this kernel)"
    sink = Sink()
    p = ProtocolsProcessor("protocols", {}, sink)
    with unbound_server() as u:
        rx = EbpfReceiver("ebpf", EbpfConfig(ports=[53], tls={"enabled": False}), p)
        rx.start()
        try:
            py = subprocess.run([sys.executable, "-c", CLIENT_SCRIPT, u.address], capture_output=True, text=True,
                                timeout=60)
            assert py.returncode == 0, py.stderr
            dig = subprocess.run([DIG, "+tries=1", "+time=5", f"@{u.address}", "mail.wirespan.test", "MX"],
                                 capture_output=True, text=True, timeout=20)
            assert "status: NOERROR" in dig.stdout
            conf = Path(u.dir) / "resolv.conf"
            conf.write_text(f"nameserver {u.address}\noptions timeout:5 attempts:1\n")
            ge = subprocess.run(["unshare", "-m", "sh", "-c",
                                 f"mount --bind {conf} /etc/resolv.conf && getent ahosts www.wirespan.test"],
                                capture_output=True, text=True, timeout=30)
            assert "2001:db8::1" in ge.stdout and "10.1.2.3" in ge.stdout
            time.sleep(1.0)
            counters = rx.kernel_counters()
        finally:
            rx.shutdown()
        p.shutdown()
        mine = [s for s in sink.spans if s.attributes.get("server.address") == u.address]
        server = sorted((s.attributes["network.transport"], s.attributes["dns.question.name"], s.name,
                         s.attributes["dns.response.status_code"]) for s in mine
                        if s.resource.attributes.get("process.pid") == u.pid)
        client = sorted((s.attributes["network.transport"], s.attributes["dns.question.name"], s.name,
                         s.attributes["dns.response.status_code"]) for s in mine
                        if s.resource.attributes.get("process.pid") != u.pid)
    asked = sorted([("udp", "www.wirespan.test", "A", "NOERROR"), ("udp", "nope.wirespan.test", "AAAA", "NXDOMAIN"),
                    ("udp", "x.refused.test", "A", "REFUSED"), ("tcp", "mail.wirespan.test", "MX", "NOERROR"),
                    ("tcp", "txt.wirespan.test", "TXT", "NOERROR"), ("tcp", "gone.wirespan.test", "TXT", "NXDOMAIN"),
                    ("udp", "mail.wirespan.test", "MX", "NOERROR"),                       # dig
                    ("udp", "www.wirespan.test", "A", "NOERROR"), ("udp", "www.wirespan.test", "AAAA", "NOERROR")])
    assert client == asked
    assert server == asked
    for s in mine:
        own = s.resource.attributes.get("process.pid") == u.pid
        assert s.kind == (SpanKind.SERVER if own else SpanKind.CLIENT)
        assert (s.status_code == StatusCode.ERROR) == (s.attributes["dns.response.status_code"] != "NOERROR")
    names = {s.resource.attributes.get("process.executable.name") for s in mine}
    assert {"unbound", "getent"} <= names, names
    assert counters["udp_datagrams"] >= 24 and counters["udp_truncated"] == 0
    assert not {k: v for k, v in p.stats["drops"].items() if k.startswith("dns:")}, p.stats["drops"]


# -- UDP through the pcap receiver: IPv6, VLAN, padding, other ports, fragments -------------------
def test_pcap_receiver_passes_udp_dns_and_counts_the_rest(tmp_path) -> None:
    from tests.support import pcapgen as g

    def udp(sport: int, dport: int, payload: bytes) -> bytes:
        return struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload

    q6, q4 = query("v6.example", "AAAA", 1), query("v4.example", "A", 2)
    c6, s6 = "2001:db8::5", "2001:db8::53"
    frames = [
        g.ether(g.ipv6(c6, s6, udp(40001, 53, q6.to_wire()), nxt=17)),
        g.ether(g.ipv6(s6, c6, udp(53, 40001, answer(q6, "2001:db8::1").to_wire()), nxt=17)),
        g.ether(g.ipv4("10.0.0.5", "10.0.0.53", udp(40002, 53, q4.to_wire()), proto=17), vlans=[7]),
        # Ethernet padding after the datagram: the UDP length cuts it off
        g.ether(g.ipv4("10.0.0.53", "10.0.0.5", udp(53, 40002, answer(q4, rcode=3).to_wire()), proto=17))
        + b"\0" * 9,
        g.ether(g.ipv4("10.0.0.5", "10.0.0.9", udp(40003, 123, b"\x23" + b"\0" * 47), proto=17)),  # NTP
        g.ether(g.ipv4("10.0.0.5", "10.0.0.53", udp(40004, 53, b""), proto=17)),
        g.ether(g.ipv4("10.0.0.5", "10.0.0.53", udp(40005, 53, q4.to_wire()), proto=17, frag=0x2000)),
    ]
    path = tmp_path / "udp.pcap"
    with g.PcapWriter(path) as w:
        for i, f in enumerate(frames):
            w.packet(f, 1_700_000_000_000_000_000 + i * 1000)
    spans, rstats, pstats = replay(path, {})
    got = sorted((s.name, s.attributes["server.address"], s.attributes["dns.response.status_code"]) for s in spans)
    assert got == [("A", "10.0.0.53", "NXDOMAIN"), ("AAAA", s6, "NOERROR")]
    assert rstats["datagrams"] == 4
    assert rstats["drops"] == {"udp_port": 1, "udp_empty": 1, "ip_fragment": 1}
    assert pstats["udp_flows"] == 2 and pstats["drops"] == {}
    spans, rstats, _ = _replay_cfg(path, {"udp_ports": []})
    assert spans == [] and rstats["drops"]["udp_port"] == 6


def _replay_cfg(path, recv: dict):
    from receivers.pcap import PcapReceiver

    sink = Sink()
    p = ProtocolsProcessor("protocols", {}, sink)
    r = PcapReceiver("pcap/udp", {"path": str(path), "progress": False, **recv}, p)
    r.run()
    p.shutdown()
    return sink.spans, r.stats, p.stats


def test_allocation_flat_over_tcp_too() -> None:
    def cost(n: int) -> int:
        qw, rw = _big_answer(n)
        data_q, data_r = struct.pack("!H", len(qw)) + qw, struct.pack("!H", len(rw)) + rw
        conn = Conn(1, "10.0.0.5", 40000, "10.0.0.53", 53, lambda s: None)
        sess = D.Session(conn)

        mq, mr = memoryview(data_q), memoryview(data_r)

        def one() -> None:  # each message one segment (the receiver's view), read in place
            for mv, side, buf in ((mq, True, conn.client_buf), (mr, False, conn.server_buf)):
                buf.append(mv, 1)
                sess.feed(side, buf, 1)

        for _ in range(3):
            one()
        tracemalloc.start()
        one()
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        return peak

    small, big = cost(3), cost(300)
    assert big <= small + 4096, (small, big)


def test_ipv6_recorded_and_through_the_ebpf_receiver() -> None:
    """unbound on [::1]:53: dnspython (UDP, TCP) and dig, recorded with tcpdump and seen by the
    ebpf receiver at once (sockaddr_in6 peers in the kernel program)."""
    from receivers.ebpf import EbpfConfig, EbpfReceiver
    from tests.support.unbound import unbound_server

    script = ("import dns.message, dns.query\n"
              "dns.query.udp(dns.message.make_query('www.wirespan.test', 'AAAA'), '::1', timeout=5)\n"
              "dns.query.tcp(dns.message.make_query('mail.wirespan.test', 'MX'), '::1', timeout=5)\n")
    sink = Sink()
    p = ProtocolsProcessor("protocols", {}, sink)
    with unbound_server("::1") as u, tcpdump([53], udp=True) as cap:
        rx = EbpfReceiver("ebpf", EbpfConfig(ports=[53], tls={"enabled": False}), p)
        rx.start()
        try:
            subprocess.run([sys.executable, "-c", script], check=True, timeout=60)
            out = subprocess.run([DIG, "+tries=1", "+time=5", "@::1", "nope.wirespan.test", "A"], capture_output=True,
                                 text=True, timeout=20).stdout
            assert "NXDOMAIN" in out
            time.sleep(1.0)
        finally:
            rx.shutdown()
        p.shutdown()
        pid = u.pid
    asked = [("tcp", "mail.wirespan.test", "MX", "NOERROR"), ("udp", "nope.wirespan.test", "A", "NXDOMAIN"),
             ("udp", "www.wirespan.test", "AAAA", "NOERROR")]

    def shape(spans: list, keep) -> list:
        return sorted((s.attributes["network.transport"], s.attributes["dns.question.name"], s.name,
                       s.attributes["dns.response.status_code"]) for s in spans
                      if s.attributes.get("server.address") == "::1" and keep(s))

    assert shape(sink.spans, lambda s: s.resource.attributes.get("process.pid") == pid) == asked
    assert shape(sink.spans, lambda s: s.resource.attributes.get("process.pid") != pid) == asked
    spans, _, _ = replay(cap, {})
    assert shape(spans, lambda s: True) == asked
