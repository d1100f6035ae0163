"""Structured logs for the service (``service: telemetry: logs: {level, encoding}``).

Logs go to stderr so the debug exporter's spans on stdout stay clean. Extra
fields given with ``extra={"component": ...}`` are kept: as ``key=value`` in
the console encoding, as JSON fields in the ``json`` encoding (one object a
line, for log shippers).
"""

from __future__ import annotations

import json
import logging
import sys
import time

__all__ = ["setup", "LEVELS"]

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warn": logging.WARNING,
          "warning": logging.WARNING, "error": logging.ERROR}

# Attributes every LogRecord has; anything else came in through ``extra``.
_STD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "taskName"}


def _extras(record: logging.LogRecord) -> dict:
    return {k: v for k, v in vars(record).items() if k not in _STD and not k.startswith("_")}


def _ts(record: logging.LogRecord) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"


class ConsoleFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = f"{_ts(record)}\t{record.levelname.lower()}\t{record.name}\t{record.getMessage()}"
        ex = _extras(record)
        if ex:
            line += "\t" + " ".join(f"{k}={v}" for k, v in ex.items())
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        d = {"ts": _ts(record), "level": record.levelname.lower(), "logger": record.name,
             "msg": record.getMessage(), **_extras(record)}
        if record.exc_info:
            d["error"] = self.formatException(record.exc_info)
        return json.dumps(d, default=str)


_handler: logging.Handler | None = None


def setup(level: str = "info", encoding: str = "console") -> None:
    """(Re)configure logging for the process; safe to call again on reload.

    The root logger is configured so components logging under their module
    name (``logging.getLogger(__name__)``) are included; chatty client
    libraries are held at warning.
    """
    global _handler
    root = logging.getLogger()
    if _handler is not None:
        root.removeHandler(_handler)
    _handler = logging.StreamHandler(sys.stderr)
    _handler.setFormatter(JsonFormatter() if encoding == "json" else ConsoleFormatter())
    root.addHandler(_handler)
    root.setLevel(LEVELS.get(level, logging.INFO))
    for name in _QUIET:
        logging.getLogger(name).setLevel(max(logging.WARNING, root.level))


_QUIET = ("httpx", "httpcore", "grpc", "urllib3", "kafka", "asyncio")
