"""A small real two-tier application for trace-assembly tests, with no tracing library in it.

``frontend`` serves ``GET /r/<i>``: it reads ``key:<i>`` from a real redis-server through
redis-py's connection pool (a few connections reused by all request threads in turn),
runs ``SELECT <i> AS r<i>`` on a real PostgreSQL through a small pool of psycopg
connections, calls the ``backend`` service's ``/b/<i>`` over HTTP, and answers. Two
frontends: stdlib ``ThreadingHTTPServer`` (a thread per request) and asyncio streams (one
thread, requests overlapping). The ``backend`` is a ``ThreadingHTTPServer``. Each runs in
its own process (the ``ebpf`` receiver traces other processes), on free loopback ports,
stopped by PID. ``expected_parents`` says what the one trace of request ``i`` must be.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass

from tests.support.capture import free_port, wait_port
from tests.support.proc import stop

__all__ = ["App", "two_tier", "expected_parents", "span_role"]

_BACKEND = r'''
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *a):
        pass
    def do_GET(self):
        body = b"backend " + self.path.encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
'''

_THREADED = r'''
import http.client, queue, sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
import psycopg, redis

port, rport, dsn, bport = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
# A blocking pool: 8 request threads share 4 connections, each waiting its turn.
cache = redis.Redis(connection_pool=redis.BlockingConnectionPool(
    host="127.0.0.1", port=rport, max_connections=4, timeout=30))
dbs = queue.Queue()
for _ in range(3):
    dbs.put(psycopg.connect(dsn, autocommit=True))

class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *a):
        pass
    def do_GET(self):
        i = int(self.path.rsplit("/", 1)[1])
        cache.get(f"key:{i}")
        db = dbs.get()
        try:
            db.execute(f"SELECT {i} AS r{i}").fetchone()
        finally:
            dbs.put(db)
        c = http.client.HTTPConnection("127.0.0.1", bport)
        c.request("GET", f"/b/{i}")
        c.getresponse().read()
        c.close()
        body = b"ok %d" % i
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

ThreadingHTTPServer(("127.0.0.1", port), H).serve_forever()
'''

_ASYNC = r'''
import asyncio, sys
import redis.asyncio as aredis
import psycopg

port, rport, dsn, bport = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], int(sys.argv[4])

async def main():
    cache = aredis.Redis(connection_pool=aredis.BlockingConnectionPool(
        host="127.0.0.1", port=rport, max_connections=4, timeout=30))
    dbs = asyncio.Queue()
    for _ in range(3):
        await dbs.put(await psycopg.AsyncConnection.connect(dsn, autocommit=True))

    async def backend(i):
        r, w = await asyncio.open_connection("127.0.0.1", bport)
        w.write(f"GET /b/{i} HTTP/1.1\r\nHost: b\r\nConnection: close\r\n\r\n".encode())
        await w.drain()
        await r.read()
        w.close()

    async def serve(reader, writer):
        while True:
            line = await reader.readline()
            if not line:
                break
            while (await reader.readline()) not in (b"\r\n", b""):
                pass
            i = int(line.split()[1].rsplit(b"/", 1)[1])
            await cache.get(f"key:{i}")
            db = await dbs.get()
            try:
                await (await db.execute(f"SELECT {i} AS r{i}")).fetchone()
            finally:
                await dbs.put(db)
            await backend(i)
            body = b"ok %d" % i
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", port)
    async with server:
        await server.serve_forever()

asyncio.run(main())
'''

FRONTENDS = {"threaded": _THREADED, "asyncio": _ASYNC}


@dataclass
class App:
    frontend_port: int
    frontend_pid: int
    backend_port: int
    backend_pid: int
    redis_port: int
    pg_port: int

    @property
    def ports(self) -> list[int]:
        return [self.frontend_port, self.backend_port, self.redis_port, self.pg_port]


@contextlib.contextmanager
def two_tier(kind: str = "threaded") -> Iterator[App]:
    """Real redis-server and PostgreSQL, the backend and a frontend of ``kind``."""
    from tests.support.postgres import postgres_server
    from tests.support.redis_server import redis_server

    with redis_server() as rport, postgres_server() as pg:
        bport, fport = free_port(), free_port()
        backend = subprocess.Popen([sys.executable, "-c", _BACKEND, str(bport)],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        front = subprocess.Popen([sys.executable, "-c", FRONTENDS[kind], str(fport), str(rport), pg.dsn(),
                                  str(bport)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            wait_port(bport)
            try:
                wait_port(fport, timeout=20)
            except TimeoutError:
                front.kill()
                raise RuntimeError(front.stderr.read().decode()[-2000:]) from None  # type: ignore[union-attr]
            yield App(fport, front.pid, bport, backend.pid, rport, pg.port)
        finally:
            stop(front)
            stop(backend)


def span_role(s: dict, app: App) -> tuple[str, int] | None:
    """(role, request number) of a span (a dict as tests/support/otlp_sink or a Span's fields):
    roles curl, fe, fe_redis, redis, fe_pg, pg, fe_http, be; None for spans of other work."""
    attrs, kind = s["attrs"], s["kind"]
    path = str(attrs.get("url.path", ""))
    port = attrs.get("server.port")
    if path.startswith("/r/"):
        return ("curl" if kind == "CLIENT" else "fe"), int(path[3:])
    if path.startswith("/b/"):
        return ("fe_http" if kind == "CLIENT" else "be"), int(path[3:])
    q = str(attrs.get("db.query.text", ""))
    if port == app.redis_port and q.startswith("GET key:"):
        return ("fe_redis" if kind == "CLIENT" else "redis"), int(q.split(":")[1])
    if port == app.pg_port and " AS r" in q:
        return ("fe_pg" if kind == "CLIENT" else "pg"), int(q.rsplit(" AS r", 1)[1].split()[0])
    return None


#: role -> the role of its parent in the request's one trace.
expected_parents = {"fe": "curl", "fe_redis": "fe", "redis": "fe_redis", "fe_pg": "fe", "pg": "fe_pg",
                    "fe_http": "fe", "be": "fe_http"}
