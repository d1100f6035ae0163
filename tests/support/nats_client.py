"""A nats-py client doing every operation tests/test_nats.py checks: subscriptions (one in a
queue group), publishes with and without headers (traceparent), request/reply, a request
nobody answers (503), a publish the server refuses, unsubscribes, a verbose connection and a
refused login. Run in its own process (the eBPF receiver traces it): ``python nats_client.py URL``."""

import asyncio
import sys

import nats
from nats.errors import NoRespondersError

TP = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"

async def main(url):
    errors = []
    async def on_err(e):
        errors.append(e)
    sub_nc = await nats.connect(url, user="alice", password="wonderland", name="sub-svc", error_cb=on_err)
    got = []
    async def handler(msg):
        got.append(msg)
        if msg.reply:
            await sub_nc.publish(msg.reply, b"pong:" + msg.data)
    s1 = await sub_nc.subscribe("orders.*", cb=handler)
    s2 = await sub_nc.subscribe("rpc.echo", queue="workers", cb=handler)
    await sub_nc.flush()
    pub_nc = await nats.connect(url, user="alice", password="wonderland", name="pub-svc", error_cb=on_err)
    await pub_nc.publish("orders.created", b"x" * 1000)
    await pub_nc.publish("orders.paid", b"y" * 70000, headers={"traceparent": TP, "X-Id": "7"})
    r = await pub_nc.request("rpc.echo", b"ping", timeout=5)
    assert r.data == b"pong:ping"
    try:
        await pub_nc.request("nobody.home", b"?", timeout=2)
    except NoRespondersError:
        pass
    await pub_nc.publish("secret.plans", b"s")
    await pub_nc.flush()
    await asyncio.sleep(0.3)
    await s1.unsubscribe()
    await s2.unsubscribe()
    await sub_nc.flush()
    vnc = await nats.connect(url, user="alice", password="wonderland", name="verbose-svc", verbose=True,
                             error_cb=on_err)
    await vnc.publish("orders.verbose", b"v")
    await vnc.flush()
    await asyncio.sleep(0.2)
    for c in (vnc, pub_nc, sub_nc):
        await c.close()
    assert len(got) >= 3, got
    try:
        await nats.connect(url, user="alice", password="wrong", name="intruder", allow_reconnect=False,
                           max_reconnect_attempts=0, connect_timeout=2)
    except Exception:
        pass
    print("ok", len(got), len(errors))

asyncio.run(main(sys.argv[1]))
