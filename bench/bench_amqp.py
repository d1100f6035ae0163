"""AMQP parser throughput, against pika's frame decoder on the same bytes in the same run.

Run: ``python -m bench amqp``. Prints medians of several repeats, the two alternating (A/B):

- AMQP 0-9-1: a channel's basic.publish (a headers table with a traceparent, a 1 KiB or
  64 KiB body) and basic.deliver + basic.ack, through our ``Session`` (frames, methods,
  properties, pairing and spans) vs ``pika.frame.decode_frame`` called over the same stream
  (pika's own decoder: methods and properties decoded, body frames sliced out; no spans).
- AMQP 1.0: the same messages as transfers and dispositions (python-qpid-proton's codec made
  the bytes) through our ``Session``; pika speaks no 1.0, so this line has no peer.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

from processors.protocols import amqp
from processors.protocols.base import Conn

REPEATS = 7
TP = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


Steps = list[tuple[bool, bytes]]


def workload091(n: int, body: int) -> Steps:
    from pika import spec

    from tests.support import amqp_wire as w

    props = spec.BasicProperties(message_id="m-1", headers={"traceparent": TP, "x-retry": 0})
    c, s = w.handshake_client(), w.handshake_server()
    steps: Steps = [(True, c[0]), (False, s[0]), (True, c[1] + c[2]), (False, s[1])]
    payload = b"b" * body
    for i in range(n):
        steps.append((True, w.method(1, spec.Basic.Publish(exchange="orders", routing_key="order.created"))
                      + w.content(1, payload, props)))
        steps.append((False, w.method(1, spec.Basic.Deliver("ctag", i + 1, False, "orders", "order.created"))
                      + w.content(1, payload, props)))
        steps.append((True, w.method(1, spec.Basic.Ack(i + 1))))
    return steps


def workload10(n: int, body: int) -> Steps:
    from tests.support import amqp10_wire as w

    m = w.message(b"b" * body, id="m-1", properties={"traceparent": TP})
    steps: Steps = [(True, w.HEADER + w.open_("svc") + w.begin(0) + w.attach(0, "p", 0, False, target="/queue/q")
                     + w.attach(0, "s", 1, True, source="/queue/q")),
                    (False, w.HEADER + w.open_("r", "RabbitMQ") + w.begin(0, remote=0)
                     + w.attach(0, "p", 0, True, target="/queue/q") + w.attach(0, "s", 1, False, source="/queue/q"))]
    for i in range(n):
        steps.append((True, w.transfer(0, 0, i, b"%d" % i, m, frame_max=131072)))
        steps.append((False, w.disposition(0, True, i) + w.transfer(0, 1, i, b"%d" % i, m, frame_max=131072)))
        steps.append((True, w.disposition(0, True, i)))
    return steps


def ours(steps: Steps, chunk: int = 16384) -> int:
    """Our Session fed as the stage feeds it: each side's bytes in segments of ``chunk``."""
    spans: list[Any] = []
    conn = Conn(1, "127.0.0.1", 50000, "127.0.0.1", 5672, spans.append, protocol="amqp")
    s = amqp.Session(conn)
    ts = 0
    for fc, data in steps:
        buf = conn.client_buf if fc else conn.server_buf
        mv = memoryview(data)
        for i in range(0, len(mv), chunk):
            ts += 1
            buf.append(mv[i:i + chunk], ts)
            s.feed(fc, buf, ts)
    return len(spans)


def pika_frames(steps: Steps) -> int:
    """pika's decoder over the same bytes, each frame cut out as a socket reader would hand it
    over (``decode_frame`` takes the bytes of one frame or more)."""
    from pika import frame

    n = 0
    for _, data in steps:
        pos = 8 if data.startswith(b"AMQP") else 0  # the protocol header: decode_frame reads it apart
        while pos < len(data):
            size = int.from_bytes(data[pos + 3:pos + 7], "big")
            used, fr = frame.decode_frame(data[pos:pos + size + 8])
            if not used:
                break
            pos += used
            n += fr is not None
    return n


def _ab(a: Any, b: Any) -> tuple[float, float]:
    ta, tb = [], []
    for _ in range(REPEATS):
        t0 = time.perf_counter()
        a()
        ta.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        b()
        tb.append(time.perf_counter() - t0)
    return statistics.median(ta), statistics.median(tb)


def main() -> None:
    for n, body in ((2000, 1024), (200, 65536)):
        steps = workload091(n, body)
        assert ours(steps) == 3 * n
        t_ours, t_pika = _ab(lambda st=steps: ours(st), lambda st=steps: pika_frames(st))
        mb = sum(len(b) for _, b in steps) / 1e6
        print(f"0-9-1 {n} x (publish, deliver, ack), {body} B bodies, {mb:.1f} MB: wirespan {t_ours * 1e3:.1f} ms "
              f"({t_ours / n * 1e6:.1f} us a message, its 3 spans included), pika.frame.decode_frame "
              f"{t_pika * 1e3:.1f} ms: {t_pika / t_ours:.2f}x")
    for n, body in ((2000, 1024), (200, 65536)):
        steps = workload10(n, body)
        assert ours(steps) == 2 * n
        t_ours, _ = _ab(lambda st=steps: ours(st), lambda: None)
        mb = sum(len(b) for _, b in steps) / 1e6
        print(f"1.0 {n} x (transfer, disposition each way), {body} B bodies, {mb:.1f} MB: wirespan "
              f"{t_ours * 1e3:.1f} ms ({t_ours / n * 1e6:.1f} us a message, its 2 spans included; no peer)")


if __name__ == "__main__":
    main()
