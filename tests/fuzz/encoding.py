"""The fuzz input format: one byte string that says who sends what, cut how.

Every byte string decodes (a short or odd one to fewer steps), so libFuzzer's plain byte
mutations stay valid inputs; ``mutate`` also mutates the structure (steps, directions,
segmentation, flags) and hands the bytes of one step to libFuzzer's own mutator.

Layout::

    [0]        flags (see the F_* bits)
    [1]        k, the number of segmentation entries
    [2 .. 2+k) piece sizes, used in turn for every data step (k = 0: each step whole):
               1..191 that many bytes (1: a byte a segment), 192..254 (v - 190) * 128 bytes,
               0 and 255: the rest of the step
    [next]     n, the number of steps
    n x 3      step headers: kind_dir (bit 0: sent by the client; bits 1-2: the kind, DATA,
               GAP or CLOSE), then a u16 little-endian length (DATA: its bytes; GAP: bytes lost)
    the rest   the DATA steps' bytes, in order; a step longer than what is left is cut, and
               bytes left over after the last step are one more DATA step from the other side.
"""

from __future__ import annotations

import random
import struct
from dataclasses import dataclass, field

__all__ = ["CLOSE", "DATA", "GAP", "Input", "Step", "crossover", "decode", "encode", "mutate",
           "F_ROLES", "F_PORT", "F_ALL", "F_DIR", "END_SHIFT", "END_NONE", "END_FIN", "END_RST", "END_FIN_SERVER"]

DATA, GAP, CLOSE = 0, 1, 2

#: The receiver knows the roles (TcpEvent.client_is_src is set).
F_ROLES = 0x01
#: The server listens on the protocol's default port (a detection hint); else on an unhinted one.
F_PORT = 0x02
#: The stage runs with every protocol of the table enabled (else with the one under test).
F_ALL = 0x04
#: The detect drive tells detect() the direction (else from_client=None).
F_DIR = 0x20
#: Bits 3-4: how the connection ends.
END_SHIFT = 3
END_NONE, END_FIN, END_RST, END_FIN_SERVER = 0, 1, 2, 3


@dataclass
class Step:
    from_client: bool
    kind: int = DATA
    data: bytes = b""
    gap: int = 0


@dataclass
class Input:
    flags: int = F_ROLES | F_PORT
    seg: list[int] = field(default_factory=list)
    steps: list[Step] = field(default_factory=list)
    #: ``segments()`` of the steps, as the harness cut them for this run.
    cuts: list[list[bytes]] = field(default_factory=list, repr=False)

    @property
    def end(self) -> int:
        return (self.flags >> END_SHIFT) & 3

    def nbytes(self) -> int:
        return sum(len(s.data) for s in self.steps)

    def segments(self, max_pieces: int = 0) -> list[list[bytes]]:
        """Each step's bytes cut by the segmentation entries (taken in turn across the steps);
        ``max_pieces`` > 0: once that many pieces are cut, the rest goes whole, a step a piece
        (a bound on the events of one input: a byte a segment over a whole message is what
        tests/test_segmentation.py measures)."""
        seg = self.seg
        out: list[list[bytes]] = []
        i = count = 0
        for s in self.steps:
            data = s.data if s.kind == DATA else b""
            if not data:
                out.append([])
                continue
            if not seg or (max_pieces and count >= max_pieces):
                out.append([data])
                count += 1
                continue
            ps, pos, n = [], 0, len(data)
            while pos < n:
                if max_pieces and count >= max_pieces:
                    ps.append(data[pos:])
                    count += 1
                    break
                v = seg[i % len(seg)]
                i += 1
                size = n - pos if v in (0, 255) else (v if v < 192 else (v - 190) * 128)
                ps.append(data[pos:pos + size])
                pos += size
                count += 1
            out.append(ps)
        return out

    def describe(self, max_pieces: int = 0) -> str:
        """A readable reproducer: flags, segmentation and each step."""
        lines = [f"flags=0x{self.flags:02x} (roles={'known' if self.flags & F_ROLES else 'unknown'}, "
                 f"port={'default' if self.flags & F_PORT else 'unhinted'}, "
                 f"stage={'all protocols' if self.flags & F_ALL else 'this protocol'}, "
                 f"end={['none', 'fin', 'rst', 'fin-server'][self.end]})",
                 f"segmentation={self.seg or 'whole steps'}"]
        for s, ps in zip(self.steps, self.segments(max_pieces), strict=True):
            who = "client" if s.from_client else "server"
            if s.kind == DATA:
                cuts = [len(p) for p in ps]
                lines.append(f"  {who} DATA {len(s.data)} bytes in pieces {cuts}: {s.data!r}")
            elif s.kind == GAP:
                lines.append(f"  {who} GAP {s.gap} bytes")
            else:
                lines.append(f"  {who} CLOSE")
        return "\n".join(lines)


def decode(raw: bytes) -> Input:
    n = len(raw)
    if n == 0:
        return Input(flags=0)
    flags = raw[0]
    pos = 1
    k = raw[pos] if pos < n else 0
    pos += 1
    seg = list(raw[pos:pos + k])
    pos += k
    ns = raw[pos] if pos < n else 0
    pos += 1
    heads = []
    for _ in range(ns):
        if pos + 3 > n:
            break
        kd, ln = raw[pos], raw[pos + 1] | (raw[pos + 2] << 8)
        pos += 3
        heads.append((bool(kd & 1), (kd >> 1) & 3, ln))
    steps = []
    for fc, kind, ln in heads:
        if kind == GAP:
            steps.append(Step(fc, GAP, gap=ln))
        elif kind == CLOSE:
            steps.append(Step(fc, CLOSE))
        else:  # DATA (and the unused kind 3, read as DATA)
            steps.append(Step(fc, DATA, raw[pos:pos + ln]))
            pos += ln
    if pos < n:
        last = next((s.from_client for s in reversed(steps) if s.kind == DATA), False)
        steps.append(Step(not last, DATA, raw[pos:]))
    return Input(flags, seg, steps)


def encode(inp: Input) -> bytes:
    seg = inp.seg[:255]
    steps = inp.steps[:255]
    out = bytearray([inp.flags & 0xFF, len(seg)])
    out += bytes(v & 0xFF for v in seg)
    out.append(len(steps))
    body = bytearray()
    for s in steps:
        if s.kind == DATA:
            d = s.data[:0xFFFF]
            out += struct.pack("<BH", int(s.from_client), len(d))
            body += d
        elif s.kind == GAP:
            out += struct.pack("<BH", int(s.from_client) | (GAP << 1), s.gap & 0xFFFF)
        else:
            out += struct.pack("<BH", int(s.from_client) | (CLOSE << 1), 0)
    return bytes(out + body)


_INTERESTING = [b"\x00", b"\xff", b"\x7f", b"\x80", b"\x00\x00", b"\xff\xff", b"\x7f\xff\xff\xff",
                b"\x80\x00\x00\x00", b"\xff\xff\xff\xff", b"\x00\x00\x00\x00", b"\xff\xff\xff\x7f",
                b"-1", b"-2147483648", b"4294967296", b"99999999999999999999", b"\r\n", b"\r\n\r\n", b"\0"]


def _mutate_bytes(data: bytes, rnd: random.Random, max_size: int, byte_mutator) -> bytes:
    if byte_mutator is not None and rnd.random() < 0.8:
        return bytes(byte_mutator(data, max(max_size, 1)))
    b = bytearray(data)
    op = rnd.randrange(5)
    if op == 0 or not b:  # insert an interesting token
        pos = rnd.randint(0, len(b))
        b[pos:pos] = rnd.choice(_INTERESTING)
    elif op == 1:  # overwrite with an interesting token
        tok = rnd.choice(_INTERESTING)
        pos = rnd.randrange(len(b))
        b[pos:pos + len(tok)] = tok
    elif op == 2:  # flip a bit
        pos = rnd.randrange(len(b))
        b[pos] ^= 1 << rnd.randrange(8)
    elif op == 3:  # delete a range
        pos = rnd.randrange(len(b))
        del b[pos:pos + rnd.randint(1, 16)]
    else:  # duplicate a range
        pos = rnd.randrange(len(b))
        b[pos:pos] = b[pos:pos + rnd.randint(1, 64)]
    return bytes(b[:max_size])


def mutate(raw: bytes, max_size: int, seed: int, byte_mutator=None) -> bytes:
    """One structure-aware mutation of an encoded input (``byte_mutator``: atheris.Mutate)."""
    rnd = random.Random(seed)
    if not raw or rnd.random() < 0.1:  # plain byte-level mutation of the whole encoding
        return _mutate_bytes(raw, rnd, max_size, byte_mutator)
    inp = decode(raw)
    steps = inp.steps
    data_steps = [s for s in steps if s.kind == DATA]
    r = rnd.random()
    if r < 0.5 and data_steps:  # the bytes of one step
        s = rnd.choice(data_steps)
        room = max_size - (len(raw) - len(s.data))
        s.data = _mutate_bytes(s.data, rnd, max(room, 1), byte_mutator)
    elif r < 0.65:  # the segmentation
        op = rnd.randrange(5)
        if op == 0:
            inp.seg = [1]  # a byte a segment
        elif op == 1:
            inp.seg = []
        elif op == 2:
            inp.seg = [rnd.choice((1, 2, 3, 4, 7, 8, 16, 255, rnd.randrange(256))) for _ in range(rnd.randint(1, 8))]
        elif op == 3 and inp.seg:
            inp.seg[rnd.randrange(len(inp.seg))] = rnd.randrange(256)
        else:
            inp.seg.append(rnd.randrange(256))
    elif r < 0.72:  # the flags
        inp.flags ^= 1 << rnd.randrange(8)
    elif steps:  # the steps themselves
        op = rnd.randrange(7)
        i = rnd.randrange(len(steps))
        if op == 0:
            steps.insert(i, Step(steps[i].from_client, steps[i].kind, steps[i].data, steps[i].gap))
        elif op == 1 and len(steps) > 1:
            del steps[i]
        elif op == 2:
            steps[i].from_client = not steps[i].from_client
        elif op == 3 and steps[i].kind == DATA and len(steps[i].data) > 1:  # split it
            cut = rnd.randrange(1, len(steps[i].data))
            d = steps[i].data
            steps[i].data = d[:cut]
            steps.insert(i + 1, Step(steps[i].from_client, DATA, d[cut:]))
        elif op == 4:
            steps.insert(i, Step(rnd.random() < 0.5, GAP, gap=rnd.choice((1, 2, 4, 100, 1000, 65535))))
        elif op == 5:
            steps.insert(i, Step(rnd.random() < 0.5, CLOSE))
        else:  # swap two steps
            j = rnd.randrange(len(steps))
            steps[i], steps[j] = steps[j], steps[i]
    else:
        steps.append(Step(rnd.random() < 0.5, DATA, bytes(rnd.randrange(256) for _ in range(rnd.randint(1, 8)))))
    out = encode(inp)
    return out if len(out) <= max_size else out[:max_size]


def crossover(a: bytes, b: bytes, max_out: int, seed: int) -> bytes:
    """Steps of ``a`` up to a point, then steps of ``b`` from a point (flags and cuts of ``a``)."""
    rnd = random.Random(seed)
    x, y = decode(a), decode(b)
    i = rnd.randint(0, len(x.steps))
    j = rnd.randint(0, len(y.steps))
    x.steps = x.steps[:i] + y.steps[j:]
    if rnd.random() < 0.3:
        x.seg = y.seg
    out = encode(x)
    return out[:max_out]
