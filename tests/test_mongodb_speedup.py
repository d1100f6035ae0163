"""The C OP_MSG reader (processors/protocols/_bson.c) against the pure-Python reference.

_bson.c's ``op_msg`` must give exactly what mongodb._op_msg gives (the flags and the body
document's fields: the first key and its value, the wanted names' first values, of the same
types) for every message the reference reads, and None for every one it raises on, so the
session gives the same spans and drop counts with the accelerator on or off. hypothesis
builds OP_MSG requests and replies (document sequences before and after the body, a
checksum, every BSON type at the top level, wanted, near-wanted, duplicate, non-UTF-8 and
over-long keys), then damages them (truncation, byte flips, inserted and deleted bytes,
hostile declared sizes) and adds random bytes. Each is read from bytes, from a view, from
a view of a longer buffer (bytes before and after the message), and from a view ending at
a PROT_NONE page.

The whole stage is held too: the conversations of tests/test_mongodb.py and
tests/support/exchanges.py (whole, a byte a segment, in random pieces, mutated) give the
same spans and drops with ``_C``, with ``_C`` None and with ``feed_whole`` off.

The C module is imported directly, so these run under WIRESPAN_PURE_PYTHON=1 too.
``WIRESPAN_BSON_SO=/tmp/x.so`` loads another build (the ASAN check, as
tests/test_http1_speedup.py describes).
"""

from __future__ import annotations

import os
import random
import struct
from types import ModuleType
from typing import Any

import bson
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from processors.protocols import mongodb as m
from processors.protocols.errors import ProtocolError
from tests.support.exchanges import EXCHANGES
from tests.support.speedup import Guarded, damage, load_accelerator
from tests.support.whole import cut, mutate, run_stage
from tests.test_mongodb import _conversation, op_msg

#: Raise for a long local run: WIRESPAN_FUZZ_EXAMPLES=20000 pytest tests/test_mongodb_speedup.py
EXAMPLES = int(os.environ.get("WIRESPAN_FUZZ_EXAMPLES", "400"))


def _load_c() -> ModuleType:
    return load_accelerator("processors.protocols._bson", "WIRESPAN_BSON_SO")


C = _load_c()


# -- the reference: what the pure-Python path decides ---------------------------------------
def ref(data: Any, ms: int, length: int, reply: bool) -> tuple[int, dict] | None:
    """``_op_msg``'s result, or None where it raises (the errors are its own: C leaves them)."""
    try:
        return m._op_msg(memoryview(data), ms, length, reply)
    except ProtocolError:
        return None


def _shape(r: tuple[int, dict] | None) -> object:
    """A result compared with its types (True is not 1, 1.0 is not 1) and NaN equal to itself."""
    if r is None:
        return None
    flags, f = r
    return type(flags), flags, [(k, repr(v), type(v), [type(x) for x in v] if type(v) is tuple else None)
                                for k, v in f.items()]


_GUARD = Guarded(8)

#: What a buffer might go on with past the message: a read beyond ``length`` would find a
#: document's terminator, a whole further section, or a key's NUL the reference never saw.
_FENCES = (b"\0", b"\0" * 8, b"\x00\x05\x00\x00\x00\x00", b"x" * 40)


def check(msg: bytes, reply: bool) -> tuple[int, dict] | None:
    want = ref(msg, 0, len(msg), reply)
    shape = _shape(want)
    assert _shape(C.op_msg(msg, 0, len(msg), reply)) == shape
    assert _shape(C.op_msg(memoryview(msg), 0, len(msg), reply)) == shape
    for lead in (b"", b"\x07" * 5):
        for fence in _FENCES:
            data = lead + msg + fence
            assert _shape(ref(data, len(lead), len(msg), reply)) == shape
            assert _shape(C.op_msg(memoryview(data), len(lead), len(msg), reply)) == shape
    if len(msg) <= _GUARD.size:
        assert _shape(C.op_msg(_GUARD.view(msg), 0, len(msg), reply)) == shape
    return want


# -- generated messages -----------------------------------------------------------------------
def _raw_doc(items: list[tuple[str, Any]]) -> bytes:
    """A document of these elements in this order, duplicates kept (a dict would merge them);
    the key "\xffk" is written as the byte 0xff and "k": not UTF-8."""
    raw = b"".join(bson.encode({k: v})[4:-1].replace("\xffk".encode(), b"\xffk") for k, v in items)
    return struct.pack("<i", len(raw) + 5) + raw + b"\0"


def _raw_msg(items: list[tuple[str, Any]], flags: int = 0) -> bytes:
    body = struct.pack("<I", flags) + b"\0" + _raw_doc(items)
    return struct.pack("<iiii", 16 + len(body), 1, 1, m.OP_MSG) + body


_KEYS = ["ok", "$db", "code", "errmsg", "codeName", "$err", "collection", "insert", "find", "getMore", "n",
         "OK", "oj", "o\xe9", "$dc", "collectioN", "x" * 200, "", "\xffk"]
_VALUES = st.one_of(st.integers(-2 ** 31, 2 ** 31 - 1), st.integers(2 ** 40, 2 ** 62), st.floats(),
                    st.text(max_size=20), st.text(min_size=500, max_size=520), st.booleans(), st.none(),
                    st.just({"a": 1}), st.just([1, "b"]), st.just(b"\x01"), st.just(bson.Regex("a", "i")),
                    st.just(bson.ObjectId(b"123456789012")), st.just(bson.Timestamp(1, 2)),
                    st.just(bson.MinKey()), st.just(bson.MaxKey()), st.just(bson.Code("x")),
                    st.just(bson.Code("x", {"a": 1})), st.just(bson.Decimal128("1.5")),
                    st.just(bson.DBRef("c", 1)), st.just(bson.Int64(7)))


@st.composite
def document(draw: st.DrawFn) -> bytes:
    return _raw_doc(draw(st.lists(st.tuples(st.sampled_from(_KEYS), _VALUES), max_size=7)))


@st.composite
def message(draw: st.DrawFn) -> bytes:
    flags = draw(st.sampled_from([0, m.FLAG_MORE_TO_COME, m.FLAG_EXHAUST, m.FLAG_CHECKSUM, 1 << 3, 1 << 31]))
    seqs = [b"\1" + struct.pack("<i", 4 + 6 + len(d)) + b"ident\0" + d
            for d in draw(st.lists(document(), max_size=2))]
    before = draw(st.integers(0, len(seqs)))
    body = b"".join(seqs[:before]) + b"\0" + draw(document()) + b"".join(seqs[before:])
    if flags & m.FLAG_CHECKSUM:
        body += b"\xaa\xbb\xcc\xdd"
    return struct.pack("<iiiiI", 20 + len(body), 1, 0, m.OP_MSG, flags) + body


@st.composite
def damaged(draw: st.DrawFn) -> bytes:
    return damage(draw, draw(message()), _hostile_size, _type_byte)


def _hostile_size(draw: st.DrawFn, data: bytes, i: int) -> bytes:
    """A hostile declared size (a section's, a document's, a string's...)."""
    size = draw(st.sampled_from([-1, -5, 0, 4, 5, 0x7FFFFFFF, m.MAX_DOCUMENT + 1024, m.MAX_DOCUMENT + 1025]))
    return data[:i] + struct.pack("<i", size) + data[i + 4:]


def _type_byte(draw: st.DrawFn, data: bytes, i: int) -> bytes:
    return data[:i] + bytes([draw(st.sampled_from([0, 1, 2, 3, 4, 0x0B, 0x0C, 0x13, 0x14, 0x7F, 0xFF]))]) + data[i + 1:]


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(msg=damaged(), reply=st.booleans())
@example(msg=op_msg(1, 0, {"insert": "orders", "$db": "shop", "documents": [{"_id": 1}]}), reply=False)
@example(msg=op_msg(2, 1, {"n": 1, "ok": 1.0}), reply=True)
@example(msg=op_msg(3, 1, {"ok": 0.0, "errmsg": "E11000 dup", "code": 11000, "codeName": "DuplicateKey"}),
         reply=True)
@example(msg=op_msg(4, 0, {"getMore": bson.Int64(5), "collection": "c", "$db": "x"}, checksum=True), reply=False)
@example(msg=op_msg(5, 0, {"update": "u", "$db": "s"}, seq=("updates", [{"q": {}}])), reply=False)
@example(msg=_raw_msg([("ok", 1), ("ok", 2.0), ("$db", "a"), ("$db", "b"), ("code", 3)]), reply=True)
@example(msg=_raw_msg([("ok", 1), ("ok", 2.0), ("$db", "a"), ("$db", "b"), ("collection", "c")]), reply=False)
def test_messages_match_the_reference(msg: bytes, reply: bool) -> None:
    check(msg, reply)


@settings(max_examples=EXAMPLES, deadline=None)
@given(data=st.binary(max_size=120), reply=st.booleans(),
       prefix=st.sampled_from([b"", struct.pack("<iiiiI", 0, 0, 0, m.OP_MSG, 0),
                               struct.pack("<iiiiIB", 0, 0, 0, m.OP_MSG, 0, 0)]))
def test_random_bytes_match_the_reference(data: bytes, reply: bool, prefix: bytes) -> None:
    check(prefix + data, reply)


@pytest.mark.parametrize("base", [
    op_msg(1, 0, {"insert": "orders", "$db": "shop", "documents": [{"_id": 1, "n": "x" * 40}]}),
    op_msg(2, 1, {"ok": 0.0, "errmsg": "bad 'x'", "code": 2, "codeName": "BadValue"}, checksum=True),
    op_msg(3, 0, {"find": "users", "filter": {"re": bson.Regex("a.*b", "i")}, "$db": "shop"},
           seq=("documents", [{"a": 1}])),
])
def test_every_truncation_and_byte_matches_the_reference(base: bytes) -> None:
    for reply in (False, True):
        for i in range(len(base) + 1):
            check(base[:i], reply)
        for i in range(len(base)):
            for byte in (0x00, 0x01, 0x02, 0x03, 0x05, 0x0B, 0x10, 0x7F, 0x80, 0xFF):
                check(base[:i] + bytes([byte]) + base[i + 1:], reply)


def test_takes_what_the_reference_reads() -> None:
    """Not only equal when it answers: it answers for every message the reference reads."""
    for msg, reply in [(op_msg(1, 0, {"insert": "o", "$db": "s", "documents": []}), False),
                       (op_msg(2, 1, {"n": 1, "ok": 1.0}), True),
                       (op_msg(3, 0, {}), False),
                       (op_msg(4, 1, {"x" * 300: "long", "ok": bson.Int64(1)}, checksum=True), True),
                       (_raw_msg([("\xffk", 1), ("ok", True), ("ok", 0), ("errmsg", "e" * 600)]), True)]:
        got = C.op_msg(msg, 0, len(msg), reply)
        assert got is not None and _shape(got) == _shape(ref(msg, 0, len(msg), reply))


def test_the_limits_and_constants() -> None:
    """The flags, the section size bound and the 512-byte string cut are mongodb.py's."""
    assert C.KNOWN_FLAGS == m._KNOWN_FLAGS and C.MAX_DOCUMENT == m.MAX_DOCUMENT and C.MAX_STRING == 512
    for n in (511, 512, 513, 600):
        got = check(op_msg(1, 0, {"find": "c" * n, "$db": "d"}), False)
        assert got is not None and len(got[1][""][1]) == min(n, 512)
    doc = bson.encode({"a": 1})
    for pad in (m.MAX_DOCUMENT + 1024 - len(doc), m.MAX_DOCUMENT + 1025 - len(doc)):
        big = struct.pack("<iiiiI", 0, 1, 0, m.OP_MSG, 0) + b"\1" + struct.pack("<i", len(doc) + pad) + b"\0" * 4
        check(big, False)  # a section's declared size at and past the bound, not all here


def test_the_arguments() -> None:
    msg = op_msg(1, 1, {"ok": 1.0})
    assert C.op_msg(memoryview(msg + msg)[::2], 0, len(msg), True) is None  # not contiguous: Python reads it
    assert C.op_msg(msg, 1, len(msg), True) is None  # past the buffer's end
    assert C.op_msg(msg, -1, len(msg), True) is None
    assert C.op_msg(msg, 0, -1, True) is None
    assert C.op_msg(msg, 0, len(msg) + 1, True) is None
    assert C.op_msg(bytearray(msg), 0, len(msg), True) == (0, {"": ("ok", 1.0), "ok": 1.0})
    with pytest.raises(TypeError):
        C.op_msg(msg, 0, len(msg))
    with pytest.raises(TypeError):
        C.op_msg(msg, "0", len(msg), True)
    assert C.op_msg("text", 0, 4, True) is None  # not a buffer: Python decides


# -- the whole stage with and without the accelerator -------------------------------------
def _three_ways(segments: list[tuple[bool, bytes]]) -> tuple[list, dict]:
    """(spans, drops) through the stage, asserted equal with ``_C``, with ``_C`` None, and
    with ``feed_whole`` off (the buffered path alone)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(m, "_C_OP_MSG", C.op_msg)
        got = run_stage(27017, segments)
        mp.setattr(m, "_C_OP_MSG", None)
        assert run_stage(27017, segments) == got
        mp.setattr(m.Session, "feed_whole", None)
        assert run_stage(27017, segments) == got
    return got


def _conversations() -> list[list[tuple[bool, bytes]]]:
    return [_conversation()] + [make(size).steps for make in EXCHANGES["mongodb"] for size in (0, 200, 5000)]


@pytest.mark.parametrize("how", ["whole", "bytes", "random"])
def test_the_stage_gives_the_same_spans(how: str) -> None:
    rng = random.Random(7)
    for segs in _conversations():
        spans, _drops = _three_ways(cut(segs, how, rng))
        assert spans


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 11), st.integers(0, 10_000), st.integers(0, 255), st.booleans()),
                max_size=3))
def test_the_stage_gives_the_same_spans_mutated(mutations: list) -> None:
    _three_ways(mutate(_conversation(), mutations))
