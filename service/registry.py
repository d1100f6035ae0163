"""Component registry: component type -> class, for built-ins and plugins alike.

Built-in components are declared below as lazy ``"module:Class"`` strings, the
same form an entry point has, and are imported only when a config uses them (so
``wirespan validate`` does not pay for gRPC when no pipeline exports over it).
Third-party components come from the entry point groups ``wirespan.receivers``,
``wirespan.processors``, ``wirespan.exporters`` and ``wirespan.connectors`` (entry point name = type),
or from ``class: package.module:ClassName`` in a component's config.

A type whose module is missing or fails to import is *unavailable*: listed as
such by ``wirespan components`` with the reason, an error only if a config uses
it. A built-in type wins over a plugin that registers the same type (logged),
so installing a package cannot silently replace a built-in.
"""

from __future__ import annotations

import importlib
import logging
import threading
from dataclasses import dataclass
from importlib import metadata
from typing import Any

from pydantic import BaseModel

from service.component import CONNECTOR, EXPORTER, PROCESSOR, RECEIVER
from service.log import describe

__all__ = [
    "BUILTINS",
    "GROUPS",
    "Entry",
    "Registry",
    "ComponentNotFound",
    "ComponentUnavailable",
    "default_registry",
    "import_target",
]

log = logging.getLogger("wirespan.registry")

#: Every built-in type, by kind: type -> "module:Class". Modules may not exist yet.
BUILTINS: dict[str, dict[str, str]] = {
    RECEIVER: {
        "pcap": "receivers.pcap:PcapReceiver",
        "live": "receivers.live:LiveReceiver",
        "ebpf": "receivers.ebpf:EbpfReceiver",
    },
    PROCESSOR: {
        "protocols": "processors.protocols.processor:ProtocolsProcessor",
        "batch": "processors.batch:BatchProcessor",
        "memory_limiter": "processors.memory_limiter:MemoryLimiterProcessor",
        "attributes": "processors.attributes:AttributesProcessor",
        "resource": "processors.resource:ResourceProcessor",
        "filter": "processors.filter:FilterProcessor",
        "redaction": "processors.redaction:RedactionProcessor",
    },
    EXPORTER: {
        "otlp": "exporters.otlp:OtlpExporter",
        "otlphttp": "exporters.otlphttp:OtlpHttpExporter",
        "file": "exporters.file:FileExporter",
        "debug": "exporters.debug:DebugExporter",
        "prometheus": "exporters.prometheus:PrometheusExporter",
    },
    CONNECTOR: {
        "spanmetrics": "connectors.spanmetrics:SpanMetricsConnector",
        "servicegraph": "connectors.servicegraph:ServiceGraphConnector",
    },
}

#: kind -> entry point group.
GROUPS = {RECEIVER: "wirespan.receivers", PROCESSOR: "wirespan.processors", EXPORTER: "wirespan.exporters",
          CONNECTOR: "wirespan.connectors"}

BUILTIN_SOURCE = "built-in"


class ComponentNotFound(LookupError):
    """No component of that type is registered."""


class ComponentUnavailable(LookupError):
    """The type is registered but its class cannot be loaded (module missing, import error, not a component)."""


def import_target(target: str) -> type:
    """Import ``"package.module:ClassName"`` (also ``package.module.ClassName``)."""
    mod_name, sep, attr = target.partition(":")
    if not sep:
        mod_name, _, attr = target.rpartition(".")
    if not mod_name or not attr:
        raise ComponentUnavailable(f"{target!r} is not of the form 'package.module:ClassName'")
    try:
        module = importlib.import_module(mod_name)
    except ModuleNotFoundError as e:
        if e.name and (mod_name == e.name or mod_name.startswith(e.name + ".")):
            raise ComponentUnavailable(f"module {mod_name!r} is not installed")
        raise ComponentUnavailable(f"importing {mod_name!r} failed: {e}")
    except Exception as e:  # a plugin's import-time bug must not take the service down
        raise ComponentUnavailable(f"importing {mod_name!r} failed: {describe(e)}")
    obj: Any = module
    for part in attr.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            raise ComponentUnavailable(f"module {mod_name!r} has no attribute {attr!r}")
    return obj


def _a(word: str) -> str:
    return ("an " if word[:1] in "aeiou" else "a ") + word


def check_class(kind: str, cls: Any, target: str) -> type:
    """The small API every component must have; the message says what is missing."""
    if not isinstance(cls, type):
        raise ComponentUnavailable(f"{target} is not a class")
    cfg = getattr(cls, "Config", None)
    if not (isinstance(cfg, type) and issubclass(cfg, BaseModel)):
        raise ComponentUnavailable(f"{target} has no pydantic Config model")
    ckind = getattr(cls, "kind", "")
    if ckind != kind:
        raise ComponentUnavailable(f"{target} is {_a(ckind or 'non-component')}, not {_a(kind)}")
    needed = {RECEIVER: ("start", "shutdown"), PROCESSOR: ("start", "shutdown", "flush"),
              EXPORTER: ("start", "shutdown"),
              CONNECTOR: ("start", "shutdown", "flush", "consume_spans")}[kind]
    if kind == EXPORTER:
        signals = getattr(cls, "signals", ("traces",))
        needed += tuple(m for sig, m in (("traces", "consume_spans"), ("metrics", "consume_metrics"))
                        if sig in signals)
    if kind == PROCESSOR:
        consumes = getattr(cls, "consumes", None)
        if consumes not in ("events", "spans", "metrics"):
            raise ComponentUnavailable(f"{target}: processor must set consumes = 'events', 'spans' or 'metrics'")
        needed += (f"consume_{consumes}",)
        if "metrics" in getattr(cls, "signals", ()):
            needed += ("consume_metrics",)
    missing = [m for m in needed if not callable(getattr(cls, m, None))]
    if missing:
        raise ComponentUnavailable(f"{target} lacks {', '.join(missing)}")
    return cls


@dataclass
class Entry:
    """One registered type: where it comes from and, once loaded, its class."""

    kind: str
    type: str
    target: str | type         # "module:Class", or a class registered directly (tests)
    source: str                # "built-in" or "<distribution> <version>"
    _cls: type | None = None
    _error: str | None = None

    def load(self) -> type:
        if self._cls is not None:
            return self._cls
        if self._error is not None:
            raise ComponentUnavailable(f'{self.kind} type "{self.type}" is not available: {self._error}')
        name = self.target if isinstance(self.target, str) else f"{self.target.__module__}:{self.target.__qualname__}"
        try:
            cls = self.target if isinstance(self.target, type) else import_target(self.target)
            self._cls = check_class(self.kind, cls, name)
        except ComponentUnavailable as e:
            self._error = str(e)
            raise ComponentUnavailable(f'{self.kind} type "{self.type}" is not available: {e}')
        return self._cls

    def status(self) -> tuple[bool, str]:
        """(available, reason-if-not), importing the module if needed."""
        try:
            self.load()
            return True, ""
        except ComponentUnavailable:
            return False, self._error or "unavailable"


class Registry:
    """Types by kind. ``entry_points=False`` gives the built-ins only (tests)."""

    def __init__(self, entry_points: bool = True) -> None:
        self._lock = threading.Lock()
        self._entries: dict[tuple[str, str], Entry] = {}
        for kind, table in BUILTINS.items():
            for typ, target in table.items():
                self._entries[(kind, typ)] = Entry(kind, typ, target, BUILTIN_SOURCE)
        self._classes: dict[str, type] = {}
        if entry_points:
            self._load_entry_points()

    def _load_entry_points(self) -> None:
        # One scan of every installed distribution for all four groups: a scan a group was
        # 12 ms of each start-up on a machine with a few hundred packages (issue 21).
        try:
            every = metadata.entry_points()
        except Exception as e:  # broken metadata of some unrelated package
            log.warning("cannot read entry points: %s", e)
            return
        for kind, group in GROUPS.items():
            try:
                eps = every.select(group=group)
            except Exception as e:
                log.warning("cannot read entry points %s: %s", group, e)
                continue
            for ep in eps:
                dist = getattr(ep, "dist", None)
                source = f"{dist.name} {dist.version}" if dist is not None else "plugin"
                key = (kind, ep.name)
                old = self._entries.get(key)
                if old is not None:
                    log.warning("%s type %r from %s ignored: already provided by %s", kind, ep.name, source, old.source)
                    continue
                self._entries[key] = Entry(kind, ep.name, ep.value, source)

    def register(self, kind: str, typ: str, target: str | type, source: str = "test", replace: bool = False) -> None:
        """Add a type by hand (tests, embedding). ``replace`` swaps an existing one."""
        with self._lock:
            if (kind, typ) in self._entries and not replace:
                raise ValueError(f"{kind} type {typ!r} is already registered")
            self._entries[(kind, typ)] = Entry(kind, typ, target, source)

    def get(self, kind: str, typ: str) -> type:
        entry = self._entries.get((kind, typ))
        if entry is None:
            known = sorted(t for (k, t) in self._entries if k == kind)
            raise ComponentNotFound(f'unknown {kind} type "{typ}" (known: {", ".join(known)})')
        return entry.load()

    def source(self, kind: str, typ: str) -> str:
        return self._entries[(kind, typ)].source

    def load_class(self, kind: str, target: str) -> type:
        """A component named by ``class: package.module:ClassName`` in config."""
        with self._lock:
            cls = self._classes.get(target)
        if cls is None:
            cls = check_class(kind, import_target(target), target)
            with self._lock:
                self._classes[target] = cls
        elif getattr(cls, "kind", "") != kind:
            raise ComponentUnavailable(f"{target} is {_a(cls.kind)}, not {_a(kind)}")
        return cls

    def entries(self) -> list[Entry]:
        order = {RECEIVER: 0, PROCESSOR: 1, EXPORTER: 2, CONNECTOR: 3}
        return sorted(self._entries.values(), key=lambda e: (order.get(e.kind, 9), e.type))


_default: Registry | None = None
_default_lock = threading.Lock()


def default_registry() -> Registry:
    """The process-wide registry (built-ins plus installed plugins), built once."""
    global _default
    with _default_lock:
        if _default is None:
            _default = Registry()
        return _default


def reset_default_registry() -> None:
    """Forget the process-wide registry (tests that install plugins)."""
    global _default
    with _default_lock:
        _default = None
