"""Feed one protocol ``Session`` directly, as the protocols stage would, for unit tests.

No detection and no receiver: ``send`` appends the bytes (in chunks of ``step``)
to the direction's buffer and calls ``feed`` after each chunk, so a parser is
tested whole, byte by byte, or at any cut. ``ProtocolError`` is left to the
test (``pytest.raises``); spans and ``conn.drop`` reasons are collected.
(tests/support/dbdrive.py is the database tests' variant that also plays the
stage's error handling and re-feeds recorded captures.)
"""

from __future__ import annotations

import contextlib
import gc
import tracemalloc
from collections.abc import Callable
from types import ModuleType

from processors.protocols.base import Conn
from processors.protocols.errors import ProtocolError
from service.model import Span

__all__ = ["SessionDriver", "peak_allocation", "pieces"]


def peak_allocation(fn: Callable[[], object]) -> int:
    """Peak bytes Python allocates while ``fn`` runs (tracemalloc): the zero-copy tests compare
    this for a payload and the same payload 100x larger."""
    gc.collect()
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def pieces(data: bytes, sizes: list[int]) -> list[bytes]:
    """``data`` in pieces of the successive ``sizes`` (those that still leave bytes over),
    then the rest: one segment's worth of a message split at arbitrary points."""
    out, pos = [], 0
    for n in sizes:
        if pos + n < len(data):
            out.append(data[pos:pos + n])
            pos += n
    out.append(data[pos:])
    return out


class SessionDriver:
    def __init__(self, mod: ModuleType, server_port: int, ts_step: int = 100, **settings: object) -> None:
        self.spans: list[Span] = []
        self.drops: list[str] = []
        self.conn = Conn(1, "127.0.0.1", 50000, "127.0.0.1", server_port, self.spans.append,
                         lambda _proto, reason: self.drops.append(reason), settings=mod.Settings(**settings),
                         protocol=mod.NAME)
        self.session = mod.Session(self.conn)
        self.ts = 0
        self.ts_step = ts_step

    def send(self, from_client: bool, data: bytes, step: int | None = None) -> None:
        buf = self.conn.client_buf if from_client else self.conn.server_buf
        step = step or len(data) or 1
        for i in range(0, len(data), step):
            self.ts += self.ts_step
            buf.append(data[i:i + step], self.ts)
            self.session.feed(from_client, buf, self.ts)

    def fuzz(self, data: bytes, step: int) -> None:
        """Feed ``data`` from both sides: a ``ProtocolError`` is an allowed answer (the stage
        counts it), any other exception fails the calling test."""
        for side in (True, False):
            with contextlib.suppress(ProtocolError):
                self.send(side, data, step)


def mutate_conversations(make: Callable[[], SessionDriver], convs: list, seed: int, rounds: int = 2000) -> None:
    """``rounds`` random mutations of ``convs`` (tests/fuzz/seeds.py's conversations: lists of
    (from_client, bytes)), each fed at a random step to a fresh driver: only ``ProtocolError``
    may leave the session, and it is answered as the stage answers it (clear that direction,
    resynchronise with a gap). Anything else propagates and fails the calling test."""
    import random

    rnd = random.Random(seed)
    for _ in range(rounds):
        d = make()
        for fc, data in rnd.choice(convs):
            b = bytearray(data)
            if rnd.random() < 0.4 and b:
                for _ in range(rnd.randint(1, 3)):
                    i = rnd.randrange(len(b))
                    b[i:i + rnd.randint(0, 3)] = rnd.randbytes(rnd.randint(0, 3))
            try:
                d.send(fc, bytes(b), rnd.choice((1, 5, 64, 4096)))
            except ProtocolError:
                (d.conn.client_buf if fc else d.conn.server_buf).reset()
                d.session.gap(fc, d.ts)
        d.session.close(d.ts)


def send_cut(send: Callable[[bool, bytes], object], segments: list[tuple[bool, bytes]], which: int,
             cuts: list[int]) -> None:
    """``send(from_client, data)`` each segment, segment ``which`` cut at ``cuts`` (hypothesis'
    offsets, clamped; -1 cuts none): a parser must give the same spans wherever bytes split."""
    for i, (fc, data) in enumerate(segments):
        if i == which:
            pos = 0
            for c in sorted({min(c, len(data)) for c in cuts}):
                send(fc, data[pos:c])
                pos = c
            send(fc, data[pos:])
        else:
            send(fc, data)
