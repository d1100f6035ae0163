"""Structured logs for the service (``service: telemetry: logs: {level, encoding}``).

Logs go to stderr so the debug exporter's spans on stdout stay clean. Extra
fields given with ``extra={"component": ...}`` are kept: as ``key=value`` in
the console encoding, as JSON fields in the ``json`` encoding (one object a
line, for log shippers).
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time

__all__ = ["setup", "LEVELS", "describe"]

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warn": logging.WARNING,
          "warning": logging.WARNING, "error": logging.ERROR}

# Attributes every LogRecord has; anything else came in through ``extra``.
_STD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "taskName"}


def _extras(record: logging.LogRecord) -> dict:
    return {k: v for k, v in vars(record).items() if k not in _STD and not k.startswith("_")}


#: Exceptions that mean a bug in wirespan (or a plugin), never bad input: said so to the user.
_BUG_TYPES = (AttributeError, TypeError, KeyError, IndexError, NameError, AssertionError, ZeroDivisionError,
              NotImplementedError, RecursionError)


def _words(class_name: str) -> str:
    """``ConnectionRefusedError`` -> ``connection refused`` (for an exception without a message)."""
    base = re.sub(r"(Error|Exception)$", "", class_name) or class_name
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])", " ", base).lower()


def describe(e: BaseException) -> str:
    """One line for a user about ``e``: its message without Python's class name.

    An ``OSError`` gives its file and reason (``/x.pcap: Permission denied``); an
    exception without a message is named in words (``connection refused``); one
    that can only be a bug says ``internal error: ...``.
    """
    if isinstance(e, OSError) and e.strerror:
        text = e.strerror
        if e.filename is not None:
            text = f"{e.filename}: {text}"
    elif isinstance(e, KeyError) and len(e.args) == 1:
        text = f"missing key {e.args[0]!r}"
    else:
        text = str(e)
    text = " ".join(text.split())
    if not text:
        text = _words(type(e).__name__)
    if isinstance(e, _BUG_TYPES):
        text = f"internal error: {text}"
    return text


def _ts(record: logging.LogRecord) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"


class ConsoleFormatter(logging.Formatter):
    def __init__(self, tracebacks: bool = True) -> None:
        super().__init__()
        self.tracebacks = tracebacks

    def format(self, record: logging.LogRecord) -> str:
        line = f"{_ts(record)}\t{record.levelname.lower()}\t{record.name}\t{record.getMessage()}"
        ex = _extras(record)
        if record.exc_info and record.exc_info[1] is not None and not self.tracebacks:
            ex["error"] = describe(record.exc_info[1])
        if ex:
            line += "\t" + " ".join(f"{k}={v}" for k, v in ex.items())
        if record.exc_info and self.tracebacks:
            line += "\n" + self.formatException(record.exc_info)
        return line


class JsonFormatter(logging.Formatter):
    def __init__(self, tracebacks: bool = True) -> None:
        super().__init__()
        self.tracebacks = tracebacks

    def format(self, record: logging.LogRecord) -> str:
        d = {"ts": _ts(record), "level": record.levelname.lower(), "logger": record.name,
             "msg": record.getMessage(), **_extras(record)}
        if record.exc_info and record.exc_info[1] is not None:
            d["error"] = describe(record.exc_info[1])
            if self.tracebacks:
                d["traceback"] = self.formatException(record.exc_info)
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
    lvl = LEVELS.get(level, logging.INFO)
    traces = lvl <= logging.DEBUG  # tracebacks are for debugging, not for users
    _handler.setFormatter(JsonFormatter(traces) if encoding == "json" else ConsoleFormatter(traces))
    root.addHandler(_handler)
    root.setLevel(lvl)
    for name in _QUIET:
        logging.getLogger(name).setLevel(max(logging.WARNING, root.level))


_QUIET = ("httpx", "httpcore", "grpc", "urllib3", "kafka", "asyncio")
