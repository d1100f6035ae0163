"""Replay a capture through the real pcap receiver and the protocols stage; collect spans.

No exporter: the spans are handed back as objects so tests can assert on them.
"""

from __future__ import annotations

import os
from typing import Any

from processors.protocols.processor import ProtocolsProcessor
from service.model import Span

__all__ = ["replay", "replay_spans"]


class _Collect:
    def __init__(self) -> None:
        self.spans: list[Span] = []

    def consume_spans(self, spans: list[Span]) -> None:
        self.spans.extend(spans)


def replay(pcap_path: str | os.PathLike[str], protocols_config: dict[str, Any] | None = None,
           timeout: float = 120.0) -> tuple[list[Span], dict[str, Any], dict[str, Any]]:
    """(spans, receiver stats, protocols-stage stats) of one capture replay."""
    from receivers.pcap import PcapReceiver

    sink = _Collect()
    proc = ProtocolsProcessor("protocols", dict(protocols_config or {}), sink)
    proc.start()
    recv = PcapReceiver("pcap", {"path": str(pcap_path), "progress": False}, proc)
    recv.start()
    try:
        if not recv.wait(timeout):
            raise TimeoutError(f"replay of {pcap_path} did not finish in {timeout}s")
    finally:
        recv.shutdown()
        proc.shutdown()  # ends open connections: close-delimited bodies, resets
    return sink.spans, recv.stats, proc.stats


def replay_spans(pcap_path: str | os.PathLike[str], protocols_config: dict[str, Any] | None = None) -> list[Span]:
    """The spans the pcap receiver + protocols stage make of ``pcap_path``."""
    return replay(pcap_path, protocols_config)[0]
