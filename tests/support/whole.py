"""Hold a session's ``feed_whole`` (base.py: a segment of whole messages read without a
buffer) to the buffered ``feed`` it shortcuts: the same segments through the real stage
with ``feed_whole`` on and off must give the same spans (every field) and the same drops.
"""

from __future__ import annotations

import random

import pytest

from processors.protocols.processor import ProtocolsProcessor
from service.model import EventKind, TcpEvent
from tests.support.driver import pieces

__all__ = ["cut", "mutate", "run_both_ways", "run_stage"]

CLIENT = ("10.0.0.1", 40000)
SERVER = "10.0.0.2"


class _Sink:
    def __init__(self) -> None:
        self.spans: list = []

    def consume_spans(self, spans: list) -> None:
        self.spans.extend(spans)


def run_stage(port: int, segments: list[tuple[bool, bytes]]) -> tuple[list, dict]:
    """(spans with every field, drops) of ``segments`` through a fresh stage, one connection to
    ``port``: every other segment a memoryview (the pcap receivers') and the rest bytes (eBPF's)."""
    sink = _Sink()
    stage = ProtocolsProcessor("protocols", {}, sink)
    ts = 1_000_000
    for i, (from_client, data) in enumerate(segments):
        src, dst = (CLIENT, (SERVER, port)) if from_client else ((SERVER, port), CLIENT)
        payload = memoryview(data) if i % 2 else data  # the pcap receivers' views, the eBPF one's bytes
        stage.consume_events([TcpEvent(EventKind.DATA, 1, src[0], src[1], dst[0], dst[1], ts, payload,
                                       client_is_src=from_client)])
        ts += 1000
    stage.shutdown()
    spans = [(s.name, int(s.kind), s.start_ns, s.end_ns, int(s.status_code), s.status_message,
              sorted(s.attributes.items(), key=str), s.parent_span_id) for s in sink.spans]
    return spans, dict(stage.stats["drops"])


def run_both_ways(session_cls: type, port: int, segments: list[tuple[bool, bytes]]) -> tuple[list, dict]:
    """(spans, drops) of ``segments`` through the stage, asserted equal with ``feed_whole``
    on and off; returns them for the caller's own checks."""
    got = run_stage(port, segments)
    with pytest.MonkeyPatch.context() as m:
        m.setattr(session_cls, "feed_whole", None)
        want = run_stage(port, segments)
    assert got == want
    return got


def mutate(segments: list[tuple[bool, bytes]], mutations: list[tuple[int, int, int, bool]]) -> list[tuple[bool, bytes]]:
    """The segments with hypothesis' ``(index, position, byte, split)`` mutations applied in
    turn: a segment split in two at the position, or that byte written there."""
    segs = list(segments)
    for i, pos, byte, split in mutations:
        i %= len(segs)
        fc, data = segs[i]
        pos %= len(data)
        if split:
            segs[i:i + 1] = [(fc, data[:pos]), (fc, data[pos:])] if pos else [(fc, data)]
        else:
            segs[i] = (fc, data[:pos] + bytes([byte]) + data[pos + 1:])
    return segs


def cut(segments: list[tuple[bool, bytes]], how: str, rng: random.Random) -> list[tuple[bool, bytes]]:
    """The same bytes ``whole``, a byte a segment (``bytes``), or in random pieces of 1-40 bytes."""
    if how == "whole":
        return segments
    out: list[tuple[bool, bytes]] = []
    for fc, data in segments:
        if how == "bytes":
            out += [(fc, data[i:i + 1]) for i in range(len(data))]
        else:
            out += [(fc, p) for p in pieces(data, [rng.randint(1, 40) for _ in range(len(data) // 8 + 1)])]
    return out
