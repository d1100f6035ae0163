"""What the C accelerators' equivalence tests share: loading the module under test, and a
buffer that ends at an inaccessible page.

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
from types import ModuleType

import pytest


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
