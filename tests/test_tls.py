"""receivers/tls.py: the key log, the TLS record layer (decryption) and the handshake sniffer.

The TLS bytes are real: OpenSSL (Python's ``ssl``) runs both ends of each session through memory
BIOs, writing the NSS key log as any client does with SSLKEYLOGFILE; the bytes each end sent
become TcpEvents, fed whole, a byte a segment and 7 bytes a segment. Then the plaintext out of
``TlsLayer`` must be exactly what each end wrote, and bad input (key logs with wrong, missing or
garbage lines, corrupted and truncated records, gaps) must come out as counted drops, never an
exception and never bytes that did not authenticate.
"""

from __future__ import annotations

import os
import shutil
import ssl
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from receivers.tls import (
    HRR_RANDOM,
    HelloSniffer,
    KeyLog,
    KeyLogError,
    TlsConnId,
    TlsLayer,
    hkdf_expand_label,
    looks_like_tls,
    prf12,
)
from service.model import EventKind, TcpEvent, otlp_json_to_proto
from tests.support.capture import free_port, tcpdump, wait_port
from tests.support.tls_servers import HTTPX_CLIENT as _HTTPX
from tests.support.tls_servers import URLLIB_CLIENT as _URLLIB
from tests.support.tls_servers import keylog_env, nginx_tls, tls_files

ROOT = Path(__file__).resolve().parent.parent
C, S = ("10.0.0.1", 40000), ("10.0.0.2", 443)
REQ = b"GET /index.html HTTP/1.1\r\nHost: x\r\n\r\n"
RESP = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> Any:
    return tls_files(tmp_path_factory.mktemp("certs"))


class Session:
    """Both ends of one TLS session in this process (OpenSSL through memory BIOs)."""

    def __init__(self, files: Any, keylog: Path, maxv: ssl.TLSVersion | None = None, ciphers: str | None = None,
                 session: Any = None, curve: str | None = None, tickets: bool = True,
                 like: Session | None = None) -> None:
        """``like``: use that session's contexts (the server's session cache, the client's key log)."""
        if like is not None:
            sctx, cctx = like.sctx, like.cctx
        else:
            sctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            sctx.load_cert_chain(files.server_cert, files.server_key)
            if maxv is not None:
                sctx.maximum_version = maxv
            if ciphers:
                sctx.set_ciphers(ciphers)
            if curve:
                sctx.set_ecdh_curve(curve)  # the client's key share is for another group: HelloRetryRequest
            if not tickets:
                sctx.options |= ssl.OP_NO_TICKET
            cctx = ssl.create_default_context(cafile=str(files.ca_cert))
            cctx.keylog_filename = str(keylog)
        self.sctx, self.cctx = sctx, cctx
        self.ci, self.co, self.si, self.so = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
        self.c = cctx.wrap_bio(self.ci, self.co, server_hostname="localhost", session=session)
        self.s = sctx.wrap_bio(self.si, self.so, server_side=True)
        #: (0 client->server / 1 server->client, bytes) in the order they were sent
        self.flights: list[tuple[int, bytes]] = []
        for _ in range(10):
            for end in (self.c, self.s):
                try:
                    end.do_handshake()
                except ssl.SSLWantReadError:
                    pass
            self.pump()

    def pump(self) -> None:
        while True:
            a, b = self.co.read(), self.so.read()
            if a:
                self.flights.append((0, a))
                self.si.write(a)
            if b:
                self.flights.append((1, b))
                self.ci.write(b)
            if not a and not b:
                return

    def _read(self, end: ssl.SSLObject) -> bytes:
        got = b""
        while True:
            try:
                d = end.read(1 << 20)
            except (ssl.SSLWantReadError, ssl.SSLZeroReturnError):
                return got
            if not d:
                return got
            got += d

    def exchange(self, req: bytes = REQ, resp: bytes = RESP) -> None:
        self.c.write(req)
        self.pump()
        assert self._read(self.s) == req
        self.pump()
        self.s.write(resp)
        self.pump()
        assert self._read(self.c) == resp
        self.pump()


def events(flights: list[tuple[int, bytes]], cid: Any = 7, seg: int | None = None, close: bool = True) -> list:
    """The flights as TcpEvents (``seg`` bytes a segment), then a FIN each way."""
    out = []
    ts = 1_000
    ends = {0: (C, S), 1: (S, C)}
    for d, b in flights:
        (src, sp), (dst, dp) = ends[d]
        step = seg or len(b) or 1  # an empty flight (a mutated one) sends nothing
        for i in range(0, len(b), step):
            out.append(TcpEvent(EventKind.DATA, cid, src, sp, dst, dp, ts, memoryview(b)[i:i + step], 0, d == 0))
            ts += 1
    if close:
        for d in (0, 1):
            (src, sp), (dst, dp) = ends[d]
            out.append(TcpEvent(EventKind.CLOSE, cid, src, sp, dst, dp, ts, None, 0, d == 0))
    return out


def plaintext(evs: list) -> dict[int, bytes]:
    """What came out as plaintext, per sender port (443: the server)."""
    got: dict[int, bytes] = {}
    for e in evs:
        if e.kind == EventKind.DATA and isinstance(e.conn_id, TlsConnId):
            got[e.sport] = got.get(e.sport, b"") + bytes(e.payload)
    return got


def run(flights: list[tuple[int, bytes]], keylog: Any, seg: int | None = None, layer: TlsLayer | None = None,
        cid: Any = 7) -> tuple[TlsLayer, list]:
    layer = layer if layer is not None else TlsLayer(keylog if isinstance(keylog, KeyLog) else KeyLog(keylog))
    evs = events(flights, cid, seg)
    out: list = []
    for i in range(0, len(evs), 5):  # in batches, as receivers hand them on
        out += layer.process(evs[i:i + 5])
    return layer, out


SUITES = [
    (None, None, "1.3", "TLS_AES_256_GCM_SHA384"),
    (ssl.TLSVersion.TLSv1_2, "ECDHE-ECDSA-AES128-GCM-SHA256", "1.2", "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256"),
    (ssl.TLSVersion.TLSv1_2, "ECDHE-ECDSA-AES256-GCM-SHA384", "1.2", "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384"),
    (ssl.TLSVersion.TLSv1_2, "ECDHE-ECDSA-CHACHA20-POLY1305", "1.2",
     "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256"),
]


@pytest.mark.parametrize("maxv,ciphers,version,cipher", SUITES)
@pytest.mark.parametrize("seg", [None, 1, 7])
def test_decrypts_each_suite_any_segmentation(certs, tmp_path, maxv, ciphers, version, cipher, seg) -> None:
    kl = tmp_path / "keys.log"
    s = Session(certs, kl, maxv, ciphers)
    s.exchange()
    s.exchange(b"POST /x HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc", RESP)
    layer, out = run(s.flights, kl, seg)
    assert plaintext(out) == {C[1]: REQ + b"POST /x HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc", S[1]: RESP * 2}
    assert layer.drops == {}
    tls = next(e.conn_id for e in out if isinstance(e.conn_id, TlsConnId))
    assert tls.tls == {"tls.protocol.name": "tls", "tls.protocol.version": version, "tls.cipher": cipher}
    assert tuple(tls) == (7, "tls")
    # the connection's own events pass (its CLOSEs), and the plaintext connection closes too
    closes = [e for e in out if e.kind == EventKind.CLOSE]
    assert {e.conn_id for e in closes} == {7, tls} and len(closes) == 4
    # every plaintext event keeps the direction and the roles
    for e in out:
        if e.kind == EventKind.DATA:
            assert (e.sport == C[1]) == e.client_is_src


def test_big_records_and_many(certs, tmp_path) -> None:
    """16 KiB records (OpenSSL splits a 100 KB write), split across segments at every 1000 bytes."""
    kl = tmp_path / "keys.log"
    s = Session(certs, kl)
    body = bytes(range(256)) * 400
    s.exchange(REQ, RESP + body)
    for seg in (None, 1000, 16389):
        layer, out = run(s.flights, kl, seg)
        assert plaintext(out)[S[1]] == RESP + body
        assert layer.drops == {}
        assert max(len(e.payload) for e in out if e.kind == EventKind.DATA) == 16384


def test_hello_retry_request(certs, tmp_path) -> None:
    kl = tmp_path / "keys.log"
    s = Session(certs, kl, curve="secp384r1")
    s.exchange()
    server_hellos = [b for d, b in s.flights if d == 1 and HRR_RANDOM in b]
    assert server_hellos, "OpenSSL sent a HelloRetryRequest"
    for seg in (None, 3):
        layer, out = run(s.flights, kl, seg)
        assert plaintext(out) == {C[1]: REQ, S[1]: RESP}
        assert layer.stats["hello_retry"] == 1 and layer.drops == {}


@pytest.mark.parametrize("tickets", [True, False])
def test_tls12_resumption_by_ticket_and_session_id(certs, tmp_path, tickets: bool) -> None:
    kl = tmp_path / "keys.log"
    first = Session(certs, kl, ssl.TLSVersion.TLSv1_2, tickets=tickets)
    first.exchange()
    resumed = Session(certs, kl, session=first.c.session, like=first)
    assert resumed.c.session_reused
    resumed.exchange(b"GET /again HTTP/1.1\r\n\r\n", RESP)
    # the key log as OpenSSL wrote it, and without the resumed handshake's line: the master secret
    # of the session it resumes (by ticket or session id) is used, as Wireshark does
    full = KeyLog(kl)
    lines = kl.read_text().splitlines()
    rnd = next(b for d, b in resumed.flights if d == 0)[11:43].hex()
    only_first = KeyLog()
    only_first.add_text("\n".join(x for x in lines if rnd not in x))
    for keys in (full, only_first):
        layer = TlsLayer(keys)
        _, out1 = run(first.flights, None, layer=layer, cid=1)
        _, out2 = run(resumed.flights, None, layer=layer, cid=2)
        assert plaintext(out1) == {C[1]: REQ, S[1]: RESP}
        assert plaintext(out2) == {C[1]: b"GET /again HTTP/1.1\r\n\r\n", S[1]: RESP}
        assert layer.stats["resumed"] == 1 and layer.drops == {}


def test_no_keys_is_counted_never_parsed(certs, tmp_path) -> None:
    kl = tmp_path / "keys.log"
    s = Session(certs, kl)
    s.exchange()
    for keys in (KeyLog(), None):
        layer, out = run(s.flights, keys)
        assert plaintext(out) == {}
        assert layer.drops == {"tls_no_keys": 1}
        # nothing of the connection reaches a parser: only its FINs pass, and the plaintext's
        assert [e.kind for e in out if e.conn_id == 7] == [EventKind.CLOSE, EventKind.CLOSE]


@pytest.mark.parametrize("maxv", [None, ssl.TLSVersion.TLSv1_2])
def test_capture_begun_after_the_handshake(certs, tmp_path, maxv) -> None:
    """A capture that starts mid-connection sees protected records first: no handshake, no keys to
    find; counted tls_no_keys, nothing handed to a parser (the ciphertext is not garbage input)."""
    kl = tmp_path / "keys.log"
    s = Session(certs, kl, maxv)
    s.exchange()
    s.exchange(b"GET /later HTTP/1.1\r\n\r\n", RESP)
    later = s.flights[-4:]  # the second exchange only: application data records
    assert all(b[0] == 23 for _, b in later)
    for seg in (None, 3):
        layer, out = run(later, kl, seg)
        assert plaintext(out) == {} and layer.drops == {"tls_no_keys": 1}
        assert [e.kind for e in out if e.conn_id == 7] == [EventKind.CLOSE, EventKind.CLOSE]
    # a plain protocol is not taken for one: its first bytes are not record headers
    layer = TlsLayer(KeyLog())
    evs = [TcpEvent(EventKind.DATA, 3, *C, *S, 1, memoryview(b"\x17\x03\x03\x00\x05hello"), 0, True)]
    assert layer.process(evs) is evs


@pytest.mark.parametrize("maxv", [None, ssl.TLSVersion.TLSv1_2])
def test_bad_key_logs(certs, tmp_path, maxv) -> None:
    kl = tmp_path / "keys.log"
    s = Session(certs, kl, maxv)
    s.exchange()
    good = kl.read_text()
    # garbage lines are counted and skipped; the good lines still work
    noisy = KeyLog()
    noisy.add_text("# a comment\n\nnot a key log line\nCLIENT_RANDOM zz 00\nCLIENT_RANDOM " + "ab" * 32 + " 1234\n"
                   "RSA 0123456789abcdef " + "00" * 48 + "\n" + good + "\x00\xff garbage \x01\n")
    assert noisy.stats["bad_lines"] == 4 and noisy.stats["unknown_labels"] == 1
    layer, out = run(s.flights, noisy)
    assert plaintext(out) == {C[1]: REQ, S[1]: RESP} and layer.drops == {}
    # wrong secrets (the right lines, other bytes): every record fails its tag, counted; no plaintext
    wrong = KeyLog()
    lines = [x for x in good.splitlines() if x and not x.startswith("#")]  # OpenSSL's file starts with a comment
    wrong.add_text("\n".join(f"{a} {b} {'5a' * (len(c) // 2)}" for a, b, c in (x.split() for x in lines)))
    layer, out = run(s.flights, wrong)
    assert plaintext(out) == {}
    assert layer.drops.get("tls_decrypt_failed", 0) >= 2 and set(layer.drops) == {"tls_decrypt_failed"}
    # a secret missing (TLS 1.3: the server's application secret): the server's data is not decrypted
    if maxv is None:
        part = KeyLog()
        part.add_text("\n".join(x for x in good.splitlines() if not x.startswith("SERVER_TRAFFIC_SECRET_0")))
        layer, out = run(s.flights, part)
        assert plaintext(out) == {}  # the session was given up when the secret was needed
        assert layer.drops == {"tls_no_keys": 1}


def test_key_log_file_errors_and_growth(tmp_path) -> None:
    with pytest.raises(KeyLogError) as ei:
        KeyLog(tmp_path / "missing.log")
    assert "missing.log" in str(ei.value)
    p = tmp_path / "grow.log"
    p.write_bytes(b"")
    kl = KeyLog(p)
    line = "CLIENT_RANDOM " + "11" * 32 + " " + "22" * 48
    with open(p, "a") as f:
        f.write(line[:30])  # a writer mid-line: nothing yet
    assert kl.refresh() == 0 and len(kl) == 0
    with open(p, "a") as f:
        f.write(line[30:] + "\n")
    assert kl.refresh() == 1 and kl.secret(bytes.fromhex("11" * 32), "CLIENT_RANDOM") == bytes.fromhex("22" * 48)
    # truncated and rewritten longer (same inode, a size past what was read): read again from the start
    p.write_text(line.replace("11", "33") + "\n" + line.replace("11", "44") + "\n")
    assert kl.refresh() == 2 and kl.secret(bytes.fromhex("33" * 32), "CLIENT_RANDOM") is not None
    assert kl.secret(bytes.fromhex("44" * 32), "CLIENT_RANDOM") is not None
    (tmp_path / "rotated.log").write_text(line.replace("11", "55"))  # replaced (a new inode), no final newline
    os.replace(tmp_path / "rotated.log", p)
    assert kl.refresh(final=True) == 1 and kl.secret(bytes.fromhex("55" * 32), "CLIENT_RANDOM") is not None


def test_corrupted_record_skipped_the_rest_decrypts(certs, tmp_path) -> None:
    kl = tmp_path / "keys.log"
    s = Session(certs, kl)
    s.exchange()
    s.exchange(b"GET /second HTTP/1.1\r\n\r\n", RESP)
    flights = list(s.flights)
    # the client's second request: flip one ciphertext byte (its AEAD tag no longer verifies)
    idx = [i for i, (d, b) in enumerate(flights) if d == 0][-1]
    d, b = flights[idx]
    bad = bytearray(b)
    bad[10] ^= 0x40
    flights[idx] = (d, bytes(bad))
    layer, out = run(flights, kl)
    got = plaintext(out)
    assert got[C[1]] == REQ and got[S[1]] == RESP * 2
    assert layer.drops == {"tls_decrypt_failed": 1}
    gap = [e for e in out if e.kind == EventKind.GAP and isinstance(e.conn_id, TlsConnId)]
    assert len(gap) == 1 and gap[0].gap == len(b"GET /second HTTP/1.1\r\n\r\n")  # its size, for the parser


def test_truncated_and_garbage(certs, tmp_path) -> None:
    kl = tmp_path / "keys.log"
    s = Session(certs, kl)
    s.exchange()
    flights = list(s.flights)
    d, last = flights[-1]
    flights[-1] = (d, last[:-7])  # the server's last record cut by the end of the connection
    layer, out = run(flights, kl)
    assert plaintext(out) == {C[1]: REQ}
    assert layer.drops == {"tls_truncated": 1}
    # bytes that stop being records (a garbage header after the handshake): the direction is given up
    flights = list(s.flights)
    flights.insert(len(flights) - 1, (1, b"\x99garbage that is not TLS"))
    layer, out = run(flights, kl)
    assert plaintext(out) == {C[1]: REQ}
    assert layer.drops == {"tls_malformed": 1}


def test_gaps_inside_a_record_and_across_records(certs, tmp_path) -> None:
    kl = tmp_path / "keys.log"
    s = Session(certs, kl)
    body = bytes(range(256)) * 200  # 51200 bytes: 4 records
    s.exchange(REQ, RESP + body)
    s.exchange(b"GET /after HTTP/1.1\r\n\r\n", RESP)
    evs = events(s.flights, seg=1000)
    # the server's flight with the response (4 records of 16 KiB): lose a segment inside its 2nd record
    fi = max(range(len(s.flights)), key=lambda i: len(s.flights[i][1]) if s.flights[i][0] == 1 else 0)
    first = sum(-(-len(b) // 1000) for _, b in s.flights[:fi])  # the flight's first event (1000 bytes a segment)
    lost = first + 20  # bytes 20000-21000 of the flight: inside the 2nd record (16406-32812)
    assert evs[lost].sport == S[1] and len(evs[lost].payload) == 1000
    g = evs[lost]
    evs[lost] = TcpEvent(EventKind.GAP, g.conn_id, g.src, g.sport, g.dst, g.dport, g.ts_ns, None, len(g.payload),
                         g.client_is_src)
    layer = TlsLayer(KeyLog(kl))
    out = layer.process(evs)
    got = plaintext(out)
    assert got[C[1]] == REQ + b"GET /after HTTP/1.1\r\n\r\n"
    assert got[S[1]].endswith(RESP) and len(got[S[1]]) < len(RESP * 2 + body)
    assert RESP + body[:8000] == got[S[1]][:len(RESP) + 8000]
    gaps = [e.gap for e in out if e.kind == EventKind.GAP and isinstance(e.conn_id, TlsConnId)]
    assert gaps and sum(gaps) + len(got[S[1]]) == len(RESP * 2 + body)  # the lost record's exact size
    assert set(layer.drops) <= {"tls_truncated"}


def test_plain_connections_pass_untouched(certs, tmp_path) -> None:
    """Not TLS: the same event objects, the same list, nothing copied (and a STARTTLS switch later)."""
    layer = TlsLayer(KeyLog())
    evs = [TcpEvent(EventKind.DATA, 1, *C, *S, 1, memoryview(b"GET / HTTP/1.1\r\n\r\n"), 0, True),
           TcpEvent(EventKind.DATA, 1, *S, *C, 2, memoryview(b"\x16"), 0, False),  # held: too short to tell
           TcpEvent(EventKind.DATA, 1, *S, *C, 3, memoryview(b"HTTP/1.1 200 OK\r\n\r\n"), 0, False)]
    first = layer.process(evs[:1])
    assert first is not None and first == evs[:1] and first[0] is evs[0] and first[0].payload is evs[0].payload
    rest = layer.process(evs[1:])
    assert rest == evs[1:] and all(a is b for a, b in zip(rest, evs[1:], strict=True))
    # PostgreSQL's SSLRequest: 8 bytes in clear, 'S', then the TLS handshake on the same connection
    kl = tmp_path / "keys.log"
    s = Session(certs, kl)
    s.exchange()
    flights = [(0, b"\x00\x00\x00\x08\x04\xd2\x16\x2f"), (1, b"S"), *s.flights]
    layer, out = run(flights, kl, cid=9)
    assert [bytes(e.payload) for e in out if e.conn_id == 9 and e.kind == EventKind.DATA] == [
        b"\x00\x00\x00\x08\x04\xd2\x16\x2f", b"S"]
    assert plaintext(out) == {C[1]: REQ, S[1]: RESP}


def test_the_plain_run_in_c_does_what_process_does() -> None:
    """receivers/_fastpath.c's plain_run against process()'s own steps for the events it takes
    (plain connections' events, their FINs and RESETs moving them on, OPENs of untracked ones,
    the data of connections still looked at unless a TLS record type leads it): the same index
    and the same table for every mix of those, held and TLS connections' events, odd payloads
    and other objects, from any start; then whole batches through process() with it and
    without: the same events out, the same table."""
    import itertools
    import random

    import receivers.tcp_reassembly as r
    import receivers.tls as t
    from tests.support.speedup import load_accelerator

    fp = load_accelerator("receivers._fastpath")
    if r._c_fast is None:  # WIRESPAN_PURE_PYTHON: set up here, as tcp_reassembly does when built
        fp.setup(r._Half, r._Conn, TcpEvent, r._DATA, r._OPEN, r._CLOSE, r._RESET, r._GONE, itertools.count())
    if t._fp is None:
        fp.plain_setup(t._Plain, t.SNIFF_BYTES)
    P, PC = t._PASS, t._PASS_CLOSING
    kinds = [EventKind.DATA] * 3 + [EventKind.CLOSE, EventKind.CLOSE, EventKind.OPEN, EventKind.RESET]
    rng = random.Random(5)

    def ref(events: list, start: int, conns: dict) -> int:
        """process()'s steps, while nothing of the batch changed, for the events the C loop takes."""
        i = start
        while i < len(events):
            ev = events[i]
            st = conns.get(ev.conn_id)
            if st is P or st is PC:
                if ev.kind == EventKind.CLOSE:
                    if st is P:
                        conns[ev.conn_id] = PC
                    else:
                        del conns[ev.conn_id]
                elif ev.kind == EventKind.RESET:
                    del conns[ev.conn_id]
                i += 1
                continue
            if st is None:
                if ev.kind != EventKind.DATA:
                    i += 1
                    continue
                st = conns[ev.conn_id] = t._Plain(0)
            if st.__class__ is not t._Plain or st.held is not None:
                break
            if ev.kind != EventKind.DATA:
                if ev.kind == EventKind.CLOSE:
                    st.closes += 1
                    if st.closes >= 2:
                        conns.pop(ev.conn_id, None)
                elif ev.kind == EventKind.RESET:
                    conns.pop(ev.conn_id, None)
            elif st.seen >= t.SNIFF_BYTES:
                conns[ev.conn_id] = PC if st.closes else P
            elif len(ev.payload) and ev.payload[0] in t._RECORD_TYPES:
                break
            else:
                st.seen += len(ev.payload)
                if st.seen >= t.SNIFF_BYTES:
                    conns[ev.conn_id] = PC if st.closes else P
            i += 1
        return i

    tls_state = object()  # a TLS session's state: process()'s

    def table() -> dict:
        held = t._Plain(3)
        held.held = []
        return {1: P, 2: PC, 3: t._Plain(0), 5: P, 6: t._Plain(t.SNIFF_BYTES - 2), 8: held,
                9: t._Plain(t.SNIFF_BYTES), 10: tls_state}

    def shown(conns: dict) -> dict:
        return {k: (v.seen, v.closes) if v.__class__ is t._Plain else v for k, v in conns.items()}

    payloads = [memoryview(b"x"), b"GET", b"", memoryview(b"\x16\x03\x01"), b"\x17", memoryview(b"ab" * 8)[::2],
                memoryview(b"*3")]
    for _ in range(800):
        evs = [TcpEvent(rng.choice(kinds), rng.choice([1, 1, 2, 3, 4, 5, 6, 8, 9, 10]), *C, *S, 1,
                        rng.choice(payloads)) for _ in range(rng.randint(0, 12))]
        start = rng.randint(0, len(evs))
        a, b, c = table(), table(), table()
        k = fp.plain_run(evs, start, a, P, PC)
        assert ref(evs[:k], start, b) == k  # it took what process() would have, and did alike:
        if k < len(evs) and evs[k].kind == EventKind.DATA and evs[k].conn_id not in b:
            b[evs[k].conn_id] = t._Plain(0)  # (the new connection's state, made before its look)
        assert shown(a) == shown(b)
        full = ref(evs, start, c)
        # it stops where process() must look, or earlier only at a payload it leaves to Python
        assert k == full or (k < full and evs[k].payload.strides != (1,)), (k, full)
    ev = TcpEvent(EventKind.DATA, 1, *C, *S, 1, b"x")
    assert fp.plain_run([ev, "not an event", ev], 0, table(), P, PC) == 1
    assert fp.plain_run((ev,), 0, table(), P, PC) == 0 and fp.plain_run([], -3, table(), P, PC) == 0
    with pytest.raises(TypeError):
        fp.plain_run([TcpEvent(EventKind.DATA, [1], *C, *S, 1, b"x")], 0, table(), P, PC)  # unhashable id

    # whole batches: plain connections sniffed then passed, a TLS-looking one, ends in any order
    plain = memoryview(b"GET / HTTP/1.1\r\n" + b"x" * 700)
    hello = memoryview(b"\x16\x03\x01\x00\x40\x01\x00\x00\x3c\x03\x03" + b"\x00" * 59)
    stream = []
    for k in range(300):
        cid = rng.randint(1, 12)
        kind = rng.choice(kinds)
        payload = (hello if cid == 7 else plain) if kind == EventKind.DATA else None
        stream.append(TcpEvent(kind, cid, *C, *S, k, payload, 0, True))

    def through(fast: object) -> tuple:
        with pytest.MonkeyPatch.context() as m:
            m.setattr(t, "_plain_run", fast)
            layer = TlsLayer(KeyLog())
            outs = []
            for lo in range(0, len(stream), 17):
                batch = stream[lo:lo + 17]
                got = layer.process(batch)
                outs.append([(e.kind, e.conn_id, e.ts_ns, bytes(e.payload or b"")) for e in got])
            return outs, sorted((k, type(v).__name__) for k, v in layer._conns.items()), dict(layer.drops)

    assert through(fp.plain_run) == through(None)


def test_sniffer_and_detection(certs, tmp_path) -> None:
    kl = tmp_path / "keys.log"
    s = Session(certs, kl, curve="secp384r1")
    h = HelloSniffer()
    for d, b in s.flights:
        for i in range(0, len(b), 5):  # as OpenSSL reads: a record's header, then its body
            h.feed(d, b[i:i + 5])
    assert h.attrs()["tls.protocol.version"] == "1.3"
    assert looks_like_tls(s.flights[0][1]) and looks_like_tls(s.flights[0][1][:5])
    assert not looks_like_tls(b"GET / HTTP/1.1\r\n") and not looks_like_tls(b"\x16\x03\x01\x00")


def test_key_derivation_vectors() -> None:
    """HKDF-Expand-Label against RFC 8448 §3 (simple 1-RTT handshake), the PRF against its definition."""
    # RFC 8448: server_handshake_traffic_secret -> server write key and iv
    shts = bytes.fromhex("b67b7d690cc16c4e75e54213cb2d37b4e9c912bcded9105d42befd59d391ad38")
    assert hkdf_expand_label(shts, b"key", 16, "sha256") == bytes.fromhex("3fce516009c21727d0f2e4e86ee403bc")
    assert hkdf_expand_label(shts, b"iv", 12, "sha256") == bytes.fromhex("5d313eb2671276ee13000b30")
    import hmac
    secret, seed = b"s" * 48, b"seed"
    a1 = hmac.digest(secret, b"label" + seed, "sha256")
    assert prf12(secret, b"label", seed, 16, "sha256") == hmac.digest(secret, a1 + b"label" + seed, "sha256")[:16]


# ============================================================================ real servers, captured
# nginx, PostgreSQL, openssl s_server: real servers on loopback; curl, urllib, httpx, psycopg and
# openssl s_client write the key log (SSLKEYLOGFILE, sslkeylogfile, -keylogfile); tcpdump records;
# the pcap receiver and the protocols stage replay; tshark with the same key log is the oracle.
CURL = shutil.which("curl") or "curl"
TSHARK = shutil.which("tshark") or "tshark"
EDITCAP = shutil.which("editcap") or "editcap"
OPENSSL = shutil.which("openssl") or "openssl"
NODE = shutil.which("node") or shutil.which("nodejs") or "node"
_NODE = ("const u = new URL(process.argv[1]); const m = u.protocol === 'https:' ? require('https') : require('http');"
         "m.get(u, {agent: false}, r => { r.resume(); "
         "r.on('end', () => { process.exitCode = r.statusCode === 200 ? 0 : 1; }); })"
         ".on('error', e => { console.error(e); process.exitCode = 2; });")  # no exit(): the key log is flushed
BIG = bytes(range(256)) * 1200  # 300 KiB: records of 16 KiB split across 64 KiB loopback segments


def _curl(env: dict[str, str], ca: Path, *args: str) -> None:
    subprocess.run([CURL, "-s", "-o", "/dev/null", "--cacert", str(ca), *args], env=env, check=True, timeout=30)


def _py(env: dict[str, str], code: str, *args: str) -> None:
    subprocess.run([sys.executable, "-c", code, *args], env=env, check=True, timeout=60, capture_output=True)


def replay_tls(cap: Path, keylog: Path | None = None, **proto: Any) -> tuple[list[Any], dict[str, Any], dict[str, Any]]:
    """(spans, receiver stats, stage stats) of a capture through the pcap receiver (``keylog_file``)."""
    from processors.protocols.processor import ProtocolsProcessor
    from receivers.pcap import PcapReceiver

    class Sink:
        spans: list[Any] = []

        def consume_spans(self, spans: list[Any]) -> None:
            self.spans.extend(spans)

    sink = Sink()
    sink.spans = []
    stage = ProtocolsProcessor("protocols", dict(proto), sink)
    stage.start()
    cfg: dict[str, Any] = {"path": str(cap), "progress": False}
    if keylog is not None:
        cfg["keylog_file"] = str(keylog)
    rx = PcapReceiver("pcap", cfg, stage)
    rx.start()
    try:
        assert rx.wait(120)
    finally:
        rx.shutdown()
        stage.shutdown()
    return sink.spans, rx.stats, stage.stats


def http_summary(spans: list[Any], port: int) -> list[tuple]:
    """What a span says of an HTTP exchange on ``port``: method, path, query, status, body size."""
    out = []
    for s in spans:
        a = s.attributes
        if a.get("server.port") == port:
            out.append((s.name, a.get("http.request.method"), a.get("url.path"), a.get("url.query"),
                        a.get("http.response.status_code"), a.get("http.response.body.size"), int(s.kind)))
    return sorted(out, key=repr)


def tshark_http(cap: Path, keylog: Path | None, port: int) -> list[tuple]:
    """tshark's (method, uri) of each request and the status codes of the responses on ``port``."""
    args = [TSHARK, "-n", "-r", str(cap), "-Y", f"http && tcp.port == {port}", "-T", "fields",
            "-e", "http.request.method", "-e", "http.request.uri", "-e", "http.response.code",
            "-o", f"http.tls.port:{port}"]
    if keylog is not None:
        args += ["-o", f"tls.keylog_file:{keylog}"]
    out = subprocess.run(args, capture_output=True, text=True, check=True, timeout=120).stdout
    reqs, codes = [], []
    for line in out.splitlines():
        m, uri, code = [*line.split("\t"), "", "", ""][:3]
        if m:
            reqs.append((m, uri))
        if code:
            codes.append(int(code))
    return sorted(reqs) + sorted((c,) for c in codes)  # type: ignore[operator]


def ours_http(spans: list[Any], port: int) -> list[tuple]:
    """The same fields from wirespan's spans."""
    reqs, codes = [], []
    for s in spans:
        a = s.attributes
        if a.get("server.port") == port:
            q = a.get("url.query")
            reqs.append((a["http.request.method"], a["url.path"] + (f"?{q}" if q else "")))
            codes.append(a["http.response.status_code"])
    return sorted(reqs) + sorted((c,) for c in codes)  # type: ignore[operator]


def cut_capture(src: Path, dst: Path, port: int, corrupt: bool = False) -> int:
    """``src`` up to the middle of its first big TLS segment from ``port``, that segment's payload
    cut in half (what a capture stopped mid-write would hold); with ``corrupt``, the whole capture
    with one byte of that segment's ciphertext flipped instead. Returns the packets written."""
    import dpkt

    with open(src, "rb") as f, open(dst, "wb") as g:
        r = dpkt.pcap.Reader(f)
        w = dpkt.pcap.Writer(g, linktype=r.datalink(), nano=True)
        kept, done = 0, False
        for ts, buf in r:
            eth = dpkt.ethernet.Ethernet(buf)
            tcp = eth.data.data
            if not done and tcp.sport == port and len(tcp.data) > 8000:
                done = True
                if corrupt:
                    d = bytearray(tcp.data)
                    d[len(d) // 2] ^= 0x20
                    tcp.data = bytes(d)
                else:
                    tcp.data = tcp.data[:len(tcp.data) // 2]
                eth.data.len = len(eth.data.pack_hdr()) + len(bytes(tcp))
                eth.data.sum = 0
                w.writepkt(bytes(eth), ts)
                kept += 1
                if not corrupt:
                    return kept
                continue
            w.writepkt(buf, ts)
            kept += 1
    assert done, "no big TLS segment"
    return kept


def _traffic(ng: Any, env: dict[str, str], ca: Path, tls: bool) -> int:
    """The same requests over TLS or in clear; returns the connections made."""
    _curl(env, ca, ng.url("/index.html", tls))
    _curl(env, ca, ng.url("/boom", tls))
    _curl(env, ca, ng.url("/big.bin", tls))
    _py(env, _URLLIB, str(ca), ng.url("/api/u?q=1", tls), ng.url("/missing", tls))
    _py(env, _HTTPX, str(ca), ng.url("/api/x", tls), ng.url("/big.bin", tls))
    # Node.js (its own OpenSSL): --tls-keylog writes the key log, NODE_EXTRA_CA_CERTS trusts the CA
    subprocess.run([NODE, f"--tls-keylog={env['SSLKEYLOGFILE']}", "-e", _NODE, ng.url("/api/node", tls)],
                   env={**env, "NODE_EXTRA_CA_CERTS": str(ca)}, check=True, timeout=60, capture_output=True)
    return 7


@pytest.mark.parametrize("protocols,version", [("TLSv1.3", "1.3"), ("TLSv1.2", "1.2")])
def test_nginx_capture_decrypts_into_the_plaintext_twins_spans(tmp_path, protocols: str, version: str) -> None:
    files = tls_files(tmp_path / "certs")
    kl = tmp_path / "keys.log"
    env = keylog_env(kl)
    with nginx_tls(files, {"index.html": b"<p>hi</p>\n", "big.bin": BIG}, protocols=protocols) as ng, \
            tcpdump([ng.port, ng.plain_port], tmp_path / "cap.pcap") as cap:
        conns = _traffic(ng, env, files.ca_cert, True)
        _traffic(ng, env, files.ca_cert, False)
    spans, rx, stage = replay_tls(cap, kl)
    tls, plain = http_summary(spans, ng.port), http_summary(spans, ng.plain_port)
    assert tls == plain and len(tls) == 8, (tls, plain)
    assert sum(1 for t in tls if t[5] == len(BIG)) == 2  # the 300 KiB bodies, whole
    for s in spans:
        a = s.attributes
        if a.get("server.port") == ng.port:
            assert a["url.scheme"] == "https" and a["tls.protocol.version"] == version, a
            assert a["tls.cipher"].startswith("TLS_")
        else:
            assert a["url.scheme"] == "http" and "tls.protocol.version" not in a
    assert not {k for k in rx["drops"] if k.startswith("tls")}, rx["drops"]
    assert stage["drops"] == {}, stage["drops"]
    assert rx["tls"]["sessions"] == conns and rx["tls"]["decrypted_sessions"] == conns, rx["tls"]
    # tshark decrypting with the same key log: the same requests and status codes
    oracle = tshark_http(cap, kl, ng.port)
    assert oracle == ours_http(spans, ng.port) and len(oracle) == 16, oracle
    # without the keys: each session counted once, nothing of it parsed (no span, no parser drop)
    spans, rx, stage = replay_tls(cap)
    assert http_summary(spans, ng.port) == [] and http_summary(spans, ng.plain_port) == plain
    assert rx["drops"].get("tls_no_keys") == conns and stage["drops"] == {}, (rx["drops"], stage["drops"])
    # the keys injected into the capture as a pcapng Decryption Secrets Block: no --keylog needed
    dsb = tmp_path / "dsb.pcapng"
    subprocess.run([EDITCAP, "--inject-secrets", f"tls,{kl}", str(cap), str(dsb)], check=True, timeout=60)
    spans, rx, stage = replay_tls(dsb)
    assert http_summary(spans, ng.port) == tls and rx["tls"]["keylog"]["secrets"] > 0
    assert not {k for k in rx["drops"] if k.startswith("tls")}, rx["drops"]
    # the capture cut in the middle (a record cut short by its end): counted, and every span it
    # still gives is one of the whole capture's
    cut = tmp_path / "cut.pcap"
    n = cut_capture(cap, cut, ng.port)
    spans, rx, stage = replay_tls(cut, kl)
    assert rx["drops"].get("tls_truncated") == 1, rx["drops"]
    assert set(http_summary(spans, ng.port)) <= set(tls) and len(http_summary(spans, ng.port)) < len(tls), n
    # one ciphertext byte flipped: that record fails its tag (counted; the parser gets a gap of its
    # size and counts that exchange's loss itself), every other exchange decrypts into its span
    bad = tmp_path / "corrupt.pcap"
    cut_capture(cap, bad, ng.port, corrupt=True)
    spans, rx, stage = replay_tls(bad, kl)
    assert {k: v for k, v in rx["drops"].items() if k.startswith("tls")} == {"tls_decrypt_failed": 1}, rx["drops"]
    got = http_summary(spans, ng.port)
    assert set(got) <= set(tls) and len(got) == len(tls) - 1 and stage["drops"] == {"http:gap": 1}, got
    # the command line: replay --keylog, and the DSB capture without it
    if version == "1.3":
        for args in ([str(cap), "--keylog", str(kl)], [str(dsb)], [str(cap)]):
            out = tmp_path / "spans.jsonl"
            r = subprocess.run([sys.executable, "-m", "service.cli", "replay", *args, "--output", str(out)],
                               cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
                               timeout=120)
            assert r.returncode == 0, r.stderr
            got = [sp for line in out.read_text().splitlines() for rs in otlp_json_to_proto(line).resource_spans
                   for ss in rs.scope_spans for sp in ss.spans]
            https = [sp.name for sp in got if any(a.key == "url.scheme" and a.value.string_value == "https"
                                                  for a in sp.attributes)]
            if len(args) == 1 and args[0] == str(cap):
                assert https == [] and len(got) == 8 and "tls_no_keys" in r.stderr, r.stderr
            else:
                assert sorted(https) == sorted(t[0] for t in tls) and len(got) == 16, r.stderr


# (key, curl options, tls.cipher): TLS 1.2 with RSA and ECDHE key exchange, AES-GCM and
# ChaCha20-Poly1305; TLS 1.3's three suites curl offers
MATRIX = [
    ("rsa", ["--tls-max", "1.2", "--ciphers", "AES128-GCM-SHA256"], "TLS_RSA_WITH_AES_128_GCM_SHA256"),
    ("rsa", ["--tls-max", "1.2", "--ciphers", "AES256-GCM-SHA384"], "TLS_RSA_WITH_AES_256_GCM_SHA384"),
    ("rsa", ["--tls-max", "1.2", "--ciphers", "ECDHE-RSA-AES256-GCM-SHA384"], "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384"),
    ("rsa", ["--tls-max", "1.2", "--ciphers", "ECDHE-RSA-CHACHA20-POLY1305"],
     "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256"),
    ("ec", ["--tls-max", "1.2", "--ciphers", "ECDHE-ECDSA-CHACHA20-POLY1305"],
     "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256"),
    ("ec", ["--tlsv1.3", "--tls13-ciphers", "TLS_CHACHA20_POLY1305_SHA256"], "TLS_CHACHA20_POLY1305_SHA256"),
    ("ec", ["--tlsv1.3", "--tls13-ciphers", "TLS_AES_128_GCM_SHA256"], "TLS_AES_128_GCM_SHA256"),
    ("ec", ["--tlsv1.3", "--tls13-ciphers", "TLS_AES_256_GCM_SHA384"], "TLS_AES_256_GCM_SHA384"),
    ("ec", ["--tlsv1.3", "--tls13-ciphers", "TLS_AES_128_CCM_SHA256"], "TLS_AES_128_CCM_SHA256"),
]
#: OpenSSL leaves TLS_AES_128_CCM_SHA256 off unless asked
_TLS13_ALL = "ssl_conf_command Ciphersuites TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256:" \
    "TLS_AES_128_GCM_SHA256:TLS_AES_128_CCM_SHA256;"


def test_cipher_suites_and_key_exchanges(tmp_path) -> None:
    """Each suite by a real curl against a real nginx; tshark agrees on every request."""
    for key in ("rsa", "ec"):
        files = tls_files(tmp_path / f"certs-{key}", key)
        rows = [m for m in MATRIX if m[0] == key]
        kl = tmp_path / f"keys-{key}.log"
        env = keylog_env(kl)
        with nginx_tls(files, {"big.bin": BIG}, ciphers="ALL", extra=_TLS13_ALL) as ng, \
                tcpdump([ng.port], tmp_path / f"cap-{key}.pcap") as cap:
            for i, (_k, opts, _name) in enumerate(rows):
                _curl(env, files.ca_cert, *opts, ng.url(f"/api/{i}"))
                _curl(env, files.ca_cert, *opts, ng.url("/big.bin"))
            # a CBC suite (TLS 1.2): not decrypted, counted once, nothing of it parsed
            cbc = "ECDHE-RSA-AES128-SHA" if key == "rsa" else "ECDHE-ECDSA-AES128-SHA"
            _curl(env, files.ca_cert, "--tls-max", "1.2", "--ciphers", cbc, ng.url("/api/cbc"))
        spans, rx, stage = replay_tls(cap, kl)
        assert rx["drops"].pop("tls_unsupported") == 1, rx["drops"]
        assert "/api/cbc" not in {s.attributes["url.path"] for s in spans}
        got = sorted((s.attributes["tls.cipher"], s.attributes["url.path"], s.attributes["http.response.body.size"])
                     for s in spans)
        want = sorted([(name, f"/api/{i}") for i, (_k, _o, name) in enumerate(rows)]
                      + [(name, "/big.bin") for _k, _o, name in rows])
        assert [(c, p) for c, p, _ in got] == want, got
        assert all(n == len(BIG) for _c, p, n in got if p == "/big.bin"), got
        assert not {k for k in rx["drops"] if k.startswith("tls")} and stage["drops"] == {}, (rx, stage)
        # tshark decrypts CBC too: the same plus that request and its 200
        ours = ours_http(spans, ng.port)
        reqs, codes = [x for x in ours if len(x) == 2], [x for x in ours if len(x) == 1]
        assert tshark_http(cap, kl, ng.port) == sorted([*reqs, ("GET", "/api/cbc")]) + sorted([*codes, (200,)])


@pytest.mark.parametrize("protocols,tickets", [("TLSv1.3", True), ("TLSv1.2", True), ("TLSv1.2", False)])
def test_resumption_and_hello_retry_request(tmp_path, protocols: str, tickets: bool) -> None:
    """curl resumes its session on its next connection (tickets, or TLS 1.2 session ids); a server
    that only takes secp384r1 answers curl's X25519 key share with a HelloRetryRequest (TLS 1.3)."""
    files = tls_files(tmp_path / "certs")
    kl = tmp_path / "keys.log"
    env = keylog_env(kl)
    with nginx_tls(files, protocols=protocols, tickets=tickets, curve="secp384r1") as ng, \
            tcpdump([ng.port], tmp_path / "cap.pcap") as cap:
        # one curl, three connections (the server closes each): the 2nd and 3rd resume the 1st
        _curl(env, files.ca_cert, "-H", "Connection: close", ng.url("/api/a"), ng.url("/api/b"), ng.url("/api/c"))
    spans, rx, stage = replay_tls(cap, kl)
    assert sorted(s.attributes["url.path"] for s in spans) == ["/api/a", "/api/b", "/api/c"]
    st = rx["tls"]
    assert st["sessions"] == 3 and st["decrypted_sessions"] == 3 and st["resumed"] == 2, st
    if protocols == "TLSv1.3":
        assert st["hello_retry"] >= 1, st
    assert not {k for k in rx["drops"] if k.startswith("tls")} and stage["drops"] == {}, (rx, stage)
    assert tshark_http(cap, kl, ng.port) == ours_http(spans, ng.port)
    if protocols == "TLSv1.2":
        # the resumed handshakes' CLIENT_RANDOM lines removed: the master secret of the session they
        # resume (by ticket or session id) decrypts them, as Wireshark does
        first = kl.read_text().splitlines()
        cr = [x for x in first if x.startswith("CLIENT_RANDOM")]
        assert len(cr) == 3
        only_first = tmp_path / "first.log"
        only_first.write_text(cr[0] + "\n")
        spans2, rx2, _ = replay_tls(cap, only_first)
        assert sorted(s.attributes["url.path"] for s in spans2) == ["/api/a", "/api/b", "/api/c"], rx2["drops"]


def tshark_follow(cap: Path, keylog: Path) -> dict[int, bytes]:
    """The decrypted bytes of the capture's first TLS stream per sender port, by tshark's follow
    (lines of node 0's bytes in hex; node 1's indented by a tab)."""
    out = subprocess.run([TSHARK, "-n", "-q", "-r", str(cap), "-o", f"tls.keylog_file:{keylog}", "-z",
                          "follow,tls,raw,0"], capture_output=True, text=True, check=True, timeout=60).stdout
    node0 = int(out.split("Node 0: ", 1)[1].split("\n", 1)[0].rsplit(":", 1)[1])
    sides = [b"", b""]
    for line in out.split("Node 1: ", 1)[1].splitlines()[1:]:
        if line.startswith("="):
            break
        sides[1 if line.startswith("\t") else 0] += bytes.fromhex(line.strip())
    return {node0: sides[0], -1: sides[1]}


def _tls_streams(cap: Path, keylog: Path) -> tuple[dict[int, bytes], Any]:
    """The decrypted bytes of a capture per sender port (the pcap receiver's events), and its receiver."""
    from receivers.pcap import PcapReceiver

    got: dict[int, bytes] = {}

    class Sink:
        def consume_events(self, evs: list[Any]) -> None:
            for e in evs:
                if e.kind == EventKind.DATA and isinstance(e.conn_id, TlsConnId):
                    got[e.sport] = got.get(e.sport, b"") + bytes(e.payload)

    rx = PcapReceiver("pcap", {"path": str(cap), "progress": False, "keylog_file": str(keylog)}, Sink())
    rx.run()
    return got, rx


def test_key_update_openssl_s_client_s_server(tmp_path) -> None:
    """TLS 1.3 KeyUpdate: s_client's ``k`` (update) and ``K`` (update, and ask the peer to update
    too: s_server then sends its own); each direction's next secret is derived, nothing lost."""
    files = tls_files(tmp_path / "certs")
    kl = tmp_path / "keys.log"
    port = free_port()
    srv = subprocess.Popen([OPENSSL, "s_server", "-accept", str(port), "-cert", str(files.server_cert), "-key",
                            str(files.server_key), "-rev", "-tls1_3"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.PIPE)
    try:
        wait_port(port)
        with tcpdump([port], tmp_path / "cap.pcap") as cap:
            cli = subprocess.Popen([OPENSSL, "s_client", "-connect", f"127.0.0.1:{port}", "-keylogfile", str(kl),
                                    "-no_ign_eof", "-CAfile", str(files.ca_cert)],
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            assert cli.stdin is not None
            for line in (b"hello\n", b"k\n", b"world\n", b"K\n", b"again\n"):
                time.sleep(0.4)
                cli.stdin.write(line)
                cli.stdin.flush()
            time.sleep(0.6)
            out, _ = cli.communicate(timeout=20)
    finally:
        if srv.poll() is None:
            srv.terminate()
        srv.wait(10)
    assert out.count(b"KEYUPDATE") == 2 and b"olleh" in out and b"dlrow" in out
    got, rx = _tls_streams(cap, kl)
    cport = next(p for p in got if p != port)
    assert got[cport] == b"hello\nworld\nagain\n"
    assert got[port] == b"olleh\ndlrow\nniaga\n"
    oracle = tshark_follow(cap, kl)
    assert oracle.get(port) == got[port] and b"".join(oracle.values()) == got[port] + got[cport], oracle
    st = rx.stats["tls"]
    assert st["key_updates"] == 3, st  # the client's two, the server's one
    assert not {k for k in rx.stats["drops"] if k.startswith("tls")}, rx.stats["drops"]


def test_postgresql_ssl_capture_same_spans_as_plaintext(tmp_path) -> None:
    """PostgreSQL with ssl=on, psycopg with sslmode=require (libpq 18's sslkeylogfile writes the key
    log), against the same statements with sslmode=disable: the same spans, the SSLRequest's
    cleartext start staying on the connection itself."""
    import psycopg

    from tests.support.postgres import postgres_server

    if psycopg.pq.version() < 180000:
        pytest.fail(f"libpq {psycopg.pq.version()} has no sslkeylogfile (psycopg[binary] bundles 18)")
    client = ("import psycopg,sys\n"
              "with psycopg.connect(sys.argv[1]) as c:\n"
              "    c.execute('CREATE TABLE IF NOT EXISTS orders (id int, item text)')\n"
              "    c.execute('INSERT INTO orders VALUES (%s, %s)', (1, 'tea'))\n"
              "    assert c.execute('SELECT item FROM orders WHERE id = %s', (1,)).fetchone() == ('tea',)\n"
              "    c.execute('DELETE FROM orders')\n")
    kl = tmp_path / "keys.log"
    views: dict[str, list[tuple]] = {}
    with postgres_server(ssl=True) as pg:
        for mode in ("require", "disable"):
            dsn = pg.dsn(sslmode=mode, sslkeylogfile=str(kl)) if mode == "require" else pg.dsn(sslmode=mode)
            with tcpdump([pg.port], tmp_path / f"{mode}.pcap") as cap:
                _py(dict(os.environ), client, dsn)
            spans, rx, stage = replay_tls(cap, kl)
            views[mode] = sorted((s.name, s.attributes.get("db.operation.name"), s.attributes.get("db.collection.name"),
                                  s.attributes.get("db.response.status_code")) for s in spans)
            if mode == "require":
                assert all(s.attributes["tls.protocol.version"] == "1.3" for s in spans)
                assert rx["tls"]["decrypted_sessions"] == 1 and not {k for k in rx["drops"] if k.startswith("tls")}
                # the SSLRequest exchange is cleartext: the parser stops there (counted "tls"); nothing else
                assert set(stage["drops"]) <= {"postgresql:tls"}, stage["drops"]
                _, rx2, stage2 = replay_tls(cap)  # no keys: counted, nothing parsed past the SSLRequest
                assert rx2["drops"].get("tls_no_keys") == 1 and set(stage2["drops"]) <= {"postgresql:tls"}
    assert views["require"] == views["disable"] and len(views["require"]) >= 4, views
    ops = {v[1] for v in views["require"]}
    assert {"CREATE TABLE", "INSERT", "SELECT", "DELETE"} <= ops, ops


def test_growing_key_log_waits_for_keys(certs, tmp_path) -> None:
    """The live receiver's case: the key log grows while records come. A session whose secrets
    are not there yet is held (its end too) until they appear, or given up after the wait."""
    kl = tmp_path / "keys.log"
    s = Session(certs, kl)
    s.exchange()
    watched = tmp_path / "watched.log"  # does not exist yet: the clients create it
    keys = KeyLog(watched, must_exist=False)
    layer = TlsLayer(keys, wait_for_keys=5.0)
    evs = events(s.flights)
    out = layer.process(evs)  # the whole connection, FINs included, before any key
    assert plaintext(out) == {} and layer.drops == {} and not [e for e in out if e.kind == EventKind.CLOSE]
    watched.write_text(kl.read_text())  # the client's lines land
    time.sleep(0.06)
    out2 = layer.tick(evs[-1].ts_ns + 1_000_000)
    assert plaintext(out2) == {C[1]: REQ, S[1]: RESP} and layer.drops == {}
    assert len([e for e in out2 if e.kind == EventKind.CLOSE]) == 4  # the connection's and the plaintext's
    # keys that never come: given up after the wait (event time), counted once, the FINs handed on
    layer = TlsLayer(KeyLog(tmp_path / "never.log", must_exist=False), wait_for_keys=0.5)
    out = layer.process(events(s.flights))
    assert plaintext(out) == {} and layer.drops == {}
    time.sleep(0.06)
    out2 = layer.tick(evs[-1].ts_ns + 600_000_000)
    assert plaintext(out2) == {} and layer.drops == {"tls_no_keys": 1}
    assert [e.conn_id for e in out2 if e.kind == EventKind.CLOSE and not isinstance(e.conn_id, TlsConnId)] == [7, 7]
    # at the end of the input (shutdown) a waiting session gets a last look
    layer = TlsLayer(KeyLog(tmp_path / "late.log", must_exist=False), wait_for_keys=60)
    layer.process(events(s.flights))
    (tmp_path / "late.log").write_text(kl.read_text())
    assert plaintext(layer.finish()) == {C[1]: REQ, S[1]: RESP}
    # a missing directory is an error at once
    with pytest.raises(KeyLogError):
        KeyLog(tmp_path / "nodir" / "k.log", must_exist=False)


def test_live_receiver_decrypts_with_a_growing_key_log(tmp_path) -> None:
    """The live receiver on loopback (AF_PACKET), its key log created by the clients after it started."""
    from processors.protocols.processor import ProtocolsProcessor
    from receivers.live import LiveConfig, LiveReceiver
    from tests.support.live_http import SpanSink

    files = tls_files(tmp_path / "certs")
    kl = tmp_path / "keys.log"
    env = keylog_env(kl)
    with nginx_tls(files, {"index.html": b"<p>hi</p>\n", "big.bin": BIG}) as ng:
        sink = SpanSink()
        stage = ProtocolsProcessor("protocols", {}, sink)
        stage.start()
        rx = LiveReceiver("live", LiveConfig(ports=[ng.port, ng.plain_port], keylog_file=str(kl)), stage)
        rx.start()
        try:
            conns = _traffic(ng, env, files.ca_cert, True)
            _traffic(ng, env, files.ca_cert, False)
            _curl(dict(os.environ), files.ca_cert, ng.url("/api/nokeys"))  # this client writes no key log
            deadline = time.monotonic() + 15
            while len(sink.spans) < 16 and time.monotonic() < deadline:
                time.sleep(0.1)
        finally:
            rx.shutdown()
            stage.flush()
            stage.shutdown()
    tls, plain = http_summary(sink.spans, ng.port), http_summary(sink.spans, ng.plain_port)
    assert tls == plain and len(tls) == 8, (tls, plain)
    st = rx.stats["tls"]
    assert st["decrypted_sessions"] == conns and rx.stats["tls"]["drops"] == {"tls_no_keys": 1}, st
    assert stage.stats["drops"] == {}, stage.stats["drops"]


def test_decryption_allocates_only_the_plaintext(certs, tmp_path) -> None:
    """tracemalloc: with the plaintext handed on and dropped, what decryption keeps is flat when the
    response grows 100x (the scratch, one record's plaintext): the plaintext is the only copy. A
    plain connection's events pass without an allocation that grows with them."""
    import tracemalloc

    peaks = {}
    for size in (40_000, 4_000_000):
        kl = tmp_path / f"keys-{size}.log"
        s = Session(certs, kl)
        s.exchange(REQ, RESP + bytes(size))
        evs = events(s.flights, seg=1000)  # records straddle segments: the gathering path
        layer = TlsLayer(KeyLog(kl))
        n = 0
        tracemalloc.start()
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        for i in range(0, len(evs), 8):
            out = layer.process(evs[i:i + 8])
            n += sum(len(e.payload) for e in out if e.kind == EventKind.DATA and isinstance(e.conn_id, TlsConnId))
            del out
        peaks[size] = tracemalloc.get_traced_memory()[1] - base
        tracemalloc.stop()
        assert n == len(REQ) + len(RESP) + size and layer.drops == {}
    print("tracemalloc peaks", peaks)
    assert peaks[4_000_000] < 160_000 and peaks[4_000_000] < 2 * peaks[40_000] + 32_000, peaks
    # plaintext HTTP: the same event objects back, nothing copied
    body = memoryview(bytes(4_000_000))
    plain = [TcpEvent(EventKind.DATA, 5, *C, *S, 1, memoryview(b"GET / HTTP/1.1\r\n\r\n"), 0, True)]
    plain += [TcpEvent(EventKind.DATA, 5, *S, *C, 2 + i, body[i:i + 65536], 0, False)
              for i in range(0, len(body), 65536)]
    layer = TlsLayer(KeyLog())
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    for i in range(0, len(plain), 8):
        batch = plain[i:i + 8]
        assert layer.process(batch) is batch
    peak = tracemalloc.get_traced_memory()[1] - base
    tracemalloc.stop()
    assert peak < 4096, peak


def test_mutated_sessions_never_raise_never_emit_unauthenticated_bytes(certs, tmp_path) -> None:
    """Real sessions (TLS 1.3 and 1.2), their bytes mutated at random (flipped bytes, cut flights,
    inserted garbage, lost segments as gaps): never an exception, every drop a known reason, and
    every plaintext byte handed on is the right one (the AEAD tags: nothing unauthenticated)."""
    import random

    from receivers.tls import DROP_REASONS

    rng = random.Random(15)
    for maxv in (None, ssl.TLSVersion.TLSv1_2):
        kl = tmp_path / f"keys-{maxv}.log"
        s = Session(certs, kl, maxv)
        s.exchange(REQ, RESP + bytes(range(256)) * 100)
        s.exchange(b"GET /2 HTTP/1.1\r\n\r\n", RESP)
        truth = {C[1]: REQ + b"GET /2 HTTP/1.1\r\n\r\n", S[1]: RESP + bytes(range(256)) * 100 + RESP}
        keys = KeyLog(kl)
        for _ in range(100):
            flights = [(d, bytearray(b)) for d, b in s.flights]
            for _m in range(rng.randint(1, 4)):
                i = rng.randrange(len(flights))
                d, b = flights[i]
                how = rng.randrange(4)
                if how == 0 and b:
                    b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
                elif how == 1 and b:
                    del b[rng.randrange(len(b)):]
                elif how == 2:
                    at = rng.randrange(len(b) + 1)
                    b[at:at] = rng.randbytes(rng.randint(1, 40))
                else:
                    flights.insert(i, (d, bytearray(rng.randbytes(rng.randint(1, 8)))))
            evs = events([(d, bytes(b)) for d, b in flights], seg=rng.choice([None, 3, 100, 1500]))
            for j in rng.sample(range(len(evs)), k=min(2, len(evs))) if rng.random() < 0.3 else []:
                e = evs[j]
                if e.kind == EventKind.DATA:
                    evs[j] = TcpEvent(EventKind.GAP, e.conn_id, e.src, e.sport, e.dst, e.dport, e.ts_ns, None,
                                      len(e.payload), e.client_is_src)
            layer = TlsLayer(keys)
            out: list = []
            for i in range(0, len(evs), 6):
                out += layer.process(evs[i:i + 6])
            assert set(layer.drops) <= set(DROP_REASONS), layer.drops
            for e in out:
                if e.kind == EventKind.DATA and isinstance(e.conn_id, TlsConnId):
                    assert bytes(e.payload) in truth[e.sport], (e.sport, bytes(e.payload)[:40])


def test_http2_over_tls(tmp_path) -> None:
    """ALPN h2: curl --http2 against nginx's TLS port and --http2-prior-knowledge against its h2c twin."""
    files = tls_files(tmp_path / "certs")
    kl = tmp_path / "keys.log"
    env = keylog_env(kl)
    with nginx_tls(files, {"index.html": b"<p>hi</p>\n", "big.bin": BIG}, http2=True) as ng, \
            tcpdump([ng.port, ng.plain_port], tmp_path / "cap.pcap") as cap:
        for tls in (True, False):
            mode = "--http2" if tls else "--http2-prior-knowledge"
            for path in ("/index.html", "/big.bin", "/boom"):  # one curl each: curl 7.88 cannot reuse h2c
                _curl(env, files.ca_cert, mode, ng.url(path, tls))
    spans, rx, stage = replay_tls(cap, kl)
    tls, plain = http_summary(spans, ng.port), http_summary(spans, ng.plain_port)
    assert tls == plain and len(tls) == 3, (tls, plain)
    assert all(s.attributes["network.protocol.version"] == "2" for s in spans)
    assert not {k for k in rx["drops"] if k.startswith("tls")} and stage["drops"] == {}, (rx["drops"], stage)


def test_replay_keylog_errors(tmp_path) -> None:
    """replay --keylog: an unreadable key log is a start error naming it (exit 1); one of garbage
    lines is read (counted, warned), the replay goes on."""
    sample = ROOT / "config" / "samples" / "http-sample.pcap"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-m", "service.cli", "replay", str(sample), "--keylog",
                        str(tmp_path / "missing.log"), "--output", str(tmp_path / "o.jsonl")], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "missing.log: cannot read key log" in r.stderr, r.stderr
    bad = tmp_path / "bad.log"
    bad.write_text("garbage\nCLIENT_RANDOM zz yy\n")
    r = subprocess.run([sys.executable, "-m", "service.cli", "replay", str(sample), "--keylog", str(bad), "--output",
                        str(tmp_path / "o.jsonl")], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "2 lines not understood" in r.stderr, r.stderr
    assert "replay: drops: none" in r.stderr


def test_keylog_options_in_the_config(tmp_path) -> None:
    """keylog_file of pcap and live, keylog_wait of live: typed, typos and bad values are config errors."""
    from service import config as c
    from service.registry import Registry

    def raw(receiver: str, opts: dict[str, Any]) -> dict[str, Any]:
        return {"receivers": {receiver: opts}, "processors": {"protocols": {}}, "exporters": {"debug": {}},
                "service": {"pipelines": {"traces": {"receivers": [receiver], "processors": ["protocols"],
                                                     "exporters": ["debug"]}}}}

    reg = Registry()
    cfg = c.validate(raw("pcap", {"path": "x.pcap", "keylog_file": "/tmp/keys.log"}), reg)
    assert cfg.receivers["pcap"].config.keylog_file == "/tmp/keys.log"
    cfg = c.validate(raw("live", {"keylog_file": "/tmp/keys.log", "keylog_wait": 0.5}), reg)
    live = cfg.receivers["live"].config
    assert (live.keylog_file, live.keylog_wait) == ("/tmp/keys.log", 0.5)
    with pytest.raises(c.ConfigError) as ei:
        c.validate(raw("pcap", {"path": "x.pcap", "keylog_fle": "/tmp/keys.log"}), reg)
    assert any(e.startswith("receivers::pcap: unknown option 'keylog_fle'") for e in ei.value.errors), ei.value.errors
    with pytest.raises(c.ConfigError) as ei:
        c.validate(raw("live", {"keylog_wait": -1}), reg)
    assert any(e.startswith("receivers::live::keylog_wait:") for e in ei.value.errors), ei.value.errors


@pytest.mark.parametrize("accept", [True, False])
def test_early_data_0rtt(tmp_path, accept: bool) -> None:
    """TLS 1.3 0-RTT: openssl s_client resumes with -early_data; s_server takes it (-early_data) or
    not. Taken: its plaintext comes first on the connection (held until the server's
    EncryptedExtensions said so); refused: counted tls_early_data, never handed on (the server never
    processed it), the rest decrypts."""
    files = tls_files(tmp_path / "certs")
    kl, sess, early = tmp_path / "keys.log", tmp_path / "sess.pem", tmp_path / "early.txt"
    early.write_bytes(b"EARLY hello\n")
    port = free_port()
    srv_args = [OPENSSL, "s_server", "-accept", str(port), "-cert", str(files.server_cert), "-key",
                str(files.server_key), "-tls1_3", "-early_data"]
    srv = subprocess.Popen(srv_args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.PIPE)

    def client(line: bytes, *extra: str) -> bytes:
        cli = subprocess.Popen([OPENSSL, "s_client", "-connect", f"127.0.0.1:{port}", "-keylogfile", str(kl),
                                "-no_ign_eof", "-CAfile", str(files.ca_cert), *extra],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        assert cli.stdin is not None
        time.sleep(0.6)
        cli.stdin.write(line)
        cli.stdin.flush()
        time.sleep(0.4)
        return cli.communicate(timeout=20)[0]

    try:
        wait_port(port)
        with tcpdump([port], tmp_path / "cap.pcap") as cap:
            client(b"first\n", "-sess_out", str(sess))
            if not accept:  # another server (other ticket keys, no early data): the PSK and its 0-RTT refused
                srv.terminate()
                srv.communicate(timeout=10)
                srv = subprocess.Popen(srv_args[:-1], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                       stdin=subprocess.PIPE)
                wait_port(port)
            out = client(b"later\n", "-sess_in", str(sess), "-early_data", str(early))
    finally:
        srv.terminate()
        srv_out = srv.communicate(timeout=10)[0]
    assert (b"Early data was accepted" if accept else b"Early data was rejected") in out, out[-400:]
    assert (b"EARLY hello" in srv_out) == accept
    from receivers.pcap import PcapReceiver

    streams: dict[Any, bytes] = {}

    class Sink:
        def consume_events(self, evs: list[Any]) -> None:
            for e in evs:
                if e.kind == EventKind.DATA and isinstance(e.conn_id, TlsConnId) and e.dport == port:
                    streams[e.conn_id] = streams.get(e.conn_id, b"") + bytes(e.payload)

    rx = PcapReceiver("pcap", {"path": str(cap), "progress": False, "keylog_file": str(kl)}, Sink())
    rx.run()
    assert sorted(streams.values()) == sorted([b"first\n", b"EARLY hello\nlater\n" if accept else b"later\n"])
    tls_drops = {k: v for k, v in rx.stats["drops"].items() if k.startswith("tls")}
    assert tls_drops == ({} if accept else {"tls_early_data": 1}), tls_drops
    assert rx.stats["tls"]["resumed"] == int(accept) and rx.stats["tls"]["early_data"] == 1, rx.stats["tls"]
