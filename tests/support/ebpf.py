"""The skip marker of tests that need the eBPF receiver's kernel features.

They run wherever the kernel has them (CI here, as root); elsewhere the module is
skipped with the kernel's reason printed, never silently.
"""

from __future__ import annotations

import sys

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
