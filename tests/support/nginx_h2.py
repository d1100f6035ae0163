"""A real nginx speaking cleartext HTTP/2 (prior knowledge) on a free loopback port.

tests/support/nginx.py serves HTTP/1 only (its ``listen`` has no ``http2``),
so HTTP/2 gets this sibling: same lifecycle (single process, temp dir, stopped
by the PID we started), a config with ``listen ... http2`` (nginx 1.22 syntax;
cleartext h2 there means prior knowledge, no h2c upgrade).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

from tests.support.capture import free_port, wait_port
from tests.support.nginx import NGINX, PREAMBLE, Nginx

__all__ = ["nginx_h2_server"]

_CONF = PREAMBLE + """    client_max_body_size 64m;
    default_type text/plain;
    server {{
        listen 127.0.0.1:{port} http2;
        root {d}/www;
        location = /boom {{ return 500 "boom\\n"; }}
        # proxied, so nginx reads the whole request body first (a bare
        # ``return`` answers early and resets the stream mid-upload)
        location /api/ {{ proxy_pass http://127.0.0.1:{port2}; }}
        location / {{ }}
    }}
    server {{
        listen 127.0.0.1:{port2};
        location / {{ return 200 "api $request_method $request_length\\n"; }}
    }}
}}
"""


@contextlib.contextmanager
def nginx_h2_server(files: dict[str, bytes] | None = None) -> Iterator[Nginx]:
    """Run an HTTP/2-only nginx serving ``files`` (path -> content) while the block runs."""
    d = Path(tempfile.mkdtemp(prefix="wirespan-nginx-h2-"))
    www = d / "www"
    www.mkdir()
    for name, content in (files or {}).items():
        p = www / name.lstrip("/")
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(content)
    port = free_port()
    (d / "nginx.conf").write_text(_CONF.format(d=d, port=port, port2=free_port()))
    proc = subprocess.Popen([NGINX, "-c", str(d / "nginx.conf"), "-p", str(d), "-e", str(d / "error.log")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        try:
            wait_port(port, timeout=15)
        except TimeoutError:
            err = (d / "error.log").read_text(errors="replace") if (d / "error.log").exists() else ""
            raise RuntimeError(f"nginx did not start: {err}")
        yield Nginx(port, www, proc.pid)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGQUIT)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
        shutil.rmtree(d, ignore_errors=True)
