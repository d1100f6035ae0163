"""The protocol table: protocol name -> the module that implements it (base.py's contract).

Modules are imported lazily, on first use. A module that does not exist yet or
fails to import is *unavailable*: logged once, never a crash, and the stage
runs with the others. Adding a protocol means writing its module; this table
already names every planned one (as dpkt's ``_protosw`` or h11's ``READERS``).
"""

from __future__ import annotations

import importlib
import logging
import threading
from types import ModuleType

__all__ = ["PROTOCOLS", "load", "available"]

log = logging.getLogger(__name__)

#: name (as in config and metrics) -> module path, in the order detection tries them
#: (after the ones whose ports are hinted). Strong signatures come first: a fixed
#: magic or preface (HTTP, HTTP/2, MongoDB, MQTT CONNECT, FastCGI, memcached binary,
#: PostgreSQL startup); the weakest last: a Kafka request header is only a size and
#: four small integers, so other binary protocols' first bytes can read as one.
PROTOCOLS: dict[str, str] = {
    "http": "processors.protocols.http1",
    "http2": "processors.protocols.http2",        # HTTP/2 and gRPC
    "postgresql": "processors.protocols.postgresql",
    "mysql": "processors.protocols.mysql",
    "mongodb": "processors.protocols.mongodb",
    "mqtt": "processors.protocols.mqtt",
    "fastcgi": "processors.protocols.fastcgi",
    "memcached": "processors.protocols.memcached",  # memcached binary/text and Couchbase
    "nats": "processors.protocols.nats",           # before redis: an inline word could read as NATS's
    "amqp": "processors.protocols.amqp",           # AMQP 0-9-1 (RabbitMQ) and 1.0: a package
    "redis": "processors.protocols.redis",
    "dns": "processors.protocols.dns",           # DNS over UDP (the only UDP reader) and TCP
    "kafka": "processors.protocols.kafka",
}

_REQUIRED = ("NAME", "DEFAULT_PORTS", "Settings", "detect", "Session")
_cache: dict[str, ModuleType | None] = {}
_lock = threading.Lock()


def load(name: str) -> ModuleType | None:
    """The protocol's module, or None when it is unknown or unavailable (logged once)."""
    try:
        return _cache[name]
    except KeyError:
        pass
    with _lock:
        if name in _cache:
            return _cache[name]
        path = PROTOCOLS.get(name)
        mod: ModuleType | None = None
        if path is None:
            log.warning("protocol %r is not known (known: %s)", name, ", ".join(PROTOCOLS))
        else:
            try:
                mod = importlib.import_module(path)
                missing = [a for a in _REQUIRED if not hasattr(mod, a)]
                if missing:
                    log.warning("protocol %r unavailable: %s lacks %s", name, path, ", ".join(missing))
                    mod = None
            except ModuleNotFoundError as e:
                if e.name == path:
                    log.info("protocol %r unavailable: module %s not present", name, path)
                else:
                    log.warning("protocol %r unavailable: importing %s failed", name, path, exc_info=True)
            except Exception:
                log.warning("protocol %r unavailable: importing %s failed", name, path, exc_info=True)
        _cache[name] = mod
        return mod


def available() -> list[str]:
    """Names of the protocols whose modules import, in table order."""
    return [n for n in PROTOCOLS if load(n) is not None]
