"""A pika client doing every operation tests/test_amqp.py checks: declares, publishes (a
traceparent in the headers, a 300 KB body), consuming with acks, basic.get with a nack and an
empty get, confirm mode with an unroutable mandatory publish, a refused queue.declare, a
publish to a missing exchange, and a refused login. ``python amqp_client.py PORT``."""

import sys
import time

import pika

TP = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
port = int(sys.argv[1])
params = pika.ConnectionParameters("127.0.0.1", port, client_properties={"connection_name": "orders-svc"})
conn = pika.BlockingConnection(params)
ch = conn.channel()
ch.exchange_declare("orders", "topic")
q = ch.queue_declare("orders.q").method.queue
ch.queue_bind(q, "orders", "order.*")
ch.basic_publish("orders", "order.created", b"x" * 1000,
                 pika.BasicProperties(message_id="m-1", correlation_id="c-1", headers={"traceparent": TP}))
ch.basic_publish("orders", "order.big", b"y" * 300_000)
ch.basic_publish("", "orders.q", b"direct")
got = []
def on_msg(c, method, props, body):
    got.append(body)
    c.basic_ack(method.delivery_tag)
    if len(got) == 3:
        c.stop_consuming()
ch.basic_consume(q, on_msg)
ch.start_consuming()
ch.basic_publish("", "orders.q", b"for-get")
m, props, body = None, None, None
for _ in range(50):
    m, props, body = ch.basic_get(q)
    if m is not None:
        break
    time.sleep(0.05)
ch.basic_nack(m.delivery_tag, requeue=False)
m2 = ch.basic_get(q)  # empty
ch2 = conn.channel()
ch2.confirm_delivery()
ch2.basic_publish("orders", "order.confirmed", b"c")
try:
    ch2.basic_publish("orders", "nowhere", b"r", mandatory=True)
except pika.exceptions.UnroutableError:
    pass
try:
    ch.queue_declare("orders.q", durable=True)  # different args: PRECONDITION_FAILED closes ch
except pika.exceptions.ChannelClosedByBroker:
    pass
ch3 = conn.channel()
try:
    ch3.basic_publish("no-such-exchange", "k", b"z")
    ch3.queue_declare("after")  # the close arrives here
except pika.exceptions.ChannelClosedByBroker:
    pass
ch4 = conn.channel()
ch4.queue_delete("orders.q")
conn.close()
try:
    pika.BlockingConnection(pika.ConnectionParameters("127.0.0.1", port,
                            credentials=pika.PlainCredentials("guest", "wrong"), connection_attempts=1))
except pika.exceptions.ProbableAuthenticationError:
    pass
print("ok", len(got))
