"""The HTTP/2 shortcuts against the paths they shortcut (processors/protocols/http2.py, grpc.py).

Three shortcuts, each held to its reference:

- ``H2Session.feed_whole`` (a segment of whole frames read in place) against the buffered
  ``feed``: the stored captures (grpcio calls, curl against nginx) replayed through the real
  stage, and generated conversations whole, a byte a segment, in random pieces and mutated,
  give the same spans (every field) and drops with ``feed_whole`` on and off.
- The header-block memo (``_BLOCK_MEMO``, by table state and block bytes) against the
  decoder alone (``_Hpack._decode``): the same fields, the same table after every block,
  the same error for a damaged block (which is never remembered), for block sequences
  generated with the ``hpack`` encoder (indexing, Huffman, size updates, evictions) decoded
  by a first connection (memo filling) and a second one (memo answering); the memo stays
  within its byte bound.
- ``grpc.MessageCounter.one`` (one whole message counted from a view) against ``feed``.
- The C frame check (processors/protocols/_h2frames.c ``scan``) against ``_scan_whole``:
  generated frame sequences of every type, flag and shape, damaged (truncated, bytes
  flipped, random bytes appended), read from bytes, from a view of a longer buffer and from
  a view ending at a PROT_NONE page give the same answer (these skip where it is not built;
  the module is imported directly, so they run under WIRESPAN_PURE_PYTHON=1 too).
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import hpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from processors.protocols import grpc, http2
from processors.protocols.errors import ProtocolError
from processors.protocols.processor import ProtocolsProcessor
from receivers.pcap import PcapReceiver
from service.largebuf import LargeBuffer
from service.model import TcpEvent
from tests.support.h2drive import PREFACE, frame, grpc_msg
from tests.support.h2drive import settings as settings_frame
from tests.support.speedup import Guarded
from tests.support.whole import cut, mutate, run_both_ways

EXAMPLES = int(os.environ.get("WIRESPAN_FUZZ_EXAMPLES", "150"))
FIXTURES = Path(__file__).parent / "fixtures" / "http2"
PORT = 50051


# -- feed_whole against feed ----------------------------------------------------------------
class _Rec:
    def __init__(self) -> None:
        self.events: list[TcpEvent] = []

    def consume_events(self, events: list[TcpEvent]) -> None:
        for ev in events:  # the receiver may reuse its buffers: keep the bytes
            if ev.payload is not None:
                ev.payload = bytes(ev.payload)
            self.events.append(ev)


class _Sink:
    def __init__(self) -> None:
        self.spans: list = []

    def consume_spans(self, spans: list) -> None:
        self.spans.extend(spans)


def _replay(events: list[TcpEvent]) -> tuple[list, dict]:
    sink = _Sink()
    stage = ProtocolsProcessor("protocols", {}, sink)
    stage.start()
    stage.consume_events(events)
    stage.shutdown()
    spans = [(s.name, int(s.kind), s.start_ns, s.end_ns, int(s.status_code), s.status_message,
              sorted(s.attributes.items(), key=str), s.parent_span_id) for s in sink.spans]
    return spans, dict(stage.stats["drops"])


def _counting_whole(m: pytest.MonkeyPatch) -> list[int]:
    """feed_whole wrapped to count the segments it took."""
    took = [0]
    real = http2.H2Session.feed_whole

    def counted(self: http2.H2Session, from_client: bool, data: bytes, ts: int) -> bool:
        ok = real(self, from_client, data, ts)
        took[0] += ok
        return ok

    m.setattr(http2.H2Session, "feed_whole", counted)
    return took


@pytest.mark.parametrize("name", ["grpc_calls.pcap", "nginx_curl.pcap"])
def test_captures_same_spans_with_and_without_feed_whole(name: str) -> None:
    rec = _Rec()
    PcapReceiver("pcap", {"path": str(FIXTURES / name), "progress": False}, rec).run()
    with pytest.MonkeyPatch.context() as m:
        took = _counting_whole(m)
        got = _replay(rec.events)
    with pytest.MonkeyPatch.context() as m:
        m.setattr(http2.H2Session, "feed_whole", None)
        want = _replay(rec.events)
    assert got == want
    assert got[0] and took[0] > 0  # the shortcut was taken, and spans came out


def _hdr(sid: int, block: bytes, end_stream: bool = False) -> bytes:
    return frame(http2.HEADERS, 0x4 | (0x1 if end_stream else 0), sid, block)


def _grpc_conversation(calls: int, seed: int) -> list[tuple[bool, bytes]]:
    """A grpcio-like connection: preface, SETTINGS, WINDOW_UPDATE and PING around unary and
    streaming calls, each a HEADERS, DATA messages and trailers; some segments carry several
    frames, some a frame across two segments, one call reset, one padded DATA frame."""
    rng = random.Random(seed)
    ce, se = hpack.Encoder(), hpack.Encoder()
    segs: list[tuple[bool, bytes]] = [
        (True, PREFACE + settings_frame(max_concurrent_streams=100)
         + frame(http2.WINDOW_UPDATE, 0, 0, b"\0\x3e\0\x01")),
        (False, settings_frame() + frame(http2.WINDOW_UPDATE, 0, 0, b"\0\x3e\0\x01")),
        (True, settings_frame(ack=True)),
        (False, settings_frame(ack=True) + frame(http2.PING, 0, 0, b"12345678")),
        (True, frame(http2.PING, 1, 0, b"12345678")),
    ]
    for i in range(calls):
        sid = 2 * i + 1
        req = ce.encode([(":method", "POST"), (":scheme", "http"), (":path", f"/pkg.Svc/M{i % 3}"),
                         (":authority", "localhost:50051"), ("te", "trailers"),
                         ("content-type", "application/grpc"), ("user-agent", "grpc-python/1.60.0"),
                         ("grpc-timeout", f"{rng.randint(1, 99)}m")])
        msgs = [grpc_msg(bytes(rng.randrange(256) for _ in range(rng.randint(0, 40))))
                for _ in range(rng.randint(1, 3))]
        if i == 5:  # with a priority (feed_whole's _headers path) and a PRIORITY frame before it
            head = frame(http2.PRIORITY, 0, sid, b"\0\0\0\0\x10") + frame(http2.HEADERS, 0x24, sid,
                                                                         b"\0\0\0\0\x10" + req)
        else:
            head = _hdr(sid, req)
        client = head + b"".join(frame(http2.DATA, 0, sid, m) for m in msgs[:-1])
        if i == 2:  # padded: feed's path
            last = frame(http2.DATA, 0x9, sid, b"\x03" + msgs[-1] + b"\0\0\0")
        else:
            last = frame(http2.DATA, 0x1, sid, msgs[-1])
        if i % 4 == 1:
            segs += [(True, client), (True, last[:7]), (True, last[7:])]
        else:
            segs.append((True, client + last))
        if i == 3:
            segs.append((True, frame(http2.RST_STREAM, 0, sid, b"\0\0\0\x08")))
            continue
        resp = se.encode([(":status", "200"), ("content-type", "application/grpc")])
        trailers = se.encode([("grpc-status", str(i % 3)), ("grpc-message", "m%20x" if i % 3 else "")])
        body = b"".join(frame(http2.DATA, 0, sid, grpc_msg(b"r" * rng.randint(0, 30)))
                        for _ in range(rng.randint(1, 3)))
        segs.append((False, _hdr(sid, resp) + body + frame(http2.WINDOW_UPDATE, 0, 0, b"\0\0\0\x10")))
        segs.append((False, _hdr(sid, trailers, True) + frame(http2.PING, 0, 0, b"abcdefgh")))
        segs.append((True, frame(http2.WINDOW_UPDATE, 0, 0, b"\0\0\0\x10") + frame(http2.PING, 1, 0, b"abcdefgh")))
    segs.append((False, frame(http2.GOAWAY, 0, 0, b"\0\0\0\x07\0\0\0\0")))
    return segs


@pytest.mark.parametrize("how", ["whole", "bytes", "pieces"])
def test_conversations_same_spans_with_and_without_feed_whole(how: str) -> None:
    rng = random.Random(7)
    for seed in range(4):
        spans, drops = run_both_ways(http2.H2Session, PORT, cut(_grpc_conversation(8, seed), how, rng))
        assert len(spans) == 8 and not drops, (how, seed, drops)  # the reset call is a span too


def test_a_bad_frame_in_a_whole_segment_is_feeds_error() -> None:
    """A bad shape after good frames: declined, feed takes the frames before it, then raises."""
    segs = _grpc_conversation(3, 0)
    good = _hdr(9, hpack.Encoder().encode([(":method", "GET"), (":path", "/x"), (":scheme", "http")]), True)
    for bad in (frame(http2.WINDOW_UPDATE, 0, 0, b"\0\0\1"), frame(http2.PING, 0, 1, b"x" * 8),
                frame(http2.RST_STREAM, 0, 0, b"\0" * 4), frame(http2.GOAWAY, 0, 0, b"\0" * 4),
                frame(http2.DATA, 0, 0, b"d"), frame(http2.SETTINGS, 0, 0, b"\0" * 5)):
        _spans, drops = run_both_ways(http2.H2Session, PORT, [*segs[:5], (True, good + bad), *segs[5:]])
        assert drops.get("http2:bad_frame_shape", 0) + drops.get("http2:data_on_stream_0", 0) == 1, (bad, drops)
        assert drops.get("http2:goaway_unprocessed") == 1  # stream 9, taken before the bad frame


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 10_000), st.integers(0, 255), st.booleans()),
                min_size=1, max_size=6), st.integers(0, 3))
def test_mutated_conversations_same_spans_with_and_without_feed_whole(
        muts: list[tuple[int, int, int, bool]], seed: int) -> None:
    run_both_ways(http2.H2Session, PORT, mutate(_grpc_conversation(5, seed), muts))


# -- the header-block memo against the decoder ------------------------------------------------
_NAMES = [":method", ":path", ":authority", "user-agent", "content-type", "grpc-timeout", "x-a", "x-b",
          "traceparent", "cookie"]
_header = st.tuples(st.sampled_from(_NAMES), st.text("abcxyz/0123", max_size=30))
_block = st.tuples(st.lists(_header, max_size=8), st.booleans(), st.sampled_from([None, None, 0, 60, 200, 4096]))


def _encode(blocks: list[tuple[list[tuple[str, str]], bool, int | None]]) -> list[bytes]:
    enc = hpack.Encoder()
    out = []
    for headers, huffman, size in blocks:
        if size is not None:
            enc.header_table_size = size  # a size update at the next block's start
        out.append(enc.encode(headers, huffman=huffman))
    return out


def _table(hp: http2._Hpack) -> tuple:
    return list(hp.entries), hp.size, hp.maxsize, hp.exact, hp.unknown, hp.blocks


def _run(blocks: list[bytes], memo: bool) -> list:
    """Fields (or the error) and table after each block of one direction from connection start."""
    hp = http2._Hpack(True)
    out: list = []
    for b in blocks:
        fields: dict[bytes, str] = {}
        try:
            if memo:
                hp.decode(memoryview(b), fields)
            else:
                hp._decode(memoryview(b), fields, 0)
                hp.state = None
        except ProtocolError as e:
            out.append(("error", e.reason))
            hp.lose_sync()
            break
        out.append((fields, _table(hp)))
    return out


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(_block, min_size=1, max_size=12), st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)),
                                                          max_size=2))
def test_block_memo_answers_as_the_decoder(blocks: list, damage: list[tuple[int, int]]) -> None:
    encoded = _encode(blocks)
    for i, byte in damage:  # a damaged block: an error, or other fields; never remembered wrongly
        j = i % len(encoded)
        if encoded[j]:
            b = bytearray(encoded[j])
            b[i % len(b)] = byte
            encoded[j] = bytes(b)
    want = _run(encoded, memo=False)
    http2._BLOCK_MEMO.clear()
    assert _run(encoded, memo=True) == want   # filling the memo
    assert _run(encoded, memo=True) == want   # answered from it
    # another connection that diverges after the first block still gets the decoder's answers
    other = encoded[:1] + _encode([([(":path", "/elsewhere")], True, None)])
    assert _run(other, memo=True) == _run(other, memo=False)


def test_block_memo_is_bounded_and_skips_what_it_cannot_name() -> None:
    http2._BLOCK_MEMO.clear()
    enc_blocks = []
    for i in range(5000):  # ~1000-byte blocks, ~1100 bytes of table each: past the byte bound
        enc = hpack.Encoder()
        enc_blocks.append(enc.encode([(":path", f"/{i}" + "p" * 480), ("x-big", "v" * 480)], huffman=False))
    for b in enc_blocks:
        hp = http2._Hpack(True)
        hp.decode(memoryview(b), {})
        assert hp.state is not None
    assert http2._memo_held <= http2._BLOCK_MEMO_BYTES
    assert len(http2._BLOCK_MEMO) < 5000
    # a table picked up mid-stream, a block past the length bound, past the depth: decoded, not kept
    before = dict(http2._BLOCK_MEMO)
    hp = http2._Hpack(False)
    hp.decode(memoryview(hpack.Encoder().encode([(":path", "/mid")])), {})
    long_block = hpack.Encoder().encode([(":path", "/" + "q" * 2000)])
    hp = http2._Hpack(True)
    f: dict[bytes, str] = {}
    hp.decode(memoryview(long_block), f)
    assert f[b":path"].startswith("/q") and hp.state is None
    hp = http2._Hpack(True)
    enc = hpack.Encoder()
    for i in range(http2._BLOCK_MEMO_DEPTH + 3):
        hp.decode(memoryview(enc.encode([(":path", f"/d{i}")])), {})
    assert hp.state is None
    assert len(http2._BLOCK_MEMO) - len(before) <= http2._BLOCK_MEMO_DEPTH


# -- MessageCounter.one against feed ------------------------------------------------------------
@settings(max_examples=EXAMPLES * 2, deadline=None)
@given(st.binary(max_size=40), st.integers(0, 6), st.booleans())
def test_counter_one_agrees_with_feed(payload: bytes, state: int, whole: bool) -> None:
    data = grpc_msg(payload) if whole else payload
    a, b = grpc.MessageCounter(), grpc.MessageCounter()
    for c in (a, b):  # the same earlier state: a message part-way, a prefix part-way, or none
        pre = LargeBuffer(grpc_msg(b"zz")[:state])
        try:
            c.feed(pre, 0, len(pre))
        except ProtocolError:
            pass
    v = memoryview(b"\0\0" + data)
    took = a.one(v, 2, len(data))
    if not took:
        try:
            a.feed(LargeBuffer(v), 2, len(data))
        except ProtocolError:
            pass
    try:
        b.feed(LargeBuffer(v), 2, len(data))
    except ProtocolError:
        pass
    assert (a.messages, a.partial, a.broken) == (b.messages, b.partial, b.broken)
    if whole and state == 0:
        assert took


# -- the C frame check against _scan_whole ----------------------------------------------------
def _load_c() -> object | None:
    try:
        import importlib

        return importlib.import_module("processors.protocols._h2frames")
    except ImportError:
        return None


C = _load_c()
_GUARD = Guarded(40)  # 160 KiB: eight frames of 16 KiB and more
_frame_st = st.tuples(st.integers(0, 11), st.integers(0, 255), st.sampled_from([0, 1, 3, 0x80000001, 0x7FFFFFFF]),
                      st.one_of(st.sampled_from([0, 4, 5, 8, 6, 12, 16384, 16385]), st.integers(0, 40)))


def _frames_bytes(frames: list[tuple[int, int, int, int]]) -> bytes:
    out = b""
    for ftype, flags, sid, length in frames:
        out += bytes([length >> 16, (length >> 8) & 0xFF, length & 0xFF, ftype, flags]) + sid.to_bytes(4, "big")
        out += bytes(i & 0xFF for i in range(length))
    return out


@pytest.mark.skipif(C is None, reason="processors.protocols._h2frames is not built here")
@settings(max_examples=EXAMPLES * 4, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(_frame_st, max_size=8), st.integers(0, 64), st.integers(0, 255), st.integers(0, 10_000),
       st.binary(max_size=12), st.sampled_from([0, 4096, 16384]))
def test_c_scan_matches_scan_whole(frames: list, cut_at: int, byte: int, flip: int, extra: bytes,
                                   max_block: int) -> None:
    whole = _frames_bytes(frames)
    cases = [whole, whole[:max(0, len(whole) - cut_at)], whole + extra]
    if whole:
        b = bytearray(whole)
        b[flip % len(b)] = byte
        cases.append(bytes(b))
    for data in cases:
        want = http2._scan_whole(memoryview(data), max_block)
        assert C.scan(data, max_block) == want  # type: ignore[attr-defined]
        assert C.scan(memoryview(data + b"\0" * 9)[:len(data)], max_block) == want  # type: ignore[attr-defined]
        assert C.scan(_GUARD.view(data), max_block) == want  # type: ignore[attr-defined]


@pytest.mark.skipif(C is None, reason="processors.protocols._h2frames is not built here")
def test_c_scan_examples() -> None:
    wu = frame(http2.WINDOW_UPDATE, 0, 0, b"\0\0\0\1")
    hd = frame(http2.HEADERS, 0x5, 1, b"\x82")
    data = (wu + hd + frame(http2.PING, 0, 0, b"x" * 8) + frame(http2.DATA, 1, 1, b"")
            + frame(http2.PRIORITY, 0, 3, b"y" * 5))
    want = [(http2.HEADERS, 5, 1, 22, 1), (http2.DATA, 1, 1, 49, 0)]
    for scan in (C.scan, http2._scan_whole):  # type: ignore[attr-defined]
        assert scan(memoryview(data), 65536) == want
        assert scan(memoryview(data[:-1]), 65536) is None  # the last frame not whole
        assert scan(memoryview(data), 0) is None  # HEADERS past max_block
        assert scan(memoryview(b""), 65536) == []
    with pytest.raises(TypeError):
        C.scan(data)  # type: ignore[attr-defined]
