"""A small h2c server: HTTP/1.1 ``Upgrade: h2c`` then HTTP/2 (the ``h2`` library's server).

nginx (1.22 here) does not implement the h2c upgrade, so this is the server
side for ``curl --http2 http://...`` (which upgrades). The HTTP/2 framing and
HPACK are the real ``h2`` state machine; the socket loop is ours. Answers every
request with 200 and ``body:<path>``; runs in a thread on a free loopback port.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator

import h2.config
import h2.connection
import h2.events

__all__ = ["h2c_server"]


def _serve_conn(sock: socket.socket) -> None:
    with sock:
        sock.settimeout(5)
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = sock.recv(65536)
            if not chunk:
                return
            head += chunk
        head, rest = head.split(b"\r\n\r\n", 1)
        lines = head.split(b"\r\n")
        path = lines[0].split(b" ")[1].decode()
        hdrs = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(b":") for ln in lines[1:])}
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
        if hdrs.get(b"upgrade", b"").lower() != b"h2c":
            sock.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
            return
        sock.sendall(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n")
        conn.initiate_upgrade_connection(hdrs.get(b"http2-settings", b""))

        def answer(sid: int, p: str) -> None:
            body = f"body:{p}".encode()
            conn.send_headers(sid, [(":status", "200"), ("content-length", str(len(body))),
                                    ("content-type", "text/plain")])
            conn.send_data(sid, body, end_stream=True)

        answer(1, path)  # RFC 9113 §3.2: the upgraded request is answered on stream 1
        sock.sendall(conn.data_to_send())
        data = rest
        while True:
            if data:
                for ev in conn.receive_data(data):
                    if isinstance(ev, h2.events.RequestReceived):
                        h = dict(ev.headers)
                        answer(ev.stream_id, h[b":path"].decode())
                    elif isinstance(ev, h2.events.ConnectionTerminated):
                        sock.sendall(conn.data_to_send())
                        return
                out = conn.data_to_send()
                if out:
                    sock.sendall(out)
            try:
                data = sock.recv(65536)
            except OSError:
                return
            if not data:
                return


@contextlib.contextmanager
def h2c_server() -> Iterator[int]:
    """Serve h2c upgrades on 127.0.0.1; yields the port."""
    ls = socket.socket()
    ls.bind(("127.0.0.1", 0))
    ls.listen(16)
    port = ls.getsockname()[1]
    stop = threading.Event()

    def loop() -> None:
        ls.settimeout(0.2)
        while not stop.is_set():
            try:
                s, _ = ls.accept()
            except OSError:
                continue
            threading.Thread(target=_serve_conn, args=(s,), daemon=True).start()

    t = threading.Thread(target=loop, daemon=True)
    t.start()
    try:
        yield port
    finally:
        stop.set()
        t.join(5)
        ls.close()
