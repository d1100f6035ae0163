"""Replay a capture through the real pcap receiver and the protocols stage; collect spans.

No exporter: the spans are handed back as objects so tests can assert on them.
"""

from __future__ import annotations

import os
from typing import Any

from processors.protocols.processor import ProtocolsProcessor
from service.model import Span

__all__ = ["assert_clean", "conversations", "epoch_ns", "replay", "replay_spans", "server_port", "tshark_rows"]


class _Collect:
    def __init__(self) -> None:
        self.spans: list[Span] = []

    def consume_spans(self, spans: list[Span]) -> None:
        self.spans.extend(spans)


def replay(pcap_path: str | os.PathLike[str], protocols_config: dict[str, Any] | None = None,
           timeout: float = 120.0) -> tuple[list[Span], dict[str, Any], dict[str, Any]]:
    """(spans, receiver stats, protocols-stage stats) of one capture replay."""

    sink = _Collect()
    proc = ProtocolsProcessor("protocols", dict(protocols_config or {}), sink)
    proc.start()
    try:
        recv = _receive(pcap_path, proc, timeout)
    finally:
        proc.shutdown()  # ends open connections: close-delimited bodies, resets
    return sink.spans, recv.stats, proc.stats


def _receive(pcap_path: str | os.PathLike[str], sink: Any, timeout: float) -> Any:
    """The pcap receiver run over ``pcap_path`` into ``sink`` to the end; the receiver."""
    from receivers.pcap import PcapReceiver

    recv = PcapReceiver("pcap", {"path": str(pcap_path), "progress": False}, sink)
    recv.start()
    try:
        if not recv.wait(timeout):
            raise TimeoutError(f"reading {pcap_path} did not finish in {timeout}s")
    finally:
        recv.shutdown()
    return recv


def replay_spans(pcap_path: str | os.PathLike[str], protocols_config: dict[str, Any] | None = None) -> list[Span]:
    """The spans the pcap receiver + protocols stage make of ``pcap_path``."""
    return replay(pcap_path, protocols_config)[0]


class _Data:
    def __init__(self) -> None:
        self.conns: dict[Any, list[tuple[bool, bytes]]] = {}
        self.port: int | None = None

    def consume_events(self, events: list[Any]) -> None:
        from service.model import EventKind

        for e in events:
            if e.kind == EventKind.DATA and e.payload:
                if self.port is None:
                    self.port = e.dport if e.client_is_src else e.sport
                self.conns.setdefault(e.conn_id, []).append((bool(e.client_is_src), bytes(e.payload)))


def conversations(pcap_path: str | os.PathLike[str], timeout: float = 60.0) -> list[list[tuple[bool, bytes]]]:
    """Each connection of a capture as the pcap receiver hands its data on: (from the client,
    bytes) a segment, in capture order (the recorded fixtures have their SYNs: the roles are known)."""
    return list(_read(pcap_path, timeout).conns.values())


def server_port(pcap_path: str | os.PathLike[str], timeout: float = 60.0) -> int:
    """The server port of a capture's first data (a recorded fixture's one server)."""
    port = _read(pcap_path, timeout).port
    assert port is not None, f"{pcap_path}: no data"
    return port


def _read(pcap_path: str | os.PathLike[str], timeout: float) -> _Data:
    sink = _Data()
    _receive(pcap_path, sink, timeout)
    return sink


def assert_clean(recv: dict[str, Any], stats: dict[str, Any], protocol: str, connections: int, packets: int,
                 spans: int) -> None:
    """A replay that lost nothing: no drop, gap, error or cut in the receiver, no drop in the stage,
    every connection the one protocol's, and the counts a recorded fixture has."""
    assert stats["drops"] == {}
    assert stats["connections"] == connections and stats["protocols"] == {protocol: connections}
    assert stats["spans"] == spans
    assert recv["packets"] == packets and recv["connections"] == connections
    assert recv["drops"] == {} and recv["gap_bytes"] == {} and recv["errors"] == [] and recv["truncated"] == []


def tshark_rows(pcap_path: str | os.PathLike[str], *args: str) -> list[list[str]]:
    """tshark's tab-separated fields of ``pcap_path`` (``args``: its options), a row a line: the
    oracle the fixture tests compare spans with; skips the test without tshark."""
    import shutil
    import subprocess

    import pytest

    tshark = shutil.which("tshark")
    if tshark is None:
        pytest.skip("tshark not installed: the oracle needs it")
    out = subprocess.run([tshark, "-r", str(pcap_path), *args], capture_output=True, text=True, check=True).stdout
    return [line.split("\t") for line in out.splitlines() if line.strip()]


def epoch_ns(epoch: str) -> int:
    """tshark's ``frame.time_epoch`` ("1764000000.123456789") as integer nanoseconds, exactly."""
    sec, _, frac = epoch.partition(".")
    return int(sec) * 1_000_000_000 + int(frac.ljust(9, "0")[:9])
