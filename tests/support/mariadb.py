"""A throwaway MariaDB server for tests: mariadb-install-db + mariadbd in a temp dir.

Listens on 127.0.0.1 only on a free port, socket in the temp dir, runs as
root with ``--user=root`` (it would switch to ``mysql`` otherwise), creates a
``wirespan`` user with a password and a ``shop`` database, stopped by PID.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass

from tests.support.capture import free_port, wait_port

__all__ = ["MariaServer", "mariadb_server", "MARIADBD"]

MARIADBD = shutil.which("mariadbd") or "/usr/sbin/mariadbd"
INSTALL_DB = shutil.which("mariadb-install-db") or "/usr/bin/mariadb-install-db"
USER = "wirespan"
PASSWORD = "wirespan-pw"
DATABASE = "shop"


@dataclass
class MariaServer:
    host: str
    port: int
    user: str
    password: str
    database: str
    pid: int
    socket: str
    tmpdir: str


@contextlib.contextmanager
def mariadb_server(ssl: bool = False) -> Iterator[MariaServer]:
    """Start a server; ``ssl`` turns on TLS with a fresh self-signed cert (``<tmp>/server.crt``)."""
    tmp = tempfile.mkdtemp(prefix="wirespan-maria-")
    data = os.path.join(tmp, "data")
    sock = os.path.join(tmp, "mysqld.sock")
    user = "root" if os.geteuid() == 0 else ""
    subprocess.run([INSTALL_DB, "--no-defaults", f"--datadir={data}", "--auth-root-authentication-method=normal",
                    "--skip-test-db", "--skip-name-resolve"] + ([f"--user={user}"] if user else []),
                   check=True, capture_output=True)
    port = free_port()
    log = open(os.path.join(tmp, "server.log"), "wb")
    args = [MARIADBD, "--no-defaults", f"--datadir={data}", f"--port={port}", "--bind-address=127.0.0.1",
            f"--socket={sock}", f"--pid-file={tmp}/mysqld.pid", "--skip-name-resolve",
            "--innodb-buffer-pool-size=16M", "--skip-log-bin", "--max-connections=20",
            f"--log-error={tmp}/error.log"] + ([f"--user={user}"] if user else [])
    if ssl:
        cert, key = os.path.join(tmp, "server.crt"), os.path.join(tmp, "server.key")
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                        "-subj", "/CN=127.0.0.1", "-keyout", key, "-out", cert], check=True, capture_output=True)
        args += [f"--ssl-cert={cert}", f"--ssl-key={key}"]
    proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
    try:
        try:
            wait_port(port, timeout=60)
        except TimeoutError:
            raise RuntimeError(open(f"{tmp}/error.log").read()[-2000:]) from None
        # Set up over the unix socket, so the capture only sees the test's own TCP traffic.
        sql = (f"CREATE DATABASE IF NOT EXISTS {DATABASE}; "
               f"CREATE USER '{USER}'@'%' IDENTIFIED BY '{PASSWORD}'; "
               f"GRANT ALL ON *.* TO '{USER}'@'%'; FLUSH PRIVILEGES;")
        for _ in range(50):
            r = subprocess.run(["mariadb", "--no-defaults", f"--socket={sock}", "-uroot", "-e", sql],
                               capture_output=True)
            if r.returncode == 0:
                break
            time.sleep(0.1)
        else:
            raise RuntimeError(r.stderr.decode(errors="replace"))
        yield MariaServer("127.0.0.1", port, USER, PASSWORD, DATABASE, proc.pid, sock, tmp)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
        log.close()
        shutil.rmtree(tmp, ignore_errors=True)
