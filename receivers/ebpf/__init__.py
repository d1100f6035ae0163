"""eBPF receiver package: the BPF program (bpf/), its ctypes loader (libbpf.py) and the component."""

from .libbpf import BpfError
from .receiver import EbpfConfig, EbpfReceiver

__all__ = ["BpfError", "EbpfConfig", "EbpfReceiver"]
