"""AMQP 0-9-1 frames encoded by pika's own classes (``pika.spec``, ``pika.frame``), for the tests,
the exchanges and the fuzz seeds: real client bytes without a broker."""

from __future__ import annotations

from typing import Any

__all__ = ["HEADER", "method", "content", "handshake_client", "handshake_server"]

HEADER = b"AMQP\x00\x00\x09\x01"


def method(channel: int, m: Any) -> bytes:
    from pika import frame

    return frame.Method(channel, m).marshal()


def content(channel: int, body: bytes, props: Any = None, frame_max: int = 131072) -> bytes:
    """A content header and the body in frames of at most ``frame_max`` (as pika cuts them)."""
    from pika import frame, spec

    out = frame.Header(channel, len(body), props or spec.BasicProperties()).marshal()
    step = frame_max - 8
    for i in range(0, len(body), step):
        out += frame.Body(channel, body[i:i + step]).marshal()
    return out


def handshake_client(name: str = "orders-svc") -> list[bytes]:
    """What a client sends before its first channel's work: header, start-ok, tune-ok, open,
    channel.open."""
    from pika import spec

    return [HEADER,
            method(0, spec.Connection.StartOk({"product": "pika", "connection_name": name}, "PLAIN",
                                              b"\0guest\0secret-password", "en_US"))
            + method(0, spec.Connection.TuneOk(2047, 131072, 60)) + method(0, spec.Connection.Open("/")),
            method(1, spec.Channel.Open())]


def handshake_server() -> list[bytes]:
    from pika import spec

    return [method(0, spec.Connection.Start(0, 9, {"product": "RabbitMQ"}, "PLAIN AMQPLAIN", "en_US"))
            + method(0, spec.Connection.Tune(2047, 131072, 60)),
            method(0, spec.Connection.OpenOk()) + method(1, spec.Channel.OpenOk())]
