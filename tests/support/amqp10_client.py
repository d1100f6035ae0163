"""A python-qpid-proton client doing every AMQP 1.0 operation tests/test_amqp.py checks against
RabbitMQ's rabbitmq_amqp1_0 plugin: sends (message id, correlation id, a traceparent in the
application properties, a 300 KB body in several transfer frames), receives accepted, rejected
and released, a publish RabbitMQ cannot route, a link to a missing exchange refused, a modified
outcome RabbitMQ refuses by ending the session, and a refused login. ``python amqp10_client.py PORT``."""

import sys

from proton import Message
from proton.reactor import Container
from proton.utils import BlockingConnection

TP = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
port = int(sys.argv[1])
url = f"amqp://127.0.0.1:{port}"
c = Container()
c.container_id = "orders-svc-10"
conn = BlockingConnection(url, container=c, user="guest", password="guest", allowed_mechs="PLAIN", timeout=20)
q = "/queue/orders10"
snd = conn.create_sender(q)
snd.send(Message(body=b"x" * 1000, id="m-10", correlation_id="c-10", properties={"traceparent": TP}))
snd.send(Message(body=b"y" * 300_000))
snd.send(Message(body="three"))
snd.send(Message(body=b"four"))
rcv = conn.create_receiver(q, credit=1)
got = []
for outcome in ("accept", "accept", "reject", "release"):
    m = rcv.receive(timeout=10)
    got.append(m)
    if outcome == "release":
        rcv.release(delivered=False)  # the released outcome
    else:
        getattr(rcv, outcome)()


unroutable = conn.create_sender("/exchange/amq.direct/nowhere")
try:
    unroutable.send(Message(body=b"lost"))
except Exception as e:
    print("unroutable:", type(e).__name__, e, file=sys.stderr)
try:
    conn.timeout = 3  # RabbitMQ 3.10 answers with the end of the session, not a detach
    bad = conn.create_sender("/exchange/no-such-exchange/k")
    bad.send(Message(body=b"z"))
except Exception as e:
    print("missing exchange:", type(e).__name__, e, file=sys.stderr)
conn.close()
# proton's release() is the modified outcome, which RabbitMQ 3.10 refuses: it ends the session
# with amqp:invalid-field (a real session error).
c2 = Container()
c2.container_id = "orders-svc-10"
conn2 = BlockingConnection(url, container=c2, user="guest", password="guest", allowed_mechs="PLAIN", timeout=5)
conn2.create_sender(q).send(Message(body=b"five"))
rcv2 = conn2.create_receiver(q, credit=1)
rcv2.receive(timeout=10)
rcv2.release()
try:
    conn2.create_sender(q).send(Message(body=b"six"))
except Exception as e:
    print("after the session's end:", type(e).__name__, e, file=sys.stderr)
try:
    conn2.close()
except Exception as e:
    print("close:", type(e).__name__, e, file=sys.stderr)
try:
    BlockingConnection(url, user="guest", password="wrong", allowed_mechs="PLAIN", timeout=10).close()
except Exception as e:
    print("refused login:", type(e).__name__, e, file=sys.stderr)
print("ok", len(got))
