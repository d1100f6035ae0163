"""What the C accelerators' equivalence tests share: loading the module under test, and a
buffer that ends at an inaccessible page.

``damage(draw, data)`` is the input every walker is held to its twin on: the bytes whole (about
half the time), cut, a byte flipped, bytes inserted, a byte deleted, or a protocol's own harm.

``load_accelerator`` imports the extension (or the ``.so`` an environment variable names: a
deliberately broken or sanitizer build, to check the tests catch it); where it is not built
the whole test module skips with a printed reason. ``Guarded(pages).view(data)`` gives
``data`` as a view whose last byte is right before a PROT_NONE page: any read past a view's
end faults (a test crash), even a one-byte over-read that would stay inside a Python object.
"""

from __future__ import annotations

import ctypes
import importlib
import importlib.util
import mmap
import os
from collections.abc import Callable
from types import ModuleType

import pytest
from hypothesis import strategies as st


def load_accelerator(name: str, so_env: str | None = None) -> ModuleType:
    so = os.environ.get(so_env) if so_env else None
    if so:
        spec = importlib.util.spec_from_file_location(name, so)
        assert spec is not None and spec.loader is not None
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod
    try:
        return importlib.import_module(name)
    except ImportError as e:  # no compiler on this machine: only the pure path exists
        why = f"the {name} accelerator is not built here ({e})"
        print(f"skipped: {why}")
        pytest.skip(why, allow_module_level=True)
        raise


_PAGE = mmap.PAGESIZE
_libc = ctypes.CDLL(None, use_errno=True)
_libc.mprotect.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)


class Guarded:
    """``pages`` writable pages followed by one that faults on any access."""

    def __init__(self, pages: int) -> None:
        self._map = mmap.mmap(-1, (pages + 1) * _PAGE)
        base = ctypes.addressof(ctypes.c_char.from_buffer(self._map))
        assert _libc.mprotect(base + pages * _PAGE, _PAGE, 0) == 0  # PROT_NONE
        self._view = memoryview(self._map)[:pages * _PAGE]
        self.size = pages * _PAGE

    def view(self, data: bytes) -> memoryview:
        """``data`` as a view that ends right at the guard page."""
        end = self.size
        self._view[end - len(data):end] = data
        return self._view[end - len(data):end]


#: A protocol's own way to harm ``data`` at position ``i`` (a hostile declared size, a type byte).
Harm = Callable[[st.DrawFn, bytes, int], bytes]


def damage(draw: st.DrawFn, data: bytes, *harms: Harm) -> bytes:
    """``data`` whole (about half the time), or cut, a byte flipped, 1-4 bytes inserted, a byte
    deleted, or one of ``harms`` applied, at a drawn position."""
    how = draw(st.integers(-4, 4 + len(harms)))
    if how <= 0 or not data:
        return data
    i = draw(st.integers(0, len(data) - 1))
    if how == 1:
        return data[:i]
    if how == 2:
        return data[:i] + bytes([draw(st.integers(0, 255))]) + data[i + 1:]
    if how == 3:
        return data[:i] + draw(st.binary(min_size=1, max_size=4)) + data[i:]
    if how == 4:
        return data[:i] + data[i + 1:]
    return harms[how - 5](draw, data, i)
