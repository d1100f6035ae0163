"""A real nats-server (Debian's package) on a free loopback port, in a temporary directory,
stopped by PID.

One user, ``alice`` / ``wonderland``, who may publish anywhere but ``secret.>`` (so a
publish there is a ``Permissions Violation``); a wrong password is an ``Authorization
Violation``.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass

from tests.support.capture import free_port, wait_port
from tests.support.proc import stop

NATS_SERVER = shutil.which("nats-server") or "/usr/sbin/nats-server"


@dataclass
class Nats:
    port: int
    proc: subprocess.Popen

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"


@contextlib.contextmanager
def nats_server() -> Iterator[Nats]:
    d = tempfile.mkdtemp(prefix="wirespan-nats-")
    port = free_port()
    conf = f"{d}/nats.conf"
    with open(conf, "w") as f:
        f.write(f"""listen: 127.0.0.1:{port}
authorization {{
  users = [
    {{user: alice, password: wonderland, permissions: {{publish: {{deny: ["secret.>"]}}}}}}
  ]
}}
""")
    proc = subprocess.Popen([NATS_SERVER, "-c", conf], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_port(port)
        yield Nats(port, proc)
    finally:
        stop(proc)
        shutil.rmtree(d, ignore_errors=True)
