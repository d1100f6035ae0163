"""Every protocol of the table, the same rule: the segmentation never changes the spans, and
total work stays linear in the bytes however the bytes are cut (base.py's contract).

A client dripping a request a byte a segment must cost the stage a constant per byte, or one
misbehaving neighbour takes a node's CPU (issue 20: 8,000 one-byte segments of a request
line cost 151 s before). Each exchange of tests/support/exchanges.py is fed through the real
``protocols`` stage whole, a byte a segment and in random small segments:

- the spans are the same (name, kind, status, attributes);
- doubling the exchange at most doubles the time of the byte-a-segment feed (2.6x allowed
  for noise; a rescan of the growing buffer gives 4x);
- a byte a segment costs at most 20x what the stage spends on the same events when it
  ignores the connection (the floor: an event's own cost). The ratio to one whole feed is
  not the measure: one call for 64 KiB against 64 Ki calls measures Python's call cost.
"""

from __future__ import annotations

import random
import time

import pytest

from processors.protocols import PROTOCOLS
from processors.protocols.base import Detection
from processors.protocols.processor import ProtocolsProcessor
from service.largebuf import LargeBuffer
from service.model import EventKind, TcpEvent
from tests.support.exchanges import EXCHANGES, Exchange

CLIENT = ("10.0.0.1", 40000)
SERVER = "10.0.0.2"
#: Events per consume_events call, as the receivers batch them.
BATCH = 64

CASES = [(name, fn) for name, fns in EXCHANGES.items() for fn in fns]
IDS = [f"{name}-{fn.__name__.strip('_')}" for name, fn in CASES]


class Sink:
    def __init__(self) -> None:
        self.spans: list = []

    def consume_spans(self, spans: list) -> None:
        self.spans.extend(spans)


def events(ex: Exchange, seg: int, seed: int = 1, known_roles: bool = True) -> list[TcpEvent]:
    """``seg`` 0: each step whole; > 0: pieces of ``seg`` bytes; < 0: random pieces of 1..-seg."""
    rnd = random.Random(seed)
    out, ts = [], 1_000_000
    for from_client, data in ex.steps:
        src, dst = (CLIENT, (SERVER, ex.port)) if from_client else ((SERVER, ex.port), CLIENT)
        i = 0
        while i < len(data):
            n = len(data) if seg == 0 else (seg if seg > 0 else rnd.randint(1, -seg))
            out.append(TcpEvent(EventKind.DATA, 1, src[0], src[1], dst[0], dst[1], ts, memoryview(data[i:i + n]),
                                client_is_src=from_client if known_roles else None))
            i += n
            ts += 1000
    return out


def run(evs: list[TcpEvent], prime: list[TcpEvent] = ()) -> tuple[float, list, dict]:
    sink = Sink()
    stage = ProtocolsProcessor("protocols", {}, sink)
    if prime:
        stage.consume_events(list(prime))
    t = time.perf_counter()
    for i in range(0, len(evs), BATCH):
        stage.consume_events(evs[i:i + BATCH])
    stage.shutdown()
    return time.perf_counter() - t, sink.spans, dict(stage.stats["drops"])


def shape(spans: list) -> list:
    return sorted((s.name, int(s.kind), int(s.status_code), sorted(s.attributes.items(), key=str)) for s in spans)


def test_every_protocol_has_an_exchange() -> None:
    assert set(EXCHANGES) == set(PROTOCOLS), "add the new protocol's exchange to tests/support/exchanges.py"


@pytest.mark.parametrize(("name", "fn"), CASES, ids=IDS)
def test_segmentation_never_changes_the_spans(name: str, fn) -> None:
    ex = fn(3000)
    _, whole, drops = run(events(ex, 0))
    assert len(whole) == ex.spans, (name, drops)
    for seg, roles in ((1, True), (-16, True), (-7, False), (1, False)):
        _, got, got_drops = run(events(ex, seg, known_roles=roles))
        assert shape(got) == shape(whole), (name, seg, roles, got_drops)


def _drip_seconds(ex: Exchange, repeats: int = 3) -> float:
    evs = events(ex, 1)
    return min(run(evs)[0] for _ in range(repeats))


@pytest.mark.parametrize(("name", "fn"), CASES, ids=IDS)
def test_a_byte_a_segment_costs_linear_time(name: str, fn) -> None:
    small, big = fn(16_000), fn(32_000)
    t_small, t_big = _drip_seconds(small), _drip_seconds(big)
    per_byte = (t_big / big.nbytes) / (t_small / small.nbytes)
    assert per_byte <= 1.3, f"{name}: doubling the bytes cost {t_big / t_small:.2f}x the time"


@pytest.mark.parametrize(("name", "fn"), CASES, ids=IDS)
def test_a_64k_drip_costs_a_constant_per_event(name: str, fn) -> None:
    ex = fn(64_000)
    evs = events(ex, 1)
    # The floor: the same events on a connection the stage already gave up on.
    junk = [TcpEvent(EventKind.DATA, 1, CLIENT[0], CLIENT[1], SERVER, ex.port, 1, memoryview(b"\0" * 70_000),
                     client_is_src=True)]
    floor = min(run(evs, prime=junk)[0] for _ in range(2))
    drip, spans, drops = min((run(evs) for _ in range(2)), key=lambda r: r[0])
    assert len(spans) == ex.spans, drops
    assert drip <= 20 * floor, f"{name}: {drip / floor:.1f}x the per-event floor"


def test_an_undetectable_drip_is_abandoned_in_linear_time() -> None:
    """Bytes no protocol claims, a byte a segment, until max_detect_bytes: counted, linear."""
    def cost(n: int) -> tuple[float, dict]:
        ex = Exchange(8080, [(True, b"G" + b"a" * n)], 0)
        t, spans, drops = run(events(ex, 1, known_roles=False))
        assert not spans
        return t, drops

    (t1, _), (t2, drops) = cost(16_000), cost(32_000)
    assert t2 / t1 <= 2.6
    assert drops.get("undetected") == 1  # counted when the connection ends
    stage = ProtocolsProcessor("protocols", {"max_detect_bytes": 4096}, Sink())
    stage.consume_events(events(Exchange(8080, [(True, b"G" + b"a" * 8000)], 0), 1))
    assert stage.stats["drops"].get("undetected") == 1


@pytest.mark.parametrize("name", list(PROTOCOLS))
def test_a_detectors_no_is_final(name: str) -> None:
    """The stage stops asking a detector that said NO about a message's start (base.py): so a
    NO must hold for every longer prefix, or a message cut at its first bytes would be lost."""
    from processors.protocols import load

    mod = load(name)
    rnd = random.Random(7)
    msgs = [b for fns in EXCHANGES.values() for fn in fns for _, b in fn(2000).steps]
    msgs += [bytes(rnd.randrange(256) for _ in range(200)) for _ in range(60)]
    for b in msgs:
        for side in (True, False, None):
            said_no = 0
            for k in range(1, min(len(b), 400) + 1):
                d = mod.detect(LargeBuffer(b[:k]), side)
                if said_no:
                    assert d == Detection.NO, (name, side, said_no, k, b[:k][:40])
                elif d == Detection.NO:
                    said_no = k
