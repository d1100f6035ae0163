"""A thin ctypes binding over the system ``libbpf.so.1`` (no bcc, no headers).

Only what the eBPF receiver needs: open/load an object, set a map's size before
load, write config maps, attach every program, poll a ring buffer, read per-CPU
counters, and tear it all down. Failures raise ``BpfError`` with one line that
names what is missing (root, BTF, tracefs, the kernel feature), never a ctypes
traceback. libbpf >= 1.0 semantics: functions return NULL / -errno and set errno.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import mmap
import os
import select
import struct
import subprocess
from collections.abc import Callable
from pathlib import Path

__all__ = ["BpfError", "BpfObject", "MmapRing", "RingBuffer", "SAMPLE_FN", "check_environment", "ensure_tracefs",
           "iter_chunk"]

BPF_ANY = 0
TRACEFS = Path("/sys/kernel/tracing")
BTF_VMLINUX = Path("/sys/kernel/btf/vmlinux")

#: int (*ring_buffer_sample_fn)(void *ctx, void *data, size_t size)
SAMPLE_FN = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t)
_PRINT_FN = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)


class BpfError(RuntimeError):
    """A one-line, user-facing reason the eBPF receiver cannot run."""


_lib: ctypes.CDLL | None = None


def _load() -> ctypes.CDLL:
    global _lib
    if _lib is not None:
        return _lib
    name = "libbpf.so.1"
    try:
        lib = ctypes.CDLL(name, use_errno=True)
    except OSError:
        found = ctypes.util.find_library("bpf")
        if not found:
            raise BpfError("libbpf.so.1 not found: install the libbpf1 package (Debian: apt-get install libbpf1)")
        lib = ctypes.CDLL(found, use_errno=True)
    vp, cp, i, u32 = ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int, ctypes.c_uint32
    sigs: dict[str, tuple[object, list[object]]] = {
        "bpf_object__open_file": (vp, [cp, vp]),
        "bpf_object__load": (i, [vp]),
        "bpf_object__close": (None, [vp]),
        "bpf_object__find_map_by_name": (vp, [vp, cp]),
        "bpf_object__next_program": (vp, [vp, vp]),
        "bpf_program__name": (cp, [vp]),
        "bpf_program__attach": (vp, [vp]),
        "bpf_object__find_program_by_name": (vp, [vp, cp]),
        "bpf_program__attach_uprobe": (vp, [vp, ctypes.c_bool, i, cp, ctypes.c_size_t]),
        "bpf_map__fd": (i, [vp]),
        "bpf_map__set_max_entries": (i, [vp, u32]),
        "bpf_map_update_elem": (i, [i, vp, vp, ctypes.c_uint64]),
        "bpf_map_lookup_elem": (i, [i, vp, vp]),
        "bpf_map_delete_elem": (i, [i, vp]),
        "bpf_map_get_next_key": (i, [i, vp, vp]),
        "bpf_link__destroy": (i, [vp]),
        "ring_buffer__new": (vp, [i, SAMPLE_FN, vp, vp]),
        "ring_buffer__poll": (i, [vp, i]),
        "ring_buffer__consume": (i, [vp]),
        "ring_buffer__free": (None, [vp]),
        "libbpf_num_possible_cpus": (i, []),
        "libbpf_set_print": (vp, [vp]),
    }
    for fn, (res, args) in sigs.items():
        f = getattr(lib, fn)
        f.restype = res
        f.argtypes = args
    _lib = lib
    _quiet_libbpf(lib)
    return lib


_print_cb: object = None
_last_log: list[str] = []


def _quiet_libbpf(lib: ctypes.CDLL) -> None:
    """Keep libbpf's stderr chatter out of the service log; remember the last lines for errors.

    The callback gets a printf format and a va_list; libc's vsnprintf expands it
    (a va_list is passed as a pointer on the ABIs we run on).
    """
    global _print_cb
    libc = ctypes.CDLL(None)
    vsnprintf = libc.vsnprintf
    vsnprintf.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_char_p, ctypes.c_void_p]
    buf = ctypes.create_string_buffer(4096)

    def cb(level: int, fmt: bytes, args: int) -> int:
        if level <= 1 and fmt:  # LIBBPF_WARN
            vsnprintf(buf, len(buf), fmt, args)
            _last_log.append(buf.value.decode(errors="replace").strip())
            del _last_log[:-40]
        return 0

    _print_cb = _PRINT_FN(cb)
    lib.libbpf_set_print(ctypes.cast(_print_cb, ctypes.c_void_p))


def _err(what: str, code: int | None = None) -> BpfError:
    e = abs(code) if code else ctypes.get_errno()
    hint = ""
    if e in (errno.EPERM, errno.EACCES):
        hint = " (needs root or CAP_BPF+CAP_PERFMON, and kernel.unprivileged_bpf_disabled/lockdown permitting)"
    elif e == errno.ENOENT:
        hint = " (the kernel lacks this tracepoint or BTF type)"
    elif e in (errno.EINVAL, errno.E2BIG, errno.ENOTSUP, errno.EOPNOTSUPP):
        hint = " (kernel too old or missing BPF ring buffers / BTF: needs Linux >= 5.8 with CONFIG_DEBUG_INFO_BTF)"
    return BpfError(f"{what}: {os.strerror(e) if e else 'failed'}{hint}")


def ensure_tracefs() -> None:
    """Attach by tracepoint needs tracefs; mount it when the system has not."""
    if (TRACEFS / "events").is_dir() or Path("/sys/kernel/debug/tracing/events").is_dir():
        return
    r = subprocess.run(["mount", "-t", "tracefs", "nodev", str(TRACEFS)], capture_output=True, text=True)
    if r.returncode != 0 or not (TRACEFS / "events").is_dir():
        msg = (r.stderr or "").strip().splitlines()
        raise BpfError(f"tracefs is not mounted and mounting it at {TRACEFS} failed"
                       f"{': ' + msg[-1] if msg else ''} (needs root)")


def check_environment() -> None:
    """Fail early, in one line, on what a user can fix."""
    if os.geteuid() != 0:
        raise BpfError("the ebpf receiver needs root (or CAP_BPF + CAP_PERFMON + CAP_SYS_RESOURCE); "
                       "use the 'live' or 'pcap' receiver otherwise")
    if not BTF_VMLINUX.exists():
        raise BpfError(f"kernel BTF missing ({BTF_VMLINUX}): the kernel needs CONFIG_DEBUG_INFO_BTF=y")
    _load()
    ensure_tracefs()


class BpfObject:
    """One loaded BPF object with its attached links; ``close()`` detaches everything."""

    def __init__(self, path: str | os.PathLike[str], map_sizes: dict[str, int] | None = None) -> None:
        self.lib = _load()
        self._obj: int | None = None
        self._links: list[int] = []
        p = str(path)
        if not os.path.exists(p):
            raise BpfError(f"BPF object {p} missing: run receivers/ebpf/build.sh (needs clang, libbpf-dev, bpftool)")
        ctypes.set_errno(0)
        obj = self.lib.bpf_object__open_file(p.encode(), None)
        if not obj:
            raise _err(f"opening {p}")
        self._obj = obj
        try:
            for name, size in (map_sizes or {}).items():
                m = self._map(name)
                rc = self.lib.bpf_map__set_max_entries(m, size)
                if rc:
                    raise _err(f"sizing map {name} to {size}", rc)
            rc = self.lib.bpf_object__load(obj)
            if rc:
                detail = f" [{'; '.join(_last_log[-2:])}]" if _last_log else ""
                raise _err(f"loading the BPF program into the kernel{detail}", rc)
        except BaseException:
            self.close()
            raise

    def _map(self, name: str) -> int:
        m = self.lib.bpf_object__find_map_by_name(self._obj, name.encode())
        if not m:
            raise BpfError(f"map {name} not in the BPF object (object and receiver out of sync: rebuild)")
        return m

    def map_fd(self, name: str) -> int:
        return self.lib.bpf_map__fd(self._map(name))

    def attach_all(self, skip: Callable[[str], bool] | None = None) -> list[str]:
        """Attach every program (tracepoints from their SEC names); returns the names attached."""
        names = []
        prog = self.lib.bpf_object__next_program(self._obj, None)
        while prog:
            name = self.lib.bpf_program__name(prog).decode()
            if not (skip and skip(name)):
                ctypes.set_errno(0)
                link = self.lib.bpf_program__attach(prog)
                if not link:
                    raise _err(f"attaching {name}")
                self._links.append(link)
                names.append(name)
            prog = self.lib.bpf_object__next_program(self._obj, prog)
        return names

    def attach_uprobe(self, prog_name: str, path: str, offset: int, retprobe: bool = False) -> int:
        """Attach program ``prog_name`` (SEC "uprobe"/"uretprobe") at file ``offset`` of the ELF
        ``path`` in every process (pid -1); returns the link, for ``detach``.

        The offset is a file offset (the symbol's address translated through its PT_LOAD
        segment: receivers/ebpf/ssl_probes.py), as the kernel's uprobe PMU takes it.
        """
        prog = self.lib.bpf_object__find_program_by_name(self._obj, prog_name.encode())
        if not prog:
            raise BpfError(f"program {prog_name} not in the BPF object (object and receiver out of sync: rebuild)")
        ctypes.set_errno(0)
        link = self.lib.bpf_program__attach_uprobe(prog, retprobe, -1, path.encode(), offset)
        if not link:
            raise _err(f"attaching {prog_name} to {path}+{offset:#x}")
        self._links.append(link)
        return link

    def detach(self, link: int) -> None:
        """Destroy one link returned by ``attach_uprobe``."""
        if link in self._links:
            self._links.remove(link)
            self.lib.bpf_link__destroy(link)

    def update(self, map_name: str, key: bytes, value: bytes) -> None:
        fd = self.map_fd(map_name)
        rc = self.lib.bpf_map_update_elem(fd, key, value, BPF_ANY)
        if rc:
            raise _err(f"writing map {map_name}", rc)

    def clear(self, map_name: str, key_size: int) -> None:
        """Delete every key of a hash map (config reload)."""
        fd = self.map_fd(map_name)
        key = ctypes.create_string_buffer(key_size)
        nxt = ctypes.create_string_buffer(key_size)
        keys = []
        while self.lib.bpf_map_get_next_key(fd, None if not keys else key, nxt) == 0:
            keys.append(nxt.raw)
            ctypes.memmove(key, nxt, key_size)
        for k in keys:
            self.lib.bpf_map_delete_elem(fd, k)

    def percpu_u64_sums(self, map_name: str, n: int) -> list[int]:
        """Sum each slot of a per-CPU array of u64 over all possible CPUs."""
        fd = self.map_fd(map_name)
        ncpu = self.lib.libbpf_num_possible_cpus()
        vals = (ctypes.c_uint64 * ncpu)()
        out = []
        for i in range(n):
            k = ctypes.c_uint32(i)
            if self.lib.bpf_map_lookup_elem(fd, ctypes.byref(k), vals):
                out.append(0)
            else:
                out.append(sum(vals))
        return out

    def close(self) -> None:
        for link in self._links:
            self.lib.bpf_link__destroy(link)
        self._links.clear()
        if self._obj:
            self.lib.bpf_object__close(self._obj)
            self._obj = None


class RingBuffer:
    """``ring_buffer__new`` + poll; the callback gets (address, size) of each record.

    The record's memory is only valid during the callback: the callback must copy
    what it keeps.
    """

    def __init__(self, obj: BpfObject, map_name: str, callback: Callable[[int, int], int]) -> None:
        self.lib = obj.lib

        def cb(_ctx: int, data: int, size: int) -> int:
            try:
                return callback(data, size)
            except Exception:
                return 0

        self._cb = SAMPLE_FN(cb)  # keep a reference: libbpf holds the pointer
        ctypes.set_errno(0)
        rb = self.lib.ring_buffer__new(obj.map_fd(map_name), self._cb, None, None)
        if not rb:
            raise _err("creating the ring buffer reader")
        self._rb: int | None = rb

    def poll(self, timeout_ms: int) -> int:
        """Records consumed, or a negative errno (-EINTR is harmless)."""
        if not self._rb:
            return 0
        return self.lib.ring_buffer__poll(self._rb, timeout_ms)

    def free(self) -> None:
        if self._rb:
            self.lib.ring_buffer__free(self._rb)
            self._rb = None


_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
RINGBUF_BUSY = 1 << 31
RINGBUF_DISCARD = 1 << 30
RINGBUF_HDR = 8


def iter_chunk(chunk: bytes):
    """(offset, length) of each committed, not discarded record in a ``MmapRing.take`` chunk."""
    u32 = _U32.unpack_from
    off, end = 0, len(chunk)
    while off < end:
        ln = u32(chunk, off)[0]
        size = ln & ~(RINGBUF_BUSY | RINGBUF_DISCARD)
        if not ln & RINGBUF_DISCARD:
            yield off + RINGBUF_HDR, size
        off += (size + RINGBUF_HDR + 7) & ~7


class MmapRing:
    """The BPF ring buffer read straight from its mapping, without a callback per record.

    Same protocol as libbpf's ``ring_buffer__consume`` (kernel/bpf/ringbuf.c): a
    read-write consumer page, then a read-only producer page followed by the data
    area mapped twice back to back, so a record that wraps is still contiguous.
    Each record has an 8-byte header (length with BUSY/DISCARD bits, page offset)
    and is padded to 8 bytes. ``consume(fn)`` calls ``fn(mapping, offset, length)``
    for each committed record and only then publishes the new consumer position,
    so ``fn`` must copy what it keeps. Loads are ordered by x86-64's TSO model
    (and the BUSY bit is checked); that is the platform this is measured on.

    The consumer position is shared with producers on every CPU, which read it
    without a lock, so it is stored with one 8-byte store (a ctypes ``c_uint64``
    over the mapping). ``struct.pack_into`` must not be used there: it zero-fills
    the field before writing it, and a producer that reads the 0 in between sees
    the ring as full (``new_prod_pos - 0 > mask`` once the ring has wrapped) and
    drops the record: that was the rare ring-reservation failure at any ring size
    and fill level (issue 9). The producer position is only read here;
    ``unpack_from`` of a native-size ``Q`` is one 8-byte load.
    """

    def __init__(self, map_fd: int, size: int) -> None:
        page = mmap.PAGESIZE
        self.size = size
        self.mask = size - 1
        self._fd = map_fd
        try:
            self._cons = mmap.mmap(map_fd, page, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=0)
            self._prod = mmap.mmap(map_fd, page + 2 * size, mmap.MAP_SHARED, mmap.PROT_READ, offset=page)
        except OSError as e:
            raise BpfError(f"mapping the ring buffer: {e.strerror}") from None
        self._data_off = page
        #: the fullest the ring was seen at a ``take`` (bytes): the headroom left
        self.max_fill = 0
        #: consumer_pos, written with single 8-byte stores (see the class docstring)
        self._cons_pos: ctypes.c_uint64 | None = ctypes.c_uint64.from_buffer(self._cons, 0)
        self._ep = select.epoll()
        self._ep.register(map_fd, select.EPOLLIN)

    def wait(self, timeout_s: float) -> None:
        """Block until the kernel signals data (or the timeout)."""
        if self._cons_pos.value == _U64.unpack_from(self._prod, 0)[0]:
            self._ep.poll(timeout_s)

    def consume(self, fn, limit: int = 1 << 30) -> int:
        """Hand each committed record to ``fn(mapping, offset, length)``; returns the count."""
        prod, cons = self._prod, self._cons_pos
        base, mask = self._data_off, self.mask
        u32 = _U32.unpack_from
        pos = cons.value
        end = _U64.unpack_from(prod, 0)[0]
        n = 0
        while pos < end and n < limit:
            off = base + (pos & mask)
            ln = u32(prod, off)[0]
            if ln & RINGBUF_BUSY:
                break  # reserved, not committed yet
            size = ln & ~(RINGBUF_BUSY | RINGBUF_DISCARD)
            if not ln & RINGBUF_DISCARD:
                fn(prod, off + RINGBUF_HDR, size)
                n += 1
            pos += (size + RINGBUF_HDR + 7) & ~7
            if n & 255 == 0:
                cons.value = pos  # let the producer reuse space during long batches
            if pos >= end:
                end = _U64.unpack_from(prod, 0)[0]
        cons.value = pos
        return n

    def take(self, limit: int) -> tuple[bytes, int] | None:
        """Copy out the committed records at the head of the ring in one slice, and free them.

        Returns ``(chunk, records)``: ``chunk`` holds the records in the kernel's
        format (8-byte header, padded to 8; ``iter_chunk`` walks it), at most about
        ``limit`` bytes (at least one record). The only per-record work is reading
        each header to find where the committed run ends, so the kernel ring is
        emptied at memcpy speed however slow the code that decodes the chunk is
        (issue 9: drops came from a consumer that decoded in the draining thread).
        The copy is deliberate: ring space must be handed back before decoding.
        """
        prod = self._prod
        base, mask = self._data_off, self.mask
        u32 = _U32.unpack_from
        pos = self._cons_pos.value
        end = _U64.unpack_from(prod, 0)[0]
        if end - pos > self.max_fill:
            self.max_fill = end - pos
        stop = pos + min(limit, self.size)
        p = pos
        n = 0
        while p < end:
            ln = u32(prod, base + (p & mask))[0]
            if ln & RINGBUF_BUSY:
                break  # reserved, not committed yet
            nxt = p + (((ln & ~RINGBUF_DISCARD) + RINGBUF_HDR + 7) & ~7)
            if nxt > stop and n:
                break
            p = nxt
            n += 1
        if p == pos:
            return None
        start = base + (pos & mask)
        chunk = prod[start:start + (p - pos)]  # contiguous: the data area is mapped twice
        self._cons_pos.value = p
        return chunk, n

    def free(self) -> None:
        self._cons_pos = None  # drop the buffer export, so the mapping can be closed
        for m in ("_cons", "_prod"):
            mm = getattr(self, m, None)
            if mm is not None:
                try:
                    mm.close()
                except BufferError:
                    pass  # a view is still alive: the GC unmaps it later
                setattr(self, m, None)
        if getattr(self, "_ep", None) is not None:
            self._ep.close()
            self._ep = None
