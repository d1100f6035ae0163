"""A real mosquitto broker on a free loopback port, in a temporary directory, stopped by PID.

Two listeners: ``port`` allows anonymous clients; ``auth_port`` requires the user
``alice`` / password ``wonderland`` (so a wrong password is a refused CONNECT).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass

from tests.support.capture import free_port, wait_port
from tests.support.proc import stop

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
MOSQUITTO_PASSWD = shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd"


@dataclass
class Broker:
    port: int
    auth_port: int


@contextlib.contextmanager
def mosquitto() -> Iterator[Broker]:
    d = tempfile.mkdtemp(prefix="wirespan-mosquitto-")
    os.chmod(d, 0o755)
    port, auth_port = free_port(), free_port()
    pw = os.path.join(d, "passwd")
    subprocess.run([MOSQUITTO_PASSWD, "-b", "-c", pw, "alice", "wonderland"], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.chmod(pw, 0o644)
    conf = os.path.join(d, "mosquitto.conf")
    with open(conf, "w") as f:
        f.write(f"""per_listener_settings true
persistence false
log_dest stderr
user root
listener {port} 127.0.0.1
allow_anonymous true
listener {auth_port} 127.0.0.1
allow_anonymous false
password_file {pw}
""")
    proc = subprocess.Popen([MOSQUITTO, "-c", conf], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_port(port)
        wait_port(auth_port)
        yield Broker(port, auth_port)
    finally:
        stop(proc)
        shutil.rmtree(d, ignore_errors=True)
