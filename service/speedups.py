"""The optional C accelerators, and the switch that turns them off.

A parser with an accelerator keeps its pure-Python path as the reference: the C
function does the common case and hands back anything unusual, and tests hold both
paths to the same results. ``WIRESPAN_PURE_PYTHON=1`` disables every accelerator
(so the test suite can run each parser both ways); ``WIRESPAN_REQUIRE_SPEEDUPS=1``
(set by tests/run.sh) makes a missing one an error instead of a silent slowdown.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

#: Extension module -> its C source (setup.py builds exactly these).
ACCELERATORS: dict[str, str] = {
    "processors.protocols.kafka._flat": "processors/protocols/kafka/_flat.c",  # kafka/flat.py's requests
    "processors.protocols._http1": "processors/protocols/_http1.c",  # http1.py's heads
    "service._otlp": "service/_otlp.c",  # model.py's OTLP span encoding
    "receivers._fastpath": "receivers/_fastpath.c",  # pcap.py's replay loop: record, frame, in-order segment
    "processors.protocols._resp": "processors/protocols/_resp.c",  # redis.py's whole RESP values
    "processors.protocols._pgwire": "processors/protocols/_pgwire.c",  # postgresql.py's message walk
    "processors.protocols.amqp._frames": "processors/protocols/amqp/_frames.c",  # amqp/v091.py's frame walk
    "processors.protocols._fcgi": "processors/protocols/_fcgi.c",  # fastcgi.py's record walk and PARAMS
    "processors.protocols._memcache": "processors/protocols/_memcache.c",  # memcached.py: binary headers, text walk
    "processors.protocols._bson": "processors/protocols/_bson.c",  # mongodb.py's whole OP_MSG read
    "processors.protocols._h2frames": "processors/protocols/_h2frames.c",  # http2.py's whole-frames check
    "processors.protocols._stage": "processors/protocols/_stage.c",  # processor.py's per-event fast path
}

PURE = os.environ.get("WIRESPAN_PURE_PYTHON", "") not in ("", "0")
REQUIRED = os.environ.get("WIRESPAN_REQUIRE_SPEEDUPS", "") not in ("", "0")


def load(name: str) -> ModuleType | None:
    """The accelerator module ``name``, or None when disabled or not built."""
    if PURE:
        return None
    try:
        return importlib.import_module(name)
    except ImportError:
        if REQUIRED:
            raise
        return None


def status() -> dict[str, bool]:
    """Which accelerators are in use, for ``wirespan components`` and the start-up log."""
    return {name: load(name) is not None for name in ACCELERATORS}


def why_not(name: str) -> str:
    """Why ``name`` is not in use, in a few words."""
    if PURE:
        return "WIRESPAN_PURE_PYTHON is set"
    try:
        importlib.import_module(name)
    except ImportError as e:
        return f"not built ({e}); reinstall with a C compiler and Python headers"
    return "in use"
