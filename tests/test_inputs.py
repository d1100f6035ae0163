"""Replay inputs (issue 19 item 8): compressed captures, standard input, directories and globs,
and BPF filter expressions compiled by libpcap.

Every input is one real capture: tcpdump records two real HTTP servers on loopback (Python's
http.server in their own processes) answering real clients. Each input format is a CLI test
(``wirespan replay``), and its spans must be the plain file's. The BPF filter is held to
tcpdump's own filtering of the same capture (``tcpdump -r CAP -w OUT EXPR``): the same
packets kept, the same spans made; the live receiver's kernel filter to the traffic it lets in.
"""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from receivers.bpf_filter import BufferAddress, FilterError, compile_filter
from receivers.capture_stream import NEW_VIEW, open_stream
from receivers.pcap import open_capture
from tests.support.capture import TCPDUMP, tcpdump
from tests.support.live_http import http_server, run_client

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}
HAVE_TCPDUMP = os.path.exists(TCPDUMP)
needs_tcpdump = pytest.mark.skipif(not HAVE_TCPDUMP or os.geteuid() != 0, reason="needs tcpdump and root")

_CLIENT = r'''
import http.client, sys
for port in sys.argv[1:]:
    c = http.client.HTTPConnection("127.0.0.1", int(port))
    for i in range(6):
        c.request("GET", f"/item/{i}?p={port}")
        r = c.getresponse(); r.read()
    c.request("GET", "/missing"); r = c.getresponse(); r.read()
    c.request("POST", "/upload", body=b"x" * 3000); r = c.getresponse(); r.read()
    c.close()
'''


def cli(*args: str, stdin: bytes | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "service.cli", *args], cwd=ROOT, env=ENV, capture_output=True,
                          timeout=timeout, input=stdin)


@pytest.fixture(scope="module")
def two_servers(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int, int]:
    """A real capture (tcpdump, nanosecond pcap) of two HTTP servers; (path, port A, port B)."""
    if not HAVE_TCPDUMP or os.geteuid() != 0:
        pytest.skip("needs tcpdump and root")
    d = tmp_path_factory.mktemp("inputs")
    with http_server() as a, http_server() as b:
        with tcpdump([a.port, b.port], d / "two.pcap") as cap:
            run_client(_CLIENT, str(a.port), str(b.port))
    return cap, a.port, b.port


def _spans(path: Path) -> list[tuple]:
    """The spans of an OTLP JSON lines file, comparable across runs (ids left out)."""
    out = []
    for line in path.read_text().splitlines():
        for rs in json.loads(line).get("resourceSpans", []):
            for ss in rs["scopeSpans"]:
                for s in ss["spans"]:
                    attrs = tuple(sorted((a["key"], json.dumps(a["value"])) for a in s.get("attributes", [])))
                    out.append((s["name"], s["startTimeUnixNano"], s["endTimeUnixNano"], attrs))
    return sorted(out)


def _packets(stderr: bytes) -> int:
    line = next(ln for ln in stderr.decode().splitlines() if " packets, " in ln)
    return int(line.split()[1])


def _compressed(cap: Path, d: Path) -> dict[str, Path]:
    """The capture as every input format: pcapng (editcap), and each compressed."""
    data = cap.read_bytes()
    ng = d / "two.pcapng"
    subprocess.run(["editcap", "-F", "pcapng", str(cap), str(ng)], check=True) if shutil.which("editcap") else None
    from backports import zstd
    out = {"pcap.gz": gzip.compress(data), "pcap.zst": zstd.compress(data), "pcap.xz": lzma.compress(data),
           "pcap.bz2": bz2.compress(data),
           # several gzip members / zstd frames make one stream, as gunzip and zstd -d read them
           "pcap.multi.gz": gzip.compress(data[:5000]) + gzip.compress(data[5000:])}
    if ng.exists():
        out["pcapng.gz"] = gzip.compress(ng.read_bytes())
        out["pcapng.zst"] = zstd.compress(ng.read_bytes())
    files = {}
    for ext, body in out.items():
        files[ext] = d / f"two.{ext}"
        files[ext].write_bytes(body)
    return files


@needs_tcpdump
def test_every_input_format_gives_the_plain_files_spans(two_servers, tmp_path: Path) -> None:
    cap, _, _ = two_servers
    ref_out = tmp_path / "ref.jsonl"
    r = cli("replay", str(cap), "--output", str(ref_out))
    assert r.returncode == 0, r.stderr
    ref = _spans(ref_out)
    assert len(ref) == 16                                     # 8 exchanges per server
    packets = _packets(r.stderr)
    for ext, path in _compressed(cap, tmp_path).items():
        out = tmp_path / f"{ext}.jsonl"
        r = cli("replay", str(path), "--output", str(out))
        assert r.returncode == 0, (ext, r.stderr)
        assert _spans(out) == ref, ext
        assert _packets(r.stderr) == packets, ext


@needs_tcpdump
def test_stdin_from_a_real_tcpdump_pipe(two_servers, tmp_path: Path) -> None:
    """``tcpdump -r CAP -w - | wirespan replay -``, plain and through gzip."""
    cap, _, _ = two_servers
    ref_out = tmp_path / "ref.jsonl"
    assert cli("replay", str(cap), "--output", str(ref_out)).returncode == 0
    for through_gzip in (False, True):
        out = tmp_path / f"stdin-{through_gzip}.jsonl"
        dump = subprocess.Popen([TCPDUMP, "--time-stamp-precision=nano", "-r", str(cap), "-w", "-"],
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        src = dump.stdout
        gz = None
        if through_gzip:
            gz = subprocess.Popen(["gzip", "-c"], stdin=dump.stdout, stdout=subprocess.PIPE)
            src = gz.stdout
        p = subprocess.run([sys.executable, "-m", "service.cli", "replay", "-", "--output", str(out),
                            "--workers", "2"], cwd=ROOT, env=ENV, stdin=src, capture_output=True, timeout=120)
        dump.wait(10)
        if gz is not None:
            gz.wait(10)
        assert p.returncode == 0, p.stderr
        assert b"standard input is read by one process" in p.stderr
        assert _spans(out) == _spans(ref_out)
    # an empty standard input is one line and exit 1, not "0 packets"
    r = cli("replay", "-", stdin=b"")
    assert r.returncode == 1 and r.stderr.decode().strip() == "error: -: standard input is empty or not a capture"


@needs_tcpdump
def test_directory_and_glob_of_mixed_formats(two_servers, tmp_path: Path) -> None:
    """A directory replays its captures (compressed ones too) in name order through one reassembler."""
    cap, _, _ = two_servers
    d = tmp_path / "dir"
    d.mkdir()
    shutil.copy(cap, d / "a.pcap")
    (d / "b.pcap.gz").write_bytes(gzip.compress(cap.read_bytes()))
    (d / "notes.txt").write_text("not a capture")
    ref_out = tmp_path / "ref.jsonl"
    assert cli("replay", str(cap), "--output", str(ref_out)).returncode == 0
    one = _spans(ref_out)
    for arg in (str(d), str(d / "*.pcap*")):
        out = tmp_path / "dir.jsonl"
        r = cli("replay", arg, "--output", str(out))
        assert r.returncode == 0, r.stderr
        # both files, in order: the second's connections start afresh (the first's were closed)
        assert _spans(out) == sorted(one + one)
        assert _packets(r.stderr) == 2 * _packets(cli("replay", str(cap)).stderr)


def test_stream_reader_matches_the_mapped_reader_at_any_chunk_size(tmp_path: Path, monkeypatch) -> None:
    """Chunk boundaries fall inside records and blocks: every packet comes out whole, once."""
    import receivers.capture_stream as cs
    from bench.gen_http_capture import generate
    for fmt in ("pcap", "pcapng"):
        src = tmp_path / f"g.{fmt}"
        generate(str(src), connections=4, requests=5, pcapng=fmt == "pcapng")
        r = open_capture(src)
        ref = [(lt, ts, bytes(r.view[o:e])) for lt, ts, o, e in r]
        data = src.read_bytes()
        (tmp_path / "two.gz").write_bytes(gzip.compress(data + data if fmt == "pcapng" else data))
        want = ref + ref if fmt == "pcapng" else ref   # two pcapng sections in one stream
        for chunk in (1 << 20, 1000, 61):
            monkeypatch.setattr(cs, "CHUNK_BYTES", chunk)
            rd = open_stream(str(tmp_path / "two.gz"))
            got, view = [], None
            for lt, ts, o, e in rd:
                if lt == NEW_VIEW:
                    view = rd.view
                    continue
                got.append((lt, ts, bytes(view[o:e])))
            assert rd.error is None and got == want, (fmt, chunk)


def test_compressed_capture_cut_short_exits_3_after_what_it_held(tmp_path: Path) -> None:
    from bench.gen_http_capture import generate
    src = tmp_path / "g.pcap"
    generate(str(src), connections=20, requests=20)
    data = gzip.compress(src.read_bytes())
    cut = tmp_path / "cut.pcap.gz"
    cut.write_bytes(data[: len(data) // 2])
    out = tmp_path / "o.jsonl"
    r = cli("replay", str(cut), "--output", str(out))
    assert r.returncode == 3, r.stderr
    err = [ln for ln in r.stderr.decode().splitlines() if ln.startswith("error: ")]
    assert len(err) == 1 and "cut short: truncated gzip stream" in err[0]
    assert 0 < len(_spans(out)) < 400
    assert cli("replay", str(cut), "--output", str(out), "--allow-truncated").returncode == 0


# -- BPF filter expressions ------------------------------------------------------------------
def _tcpdump_filtered(cap: Path, expr: str, out: Path) -> int:
    """tcpdump's own filtering of ``cap``: writes the kept packets to ``out``, returns their count."""
    subprocess.run([TCPDUMP, "--time-stamp-precision=nano", "-r", str(cap), "-w", str(out), expr], check=True,
                   capture_output=True)
    p = subprocess.run([TCPDUMP, "-r", str(out), "-nn", "-q"], check=True, capture_output=True, text=True)
    return len(p.stdout.splitlines())


@needs_tcpdump
def test_bpf_filter_keeps_what_tcpdump_keeps(two_servers, tmp_path: Path) -> None:
    cap, a, b = two_servers
    exprs = [f"tcp port {a}", f"tcp port {a} and host 127.0.0.1", f"not port {a}",
             f"tcp[tcpflags] & (tcp-syn|tcp-fin) != 0 or dst port {b}", "greater 200", "host 10.0.0.5",
             f"src port {b} and tcp[((tcp[12:1] & 0xf0) >> 2):4] = 0x48545450"]  # responses: "HTTP"
    total = _packets(cli("replay", str(cap)).stderr)
    for expr in exprs:
        ref = tmp_path / "ref.pcap"
        kept = _tcpdump_filtered(cap, expr, ref)
        out, ref_out = tmp_path / "f.jsonl", tmp_path / "r.jsonl"
        r = cli("replay", str(cap), "-f", expr, "--output", str(out))
        assert r.returncode == 0, (expr, r.stderr)
        said = r.stderr.decode()
        filtered = int(said.split("filtered=")[1].split(",")[0].split()[0]) if "filtered=" in said else 0
        assert total - filtered == kept, (expr, total, filtered, kept)
        if kept:
            assert cli("replay", str(ref), "--output", str(ref_out)).returncode == 0
            assert _spans(out) == _spans(ref_out), expr
        else:
            assert _spans(out) == []
    # the config option, and a compressed input (the filter follows the stream's chunks)
    gz = tmp_path / "two.pcap.gz"
    gz.write_bytes(gzip.compress(cap.read_bytes()))
    kept = _tcpdump_filtered(cap, f"port {b}", tmp_path / "ref.pcap")
    r = cli("replay", str(gz), "--set", f"receivers.pcap.bpf_filter=port {b}")
    assert r.returncode == 0 and f"filtered={total - kept}" in r.stderr.decode()


def test_bpf_filter_errors_are_libpcaps_and_name_the_path(tmp_path: Path) -> None:
    r = cli("replay", "config/samples/http-sample.pcap", "-f", "tcp prot 80")
    assert r.returncode == 1
    assert r.stderr.decode() == ("error: receivers::pcap::bpf_filter: bad BPF filter 'tcp prot 80': "
                                 "can't parse filter expression: syntax error\n")
    with pytest.raises(FilterError, match="ethernet addresses supported only on"):
        compile_filter("ether host 01:02:03:04:05:06", 101)   # raw IP has no Ethernet header


@pytest.mark.skipif(not HAVE_TCPDUMP, reason="needs tcpdump")
def test_compiled_program_is_tcpdumps(tmp_path: Path) -> None:
    """The instructions are libpcap's, as ``tcpdump -ddd`` prints them, for Ethernet and raw IP."""
    import struct
    for lt in (1, 101):  # Ethernet, raw IP: an empty capture of that link type for tcpdump -r
        empty = tmp_path / f"{lt}.pcap"
        empty.write_bytes(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 262144, lt))
        for expr in ("tcp port 8080 and host 10.0.0.5", "ip6 and tcp", "tcp[13] & 2 != 0"):
            p = subprocess.run([TCPDUMP, "-r", str(empty), "-ddd", expr], capture_output=True, text=True, check=True)
            lines = p.stdout.split()
            want = [tuple(int(x) for x in lines[1 + 4 * i:5 + 4 * i]) for i in range(int(lines[0]))]
            assert compile_filter(expr, lt).instructions == want


def test_filter_on_a_read_only_mapping_reads_in_place() -> None:
    """bpf_filter gets the packet's address in the mapping (no copy), read-only as it is."""
    r = open_capture("config/samples/http-sample.pcap")
    prog = compile_filter("tcp port 80 or tcp port 8080", 1)
    with BufferAddress(r.view) as base:
        got = [prog.matches(base + o, e - o) for _, _, o, e in r]
    r2 = open_capture("config/samples/http-sample.pcap")
    assert got == [prog.matches_bytes(bytes(r2.view[o:e])) for _, _, o, e in r2]
    assert any(got)


@pytest.mark.skipif(os.geteuid() != 0, reason="AF_PACKET needs root")
def test_live_attaches_the_expression_in_the_kernel() -> None:
    """Traffic to two servers; ``bpf_filter: port A`` lets only A's packets up to the receiver."""
    from receivers.live import LiveConfig, LiveReceiver
    from tests.support.capture import wait_until
    from tests.support.live_http import EventCollector

    with http_server() as a, http_server() as b:
        sink = EventCollector()
        rx = LiveReceiver("live", LiveConfig(bpf_filter=f"port {a.port}", ring={"enabled": False}), sink)
        rx.start()
        try:
            run_client(_CLIENT, str(a.port), str(b.port))
            assert wait_until(lambda: sum(1 for e in sink.events if e.kind.name in ("CLOSE", "RESET")) >= 2)
        finally:
            rx.shutdown()
        # with bpf_filter nothing is filtered in Python (no port set there): B's packets never
        # reached the socket, the kernel dropped them
        assert rx._py_ports is None
        ports = {p for e in sink.events for p in (e.sport, e.dport)}
        assert a.port in ports and b.port not in ports
        assert rx.stats["drops"] == {}
    with pytest.raises(ValidationError, match="bad BPF filter 'port': "):
        LiveConfig(bpf_filter="port")
