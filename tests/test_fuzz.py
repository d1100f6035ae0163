"""The fuzz harness (tests/fuzz/, ``python -m bench fuzz``): its input format, that it catches
what it must, and every protocol of the table fuzzed for a few seconds (CI's bounded run).

The bounded run is coverage-guided when atheris is installed (the test extras), else the same
mutator unguided; any escape, internal_error, slow input or memory growth fails it, naming the
saved input (``python -m bench fuzz <protocol> --repro <file>`` replays it).
"""

from __future__ import annotations

import argparse
import logging
import types

import pytest

from processors import protocols as protocols_pkg
from processors.protocols import PROTOCOLS
from processors.protocols.base import Detection, ProtocolSettings, Session
from processors.protocols.errors import Malformed
from tests.fuzz import campaign, encoding, seeds
from tests.fuzz.encoding import DATA, GAP, Input, Step, decode, encode
from tests.fuzz.harness import F_DIRECT, Target


@pytest.fixture(autouse=True)
def _stage_logger_back():
    """A Target hooks the stage's logger; later tests (caplog) must find it as it was."""
    lg = logging.getLogger("processors.protocols.processor")
    state = (lg.level, lg.propagate, list(lg.handlers))
    yield
    lg.setLevel(state[0])
    lg.propagate = state[1]
    lg.handlers[:] = state[2]


#: Seconds each protocol is fuzzed in CI (two at a time): 10 protocols, about 30 s in all on an idle machine.
CI_SECONDS = 3.0


def test_every_byte_string_decodes_and_encoding_round_trips() -> None:
    inp = Input(0x23, [1, 0, 200, 255], [Step(True, DATA, b"abc"), Step(False, GAP, gap=77),
                                          Step(False, DATA, b"x" * 300)])
    back = decode(encode(inp))
    assert (back.flags, back.seg, back.steps) == (inp.flags, inp.seg, inp.steps)
    for raw in (b"", b"\x01", b"\xff\xff", bytes(range(256)), b"\x00\x00\x05\x01\xff\xff"):
        d = decode(raw)
        assert sum(len(p) for ps in d.segments() for p in ps) == d.nbytes()
    for seed in range(200):
        out = encoding.mutate(encode(inp), 512, seed)
        assert len(out) <= 512
        decode(out)


def test_segmentation_cuts_and_the_piece_bound() -> None:
    inp = Input(0, [1, 2, 0], [Step(True, DATA, b"abcdefgh"), Step(False, DATA, b"ijkl")])
    assert inp.segments() == [[b"a", b"bc", b"defgh"], [b"i", b"jk", b"l"]]
    assert inp.segments(max_pieces=2) == [[b"a", b"bc", b"defgh"], [b"ijkl"]]
    assert Input(0, [193], [Step(True, DATA, b"z" * 1000)]).segments() == [[b"z" * 384, b"z" * 384, b"z" * 232]]


def test_seeds_for_every_protocol_of_the_table_pass() -> None:
    for name in PROTOCOLS:
        t = Target(name)
        ss = seeds.seeds(name)
        assert len(ss) >= 10, name
        for raw in ss:
            assert t.run(raw) == [], (name, decode(raw).describe())
        assert t.spans > 0, name  # the seeds are real conversations


def _planted() -> types.ModuleType:
    """A protocol module with the bugs the harness must catch."""

    def detect(buf, from_client):
        if len(buf) >= 2 and buf.u8_at(0) == 0x42:
            return [][buf.u8_at(1)]  # IndexError out of detect
        return Detection.REQUEST if len(buf) else Detection.NEED_MORE

    class S(Session):
        def feed(self, from_client, buf, ts_ns):
            b = buf.bytes_at(0, len(buf))
            if b.startswith(b"bad"):
                raise Malformed("planted")  # allowed
            if b.startswith(b"bug"):
                {}["missing"]  # KeyError: a bug
            buf.release(len(buf))

    return types.SimpleNamespace(NAME="redis", DEFAULT_PORTS=frozenset({6379}), Settings=ProtocolSettings,
                                 detect=detect, Session=S)


def test_the_harness_catches_escapes_internal_errors_and_bad_detectors(monkeypatch) -> None:
    monkeypatch.setitem(protocols_pkg._cache, "redis", _planted())
    t = Target("redis")

    def run(flags: int, data: bytes) -> set[tuple[str, str]]:
        return {(f.kind, f.drive) for f in t.run(encode(Input(flags, [], [Step(True, DATA, data)])))}

    assert run(0x03, b"fine") == set()
    assert run(0x03, b"bad") == set()                       # a ProtocolError is an answer
    assert run(0x03 | F_DIRECT, b"bug") == {("escape", "session")}
    assert run(0x03, b"bug") == {("internal_error", "stage")}
    assert run(0x03, b"\x42\x07") == {("internal_error", "stage")}     # the stage ran the detector
    assert run(0x03 | F_DIRECT, b"\x42\x07") == {("detect", "detect")}
    fails = t.run(encode(Input(0x03 | F_DIRECT, [], [Step(True, DATA, b"bug")])))
    assert "KeyError" in fails[0].detail and "test_fuzz.py" in fails[0].tb


def test_a_slow_input_is_reported(monkeypatch) -> None:
    import time

    mod = _planted()
    fast = mod.Session.feed

    def slow_feed(self, from_client, buf, ts_ns):
        if buf.bytes_at(0, min(len(buf), 4)) == b"slow":  # 30 ms of CPU (the harness times CPU)
            end = time.thread_time() + 0.03
            while time.thread_time() < end:
                pass
        fast(self, from_client, buf, ts_ns)

    mod.Session.feed = slow_feed
    monkeypatch.setitem(protocols_pkg._cache, "redis", mod)
    t = Target("redis", per_byte_s=1e-3, floor_s=0.01)
    fails = t.run(encode(Input(0x03 | F_DIRECT, [], [Step(True, DATA, b"slow")])))
    assert [f.kind for f in fails] == ["slow"]


def test_every_protocol_fuzzed_for_a_few_seconds(tmp_path) -> None:
    """CI's bounded campaign: each protocol of the table, coverage-guided when atheris is there."""
    a = campaign.parser().parse_args(["--seconds", str(CI_SECONDS), "--jobs", "2", "--workdir", str(tmp_path),
                                      "--nice", "0"])
    try:
        import atheris  # noqa: F401
    except ImportError:
        a.engine = "random"
    results = campaign.run(list(PROTOCOLS), a, progress=False)
    report = campaign.table(results)
    bad = [r for r in results if r.failed]
    details = "\n".join(f"{r.protocol}: {sg['count']}x {sg['kind']} ({sg['drive']}) {sg['detail']}: {sg['file']}"
                        for r in bad for sg in r.stats.get("signatures", []))
    assert not bad, f"\n{report}\n{details}"
    for r in results:
        assert r.stats["inputs"] > 50, report


@pytest.mark.parametrize("argv", [["nope"], ["redis", "http", "--repro", "x"]])
def test_cli_refuses_bad_arguments(argv: list[str]) -> None:
    assert campaign.main(argv) == 2


def test_repro_replays_a_saved_input(tmp_path, capsys) -> None:
    f = tmp_path / "in.bin"
    f.write_bytes(seeds.seeds("redis")[0])
    assert campaign.main(["redis", "--repro", str(f)]) == 0
    assert "no failure" in capsys.readouterr().out
    assert isinstance(campaign.parser().parse_args([]), argparse.Namespace)
