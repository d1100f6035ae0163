"""NATS core protocol: framing, spans, verbose pairing, -ERR, detection, bad input, allocation,
and a real nats-server (Debian's) with nats-py, recorded with tcpdump and seen by the eBPF receiver."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from processors.protocols import nats as n
from processors.protocols.base import Detection
from processors.protocols.errors import ProtocolError
from service.largebuf import LargeBuffer
from service.model import SpanKind, StatusCode
from tests.support.driver import SessionDriver, peak_allocation

TP = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
INFO = b'INFO {"server_id":"NDX","version":"2.9.10","proto":1,"headers":true,"client_id":12}\r\n'


def connect(verbose: bool = False, name: str | None = "svc-a", extra: str = "") -> bytes:
    nm = f',"name":"{name}"' if name else ""
    v = "true" if verbose else "false"
    return f'CONNECT {{"verbose":{v},"pedantic":false,"lang":"python3","protocol":1{nm}{extra}}}\r\n'.encode()


def hblock(*lines: str, status: str = "") -> bytes:
    return ("NATS/1.0" + (f" {status}" if status else "") + "\r\n" + "".join(f"{x}\r\n" for x in lines)
            + "\r\n").encode()


def pub(subject: str, payload: bytes, reply: str | None = None) -> bytes:
    r = f" {reply}" if reply else ""
    return f"PUB {subject}{r} {len(payload)}\r\n".encode() + payload + b"\r\n"


def hpub(subject: str, headers: bytes, payload: bytes) -> bytes:
    return f"HPUB {subject} {len(headers)} {len(headers) + len(payload)}\r\n".encode() + headers + payload + b"\r\n"


def msg(subject: str, sid: str, payload: bytes, reply: str | None = None) -> bytes:
    r = f" {reply}" if reply else ""
    return f"MSG {subject} {sid}{r} {len(payload)}\r\n".encode() + payload + b"\r\n"


def hmsg(subject: str, sid: str, headers: bytes, payload: bytes) -> bytes:
    return (f"HMSG {subject} {sid} {len(headers)} {len(headers) + len(payload)}\r\n".encode() + headers + payload
            + b"\r\n")


class Driver(SessionDriver):
    def __init__(self, **settings: object) -> None:
        super().__init__(n, 4222, ts_step=100, **settings)


def conversation(d: Driver, step: int | None) -> None:
    d.send(False, INFO, step)
    d.send(True, connect() + b"PING\r\n", step)
    d.send(False, b"PONG\r\n", step)
    d.send(True, b"SUB orders.* 1\r\nSUB rpc.echo workers 2\r\n", step)
    d.send(True, pub("orders.created", b"x" * 300) + hpub("orders.paid", hblock(f"traceparent: {TP}", "X-Id: 7"),
                                                          b"y" * 500), step)
    d.send(False, msg("orders.created", "1", b"x" * 300) + hmsg("orders.paid", "1", hblock(f"traceparent: {TP}"),
                                                                b"y" * 500), step)
    d.send(False, msg("rpc.echo", "2", b"ping", reply="_INBOX.abc.1"), step)
    d.send(True, pub("_INBOX.abc.1", b"pong") + b"UNSUB 1\r\nUNSUB 2 5\r\n", step)


@pytest.mark.parametrize("step", [None, 1, 7])
def test_publish_deliver_subscribe_whole_and_byte_by_byte(step: int | None) -> None:
    d = Driver()
    conversation(d, step)
    names = [(s.name, s.kind) for s in d.spans]
    assert names == [("subscribe orders.*", SpanKind.CLIENT), ("subscribe rpc.echo", SpanKind.CLIENT),
                     ("publish orders.created", SpanKind.PRODUCER), ("publish orders.paid", SpanKind.PRODUCER),
                     ("process orders.created", SpanKind.CONSUMER), ("process orders.paid", SpanKind.CONSUMER),
                     ("process rpc.echo", SpanKind.CONSUMER), ("publish", SpanKind.PRODUCER),
                     ("unsubscribe orders.*", SpanKind.CLIENT), ("unsubscribe rpc.echo", SpanKind.CLIENT)]
    _, sub2, p1, p2, c1, c2, c3, reply, _, u2 = d.spans
    for s in (p1, p2, c1, c2, c3, reply):
        a = s.attributes
        assert a["messaging.system"] == "nats" and a["messaging.client.id"] == "svc-a"
    assert p1.attributes["messaging.operation.name"] == "publish"
    assert p1.attributes["messaging.operation.type"] == "send"
    assert p1.attributes["messaging.destination.name"] == "orders.created"
    assert p1.attributes["messaging.message.body.size"] == 300
    assert p2.attributes["messaging.message.body.size"] == 500  # the header block is not the body
    assert c1.attributes["messaging.operation.name"] == "process"
    assert c1.attributes["messaging.operation.type"] == "process"
    assert p2.trace_id.hex() == c2.trace_id.hex() == TP[3:35]
    assert p2.parent_span_id.hex() == TP[36:52]
    assert sub2.attributes["messaging.consumer.group.name"] == "workers"
    assert c3.attributes["messaging.consumer.group.name"] == "workers"
    assert c3.attributes["messaging.nats.reply_to"] == "_INBOX.abc.1"
    # A reply inbox is a temporary destination: out of the span name (low cardinality).
    assert reply.attributes["messaging.destination.temporary"] is True
    assert reply.attributes["messaging.destination.name"] == "_INBOX.abc.1"
    assert u2.attributes["messaging.nats.max_messages"] == 5
    assert all(s.status_code == StatusCode.UNSET for s in d.spans)
    assert not d.drops
    assert len(d.conn.client_buf) == 0 and len(d.conn.server_buf) == 0


def test_client_id_falls_back_to_infos_and_lines_are_case_blind_with_tabs() -> None:
    d = Driver()
    d.send(False, INFO)
    d.send(True, connect(name=None))
    d.send(True, b"pub\tlower.case  \t 3\r\nabc\r\n")
    (s,) = d.spans
    assert s.name == "publish lower.case" and s.attributes["messaging.client.id"] == "12"


def test_verbose_mode_pairs_ok_and_err_in_order() -> None:
    d = Driver()
    d.send(False, INFO)
    d.send(True, connect(verbose=True))
    d.send(False, b"+OK\r\n")
    d.send(True, pub("a.b", b"1") + pub("a.c", b"2") + b"SUB x 9\r\n")
    assert d.spans == []  # each waits for its +OK
    d.send(False, b"+OK\r\n-ERR 'Permissions Violation for Publish to \"a.c\"'\r\n+OK\r\n")
    a, b, sub = d.spans
    assert a.name == "publish a.b" and a.status_code == StatusCode.UNSET
    assert b.name == "publish a.c" and b.status_code == StatusCode.ERROR
    assert b.attributes["error.type"] == "permissions_violation"
    assert b.status_message == 'Permissions Violation for Publish to "a.c"'
    assert sub.name == "subscribe x"
    assert b.end_ns >= a.end_ns > a.start_ns  # they end at their answers


def test_errors_without_verbose_connect_refused_and_async_violations() -> None:
    d = Driver()
    d.send(False, INFO)
    d.send(True, connect(extra=',"user":"alice","pass":"hunter2"') + b"PING\r\n")
    d.send(False, b"-ERR 'Authorization Violation'\r\n")
    (c,) = d.spans
    assert c.name == "connect" and c.status_code == StatusCode.ERROR
    assert c.attributes["error.type"] == "authorization_violation"
    assert "hunter2" not in repr(c.attributes) and "alice" not in repr(c.attributes)
    d2 = Driver()
    d2.send(False, INFO)
    d2.send(True, connect() + b"PING\r\n")
    d2.send(False, b"PONG\r\n")
    d2.send(True, pub("secret.x", b"s"))
    d2.send(False, b"-ERR 'Permissions Violation for Publish to \"secret.x\"'\r\n-ERR 'Slow Consumer'\r\n"
                   b"-ERR 'Something New'\r\n")
    sent, refused, slow, other = d2.spans
    assert sent.name == refused.name == "publish secret.x"
    assert refused.kind == SpanKind.PRODUCER and refused.status_code == StatusCode.ERROR
    assert slow.name == "error" and slow.attributes["error.type"] == "slow_consumer"
    assert other.attributes["error.type"] == "_OTHER" and other.status_message == "Something New"


def test_no_responders_status_is_an_error_and_heartbeats_make_no_span() -> None:
    d = Driver()
    d.send(False, hmsg("_INBOX.q.1", "1", hblock(status="503"), b""))
    d.send(False, hmsg("hb.sub", "2", hblock("Nats-Last-Consumer: 0", status="100 Idle Heartbeat"), b""))
    (s,) = d.spans
    assert s.status_code == StatusCode.ERROR and s.attributes["error.type"] == "503"
    assert s.status_message == "No Responders" and s.name == "process"


def test_settings_trace_connect_and_subscriptions() -> None:
    d = Driver(trace_connect=True, trace_subscriptions=False)
    d.send(False, INFO)
    d.send(True, connect() + b"PING\r\nSUB a 1\r\nUNSUB 1\r\n")
    d.send(False, b"PONG\r\n")
    assert [s.name for s in d.spans] == ["connect"]


def test_detect() -> None:
    def det(b: bytes, fc: bool | None = None) -> Detection:
        return n.detect(LargeBuffer(b), fc)

    assert det(INFO) == Detection.RESPONSE
    assert det(INFO, True) == Detection.NO  # INFO is the server's
    assert det(connect()) == Detection.REQUEST
    assert det(pub("a.b", b"xyz")) == Detection.REQUEST
    assert det(hpub("a.b", hblock(), b"z")) == Detection.REQUEST
    assert det(msg("a.b", "1", b"xyz")) == Detection.RESPONSE
    assert det(b"SUB a.b 1\r\n") == Detection.REQUEST
    assert det(b"PUB a.b 3\r\nab") == Detection.NEED_MORE
    assert det(b"PUB a.b 3\r\nabcd\r\n") == Detection.NO       # the payload is not 3 bytes
    assert det(b"PUB a.* 3\r\nabc\r\n") == Detection.NO        # a wildcard in a publish
    assert det(b"PUB a..b 3\r\nabc\r\n") == Detection.NO
    assert det(b"HPUB a 12 12\r\nHTTP/1.1 200") == Detection.NO
    assert det(b"PING\r\n") == Detection.NO                     # too weak (Redis speaks it too)
    assert det(b"+OK\r\n", False) == Detection.NO
    assert det(b"INFO server\r\n") == Detection.NO             # Redis's INFO command
    assert det(b"CONNECT example.com:443 HTTP/1.1\r\n") == Detection.NO
    assert det(b'CONNECT {"a":1}\r\n') == Detection.NO          # no NATS option in it
    assert det(b"PU") == Detection.NEED_MORE and det(b"PUX") == Detection.NO


@pytest.mark.parametrize("data", [
    b"PUB a.b x\r\n",                  # size not a number
    b"PUB a.b 1 2 3\r\n",              # too many fields
    b"PUB a.b 3\r\nabcXY",             # payload not followed by CRLF
    b"HPUB a 20 10\r\n",               # header bytes past the total
    b"HPUB a 12 12\r\nNOTNATS/1.0\r\n\r\n\r\n",
    b"BOGUS x\r\n",
    b"UNSUB\r\n",
    b"SUB a b c d\r\n",
    b"MSG a * 1\r\nx\r\n",             # a sid is alphanumeric
    b'CONNECT {"verbose":\r\n',
    b"PUB a 99999999999\r\n",
    b"P" * (n.MAX_JSON_LINE + 10),     # a line past every bound
])
def test_malformed_input_raises_protocol_errors(data: bytes) -> None:
    d = Driver()
    with pytest.raises(ProtocolError):
        d.send(True, data)


def test_a_gap_inside_a_payload_is_stepped_over_and_one_past_it_still_gives_the_span() -> None:
    d = Driver()
    data = pub("big.one", b"z" * 10_000)
    d.send(True, data[:2000])
    assert d.session.skip_gap(True, 5000, d.ts)  # inside the payload
    d.send(True, data[7000:])
    assert [s.attributes["messaging.message.body.size"] for s in d.spans] == [10_000]
    d.send(True, data[:2000])
    assert not d.session.skip_gap(True, 50_000, d.ts)  # past it: the message's span, then resync
    assert [s.name for s in d.spans] == ["publish big.one", "publish big.one"]


def test_the_end_of_the_connection_counts_what_was_cut() -> None:
    d = Driver()
    d.send(True, connect(verbose=True))
    d.send(False, b"+OK\r\n")
    d.send(True, pub("a", b"1") + b"SUB b 1\r\n")
    d.send(True, pub("c", b"x" * 100)[:40])
    d.session.close(d.ts)
    (s,) = d.spans
    assert s.name == "publish a" and s.attributes["wirespan.incomplete"] is True
    assert sorted(d.drops) == ["incomplete_message", "no_ack"]


def _alloc(size: int) -> int:
    d = Driver()
    data = hpub("big.blob", hblock(f"traceparent: {TP}"), b"\0" * size) + hmsg("big.blob", "1", hblock(), b"\1" * size)

    def feed() -> None:
        for i in range(0, len(data), 1400):
            d.send(True, data[i:i + 1400])
            assert len(d.conn.client_buf) <= 1400  # the payload is never held

    peak = peak_allocation(feed)
    assert [s.attributes["messaging.message.body.size"] for s in d.spans] == [size, size]
    return peak


def test_allocation_is_flat_when_the_payload_grows_100x() -> None:
    small, large = _alloc(20_000), _alloc(2_000_000)
    assert large < small * 1.5 + 4096, (small, large)


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=300), st.integers(1, 40), st.booleans())
def test_fuzz_only_protocol_errors_escape(data: bytes, step: int, verbose: bool) -> None:
    d = Driver()
    d.send(True, connect(verbose=verbose))
    d.fuzz(data, step)
    d.fuzz(b"PUB a 5\r\n" + data, step)


def test_joined_mid_stream_through_the_stage() -> None:
    """No INFO/CONNECT seen (a capture started late): the next PUB or MSG starts the session."""
    from processors.protocols.processor import ProtocolsProcessor
    from service.model import EventKind, TcpEvent
    from tests.support.replay import _Collect

    sink = _Collect()
    stage = ProtocolsProcessor("protocols", {}, sink)
    cli, srv = ("10.0.0.1", 50111), ("10.0.0.2", 4222)
    stream = [(cli, srv, pub("late.x", b"abc")), (srv, cli, msg("late.x", "4", b"abc")),
              (cli, srv, b"PING\r\n"), (srv, cli, b"PONG\r\n")]
    for i, (a, b, payload) in enumerate(stream):
        stage.consume_events([TcpEvent(EventKind.DATA, (cli, srv), a[0], a[1], b[0], b[1], 1000 + i,
                                       memoryview(payload))])
    stage.shutdown()
    assert [(s.name, s.kind) for s in sink.spans] == [("publish late.x", SpanKind.PRODUCER),
                                                      ("process late.x", SpanKind.CONSUMER)]


# -- a real nats-server with nats-py ------------------------------------------------------------
CLIENT = Path(__file__).parent / "support" / "nats_client.py"


def _check_real(spans: list, role: str = "client") -> None:
    """Every operation of tests/support/nats_client.py is a span with its operation, destination
    and status (``role``: the client's view, or nats-server's under eBPF)."""
    prod = SpanKind.PRODUCER if role == "client" else SpanKind.SERVER
    cons = SpanKind.CONSUMER if role == "client" else SpanKind.SERVER
    got = {}
    for s in spans:
        got.setdefault((s.name, s.kind, s.status_code), []).append(s)

    def one(name: str, kind: SpanKind, status: StatusCode = StatusCode.UNSET) -> list:
        hit = got.get((name, kind, status), [])
        assert hit, (name, kind, status, sorted((k[0], int(k[1]), int(k[2])) for k in got))
        return hit

    one("subscribe orders.*", SpanKind.CLIENT if role == "client" else SpanKind.SERVER)
    (q,) = one("subscribe rpc.echo", SpanKind.CLIENT if role == "client" else SpanKind.SERVER)
    assert q.attributes["messaging.consumer.group.name"] == "workers"
    (created,) = one("publish orders.created", prod)
    assert created.attributes["messaging.message.body.size"] == 1000
    assert created.attributes["messaging.client.id"] == "pub-svc"
    (paid,) = one("publish orders.paid", prod)
    assert paid.attributes["messaging.message.body.size"] == 70_000
    assert paid.trace_id.hex() == "4bf92f3577b34da6a3ce929d0e0e4736"
    (dpaid,) = one("process orders.paid", cons)
    assert dpaid.trace_id.hex() == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert dpaid.attributes["messaging.client.id"] == "sub-svc"
    one("process orders.created", cons)
    one("publish rpc.echo", prod)
    one("process rpc.echo", cons)
    one("publish nobody.home", prod)
    nores = one("process", cons, StatusCode.ERROR)
    assert nores[0].attributes["error.type"] == "503"
    one("publish secret.plans", prod, StatusCode.ERROR)
    one("publish orders.verbose", prod)
    one("unsubscribe orders.*", SpanKind.CLIENT if role == "client" else SpanKind.SERVER)
    one("unsubscribe rpc.echo", SpanKind.CLIENT if role == "client" else SpanKind.SERVER)
    (refused,) = one("connect", SpanKind.CLIENT if role == "client" else SpanKind.SERVER, StatusCode.ERROR)
    assert refused.attributes["error.type"] == "authorization_violation"
    assert "wonderland" not in repr([s.attributes for s in spans])


def _run_client(url: str) -> None:
    r = subprocess.run([sys.executable, str(CLIENT), url], capture_output=True, timeout=90)
    assert r.returncode == 0 and r.stdout.startswith(b"ok"), r.stderr[-2000:]


def test_real_nats_server_with_nats_py_recorded_and_replayed() -> None:
    pytest.importorskip("nats")
    from tests.support.capture import tcpdump
    from tests.support.nats_server import nats_server
    from tests.support.replay import replay

    with nats_server() as srv, tcpdump([srv.port]) as pcap:
        _run_client(srv.url)
    spans, _, stats = replay(pcap)
    _check_real(spans)
    assert stats["protocols"] == {"nats": 4}
    assert not stats["drops"], stats["drops"]


@pytest.mark.root
def test_real_nats_server_through_the_ebpf_receiver() -> None:
    """The same client under the eBPF receiver: each process's view (nats-py's CLIENT/PRODUCER/
    CONSUMER spans, nats-server's SERVER spans). The run cap is raised for this port: a NATS
    publisher is answered by nothing, so its run of bytes grows past the 64 KiB default."""
    pytest.importorskip("nats")
    from tests.support.ebpf import needs_ebpf

    if needs_ebpf(__name__).args[0]:
        pytest.skip("eBPF unavailable here (reason printed)")
    from tests.support.ebpf import traced
    from tests.support.nats_server import nats_server

    with nats_server() as srv, traced([srv.port]) as (_rx, sink):
        _run_client(srv.url)
    client = [s for s in sink.spans if s.resource.attributes.get("process.pid") != srv.pid]
    server = [s for s in sink.spans if s.resource.attributes.get("process.pid") == srv.pid]
    _check_real(client, "client")
    _check_real(server, "server")


def _segments() -> list[tuple[bool, bytes]]:
    """Verbose mode, subscriptions, PUB/HPUB/MSG/HMSG (a 503 status), a request's reply,
    +OK/-ERR, an empty line."""
    return [(False, INFO), (True, connect(verbose=True) + b"PING\r\n"), (False, b"+OK\r\nPONG\r\n"),
            (True, b"SUB orders.* 1\r\nSUB rpc.echo workers 2\r\n"),
            (True, pub("orders.created", b"x" * 300) + hpub("orders.paid", hblock(f"traceparent: {TP}", "X-Id: 7"),
                                                            b"y" * 500)),
            (False, msg("orders.created", "1", b"x" * 300)
             + hmsg("orders.paid", "1", hblock(f"traceparent: {TP}", status="503"), b"y" * 500)),
            (False, msg("rpc.echo", "2", b"ping", reply="_INBOX.abc.1") + b"+OK\r\n-ERR 'x'\r\n"),
            (True, pub("_INBOX.abc.1", b"pong") + b"UNSUB 1\r\nUNSUB 2 5\r\n"),
            (False, b"+OK\r\n+OK\r\n\r\n")]


@settings(max_examples=150, deadline=None)
@given(st.lists(st.integers(1, 900), max_size=8), st.integers(0, 8))
def test_cuts_anywhere_give_the_same_spans(cuts: list, which: int) -> None:
    """The cursor walk (a line's end found in its chunk, or across chunks by the buffer)
    gives the same spans and drops wherever a segment is cut (times left out: the driver's
    clock steps with each send)."""
    def run(split: bool) -> list:
        from tests.support.driver import send_cut
        d = Driver()
        send_cut(d.send, _segments(), which if split else -1, cuts)
        d.session.close(d.ts)
        return [(x.name, x.status_code, x.status_message, sorted(x.attributes.items(), key=str)) for x in d.spans] \
            + [d.drops]
    got = run(True)
    assert got == run(False)
    assert len(got) == 9
