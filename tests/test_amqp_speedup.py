"""The C frame walk (processors/protocols/amqp/_frames.c) against the pure-Python reference.

``_frames.walk(data, start)`` must decline (False) exactly the segments feed_whole's framing
check declines, and otherwise return, frame by frame, what v091.py's readers read from it
(``ref_walk`` below calls them), or None wherever a reader it stands in for would raise (the
Python path then reads the segment and raises as it always has). pika's own encoder builds
the frames (hypothesis draws their fields: names in any script, tables of every field type,
every basic property); they are then damaged (truncated, bytes flipped, inserted, deleted)
and random bytes are tried too. Then the whole stage: the same spans and drop counters with
the accelerator and without it (v091's ``_C`` set to None), over tests/support/exchanges.py's
AMQP 0-9-1 conversations whole, a byte a segment and in random segments.

The C module is imported directly, so these run under WIRESPAN_PURE_PYTHON=1 too.
``WIRESPAN_AMQP_SO=/tmp/x.so`` loads another build of it (an ASAN build, as
tests/test_http1_speedup.py describes).
"""

from __future__ import annotations

import datetime
import decimal
import os
import struct
from types import ModuleType
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from processors.protocols.amqp import v091
from processors.protocols.errors import Malformed
from tests.support import amqp_wire as w
from tests.support.driver import pieces
from tests.support.exchanges import EXCHANGES
from tests.support.speedup import Guarded, load_accelerator
from tests.support.whole import mutate, run_stage

pika = pytest.importorskip("pika")
from pika import frame, spec  # noqa: E402

#: Raise for a long local run: WIRESPAN_FUZZ_EXAMPLES=20000 pytest tests/test_amqp_speedup.py
EXAMPLES = int(os.environ.get("WIRESPAN_FUZZ_EXAMPLES", "400"))


def _load_c() -> ModuleType:
    return load_accelerator("processors.protocols.amqp._frames", "WIRESPAN_AMQP_SO")


C = _load_c()
MAX_RECORDS = 256  # _frames.c's records a call


# -- the reference: what v091.py's readers read -------------------------------------------------
def ref_walk(data: bytes, start: int = 0) -> tuple | bool | None:
    """_frames.walk's answer, from feed_whole's framing check and v091's own readers."""
    v = memoryview(data)
    n = len(v)
    frames = []
    off = start
    while off < n:
        if n - off < 7:
            return False
        ftype, channel, size = v091._FRAME.unpack_from(v, off)
        end = off + 7 + size
        if end >= n or v[end] != v091.FRAME_END or size > v091._SIZE_LIMIT[ftype]:
            return False
        frames.append((ftype, channel, off, end))
        off = end + 1
    out: list[tuple] = []
    for ftype, channel, off, end in frames:
        if ftype == v091.HEARTBEAT:
            out.append((8,))  # no record, but between a method and its header: two records
            continue
        f = v[off:end + 1]  # the frame as the readers see it
        e = end - off
        try:
            if ftype == v091.BODY:
                out.append((3, channel, e - 7))
            elif ftype == v091.HEADER:
                out.append((2, channel, *v091._read_header(f, 7, e)))
            else:
                if e - 7 < 4:
                    return None  # _method: truncated
                cm = v091._CM_AT(f, 7)
                q = 11
                if cm == (60, 40):
                    ex, q = v091._shortstr(f, q + 2, e)
                    rk, q = v091._shortstr(f, q, e)
                    out.append((4, channel, ex, rk))
                elif cm == (60, 60):
                    tag, q = v091._shortstr(f, q, e)
                    dtag, red = v091._TAG_BIT(f, q)
                    ex, q = v091._shortstr(f, q + 9, e)
                    rk, q = v091._shortstr(f, q, e)
                    out.append((5, channel, tag, dtag, red & 1, ex, rk))
                elif cm in ((60, 80), (60, 90), (60, 120)):
                    if q + 9 > e:
                        # The bits octet missing: _settle reads the frame-end octet (a struct read
                        # bounded by the frame, not by the arguments); C leaves that to Python.
                        return None
                    out.append((6, channel, cm[1], *v091._TAG_BIT(f, q)))
                elif cm == (10, 11):
                    got, _ = v091._table_get(f, q, e, v091._WANT_NAME)
                    out.append((7, channel, got.get(b"connection_name")))
                elif v091._HANDLERS.get(cm) is v091._no_span:
                    out.append((11, channel))
                else:
                    out.append((1, channel, off, end, cm))
        except (Malformed, struct.error, IndexError):
            return None
    return _messages(out)


def _messages(recs: list[tuple]) -> tuple | None:
    """A publish (4) or deliver (5), its content header (2) on the channel next and the body
    frames (3) after it on the channel that do not overrun the body, while it is not
    complete: one record (9 or 10), as _frames.c makes it (the header's fields, the body
    frames' total); methods without a span (11) one after the other on a channel, heartbeats
    between them or not: one record. More records than a call makes: None."""
    out: list[tuple] = []
    i = 0
    while i < len(recs):
        r = recs[i]
        i += 1
        if r[0] == 11 and out and out[-1] == r:
            continue  # the run goes on (a heartbeat makes no record: it never breaks one)
        if r[0] in (4, 5) and i < len(recs) and recs[i][0] == 2 and recs[i][1] == r[1]:
            head = recs[i]
            body = head[2]
            total = 0
            i += 1
            while (total < body and i < len(recs) and recs[i][0] == 3 and recs[i][1] == r[1]
                   and recs[i][2] <= body - total):
                total += recs[i][2]
                i += 1
            r = (r[0] + 5, *r[1:], *head[2:], total)
        if r[0] != 8:
            out.append(r)
    return None if len(out) > MAX_RECORDS else tuple(out)


def _same(got: Any, want: Any) -> None:
    assert got == want
    if isinstance(got, tuple) and isinstance(want, tuple):  # and the same types (True is not 1)
        assert [[type(x) for x in r] for r in got] == [[type(x) for x in r] for r in want]


# A buffer that ends at an inaccessible page: any read past a view's end is a SIGSEGV.
_GUARD = Guarded(16)
_guarded = _GUARD.view


def check(data: bytes) -> None:
    want = ref_walk(data)
    _same(C.walk(data, 0), want)
    _same(C.walk(memoryview(data), 0), want)
    # The buffer going on past the view (a frame-end there would complete a cut frame).
    _same(C.walk(memoryview(data + b"\xce" * 8)[:len(data)], 0), want)
    if len(data) <= _GUARD.size:
        _same(C.walk(_guarded(data), 0), want)
    if data:  # from an offset: what lies before is not read (offsets: the buffer's)
        _same(C.walk(b"\x01" + data, 1), ref_walk(b"\x01" + data, 1))


# -- generated frames ------------------------------------------------------------------------
_names = st.one_of(st.sampled_from(["", "orders", "amq.gen-x1", "order.created", "ctag"]),
                   st.text(max_size=30), st.text(alphabet="é€😀ab", max_size=12))
_shorts = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=20)
_u64 = st.one_of(st.integers(0, 5), st.integers(0, 2**64 - 1))
_channels = st.one_of(st.integers(0, 3), st.integers(0, 65535))
_KEYS = ["traceparent", "TraceParent", "TRACEPARENT", "traceparenx", "trace", "x-retry", "connection_name",
         "Connection_Name", "connection_nam", "product", "c" * 40, "TRACEPARENT\u00e9"[:11]]
_TP = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def _values(depth: int = 1) -> st.SearchStrategy[Any]:
    flat = st.one_of(st.sampled_from([_TP, "", "orders-svc"]), st.text(max_size=20), st.text(min_size=1025,
                     max_size=1030), st.booleans(), st.integers(-(2**63), 2**63 - 1), st.none(),
                     st.binary(max_size=10), st.just(decimal.Decimal("1.25")),
                     st.just(datetime.datetime(2024, 5, 1, 12, 0, 0)))
    if depth == 0:
        return flat
    inner = _values(depth - 1)
    return st.one_of(flat, st.lists(inner, max_size=3), st.dictionaries(st.sampled_from(_KEYS), inner, max_size=3))


_tables = st.dictionaries(st.one_of(st.sampled_from(_KEYS), _shorts), _values(), max_size=6)


@st.composite
def _method(draw: st.DrawFn) -> Any:
    k = draw(st.integers(0, 16))
    if k == 0:
        return spec.Basic.Publish(exchange=draw(_names), routing_key=draw(_names), mandatory=draw(st.booleans()))
    if k == 1:
        return spec.Basic.Deliver(draw(_names), draw(_u64), draw(st.booleans()), draw(_names), draw(_names))
    if k == 2:
        return spec.Basic.Ack(draw(_u64), draw(st.booleans()))
    if k == 3:
        return spec.Basic.Nack(draw(_u64), draw(st.booleans()), draw(st.booleans()))
    if k == 4:
        return spec.Basic.Reject(draw(_u64), draw(st.booleans()))
    if k == 5:
        return spec.Connection.StartOk(draw(_tables), "PLAIN", b"\0guest\0guest", "en_US")
    if k == 6:
        return spec.Queue.Declare(queue=draw(_names), nowait=draw(st.booleans()))
    if k == 7:
        return spec.Queue.DeclareOk(draw(_names), 0, 1)
    if k == 8:
        return spec.Basic.Consume(queue=draw(_names), consumer_tag=draw(_names))
    if k == 9:
        return spec.Basic.GetOk(draw(_u64), draw(st.booleans()), draw(_names), draw(_names), 3)
    if k == 10:
        return spec.Basic.Return(draw(st.integers(0, 65535)), draw(_names), draw(_names), draw(_names))
    if k == 11:
        return spec.Channel.Close(draw(st.integers(0, 65535)), draw(_names), 60, 40)
    if k == 12:
        return spec.Connection.Start(0, 9, draw(_tables), "PLAIN", "en_US")
    return draw(st.sampled_from([spec.Connection.Tune(2047, 131072, 60), spec.Connection.TuneOk(2047, 131072, 60),
                                 spec.Connection.Open("/"), spec.Connection.OpenOk(), spec.Channel.Open(),
                                 spec.Channel.OpenOk(), spec.Basic.GetEmpty(), spec.Confirm.Select(),
                                 spec.Basic.Get(queue="q"), spec.Channel.CloseOk()]))


_props = st.builds(
    spec.BasicProperties,
    content_type=st.none() | _shorts, content_encoding=st.none() | _shorts, headers=st.none() | _tables,
    delivery_mode=st.none() | st.integers(1, 2), priority=st.none() | st.integers(0, 9),
    correlation_id=st.none() | _names, reply_to=st.none() | _shorts, expiration=st.none() | _shorts,
    message_id=st.none() | _names, timestamp=st.none() | st.integers(0, 2**40), type=st.none() | _shorts,
    user_id=st.none() | _shorts, app_id=st.none() | _shorts, cluster_id=st.none() | _shorts)


@st.composite
def frames(draw: st.DrawFn) -> bytes:
    """A segment of whole frames, as pika encodes them."""
    out = b""
    for _ in range(draw(st.integers(1, 6))):
        k = draw(st.integers(0, 9))
        ch = draw(_channels)
        if k <= 4:
            out += frame.Method(ch, draw(_method())).marshal()
        elif k <= 6:
            out += frame.Header(ch, draw(_u64), draw(_props)).marshal()
        elif k <= 8:
            out += frame.Body(ch, draw(st.binary(max_size=40))).marshal()
        else:
            out += frame.Heartbeat().marshal()
    return out


@st.composite
def damaged(draw: st.DrawFn, segs: st.SearchStrategy[bytes]) -> bytes:
    data = draw(segs)
    for _ in range(draw(st.integers(0, 2))):
        how = draw(st.integers(0, 4))
        if not data:
            break
        i = draw(st.integers(0, len(data) - 1))
        if how == 0:
            data = data[:i]  # truncation
        elif how <= 2:  # a byte changed (framing often intact: a field breaks)
            data = data[:i] + bytes([draw(st.integers(0, 255))]) + data[i + 1:]
        elif how == 3:
            data = data[:i] + draw(st.binary(min_size=1, max_size=4)) + data[i:]
        else:
            data = data[:i] + data[i + 1:]
    return data


def _frame(ftype: int, channel: int, payload: bytes) -> bytes:
    return struct.pack(">BHI", ftype, channel, len(payload)) + payload + b"\xce"


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=frames())
@example(data=_frame(1, 1, struct.pack(">HHQ", 60, 80, 7)))  # ack without its bits octet
@example(data=_frame(1, 1, struct.pack(">HHQB", 60, 120, 7, 3)))
@example(data=_frame(1, 1, b"\x00\x3c"))  # a method shorter than its ids
@example(data=_frame(2, 1, struct.pack(">HHQH", 60, 0, 5, 0x0001) + b"\x00\x00"))  # a second flag word
@example(data=_frame(2, 1, struct.pack(">HHQH", 60, 0, 5, 0x0001)))  # ... missing
@example(data=_frame(2, 1, struct.pack(">HHQH", 60, 0, 5, 0x2000) + b"\xff\xff\xff\xff"))  # a huge table
@example(data=_frame(2, 1, struct.pack(">HHQH", 60, 0, 5, 0x0040) + b"\x00" * 7))  # timestamp cut
@example(data=_frame(2, 1, struct.pack(">HHQH", 61, 0, 5, 0)))  # not class basic
@example(data=_frame(3, 1, b"") + _frame(8, 0, b""))
@example(data=_frame(1, 0, struct.pack(">HH", 10, 11) + struct.pack(">I", 30) + b"\x0fconnection_nameS"
                     + struct.pack(">I", 9) + b"orders-sv"))  # a value overrunning its table
def test_frames_match_the_reference(data: bytes) -> None:
    check(data)


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=damaged(frames()))
def test_damaged_frames_match_the_reference(data: bytes) -> None:
    check(data)


@settings(max_examples=EXAMPLES, deadline=None)
@given(data=st.binary(max_size=120), ftype=st.sampled_from([1, 2, 3, 8, 0, 0x41, 200]))
def test_random_bytes_match_the_reference(data: bytes, ftype: int) -> None:
    check(data)
    check(_frame(ftype, 1, data))  # random payloads, whole frames
    check(_frame(1, 1, b"\x00\x3c\x00\x28" + data))  # a publish's arguments
    check(_frame(1, 1, b"\x00\x3c\x00\x3c" + data))  # a deliver's
    check(_frame(1, 0, b"\x00\x0a\x00\x0b" + data))  # a start-ok's
    check(_frame(2, 1, b"\x00\x3c\x00\x00" + data))  # a content header's


def test_messages_in_one_record() -> None:
    """A publish, its header and body frames: one record while they come together on one
    channel and the body is not overrun."""
    pub = frame.Method(1, spec.Basic.Publish(exchange="orders", routing_key="k")).marshal()
    props = spec.BasicProperties(message_id="m-1", headers={"traceparent": _TP})
    msg = pub + w.content(1, b"x" * 10, props, 12)  # bodies of 4, 4, 2
    assert C.walk(msg, 0) == ((9, 1, "orders", "k", 10, None, "m-1", _TP, 10),)
    head = frame.Header(1, 10, props).marshal()
    hb = frame.Heartbeat().marshal()
    for data in (pub + hb + head, pub + frame.Header(2, 10, props).marshal(), pub + head + _frame(3, 1, b"x" * 11),
                 pub + head + _frame(3, 2, b"x") + _frame(3, 1, b"x"), pub + head + _frame(3, 1, b"x" * 10) * 2,
                 pub + frame.Header(1, 0, props).marshal() + _frame(3, 1, b""), pub + head + hb + _frame(3, 1, b"x")):
        check(data)
        assert len(C.walk(data, 0)) >= 2
    check(pub + head + _frame(3, 1, b""))
    assert C.walk(pub + head + _frame(3, 1, b""), 0)[0][-1] == 0


def test_methods_without_a_span_in_one_record() -> None:
    """_frames.c's list of the methods without a span is v091's table's (_no_span handlers);
    a run of them on one channel is one record, a heartbeat inside it or not, and another
    channel or another record ends it."""
    for cm in v091._METHODS:
        rec = C.walk(_frame(1, 1, struct.pack(">HH", *cm)), 0)
        assert (rec == ((11, 1),)) == (v091._HANDLERS[cm] is v091._no_span), cm
    tune, tune_ok = (frame.Method(0, m).marshal() for m in (spec.Connection.Tune(2047, 131072, 60),
                                                            spec.Connection.TuneOk(2047, 131072, 60)))
    hb = frame.Heartbeat().marshal()
    flow = frame.Method(1, spec.Channel.Flow(True)).marshal()
    ack = frame.Method(0, spec.Basic.Ack(1)).marshal()
    for data, want in ((tune + hb + tune_ok + tune, ((11, 0),)), (tune + flow + tune, ((11, 0), (11, 1), (11, 0))),
                       (tune + ack + tune, ((11, 0), (6, 0, 80, 1, 0), (11, 0)))):
        check(data)
        assert C.walk(data, 0) == want
    body = _frame(3, 1, b"x")
    check(body * (MAX_RECORDS - 1) + tune * 3)  # the run's later methods make no record: not over
    assert len(C.walk(body * (MAX_RECORDS - 1) + tune * 3, 0)) == MAX_RECORDS
    assert C.walk(body * MAX_RECORDS + tune, 0) is None


def test_limits_and_the_bounds() -> None:
    hb = frame.Heartbeat().marshal()
    body = _frame(3, 1, b"x")
    assert C.walk(body * MAX_RECORDS, 0) == ((3, 1, 1),) * MAX_RECORDS
    assert C.walk(body * (MAX_RECORDS + 1), 0) is None  # more records than a call makes: Python's
    assert C.walk(hb * 1000, 0) == ()  # heartbeats make none
    assert C.walk(b"", 0) == () and C.walk(body, len(body)) == ()
    assert C.walk(body, len(body) + 1) is None and C.walk(body, -1) is None
    big = struct.pack(">BHI", 1, 1, v091.MAX_FRAME + 1)
    assert C.walk(big + b"\x00" * (v091.MAX_FRAME + 1) + b"\xce", 0) is False  # too large a method
    huge = struct.pack(">BHI", 3, 1, 0xFFFFFFFF)
    assert C.walk(huge + b"\xce", 0) is False  # a body declared far beyond the segment
    assert C.walk(memoryview(body * 2)[::2], 0) is None  # not contiguous: Python decides
    with pytest.raises(TypeError):
        C.walk(body)
    with pytest.raises(TypeError):
        C.walk("text", 0)


# -- the stage with and without the accelerator ---------------------------------------------
def _both(segs: list[tuple[bool, bytes]]) -> tuple[list, dict]:
    """(spans, drops) of ``segs`` through the stage, asserted equal with the accelerator on and off."""
    with pytest.MonkeyPatch.context() as m:
        m.setattr(v091, "_C", C)
        got = run_stage(5672, segs)
        m.setattr(v091, "_C", None)
        want = run_stage(5672, segs)
    assert got == want
    return got


def _exchange_steps(size: int) -> list[tuple[bool, bytes]]:
    return list(EXCHANGES["amqp"][0](size).steps)


@pytest.mark.parametrize("size", [0, 1, 200, 4096, 70_000])
def test_exchanges_whole(size: int) -> None:
    spans, drops = _both(_exchange_steps(size))
    assert [s[0] for s in spans] == ["publish orders", "process orders", "ack"] or size == 0
    assert not drops or size == 0


def test_exchanges_byte_by_byte() -> None:
    segs = [(fc, data[i:i + 1]) for fc, data in _exchange_steps(200) for i in range(len(data))]
    _both(segs)


def test_exchange_through_c(monkeypatch: pytest.MonkeyPatch) -> None:
    """The bench's conversation goes through C: every segment, the client's header too."""
    calls: list[int] = []
    monkeypatch.setattr(v091, "_C", type("Spy", (), {"walk": staticmethod(lambda d, s: calls.append(1)
                                                                             or C.walk(d, s))}))
    spans, drops = run_stage(5672, _exchange_steps(200))
    assert len(calls) == 7 and len(spans) == 3 and not drops


@settings(max_examples=max(50, EXAMPLES // 4), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(size=st.sampled_from([0, 200, 5000]), cuts=st.lists(st.integers(1, 3000), max_size=6))
def test_exchanges_in_random_segments(size: int, cuts: list[int]) -> None:
    segs: list[tuple[bool, bytes]] = []
    for fc, data in _exchange_steps(size):
        segs += [(fc, p) for p in pieces(data, cuts)]
    _both(segs)


def _conversation() -> list[tuple[bool, bytes]]:
    """A longer conversation: confirms, a declare, a consumer, publishes, a delivery, a get, a
    return and a refusal."""
    M = w.method
    c, s = w.handshake_client(), w.handshake_server()
    props = spec.BasicProperties(message_id="m-1", correlation_id="c-1", headers={"traceparent": _TP, "n": 3})
    return [(True, c[0]), (False, s[0]), (True, c[1] + c[2]), (False, s[1]),
            (True, M(1, spec.Confirm.Select()) + M(2, spec.Queue.Declare(queue="orders.q"))),
            (False, M(1, spec.Confirm.SelectOk())), (False, M(2, spec.Queue.DeclareOk("orders.q", 0, 0))),
            (True, M(2, spec.Basic.Consume(queue="orders.q", consumer_tag="t1"))),
            (False, M(2, spec.Basic.ConsumeOk("t1"))),
            (True, M(1, spec.Basic.Publish(exchange="orders", routing_key="k"))
             + w.content(1, b"x" * 5000, props, 4096)),
            (True, M(1, spec.Basic.Publish(exchange="nowhere", routing_key="k2", mandatory=True)) + w.content(1, b"z")),
            (False, M(1, spec.Basic.Return(312, "NO_ROUTE", "nowhere", "k2")) + w.content(1, b"z")),
            (True, M(2, spec.Basic.Publish(exchange="", routing_key="orders.q")) + w.content(2, b"")),
            (False, M(1, spec.Basic.Ack(2, True)) + frame.Heartbeat().marshal()),
            (False, M(2, spec.Basic.Deliver("t1", 1, True, "orders", "k")) + w.content(2, b"y" * 300, props)),
            (True, M(2, spec.Basic.Nack(1, False, True)) + M(2, spec.Basic.Get(queue="orders.q"))),
            (False, M(2, spec.Basic.GetOk(2, False, "orders", "k", 0)) + w.content(2, b"g", props)),
            (True, M(2, spec.Basic.Reject(2, False)) + M(2, spec.Basic.Get(queue="orders.q"))),
            (False, M(2, spec.Basic.GetEmpty())),
            (False, M(2, spec.Channel.Close(404, "NOT_FOUND - no queue", 50, 10)))]


@settings(max_examples=max(50, EXAMPLES // 2), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(0, 30), st.integers(0, 10_000), st.integers(0, 255), st.booleans()),
                max_size=4))
def test_conversation_mutated_same_with_and_without_c(mutations: list) -> None:
    """Bytes changed and segments split anywhere in a longer conversation: the same spans and drops."""
    spans, _ = _both(mutate(_conversation(), mutations))
    if not mutations:
        assert [s[0] for s in spans] == ["queue.declare orders.q", "publish amq.default", "publish orders",
                                         "publish nowhere", "process orders.q", "nack orders.q", "receive orders.q",
                                         "reject orders.q", "receive orders.q", "channel.close"]


def test_conversation_byte_by_byte() -> None:
    _both([(fc, data[i:i + 1]) for fc, data in _conversation() for i in range(len(data))])
