"""A real RabbitMQ (Debian's ``rabbitmq-server``) on free loopback ports, in a temporary
directory, stopped by PID, with the ``rabbitmq_amqp1_0`` plugin (AMQP 1.0 on the same port).

Erlang's port mapper is started here too, on a free port of its own (``epmd -port``, in the
foreground, not as a daemon), so nothing outlives the test: both are stopped by their PIDs.
The default user ``guest`` / ``guest`` may log in from loopback; a wrong password is refused.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass

from tests.support.capture import free_port, wait_port
from tests.support.proc import stop

RABBITMQ_SERVER = "/usr/lib/rabbitmq/bin/rabbitmq-server"
EPMD = shutil.which("epmd") or "/usr/bin/epmd"


@dataclass
class Rabbit:
    port: int
    proc: subprocess.Popen

    @property
    def pid(self) -> int:
        return self.proc.pid


def available() -> bool:
    return os.path.exists(RABBITMQ_SERVER) and os.path.exists(EPMD)


@contextlib.contextmanager
def rabbitmq(timeout: float = 90.0) -> Iterator[Rabbit]:
    d = tempfile.mkdtemp(prefix="wirespan-rabbitmq-")
    port, dist, epmd_port = free_port(), free_port(), free_port()
    with open(f"{d}/enabled_plugins", "w") as f:
        f.write("[rabbitmq_amqp1_0].\n")
    with open(f"{d}/rabbitmq.conf", "w") as f:
        f.write(f"listeners.tcp.default = 127.0.0.1:{port}\nloopback_users.guest = true\n"
                "log.console = true\nlog.file = false\n")
    env = dict(os.environ, HOME=d, ERL_EPMD_PORT=str(epmd_port), RABBITMQ_NODENAME=f"wirespan{port}@localhost",
               RABBITMQ_NODE_IP_ADDRESS="127.0.0.1", RABBITMQ_NODE_PORT=str(port), RABBITMQ_DIST_PORT=str(dist),
               RABBITMQ_MNESIA_BASE=f"{d}/mnesia", RABBITMQ_LOG_BASE=f"{d}/log", RABBITMQ_CONFIG_FILE=f"{d}/rabbitmq",
               RABBITMQ_ENABLED_PLUGINS_FILE=f"{d}/enabled_plugins", RABBITMQ_PID_FILE=f"{d}/rabbit.pid",
               RABBITMQ_ADVANCED_CONFIG_FILE=f"{d}/advanced.config", RABBITMQ_CONF_ENV_FILE=f"{d}/env")
    epmd = subprocess.Popen([EPMD, "-port", str(epmd_port)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    proc = None
    try:
        wait_port(epmd_port)
        proc = subprocess.Popen([RABBITMQ_SERVER], env=env, cwd=d, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        wait_port(port, timeout=timeout)
        time.sleep(0.5)  # the listener is up a little before the broker takes logins
        yield Rabbit(port, proc)
    finally:
        stop(proc, timeout=30)
        stop(epmd)
        shutil.rmtree(d, ignore_errors=True)
