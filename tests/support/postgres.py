"""A throwaway PostgreSQL server for tests: initdb + postgres in a temp dir.

Runs as the ``postgres`` system user (the server refuses root), listens on
127.0.0.1 only on a free port, keeps its unix socket in the temp dir, trusts
local connections, and is stopped by PID (SIGINT = fast shutdown).
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass

from tests.support.capture import free_port, wait_port

__all__ = ["PgServer", "pg_bin", "postgres_server"]

USER = "postgres"


def pg_bin() -> str | None:
    """The newest /usr/lib/postgresql/*/bin holding initdb, or None."""
    dirs = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(p.split("/")[-2]))
    for d in reversed(dirs):
        if os.path.exists(os.path.join(d, "initdb")):
            return d
    return None


@dataclass
class PgServer:
    host: str
    port: int
    user: str
    dbname: str
    pid: int
    datadir: str

    def dsn(self, **extra: str) -> str:
        parts = [f"host={self.host}", f"port={self.port}", f"user={self.user}", f"dbname={self.dbname}"]
        parts += [f"{k}={v}" for k, v in extra.items()]
        return " ".join(parts)


def _as_user(user: str) -> dict:
    pw = pwd.getpwnam(user)
    return {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": [], "env": {
        "PATH": "/usr/bin:/bin", "HOME": pw.pw_dir, "LANG": "C.UTF-8"}}


@contextlib.contextmanager
def postgres_server(ssl: bool = False, conf: dict[str, str] | None = None) -> Iterator[PgServer]:
    """Start a server; yields its address. ``ssl`` turns on TLS with a fresh self-signed cert."""
    bindir = pg_bin()
    if bindir is None:
        raise RuntimeError("PostgreSQL binaries not found under /usr/lib/postgresql/*/bin")
    tmp = tempfile.mkdtemp(prefix="wirespan-pg-")
    pw = pwd.getpwnam(USER)
    os.chown(tmp, pw.pw_uid, pw.pw_gid)
    data = os.path.join(tmp, "data")
    run = _as_user(USER) if os.geteuid() == 0 else {}
    subprocess.run([f"{bindir}/initdb", "-D", data, "-A", "trust", "-U", USER, "-E", "UTF8", "--no-sync"],
                   check=True, capture_output=True, **run)
    port = free_port()
    settings = {"listen_addresses": "127.0.0.1", "port": str(port), "unix_socket_directories": tmp,
                "fsync": "off", "shared_buffers": "16MB", "max_connections": "20",
                "logging_collector": "off"}
    if ssl:
        cert, key = os.path.join(tmp, "server.crt"), os.path.join(tmp, "server.key")
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                        "-subj", "/CN=127.0.0.1", "-keyout", key, "-out", cert], check=True, capture_output=True)
        for f in (cert, key):
            os.chown(f, pw.pw_uid, pw.pw_gid)
            os.chmod(f, 0o600)
        settings.update({"ssl": "on", "ssl_cert_file": cert, "ssl_key_file": key})
    settings.update(conf or {})
    args = [f"{bindir}/postgres", "-D", data]
    for k, v in settings.items():
        args += ["-c", f"{k}={v}"]
    log = open(os.path.join(tmp, "server.log"), "wb")
    proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, **run)
    try:
        try:
            wait_port(port, timeout=30)
        except TimeoutError:
            log.flush()
            raise RuntimeError(open(os.path.join(tmp, "server.log")).read()[-2000:]) from None
        # The port accepts before recovery ends ("the database system is starting up").
        deadline = time.monotonic() + 30
        while subprocess.run([f"{bindir}/pg_isready", "-q", "-h", tmp, "-p", str(port)]).returncode != 0:
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError(open(os.path.join(tmp, "server.log")).read()[-2000:])
            time.sleep(0.05)
        yield PgServer("127.0.0.1", port, USER, "postgres", proc.pid, data)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGINT)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
        log.close()
        shutil.rmtree(tmp, ignore_errors=True)
