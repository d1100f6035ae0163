"""TLS for the receivers (issue 15): what a TLS connection is, and its handshake's plain fields.

Contract:
- ``TlsConnId``: the ``conn_id`` of a connection's TLS *plaintext* (what SSL_read/SSL_write moved,
  or what a key log decrypted). It is the underlying connection's id plus ``"tls"``, so the
  plaintext is a connection of its own for the protocols stage (the cleartext before a STARTTLS
  such as PostgreSQL's SSLRequest stays on the original id), and carries ``tls``: span
  attributes of the connection (``tls.protocol.name``, ``tls.protocol.version``, ``tls.cipher``
  when known). The stage adds them to the connection's spans and sets ``url.scheme=https``.
- ``looks_like_tls(payload)``: True when bytes at the start of a message are a TLS handshake
  record (a ClientHello or ServerHello), how receivers tell ciphertext from cleartext.
- ``HelloSniffer``: fed one connection's bytes per direction (in any segmentation), it finds
  the ServerHello and reports the negotiated version and cipher (TLS 1.3 by its
  supported_versions extension; a HelloRetryRequest is skipped). It copies at most
  ``MAX_SNIFF_BYTES`` per direction and then gives up.
"""

from __future__ import annotations

import hashlib
import struct
from typing import Any

__all__ = ["TlsConnId", "HelloSniffer", "looks_like_tls", "parse_server_hello", "parse_client_hello",
           "version_name", "CIPHER_NAMES", "HRR_RANDOM"]

#: TLSPlaintext content types (RFC 8446 §5.1, RFC 5246 §6.2.1)
CT_CCS, CT_ALERT, CT_HANDSHAKE, CT_APPDATA = 20, 21, 22, 23
#: Handshake types (RFC 8446 §4)
HS_CLIENT_HELLO, HS_SERVER_HELLO, HS_NEW_SESSION_TICKET, HS_END_OF_EARLY_DATA = 1, 2, 4, 5
HS_FINISHED, HS_KEY_UPDATE = 20, 24
EXT_SUPPORTED_VERSIONS, EXT_SESSION_TICKET, EXT_PRE_SHARED_KEY, EXT_EARLY_DATA = 43, 35, 41, 42
#: RFC 8446 §5.1: TLSPlaintext.length <= 2^14; TLSCiphertext.length <= 2^14 + 256 (RFC 5246
#: allows + 2048 for TLS 1.2 ciphertext).
MAX_PLAINTEXT = 1 << 14
MAX_RECORD = (1 << 14) + 2048
#: The ServerHello.random of a HelloRetryRequest (RFC 8446 §4.1.3).
HRR_RANDOM = hashlib.sha256(b"HelloRetryRequest").digest()
#: Handshake bytes a sniffer keeps per direction before giving up (a ServerHello, even with a
#: HelloRetryRequest first, is far smaller).
MAX_SNIFF_BYTES = 16 << 10

#: IANA names of the cipher suites wirespan decrypts (and a few common others), for tls.cipher.
CIPHER_NAMES: dict[int, str] = {
    0x1301: "TLS_AES_128_GCM_SHA256", 0x1302: "TLS_AES_256_GCM_SHA384",
    0x1303: "TLS_CHACHA20_POLY1305_SHA256", 0x1304: "TLS_AES_128_CCM_SHA256",
    0xC02B: "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256", 0xC02C: "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384",
    0xC02F: "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256", 0xC030: "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384",
    0xCCA8: "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256",
    0xCCA9: "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256",
    0xCCAA: "TLS_DHE_RSA_WITH_CHACHA20_POLY1305_SHA256",
    0x009C: "TLS_RSA_WITH_AES_128_GCM_SHA256", 0x009D: "TLS_RSA_WITH_AES_256_GCM_SHA384",
    0x009E: "TLS_DHE_RSA_WITH_AES_128_GCM_SHA256", 0x009F: "TLS_DHE_RSA_WITH_AES_256_GCM_SHA384",
    0xC013: "TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA", 0xC014: "TLS_ECDHE_RSA_WITH_AES_256_CBC_SHA",
    0x002F: "TLS_RSA_WITH_AES_128_CBC_SHA", 0x0035: "TLS_RSA_WITH_AES_256_CBC_SHA",
}

_VERSIONS = {0x0304: "1.3", 0x0303: "1.2", 0x0302: "1.1", 0x0301: "1.0"}


def version_name(v: int) -> str | None:
    """``tls.protocol.version`` of a wire version (0x0303 -> "1.2"), None for others."""
    return _VERSIONS.get(v)


class TlsConnId(tuple):
    """The conn_id of a connection's TLS plaintext: ``(*underlying_id, "tls")`` plus ``tls``,
    the span attributes of the connection (a dict the receiver may complete later, e.g. once
    the version is known). Hashes and compares as the tuple."""

    tls: dict[str, Any]

    def __new__(cls, underlying: Any, attrs: dict[str, Any] | None = None) -> TlsConnId:
        parts = tuple(underlying) if isinstance(underlying, tuple) else (underlying,)
        self = super().__new__(cls, (*parts, "tls"))
        self.tls = attrs if attrs is not None else {"tls.protocol.name": "tls"}
        return self

    def __reduce__(self) -> Any:
        return (TlsConnId, (tuple(self[:-1]), self.tls))


def tls_attrs(version: int | None, cipher: int | None) -> dict[str, Any]:
    """Span attributes of a TLS connection (semconv ``tls.*``) from its ServerHello."""
    a: dict[str, Any] = {"tls.protocol.name": "tls"}
    v = version_name(version) if version is not None else None
    if v is not None:
        a["tls.protocol.version"] = v
    if cipher is not None and cipher in CIPHER_NAMES:
        a["tls.cipher"] = CIPHER_NAMES[cipher]
    return a


def looks_like_tls(p: Any) -> bool:
    """Do these bytes (a payload's first ones, at a message boundary) start a TLS handshake?

    A record header of type handshake (22), version 3.0-3.4, a length that fits a record; and
    when the sixth byte is there, a ClientHello or ServerHello. Five bytes alone are accepted:
    OpenSSL reads a record's header with a read of its own.
    """
    n = len(p)
    if n < 5 or p[0] != CT_HANDSHAKE or p[1] != 3 or p[2] > 4:
        return False
    ln = (p[3] << 8) | p[4]
    if ln < 4 or ln > MAX_RECORD:
        return False
    return n == 5 or p[5] in (HS_CLIENT_HELLO, HS_SERVER_HELLO)


def _extensions(b: bytes | memoryview, off: int) -> dict[int, bytes | memoryview]:
    """The extensions block at ``off`` (2-byte length, then type/length/value): {type: value}."""
    out: dict[int, bytes | memoryview] = {}
    if off + 2 > len(b):
        return out
    (total,) = struct.unpack_from(">H", b, off)
    off += 2
    end = min(len(b), off + total)
    while off + 4 <= end:
        t, ln = struct.unpack_from(">HH", b, off)
        off += 4
        if off + ln > end:
            break
        out.setdefault(t, b[off:off + ln])
        off += ln
    return out


def parse_server_hello(body: bytes | memoryview) -> dict[str, Any] | None:
    """A ServerHello's fields (``body``: the handshake message's body), or None if malformed.

    Keys: ``version`` (negotiated: supported_versions when present), ``random``, ``session_id``,
    ``cipher``, ``hrr`` (a HelloRetryRequest), ``extensions``.
    """
    if len(body) < 38:
        return None
    legacy = (body[0] << 8) | body[1]
    random = bytes(body[2:34])
    sid_len = body[34]
    off = 35 + sid_len
    if sid_len > 32 or off + 3 > len(body):
        return None
    session_id = bytes(body[35:off])
    (cipher,) = struct.unpack_from(">H", body, off)
    off += 3  # cipher, compression
    ext = _extensions(body, off)
    version = legacy
    sv = ext.get(EXT_SUPPORTED_VERSIONS)
    if sv is not None and len(sv) == 2:
        version = (sv[0] << 8) | sv[1]
    return {"version": version, "random": random, "session_id": session_id, "cipher": cipher,
            "hrr": random == HRR_RANDOM, "extensions": ext}


def parse_client_hello(body: bytes | memoryview) -> dict[str, Any] | None:
    """A ClientHello's fields (``body``: the handshake message's body), or None if malformed.

    Keys: ``random``, ``session_id``, ``ticket`` (the session_ticket extension's bytes, b""
    if empty or absent), ``psk`` (offers a TLS 1.3 pre-shared key), ``early_data``,
    ``versions`` (supported_versions list, or [legacy]).
    """
    if len(body) < 38:
        return None
    legacy = (body[0] << 8) | body[1]
    random = bytes(body[2:34])
    sid_len = body[34]
    off = 35 + sid_len
    if sid_len > 32 or off + 2 > len(body):
        return None
    session_id = bytes(body[35:off])
    (cs_len,) = struct.unpack_from(">H", body, off)
    off += 2 + cs_len
    if off + 1 > len(body):
        return None
    off += 1 + body[off]  # compression methods
    ext = _extensions(body, off) if off <= len(body) else {}
    versions = [legacy]
    sv = ext.get(EXT_SUPPORTED_VERSIONS)
    if sv is not None and len(sv) >= 1:
        versions = [(sv[i] << 8) | sv[i + 1] for i in range(1, min(len(sv), 1 + sv[0]) - 1, 2)]
    return {"random": random, "session_id": session_id, "ticket": bytes(ext.get(EXT_SESSION_TICKET, b"")),
            "psk": EXT_PRE_SHARED_KEY in ext, "early_data": EXT_EARLY_DATA in ext, "versions": versions}


class HelloSniffer:
    """The ServerHello of one connection, found in its bytes as they come (either direction)."""

    __slots__ = ("bufs", "client", "done", "server_hello")

    def __init__(self) -> None:
        self.bufs: list[bytearray | None] = [bytearray(), bytearray()]
        #: the direction that sent a ClientHello (a ServerHello is only looked for the other way)
        self.client: int | None = None
        #: the parsed ServerHello once found (not a HelloRetryRequest)
        self.server_hello: dict[str, Any] | None = None
        self.done = False

    def attrs(self) -> dict[str, Any]:
        sh = self.server_hello
        return tls_attrs(sh["version"], sh["cipher"]) if sh else tls_attrs(None, None)

    def feed(self, direction: int, data: Any) -> bool:
        """More bytes sent one way (0/1: the caller's numbering). True once the ServerHello is known
        (or the sniffer gave up: ``done``)."""
        if self.done:
            return True
        buf = self.bufs[direction]
        if buf is None:
            return False
        buf += data  # a deliberate copy: at most MAX_SNIFF_BYTES of handshake per direction
        # Walk whole records from the start; keep the handshake messages' bytes in order.
        hs = bytearray()
        off = 0
        ended = False  # a record that is not a plaintext handshake: nothing more to learn this way
        while off + 5 <= len(buf):
            ct = buf[off]
            ln = (buf[off + 3] << 8) | buf[off + 4]
            if ct not in (CT_HANDSHAKE, CT_CCS) or buf[off + 1] != 3 or ln > MAX_RECORD:
                ended = True
                break
            if off + 5 + ln > len(buf):
                break
            if ct == CT_HANDSHAKE:
                hs += buf[off + 5:off + 5 + ln]
            # a ChangeCipherSpec is skipped: TLS 1.3 sends one after a HelloRetryRequest, before
            # the real ServerHello (a TLS 1.2 server's comes after its ServerHello: done by then)
            off += 5 + ln
        moff = 0
        while moff + 4 <= len(hs):
            mt = hs[moff]
            mlen = (hs[moff + 1] << 16) | (hs[moff + 2] << 8) | hs[moff + 3]
            if moff + 4 + mlen > len(hs):
                break
            if mt == HS_CLIENT_HELLO:
                self.client = direction
            elif mt == HS_SERVER_HELLO and self.client != direction:
                sh = parse_server_hello(memoryview(hs)[moff + 4:moff + 4 + mlen])
                if sh is not None and not sh["hrr"]:
                    self.server_hello = sh
                    self.done = True
                    self.bufs = [None, None]
                    return True
            moff += 4 + mlen
        if ended or len(buf) > MAX_SNIFF_BYTES:
            self.bufs[direction] = None
        return self._maybe_done()

    def _maybe_done(self) -> bool:
        if self.bufs[0] is None and self.bufs[1] is None:
            self.done = True
        return self.done
