"""TLS for the receivers (issue 15): what a TLS connection is, and its handshake's plain fields.

Contract:
- ``TlsConnId``: the ``conn_id`` of a connection's TLS *plaintext* (what SSL_read/SSL_write moved,
  or what a key log decrypted). It is the underlying connection's id plus ``"tls"``, so the
  plaintext is a connection of its own for the protocols stage (the cleartext before a STARTTLS
  such as PostgreSQL's SSLRequest stays on the original id), and carries ``tls``: span
  attributes of the connection (``tls.protocol.name``, ``tls.protocol.version``, ``tls.cipher``
  when known). The stage adds them to the connection's spans and sets ``url.scheme=https``.
- ``looks_like_tls(payload)``: True when bytes at the start of a message are a TLS handshake
  record (a ClientHello or ServerHello), how receivers tell ciphertext from cleartext;
  ``looks_like_protected_tls`` for a connection whose capture began after its handshake.
- ``HelloSniffer``: fed one connection's bytes per direction (in any segmentation), it finds
  the ServerHello and reports the negotiated version and cipher (TLS 1.3 by its
  supported_versions extension; a HelloRetryRequest is skipped). It copies at most
  ``MAX_SNIFF_BYTES`` per direction and then gives up.
- ``KeyLog``: the NSS key log format (``CLIENT_RANDOM`` lines for TLS 1.2, the
  ``*_TRAFFIC_SECRET`` lines for TLS 1.3), from a file (re-read as it grows) or text (a pcapng
  Decryption Secrets Block); bad lines are counted, never fatal.
- ``TlsLayer``: the record layer between TCP reassembly and the protocols stage (pcap and live
  receivers). ``process(events)`` takes a batch of ``TcpEvent``s in order and returns it with
  every TLS connection's ciphertext replaced by its plaintext on a ``TlsConnId`` (the events of
  other connections pass untouched, the same objects). TLS 1.2 (AES-GCM, ChaCha20-Poly1305; any
  key exchange: the key log gives the master secret; resumption by session id or ticket) and
  TLS 1.3 (AES-GCM, ChaCha20-Poly1305, AES-CCM; HelloRetryRequest; KeyUpdate; 0-RTT early data,
  handed on once the server's EncryptedExtensions say it was accepted) with the
  ``cryptography`` package's AEADs. A record within one segment is decrypted from a view of
  it; one split across segments is gathered into the layer's one reused scratch buffer (as
  LargeBuffer does for a read that straddles chunks; decrypted at once, so one buffer serves
  every connection): the plaintext is the only new copy.
  Nothing of a TLS connection reaches a parser unless it decrypted and authenticated: a session
  without keys, an unsupported cipher, a record whose tag fails, a damaged stream are counted in
  ``drops`` by reason (see ``DROP_REASONS``), never raised.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
import time
from collections import deque
from typing import Any, NamedTuple

from service import speedups
from service.model import EventKind, TcpEvent

__all__ = ["TlsConnId", "HelloSniffer", "KeyLog", "KeyLogError", "TlsLayer", "looks_like_tls", "parse_server_hello",
           "parse_client_hello", "version_name", "CIPHER_NAMES", "HRR_RANDOM", "DROP_REASONS", "DSB_TLS_KEYLOG"]

#: TLSPlaintext content types (RFC 8446 §5.1, RFC 5246 §6.2.1)
CT_CCS, CT_ALERT, CT_HANDSHAKE, CT_APPDATA = 20, 21, 22, 23
#: Handshake types (RFC 8446 §4)
HS_CLIENT_HELLO, HS_SERVER_HELLO, HS_NEW_SESSION_TICKET, HS_END_OF_EARLY_DATA = 1, 2, 4, 5
HS_ENCRYPTED_EXTENSIONS, HS_FINISHED, HS_KEY_UPDATE = 8, 20, 24
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


def looks_like_protected_tls(p: Any) -> bool:
    """Do a connection's first bytes look like TLS records past the handshake (a capture that began
    mid-connection)? An application data, alert or ChangeCipherSpec record header of TLS 1.0-1.3
    and a length that fits, followed by the next record's header when the bytes go past it."""
    n = len(p)
    if n < 5 or p[0] not in (CT_CCS, CT_ALERT, CT_APPDATA) or p[1] != 3 or not 1 <= p[2] <= 4:
        return False
    ln = (p[3] << 8) | p[4]
    if ln == 0 or ln > MAX_RECORD or (p[0] == CT_APPDATA and ln < 17):  # an AEAD record has its tag
        return False
    end = 5 + ln
    if n <= end:
        return True
    return n >= end + 3 and p[end] in (CT_CCS, CT_ALERT, CT_HANDSHAKE, CT_APPDATA) and p[end + 1] == 3 \
        and p[end + 2] == p[2]


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


# ============================================================================ key log
#: pcapng Decryption Secrets Block secrets type of an NSS key log ("TLSK").
DSB_TLS_KEYLOG = 0x544C534B
#: label -> secret lengths allowed (bytes): the master secret, or a TLS 1.3 traffic secret of
#: SHA-256 or SHA-384 (RFC 8446 §7.1; the NSS key log format's labels).
KEYLOG_LABELS: dict[str, tuple[int, ...]] = {
    "CLIENT_RANDOM": (48,),
    "CLIENT_EARLY_TRAFFIC_SECRET": (32, 48), "EARLY_EXPORTER_SECRET": (32, 48),
    "CLIENT_HANDSHAKE_TRAFFIC_SECRET": (32, 48), "SERVER_HANDSHAKE_TRAFFIC_SECRET": (32, 48),
    "CLIENT_TRAFFIC_SECRET_0": (32, 48), "SERVER_TRAFFIC_SECRET_0": (32, 48), "EXPORTER_SECRET": (32, 48),
}
#: Client randoms kept at most (the oldest are forgotten first): a long-running live receiver's
#: key log only grows.
MAX_KEYLOG_CLIENTS = 1 << 20
#: A longer line is garbage (the longest valid one is under 250 bytes).
MAX_KEYLOG_LINE = 1024
#: Bytes of the key log's end remembered to tell a file that grew from one rewritten in place
#: (more than a line: a client random, not only a secret).
KEYLOG_TAIL = 256


class KeyLogError(Exception):
    """The key log file cannot be read at all (a start error, with the path)."""


class KeyLog:
    """Secrets by client random, from NSS key log lines (``LABEL <client_random> <secret>``, hex).

    ``stats``: ``lines`` read, ``secrets`` kept, ``bad_lines`` (not three fields, bad hex, a wrong
    length), ``unknown_labels`` (a well-formed line of a label wirespan does not use, e.g. ``RSA``).
    """

    def __init__(self, path: str | os.PathLike[str] | None = None, must_exist: bool = True) -> None:
        """``path``: the file (read now; later by ``refresh``); ``must_exist`` false lets it be created
        later (the live receiver starts before the clients that write it).

        Raises:
            KeyLogError: the file cannot be read (missing, unless ``must_exist`` is false; a directory,
                no permission).
        """
        self.path = str(path) if path is not None else None
        self._secrets: dict[bytes, dict[str, bytes]] = {}
        self._pos = 0
        self._ident: tuple[int, int] | None = None
        self._partial = b""
        #: the last bytes read (up to _pos): a file rewritten in place (same inode, any size) is
        #: told from one that only grew by them
        self._tail = b""
        self._mtime = 0
        self.stats = {"lines": 0, "secrets": 0, "bad_lines": 0, "unknown_labels": 0}
        if self.path is not None:
            try:
                with open(self.path, "rb"):
                    pass
            except FileNotFoundError as e:
                if must_exist or not os.path.isdir(os.path.dirname(os.path.abspath(self.path))):
                    raise KeyLogError(f"{self.path}: cannot read key log: {e.strerror or e}") from None
            except OSError as e:
                raise KeyLogError(f"{self.path}: cannot read key log: {e.strerror or e}") from None
            self.refresh(final=must_exist)

    def __len__(self) -> int:
        return len(self._secrets)

    def secret(self, client_random: bytes, label: str) -> bytes | None:
        d = self._secrets.get(client_random)
        return d.get(label) if d is not None else None

    def add_text(self, data: bytes | str, final: bool = True) -> int:
        """Parse key log text (a whole file, a DSB, or what a growing file gained); returns the
        secrets added. With ``final`` false an unterminated last line is kept for the next call."""
        if isinstance(data, str):
            data = data.encode(errors="replace")
        data = self._partial + data
        self._partial = b""
        lines = data.split(b"\n")
        if not final:
            self._partial = lines.pop()
            if len(self._partial) > MAX_KEYLOG_LINE:
                self._partial = b""
                self.stats["bad_lines"] += 1
        added = 0
        st = self.stats
        for raw in lines:
            line = raw.strip()
            if not line or line.startswith(b"#"):
                continue
            st["lines"] += 1
            parts = line.split()
            if len(parts) != 3 or len(line) > MAX_KEYLOG_LINE:
                st["bad_lines"] += 1
                continue
            label = parts[0].decode(errors="replace")
            try:
                cr = bytes.fromhex(parts[1].decode("ascii"))
                sec = bytes.fromhex(parts[2].decode("ascii"))
            except ValueError:
                st["bad_lines"] += 1
                continue
            lengths = KEYLOG_LABELS.get(label)
            if lengths is None:
                if label.isupper() or "_" in label:
                    st["unknown_labels"] += 1  # RSA <encrypted pre-master prefix> lines and the like
                else:
                    st["bad_lines"] += 1
                continue
            if len(cr) != 32 or len(sec) not in lengths:
                st["bad_lines"] += 1
                continue
            d = self._secrets.get(cr)
            if d is None:
                if len(self._secrets) >= MAX_KEYLOG_CLIENTS:
                    self._secrets.pop(next(iter(self._secrets)))
                d = self._secrets[cr] = {}
            if label not in d:
                added += 1
                st["secrets"] += 1
            d[label] = sec
        return added

    def refresh(self, final: bool = False) -> int:
        """Read what the file gained since the last call (it is re-read whole if it was replaced or
        truncated); the secrets added. Cheap when nothing changed (one ``stat``)."""
        if self.path is None:
            return 0
        try:
            st = os.stat(self.path)
        except OSError:
            return 0
        ident = (st.st_dev, st.st_ino)
        if ident != self._ident or st.st_size < self._pos:
            self._ident, self._pos, self._partial, self._tail = ident, 0, b"", b""
        elif st.st_size == self._pos and st.st_mtime_ns == self._mtime and not (final and self._partial):
            return 0
        try:
            with open(self.path, "rb") as f:
                if self._pos:
                    # still the bytes we read last? If not, the file was rewritten: read it again whole
                    f.seek(self._pos - len(self._tail))
                    if f.read(len(self._tail)) != self._tail:
                        self._pos, self._partial, self._tail = 0, b"", b""
                f.seek(self._pos)
                data = f.read()
        except OSError:
            return 0
        self._mtime = st.st_mtime_ns
        if data:
            self._pos += len(data)
            self._tail = (self._tail + data)[-KEYLOG_TAIL:] if len(data) < KEYLOG_TAIL else data[-KEYLOG_TAIL:]
        return self.add_text(data, final=final)


# ============================================================================ ciphers and keys
class Suite(NamedTuple):
    aead: str        #: "gcm", "chacha" or "ccm"
    key_len: int
    iv_len: int      #: TLS 1.2 GCM/CCM: the 4-byte salt; else the whole 12-byte IV
    explicit: int    #: TLS 1.2 GCM/CCM: 8 bytes of explicit nonce in each record
    hash: str        #: the PRF / HKDF hash


#: TLS 1.3 suites (RFC 8446 §B.4).
SUITES13: dict[int, Suite] = {
    0x1301: Suite("gcm", 16, 12, 0, "sha256"), 0x1302: Suite("gcm", 32, 12, 0, "sha384"),
    0x1303: Suite("chacha", 32, 12, 0, "sha256"), 0x1304: Suite("ccm", 16, 12, 0, "sha256"),
}
_G128 = Suite("gcm", 16, 4, 8, "sha256")
_G256 = Suite("gcm", 32, 4, 8, "sha384")
_C20 = Suite("chacha", 32, 12, 0, "sha256")
#: TLS 1.2 AEAD suites: AES-GCM (RFC 5288, RFC 5289) with RSA, DHE and ECDHE key exchange, and
#: ChaCha20-Poly1305 (RFC 7905). The key exchange does not matter: the key log gives the master secret.
SUITES12: dict[int, Suite] = {
    0xC02B: _G128, 0xC02F: _G128, 0x009C: _G128, 0x009E: _G128,
    0xC02C: _G256, 0xC030: _G256, 0x009D: _G256, 0x009F: _G256,
    0xCCA8: _C20, 0xCCA9: _C20, 0xCCAA: _C20,
}
_HLEN = {"sha256": 32, "sha384": 48}


def prf12(secret: bytes, label: bytes, seed: bytes, n: int, hash_name: str) -> bytes:
    """TLS 1.2 PRF: P_hash(secret, label + seed) (RFC 5246 §5)."""
    s = label + seed
    a, out = s, b""
    while len(out) < n:
        a = hmac.digest(secret, a, hash_name)
        out += hmac.digest(secret, a + s, hash_name)
    return out[:n]


def hkdf_expand_label(secret: bytes, label: bytes, n: int, hash_name: str, context: bytes = b"") -> bytes:
    """HKDF-Expand-Label (RFC 8446 §7.1)."""
    full = b"tls13 " + label
    info = n.to_bytes(2, "big") + bytes([len(full)]) + full + bytes([len(context)]) + context
    t, out, i = b"", b"", 1
    while len(out) < n:
        t = hmac.digest(secret, t + info + bytes([i]), hash_name)
        out += t
        i += 1
    return out[:n]


def _aead(kind: str, key: bytes) -> Any:
    from cryptography.hazmat.primitives.ciphers.aead import AESCCM, AESGCM, ChaCha20Poly1305

    if kind == "gcm":
        return AESGCM(key)
    if kind == "chacha":
        return ChaCha20Poly1305(key)
    return AESCCM(key, tag_length=16)


class _Protect:
    """One direction's record protection: an AEAD, its IV and the record sequence number."""

    __slots__ = ("aead", "explicit", "iv", "iv_int", "secret", "seq", "suite", "tls13")

    def __init__(self, suite: Suite, key: bytes, iv: bytes, tls13: bool, secret: bytes | None = None) -> None:
        self.suite = suite
        self.aead = _aead(suite.aead, key)
        self.iv = iv
        self.iv_int = int.from_bytes(iv, "big")
        self.explicit = suite.explicit
        self.tls13 = tls13
        self.secret = secret
        self.seq = 0

    @classmethod
    def tls13_from(cls, suite: Suite, secret: bytes) -> _Protect:
        h = suite.hash
        return cls(suite, hkdf_expand_label(secret, b"key", suite.key_len, h), hkdf_expand_label(secret, b"iv", 12, h),
                   True, secret)

    def key_update(self) -> None:
        """KeyUpdate (RFC 8446 §7.2): the next traffic secret of this direction, sequence 0."""
        h = self.suite.hash
        nxt = hkdf_expand_label(self.secret, b"traffic upd", _HLEN[h], h)  # type: ignore[arg-type]
        fresh = _Protect.tls13_from(self.suite, nxt)
        self.aead, self.iv, self.iv_int, self.secret, self.seq = fresh.aead, fresh.iv, fresh.iv_int, nxt, 0

    def overhead(self) -> int:
        """Ciphertext bytes beyond the plaintext (an estimate for TLS 1.3: no padding assumed)."""
        return 16 + self.explicit + (1 if self.tls13 else 0)

    def open(self, hdr: bytes, body: Any) -> bytes | None:
        """The record's plaintext (TLS 1.3: with its inner type and padding), or None if the tag fails.
        The sequence number moves on either way (the record was sent)."""
        from cryptography.exceptions import InvalidTag

        seq = self.seq
        self.seq = seq + 1
        try:
            if self.tls13:
                return self.aead.decrypt((self.iv_int ^ seq).to_bytes(12, "big"), body, hdr)
            if self.explicit:
                if len(body) < self.explicit + 16:
                    return None
                nonce = self.iv + bytes(body[:self.explicit])
                body = body[self.explicit:]
            else:
                if len(body) < 16:
                    return None
                nonce = (self.iv_int ^ seq).to_bytes(12, "big")
            aad = seq.to_bytes(8, "big") + hdr[:3] + (len(body) - 16).to_bytes(2, "big")
            return self.aead.decrypt(nonce, body, aad)
        except (InvalidTag, ValueError, OverflowError):
            return None


# ============================================================================ the record layer
#: Drop reasons counted by ``TlsLayer.drops`` (and the receivers' ``wirespan_receiver_dropped_events``):
DROP_REASONS = {
    "tls_no_keys": "a TLS session whose keys are not in the key log (one per session)",
    "tls_unsupported": "a session of a version or cipher suite not decrypted (SSL 3, TLS 1.0/1.1, CBC, ...)",
    "tls_decrypt_failed": "a record whose authentication tag failed (corrupt, or wrong keys): skipped",
    "tls_malformed": "a direction whose bytes stopped being TLS records: the rest of it skipped",
    "tls_truncated": "a record cut short by the end of its connection or capture",
    "tls_resync_failed": "a direction that lost record sync after a gap and did not find it again",
    "tls_early_data": "a TLS 1.3 0-RTT record not decrypted (no CLIENT_EARLY_TRAFFIC_SECRET) or that the "
                      "server rejected (its bytes were never processed)",
}
#: A handshake message longer than this is not followed (a certificate chain is far smaller; RFC 8446
#: allows 2^24 - 1, OpenSSL refuses more than 100 KiB of certificates by default).
MAX_HANDSHAKE = 256 << 10
#: 0-RTT records held at most until the server's EncryptedExtensions (max_early_data_size is 16 KiB
#: in OpenSSL and nginx: a few records).
MAX_EARLY_RECORDS = 64
#: Consecutive records failing their tag before a direction is given up (wrong keys).
MAX_CONSECUTIVE_FAILURES = 3
#: After a gap, bytes searched for the next record and sequence numbers tried.
RESYNC_WINDOW = 64 << 10
RESYNC_SEQS = 64
#: Ciphertext a session waiting for its keys (a growing key log) may hold, and sessions that may
#: wait at once (the oldest is given up first): at most 64 MiB held.
MAX_WAIT_BYTES = 1 << 20
MAX_WAITING = 64
#: How often (seconds) a growing key log is looked at for the sessions waiting on it.
REFRESH_INTERVAL = 0.05
#: The first bytes of a connection looked at for a handshake (a STARTTLS switch comes early).
SNIFF_BYTES = 16 << 10
TLS12, TLS13 = 0x0303, 0x0304
_DATA, _GAP, _CLOSE, _RESET = EventKind.DATA, EventKind.GAP, EventKind.CLOSE, EventKind.RESET


#: The record types whose byte may start a TLS connection's bytes (looks_like_tls,
#: looks_like_protected_tls and _tls_prefix each need one of them first).
_RECORD_TYPES = frozenset((CT_CCS, CT_ALERT, CT_HANDSHAKE, CT_APPDATA))


def _tls_prefix(p: Any, at_start: bool = False) -> bool:
    """Could these (fewer than 6) bytes be the start of a TLS handshake record (``at_start``, the
    connection's first bytes: or of a protected record, see looks_like_protected_tls)?"""
    n = len(p)
    return n > 0 and (p[0] == CT_HANDSHAKE or (at_start and p[0] in (CT_CCS, CT_ALERT, CT_APPDATA))) and \
        (n < 2 or p[1] == 3) and (n < 3 or p[2] <= 4)


class _Plain:
    """A connection that is not TLS (so far): its first bytes are still looked at. Events whose
    first bytes could start a handshake but are too few to tell (a byte a segment) are held until
    six bytes say (``held``, ``head``)."""

    __slots__ = ("closes", "head", "held", "seen")

    def __init__(self, seen: int) -> None:
        self.seen = seen
        self.closes = 0
        self.held: list[TcpEvent] | None = None
        self.head = b""


#: The state of a connection past its first SNIFF_BYTES without TLS (no FIN yet / one FIN): shared
#: markers, so its events cost one dict lookup.
_PASS, _PASS_CLOSING = object(), object()
#: process()'s steps for the events of plain connections in C (receivers/_fastpath.c plain_run),
#: when built: process()'s own loop is the reference, and takes each event the C one leaves.
_fp = speedups.load("receivers._fastpath")
if _fp is not None:
    _fp.plain_setup(_Plain, SNIFF_BYTES)
_plain_run = _fp.plain_run if _fp is not None else None


class _Side:
    """One direction of a TLS connection (``src`` sends)."""

    __slots__ = ("app", "avail", "client_is_src", "early", "closed", "dport", "dst", "fails", "hs", "lost", "need",
                 "pend_ln", "pieces", "prot", "resync", "rneed", "rpos", "skip", "sport", "src")

    def __init__(self, ev: TcpEvent) -> None:
        self.src, self.sport, self.dst, self.dport = ev.src, ev.sport, ev.dst, ev.dport
        self.client_is_src = ev.client_is_src
        #: pending bytes: [view, ts] pieces, not yet a whole record
        self.pieces: deque[list[Any]] = deque()
        self.avail = 0
        self.pend_ln = -1          #: the body length of the record being waited for, once its header is in
        self.prot: _Protect | None = None
        #: a key to fetch before the next record: "hs" / "app" (TLS 1.3), "ccs" (TLS 1.2)
        self.need: str | None = None
        self.hs = bytearray()      #: handshake messages' bytes (plaintext)
        self.skip = 0              #: bytes of a record hit by a gap still to pass over
        self.resync = False
        self.rpos = 0              #: resync: candidates before this offset of the pending bytes were refused
        self.rneed = 0             #: resync: pending bytes wanted before the next look
        self.lost = False
        self.closed = False
        self.fails = 0
        self.app = False           #: TLS 1.3: under the application traffic secret
        self.early: _Protect | None = None  #: TLS 1.3 client: the 0-RTT protection, once a record verified


class _Session:
    """One TLS connection."""

    __slots__ = ("attrs", "cid", "client", "cr", "c_sid", "c_ticket", "c_early", "dead", "k12", "master", "ok",
                 "plain_id", "sides", "server", "sr", "suite", "version", "wait_since", "final", "ends", "early_ok",
                 "early_held")

    def __init__(self, conn_id: Any) -> None:
        self.cid = conn_id
        self.ok = False
        self.attrs: dict[str, Any] = {"tls.protocol.name": "tls"}
        self.plain_id = TlsConnId(conn_id, self.attrs)
        self.sides: dict[tuple, _Side] = {}
        self.client: _Side | None = None
        self.server: _Side | None = None
        self.cr = self.sr = b""
        self.c_sid = self.c_ticket = b""
        self.c_early = False
        self.suite: Suite | None = None
        self.version = 0
        self.master: bytes | None = None
        self.k12: tuple[bytes, bytes, bytes, bytes] | None = None
        self.dead: str | None = None      #: why nothing more is decrypted (a drop reason)
        self.wait_since: int | None = None
        self.final = False                 #: no more waiting for keys: they are there now or never
        self.ends: list[TcpEvent] = []     #: CLOSE/RESET events held while waiting for keys
        #: 0-RTT: None until the server's EncryptedExtensions say whether it took the early data;
        #: its plaintext is held until then (a rejected one was never processed: not a request)
        self.early_ok: bool | None = None
        self.early_held: list[TcpEvent] = []

    def side(self, ev: TcpEvent) -> _Side:
        k = (ev.src, ev.sport)
        s = self.sides.get(k)
        if s is None:
            s = self.sides[k] = _Side(ev)
        return s


class _Pause(Exception):
    """A key is not in the key log yet: stop this direction where it is."""


class TlsLayer:
    """TLS ciphertext streams in, plaintext streams out (see the module docstring).

    Args:
        keylog: the secrets (None: every TLS session is counted ``tls_no_keys``).
        wait_for_keys: seconds (of event time) a session may wait for its keys to appear in a
            growing key log (the live receiver); 0 for a capture, whose key log is complete.
    """

    def __init__(self, keylog: KeyLog | None = None, wait_for_keys: float = 0.0) -> None:
        self.keylog = keylog if keylog is not None else KeyLog()
        self.wait_ns = int(wait_for_keys * 1e9)
        self._conns: dict[Any, _Plain | _Session] = {}
        self._waiting: dict[Any, _Session] = {}
        self._sessions12: dict[bytes, bytes] = {}   # TLS 1.2 session id -> master secret
        self._tickets12: dict[bytes, bytes] = {}    # TLS 1.2 session ticket -> master secret
        self._last_refresh = 0.0
        self._scratch: bytearray | None = None
        self._clock = 0  #: the latest event time seen (ns): what a wait for keys is measured by
        self._late: list[_Session] = []  #: sessions given up while waiting whose held ends are due
        self.drops: dict[str, int] = {}
        self.stats = {"sessions": 0, "decrypted_sessions": 0, "resumed": 0, "records": 0, "plaintext_bytes": 0,
                      "skipped_bytes": 0, "hello_retry": 0, "key_updates": 0, "early_data": 0}

    # ------------------------------------------------------------------ public
    def add_secrets(self, text: bytes | str) -> int:
        """Key log text from elsewhere (a pcapng Decryption Secrets Block)."""
        return self.keylog.add_text(text)

    def process(self, events: list[TcpEvent]) -> list[TcpEvent]:
        """One batch in order; the batch out (the same list object when no TLS connection was in it)."""
        conns = self._conns
        out: list[TcpEvent] | None = None
        if events:
            ts = events[-1].ts_ns
            if ts > self._clock:
                self._clock = ts
        if self._waiting:
            out = []
            self._retry_waiting(out, False)
        get = conns.get
        n = len(events)
        # While nothing of the batch changed (out is None), the C loop takes the events of plain
        # connections and the OPENs: each one back here is the next it leaves (_plain_run).
        fast = _plain_run if out is None and not self._late else None
        i = 0
        if fast is None and out is None and not self._late:
            # the common case, first: every event is data of a connection known to be plain
            for ev in events:
                if ev.kind or get(ev.conn_id) is not _PASS:
                    break
                i += 1
            else:
                return events
            # Those before ``i`` stay as they are (out is None): the loop below starts after them.
        i -= 1
        while True:
            i += 1
            if fast is not None and out is None:
                i = fast(events, i, conns, _PASS, _PASS_CLOSING)
            if i >= n:
                break
            ev = events[i]
            st = get(ev.conn_id)
            kind = ev.kind
            if st is _PASS or st is _PASS_CLOSING:  # a plain connection past its first bytes
                if kind == _CLOSE:
                    if st is _PASS:
                        conns[ev.conn_id] = _PASS_CLOSING
                    else:
                        del conns[ev.conn_id]
                elif kind == _RESET:
                    del conns[ev.conn_id]
                if out is not None:
                    out.append(ev)
                continue
            if st is None:
                if kind != _DATA:
                    if out is not None:
                        out.append(ev)
                    continue
                st = conns[ev.conn_id] = _Plain(0)
            if st.__class__ is _Plain:
                if kind == _DATA and st.seen >= SNIFF_BYTES and st.held is None:  # type: ignore[union-attr]
                    conns[ev.conn_id] = _PASS_CLOSING if st.closes else _PASS  # type: ignore[union-attr]
                    if out is not None:  # past the first bytes of a plain connection
                        out.append(ev)
                    continue
                if out is None and st.held is None:  # type: ignore[union-attr]
                    # nothing changed in the batch so far: the event stays where it is unless TLS starts
                    if kind != _DATA:  # _plain_end, inline: twice a short connection (issue 21)
                        if kind == _CLOSE:
                            st.closes += 1  # type: ignore[union-attr]
                            if st.closes >= 2:  # type: ignore[union-attr]
                                conns.pop(ev.conn_id, None)
                        elif kind == _RESET:
                            conns.pop(ev.conn_id, None)
                        continue
                    p = ev.payload
                    # A first byte that is no TLS record type says no to all three tests at once.
                    if not len(p) or p[0] not in _RECORD_TYPES or (
                            not looks_like_tls(p) and not (len(p) < 6 and _tls_prefix(p, not st.seen)) and
                            (st.seen or not looks_like_protected_tls(p))):  # type: ignore[union-attr]
                        st.seen += len(p)  # type: ignore[union-attr]
                        if st.seen >= SNIFF_BYTES:  # type: ignore[union-attr]
                            conns[ev.conn_id] = _PASS_CLOSING if st.closes else _PASS  # type: ignore[union-attr]
                        continue
                if out is None:
                    out = events[:i]
                self._plain(st, ev, out)  # type: ignore[arg-type]
                continue
            if out is None:
                out = events[:i]
            self._event(st, ev, out)  # type: ignore[arg-type]
        if self._late:
            if out is None:
                out = list(events)
            self._flush_late(out)
        return events if out is None else out

    def _flush_late(self, out: list[TcpEvent]) -> None:
        late, self._late = self._late, []
        for st in late:
            ends, st.ends = st.ends, []
            for e in ends:
                self._event(st, e, out)

    def _plain_end(self, st: _Plain, ev: TcpEvent) -> None:
        if ev.kind == _CLOSE:
            st.closes += 1
            if st.closes >= 2:
                self._conns.pop(ev.conn_id, None)
        elif ev.kind == _RESET:
            self._conns.pop(ev.conn_id, None)

    def _plain(self, st: _Plain, ev: TcpEvent, out: list[TcpEvent]) -> None:
        """An event of a connection still looked at for a handshake (see _Plain)."""
        if ev.kind != _DATA:
            if st.held is not None:  # not enough bytes came to tell: plain
                out.extend(st.held)
                st.held, st.head = None, b""
            out.append(ev)
            self._plain_end(st, ev)
            return
        p = ev.payload
        if st.held is None:
            if looks_like_tls(p) or (not st.seen and looks_like_protected_tls(p)):
                # a handshake at the start, or after a cleartext start (STARTTLS); or protected records
                # first (the capture began mid-connection: no keys can be found, counted tls_no_keys)
                sess = self._new_session(ev)
                self._event(sess, ev, out)
                return
            if len(p) < 6 and _tls_prefix(p, not st.seen):
                st.held, st.head = [ev], bytes(p)
                return
            st.seen += len(p)
            out.append(ev)
            return
        st.held.append(ev)
        st.head += bytes(p[:6 - len(st.head)])
        if len(st.head) < 6 and _tls_prefix(st.head, not st.seen):
            return
        held, head = st.held, st.head
        st.held, st.head = None, b""
        if looks_like_tls(head) or (not st.seen and looks_like_protected_tls(head)):
            sess = self._new_session(held[0])
            for e in held:
                self._event(sess, e, out)
        else:
            st.seen += sum(len(e.payload) for e in held if e.kind == _DATA)
            out.extend(held)

    # ------------------------------------------------------------------ per event
    def _new_session(self, ev: TcpEvent) -> _Session:
        st = _Session(ev.conn_id)
        self._conns[ev.conn_id] = st
        self.stats["sessions"] += 1
        return st

    def _drop(self, reason: str, n: int = 1) -> None:
        self.drops[reason] = self.drops.get(reason, 0) + n

    def _event(self, st: _Session, ev: TcpEvent, out: list[TcpEvent]) -> None:
        kind = ev.kind
        if kind == _DATA:
            side = st.side(ev)
            p = ev.payload
            if st.dead is not None or side.lost:
                self.stats["skipped_bytes"] += len(p)
                return
            if len(p):
                side.pieces.append([p, ev.ts_ns])
                side.avail += len(p)
                side.client_is_src = ev.client_is_src
            self._drain(st, side, out)
        elif kind == _GAP:
            self._gap(st, st.side(ev), ev, out)
        elif kind == _CLOSE or kind == _RESET:
            if st.wait_since is not None:
                if not st.final:
                    self._retry(st, out, False)  # the keys may be there by now
                if st.wait_since is not None and st.dead is None and not st.final:
                    # still waiting (a growing key log, keylog_wait not over): the end waits too, so
                    # the records before it are not given up early; _retry hands it on
                    st.ends.append(ev)
                    return
            out.append(ev)
            if kind == _CLOSE:
                side = st.side(ev)
                side.closed = True
                self._end_side(st, side)
                out.append(TcpEvent(_CLOSE, st.plain_id, ev.src, ev.sport, ev.dst, ev.dport, ev.ts_ns, None, 0,
                                    ev.client_is_src))
                if len(st.sides) == 2 and all(s.closed for s in st.sides.values()):
                    self._forget(ev.conn_id, st)
            else:
                for side in st.sides.values():
                    self._end_side(st, side)
                out.append(TcpEvent(_RESET, st.plain_id, ev.src, ev.sport, ev.dst, ev.dport, ev.ts_ns, None, 0,
                                    ev.client_is_src))
                self._forget(ev.conn_id, st)
        else:
            out.append(ev)  # OPEN: the connection's, the plaintext's state starts with its first bytes

    def _forget(self, cid: Any, st: _Session) -> None:
        if st.early_held:  # 0-RTT data whose fate the server never said (its handshake not decrypted)
            self._drop("tls_early_data", len(st.early_held))
            st.early_held = []
        self._conns.pop(cid, None)
        self._waiting.pop(cid, None)
        if st.ok:
            self.stats["decrypted_sessions"] += 1

    def _end_side(self, st: _Session, side: _Side) -> None:
        if side.avail and st.dead is None and not side.lost:
            self._drop("tls_truncated")  # a record never completed
        side.pieces.clear()
        side.avail = 0

    def _kill(self, st: _Session, reason: str) -> None:
        """Nothing more of this session is decrypted (counted once)."""
        if st.dead is None:
            st.dead = reason
            self._drop(reason)
            for side in st.sides.values():
                self.stats["skipped_bytes"] += side.avail
                side.pieces.clear()
                side.avail = 0

    # ------------------------------------------------------------------ records
    def _take(self, side: _Side, n: int) -> Any:
        """The next ``n`` pending bytes: a view of a segment when they lie in one, else gathered into
        the layer's scratch buffer (valid until the next gather: the record is decrypted first)."""
        pieces = side.pieces
        first = pieces[0]
        v = first[0]
        side.avail -= n
        if len(v) >= n:
            if len(v) == n:
                pieces.popleft()
            else:
                first[0] = v[n:]
            return v[:n] if len(v) != n else v
        sc = self._scratch
        if sc is None:
            sc = self._scratch = bytearray(MAX_RECORD + 5)
        o = 0
        while o < n:
            piece = pieces[0]
            v = piece[0]
            m = min(len(v), n - o)
            sc[o:o + m] = v[:m]
            o += m
            if m == len(v):
                pieces.popleft()
            else:
                piece[0] = v[m:]
        return memoryview(sc)[:n]

    def _peek(self, side: _Side, n: int) -> bytes:
        v = side.pieces[0][0]
        if len(v) >= n:
            return bytes(v[:n])
        b = b""
        for piece in side.pieces:
            b += bytes(piece[0][:n - len(b)])
            if len(b) >= n:
                break
        return b

    def _drain(self, st: _Session, side: _Side, out: list[TcpEvent]) -> None:
        """Whole records out of the pending bytes of one direction."""
        try:
            while st.dead is None and not side.lost:
                if side.skip:
                    while side.skip and side.pieces:
                        v = side.pieces[0][0]
                        m = min(len(v), side.skip)
                        self._take(side, m)
                        side.skip -= m
                    if side.skip:
                        return
                if side.resync:
                    if not self._resync(st, side):
                        return
                if side.avail < 5 or (0 <= side.pend_ln and side.avail < 5 + side.pend_ln):
                    return  # the header is in, its record is not: nothing to look at again
                hdr = self._peek(side, 5)
                ct, ln = hdr[0], (hdr[3] << 8) | hdr[4]
                if not (CT_CCS <= ct <= 24 and hdr[1] == 3 and ln <= MAX_RECORD):
                    side.lost = True
                    self._drop("tls_malformed")
                    self.stats["skipped_bytes"] += side.avail
                    side.pieces.clear()
                    side.avail = 0
                    return
                if side.avail < 5 + ln:
                    side.pend_ln = ln
                    if side.avail > MAX_WAIT_BYTES:  # cannot happen with a valid length: a guard
                        side.lost = True
                    return
                if side.need is not None and ct != CT_CCS:
                    self._get_keys(st, side)  # may pause (_Pause) before the record is consumed
                side.pend_ln = -1
                ts, o = 0, 0
                for piece in side.pieces:  # the time of the segment that completed the record
                    o += len(piece[0])
                    ts = piece[1]
                    if o >= 5 + ln:
                        break
                self._take(side, 5)
                body = self._take(side, ln) if ln else b""
                self._record(st, side, ct, hdr, body, ts, out)
        except _Pause:
            return

    def _record(self, st: _Session, side: _Side, ct: int, hdr: bytes, body: Any, ts: int,
                out: list[TcpEvent]) -> None:
        if ct == CT_CCS:
            if st.version == TLS12 and side.prot is None:
                side.need = "ccs"  # the records after it are protected (from the next one on)
            return
        prot = side.prot
        early = False
        if prot is None:
            if ct == CT_HANDSHAKE:
                side.hs += body  # small: the handshake's cleartext messages
                self._handshake(st, side, False, out)
                return
            if ct != CT_APPDATA:
                return
            if side is st.client and st.c_early and st.version == 0:
                pt = self._early(st, side, hdr, body)  # 0-RTT before the ServerHello
                if pt is None:
                    self._drop("tls_early_data")
                    return
                early = True
            else:
                self._kill(st, "tls_no_keys")  # protected records, and no way to read them (no handshake seen)
                return
        else:
            pt = prot.open(hdr, body)
            if pt is None and prot.tls13 and not side.app and st.suite is not None and st.cr:
                # TLS 1.3: the Finished that switches to the application secret may have been lost (a gap)
                sec = self.keylog.secret(st.cr, ("CLIENT" if side is st.client else "SERVER") + "_TRAFFIC_SECRET_0")
                if sec is not None and len(sec) == _HLEN[st.suite.hash]:
                    alt = _Protect.tls13_from(st.suite, sec)
                    pt = alt.open(hdr, body)
                    if pt is not None:
                        side.prot, side.app, side.need = alt, True, None
                        prot = alt
            if pt is None and side is st.client and st.c_early and prot.tls13 and not side.app:
                # 0-RTT (the client's records up to EndOfEarlyData) under the early secret
                prot.seq -= 1  # not a record of the handshake keys
                pt = self._early(st, side, hdr, body)
                if pt is None:
                    self._drop("tls_early_data")
                    return
                early = True
            if pt is None:
                self._drop("tls_decrypt_failed")
                side.fails += 1
                if side.fails >= MAX_CONSECUTIVE_FAILURES:
                    side.lost = True
                    self.stats["skipped_bytes"] += side.avail
                    side.pieces.clear()
                    side.avail = 0
                else:
                    out.append(TcpEvent(_GAP, st.plain_id, side.src, side.sport, side.dst, side.dport, ts, None,
                                        max(len(body) - prot.overhead(), 0), side.client_is_src))
                return
        side.fails = 0
        st.ok = True
        self.stats["records"] += 1
        if early or prot.tls13:  # type: ignore[union-attr]
            i = len(pt) - 1
            while i >= 0 and pt[i] == 0:
                i -= 1
            if i < 0:
                self._drop("tls_malformed")
                return
            inner = pt[i]
            content: Any = memoryview(pt)[:i] if i else b""
        else:
            inner, content = ct, pt
        if inner == CT_APPDATA:
            if len(content):
                ev = TcpEvent(_DATA, st.plain_id, side.src, side.sport, side.dst, side.dport, ts, content, 0,
                              side.client_is_src)
                if early and st.early_ok is not True:
                    if st.early_ok is None and len(st.early_held) < MAX_EARLY_RECORDS:
                        st.early_held.append(ev)  # until the server says whether it took the early data
                    else:
                        self._drop("tls_early_data")
                    return
                self.stats["plaintext_bytes"] += len(content)
                out.append(ev)
        elif inner == CT_HANDSHAKE:
            side.hs += content
            self._handshake(st, side, True, out)

    def _early(self, st: _Session, side: _Side, hdr: bytes, body: Any) -> bytes | None:
        """A 0-RTT record's plaintext (with its inner type), under CLIENT_EARLY_TRAFFIC_SECRET, or None.
        The early data's suite is the resumed session's, unknown before the ServerHello: the first
        record tells it (the suites of the secret's hash are tried; only the right one verifies)."""
        e = side.early
        if e is not None:
            pt = e.open(hdr, body)
            if pt is None:
                e.seq -= 1  # not an early record
            return pt
        sec = self.keylog.secret(st.cr, "CLIENT_EARLY_TRAFFIC_SECRET") if st.cr else None
        if sec is None:
            return None
        suites = [st.suite] if st.suite is not None else [u for u in SUITES13.values() if _HLEN[u.hash] == len(sec)]
        for u in suites:
            if _HLEN[u.hash] != len(sec):
                continue
            p = _Protect.tls13_from(u, sec)
            pt = p.open(hdr, body)
            if pt is not None:
                side.early = p
                self.stats["early_data"] += 1
                return pt
        return None

    def _early_decided(self, st: _Session, accepted: bool, out: list[TcpEvent]) -> None:
        """The server's EncryptedExtensions: did it take the 0-RTT data? Its held plaintext goes on,
        or is dropped (a rejected early request was never processed: the client sends it again)."""
        st.early_ok = accepted
        held, st.early_held = st.early_held, []
        if accepted:
            for ev in held:
                self.stats["plaintext_bytes"] += len(ev.payload)  # type: ignore[arg-type]
            out.extend(held)
        elif held:
            self._drop("tls_early_data", len(held))

    # ------------------------------------------------------------------ handshake
    def _handshake(self, st: _Session, side: _Side, protected: bool, out: list[TcpEvent]) -> None:
        hs = side.hs
        while len(hs) >= 4:
            mlen = (hs[1] << 16) | (hs[2] << 8) | hs[3]
            if len(hs) < 4 + mlen:
                if mlen > MAX_HANDSHAKE:
                    hs.clear()  # not a handshake message anyone sends: bounded, the rest is skipped
                return
            mt = hs[0]
            body = bytes(hs[4:4 + mlen])
            del hs[:4 + mlen]
            if not protected:
                if mt == HS_CLIENT_HELLO:
                    ch = parse_client_hello(body)
                    if ch is not None:
                        st.client = side
                        st.cr, st.c_sid, st.c_ticket, st.c_early = ch["random"], ch["session_id"], ch["ticket"], \
                            ch["early_data"]
                elif mt == HS_SERVER_HELLO and side is not st.client:
                    sh = parse_server_hello(body)
                    if sh is None:
                        continue
                    if sh["hrr"]:
                        self.stats["hello_retry"] += 1
                        continue  # a second ClientHello follows (same client random)
                    self._server_hello(st, side, sh)
                elif mt == HS_NEW_SESSION_TICKET and st.version == TLS12 and len(body) >= 6:
                    tl = (body[4] << 8) | body[5]
                    ticket = body[6:6 + tl]
                    if ticket and st.master is not None:
                        self._remember(self._tickets12, ticket, st.master)
            elif st.version == TLS13:
                if mt == HS_ENCRYPTED_EXTENSIONS and side is st.server and st.c_early and st.early_ok is None:
                    self._early_decided(st, EXT_EARLY_DATA in _extensions(body, 0), out)
                elif mt == HS_FINISHED and side.prot is not None and side.need is None and not side.app:
                    side.need = "app"  # the next record is under this side's application secret
                elif mt == HS_KEY_UPDATE and side.prot is not None:
                    side.prot.key_update()
                    self.stats["key_updates"] += 1
            # TLS 1.2 protected handshake: Finished (and renegotiation, not followed)

    def _server_hello(self, st: _Session, side: _Side, sh: dict[str, Any]) -> None:
        st.server = side
        st.sr = sh["random"]
        st.version = v = sh["version"]
        cipher = sh["cipher"]
        st.attrs.update(tls_attrs(v, cipher))
        if v == TLS13:
            if EXT_PRE_SHARED_KEY in sh["extensions"]:
                self.stats["resumed"] += 1  # a PSK (ticket) accepted: its own secrets are in the key log
            st.suite = SUITES13.get(cipher)
            if st.suite is None:
                self._kill(st, "tls_unsupported")
                return
            side.need = "hs"
            if st.client is not None:
                st.client.need = "hs"
            return
        if v != TLS12 or cipher not in SUITES12:
            self._kill(st, "tls_unsupported")
            return
        st.suite = SUITES12[cipher]
        resumed = bool(sh["session_id"]) and sh["session_id"] == st.c_sid
        if resumed:
            self.stats["resumed"] += 1
        st.c_sid = sh["session_id"] if not resumed else st.c_sid
        # the master secret: the key log by client random; for a resumed session, the one of the
        # full handshake it resumes (by session id or ticket), as Wireshark does
        st.master = self.keylog.secret(st.cr, "CLIENT_RANDOM") if st.cr else None
        if st.master is None and resumed:
            st.master = self._sessions12.get(st.c_sid) or (self._tickets12.get(st.c_ticket) if st.c_ticket else None)
        if st.master is not None and sh["session_id"]:
            self._remember(self._sessions12, sh["session_id"], st.master)

    def _remember(self, d: dict[bytes, bytes], k: bytes, v: bytes) -> None:
        if len(d) >= 65536:
            d.pop(next(iter(d)))
        d[k] = v

    def _get_keys(self, st: _Session, side: _Side) -> None:
        """Set up the protection ``side.need`` asks for; raise _Pause (waiting) or kill the session
        when the key log has no secret for it."""
        need, suite = side.need, st.suite
        if suite is None:  # no usable ServerHello (then the session is dead already)
            self._kill(st, "tls_no_keys")
            raise _Pause
        is_client = side is st.client
        if need == "ccs":
            while st.master is None:
                st.master = self.keylog.secret(st.cr, "CLIENT_RANDOM") if st.cr else None
                if st.master is None:
                    self._no_keys(st)  # raises _Pause, or returns when the key log grew: look again
                elif st.c_sid:
                    self._remember(self._sessions12, st.c_sid, st.master)
            if st.k12 is None:
                kl, il = suite.key_len, suite.iv_len
                kb = prf12(st.master, b"key expansion", st.sr + st.cr, 2 * kl + 2 * il, suite.hash)  # type: ignore
                st.k12 = (kb[:kl], kb[kl:2 * kl], kb[2 * kl:2 * kl + il], kb[2 * kl + il:2 * kl + 2 * il])
            ck, sk, civ, siv = st.k12
            side.prot = _Protect(suite, ck if is_client else sk, civ if is_client else siv, False)
        else:
            who = "CLIENT" if is_client else "SERVER"
            label = f"{who}_HANDSHAKE_TRAFFIC_SECRET" if need == "hs" else f"{who}_TRAFFIC_SECRET_0"
            secret = self.keylog.secret(st.cr, label) if st.cr else None
            while secret is None or len(secret) != _HLEN[suite.hash]:
                self._no_keys(st)  # raises _Pause, or returns when the key log grew: look again
                secret = self.keylog.secret(st.cr, label)
            side.prot = _Protect.tls13_from(suite, secret)  # type: ignore[arg-type]
            side.app = need == "app"
        side.need = None
        if st.wait_since is not None:
            st.wait_since = None
            self._waiting.pop(st.cid, None)

    def _no_keys(self, st: _Session) -> None:
        """The key log has no secret for this session (yet): wait for it (a growing key log, up to
        ``wait_for_keys`` of event time, MAX_WAIT_BYTES held) or give the session up."""
        if self.wait_ns and st.cr and not st.final:
            if self.keylog.refresh():
                return  # it came: the caller looks again
            if st.wait_since is None:
                st.wait_since = self._clock
                self._waiting[st.cid] = st
                if len(self._waiting) > MAX_WAITING:  # the oldest waiting session is given up
                    oldest = next(iter(self._waiting.values()))
                    self._waiting.pop(oldest.cid)
                    self._kill(oldest, "tls_no_keys")
                    if oldest.ends:
                        self._late.append(oldest)  # its held ends go out with this batch
            held = sum(s.avail for s in st.sides.values())
            if st.dead is None and held <= MAX_WAIT_BYTES and self._clock - st.wait_since <= self.wait_ns:
                raise _Pause
        self._waiting.pop(st.cid, None)
        self._kill(st, "tls_no_keys")
        raise _Pause

    def _retry(self, st: _Session, out: list[TcpEvent], final: bool) -> None:
        """Look again at a session waiting for its keys (``final``: its connection ends, or the input)."""
        self.keylog.refresh(final=final)
        st.final = st.final or final
        for side in list(st.sides.values()):
            self._drain(st, side, out)
        if st.wait_since is None or st.dead is not None:
            self._waiting.pop(st.cid, None)
            if st.ends:  # the connection ended while it waited: its ends now
                ends, st.ends = st.ends, []
                for e in ends:
                    self._event(st, e, out)

    def _retry_waiting(self, out: list[TcpEvent], final: bool = False) -> None:
        """The sessions waiting for keys: retried when the key log grew, given up when their wait is over."""
        now = time.monotonic()
        if not final and now - self._last_refresh < REFRESH_INTERVAL:
            return
        self._last_refresh = now
        grew = self.keylog.refresh()
        for st in list(self._waiting.values()):
            if grew or final or self._clock - (st.wait_since or 0) > self.wait_ns:
                self._retry(st, out, final)

    def tick(self, now_ns: int) -> list[TcpEvent]:
        """Time passes without events (the live receiver's housekeeping): sessions waiting for keys
        are retried or given up. Returns the events this made (plaintext of a session whose keys came)."""
        self._clock = max(self._clock, now_ns)
        if not self._waiting:
            return []
        out: list[TcpEvent] = []
        self._retry_waiting(out)
        self._flush_late(out)
        return out

    def finish(self) -> list[TcpEvent]:
        """End of input: every session still waiting for keys gets a last look at the key log."""
        out: list[TcpEvent] = []
        if self._waiting:
            self._retry_waiting(out, True)
        self._flush_late(out)
        return out

    # ------------------------------------------------------------------ gaps
    def _gap(self, st: _Session, side: _Side, ev: TcpEvent, out: list[TcpEvent]) -> None:
        if st.dead is not None or side.lost:
            return
        n = ev.gap
        prot = side.prot
        side.hs.clear()  # a handshake message cut by the gap is not followed; the next record's are
        if side.skip:
            if n and n <= side.skip:  # still inside the record already lost
                side.skip -= n
                return
            side.skip = 0  # past its end (or a gap of unknown size): the boundaries are lost
        elif side.pend_ln >= 0 and n:
            need = 5 + side.pend_ln - side.avail
            if 0 < n <= need:
                # inside the record being collected: it is lost, the next one starts right after it
                side.pieces.clear()
                side.avail = 0
                side.skip = need - n
                if prot is not None:
                    prot.seq += 1
                    out.append(TcpEvent(_GAP, st.plain_id, side.src, side.sport, side.dst, side.dport, ev.ts_ns, None,
                                        max(side.pend_ln - prot.overhead(), 0), side.client_is_src))
                side.pend_ln = -1
                return
        # the record boundaries are lost: search for the next record (only once protected: the
        # handshake's records carry the secrets' context)
        side.pieces.clear()
        side.avail = 0
        side.pend_ln = -1
        if prot is None:
            side.lost = True
            self._drop("tls_resync_failed")
            return
        side.resync, side.rpos, side.rneed = True, 0, 0
        out.append(TcpEvent(_GAP, st.plain_id, side.src, side.sport, side.dst, side.dport, ev.ts_ns, None, 0,
                            side.client_is_src))

    def _resync(self, st: _Session, side: _Side) -> bool:
        """After a gap that lost the record boundaries: find the next record whose tag verifies
        (header candidates in the next RESYNC_WINDOW bytes, sequence numbers up to RESYNC_SEQS on).

        Linear: candidates are never looked at twice (``rpos``), and the pending bytes are gathered
        again only once they doubled (``rneed``) or a candidate's record is complete."""
        prot = side.prot
        if prot is None:  # only a protected direction resyncs (see _gap)
            side.resync = False
            return True
        if side.avail < side.rneed:
            return False
        buf = b"".join(bytes(p[0]) for p in side.pieces)  # a deliberate copy: a rare path, bounded, amortized
        n = len(buf)
        pos = side.rpos
        while True:
            j = buf.find(b"\x03\x03", pos + 1)  # a record header: type, 0x0303, length
            if j < 0:
                pos = max(pos, n - 2)
                break
            i = j - 1
            if i + 5 > n:
                pos = i
                break
            ln = (buf[i + 3] << 8) | buf[i + 4]
            if buf[i] in (CT_ALERT, CT_HANDSHAKE, CT_APPDATA) and 17 <= ln <= MAX_RECORD:
                if i + 5 + ln > n:
                    side.rpos, side.rneed = i, i + 5 + ln  # wait for this candidate's bytes
                    return False
                hdr, body = buf[i:i + 5], memoryview(buf)[i + 5:i + 5 + ln]
                base = prot.seq
                for k in range(RESYNC_SEQS):
                    prot.seq = base + k
                    if prot.open(hdr, body) is not None:
                        prot.seq = base + k  # the record is read again, from the pieces
                        side.resync, side.rpos, side.rneed = False, 0, 0
                        if i:
                            self._take(side, i)  # the bytes before it are dropped
                        return True
                prot.seq = base
            pos = i + 1
        if n > RESYNC_WINDOW:
            side.lost = True
            self._drop("tls_resync_failed")
            self.stats["skipped_bytes"] += side.avail
            side.pieces.clear()
            side.avail = 0
            return False
        side.rpos, side.rneed = pos, 2 * n
        return False
