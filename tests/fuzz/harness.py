"""Run one fuzz input against one protocol module, three ways, and say what went wrong.

``Target(name).run(raw)`` decodes ``raw`` (tests/fuzz/encoding.py) and drives:

Every input runs (1) and (2), or (3), as its flag bit 7 says (the fuzzer flips it like any bit;
the stage runs the detectors itself):

1. ``detect``: each direction's bytes, appended to a ``LargeBuffer`` piece by piece as the
   segmentation cuts them, ``detect(buf, from_client)`` after every piece (as the stage does:
   a NO clears the buffer and detection starts again at the next piece, a REQUEST/RESPONSE ends it);
2. a ``Session`` directly: every piece appended and ``feed`` called (the roles as the input says),
   a ``ProtocolError`` answered as the stage does (buffer cleared, ``gap``), GAP steps through
   ``skip_gap``/``gap``, CLOSE of the server side and the end through ``close``;
3. the real ``ProtocolsProcessor`` stage with ``TcpEvent``s (OPEN when the roles are known, DATA
   pieces, GAP, CLOSE, RST, ``shutdown``), optionally with every protocol enabled and with the
   smallest limits (so detection give-up and message_too_large run), spans encoded to OTLP.

A failure is: any exception but ``ProtocolError`` out of a session; any exception out of
``detect`` or a return value that is not a ``Detection`` (the stage counts a raising detector as
``internal_error`` whatever it raised); an ``internal_error`` counted by the stage or anything
escaping it; spans that do not encode; an input slower than ``per_byte_s`` a byte once over
``floor_s`` (CPU time of this thread, so a busy machine does not make a parser slow; measured
again twice: the fastest counts); the process's peak RSS growing more
than ``rss_limit_mb`` over its start.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import resource
import time
import traceback
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

from processors.protocols import PROTOCOLS, load
from processors.protocols.base import Conn, Detection
from processors.protocols.errors import ProtocolError
from processors.protocols.processor import Config, ProtocolsProcessor
from service.largebuf import LargeBuffer
from service.model import EventKind, TcpEvent, spans_to_otlp_bytes
from tests.fuzz.encoding import (
    CLOSE,
    DATA,
    END_FIN,
    END_FIN_SERVER,
    END_RST,
    F_ALL,
    F_DIR,
    F_PORT,
    F_ROLES,
    GAP,
    decode,
)

__all__ = ["Failure", "Target", "F_DIRECT", "F_SMALL"]

#: Flag bit 6: the stage runs with its smallest limits (max_detect_bytes 16, max_message_bytes 1024).
F_SMALL = 0x40
#: Flag bit 7: the session is driven directly (else through the stage); detect always runs.
F_DIRECT = 0x80
CLIENT = ("10.0.0.1", 40000)
SERVER_ADDR = "10.0.0.2"
UNHINTED_PORT = 47123
BATCH = 16
_VALID = frozenset(int(d) for d in Detection)
_HERE = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@dataclass
class Failure:
    kind: str          # "escape", "detect", "internal_error", "span_encode", "slow", "memory"
    drive: str         # "detect", "session", "stage", "-"
    detail: str        # exception text or timing
    tb: str = ""

    @property
    def signature(self) -> str:
        """Same bug, same signature: the kind, drive, exception type and innermost project frame."""
        where = ""
        for line in self.tb.splitlines():
            s = line.strip()
            if s.startswith('File "') and _HERE in s and "/tests/fuzz/" not in s:
                where = s.replace(_HERE + "/", "")
        etype = self.detail.split(":", 1)[0] if self.kind not in ("slow", "memory") else ""
        return f"{self.kind}/{self.drive}/{etype}/{where}"

    @property
    def sig_hash(self) -> str:
        return hashlib.sha1(self.signature.encode()).hexdigest()[:12]


class _TbCatcher(logging.Handler):
    """Keeps the traceback the stage logs for an internal error."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.last = ""

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info:
            self.last = "".join(traceback.format_exception(*record.exc_info))
        else:
            self.last = record.getMessage()


class _Sink:
    def __init__(self) -> None:
        self.n = 0
        self.error: Failure | None = None

    def consume_spans(self, spans: list) -> None:
        self.n += len(spans)
        try:
            spans_to_otlp_bytes(spans)
        except Exception as e:
            if self.error is None:
                self.error = Failure("span_encode", "stage", f"{type(e).__name__}: {e}", traceback.format_exc())


def _rss_peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


@dataclass
class Target:
    """One protocol of the table under fuzz."""

    name: str
    per_byte_s: float = 200e-6
    floor_s: float = 0.25
    rss_limit_mb: float = 512.0
    max_pieces: int = 0
    #: Keep the stage's logged tracebacks off stderr (changes the logger for the process; ``close``).
    quiet: bool = False
    mod: ModuleType = field(init=False)
    inputs: int = 0
    nbytes: int = 0
    protocol_errors: int = 0
    spans: int = 0
    max_per_byte_s: float = 0.0
    max_input_s: float = 0.0

    def __post_init__(self) -> None:
        mod = load(self.name)
        if mod is None:
            raise RuntimeError(f"protocol {self.name!r} is not available")
        self.mod = mod
        ports = sorted(mod.DEFAULT_PORTS)
        self.port = ports[0] if ports else UNHINTED_PORT
        self.cfg_one = Config.model_validate({"enabled": [self.name]})
        self.cfg_all = Config.model_validate({})
        small = {"max_detect_bytes": 16, "max_message_bytes": 1024}
        self.cfg_one_small = Config.model_validate({"enabled": [self.name], **small})
        self.cfg_all_small = Config.model_validate(small)
        # One stage per configuration, reused: each input is a new connection (its own id) that
        # shutdown() ends, so nothing of it is left; building a stage per input cost more than
        # most inputs (every protocol's Settings validated).
        self.sink = _Sink()
        self.stages: dict[int, ProtocolsProcessor] = {}
        self.conn_id = 0
        self.catcher = _TbCatcher()
        lg = self._logger = logging.getLogger("processors.protocols.processor")
        self._log_state = (lg.level, lg.propagate)
        lg.addHandler(self.catcher)
        if self.quiet:  # a worker: the tracebacks go to the saved inputs, not to stderr
            lg.setLevel(logging.ERROR)
            lg.propagate = False
        self.rss_base = _rss_peak_mb()
        self.memory_failed = False
        self.settings = mod.Settings()

    def close(self) -> None:
        """Give the stage's logger back as it was."""
        lg = self._logger
        lg.removeHandler(self.catcher)
        lg.setLevel(self._log_state[0])
        lg.propagate = self._log_state[1]

    # -- one input ----------------------------------------------------------------------------
    def run(self, raw: bytes) -> list[Failure]:
        """Every failure of ``raw`` (empty: it passed). Counts it in the target's totals."""
        inp = decode(raw)
        inp.cuts = inp.segments(self.max_pieces)
        n = inp.nbytes()
        t0 = time.thread_time()
        fails = self._drive(inp)
        dt = time.thread_time() - t0
        self.inputs += 1
        self.nbytes += n
        if dt > self.floor_s and dt / max(n, 1) > self.per_byte_s:
            # Measure again: a GC pause or a busy neighbour is not a slow parser.
            for _ in range(2):
                t1 = time.thread_time()
                self._drive(inp)
                dt = min(dt, time.thread_time() - t1)
            if dt > self.floor_s and dt / max(n, 1) > self.per_byte_s:
                fails.append(Failure("slow", "-", f"{dt:.3f} s for {n} bytes ({dt / max(n, 1) * 1e6:.1f} us/byte)"))
        if dt > self.max_input_s:
            self.max_input_s = dt
        if n >= 64 and dt / n > self.max_per_byte_s:
            self.max_per_byte_s = dt / n
        if not self.memory_failed and (self.inputs & 63) == 0:
            grown = _rss_peak_mb() - self.rss_base
            if grown > self.rss_limit_mb:
                self.memory_failed = True
                fails.append(Failure("memory", "-", f"peak RSS grew {grown:.0f} MiB (limit {self.rss_limit_mb:.0f})"))
        return fails

    def _drive(self, inp: Any) -> list[Failure]:
        fails: list[Failure] = []
        # The stage runs the detectors itself (on prefixes, with and without known roles);
        # the session alone is detected by the detect drive.
        drives = (self._detect, self._session) if inp.flags & F_DIRECT else (self._stage,)
        for drive in drives:
            f = drive(inp)
            if f is not None:
                fails.append(f)
        return fails

    # -- (a) detect on prefixes -------------------------------------------------------------------
    def _detect(self, inp: Any) -> Failure | None:
        detect = self.mod.detect
        for side in (True, False):
            fc = side if inp.flags & F_DIR else None
            buf = LargeBuffer()
            done = False
            for s, pieces in zip(inp.steps, inp.cuts, strict=True):
                if done:
                    break
                if s.from_client != side:
                    continue
                if s.kind != DATA:
                    break  # a gap or FIN ends what detection may see as a prefix
                for piece in pieces:
                    buf.append(piece)
                    try:
                        d = detect(buf, fc)
                    except Exception as e:
                        return Failure("detect", "detect", f"{type(e).__name__}: {e}", traceback.format_exc())
                    if d not in _VALID:
                        return Failure("detect", "detect", f"detect returned {d!r}")
                    if d == Detection.NO:
                        buf.reset()
                    elif d != Detection.NEED_MORE:
                        done = True
                        break
        return None

    # -- (b) a session directly ---------------------------------------------------------------------
    def _session(self, inp: Any) -> Failure | None:
        mod = self.mod
        spans: list = []
        conn = Conn(1, CLIENT[0], CLIENT[1], SERVER_ADDR, self.port, spans.append, lambda _p, _r: None,
                    settings=self.settings, protocol=mod.NAME)
        ts = 1_000_000
        where = "Session()"
        try:
            session = mod.Session(conn)
            for s, pieces in zip(inp.steps, inp.cuts, strict=True):
                fc = s.from_client
                buf = conn.client_buf if fc else conn.server_buf
                if s.kind == DATA:
                    for piece in pieces:
                        ts += 1000
                        buf.append(piece, ts)
                        where = "feed"
                        try:
                            session.feed(fc, buf, ts)
                        except ProtocolError:
                            self.protocol_errors += 1
                            buf.reset()
                            where = "gap"
                            with contextlib.suppress(ProtocolError):
                                session.gap(fc, ts)
                elif s.kind == GAP:
                    where = "skip_gap"
                    skipped = False
                    if not len(buf) and s.gap > 0:
                        with contextlib.suppress(ProtocolError):
                            skipped = session.skip_gap(fc, s.gap, ts)
                    if not skipped:
                        buf.reset()
                        where = "gap"
                        with contextlib.suppress(ProtocolError):
                            session.gap(fc, ts)
                elif s.kind == CLOSE and not fc:
                    where = "close"
                    with contextlib.suppress(ProtocolError):
                        session.close(ts, False)
            where = "close"
            with contextlib.suppress(ProtocolError):
                session.close(ts + 1000, inp.end == END_RST)
        except Exception as e:
            return Failure("escape", "session", f"{type(e).__name__} in {where}: {e}", traceback.format_exc())
        self.spans += len(spans)
        return None

    # -- (c) the protocols stage ----------------------------------------------------------------------
    def _stage(self, inp: Any) -> Failure | None:
        flags = inp.flags
        small = flags & F_SMALL
        if flags & F_ALL:
            cfg = self.cfg_all_small if small else self.cfg_all
        else:
            cfg = self.cfg_one_small if small else self.cfg_one
        key = flags & (F_SMALL | F_ALL)
        stage = self.stages.get(key)
        if stage is None:
            stage = self.stages[key] = ProtocolsProcessor("protocols", cfg, self.sink)
        sink = self.sink
        sink.error = None
        stage._logged.clear()  # the stage logs a traceback once per protocol: once per input here
        drops = stage.stats["drops"]
        before = {k: v for k, v in drops.items() if k.endswith("internal_error")}
        self.conn_id += 1
        cid = self.conn_id
        port = self.port if flags & F_PORT else UNHINTED_PORT
        server = (SERVER_ADDR, port)
        roles = bool(flags & F_ROLES)
        evs: list[TcpEvent] = []
        ts = 1_000_000

        def ev(kind: EventKind, fc: bool, payload: Any = None, gap: int = 0) -> None:
            nonlocal ts
            ts += 1000
            src, dst = (CLIENT, server) if fc else (server, CLIENT)
            evs.append(TcpEvent(kind, cid, src[0], src[1], dst[0], dst[1], ts, payload, gap=gap,
                                client_is_src=fc if roles else None))

        first = next((s.from_client for s in inp.steps), True)
        if roles:
            ev(EventKind.OPEN, True)
        for s, pieces in zip(inp.steps, inp.cuts, strict=True):
            if s.kind == DATA:
                for piece in pieces:
                    ev(EventKind.DATA, s.from_client, memoryview(piece))
            elif s.kind == GAP:
                ev(EventKind.GAP, s.from_client, gap=s.gap)
            else:
                ev(EventKind.CLOSE, s.from_client)
        end = inp.end
        if end == END_FIN:
            ev(EventKind.CLOSE, not first)
            ev(EventKind.CLOSE, first)
        elif end == END_RST:
            ev(EventKind.RESET, first)
        elif end == END_FIN_SERVER:
            ev(EventKind.CLOSE, False)
        self.catcher.last = ""
        try:
            for i in range(0, len(evs), BATCH):
                stage.consume_events(evs[i:i + BATCH])
            stage.shutdown()
        except Exception as e:
            return Failure("escape", "stage", f"{type(e).__name__}: {e}", traceback.format_exc())
        if stage._conns:
            return Failure("escape", "stage", f"shutdown left {len(stage._conns)} connection(s) tracked")
        for k, v in drops.items():
            if (k == "internal_error" or k.endswith(":internal_error")) and v > before.get(k, 0):
                return Failure("internal_error", "stage", f"stage counted {k}", self.catcher.last)
        if sink.error is not None:
            return sink.error
        return None


def all_protocols() -> list[str]:
    return list(PROTOCOLS)
