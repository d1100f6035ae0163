"""A small scripted MongoDB responder for driving the real ``pymongo`` client.

There is no MongoDB server package for this machine, so the real-client tests
talk to this: a TCP server on a free loopback port that speaks the wire protocol
(OP_QUERY/OP_REPLY handshake, OP_MSG, OP_COMPRESSED with zlib/snappy/zstd) and
answers commands with canned but well-formed replies, encoded by pymongo's own
``bson``. The client bytes on the wire are pymongo's, which is what the parser
tests need. Commands on the collection ``broken`` fail with BadValue.
"""

from __future__ import annotations

import contextlib
import datetime
import socket
import struct
import threading
import zlib
from collections.abc import Iterator
from typing import Any

import bson
from bson.int64 import Int64

from tests.support.capture import free_port

_HDR = struct.Struct("<iiii")
OP_REPLY, OP_QUERY, OP_COMPRESSED, OP_MSG = 1, 2004, 2012, 2013


def _recv_exact(s: socket.socket, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        b = s.recv(n - len(out))
        if not b:
            raise ConnectionError("closed")
        out += b
    return bytes(out)


def _decompress(comp: int, data: bytes) -> bytes:
    if comp == 2:
        return zlib.decompress(data)
    if comp == 1:
        import snappy
        return snappy.uncompress(data)
    if comp == 3:
        import zstandard
        return zstandard.ZstdDecompressor().decompress(data)
    return data


def _compress(comp: int, data: bytes) -> bytes:
    if comp == 2:
        return zlib.compress(data)
    if comp == 1:
        import snappy
        return snappy.compress(data)
    if comp == 3:
        import zstandard
        return zstandard.ZstdCompressor().compress(data)
    return data


class Responder:
    def __init__(self) -> None:
        self.port = free_port()
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", self.port))
        self.sock.listen(16)
        self.stop = threading.Event()
        self.next_id = 1000
        self.lock = threading.Lock()
        self.commands: list[str] = []
        self.compressors: set[int] = set()  # compressor ids seen in requests (1 snappy, 2 zlib, 3 zstd)
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        self.sock.settimeout(0.2)
        while not self.stop.is_set():
            try:
                c, _ = self.sock.accept()
            except OSError:
                continue
            threading.Thread(target=self._serve, args=(c,), daemon=True).start()

    def _id(self) -> int:
        with self.lock:
            self.next_id += 1
            return self.next_id

    def _serve(self, c: socket.socket) -> None:
        with c:
            try:
                while not self.stop.is_set():
                    hdr = _recv_exact(c, 16)
                    length, req_id, _, op = _HDR.unpack(hdr)
                    body = _recv_exact(c, length - 16)
                    comp = None
                    if op == OP_COMPRESSED:
                        op, _usize, comp = struct.unpack_from("<iiB", body)
                        self.compressors.add(comp)
                        body = _decompress(comp, body[9:])
                    reply = self._handle(op, body)
                    if reply is None:
                        continue
                    rop, payload = reply
                    if comp is not None:
                        payload = struct.pack("<iiB", rop, len(payload), comp) + _compress(comp, payload)
                        rop = OP_COMPRESSED
                    c.sendall(_HDR.pack(16 + len(payload), self._id(), req_id, rop) + payload)
            except (ConnectionError, OSError):
                return

    def _handle(self, op: int, body: bytes) -> tuple[int, bytes] | None:
        if op == OP_QUERY:
            z = body.index(b"\0", 4)
            doc = bson.decode(body[z + 9:z + 9 + struct.unpack_from("<i", body, z + 9)[0]])
            reply = self._reply(doc, "admin", "$cmd")
            return OP_REPLY, struct.pack("<iqii", 8, 0, 0, 1) + bson.encode(reply)
        if op == OP_MSG:
            flags = struct.unpack_from("<I", body)[0]
            p = 4
            doc: dict[str, Any] = {}
            end = len(body) - (4 if flags & 1 else 0)
            while p < end:
                kind = body[p]
                size = struct.unpack_from("<i", body, p + 1)[0]
                if kind == 0:
                    doc = bson.decode(body[p + 1:p + 1 + size])
                p += 1 + size
            first = next(iter(doc))
            coll = doc[first] if isinstance(doc[first], str) else "$cmd"
            reply = self._reply(doc, doc.get("$db", "test"), coll)
            if flags & 2:  # moreToCome: an unacknowledged write, no reply
                return None
            return OP_MSG, struct.pack("<I", 0) + b"\0" + bson.encode(reply)
        return None

    def _reply(self, doc: dict[str, Any], db: str, coll: str) -> dict[str, Any]:
        cmd = next(iter(doc))
        self.commands.append(cmd)
        if cmd.lower() in ("hello", "ismaster"):
            r: dict[str, Any] = {
                "ismaster": True, "helloOk": True, "maxBsonObjectSize": 16777216,
                "maxMessageSizeBytes": 48000000, "maxWriteBatchSize": 100000,
                "localTime": datetime.datetime.now(tz=datetime.UTC), "logicalSessionTimeoutMinutes": 30,
                "connectionId": 1, "minWireVersion": 0, "maxWireVersion": 21, "readOnly": False, "ok": 1.0,
            }
            if doc.get("compression"):
                r["compression"] = list(doc["compression"])[:1]
            return r
        if coll == "broken":
            return {"ok": 0.0, "errmsg": "boom: bad value", "code": 2, "codeName": "BadValue"}
        if cmd in ("find", "aggregate"):
            return {"cursor": {"firstBatch": [{"_id": 1, "name": "x"}], "id": Int64(0), "ns": f"{db}.{coll}"},
                    "ok": 1.0}
        if cmd in ("insert", "delete"):
            return {"n": 1, "ok": 1.0}
        if cmd == "update":
            return {"n": 1, "nModified": 1, "ok": 1.0}
        return {"ok": 1.0}

    def close(self) -> None:
        self.stop.set()
        self.sock.close()


@contextlib.contextmanager
def mongo_responder() -> Iterator[Responder]:
    r = Responder()
    try:
        yield r
    finally:
        r.close()
