"""The debug and file exporters."""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

import pytest
from pydantic import ValidationError

from exporters.debug import DebugExporter
from exporters.file import FileExporter
from service import telemetry as tm
from service.model import Resource, Span, SpanKind, StatusCode, otlp_json_to_proto


def spans(n: int, name: str = "GET /x") -> list[Span]:
    res = Resource({"service.name": "shop"})
    return [Span(name, SpanKind.SERVER, 1_000_000_000 + i, 1_002_000_000 + i,
                 {"http.request.method": "GET", "http.response.status_code": 200 + i, "url.path": f"/x/{i}"},
                 resource=res, status_code=StatusCode.UNSET) for i in range(n)]


# -- debug -------------------------------------------------------------------
@pytest.mark.parametrize("verbosity", ["basic", "normal", "detailed"])
def test_debug_verbosity(verbosity: str) -> None:
    out = io.StringIO()
    e = DebugExporter("debug/t", DebugExporter.Config(verbosity=verbosity), None, stream=out)
    before = tm.counter_value(tm.EXPORTER_SENT, exporter="debug/t")
    batch = spans(3)
    e.consume_spans(batch)
    text = out.getvalue()
    if verbosity == "basic":
        assert text == "debug/t: 3 spans\n"
    elif verbosity == "normal":
        lines = text.splitlines()
        assert len(lines) == 3
        assert lines[0].startswith(batch[0].trace_id.hex()) and "SERVER" in lines[0] and "GET /x" in lines[0]
        assert "2.000ms" in lines[0]
    else:
        assert text.count("Span 'GET /x'") == 3
        assert f"Trace ID       : {batch[1].trace_id.hex()}" in text
        assert "-> url.path: '/x/2'" in text and "-> http.response.status_code: 201" in text
        assert "-> service.name: 'shop'" in text
    assert tm.counter_value(tm.EXPORTER_SENT, exporter="debug/t") - before == 3


def test_debug_default_and_typo() -> None:
    assert DebugExporter.Config().verbosity == "basic"   # the Collector's default
    with pytest.raises(ValidationError):
        DebugExporter.Config(verbosity="detialed")
    with pytest.raises(ValidationError):
        DebugExporter.Config(no_such_option=1)


def test_debug_closed_stream_is_counted_not_raised() -> None:
    out = io.StringIO()
    out.close()
    e = DebugExporter("debug/closed", DebugExporter.Config(), None, stream=out)
    e.consume_spans(spans(2))
    assert tm.counter_value(tm.EXPORTER_SEND_FAILED, exporter="debug/closed", reason="write_error") == 2


# -- file ----------------------------------------------------------------------
def make_file(tmp_path: Path, name: str = "out.jsonl", **cfg) -> FileExporter:
    return FileExporter("file/t", FileExporter.Config(path=str(tmp_path / name), **cfg))


def test_file_writes_one_otlp_request_per_line(tmp_path: Path) -> None:
    e = make_file(tmp_path)
    e.start()
    e.consume_spans(spans(2))
    e.consume_spans(spans(3, "POST /y"))
    e.shutdown()
    lines = (tmp_path / "out.jsonl").read_text().splitlines()
    assert len(lines) == 2
    reqs = [otlp_json_to_proto(line) for line in lines]       # each line an ExportTraceServiceRequest
    names = [[s.name for rs in r.resource_spans for ss in rs.scope_spans for s in ss.spans] for r in reqs]
    assert names == [["GET /x"] * 2, ["POST /y"] * 3]
    first = json.loads(lines[0])["resourceSpans"][0]
    assert first["resource"]["attributes"][0] == {"key": "service.name", "value": {"stringValue": "shop"}}
    span = first["scopeSpans"][0]["spans"][1]
    assert span["kind"] == 2 and span["startTimeUnixNano"] == "1000000001"
    assert {"key": "http.response.status_code", "value": {"intValue": "201"}} in span["attributes"]


def test_file_flushes_on_shutdown_and_by_interval(tmp_path: Path) -> None:
    e = make_file(tmp_path, flush_interval="1h")
    e.start()
    e.consume_spans(spans(1))
    assert (tmp_path / "out.jsonl").read_text() == ""     # buffered
    e.shutdown()
    assert len((tmp_path / "out.jsonl").read_text().splitlines()) == 1
    e = make_file(tmp_path, "b.jsonl", flush_interval="20ms")
    e.start()
    e.consume_spans(spans(1))
    deadline = time.monotonic() + 5
    while not (tmp_path / "b.jsonl").read_text() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert (tmp_path / "b.jsonl").read_text().count("\n") == 1
    e.shutdown()


def test_file_truncates_unless_append(tmp_path: Path) -> None:
    p = tmp_path / "out.jsonl"
    p.write_text("old line\n")
    e = make_file(tmp_path, append=True)
    e.start()
    e.consume_spans(spans(1))
    e.shutdown()
    assert p.read_text().startswith("old line\n") and p.read_text().count("\n") == 2
    e = make_file(tmp_path)
    e.start()
    e.shutdown()
    assert p.read_text() == ""


def test_file_rebuilt_by_a_reload_continues_the_file(tmp_path: Path) -> None:
    """A reload that changes a file exporter's options rebuilds it (``replacing``): the new one
    carries on in the same file; one on another path starts that file afresh."""
    p = tmp_path / "out.jsonl"
    first = make_file(tmp_path)
    first.start()
    first.consume_spans(spans(2))
    first.shutdown()
    second = make_file(tmp_path, flush_interval=0)
    second.replacing(first)
    second.start()
    second.consume_spans(spans(1))
    second.shutdown()
    assert p.read_text().count("\n") == 2                  # the first batch is still there
    other = FileExporter("file", FileExporter.Config(path=str(tmp_path / "other.jsonl")))
    (tmp_path / "other.jsonl").write_text("stale\n")
    other.replacing(second)
    other.start()
    other.shutdown()
    assert (tmp_path / "other.jsonl").read_text() == ""


def test_file_rotation_keeps_max_backups(tmp_path: Path) -> None:
    # ~0.01 MiB per file: each batch of 20 spans is ~6 KB, so every second batch rotates.
    e = make_file(tmp_path, rotation={"max_megabytes": 0.01, "max_backups": 2})
    e.start()
    written = 0
    for _ in range(10):
        e.consume_spans(spans(20))
        written += 20
    e.shutdown()
    backups = e.backups()
    assert len(backups) == 2
    for b in [*backups, tmp_path / "out.jsonl"]:
        assert b.stat().st_size <= 0.01 * 1024 * 1024
        for line in b.read_text().splitlines():
            otlp_json_to_proto(line)
    assert all(b.name.startswith("out-") and b.name.endswith(".jsonl") for b in backups)
    assert tm.counter_value(tm.EXPORTER_SENT, exporter="file/t") >= written


def test_file_config_validation(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="path"):
        FileExporter.Config()
    with pytest.raises(ValidationError, match="max_megabytes"):
        FileExporter.Config(path="x", rotation={"max_megabytes": 0})
    with pytest.raises(ValidationError, match="max_backup"):
        FileExporter.Config(path="x", rotation={"max_backup": 3})      # typo
    c = FileExporter.Config(path="x", rotation={})
    assert (c.rotation.max_megabytes, c.rotation.max_backups, c.flush_interval) == (100, 100, 1.0)


def test_file_write_error_is_counted(tmp_path: Path) -> None:
    e = make_file(tmp_path, "never.jsonl")
    e.consume_spans(spans(4))            # not started: no file handle
    assert tm.counter_value(tm.EXPORTER_SEND_FAILED, exporter="file/t", reason="not_started") >= 4
