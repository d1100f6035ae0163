"""A real unbound (Debian's package) on loopback, in a temporary directory, stopped by PID.

It answers from ``local-data`` only, so no test needs the network:

- ``www.wirespan.test``: A 10.1.2.3 and 10.1.2.4, AAAA 2001:db8::1; ``mail.wirespan.test`` MX;
  ``txt.wirespan.test`` TXT; any other name under ``wirespan.test`` is NXDOMAIN (a static zone);
- ``refused.test``: REFUSED (``local-zone: refuse``);
- ``fail.test``: SERVFAIL: a stub zone whose only server is a closed loopback port (unbound
  gets a port unreachable and gives up at once: ``infra-host-ttl`` and retries kept small).

It listens on port 53 of a loopback address of its own (``127.53.x.y``: 127/8 is all
loopback on Linux), because glibc's resolver (``getent hosts``) can only be pointed at port
53; the address is free when nothing answers on it.
"""

from __future__ import annotations

import contextlib
import random
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass

from tests.support.capture import free_port
from tests.support.proc import stop

UNBOUND = shutil.which("unbound") or "/usr/sbin/unbound"


@dataclass
class Unbound:
    address: str
    port: int
    proc: subprocess.Popen
    dir: str

    @property
    def pid(self) -> int:
        return self.proc.pid


def _free_address() -> str:
    """A 127.53.x.y address on which port 53 is free for both UDP and TCP."""
    for _ in range(50):
        addr = f"127.53.{random.randrange(1, 255)}.{random.randrange(1, 255)}"
        try:
            for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
                with socket.socket(socket.AF_INET, kind) as s:
                    s.bind((addr, 53))
        except OSError:
            continue
        return addr
    raise RuntimeError("no free 127.53.x.y:53")


def _ready(addr: str, port: int) -> bool:
    q = bytes.fromhex("abcd01000001000000000000") + b"\x03www\x08wirespan\x04test\x00\x00\x01\x00\x01"
    with socket.socket(socket.AF_INET6 if ":" in addr else socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(0.3)
        try:
            s.sendto(q, (addr, port))
            return s.recv(512)[:2] == b"\xab\xcd"
        except OSError:
            return False


@contextlib.contextmanager
def unbound_server(address: str | None = None) -> Iterator[Unbound]:
    """``address``: listen there (port 53) instead of a free 127.53.x.y (``::1`` for IPv6)."""
    d = tempfile.mkdtemp(prefix="wirespan-unbound-")
    addr = address or _free_address()
    dead = free_port()  # nobody listens there: the SERVFAIL zone's "server"
    conf = f"{d}/unbound.conf"
    with open(conf, "w") as f:
        f.write(f"""server:
  interface: {addr}
  port: 53
  do-ip6: {"yes" if ":" in addr else "no"}
  do-daemonize: no
  use-syslog: no
  logfile: ""
  verbosity: 0
  username: ""
  chroot: ""
  directory: "{d}"
  pidfile: "{d}/unbound.pid"
  num-threads: 1
  access-control: 127.0.0.0/8 allow
  access-control: ::1/128 allow
  do-not-query-localhost: no
  infra-host-ttl: 1
  outbound-msg-retry: 1
  module-config: "iterator"
  local-zone: "wirespan.test." static
  local-data: "www.wirespan.test. 60 IN A 10.1.2.3"
  local-data: "www.wirespan.test. 60 IN A 10.1.2.4"
  local-data: "www.wirespan.test. 60 IN AAAA 2001:db8::1"
  local-data: "mail.wirespan.test. 60 IN MX 10 mx.wirespan.test."
  local-data: "txt.wirespan.test. 60 IN TXT \\"hello wirespan\\""
  local-zone: "refused.test." refuse
  local-zone: "fail.test." transparent
stub-zone:
  name: "fail.test."
  stub-addr: 127.0.0.1@{dead}
remote-control:
  control-enable: no
""")
    proc = subprocess.Popen([UNBOUND, "-d", "-c", conf], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 20
        while not _ready(addr, 53):
            if proc.poll() is not None:
                raise RuntimeError(f"unbound exited: {proc.stderr.read().decode(errors='replace')}")  # type: ignore[union-attr]
            if time.monotonic() > deadline:
                raise TimeoutError("unbound did not answer")
            time.sleep(0.1)
        yield Unbound(addr, 53, proc, d)
    finally:
        stop(proc)
        shutil.rmtree(d, ignore_errors=True)
