"""BPF filter expressions (tcpdump's ``-f``/``-r ... EXPR`` language), compiled by libpcap.

Contract: ``compile_filter(expression, linktype, snaplen)`` returns a ``BpfProgram`` whose
``instructions`` are the classic BPF that libpcap's ``pcap_compile`` made (optimised, as
tcpdump does) and whose ``matches(address, caplen, wirelen)`` runs libpcap's own
interpreter (``bpf_filter``) on a packet in memory: exactly what ``pcap_offline_filter``
does for a packet of a capture file, so a capture replayed with an expression keeps the
packets ``tcpdump -r FILE EXPR`` keeps. The ``live`` receiver attaches the instructions to
its socket (``SO_ATTACH_FILTER``), so the kernel drops the rest.

The binding is ctypes over Debian's ``libpcap.so.0.8`` (package ``libpcap0.8``, which
tcpdump depends on); no headers, no compiler. A bad expression raises ``FilterError``
with libpcap's message (``syntax error``, ``unknown host 'x'``); a missing libpcap raises it
with what to install.

``BufferAddress`` gives the address of a (read-only) buffer without copying it, through
the buffer protocol, so a mapped capture's packets go to ``bpf_filter`` in place.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import threading
from typing import Any

__all__ = ["BpfProgram", "BufferAddress", "FilterError", "compile_filter", "libpcap_version"]

#: libpcap's PCAP_NETMASK_UNKNOWN: ``ip broadcast`` then fails to compile, as in tcpdump -r.
PCAP_NETMASK_UNKNOWN = 0xFFFFFFFF
#: A snapshot length for compiling: libpcap's MAXIMUM_SNAPLEN. The program returns it for a
#: match (the kernel keeps that many bytes of the packet); the live receiver passes its own.
DEFAULT_SNAPLEN = 262144


#: LINKTYPE_ values (capture files) whose DLT_ value (what pcap_open_dead takes) differs, as
#: libpcap's own linktype_to_dlt maps them on Linux (pcap-common.c): LINKTYPE_ATM_RFC1483,
#: LINKTYPE_RAW, LINKTYPE_SLIP_BSDOS, LINKTYPE_PPP_BSDOS.
_LINKTYPE_TO_DLT = {100: 11, 101: 12, 102: 15, 103: 16}


class FilterError(ValueError):
    """A filter expression that does not compile, or no libpcap to compile it with."""


class _BpfInsn(ctypes.Structure):
    _fields_ = [("code", ctypes.c_ushort), ("jt", ctypes.c_ubyte), ("jf", ctypes.c_ubyte), ("k", ctypes.c_uint32)]


class _BpfProgram(ctypes.Structure):
    _fields_ = [("bf_len", ctypes.c_uint), ("bf_insns", ctypes.POINTER(_BpfInsn))]


_lib: ctypes.CDLL | None = None
# pcap_compile is not thread-safe before libpcap 1.8 and its error buffer is per handle:
# one compile at a time is plenty (it runs once per filter and link type).
_compile_lock = threading.Lock()


def _load() -> ctypes.CDLL:
    global _lib
    if _lib is not None:
        return _lib
    lib = None
    for name in ("libpcap.so.0.8", "libpcap.so.1", ctypes.util.find_library("pcap")):
        if not name:
            continue
        try:
            lib = ctypes.CDLL(name)
            break
        except OSError:
            continue
    if lib is None:
        raise FilterError("BPF filter expressions need libpcap: install it (Debian: apt-get install libpcap0.8)")
    vp, cp, i, u = ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int, ctypes.c_uint
    sigs: dict[str, tuple[Any, list[Any]]] = {
        "pcap_open_dead": (vp, [i, i]),
        "pcap_compile": (i, [vp, ctypes.POINTER(_BpfProgram), cp, i, ctypes.c_uint32]),
        "pcap_geterr": (cp, [vp]),
        "pcap_freecode": (None, [ctypes.POINTER(_BpfProgram)]),
        "pcap_close": (None, [vp]),
        "pcap_lib_version": (cp, []),
        "bpf_filter": (u, [ctypes.POINTER(_BpfInsn), vp, u, u]),
    }
    for fn, (res, args) in sigs.items():
        f = getattr(lib, fn)
        f.restype, f.argtypes = res, args
    _lib = lib
    return lib


def libpcap_version() -> str:
    """libpcap's own version line (``libpcap version 1.10.3 (with TPACKET_V3)``)."""
    return (_load().pcap_lib_version() or b"").decode(errors="replace")


class BpfProgram:
    """One compiled expression for one link type (see the module docstring)."""

    __slots__ = ("_filter", "_insns", "expression", "instructions", "linktype")

    def __init__(self, expression: str, linktype: int, instructions: list[tuple[int, int, int, int]]) -> None:
        self.expression = expression
        self.linktype = linktype
        #: (code, jt, jf, k) per instruction, as ``tcpdump -d``/``-ddd`` shows them.
        self.instructions = instructions
        arr = (_BpfInsn * len(instructions))(*(_BpfInsn(*ins) for ins in instructions))
        self._insns = arr
        self._filter = _load().bpf_filter

    def matches(self, address: int, caplen: int, wirelen: int | None = None) -> bool:
        """Whether the packet of ``caplen`` bytes at ``address`` passes (``pcap_offline_filter``).

        ``wirelen`` is its length on the wire (what ``len``/``greater`` test); the captured
        length when not given.
        """
        return self._filter(self._insns, address, caplen if wirelen is None else wirelen, caplen) != 0

    def matches_bytes(self, data: bytes | bytearray | memoryview, wirelen: int | None = None) -> bool:
        """``matches`` for a packet held in a Python buffer (tests, one-off checks)."""
        with BufferAddress(data) as addr:
            return self.matches(addr, len(memoryview(data)), wirelen)


def compile_filter(expression: str, linktype: int, snaplen: int = DEFAULT_SNAPLEN, optimize: bool = True) -> BpfProgram:
    """Compile ``expression`` for captures of ``linktype`` (a LINKTYPE_ number, as files carry).

    Raises:
        FilterError: the expression does not compile (libpcap's message), or no libpcap.
    """
    lib = _load()
    with _compile_lock:
        handle = lib.pcap_open_dead(_LINKTYPE_TO_DLT.get(linktype, linktype), snaplen)
        if not handle:
            raise FilterError(f"libpcap cannot compile for link type {linktype}")
        prog = _BpfProgram()
        try:
            if lib.pcap_compile(handle, ctypes.byref(prog), expression.encode(), 1 if optimize else 0,
                                PCAP_NETMASK_UNKNOWN) != 0:
                why = (lib.pcap_geterr(handle) or b"").decode(errors="replace")
                raise FilterError(f"bad BPF filter {expression!r}: {why}")
            try:
                insns = [(prog.bf_insns[n].code, prog.bf_insns[n].jt, prog.bf_insns[n].jf, prog.bf_insns[n].k)
                         for n in range(prog.bf_len)]
            finally:
                lib.pcap_freecode(ctypes.byref(prog))
        finally:
            lib.pcap_close(handle)
    return BpfProgram(expression, linktype, insns)


class _PyBuffer(ctypes.Structure):
    _fields_ = [("buf", ctypes.c_void_p), ("obj", ctypes.py_object), ("len", ctypes.c_ssize_t),
                ("itemsize", ctypes.c_ssize_t), ("readonly", ctypes.c_int), ("ndim", ctypes.c_int),
                ("format", ctypes.c_char_p), ("shape", ctypes.c_void_p), ("strides", ctypes.c_void_p),
                ("suboffsets", ctypes.c_void_p), ("internal", ctypes.c_void_p)]


_get_buffer = ctypes.pythonapi.PyObject_GetBuffer
_get_buffer.argtypes = [ctypes.py_object, ctypes.POINTER(_PyBuffer), ctypes.c_int]
_get_buffer.restype = ctypes.c_int
_release_buffer = ctypes.pythonapi.PyBuffer_Release
_release_buffer.argtypes = [ctypes.POINTER(_PyBuffer)]
_release_buffer.restype = None
_PyBUF_SIMPLE = 0


class BufferAddress:
    """``with BufferAddress(buf) as addr:`` the address of ``buf``'s first byte (no copy).

    Works for read-only buffers (a memoryview of a read-only mapping, ``bytes``), which
    ``ctypes.from_buffer`` refuses. The buffer is held (and a mapping cannot be closed)
    until the block ends or ``release()`` is called.
    """

    __slots__ = ("_held", "_pybuf")

    def __init__(self, buf: Any) -> None:
        self._pybuf = _PyBuffer()
        if _get_buffer(buf, ctypes.byref(self._pybuf), _PyBUF_SIMPLE) != 0:
            raise BufferError("no contiguous buffer")
        self._held = True

    @property
    def address(self) -> int:
        return self._pybuf.buf or 0

    def release(self) -> None:
        if self._held:
            self._held = False
            _release_buffer(ctypes.byref(self._pybuf))

    def __enter__(self) -> int:
        return self.address

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __del__(self) -> None:
        self.release()


class OfflineFilter:
    """An expression applied to the packets of capture files, ``pcap_offline_filter``-style:
    compiled once per link type met, run by libpcap on each frame where it lies.

    ``rebase(view)`` before the packets of a (new) buffer, then ``keep(linktype, off, end)``
    for the frame at ``view[off:end]``; ``close()`` lets the buffer go.

    Raises (``keep``):
        FilterError: the expression does not compile for a link type met in the file
        (``ether host`` on raw IP), as tcpdump refuses such a file.
    """

    __slots__ = ("_hold", "_progs", "base", "expression", "snaplen")

    def __init__(self, expression: str, snaplen: int = DEFAULT_SNAPLEN) -> None:
        self.expression = expression
        self.snaplen = snaplen
        self._progs: dict[int, BpfProgram] = {}
        self._hold: BufferAddress | None = None
        self.base = 0

    def rebase(self, view: Any) -> None:
        self.close()
        if len(view):
            self._hold = BufferAddress(view)
            self.base = self._hold.address

    def program(self, linktype: int) -> BpfProgram:
        p = self._progs.get(linktype)
        if p is None:
            p = self._progs[linktype] = compile_filter(self.expression, linktype, self.snaplen)
        return p

    def keep(self, linktype: int, off: int, end: int) -> bool:
        p = self._progs.get(linktype) or self.program(linktype)
        return p._filter(p._insns, self.base + off, end - off, end - off) != 0

    def close(self) -> None:
        if self._hold is not None:
            self._hold.release()
            self._hold = None
            self.base = 0
