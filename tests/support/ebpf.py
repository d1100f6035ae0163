"""The skip marker of tests that need the eBPF receiver's kernel features.

They run wherever the kernel has them (CI here, as root); elsewhere the module is
skipped with the kernel's reason printed, never silently.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest

from receivers.ebpf import BpfError
from receivers.ebpf.libbpf import check_environment


def needs_ebpf(module: str) -> pytest.MarkDecorator:
    """``pytestmark = needs_ebpf(__name__)``."""
    try:
        check_environment()
    except BpfError as e:  # pragma: no cover - depends on the machine
        print(f"{module}: skipping, {e}", file=sys.stderr)
        return pytest.mark.skipif(True, reason=str(e))
    return pytest.mark.skipif(False, reason="ok")


@contextlib.contextmanager
def traced(ports: list[int], settle: float = 1.0, stage_config: dict[str, Any] | None = None,
           **config: Any) -> Iterator[tuple[Any, Any]]:
    """``with traced([port]) as (rx, sink):`` run clients; on leaving, the records still in
    the ring are given ``settle`` seconds, the receiver stops, then the protocols stage drains
    into ``sink.spans``. Messages up to 1 MiB on each port are kept whole."""
    from processors.protocols.processor import ProtocolsProcessor
    from receivers.ebpf import EbpfConfig, EbpfReceiver
    from tests.support.live_http import SpanSink

    sink = SpanSink()
    stage = ProtocolsProcessor("protocols", stage_config or {}, sink)
    config.setdefault("max_message_bytes_per_port", {p: 1 << 20 for p in ports})
    rx = EbpfReceiver("ebpf", EbpfConfig(ports=ports, **config), stage)
    rx.start()
    try:
        yield rx, sink
        time.sleep(settle)
    finally:
        rx.shutdown()
        stage.shutdown()
