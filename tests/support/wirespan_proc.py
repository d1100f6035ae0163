"""Run ``wirespan run`` as a real process with a live receiver and a ``file`` exporter.

For end-to-end tests of live receivers (``ebpf``, ``live``): the config is written to a
temp dir, the process is started, the test waits until its pipelines are running,
drives traffic, and on exit the process gets SIGTERM (by PID) and must shut down
cleanly; the spans written by the file exporter are then parsed into flat dicts.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

__all__ = ["WirespanRun", "wirespan_run"]

ROOT = Path(__file__).resolve().parents[2]


class WirespanRun:
    def __init__(self, proc: subprocess.Popen, spans_path: Path, log_path: Path) -> None:
        self.proc = proc
        self.spans_path = spans_path
        self.log_path = log_path
        self.spans: list[dict[str, Any]] = []
        self.returncode: int | None = None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def read_spans(self) -> list[dict[str, Any]]:
        """Each span as a dict: name, kind, trace_id, span_id, parent, start, end, status, attrs, resource."""
        out = []
        if not self.spans_path.exists():
            return out
        for line in self.spans_path.read_text().splitlines():
            if not line.strip():
                continue
            for rs in json.loads(line).get("resourceSpans", []):
                res = {a["key"]: _val(a["value"]) for a in rs.get("resource", {}).get("attributes", [])}
                for ss in rs.get("scopeSpans", []):
                    for s in ss.get("spans", []):
                        out.append({
                            "name": s["name"], "kind": s.get("kind"), "trace_id": s.get("traceId"),
                            "span_id": s.get("spanId"), "parent": s.get("parentSpanId", ""),
                            "start": s.get("startTimeUnixNano"), "end": s.get("endTimeUnixNano"),
                            "status": s.get("status", {}).get("code", 0),
                            "attrs": {a["key"]: _val(a["value"]) for a in s.get("attributes", [])},
                            "resource": res,
                        })
        return out


def _val(v: dict[str, Any]) -> Any:
    for k in ("stringValue", "boolValue", "doubleValue"):
        if k in v:
            return v[k]
    if "intValue" in v:
        return int(v["intValue"])
    return v


@contextlib.contextmanager
def wirespan_run(tmp_path: Path, receivers: dict[str, Any], processors: dict[str, Any] | None = None,
                 ready_timeout: float = 30.0, file_options: dict[str, Any] | None = None,
                 extra: dict[str, Any] | None = None, cli_args: list[str] | None = None) -> Iterator[WirespanRun]:
    """The config is ``tmp_path / "wirespan.yaml"`` (a test may rewrite it and send SIGHUP);
    ``file_options`` go to the file exporter (default: flush every batch, append); ``extra``
    is merged into the config last (``service.config.merge``: connectors, metrics pipelines ...);
    ``cli_args`` are added to ``wirespan run``'s command line (``--stats``)."""
    spans = tmp_path / "spans.jsonl"
    procs = processors if processors is not None else {"protocols": {}}
    cfg = {
        "receivers": receivers,
        "processors": procs,
        "exporters": {"file": {"path": str(spans), "flush_interval": "0s", "append": True, **(file_options or {})}},
        "service": {
            "pipelines": {"traces": {"receivers": list(receivers), "processors": list(procs),
                                     "exporters": ["file"]}},
            "telemetry": {"metrics": {"address": "127.0.0.1:0"}, "health": {"address": "127.0.0.1:0"}},
        },
    }
    if extra:
        from service.config import merge
        cfg = merge(cfg, extra)
    conf = tmp_path / "wirespan.yaml"
    conf.write_text(yaml.safe_dump(cfg))
    log_path = tmp_path / "wirespan.log"
    with open(log_path, "wb") as logf:
        proc = subprocess.Popen([sys.executable, "-m", "service.cli", "run", "--config", str(conf), *(cli_args or [])],
                                cwd=ROOT, stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    run = WirespanRun(proc, spans, log_path)
    try:
        deadline = time.monotonic() + ready_timeout
        while "pipelines running" not in run.log():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"wirespan did not start (rc={proc.poll()}):\n{run.log()}")
            time.sleep(0.1)
        yield run
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
        run.returncode = proc.returncode
        run.spans = run.read_spans()
