"""Real TLS servers for the TLS tests (issue 15): nginx with ``ssl`` and its plaintext twin, a
Python HTTPS server, certificates. Loopback, free ports, temp dirs, stopped by PID.

- ``tls_files(dir, key="ec"|"rsa")``: a CA and a server certificate for 127.0.0.1/localhost
  (``rsa`` for TLS 1.2's RSA key exchange, which needs an RSA certificate).
- ``nginx_tls(files, protocols=..., ciphers=..., http2=False, tickets=True, curve=None)``: one nginx
  serving the same locations on a TLS port and a plaintext port (the twin), so a test compares
  the spans of the same requests with and without TLS.
- ``https_server(files)``: Python's ThreadingHTTPServer behind ``ssl`` in its own process (the
  routes of tests/support/live_http.py), so both ends of a connection are traced processes.
- ``keylog_env(path)``: the environment that makes curl, Python's ssl and Node write the NSS key log.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tests.support.capture import free_port, wait_port
from tests.support.live_http import _SERVER
from tests.support.nginx import NGINX, PREAMBLE
from tests.support.otlp_sink import TlsFiles, make_tls

__all__ = ["NginxTls", "https_server", "keylog_env", "nginx_tls", "tls_files", "HttpsServer"]


def tls_files(directory: Path, key: str = "ec") -> TlsFiles:
    """A CA and a server certificate (SAN localhost, 127.0.0.1) under ``directory``."""
    if key == "ec":
        return make_tls(directory)
    directory.mkdir(parents=True, exist_ok=True)
    files = TlsFiles(directory / "ca.pem", directory / "server.pem", directory / "server.key")
    # A self-signed RSA certificate is its own CA.
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
                    "-keyout", str(files.server_key), "-out", str(files.server_cert)],
                   check=True, capture_output=True, timeout=60)
    shutil.copy(files.server_cert, files.ca_cert)
    return files


_LOCATIONS = """        root {d}/www;
        location = /boom {{ return 500 "boom\\n"; }}
        location /api/ {{ return 200 "api $request_method $request_length\\n"; }}
        location / {{ }}
"""

_TLS_CONF = PREAMBLE + """    keepalive_requests 10000;
    default_type text/plain;
    server {{
        listen 127.0.0.1:{port} ssl{h2};
        ssl_certificate {cert};
        ssl_certificate_key {key};
        ssl_protocols {protocols};
        {ciphers}
        ssl_session_cache {cache};
        ssl_session_tickets {tickets};
        {curve}
        {extra}
""" + _LOCATIONS + """    }}
    server {{
        listen 127.0.0.1:{plain_port}{h2plain};
""" + _LOCATIONS + """    }}
}}
"""


@dataclass
class NginxTls:
    port: int
    plain_port: int
    root: Path
    pid: int
    files: TlsFiles

    def url(self, path: str = "/", tls: bool = True) -> str:
        return f"https://127.0.0.1:{self.port}{path}" if tls else f"http://127.0.0.1:{self.plain_port}{path}"


@contextlib.contextmanager
def nginx_tls(files: TlsFiles, www: dict[str, bytes] | None = None, protocols: str = "TLSv1.2 TLSv1.3",
              ciphers: str | None = None, http2: bool = False, tickets: bool = True,
              session_cache: bool = True, curve: str | None = None, extra: str = "") -> Iterator[NginxTls]:
    """nginx with ``ssl`` on one port and the same locations in plaintext on another. ``curve``: the
    only ECDHE group (``secp384r1`` makes a client whose key share is X25519 get a HelloRetryRequest);
    ``extra``: more directives for the TLS server block (``ssl_conf_command Ciphersuites ...``)."""
    d = Path(tempfile.mkdtemp(prefix="wirespan-nginx-tls-"))
    root = d / "www"
    root.mkdir()
    for name, content in (www or {}).items():
        p = root / name.lstrip("/")
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(content)
    port, plain_port = free_port(), free_port()
    conf = d / "nginx.conf"
    conf.write_text(_TLS_CONF.format(
        d=d, port=port, plain_port=plain_port, cert=files.server_cert, key=files.server_key, protocols=protocols,
        ciphers=f"ssl_ciphers {ciphers};" if ciphers else "", h2=" http2" if http2 else "",
        h2plain=" http2" if http2 else "", tickets="on" if tickets else "off",
        cache="shared:wsTLS:1m" if session_cache else "off", curve=f"ssl_ecdh_curve {curve};" if curve else "",
        extra=extra))
    proc = subprocess.Popen([NGINX, "-c", str(conf), "-p", str(d), "-e", str(d / "error.log")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        try:
            wait_port(port, timeout=15)
            wait_port(plain_port, timeout=15)
        except TimeoutError:
            err = (d / "error.log").read_text(errors="replace") if (d / "error.log").exists() else ""
            raise RuntimeError(f"nginx did not start: {err}")
        yield NginxTls(port, plain_port, root, proc.pid, files)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGQUIT)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
        shutil.rmtree(d, ignore_errors=True)


_HTTPS_SERVER = _SERVER.replace(
    'ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()',
    'import ssl\n'
    'srv = ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), H)\n'
    'ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)\n'
    'ctx.load_cert_chain(sys.argv[2], sys.argv[3])\n'
    'if len(sys.argv) > 4:\n'
    '    ctx.maximum_version = ssl.TLSVersion.TLSv1_2 if sys.argv[4] == "1.2" else ssl.TLSVersion.TLSv1_3\n'
    'srv.socket = ctx.wrap_socket(srv.socket, server_side=True)\n'
    'srv.serve_forever()')
assert _HTTPS_SERVER != _SERVER


@dataclass
class HttpsServer:
    port: int
    proc: subprocess.Popen

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"


@contextlib.contextmanager
def https_server(files: TlsFiles, max_version: str | None = None) -> Iterator[HttpsServer]:
    """The live_http routes (``/big``, ``/upload``, ``/missing``, echo) over TLS, in a process of its own."""
    port = free_port()
    args = [sys.executable, "-c", _HTTPS_SERVER, str(port), str(files.server_cert), str(files.server_key)]
    if max_version:
        args.append(max_version)
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(port)
        yield HttpsServer(port, proc)
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def keylog_env(path: str | os.PathLike[str]) -> dict[str, str]:
    """The environment with ``SSLKEYLOGFILE`` (curl, Python's ssl contexts, Node with --tls-keylog)."""
    return {**os.environ, "SSLKEYLOGFILE": str(path)}


#: Client scripts run as ``python -c SCRIPT CA_FILE URL...``: each GETs every URL over TLS
#: verified against CA_FILE (an HTTP error status is read, not raised), so both the eBPF and
#: the key-log tests drive the real urllib and httpx stacks the same way.
URLLIB_CLIENT = ("import urllib.request,urllib.error,ssl,sys\n"
                 "ctx = ssl.create_default_context(cafile=sys.argv[1])\n"
                 "for u in sys.argv[2:]:\n"
                 "    try:\n"
                 "        urllib.request.urlopen(u, context=ctx).read()\n"
                 "    except urllib.error.HTTPError as e:\n"
                 "        e.read()\n")
HTTPX_CLIENT = ("import httpx,sys\n"
                "with httpx.Client(verify=sys.argv[1]) as c:\n"
                "    for u in sys.argv[2:]:\n"
                "        c.get(u)\n")
