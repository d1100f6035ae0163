"""AMQP 1.0 frames whose performatives and messages are encoded by python-qpid-proton's own codec
(``proton.Data``, ``proton.Message.encode``), for the tests, the exchanges and the fuzz seeds:
real client bytes without a broker. Only the 8-byte frame header is packed here (part 2 §2.3)."""

from __future__ import annotations

import struct
from typing import Any

__all__ = ["HEADER", "SASL_HEADER", "frame", "open_", "begin", "attach", "transfer", "disposition", "detach",
           "end", "close", "error", "message", "sasl_mechanisms", "sasl_init", "sasl_outcome", "flow"]

HEADER = b"AMQP\x00\x01\x00\x00"
SASL_HEADER = b"AMQP\x03\x01\x00\x00"


def frame(channel: int, code: int, fields: list[Any], payload: bytes = b"", ftype: int = 0) -> bytes:
    from proton import Data, Described, ulong

    d = Data()
    d.put_object(Described(ulong(code), fields))
    body = d.encode() + payload
    return struct.pack(">IBBH", 8 + len(body), 2, ftype, channel) + body


def error(condition: str, description: str = "") -> Any:
    from proton import Described, symbol, ulong

    return Described(ulong(0x1D), [symbol(condition), description])


def open_(container_id: str, product: str | None = None) -> bytes:
    from proton import symbol

    props = {symbol("product"): product} if product else None
    return frame(0, 0x10, [container_id, "localhost", None, None, None, None, None, None, None, props])


def begin(channel: int, remote: int | None = None) -> bytes:
    from proton import uint, ushort

    return frame(channel, 0x11, [None if remote is None else ushort(remote), uint(0), uint(2048), uint(2048)])


def attach(channel: int, name: str, handle: int, receiver: bool, source: str | None = None,
           target: str | None = None) -> bytes:
    from proton import Described, uint, ulong

    src = Described(ulong(0x28), [source]) if source is not None else None
    tgt = Described(ulong(0x29), [target]) if target is not None else None
    return frame(channel, 0x12, [name, uint(handle), receiver, None, None, src, tgt])


def flow(channel: int, handle: int, credit: int) -> bytes:
    from proton import uint

    return frame(channel, 0x13, [uint(0), uint(2048), uint(0), uint(2048), uint(handle), uint(0), uint(credit)])


def message(body: Any, **kw: Any) -> bytes:
    from proton import Message

    return Message(body=body, **kw).encode()


def transfer(channel: int, handle: int, delivery_id: int, tag: bytes, msg: bytes, settled: bool = False,
             frame_max: int | None = None) -> bytes:
    """One delivery in transfer frames of at most ``frame_max`` bytes (the first with its id and
    tag, the others continuations, all but the last with ``more``)."""
    from proton import uint

    first = [uint(handle), uint(delivery_id), tag, uint(0), settled, False]
    whole = frame(channel, 0x14, first, msg)
    if frame_max is None or len(whole) <= frame_max:
        return whole
    out, pos, head = b"", 0, True
    while True:
        fields = [uint(handle), uint(delivery_id), tag, uint(0), settled, True] if head else [uint(handle)]
        room = frame_max - len(frame(channel, 0x14, fields + ([] if head else [None, None, None, None, True])))
        piece = msg[pos:pos + room]
        pos += len(piece)
        more = pos < len(msg)
        if head:
            fields[5] = more
        else:
            fields += [None, None, None, None, more]
        out += frame(channel, 0x14, fields, piece)
        head = False
        if not more:
            return out


def disposition(channel: int, receiver: bool, first: int, last: int | None = None, state: str = "accepted",
                err: Any = None, settled: bool = True) -> bytes:
    from proton import Described, uint, ulong

    code = {"accepted": 0x24, "rejected": 0x25, "released": 0x26, "modified": 0x27}[state]
    st = Described(ulong(code), [err] if state == "rejected" and err is not None else [])
    return frame(channel, 0x15, [receiver, uint(first), None if last is None else uint(last), settled, st])


def detach(channel: int, handle: int, err: Any = None) -> bytes:
    from proton import uint

    return frame(channel, 0x16, [uint(handle), True, err])


def end(channel: int, err: Any = None) -> bytes:
    return frame(channel, 0x17, [err])


def close(err: Any = None) -> bytes:
    return frame(0, 0x18, [err])


def sasl_mechanisms() -> bytes:
    from proton import Array, Data, symbol

    return frame(0, 0x40, [Array(Data.NULL, Data.SYMBOL, symbol("PLAIN"), symbol("ANONYMOUS"))], ftype=1)


def sasl_init(user: str = "guest", password: str = "secret-password") -> bytes:
    from proton import symbol

    return frame(0, 0x41, [symbol("PLAIN"), f"\0{user}\0{password}".encode(), "localhost"], ftype=1)


def sasl_outcome(code: int) -> bytes:
    from proton import ubyte

    return frame(0, 0x44, [ubyte(code)], ftype=1)
