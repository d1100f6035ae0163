"""OpenSSL's SSL_read/SSL_write in the traced processes: finding them and their uprobes (issue 15).

Contract: ``SslProbes(obj, config)`` attaches the uprobe programs of ``bpf/wirespan.bpf.c``
(``up_ssl_*`` at function entry, ``uret_ssl_*`` at their returns, ``up_ssl_set_fd``) to
every ELF file that defines ``SSL_read``/``SSL_write`` (OpenSSL 1.1.1 and 3.x; BoringSSL and
LibreSSL keep the same names and signatures where they export them) and that a traced process
maps, once per file (a uprobe is set on the inode, for every process mapping it):

- at ``start()``: the system's ``libssl`` from the dynamic linker's cache (so processes that
  load it later are traced from their first call), every ``libssl*`` mapped by a process
  (``/proc/*/maps``), every process's executable that exports the symbols (OpenSSL linked
  statically, as Node.js does), and the configured ``libraries``;
- ``exec(pid)``: a process started later (the ``sched_process_exec`` tracepoint's record):
  looked at again after ``EXEC_DELAYS_S``, while its dynamic linker maps its libraries;
- every ``rescan_interval``: all processes again, for libraries loaded with ``dlopen``
  (Python's ``ssl`` module, psycopg's bundled libpq), at most ``MAX_SCAN_PIDS`` a pass.

A file without the symbols (NSS's ``libssl3.so``, a stripped static build such as grpcio's
BoringSSL) is remembered and counted as ``no_symbols``; nothing is attached to it. Work
happens in one thread, so the ring reader never waits for a scan. No I/O beyond /proc and
the ELF files' headers and symbol tables (read through ``mmap``).
"""

from __future__ import annotations

import logging
import mmap
import os
import re
import struct
import subprocess
import threading
import time
from collections import deque
from typing import Any

from .libbpf import BpfError, BpfObject

__all__ = ["SslProbes", "elf_function_offsets", "SSL_FUNCTIONS"]

log = logging.getLogger("wirespan.receivers.ebpf")

#: function -> (entry program, return program or None)
SSL_FUNCTIONS: dict[str, tuple[str, str | None]] = {
    "SSL_write": ("up_ssl_write", "uret_ssl_call"),
    "SSL_read": ("up_ssl_read", "uret_ssl_call"),
    "SSL_write_ex": ("up_ssl_write_ex", "uret_ssl_call"),
    "SSL_read_ex": ("up_ssl_read_ex", "uret_ssl_call"),
    # the handshake: binds an SSL* to its socket before the first read/write (memory BIOs:
    # Node.js, asyncio write the handshake's output right after the call returns)
    "SSL_do_handshake": ("up_ssl_handshake", "uret_ssl_handshake"),
    "SSL_connect": ("up_ssl_handshake", "uret_ssl_handshake"),
    "SSL_accept": ("up_ssl_handshake", "uret_ssl_handshake"),
    "SSL_set_fd": ("up_ssl_set_fd", None),
}
#: The two a file must define to be attached to.
REQUIRED = ("SSL_read", "SSL_write")
#: File names looked at in /proc/PID/maps (the executable is looked at whatever its name).
LIB_NAME = re.compile(r"^libssl[.-].*\.so(\.[0-9.]+)?$|^libssl\.so(\.[0-9.]+)?$")
#: After an exec, when the process's mappings are looked at (its dynamic linker maps the
#: DT_NEEDED libraries within milliseconds; the later looks catch early dlopens).
EXEC_DELAYS_S = (0.0, 0.05, 0.5, 3.0)
#: Processes looked at per periodic pass (the rest wait for the next pass).
MAX_SCAN_PIDS = 8192
#: Exec'd processes waiting to be looked at; beyond it the oldest are left to the rescan.
MAX_PENDING_EXECS = 4096

_EHDR = struct.Struct("<16sHHIQQQIHHHHHH")
_PHDR = struct.Struct("<IIQQQQQQ")
_SHDR = struct.Struct("<IIQQQQIIQQ")
_SYM = struct.Struct("<IBBHQQ")
_PT_LOAD, _SHT_SYMTAB, _SHT_DYNSYM = 1, 2, 11
_STT_FUNC, _STT_GNU_IFUNC = 2, 10


def elf_function_offsets(path: str, names: tuple[str, ...] | list[str]) -> dict[str, int]:
    """File offsets of the functions ``names`` defined in the ELF64 little-endian file ``path``.

    Reads ``.dynsym`` (exported symbols) and ``.symtab`` when present; a symbol's address is
    turned into a file offset through the PT_LOAD segment that holds it (what a uprobe takes).
    Returns only the names found; ``{}`` for a file that is not such an ELF or is unreadable.
    """
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < _EHDR.size:
                return {}
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except (OSError, ValueError):
        return {}
    try:
        return _offsets(mm, set(names))
    except (struct.error, IndexError, ValueError):
        return {}  # a damaged file: nothing to attach
    finally:
        mm.close()


def _offsets(mm: mmap.mmap, want: set[str]) -> dict[str, int]:
    (ident, _type, _machine, _ver, _entry, phoff, shoff, _flags, _ehsize, phentsize, phnum, shentsize, shnum,
     _shstrndx) = _EHDR.unpack_from(mm, 0)
    if ident[:4] != b"\x7fELF" or ident[4] != 2 or ident[5] != 1:
        return {}  # not ELF64 little-endian
    loads = []
    for i in range(phnum):
        p_type, _pf, p_offset, p_vaddr, _pa, p_filesz, _memsz, _al = _PHDR.unpack_from(mm, phoff + i * phentsize)
        if p_type == _PT_LOAD:
            loads.append((p_vaddr, p_vaddr + p_filesz, p_offset))
    sections = [_SHDR.unpack_from(mm, shoff + i * shentsize) for i in range(shnum)] if shoff else []
    encoded = {n.encode(): n for n in want}
    found: dict[str, int] = {}
    for sh in sorted(sections, key=lambda s: s[1] != _SHT_DYNSYM):  # .dynsym first
        _name, sh_type, _fl, _addr, sh_offset, sh_size, sh_link, _info, _align, sh_entsize = sh
        if sh_type not in (_SHT_DYNSYM, _SHT_SYMTAB) or sh_link >= len(sections) or not sh_entsize:
            continue
        str_off, str_size = sections[sh_link][4], sections[sh_link][5]
        strtab = mm[str_off:str_off + str_size]
        # The names' offsets in the string table first: then symbols compare as integers.
        name_at: dict[int, str] = {}
        for raw, name in encoded.items():
            i = strtab.find(b"\0" + raw + b"\0")
            while i >= 0:
                name_at[i + 1] = name
                i = strtab.find(b"\0" + raw + b"\0", i + 1)
            if strtab.startswith(raw + b"\0"):
                name_at[0] = name
        if not name_at:
            continue
        data = mm[sh_offset:sh_offset + sh_size - sh_size % _SYM.size]
        # Find each name's symbols by their st_name (the entry's first 4 bytes) with bytes.find:
        # a 100 MB executable (Node.js) has ~100k symbols, too many to unpack one by one here.
        for name_off, name in name_at.items():
            key = name_off.to_bytes(4, "little")
            i = data.find(key)
            while i >= 0 and name not in found:
                if i % _SYM.size == 0:
                    _n, st_info, _other, st_shndx, st_value, _sz = _SYM.unpack_from(data, i)
                    if st_shndx != 0 and st_value and st_info & 0xF in (_STT_FUNC, _STT_GNU_IFUNC):
                        for lo, hi, off in loads:
                            if lo <= st_value < hi:
                                found[name] = st_value - lo + off
                                break
                i = data.find(key, i + 1)
        if len(found) == len(want):
            break
    return found


def _system_libssl() -> list[str]:
    """``libssl`` paths of the dynamic linker's cache (``ldconfig -p``), else the usual places."""
    paths: list[str] = []
    try:
        out = subprocess.run(["ldconfig", "-p"], capture_output=True, text=True, timeout=5).stdout
        for line in out.splitlines():
            name, _, path = line.strip().partition(" => ")
            if LIB_NAME.match(name.split(" ", 1)[0]) and os.path.isfile(path):
                paths.append(path)
    except (OSError, subprocess.SubprocessError):
        pass
    if not paths:
        for d in ("/lib/x86_64-linux-gnu", "/usr/lib/x86_64-linux-gnu", "/lib64", "/usr/lib64", "/usr/lib"):
            try:
                paths += [os.path.join(d, f) for f in os.listdir(d) if LIB_NAME.match(f)]
            except OSError:
                pass
    return paths


def _maps_files(pid: int) -> list[tuple[str, int, int]]:
    """(path, dev, inode) of the executable file mappings of ``pid`` named like a libssl."""
    out = []
    try:
        with open(f"/proc/{pid}/maps", "rb") as f:
            data = f.read()
    except OSError:
        return out
    seen = set()
    for line in data.splitlines():
        parts = line.split(None, 5)
        if len(parts) < 6 or b"x" not in parts[1]:
            continue
        path = parts[5].decode(errors="replace")
        if not path.startswith("/") or path.endswith(" (deleted)"):
            continue
        if not LIB_NAME.match(os.path.basename(path)):
            continue
        try:
            maj, mnr = (int(x, 16) for x in parts[3].split(b":"))
            key = (path, os.makedev(maj, mnr), int(parts[4]))
        except ValueError:
            continue
        if key not in seen:
            seen.add(key)
            out.append(key)
    return out


class SslProbes:
    """Keeps the OpenSSL uprobes attached to what the traced processes map (see the module doc)."""

    def __init__(self, obj: BpfObject, libraries: list[str], rescan_interval: float,
                 want_pid: Any = None, name: str = "ebpf") -> None:
        self.obj = obj
        self.libraries = list(libraries)
        self.rescan_interval = rescan_interval
        self.want_pid = want_pid  # pid -> bool (the receiver's pid filter), or None: every process
        self.name = name
        #: (dev, inode) -> path attached, or None: looked at, no OpenSSL symbols there
        self.files: dict[tuple[int, int], str | None] = {}
        #: executables already looked at, by (dev, inode): whether they export the symbols
        self._exes: dict[tuple[int, int], bool] = {}
        self.stats = {"files_attached": 0, "no_symbols": 0, "attach_failures": 0, "scans": 0,
                      "execs_seen": 0, "execs_dropped": 0}
        self.errors: list[str] = []
        self._lock = threading.Lock()
        self._pending: deque[tuple[float, int, int]] = deque()  # (due, pid, step)
        self._cv = threading.Condition(self._lock)
        self._stop = False
        self._thread: threading.Thread | None = None

    # -------------------------------------------------------------- attaching
    def attach_file(self, path: str, st: os.stat_result | None = None) -> bool:
        """Attach to ``path`` unless its inode was looked at already; True if it is attached now."""
        try:
            st = st or os.stat(path)
        except OSError:
            return False
        key = (st.st_dev, st.st_ino)
        if key in self.files:
            return False
        offsets = elf_function_offsets(path, list(SSL_FUNCTIONS))
        if not all(n in offsets for n in REQUIRED):
            self.files[key] = None
            self.stats["no_symbols"] += 1
            return False
        links = []
        try:
            for fn, off in offsets.items():
                prog, ret = SSL_FUNCTIONS[fn]
                links.append(self.obj.attach_uprobe(prog, path, off))
                if ret:
                    links.append(self.obj.attach_uprobe(ret, path, off, retprobe=True))
        except BpfError as e:
            for link in links:
                self.obj.detach(link)
            self.files[key] = None
            self.stats["attach_failures"] += 1
            if len(self.errors) < 20:
                self.errors.append(str(e))
            log.warning("%s: TLS: %s", self.name, e)
            return False
        self.files[key] = path
        self.stats["files_attached"] += 1
        log.info("%s: TLS: uprobes on %s (%s)", self.name, path, ", ".join(sorted(offsets)))
        return True

    def scan_pid(self, pid: int) -> int:
        """Attach to what ``pid`` maps (libssl files, its executable); the number of new files."""
        n = 0
        root = f"/proc/{pid}/root"
        for path, dev, ino in _maps_files(pid):
            if (dev, ino) in self.files:
                continue
            st = None
            for p in (path, root + path):  # its own path when it names the same file (no namespace)
                try:
                    st = os.stat(p)
                except OSError:
                    continue
                if (st.st_dev, st.st_ino) == (dev, ino):
                    break
                st = None  # replaced on disk since it was mapped, or another mount namespace's
            if st is not None:
                n += self.attach_file(p, st)
        exe = f"/proc/{pid}/exe"
        try:
            st = os.stat(exe)
        except OSError:
            return n
        key = (st.st_dev, st.st_ino)
        if key not in self._exes and key not in self.files:
            # An executable is looked at once: most export no SSL_* symbols (cached as False).
            offsets = elf_function_offsets(exe, list(REQUIRED))
            self._exes[key] = len(offsets) == len(REQUIRED)
            if len(self._exes) > 65536:
                self._exes.clear()
            if self._exes[key]:
                try:
                    path = os.readlink(exe)
                except OSError:
                    path = exe
                target = path if os.path.isfile(path) and _same(path, st) else exe
                n += self.attach_file(target, st)
        return n

    def scan_all(self) -> int:
        """Every process (the pid filter applied), at most ``MAX_SCAN_PIDS``; new files attached."""
        self.stats["scans"] += 1
        n = 0
        pids = [int(d) for d in os.listdir("/proc") if d.isdigit()]
        me = os.getpid()
        done = 0
        for pid in pids:
            if pid == me or (self.want_pid is not None and not self.want_pid(pid)):
                continue
            n += self.scan_pid(pid)
            done += 1
            if done >= MAX_SCAN_PIDS:
                break
        return n

    def start(self) -> None:
        """Attach what is there now (synchronously: the receiver traces TLS from its first record),
        then keep watching in a thread."""
        for path in _system_libssl():
            self.attach_file(path)
        for path in self.libraries:
            if not self.attach_file(path) and not any(v == path for v in self.files.values()):
                log.warning("%s: TLS: library %s: not found or no SSL_read/SSL_write symbols", self.name, path)
        self.scan_all()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name=f"ebpf-{self.name}-tls", daemon=True)
        self._thread.start()

    def exec(self, pid: int) -> None:
        """A process exec'd (from the dispatcher thread): look at it soon, without blocking."""
        with self._cv:
            self.stats["execs_seen"] += 1
            if len(self._pending) >= MAX_PENDING_EXECS:
                self._pending.popleft()
                self.stats["execs_dropped"] += 1
            self._pending.append((time.monotonic() + EXEC_DELAYS_S[0], pid, 0))
            self._cv.notify()

    def stop(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    def _run(self) -> None:
        next_scan = time.monotonic() + self.rescan_interval
        while True:
            with self._cv:
                if self._stop:
                    return
                now = time.monotonic()
                due = [e for e in self._pending if e[0] <= now]
                if not due:
                    wake = min([next_scan, *(e[0] for e in self._pending)])
                    self._cv.wait(max(0.0, wake - now))
                    if self._stop:
                        return
                    now = time.monotonic()
                    due = [e for e in self._pending if e[0] <= now]
                if due:
                    keep = [e for e in self._pending if e[0] > now]
                    self._pending.clear()
                    self._pending.extend(keep)
            try:
                for _t, pid, step in due:
                    if not os.path.exists(f"/proc/{pid}"):
                        continue
                    self.scan_pid(pid)
                    if step + 1 < len(EXEC_DELAYS_S):
                        with self._cv:
                            self._pending.append((time.monotonic() + EXEC_DELAYS_S[step + 1] -
                                                  EXEC_DELAYS_S[step], pid, step + 1))
                if time.monotonic() >= next_scan:
                    self.scan_all()
                    next_scan = time.monotonic() + self.rescan_interval
            except Exception:
                log.exception("%s: TLS library scan failed", self.name)
                time.sleep(1)


def _same(path: str, st: os.stat_result) -> bool:
    try:
        s = os.stat(path)
    except OSError:
        return False
    return (s.st_dev, s.st_ino) == (st.st_dev, st.st_ino)
