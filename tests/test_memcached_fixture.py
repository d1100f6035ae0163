"""The stored real memcached capture (tests/fixtures/memcached, re-recorded by record.py), replayed.

pymemcache 4 against memcached 1.6 (text protocol) on one connection: 29 commands in 28
segments (a set_many sends its two sets in one), every reply class the text protocol has
(STORED, NOT_STORED, EXISTS, NOT_FOUND, DELETED, TOUCHED, a number, VALUE...END, END alone,
VERSION, CLIENT_ERROR), a noreply set, and the close pymemcache makes after the CLIENT_ERROR.
The exact spans are asserted, and tshark's memcache dissector on the same file is the oracle
for which command each client frame starts with, its keys, and the replies it decodes.
"""

from __future__ import annotations

import os
import random
from typing import Any

import pytest

from service.model import Span, SpanKind, StatusCode
from tests.support.replay import assert_clean, conversations, epoch_ns, replay, tshark_rows
from tests.support.whole import cut, run_stage

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "memcached", "pymemcache_session.pcap")
#: The server's port in the stored capture (record.py prints it when it re-records).
PORT = 40177

_NAN = "CLIENT_ERROR cannot increment or decrement non-numeric value"
#: (name = db.operation.name, the first key, db.response.status_code, error.type, status message).
#: Text replies are named by the binary protocol's statuses (NOT_FOUND is KEY_ENOENT, EXISTS is
#: KEY_EEXISTS), so one status vocabulary serves both protocols; a get miss is recorded, no error.
EXPECTED: list[tuple[str, str, str | None, str | None, str]] = [
    ("version", "", None, None, ""),
    ("set", "session:42", None, None, ""),  # flags 1, expiry 300
    ("get", "session:42", None, None, ""),
    ("get", "session:missing", "KEY_ENOENT", None, ""),
    ("set", "user:42:name", None, None, ""),  # set_many: the two sets in one segment
    ("set", "user:42:plan", None, None, ""),
    ("get", "user:42:name", None, None, ""),  # get_many: one get of three keys, two hits
    ("add", "session:42", "NOT_STORED", "NOT_STORED", "NOT_STORED"),
    ("add", "lock:7", None, None, ""),
    ("replace", "session:42", None, None, ""),
    ("replace", "session:gone", "NOT_STORED", "NOT_STORED", "NOT_STORED"),
    ("append", "session:42", None, None, ""),
    ("prepend", "session:42", None, None, ""),
    ("get", "session:42", None, None, ""),
    ("set", "page:views", None, None, ""),
    ("incr", "page:views", None, None, ""),
    ("decr", "page:views", None, None, ""),
    ("incr", "page:clicks", "KEY_ENOENT", "KEY_ENOENT", "KEY_ENOENT"),
    ("gets", "session:42", None, None, ""),
    ("cas", "session:42", None, None, ""),
    ("cas", "session:42", "KEY_EEXISTS", "KEY_EEXISTS", "KEY_EEXISTS"),  # the stale token
    ("cas", "session:gone", "KEY_ENOENT", "KEY_ENOENT", "KEY_ENOENT"),
    ("touch", "session:42", None, None, ""),
    ("touch", "session:gone", "KEY_ENOENT", "KEY_ENOENT", "KEY_ENOENT"),
    ("delete", "lock:7", None, None, ""),
    ("delete", "lock:7", "KEY_ENOENT", "KEY_ENOENT", "KEY_ENOENT"),
    ("set", "audit:1", None, None, ""),  # noreply: ends where it starts
    ("get", "audit:1", None, None, ""),
    ("incr", "session:42", None, "CLIENT_ERROR", _NAN),
]
#: The one noreply command's index in EXPECTED.
NOREPLY = 26


def _row(s: Span, show_keys: bool) -> tuple[str, str, str | None, str | None, str]:
    a = s.attributes
    query = a["db.query.text"]
    if show_keys:
        key = query[len(s.name) + 1:] if query != s.name else ""
    else:
        assert query in (s.name, f"{s.name} ?")
        key = "?" if query != s.name else ""
    return s.name, key, a.get("db.response.status_code"), a.get("error.type"), s.status_message


def _expected(show_keys: bool) -> list[tuple[str, str, str | None, str | None, str]]:
    return [(n, k if show_keys or not k else "?", *rest) for n, k, *rest in EXPECTED]


@pytest.fixture(scope="module")
def replayed() -> tuple[list[Span], dict, dict]:
    return replay(FIXTURE, {"enabled": ["memcached"]})


def test_replay_gives_exactly_these_spans(replayed) -> None:
    spans = replayed[0]
    assert [_row(s, False) for s in spans] == _expected(False)
    for s in spans:
        a = s.attributes
        assert s.kind == SpanKind.CLIENT
        assert a["db.system.name"] == "memcached" and a["db.operation.name"] == s.name
        assert a["server.port"] == PORT and a["server.address"] == "127.0.0.1"
        assert "db.namespace" not in a and "memcached.quiet" not in a
        assert s.status_code == (StatusCode.ERROR if a.get("error.type") else StatusCode.UNSET)
        assert (s.end_ns == s.start_ns) if s is spans[NOREPLY] else (0 < s.end_ns - s.start_ns < 1_000_000_000)
    values = ("alice", "mallory", "worker-1", "bob", "carol", "dave", "login", "@bob!")
    assert not any(v in repr([s.attributes for s in spans]) for v in values)  # no values, no keys
    assert "session:42" not in repr([s.attributes for s in spans])


def test_show_keys_puts_the_key_in_the_query_text() -> None:
    spans, _, stats = replay(FIXTURE, {"enabled": ["memcached"], "memcached": {"show_keys": True}})
    assert [_row(s, True) for s in spans] == _expected(True)
    assert stats["drops"] == {}


def test_nothing_is_dropped(replayed) -> None:
    _, recv, stats = replayed
    assert_clean(recv, stats, "memcached", connections=1, packets=65, spans=len(EXPECTED))


def test_every_protocol_enabled_still_detects_memcached(replayed) -> None:
    """The default configuration: detection picks memcached by content (the port is no memcached port)."""
    spans, _, stats = replay(FIXTURE, {})
    assert [_row(s, False) for s in spans] == [_row(s, False) for s in replayed[0]]
    assert stats["drops"] == {} and stats["protocols"] == {"memcached": 1}


def _segments() -> list[tuple[bool, bytes]]:
    (conn,) = conversations(FIXTURE)
    return conn


@pytest.mark.parametrize("how", ["bytes", "random"])
def test_the_real_bytes_cut_anywhere_give_the_same_spans(how: str) -> None:
    """The recorded bytes re-cut a byte a segment or in 1-40 byte pieces: command lines, data
    blocks and VALUE lines split anywhere (detection waits on "v", "se", ...) give the spans of
    the recorded segments and no drops."""
    segs = _segments()
    assert len(segs) == 55  # 28 from the client, 27 from the server
    want, drops = run_stage(PORT, segs)
    assert len(want) == len(EXPECTED) and drops == {}
    got, drops = run_stage(PORT, cut(segs, how, random.Random(11)))
    untimed = [(s[0], s[1], s[4], s[5], s[6]) for s in want]
    assert [(s[0], s[1], s[4], s[5], s[6]) for s in got] == untimed and drops == {}


# -- tshark, the oracle ----------------------------------------------------------------------
#: What tshark joins a field's occurrences with (-E aggregator).
_SEP = "\x1f"
#: tshark's words for the replies it decodes, as wirespan's status codes name them (None: success).
_REPLY_STATUS = {"STORED": None, "DELETED": None, "NOT_STORED": "NOT_STORED", "NOT_FOUND": "KEY_ENOENT",
                 "EXISTS": "KEY_EEXISTS"}


def _tshark(*args: str) -> list[list[str]]:
    return tshark_rows(FIXTURE, *args)


def _frames() -> list[dict[str, Any]]:
    """Every frame with a payload: who sent it, when, and what tshark's memcache dissector read."""
    rows = _tshark("-d", f"tcp.port=={PORT},memcache", "-Y", "tcp.len > 0", "-T", "fields",
                   "-e", "tcp.srcport", "-e", "frame.time_epoch", "-e", "memcache.command", "-e", "memcache.key",
                   "-e", "memcache.response", "-e", "memcache.version", "-e", "memcache.noreply",
                   "-E", f"aggregator={_SEP}")
    out = []
    for src, t, cmd, keys, response, version, noreply in ((r + [""] * 7)[:7] for r in rows):
        out.append({"client": int(src) != PORT, "t": epoch_ns(t), "command": cmd,
                    "keys": [k for k in keys.split(_SEP) if k], "response": response, "version": version,
                    "noreply": bool(noreply)})
    return out


def test_spans_agree_with_tshark() -> None:
    """tshark 4.0's memcache dissector reads the first command of each client segment (not the
    second set of a set_many's segment) and has no ``touch``; of the replies it reads the status
    words, VALUE keys and VERSION (not numbers, TOUCHED or CLIENT_ERROR). On what it reads:
    the same commands, at the same frames, with the same keys, and the same outcomes."""
    spans, _, _ = replay(FIXTURE, {"enabled": ["memcached"], "memcached": {"show_keys": True}})
    (port,) = _tshark("-Y", "tcp.flags.syn==1 && tcp.flags.ack==0", "-T", "fields", "-e", "tcp.dstport")[0]
    assert int(port) == PORT
    frames = _frames()
    client = [f for f in frames if f["client"]]
    server = [f for f in frames if not f["client"]]
    # Each client segment's first command: tshark's, in order (touch shows as no command).
    firsts = [next(s for s in spans if s.start_ns == f["t"]) for f in client]
    assert len(client) == len({s.start_ns for s in spans}) == len(EXPECTED) - 1  # one segment held two sets
    assert [f["command"] or "touch" for f in client] == [s.name for s in firsts]
    for f, s in zip(client, firsts, strict=True):
        shown = s.attributes["db.query.text"][len(s.name) + 1:]
        if f["command"]:  # (a multi-key get shows its first key)
            assert shown == (f["keys"][0] if f["keys"] else ""), s.name
        assert f["noreply"] == (s is spans[NOREPLY])
    assert client[5]["keys"] == ["user:42:name", "user:42:plan", "user:42:email"]  # the get_many
    # Each answered span ends at the first server segment after its command: the one with its reply.
    for s in spans:
        if s is not spans[NOREPLY]:
            reply = next(f for f in server if f["t"] > s.start_ns)
            assert s.end_ns == reply["t"], s.name
            if reply["version"]:
                assert s.name == "version" and reply["version"].startswith("1.")
            elif reply["keys"]:  # VALUE lines: a get hit
                assert s.name in ("get", "gets") and "db.response.status_code" not in s.attributes
                assert s.attributes["db.query.text"].split(" ")[1] == reply["keys"][0]
            elif reply["response"] == "END":  # END alone: a miss
                assert s.name == "get" and s.attributes["db.response.status_code"] == "KEY_ENOENT"
            elif reply["response"]:
                assert s.attributes.get("db.response.status_code") == _REPLY_STATUS[reply["response"]], s.name
    # The replies tshark leaves undecoded: incr's and decr's numbers, TOUCHED, the CLIENT_ERROR.
    blank = {f["t"] for f in server if not (f["response"] or f["keys"] or f["version"])}
    assert [(s.name, s.attributes.get("error.type")) for s in spans if s.end_ns in blank] == \
        [("incr", None), ("decr", None), ("touch", None), ("incr", "CLIENT_ERROR")]
