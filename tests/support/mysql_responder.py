"""A scripted MySQL 8 server for one connection: enough of the protocol for a real client
library to log in and run commands, so tests get that library's own bytes.

It offers CLIENT_QUERY_ATTRIBUTES (MySQL 8.0.23+), which MariaDB does not, answers the
handshake and every command with OK, and returns each client packet as sent.
"""

from __future__ import annotations

import socket
import struct
import threading
from collections.abc import Callable
from typing import Any

__all__ = ["CAPS", "client_packets"]

# CLIENT_LONG_PASSWORD | FOUND_ROWS | CONNECT_WITH_DB | PROTOCOL_41 | TRANSACTIONS | SECURE_CONNECTION
# | PLUGIN_AUTH | PLUGIN_AUTH_LENENC_CLIENT_DATA | DEPRECATE_EOF | QUERY_ATTRIBUTES
CAPS = 0x1 | 0x2 | 0x8 | 0x200 | 0x2000 | 0x8000 | 0x80000 | 0x200000 | 0x1000000 | 0x8000000


def _pkt(payload: bytes, seq: int) -> bytes:
    return struct.pack("<I", len(payload))[:3] + bytes([seq]) + payload


def _greeting() -> bytes:
    return _pkt(b"\x0a8.0.36\0" + struct.pack("<I", 7) + b"abcdefgh\0" + struct.pack("<H", CAPS & 0xFFFF) + b"\x2d"
                + struct.pack("<HH", 2, CAPS >> 16) + b"\x15" + b"\0" * 10 + b"ijklmnopqrst\0"
                + b"mysql_native_password\0", 0)


def _ok(seq: int) -> bytes:
    return _pkt(b"\0\0\0\x02\0\0\0", seq)


def _serve(sock: socket.socket, log: list[bytes]) -> None:
    c, _ = sock.accept()
    with c:
        c.settimeout(10)
        c.sendall(_greeting())
        buf = b""
        while True:
            while len(buf) < 4 or len(buf) < 4 + int.from_bytes(buf[:3], "little"):
                d = c.recv(65536)
                if not d:
                    return
                buf += d
            n = 4 + int.from_bytes(buf[:3], "little")
            p, buf = buf[:n], buf[n:]
            log.append(p)
            if p[3] == 1:       # the handshake response
                c.sendall(_ok(2))
            elif p[4] == 0x01:  # COM_QUIT
                return
            else:
                c.sendall(_ok(1))


def client_packets(work: Callable[[Any], None]) -> list[bytes]:
    """Connect mysql-connector-python (pure Python) to the scripted server, run ``work(cnx)``,
    close, and return every packet the client sent (headers included), in order."""
    import mysql.connector

    log: list[bytes] = []
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        t = threading.Thread(target=_serve, args=(s, log), daemon=True)
        t.start()
        cn = mysql.connector.connect(host="127.0.0.1", port=s.getsockname()[1], user="u", password="p",
                                     use_pure=True, auth_plugin="mysql_native_password")
        try:
            work(cn)
        finally:
            cn.close()
        t.join(10)
    return log
