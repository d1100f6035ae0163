"""A real Prometheus server (Debian's ``prometheus``) on a free loopback port, in a temp dir.

It scrapes the given targets every ``interval`` (OpenMetrics negotiated, as Prometheus does
by default, so exemplars are kept with ``--enable-feature=exemplar-storage``); ``query`` and
``query_exemplars`` use its HTTP API. Stopped by PID.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tests.support.capture import free_port, wait_port

__all__ = ["PROMETHEUS", "Prometheus", "prometheus_server"]

PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"


@dataclass
class Prometheus:
    port: int
    pid: int
    log: Path

    def api(self, path: str, **params: Any) -> Any:
        url = f"http://127.0.0.1:{self.port}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        with urllib.request.urlopen(url, timeout=10) as r:
            body = json.loads(r.read())
        if body.get("status") != "success":
            raise RuntimeError(f"prometheus {path}: {body}")
        return body["data"]

    def query(self, q: str) -> list[dict[str, Any]]:
        """An instant vector: [{"metric": {...}, "value": [ts, "v"]}, ...]."""
        return self.api("query", query=q)["result"]

    def scalar(self, q: str) -> float | None:
        r = self.query(q)
        return float(r[0]["value"][1]) if r else None

    def query_exemplars(self, q: str, start: float, end: float) -> list[dict[str, Any]]:
        return self.api("query_exemplars", query=q, start=start, end=end)

    def targets_up(self) -> bool:
        active = self.api("targets")["activeTargets"]
        return bool(active) and all(t["health"] == "up" for t in active)


@contextlib.contextmanager
def prometheus_server(targets: list[str], interval: str = "1s") -> Iterator[Prometheus]:
    d = Path(tempfile.mkdtemp(prefix="wirespan-prometheus-"))
    port = free_port()
    conf = {"global": {"scrape_interval": interval, "evaluation_interval": interval},
            "scrape_configs": [{"job_name": "wirespan", "static_configs": [{"targets": targets}]}]}
    (d / "prometheus.yml").write_text(yaml.safe_dump(conf))
    log = d / "prometheus.log"
    with open(log, "wb") as logf:
        proc = subprocess.Popen([PROMETHEUS, f"--config.file={d / 'prometheus.yml'}",
                                 f"--storage.tsdb.path={d / 'data'}", f"--web.listen-address=127.0.0.1:{port}",
                                 "--enable-feature=exemplar-storage", "--log.level=warn"],
                                stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=d)
    try:
        try:
            wait_port(port, timeout=30)
        except TimeoutError:
            raise RuntimeError(f"prometheus did not start: {log.read_text(errors='replace')}")
        p = Prometheus(port, proc.pid, log)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                p.api("status/runtimeinfo")
                break
            except OSError:
                time.sleep(0.2)
        yield p
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
        shutil.rmtree(d, ignore_errors=True)
