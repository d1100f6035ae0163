"""NATS core protocol (text): spans for PUB/HPUB, MSG/HMSG, SUB/UNSUB and ``-ERR``.

Contract: processors/protocols/base.py. The NATS client protocol is control lines
ending in CRLF, some followed by a payload of a declared length (docs.nats.io,
"Client Protocol"):

    client: CONNECT {json} | PUB <subject> [reply-to] <#bytes> | HPUB <subject> [reply-to]
            <#header bytes> <#total bytes> | SUB <subject> [queue group] <sid> |
            UNSUB <sid> [max_msgs] | PING | PONG
    server: INFO {json} | MSG <subject> <sid> [reply-to] <#bytes> | HMSG <subject> <sid>
            [reply-to] <#header bytes> <#total bytes> | PING | PONG | +OK | -ERR <message>

Operation names are case-blind and fields are separated by runs of spaces or tabs.
Only the control line is copied (a bounded, deliberate copy, as Redis's command words);
a payload is stepped over as it arrives and released, so a 64 MiB message costs no
memory. Of an HPUB/HMSG header block (``NATS/1.0[ status]`` then ``Name: value`` lines)
only ``traceparent`` is kept, and only a block within ``MAX_HEADER_BYTES`` is read.

Pairing: NATS acknowledges nothing unless the client's CONNECT asked for
``"verbose": true``; then the server answers every CONNECT, PUB, HPUB, SUB and UNSUB in
order with ``+OK`` or ``-ERR``, and the span of each ends at that answer (its ``-ERR`` an
error). Without it (the default of every client library) a publish or a subscription
ends when its bytes are sent, and an ``-ERR`` the server sends later is a span of its own,
named for what it names (``Permissions Violation for Publish to "x"`` -> an ERROR
``publish x``): the wire does not say which message it answered. A ``-ERR`` while the
CONNECT is unanswered (before the server's first PONG) is a refused connection: an ERROR
``connect`` span.
"""

from __future__ import annotations

import json
import re
from collections import OrderedDict
from typing import Any, ClassVar

from processors.protocols.base import Conn, Detection, PendingQueue, ProtocolSettings, Session
from processors.protocols.errors import LimitExceeded, Malformed
from service.largebuf import LargeBuffer
from service.model import SpanKind, StatusCode

NAME = "nats"
DEFAULT_PORTS = frozenset({4222})

#: Longest control line of the messaging operations: nats-server's own
#: ``MAX_CONTROL_LINE_SIZE`` default (4096).
MAX_CONTROL_LINE = 4096
#: INFO and CONNECT carry JSON that grows with a cluster's URLs and a client's JWT:
#: allowed this long (nats-server caps what it reads of a client with max_control_line,
#: which operators raise for JWTs).
MAX_JSON_LINE = 64 * 1024
_NL = re.compile(rb"\n").search  # a line's end, searched in place in a chunk
#: The largest payload nats-server accepts (``max_payload`` may be raised to 64 MiB).
MAX_PAYLOAD = 64 * 1024 * 1024
#: Header blocks up to this size are read for ``traceparent``; larger ones are skipped.
MAX_HEADER_BYTES = 64 * 1024
#: Subscriptions remembered per connection (sid -> subject), oldest forgotten first.
MAX_SUBSCRIPTIONS = 65_536
#: Bytes of a subject kept for a span.
MAX_SUBJECT = 1024

_MSG_OPS = (b"PUB", b"HPUB", b"MSG", b"HMSG", b"SUB")
_CLIENT_WORDS = (b"CONNECT", b"PUB", b"HPUB", b"SUB")
_SERVER_WORDS = (b"INFO", b"MSG", b"HMSG")
#: A subject (or a reply subject, a queue group): printable ASCII but space.
_TOKEN = re.compile(rb"[!-~]{1,1024}\Z")
_SID = re.compile(rb"[A-Za-z0-9_\-.]{1,64}\Z")
_PRINTABLE_LINE = re.compile(rb"[\t -~]*\Z")
#: ``-ERR`` texts (lower-cased prefixes, nats-server's server/errors.go) -> error.type.
_ERRORS = (
    ("permissions violation", "permissions_violation"),
    ("authorization violation", "authorization_violation"),
    ("user authentication expired", "authentication_expired"),
    ("user authentication revoked", "authentication_revoked"),
    ("account authentication expired", "authentication_expired"),
    ("authentication timeout", "authentication_timeout"),
    ("maximum payload violation", "maximum_payload_violation"),
    ("maximum connections exceeded", "maximum_connections_exceeded"),
    ("maximum subscriptions exceeded", "maximum_subscriptions_exceeded"),
    ("stale connection", "stale_connection"),
    ("slow consumer", "slow_consumer"),
    ("unknown protocol operation", "unknown_protocol_operation"),
    ("parser error", "parser_error"),
    ("invalid subject", "invalid_subject"),
    ("invalid publish subject", "invalid_subject"),
    ("secure connection - tls required", "tls_required"),
    ("maximum control line exceeded", "maximum_control_line_exceeded"),
    ("no responders", "no_responders"),
)
_PERM = re.compile(r"permissions violation for (publish|subscription) to \"?([^\"\s]*)\"?", re.I)


class Settings(ProtocolSettings):
    #: Also make a span for every CONNECT (a refused one always gets one).
    trace_connect: bool = False
    #: Spans for SUB and UNSUB (``subscribe {subject}`` / ``unsubscribe {subject}``).
    trace_subscriptions: bool = True


# ---------------------------------------------------------------------------
# detection
# ---------------------------------------------------------------------------
def _word_prefix(head: bytes, words: tuple[bytes, ...]) -> bool:
    """``head`` (upper-cased, no delimiter yet) could still become one of ``words``."""
    return any(w.startswith(head) for w in words)


def detect(buf: LargeBuffer, from_client: bool | None) -> Detection:
    n = len(buf)
    if n == 0:
        return Detection.NEED_MORE
    head = buf.bytes_at(0, min(n, 8)).upper()  # <= 8 bytes
    sp = next((i for i, c in enumerate(head) if c in (0x20, 0x09)), -1)
    words = (_CLIENT_WORDS if from_client is True else _SERVER_WORDS if from_client is False
             else _CLIENT_WORDS + _SERVER_WORDS)
    if sp < 0:
        return Detection.NEED_MORE if len(head) < 8 and _word_prefix(head, words) else Detection.NO
    word = head[:sp]
    if word not in words:
        return Detection.NO
    limit = MAX_JSON_LINE if word in (b"CONNECT", b"INFO") else MAX_CONTROL_LINE
    nl = buf.find(b"\n", 0, min(n, limit + 2))
    if nl < 0:
        # Still a plausible line? (NO is final: a control byte stays in every longer prefix.)
        seen = buf.bytes_at(0, min(n, 256))
        if seen.endswith(b"\r") and n <= 256:
            seen = seen[:-1]  # the line's CR, its LF still to come
        if n > limit + 1 or _PRINTABLE_LINE.match(seen) is None:
            return Detection.NO
        return Detection.NEED_MORE
    end = nl - 1 if nl > 0 and buf.u8_at(nl - 1) == 0x0D else nl
    line = buf.bytes_at(0, end)  # one control line: bounded, a deliberate copy
    if _PRINTABLE_LINE.match(line) is None:
        return Detection.NO
    ans = Detection.REQUEST if word in _CLIENT_WORDS else Detection.RESPONSE
    rest = line[sp:].strip()
    if word in (b"CONNECT", b"INFO"):
        if not (rest.startswith(b"{") and rest.endswith(b"}")):
            return Detection.NO
        try:
            obj = json.loads(rest)
        except ValueError:
            return Detection.NO
        if not isinstance(obj, dict):
            return Detection.NO
        if word == b"INFO" and "server_id" not in obj and "version" not in obj:
            return Detection.NO
        if word == b"CONNECT" and not ({"verbose", "pedantic", "lang", "protocol", "name"} & obj.keys()):
            return Detection.NO
        return ans
    fields = rest.split()
    try:
        msg = _parse_fields(word, fields)
    except Malformed:
        return Detection.NO
    if word == b"SUB":
        return ans
    hdr, total = msg[3], msg[4]
    body = nl + 1
    if hdr:  # a header block starts with its version line
        if n < body + 8:
            return Detection.NEED_MORE
        return ans if buf.view_at(body, 8) == b"NATS/1.0" else Detection.NO
    if total > MAX_CONTROL_LINE:
        return ans  # a well-formed line announcing a large payload: enough
    if n < body + total + 2:
        return Detection.NEED_MORE
    return ans if buf.view_at(body + total, 2) == b"\r\n" else Detection.NO


def _parse_fields(word: bytes, f: list[bytes]) -> tuple[str, str | None, str | None, int, int, str | None]:
    """A messaging line's fields -> (subject, sid, reply, header bytes, total bytes, queue).

    Raises Malformed for a line of the wrong shape."""
    sid = reply = queue = None
    hdr = 0
    if word == b"PUB":
        if len(f) not in (2, 3):
            raise Malformed(NAME, "bad_line", 0, "PUB <subject> [reply-to] <#bytes>")
        subj, total = f[0], _size(f[-1])
        reply = f[1] if len(f) == 3 else None
    elif word == b"HPUB":
        if len(f) not in (3, 4):
            raise Malformed(NAME, "bad_line", 0, "HPUB <subject> [reply-to] <#hdr> <#total>")
        subj, hdr, total = f[0], _size(f[-2]), _size(f[-1])
        reply = f[1] if len(f) == 4 else None
    elif word == b"MSG":
        if len(f) not in (3, 4):
            raise Malformed(NAME, "bad_line", 0, "MSG <subject> <sid> [reply-to] <#bytes>")
        subj, sid, total = f[0], f[1], _size(f[-1])
        reply = f[2] if len(f) == 4 else None
    elif word == b"HMSG":
        if len(f) not in (4, 5):
            raise Malformed(NAME, "bad_line", 0, "HMSG <subject> <sid> [reply-to] <#hdr> <#total>")
        subj, sid, hdr, total = f[0], f[1], _size(f[-2]), _size(f[-1])
        reply = f[2] if len(f) == 5 else None
    else:  # SUB
        if len(f) not in (2, 3):
            raise Malformed(NAME, "bad_line", 0, "SUB <subject> [queue group] <sid>")
        subj, sid = f[0], f[-1]
        queue = f[1] if len(f) == 3 else None
        total = 0
    if _TOKEN.match(subj) is None or subj.startswith(b".") or subj.endswith(b".") or b".." in subj:
        raise Malformed(NAME, "bad_subject", 0)
    if word in (b"PUB", b"HPUB", b"MSG", b"HMSG") and (b"*" in subj.split(b".") or b">" in subj.split(b".")):
        raise Malformed(NAME, "bad_subject", 0, "a wildcard in a message's subject")
    if sid is not None and _SID.match(sid) is None:
        raise Malformed(NAME, "bad_sid", 0)
    for t in (reply, queue):
        if t is not None and _TOKEN.match(t) is None:
            raise Malformed(NAME, "bad_line", 0)
    if hdr > total or (word in (b"HPUB", b"HMSG") and hdr < 10):  # "NATS/1.0\r\n" at least
        raise Malformed(NAME, "bad_header_size", 0)
    return (subj.decode("ascii"), sid.decode("ascii") if sid is not None else None,  # type: ignore[return-value]
            reply.decode("ascii") if reply is not None else None, hdr, total,
            queue.decode("ascii") if queue is not None else None)


def _size(b: bytes) -> int:
    if not b.isdigit() or len(b) > 10:
        raise Malformed(NAME, "bad_size", 0)
    v = int(b)
    if v > MAX_PAYLOAD:
        raise Malformed(NAME, "bad_size", 0, "past nats-server's largest max_payload")
    return v


# ---------------------------------------------------------------------------
# session
# ---------------------------------------------------------------------------
def _temporary(subject: str) -> bool:
    """A request's reply inbox (``_INBOX.<random>``): a temporary destination, kept out of
    span names (they must stay low-cardinality: the messaging conventions)."""
    return subject.startswith("_INBOX.")


class _Msg:
    """A PUB/HPUB/MSG/HMSG whose payload is being stepped over, or a verbose-mode request
    awaiting its +OK."""

    __slots__ = ("attrs", "hdr", "kind", "name", "op", "start_ts", "traceparent")

    def __init__(self, op: str, name: str, kind: SpanKind, start_ts: int, attrs: dict[str, Any]) -> None:
        self.op = op
        self.name = name
        self.kind = kind
        self.start_ts = start_ts
        self.attrs = attrs
        self.traceparent: str | None = None
        self.hdr = 0  # header bytes still to read before the payload


def _msg_traceparent(m: _Msg) -> Any:
    return m.traceparent


class _Dir:
    __slots__ = ("crlf", "cur", "skip")

    def __init__(self) -> None:
        self.cur: _Msg | None = None  # the message whose payload is arriving
        self.skip = 0                  # payload bytes still to step over
        self.crlf = False              # the CRLF after a payload is still to come


class Session(Session):  # type: ignore[no-redef]
    protocol: ClassVar[str] = NAME

    def __init__(self, conn: Conn) -> None:
        super().__init__(conn)
        self.settings: Settings = conn.settings if isinstance(conn.settings, Settings) else Settings()
        self.dirs = (_Dir(), _Dir())  # from server, from client
        self.verbose = False
        self.client_name: str | None = None
        self.client_id: str | None = None  # INFO's client_id, when CONNECT names none
        #: CONNECT awaiting its answer (the server's first PONG or +OK, or a -ERR).
        self.connect: _Msg | None = None
        #: verbose mode: requests awaiting +OK/-ERR, in order.
        self.acks: PendingQueue = PendingQueue(conn, traceparent=_msg_traceparent)
        self.subs: OrderedDict[str, tuple[str, str | None]] = OrderedDict()  # sid -> (subject, queue)

    # -- framing ------------------------------------------------------------
    def feed(self, from_client: bool, buf: LargeBuffer, ts_ns: int) -> None:
        # Lines and payloads are walked with a cursor and released once at the end (a
        # release per line, header block, payload and CRLF re-sliced the chunk list each
        # time); a line's end is searched in the chunk holding it (re on the view), the
        # buffer's find only for a line across chunks.
        d = self.dirs[from_client]
        off = 0
        want = 0
        n = len(buf)
        limit = MAX_JSON_LINE
        try:
            while True:
                m = d.cur
                if m is not None and (d.skip or d.crlf or m.hdr):
                    # The header block, the payload stepped over, its CRLF; the message is
                    # emitted when whole.
                    if m.hdr:
                        if m.hdr <= MAX_HEADER_BYTES:
                            if n - off < m.hdr:
                                want = m.hdr
                                return
                            self._headers(m, buf.bytes_at(off, m.hdr))  # bounded by MAX_HEADER_BYTES
                            off += m.hdr
                            m.hdr = 0
                        else:  # too large to read: stepped over with the payload
                            d.skip += m.hdr
                            m.hdr = 0
                    if d.skip:
                        take = min(d.skip, n - off)
                        off += take
                        d.skip -= take
                        if d.skip:
                            return
                    if d.crlf:
                        if n - off < 2:
                            want = 2
                            return
                        if buf.view_at(off, 2) != b"\r\n":
                            d.cur, d.crlf = None, False
                            raise Malformed(NAME, "bad_payload_end", 0, "the payload does not end with CRLF")
                        off += 2
                        d.crlf = False
                    d.cur = None
                    self._done(m, ts_ns)
                    continue
                if n == off:
                    return
                lim = n if n - off < limit + 2 else off + limit + 2
                c, cs = buf.chunk_at(off)
                ce = cs + len(c)
                hit = _NL(c, off - cs, (lim if lim < ce else ce) - cs)
                if hit is not None:
                    nl = cs + hit.start()
                elif lim <= ce:
                    nl = -1
                else:  # the line goes on in the next chunk
                    nl = buf.find(b"\n", ce, lim)
                if nl < 0:
                    if n - off > limit + 1:
                        raise LimitExceeded(NAME, "line_too_long", 0)
                    return
                end = nl - 1 if nl > off and buf.u8_at(nl - 1) == 0x0D else nl
                line = buf.bytes_at(off, end - off)  # the control line: a bounded, deliberate copy
                start = buf.ts_at(off)
                off = nl + 1
                self._line(from_client, d, line, start, ts_ns)
        finally:
            buf.consumed(off, want)

    def _headers(self, m: _Msg, raw: bytes) -> None:
        lines = raw.decode("latin-1").split("\r\n")
        first = lines[0]
        if not first.startswith("NATS/1.0"):
            raise Malformed(NAME, "bad_headers", 0, "no NATS/1.0 version line")
        status = first[8:].strip()
        if status:
            code, _, text = status.partition(" ")
            if code.isdigit():
                m.attrs["messaging.nats.status_code"] = int(code)
                if int(code) >= 400:
                    m.attrs["error.type"] = code
                    m.attrs["_status_message"] = text.strip() or ("No Responders" if code == "503" else code)
        for ln in lines[1:]:
            k, sep, v = ln.partition(":")
            if sep and k.strip().lower() == "traceparent":
                m.traceparent = v.strip()
                break

    # -- one control line ----------------------------------------------------
    def _line(self, from_client: bool, d: _Dir, line: bytes, start: int, ts_ns: int) -> None:
        stripped = line.strip()
        if not stripped:
            return  # an empty line: telnet users; nats-server ignores it too
        parts = stripped.split(None, 1)
        op = parts[0].upper()
        rest = parts[1] if len(parts) > 1 else b""
        if op in _MSG_OPS:
            if len(line) > MAX_CONTROL_LINE:
                raise LimitExceeded(NAME, "line_too_long", 0)
            fields = rest.split()
            subj, sid, reply, hdr, total, queue = _parse_fields(op, fields)
            if op == b"SUB":
                self._sub(subj, sid, queue, start, ts_ns)  # type: ignore[arg-type]
                return
            self._message(from_client, d, op, subj, sid, reply, hdr, total, start, ts_ns)
            return
        if op == b"UNSUB":
            f = rest.split()
            if not 1 <= len(f) <= 2 or _SID.match(f[0]) is None or (len(f) == 2 and not f[1].isdigit()):
                raise Malformed(NAME, "bad_line", 0, "UNSUB <sid> [max_msgs]")
            self._unsub(f[0].decode("ascii"), int(f[1]) if len(f) == 2 else None, start, ts_ns)
            return
        if op in (b"PING", b"PONG"):
            if op == b"PONG" and not from_client:
                self._connected(ts_ns)
            return
        if op == b"+OK":
            self._ok(ts_ns)
            return
        if op == b"-ERR":
            self._err(rest.strip().strip(b"'").decode("utf-8", "replace")[:512], start, ts_ns)
            return
        if op == b"CONNECT":
            self._connect(rest, start)
            return
        if op == b"INFO":
            self._info(rest)
            return
        raise Malformed(NAME, "unknown_operation", 0, op[:16].decode("latin-1"))

    def _message(self, from_client: bool, d: _Dir, op: bytes, subj: str, sid: str | None, reply: str | None,
                 hdr: int, total: int, start: int, ts_ns: int) -> None:
        publish = op in (b"PUB", b"HPUB")
        opname = "publish" if publish else "process"
        temporary = _temporary(subj)
        attrs: dict[str, Any] = {
            "messaging.system": "nats",
            "messaging.operation.name": opname,
            "messaging.operation.type": "send" if publish else "process",
            "messaging.destination.name": subj[:MAX_SUBJECT],
            "messaging.message.body.size": total - hdr,
        }
        if temporary:
            attrs["messaging.destination.temporary"] = True
        if sid is not None:
            attrs["messaging.nats.sid"] = sid
            sub = self.subs.get(sid)
            if sub is not None and sub[1]:
                attrs["messaging.consumer.group.name"] = sub[1]
        if reply is not None:
            attrs["messaging.nats.reply_to"] = reply[:MAX_SUBJECT]
        kind = SpanKind.PRODUCER if publish else SpanKind.CONSUMER
        name = opname if temporary else f"{opname} {subj[:MAX_SUBJECT]}"
        m = _Msg(opname, name, self.conn.kind_for(kind, kind), start, attrs)
        m.hdr = hdr
        d.cur = m
        d.skip = total - hdr
        d.crlf = True  # feed's loop reads the headers and steps over the payload

    def _done(self, m: _Msg, ts_ns: int) -> None:
        """A message is whole: a delivery ends now, a publish too unless verbose (+OK ends it)."""
        if m.op == "publish" and self.verbose:
            self.acks.append(m)
            return
        if m.op == "process" and m.attrs.get("messaging.nats.status_code", 0) in (100,):
            return  # JetStream idle heartbeat / flow control: no message for the application
        self._emit(m, ts_ns)

    def _sub(self, subj: str, sid: str, queue: str | None, start: int, ts_ns: int) -> None:
        if sid not in self.subs and len(self.subs) >= MAX_SUBSCRIPTIONS:
            self.subs.popitem(last=False)
        self.subs[sid] = (subj, queue)
        attrs: dict[str, Any] = {"messaging.system": "nats", "messaging.operation.name": "subscribe",
                                 "messaging.destination.name": subj[:MAX_SUBJECT],
                                 "messaging.nats.sid": sid}
        if queue:
            attrs["messaging.consumer.group.name"] = queue
        name = "subscribe" if _temporary(subj) else f"subscribe {subj[:MAX_SUBJECT]}"
        self._request(_Msg("subscribe", name, self.conn.kind_for(SpanKind.CLIENT), start, attrs), ts_ns,
                      self.settings.trace_subscriptions)

    def _unsub(self, sid: str, max_msgs: int | None, start: int, ts_ns: int) -> None:
        sub = self.subs.get(sid) if max_msgs else self.subs.pop(sid, None)
        attrs: dict[str, Any] = {"messaging.system": "nats", "messaging.operation.name": "unsubscribe",
                                 "messaging.nats.sid": sid}
        name = "unsubscribe"
        if sub is not None:
            attrs["messaging.destination.name"] = sub[0][:MAX_SUBJECT]
            if not _temporary(sub[0]):
                name = f"unsubscribe {sub[0][:MAX_SUBJECT]}"
        if max_msgs is not None:
            attrs["messaging.nats.max_messages"] = max_msgs
        self._request(_Msg("unsubscribe", name, self.conn.kind_for(SpanKind.CLIENT), start, attrs), ts_ns,
                      self.settings.trace_subscriptions)

    def _request(self, m: _Msg, ts_ns: int, traced: bool) -> None:
        """A client request without a payload: awaits +OK when verbose, else ends now."""
        if self.verbose:
            if not traced:
                m.op = "untraced"
            self.acks.append(m)
        elif traced:
            self._emit(m, ts_ns)

    def _connect(self, rest: bytes, start: int) -> None:
        try:
            obj = json.loads(rest)  # the credentials in it are read by the parser and never kept
        except ValueError:
            raise Malformed(NAME, "bad_connect", 0) from None
        if not isinstance(obj, dict):
            raise Malformed(NAME, "bad_connect", 0)
        self.verbose = obj.get("verbose") is True
        name = obj.get("name")
        if isinstance(name, str) and name:
            self.client_name = name[:256]
        attrs: dict[str, Any] = {"messaging.system": "nats", "messaging.operation.name": "connect"}
        m = _Msg("connect", "connect", self.conn.kind_for(SpanKind.CLIENT), start, attrs)
        if self.verbose:
            self.acks.append(m)  # +OK answers it, in order with what follows
        else:
            self.connect = m

    def _info(self, rest: bytes) -> None:
        try:
            obj = json.loads(rest)
        except ValueError:
            raise Malformed(NAME, "bad_info", 0) from None
        if isinstance(obj, dict) and isinstance(obj.get("client_id"), int) and self.client_id is None:
            self.client_id = str(obj["client_id"])

    def _connected(self, ts_ns: int) -> None:
        m, self.connect = self.connect, None
        if m is not None and self.settings.trace_connect:
            self._emit(m, ts_ns)

    def _ok(self, ts_ns: int) -> None:
        if not self.acks:
            self._connected(ts_ns)
            return
        m = self.acks.popleft()
        if m.op == "connect":
            if self.settings.trace_connect:
                self._emit(m, ts_ns)
        elif m.op != "untraced":
            self._emit(m, ts_ns)

    def _err(self, text: str, start: int, ts_ns: int) -> None:
        low = text.lower()
        etype = next((t for p, t in _ERRORS if low.startswith(p)), "_OTHER")
        perm = _PERM.match(text)
        m: _Msg | None = None
        if etype in ("stale_connection", "slow_consumer"):
            pass  # about the connection, not an answer to a request
        elif self.acks:
            m = self.acks.popleft()
        elif perm is None:
            m, self.connect = self.connect, None
        if m is None:
            attrs: dict[str, Any] = {"messaging.system": "nats"}
            if perm is not None:
                op = "publish" if perm.group(1).lower() == "publish" else "subscribe"
                subj = perm.group(2)[:MAX_SUBJECT]
                attrs["messaging.operation.name"] = op
                attrs["messaging.destination.name"] = subj
                if op == "publish":
                    attrs["messaging.operation.type"] = "send"
                kind = SpanKind.PRODUCER if op == "publish" else SpanKind.CLIENT
                name = op if _temporary(subj) else f"{op} {subj}"
                m = _Msg(op, name, self.conn.kind_for(kind, kind), start, attrs)
            else:
                m = _Msg("error", "error", self.conn.kind_for(SpanKind.CLIENT), start, attrs)
        m.attrs["error.type"] = etype
        self._emit(m, ts_ns, StatusCode.ERROR, text)

    def _emit(self, m: _Msg, end_ts: int, status: StatusCode = StatusCode.UNSET, msg: str = "",
              incomplete: bool = False) -> None:
        attrs = m.attrs
        cid = self.client_name or self.client_id
        if cid:
            attrs["messaging.client.id"] = cid
        smsg = attrs.pop("_status_message", None)
        if smsg is not None and status == StatusCode.UNSET:
            status, msg = StatusCode.ERROR, smsg
        conn = self.conn
        span = conn.span(m.name, m.kind, m.start_ts, end_ts, attrs, traceparent=m.traceparent,
                         status_code=status, status_message=msg)
        if incomplete:
            self.cut_short(span)
        else:
            conn.emit(span)

    # -- gaps and the end ----------------------------------------------------------
    def skip_gap(self, from_client: bool, nbytes: int, ts_ns: int) -> bool:
        d = self.dirs[from_client]
        m = d.cur
        if m is None or m.hdr:
            return False
        if d.skip >= nbytes:
            d.skip -= nbytes  # lost bytes inside a payload: nothing of them is read anyway
            return True
        # The loss runs past this payload (an eBPF message cap cut a batch of messages): this
        # one is whole as far as its span goes; what followed it is lost and resynchronised.
        d.cur, d.skip, d.crlf = None, 0, False
        self._done(m, ts_ns)
        return False

    def gap(self, from_client: bool, ts_ns: int) -> None:
        d = self.dirs[from_client]
        if d.cur is not None:
            self.conn.drop("incomplete_message")
        d.cur, d.skip, d.crlf = None, 0, False
        if not from_client and self.acks:  # the answers to pair with are lost
            for _ in range(len(self.acks)):
                self.conn.drop("no_ack")
            self.acks.clear()

    def close(self, ts_ns: int, reset: bool = False) -> None:
        for fc in (True, False):
            d = self.dirs[fc]
            m = d.cur
            if m is not None and m.op in ("publish", "process") and not (fc and self.verbose) and \
                    m.attrs.get("messaging.nats.status_code", 0) != 100:  # 100: a heartbeat, as _done
                # A message whose payload was arriving: base.py's rule, a span of what was seen.
                self._emit(m, ts_ns, incomplete=True)
            elif m is not None and not len(self.conn.client_buf if fc else self.conn.server_buf):
                self.conn.drop("incomplete_message")  # the stage counts what is still buffered
            d.cur, d.skip, d.crlf = None, 0, False
        # Verbose mode: a publish left without its +OK was sent as far as the wire shows (a
        # span marked incomplete, as MQTT's); a subscription without it has no outcome.
        for m in self.acks:
            if m.op == "publish":
                cid = self.client_name or self.client_id
                if cid:
                    m.attrs["messaging.client.id"] = cid
                self.cut_short(self.conn.span(m.name, m.kind, m.start_ts, m.start_ts, m.attrs, m.traceparent))
            elif m.op != "untraced":
                self.cut_short(None, "no_ack")
        self.acks.clear()
        self.connect = None
