"""DNS over UDP and TCP (RFC 1035, RFC 7766): a CLIENT span per query, named by its type.

Contract: processors/protocols/base.py, with its UDP face: ``detect_datagram(view,
from_client)`` and ``Session.feed_datagram(from_client, view, ts_ns)`` take one whole UDP
datagram (a memoryview, read in place); ``detect``/``feed`` take the TCP byte stream, each
message after its 2-byte length (RFC 1035 §4.2.2), several pipelined on one connection
(RFC 7766 §6.2.1: answers may come in any order).

Pairing: a response answers the pending query of its flow (the stage's 5-tuple or TCP
connection) with the same ID. A query whose answer never comes is counted ``no_response``
when it is older than ``query_timeout`` at the flow's next message, or when the flow ends
(the stage's UDP idle timeout, the TCP close). A second query with a pending ID is a
client's retransmission: the first send starts the span (counted ``retransmitted_query``).
A response with no pending query is counted ``unmatched_response``.

Span: name = the question's type (``A``, ``AAAA``, ``TYPE65534`` for an unknown one, RFC
3597 §5), or the opcode for NOTIFY/UPDATE/STATUS; kind CLIENT (SERVER when eBPF traces the
server). Attributes: ``dns.question.name`` (semconv: as on the wire, not normalised; bytes
outside printable ASCII as ``\\DDD``, ``.`` ``\\`` ``"`` inside a label escaped with ``\\``;
the root is ``.``), ``dns.answers`` (semconv: the A/AAAA addresses of the answer section, at
most ``MAX_ANSWER_ADDRESSES``), ``network.transport`` (``udp``/``tcp``),
``network.protocol.name`` = ``dns``, ``server.address``/``server.port``; not (yet) in the
conventions: ``dns.question.type``, ``dns.response.status_code`` (the RCODE's name, with the
EDNS extended bits, RFC 6891 §6.1.3) and ``dns.answer.count`` (the header's ANCOUNT). Any
RCODE but NOERROR is an error: status ERROR, ``error.type`` = its name (``NXDOMAIN``,
``SERVFAIL``, ``REFUSED``, ...).

Bounds: a message is at most 65535 bytes (the TCP length field; UDP's own limit);
section counts are walked only while records fit (each takes 11 bytes at least), so a
header claiming 65535 records costs nothing; a name is at most 255 bytes (RFC 1035
§3.1) and compression pointers must each point before the previous one (as dnspython
requires), so pointer loops end at once. Only the question's name is decoded (a bounded,
deliberate copy of at most 255 bytes into the attribute string); answers are stepped over
in place, their A/AAAA data read as 4/16 bytes. A TCP message split across segments is read
through ``LargeBuffer.view_at``, which gathers it into the buffer's reusable scratch (at most
64 KiB, allocated once): one contiguous view for the parser, no allocation per message.

Detection is strict (it runs on every undetected connection and on every UDP flow the
receivers pass): header flags that no DNS message has (the Z bit, an unknown opcode, a
query with an RCODE), counts that cannot fit, and a message whose question and records do
not parse to its end are refused.
"""

from __future__ import annotations

import re
import socket
import struct
from typing import Any

from processors.protocols.base import Conn, Detection, PendingMap, ProtocolSettings
from processors.protocols.base import Session as _Session
from processors.protocols.errors import Malformed
from service.largebuf import LargeBuffer
from service.model import SpanKind, StatusCode

NAME = "dns"
DEFAULT_PORTS = frozenset({53})

#: Longest name on the wire, length octets included (RFC 1035 §3.1).
MAX_NAME = 255
#: dns.answers keeps at most this many addresses (a round-robin name has a handful).
MAX_ANSWER_ADDRESSES = 16
#: A TCP message's first bytes detection reads at most (the question fits in far less);
#: a longer first message is judged on its header and question alone.
DETECT_BYTES = 1024
#: Seconds a query waits for its answer before it is counted ``no_response`` (glibc's
#: resolver and dig retry after 5 s; twice that covers one retry's answer to the first send).
QUERY_TIMEOUT_S = 10.0

_HDR = struct.Struct("!HHHHHH")
_RR = struct.Struct("!HHIH")  # type, class, ttl, rdlength
_U16 = struct.Struct("!H")
_QR, _AA, _TC, _RD, _RA, _Z = 0x8000, 0x0400, 0x0200, 0x0100, 0x0080, 0x0040
_OPCODES = {0: "QUERY", 2: "STATUS", 4: "NOTIFY", 5: "UPDATE"}
_T_A, _T_AAAA, _T_OPT = 1, 28, 41
_C_IN = 1
_ADDR_LEN = {_T_A: 4, _T_AAAA: 16}

#: QTYPE mnemonics (IANA "Resource Record (RR) TYPEs").
TYPES = {
    1: "A", 2: "NS", 5: "CNAME", 6: "SOA", 12: "PTR", 13: "HINFO", 15: "MX", 16: "TXT", 17: "RP",
    18: "AFSDB", 24: "SIG", 25: "KEY", 28: "AAAA", 29: "LOC", 33: "SRV", 35: "NAPTR", 36: "KX",
    37: "CERT", 39: "DNAME", 41: "OPT", 42: "APL", 43: "DS", 44: "SSHFP", 45: "IPSECKEY", 46: "RRSIG",
    47: "NSEC", 48: "DNSKEY", 49: "DHCID", 50: "NSEC3", 51: "NSEC3PARAM", 52: "TLSA", 53: "SMIMEA",
    55: "HIP", 59: "CDS", 60: "CDNSKEY", 61: "OPENPGPKEY", 62: "CSYNC", 63: "ZONEMD", 64: "SVCB",
    65: "HTTPS", 99: "SPF", 249: "TKEY", 250: "TSIG", 251: "IXFR", 252: "AXFR", 253: "MAILB",
    254: "MAILA", 255: "ANY", 256: "URI", 257: "CAA", 32768: "TA", 32769: "DLV",
}
#: RCODE names (IANA "DNS RCODEs"; 16 is BADVERS in an OPT record).
RCODES = {
    0: "NOERROR", 1: "FORMERR", 2: "SERVFAIL", 3: "NXDOMAIN", 4: "NOTIMP", 5: "REFUSED", 6: "YXDOMAIN",
    7: "YXRRSET", 8: "NXRRSET", 9: "NOTAUTH", 10: "NOTZONE", 11: "DSOTYPENI", 16: "BADVERS", 17: "BADKEY",
    18: "BADTIME", 19: "BADMODE", 20: "BADNAME", 21: "BADALG", 22: "BADTRUNC", 23: "BADCOOKIE",
}
_TYPE_NAMES = dict(TYPES)
_RCODE_NAMES = dict(RCODES)
#: A name every label of which is printable ASCII without ``"`` and ``\\`` (the common case).
_PLAIN = re.compile(rb'[ !#-\[\]-~]*\Z')


class Settings(ProtocolSettings):
    #: Seconds a query waits for its answer before it is counted ``no_response``.
    query_timeout: float = QUERY_TIMEOUT_S


def _type_name(t: int) -> str:
    n = _TYPE_NAMES.get(t)
    if n is None:
        n = f"TYPE{t}"
        if len(_TYPE_NAMES) < 4096:  # bounded: the table grows by the unknown types seen only
            _TYPE_NAMES[t] = n
    return n


def _rcode_name(r: int) -> str:
    n = _RCODE_NAMES.get(r)
    if n is None:
        n = f"RCODE{r}"
        if len(_RCODE_NAMES) < 4096:
            _RCODE_NAMES[r] = n
    return n


def _escape(label: bytes) -> str:
    """One label as dig and the conventions print it (RFC 4343 §2.1)."""
    out = []
    for c in label:
        if c in (0x2E, 0x5C, 0x22):
            out.append("\\" + chr(c))
        elif 0x20 <= c <= 0x7E:
            out.append(chr(c))
        else:
            out.append(f"\\{c:03d}")
    return "".join(out)


def _name(m: Any, off: int, n: int, decode: bool) -> tuple[str | None, int]:
    """The name at ``off`` of message ``m`` (``n`` bytes): (its text, or None when not
    ``decode``, and the offset after it). Raises Malformed on any bad byte."""
    labels: list[Any] | None = [] if decode else None
    end = -1
    limit = off  # a pointer must point before every earlier target: no loops (as dnspython)
    total = 1
    while True:
        if off >= n:
            raise Malformed(NAME, "truncated_name", off)
        c = m[off]
        if c == 0:
            if end < 0:
                end = off + 1
            break
        if c >= 0xC0:
            if off + 1 >= n:
                raise Malformed(NAME, "truncated_name", off)
            p = ((c & 0x3F) << 8) | m[off + 1]
            if end < 0:
                end = off + 2
                if not decode:
                    return None, end
            if p >= limit:
                raise Malformed(NAME, "bad_pointer", off)
            limit = off = p
            continue
        if c & 0xC0:
            raise Malformed(NAME, "bad_label_type", off)  # 0x40/0x80: obsolete or unassigned (RFC 6891 §5)
        total += c + 1
        if total > MAX_NAME:
            raise Malformed(NAME, "name_too_long", off)
        off += 1
        if off + c > n:
            raise Malformed(NAME, "truncated_name", off)
        if labels is not None:
            labels.append(m[off:off + c])
        off += c
    if labels is None:
        return None, end
    if not labels:
        return ".", end
    raw = b".".join(labels)  # a deliberate copy: at most 255 bytes, the attribute's text
    if raw.count(b".") == len(labels) - 1 and _PLAIN.match(raw):
        return raw.decode("ascii"), end
    return ".".join(_escape(bytes(x)) for x in labels), end


class _Msg:
    """What a span needs of one message."""

    __slots__ = ("addrs", "ancount", "flags", "id", "qname", "qtype", "rcode")

    def __init__(self) -> None:
        self.addrs: list[str] | None = None


def _parse(m: Any, n: int, want_answers: bool, whole: bool = True) -> _Msg:
    """Parse message ``m`` (``n`` bytes, a memoryview or bytes): header, the question
    decoded, and (``whole``) every record stepped over, A/AAAA answers kept when
    ``want_answers``. Raises Malformed on anything a DNS message cannot be."""
    if n < 12:
        raise Malformed(NAME, "short_message", 0)
    mid, flags, qd, an, ns, ar = _HDR.unpack_from(m, 0)
    if flags & _Z:
        raise Malformed(NAME, "z_bit", 2)
    opcode = (flags >> 11) & 0xF
    if opcode not in _OPCODES:
        raise Malformed(NAME, "opcode", 2)
    rcode = flags & 0xF
    response = flags & _QR
    if not response and (rcode or flags & _TC):
        raise Malformed(NAME, "query_flags", 2)
    if qd > 1 or (qd == 0 and not (response and rcode)):
        raise Malformed(NAME, "qdcount", 4)
    if (an + ns + ar) * 11 > n - 12:  # each record takes 11 bytes at least (root name, 10 fixed)
        if not flags & _TC:
            raise Malformed(NAME, "counts", 6)
    msg = _Msg()
    msg.id = mid
    msg.flags = flags
    msg.ancount = an
    off = 12
    if qd:
        msg.qname, off = _name(m, off, n, True)
        if off + 4 > n:
            raise Malformed(NAME, "truncated_question", off)
        msg.qtype = (m[off] << 8) | m[off + 1]
        off += 4
    else:
        msg.qname = None
        msg.qtype = -1
    if whole:
        addrs: list[str] | None = None
        for i in range(an + ns + ar):
            if off >= n and flags & _TC:
                break  # a truncated answer holds fewer records than it counts
            _, off = _name(m, off, n, False)
            if off + 10 > n:
                if flags & _TC:
                    break
                raise Malformed(NAME, "truncated_record", off)
            rtype, rclass, ttl, rdlen = _RR.unpack_from(m, off)
            off += 10
            if off + rdlen > n:
                if flags & _TC:
                    break
                raise Malformed(NAME, "truncated_record", off)
            if i < an:
                if want_answers and rclass == _C_IN and rdlen == _ADDR_LEN.get(rtype):
                    if addrs is None:
                        addrs = []
                    if len(addrs) < MAX_ANSWER_ADDRESSES:
                        addrs.append(socket.inet_ntop(socket.AF_INET if rdlen == 4 else socket.AF_INET6,
                                                      bytes(m[off:off + rdlen])))  # 4/16 bytes for the text
            elif rtype == _T_OPT and i >= an + ns:
                rcode |= (ttl >> 24) << 4  # EDNS extended RCODE: the upper 8 of 12 bits
            off += rdlen
        msg.addrs = addrs
    msg.rcode = rcode
    return msg


def detect_datagram(view: Any, from_client: bool | None) -> Detection:
    """One whole UDP datagram: a DNS message, parsed to its end, or not."""
    n = len(view)
    try:
        msg = _parse(view, n, False)
    except Malformed:
        return Detection.NO
    except (IndexError, struct.error):
        return Detection.NO
    return Detection.RESPONSE if msg.flags & _QR else Detection.REQUEST


def detect(buf: LargeBuffer, from_client: bool | None) -> Detection:
    """A TCP stream: the 2-byte length, then a message judged as a datagram is (on its
    first ``DETECT_BYTES`` when longer: header and question)."""
    n = len(buf)
    if n < 2:
        return Detection.NEED_MORE
    size = buf.u16be_at(0)
    if size < 12:
        return Detection.NO
    have = n - 2
    if have < 12:
        # The header so far must already be plausible: bytes 2-3 are the flags.
        if have >= 4 and buf.u16be_at(4) & _Z:
            return Detection.NO
        return Detection.NEED_MORE
    if have < min(size, DETECT_BYTES):
        flags = buf.u16be_at(4)
        if flags & _Z or ((flags >> 11) & 0xF) not in _OPCODES or buf.u16be_at(6) > 1:
            return Detection.NO
        return Detection.NEED_MORE
    whole = size <= DETECT_BYTES
    k = size if whole else DETECT_BYTES
    m = buf.view_at(2, k)
    try:
        msg = _parse(m, k, False, whole)
    except (Malformed, IndexError, struct.error):
        return Detection.NO
    return Detection.RESPONSE if msg.flags & _QR else Detection.REQUEST


class _Query:
    __slots__ = ("id", "opcode", "qname", "qtype", "start_ts")

    def __init__(self, mid: int, qname: str | None, qtype: int, opcode: int, ts: int) -> None:
        self.id = mid
        self.qname = qname
        self.qtype = qtype
        self.opcode = opcode
        self.start_ts = ts


class Session(_Session):
    """One UDP flow or TCP connection: pending queries by ID, a span per answer."""

    protocol = NAME

    def __init__(self, conn: Conn) -> None:
        super().__init__(conn)
        self.pending = PendingMap(conn, 256)
        s = conn.settings
        self._timeout_ns = int((s.query_timeout if isinstance(s, Settings) else QUERY_TIMEOUT_S) * 1e9)
        self.transport = getattr(conn, "transport", "tcp")

    # -- input -----------------------------------------------------------------------
    def feed_datagram(self, from_client: bool, view: Any, ts_ns: int) -> None:
        """One UDP datagram: one message (trailing bytes after its records are tolerated)."""
        self._message(_parse(view, len(view), True), ts_ns)

    def feed(self, from_client: bool, buf: LargeBuffer, ts_ns: int) -> None:
        while True:
            n = len(buf)
            if n < 2:
                buf.want = 2
                return
            size = buf.u16be_at(0)
            if size < 12:
                raise Malformed(NAME, "short_message", 0)
            if n < 2 + size:
                buf.want = 2 + size
                return
            msg = _parse(buf.view_at(2, size), size, True)
            buf.release(2 + size)
            self._message(msg, ts_ns)

    # -- pairing ---------------------------------------------------------------------
    def _message(self, msg: _Msg, ts: int) -> None:
        pending = self.pending
        if pending:
            self._expire(ts)
        if not msg.flags & _QR:
            if msg.id in pending:
                self.conn.drop("retransmitted_query")
                return
            pending[msg.id] = _Query(msg.id, msg.qname, msg.qtype, (msg.flags >> 11) & 0xF, ts)
            return
        q = pending.pop(msg.id, None)
        if q is None:
            self.conn.drop("unmatched_response")
            return
        self._span(q, msg, ts)

    def _expire(self, now: int) -> None:
        cutoff = now - self._timeout_ns
        pending = self.pending
        while pending:
            k = next(iter(pending))
            if pending[k].start_ts >= cutoff:
                break
            del pending[k]
            self.conn.drop("no_response")

    def _span(self, q: _Query, msg: _Msg | None, end: int) -> None:
        """The query's span, with its answer; ``msg`` None: the answer was cut short by the end
        of the connection (base.py's rule: a span of the query, marked incomplete)."""
        conn = self.conn
        qname = q.qname if q.qname is not None or msg is None else msg.qname
        rcode = msg.rcode if msg is not None else 0
        rname = _rcode_name(rcode)
        attrs: dict[str, Any] = {"network.transport": self.transport, "network.protocol.name": "dns"}
        if msg is not None:
            attrs["dns.response.status_code"] = rname
            attrs["dns.answer.count"] = msg.ancount
        if qname is not None:
            attrs["dns.question.name"] = qname
        qtype = q.qtype if q.qtype >= 0 or msg is None else msg.qtype
        tname = _type_name(qtype) if qtype >= 0 else ""
        if tname:
            attrs["dns.question.type"] = tname
        if msg is not None and msg.addrs:
            attrs["dns.answers"] = msg.addrs
        name = tname if q.opcode == 0 and tname else _OPCODES.get(q.opcode, "QUERY")
        status = StatusCode.UNSET
        message = ""
        if rcode:
            attrs["error.type"] = rname
            status = StatusCode.ERROR
            message = rname
        span = conn.span(name, conn.kind_for(SpanKind.CLIENT), q.start_ts, end, attrs,
                         status_code=status, status_message=message)
        if msg is None:
            self.cut_short(span)
        else:
            conn.emit(span)

    # -- ends ------------------------------------------------------------------------
    def gap(self, from_client: bool, ts_ns: int) -> None:
        """Bytes lost on a TCP connection: the answers in flight may be gone with them."""
        for _ in range(len(self.pending)):
            self.conn.drop("no_response")
        self.pending.clear()

    def close(self, ts_ns: int, reset: bool = False) -> None:
        """The flow idled out or the connection ended: unanswered queries are counted; over
        TCP, the one whose answer had begun (its ID in sight, else the oldest) is a span."""
        pending = self.pending
        if self.transport == "tcp" and pending and self.reply_begun():
            buf = self.conn.server_buf
            q = pending.pop(buf.u16be_at(2), None) if len(buf) >= 4 else None
            if q is None:
                q = pending.pop(next(iter(pending)))
            self._span(q, None, ts_ns)
        for _ in range(len(pending)):
            self.cut_short(None, "no_response")
        pending.clear()
