"""A real nginx (Debian's) on a free loopback port, in a temp dir, stopped by PID.

Single process (``master_process off``, ``daemon off``) so it runs the same as
root or as a user, and the PID we started is the one we stop. Locations give
the tests every HTTP/1 shape they need: static files (a large one, served
gzip-compressed with chunked coding to clients that accept gzip), 404, 500,
request bodies read and discarded (POST/PUT/DELETE), HTTP/1.0.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tests.support.capture import free_port, wait_port

__all__ = ["NGINX", "PREAMBLE", "Nginx", "nginx_server"]

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"

#: What every test nginx needs: one foreground process, everything in its temp dir ``{d}``.
#: A fixture's config is this, then its own ``http`` settings and servers, then ``}}``.
PREAMBLE = """
daemon off;
master_process off;
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 256; }}
http {{
    access_log {d}/access.log;
    client_body_temp_path {d}/client_body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
"""

_CONF = PREAMBLE + """    client_max_body_size 64m;
    keepalive_requests 10000;
    default_type text/plain;
    server {{
        listen 127.0.0.1:{port};
        root {d}/www;
        gzip on;
        gzip_min_length 0;
        gzip_types text/plain text/html;
        location = /boom {{ return 500 "boom\\n"; }}
        location = /created {{ return 201 "created\\n"; }}
        location /api/ {{ return 200 "api $request_method $request_length\\n"; }}
        location / {{ }}
    }}
}}
"""


@dataclass
class Nginx:
    port: int
    root: Path
    pid: int

    def url(self, path: str = "/") -> str:
        return f"http://127.0.0.1:{self.port}{path}"


@contextlib.contextmanager
def nginx_server(files: dict[str, bytes] | None = None) -> Iterator[Nginx]:
    """Run nginx serving ``files`` (path -> content) from its root while the block runs."""
    d = Path(tempfile.mkdtemp(prefix="wirespan-nginx-"))
    www = d / "www"
    www.mkdir()
    for name, content in (files or {}).items():
        p = www / name.lstrip("/")
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(content)
    port = free_port()
    conf = d / "nginx.conf"
    conf.write_text(_CONF.format(d=d, port=port))
    proc = subprocess.Popen([NGINX, "-c", str(conf), "-p", str(d), "-e", str(d / "error.log")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        try:
            wait_port(port, timeout=15)
        except TimeoutError:
            err = (d / "error.log").read_text(errors="replace") if (d / "error.log").exists() else ""
            raise RuntimeError(f"nginx did not start: {err}")
        yield Nginx(port, www, proc.pid)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGQUIT)  # graceful: finish requests in flight
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
        shutil.rmtree(d, ignore_errors=True)
