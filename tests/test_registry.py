"""Registry: the built-in table, unavailable modules, dotted paths, and a real plugin.

The plugin (tests/plugin_pkg) is installed for real with pip into a temporary
directory (``--target``, no network: ``--no-build-isolation --no-index``),
which writes the same ``.dist-info/entry_points.txt`` an installed package
has; that directory is then put on ``sys.path``/``PYTHONPATH``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from service import config as c
from service.registry import BUILTINS, ComponentNotFound, ComponentUnavailable, Registry

ROOT = Path(__file__).resolve().parent.parent

EXPECTED_BUILTINS = {
    "receiver": {"pcap": "receivers.pcap:PcapReceiver", "live": "receivers.live:LiveReceiver",
                 "ebpf": "receivers.ebpf:EbpfReceiver"},
    "processor": {"protocols": "processors.protocols.processor:ProtocolsProcessor",
                  "batch": "processors.batch:BatchProcessor",
                  "memory_limiter": "processors.memory_limiter:MemoryLimiterProcessor",
                  "attributes": "processors.attributes:AttributesProcessor",
                  "resource": "processors.resource:ResourceProcessor",
                  "filter": "processors.filter:FilterProcessor",
                  "redaction": "processors.redaction:RedactionProcessor"},
    "exporter": {"otlp": "exporters.otlp:OtlpExporter", "otlphttp": "exporters.otlphttp:OtlpHttpExporter",
                 "file": "exporters.file:FileExporter", "debug": "exporters.debug:DebugExporter",
                 "prometheus": "exporters.prometheus:PrometheusExporter"},
    "connector": {"spanmetrics": "connectors.spanmetrics:SpanMetricsConnector",
                  "servicegraph": "connectors.servicegraph:ServiceGraphConnector"},
}


def test_builtin_table() -> None:
    assert BUILTINS == EXPECTED_BUILTINS


def test_builtins_of_this_issue_load() -> None:
    r = Registry(entry_points=False)
    for kind, typ in (("processor", "batch"), ("exporter", "debug"), ("exporter", "file")):
        cls = r.get(kind, typ)
        assert cls.type == typ and cls.kind == kind


def test_missing_module_is_unavailable_not_a_crash() -> None:
    r = Registry(entry_points=False)
    r.register("receiver", "ghost", "no_such_pkg.ghost:GhostReceiver", source="built-in")
    e = next(e for e in r.entries() if e.type == "ghost")
    assert e.status() == (False, "module 'no_such_pkg.ghost' is not installed")
    with pytest.raises(ComponentUnavailable, match='receiver type "ghost" is not available'):
        r.get("receiver", "ghost")
    # and a config that uses it gets a path-qualified error
    raw = {"receivers": {"ghost": {}}}
    with pytest.raises(c.ConfigError) as ei:
        c.validate(raw, r)
    assert any(m.startswith('receivers::ghost: receiver type "ghost" is not available') for m in ei.value.errors)


def test_import_error_inside_module_is_unavailable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "ws_broken_mod.py").write_text("import no_such_dependency_xyz\n")
    (tmp_path / "ws_raising_mod.py").write_text("raise RuntimeError('bad plugin')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    r = Registry(entry_points=False)
    r.register("exporter", "broken", "ws_broken_mod:X")
    r.register("exporter", "raising", "ws_raising_mod:X")
    ok, why = next(e for e in r.entries() if e.type == "broken").status()
    assert not ok and "no_such_dependency_xyz" in why
    ok, why = next(e for e in r.entries() if e.type == "raising").status()
    assert not ok and "failed: bad plugin" in why and "RuntimeError" not in why


def test_unknown_type_lists_known() -> None:
    r = Registry(entry_points=False)
    with pytest.raises(ComponentNotFound, match=r'unknown exporter type "nope" \(known: debug, file, otlp'):
        r.get("exporter", "nope")


def test_dotted_path_checks_the_api() -> None:
    r = Registry(entry_points=False)
    cls = r.load_class("processor", "processors.example_tag:TagProcessor")
    assert cls.__name__ == "TagProcessor"
    with pytest.raises(ComponentUnavailable, match="is a processor, not a receiver"):
        r.load_class("receiver", "processors.example_tag:TagProcessor")
    with pytest.raises(ComponentUnavailable, match="has no attribute 'Nope'"):
        r.load_class("processor", "processors.example_tag:Nope")
    with pytest.raises(ComponentUnavailable, match="not a class"):
        r.load_class("processor", "processors.example_tag:__all__")
    with pytest.raises(ComponentUnavailable, match="no pydantic Config"):
        r.load_class("processor", "builtins:dict")


@pytest.fixture(scope="module")
def plugin_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    src = tmp_path_factory.mktemp("plugin-src") / "pkg"
    shutil.copytree(ROOT / "tests" / "plugin_pkg", src)
    target = tmp_path_factory.mktemp("plugin-site")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-build-isolation", "--no-deps", "--no-index",
                    "--target", str(target), str(src)], check=True, capture_output=True, timeout=120)
    assert list(target.glob("wirespan_plugin_example-0.3.1.dist-info"))
    return target


def _env(plugin_dir: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(plugin_dir), str(ROOT)])
    return env


def test_plugin_found_by_entry_point(plugin_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(plugin_dir))
    r = Registry()
    cls = r.get("processor", "uppercase")
    assert cls.__name__ == "UppercaseProcessor"
    assert r.source("processor", "uppercase") == "wirespan-plugin-example 0.3.1"
    assert r.get("exporter", "counting").__name__ == "CountingExporter"
    # the plugin's attempt to take "batch" is ignored: the built-in stays
    assert r.source("processor", "batch") == "built-in"
    assert r.get("processor", "batch").__module__ == "processors.batch"


def test_components_command_lists_plugin_and_builtins(plugin_dir: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "service.cli", "components", "--format", "json"], cwd=ROOT,
                         env=_env(plugin_dir), capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    rows = {(r["kind"], r["type"]): r for r in json.loads(out.stdout)}
    assert rows[("processor", "uppercase")]["source"] == "wirespan-plugin-example 0.3.1"
    assert rows[("processor", "uppercase")]["available"] is True
    assert rows[("exporter", "counting")]["source"] == "wirespan-plugin-example 0.3.1"
    for kind, table in EXPECTED_BUILTINS.items():
        for typ, target in table.items():
            assert rows[(kind, typ)]["source"] == "built-in" and rows[(kind, typ)]["target"] == target
    assert rows[("exporter", "debug")]["available"] and rows[("processor", "batch")]["available"]
    text = subprocess.run([sys.executable, "-m", "service.cli", "components"], cwd=ROOT, env=_env(plugin_dir),
                          capture_output=True, text=True, timeout=60)
    assert text.returncode == 0
    line = next(ln for ln in text.stdout.splitlines() if " uppercase " in ln)
    assert line.split()[:2] == ["processor", "uppercase"] and "wirespan-plugin-example 0.3.1" in line
    for ln in text.stdout.splitlines()[1:]:
        if ln.startswith("accelerator "):  # the C accelerators (tests/test_speedups.py)
            assert ln.endswith(" in use") or " not in use: " in ln
        else:
            assert ln.endswith("available") or "unavailable (" in ln


def test_plugin_used_in_a_pipeline(plugin_dir: Path, tmp_path: Path) -> None:
    """A run whose pipeline uses both plugin components (fake finite receiver: see pipeline_fakes)."""
    out = tmp_path / "names.jsonl"
    cfg = tmp_path / "p.yaml"
    cfg.write_text(f"""
receivers:
  src: {{class: "tests.support.pipeline_fakes:FakeFiniteReceiver", events: 7, per_batch: 7}}
processors:
  ev: {{class: "tests.support.pipeline_fakes:FakeEventProcessor"}}
  uppercase: {{suffix: "!"}}
exporters:
  counting: {{path: "{out}"}}
service:
  telemetry: {{metrics: {{address: ""}}, health: {{address: ""}}}}
  pipelines:
    traces: {{receivers: [src], processors: [ev, uppercase], exporters: [counting]}}
""")
    p = subprocess.run([sys.executable, "-m", "service.cli", "run", "--config", str(cfg)], cwd=ROOT,
                       env=_env(plugin_dir), capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    names = [n for line in out.read_text().splitlines() for n in json.loads(line)]
    assert names == ["GET!"] * 7
