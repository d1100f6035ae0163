"""Config loading and validation: one YAML per case in tests/testdata (typo cases included).

The cases use the built-in batch/debug/file components and the runtime test
fakes (tests/support/pipeline_fakes.py) registered as ``fake_finite`` and
``fake_events``, so they do not depend on the capture receiver or parsers.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from service import config as c
from service.config import ConfigError
from service.registry import Registry
from tests.support import pipeline_fakes as fk

DATA = Path(__file__).parent / "testdata"


@pytest.fixture
def reg() -> Registry:
    r = Registry(entry_points=False)
    r.register("receiver", "fake_finite", fk.FakeFiniteReceiver)
    r.register("receiver", "fake_live", fk.FakeLiveReceiver)
    r.register("processor", "fake_events", fk.FakeEventProcessor)
    r.register("processor", "fake_spans", fk.FakeSpanProcessor)
    r.register("exporter", "recording", fk.RecordingExporter)
    return r


def errors_of(name: str, reg: Registry) -> list[str]:
    with pytest.raises(ConfigError) as ei:
        c.load([DATA / name], registry=reg)
    return ei.value.errors


# file -> the exact message expected among the errors (Collector-style paths)
ERROR_CASES = {
    "unknown_option.yaml": "exporters::debug: unknown option 'no_such_option'",
    "verbosity_typo.yaml": "exporters::debug::verbosity: Input should be 'basic', 'normal', 'detailed' or 'tree'",
    "missing_processor.yaml": 'service::pipelines::traces: references processor "x" which is not configured',
    "unknown_type.yaml": 'exporters::nosuchexporter: unknown exporter type "nosuchexporter"',
    "bad_id.yaml": "exporters::debug/: invalid name ''",
    "no_events_processor.yaml": "service::pipelines::traces: no processor turns events into spans",
    "events_processor_not_first.yaml": 'service::pipelines::traces: processor "batch" comes before "fake_events"',
    "two_events_processors.yaml": 'service::pipelines::traces: processors "fake_events" and "fake_events/2" both',
    "batch_max_below_size.yaml":
        "processors::batch: send_batch_max_size must be greater or equal to send_batch_size",
    "bad_duration.yaml": "processors::batch::timeout: invalid duration '5 minutes'",
    "unknown_section.yaml": "recievers: unknown section",
    "metrics_pipeline.yaml": 'service::pipelines::metrics: receiver "fake_finite" produces TCP events for traces',
    "no_exporter.yaml": "service::pipelines::traces: must have at least one exporter",
    "telemetry_typo.yaml": "service::telemetry::metrics: unknown option 'adress'",
    "class_not_found.yaml": "processors::mine: module 'no_such_package.module' is not installed",
    "class_wrong_kind.yaml": "processors::mine: exporters.debug:DebugExporter is an exporter, not a processor",
    "extensions.yaml": "extensions::health_check: unknown extension type",
    "empty.yaml": "service::pipelines: at least one pipeline is required",
}


@pytest.mark.parametrize("name", sorted(ERROR_CASES))
def test_error_cases(name: str, reg: Registry) -> None:
    errs = errors_of(name, reg)
    want = ERROR_CASES[name]
    assert any(e.startswith(want) for e in errs), f"{want!r} not in {errs!r}"


def test_every_testdata_file_is_a_case() -> None:
    files = {p.name for p in DATA.glob("*.yaml")}
    assert files == set(ERROR_CASES) | {"base.yaml", "override.yaml", "env.yaml", "class_processor.yaml",
                                        *REFUSED_CASES, "alias_merge.yaml"}


def test_valid_config_is_typed(reg: Registry) -> None:
    cfg = c.load([DATA / "base.yaml"], registry=reg)
    batch = cfg.processors["batch"].config
    assert (batch.timeout, batch.send_batch_size, batch.send_batch_max_size) == (1.0, 100, 0)
    assert cfg.exporters["file/out"].config.path == "spans.jsonl"
    assert cfg.exporters["debug"].source == "built-in"
    p = cfg.pipelines["traces"]
    assert (p.receivers, p.processors) == (["fake_finite"], ["fake_events", "batch"])
    assert p.exporters == ["debug", "file/out"]
    # wirespan's own defaults, not the Collector's 8888/13133 (issue 19 item 6)
    assert cfg.telemetry.metrics.address == "localhost:8898" and cfg.telemetry.health.address == "localhost:13134"


def test_all_errors_reported_at_once(reg: Registry) -> None:
    raw = c.load_raw([DATA / "base.yaml"])
    raw["exporters"]["debug"] = {"no_such_option": 1, "verbosity": "loud"}
    raw["processors"]["batch"] = {"timeout": "soon"}
    raw["service"]["pipelines"]["traces"]["processors"].append("x")
    with pytest.raises(ConfigError) as ei:
        c.validate(raw, reg)
    errs = ei.value.errors
    assert "exporters::debug: unknown option 'no_such_option'" in errs
    assert any(e.startswith("exporters::debug::verbosity:") for e in errs)
    assert any(e.startswith("processors::batch::timeout: invalid duration") for e in errs)
    assert 'service::pipelines::traces: references processor "x" which is not configured' in errs


def test_class_component_id_is_a_name(reg: Registry) -> None:
    cfg = c.load([DATA / "class_processor.yaml"], registry=reg)
    spec = cfg.processors["tagger.v1"]
    assert spec.cls.__name__ == "TagProcessor" and spec.config.value == "hello"
    assert spec.source == "class: processors.example_tag:TagProcessor"


def test_merge_maps_merged_lists_replaced(reg: Registry) -> None:
    cfg = c.load([DATA / "base.yaml", DATA / "override.yaml"], registry=reg)
    assert cfg.processors["batch"].config.timeout == pytest.approx(0.05)
    assert cfg.processors["batch"].config.send_batch_size == 100        # kept from base
    assert cfg.exporters["debug"].config.verbosity == "detailed"
    assert cfg.pipelines["traces"].exporters == ["debug"]              # list replaced
    assert cfg.pipelines["traces"].processors == ["fake_events", "batch"]


def test_set_overrides(reg: Registry) -> None:
    sets = ["processors.batch.send_batch_size=5", "processors::batch::timeout=2s",
            "exporters.file/out.path=/tmp/x.jsonl", "service.pipelines.traces.exporters=[debug]"]
    cfg = c.load([DATA / "base.yaml"], sets, registry=reg)
    assert cfg.processors["batch"].config.send_batch_size == 5
    assert cfg.processors["batch"].config.timeout == 2.0
    assert cfg.exporters["file/out"].config.path == "/tmp/x.jsonl"
    assert cfg.pipelines["traces"].exporters == ["debug"]
    for bad in ("noequals", "=1", "a..b=1"):
        with pytest.raises(ConfigError, match="--set"):
            c.apply_set({}, bad)


def test_env_expansion(monkeypatch: pytest.MonkeyPatch, reg: Registry, tmp_path: Path) -> None:
    monkeypatch.setenv("WS_TEST_EVENTS", "42")
    monkeypatch.delenv("WS_TEST_UNSET", raising=False)
    monkeypatch.setenv("WS_TEST_DIR", str(tmp_path))
    cfg = c.load([DATA / "env.yaml"], registry=reg)
    r = cfg.receivers["fake_finite"].config
    assert r.events == 42 and isinstance(r.events, int)       # a lone reference takes its YAML type
    assert r.per_batch == 3                                      # ${env:VAR:-default}
    assert cfg.exporters["file"].config.path == f"{tmp_path}/out-${{literal}}.jsonl"  # ${VAR} and $$
    assert cfg.exporters["file/here"].config.path == f"{DATA.resolve()}/here.jsonl"


def test_env_default_when_empty_and_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WS_EMPTY", "")
    monkeypatch.delenv("WS_MISSING", raising=False)
    assert c.expand({"a": "${env:WS_EMPTY:-d}", "b": "x${env:WS_MISSING}y", "c": "$$$$", "d": "a$b"}) == \
        {"a": "d", "b": "xy", "c": "$$", "d": "a$b"}
    with pytest.raises(ConfigError, match=r"exporters::x: unsupported reference \$\{file:/etc/passwd\}"):
        c.expand({"exporters": {"x": "${file:/etc/passwd}"}})
    with pytest.raises(ConfigError, match="invalid environment variable name"):
        c.expand({"a": "${env:1BAD}"})


def test_durations() -> None:
    assert c.parse_duration("200ms") == pytest.approx(0.2)
    assert c.parse_duration("1m30s") == 90.0
    assert c.parse_duration("1.5h") == 5400.0
    assert c.parse_duration("250us") == pytest.approx(250e-6)
    assert c.parse_duration(3) == 3.0 and c.parse_duration("0") == 0.0
    for bad in ("5", "ms", "1x", "", True):
        with pytest.raises(ValueError):
            c.parse_duration(bad)


def test_component_ids() -> None:
    assert c.parse_component_id("otlp") == ("otlp", "")
    assert c.parse_component_id("otlp/backend.eu") == ("otlp", "backend.eu")
    for bad in ("", "1otlp", "ot-lp", "otlp/", "otlp/a b", "x" * 64):
        with pytest.raises(ValueError):
            c.parse_component_id(bad)


def test_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        c.load_raw([tmp_path / "nope.yaml"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("receivers: [unclosed\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        c.load_raw([bad])
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="top level must be a map"):
        c.load_raw([bad])


def test_default_config_validates_with_builtins() -> None:
    """config/default.yaml names only built-ins; it must validate whenever they are present."""
    from service.cli import default_config_path
    p = default_config_path()
    assert p == Path(__file__).resolve().parent.parent / "config" / "default.yaml"
    cfg = c.load([p])
    assert cfg.pipelines["traces"].processors == ["protocols", "batch"]
    assert cfg.receivers["pcap"].config.path == str(p.parent / "samples" / "http-sample.pcap")
    assert os.path.isabs(cfg.receivers["pcap"].config.path)


# -- hostile YAML: alias bombs, recursive aliases, deep nesting, huge files (issue 20 item 6) --
#: file -> what its error says after "<path>: refused: "
REFUSED_CASES = {
    "alias_bomb.yaml": "line 8: excessive aliasing: more than 1000000 nodes come from alias expansion",
    "alias_ratio.yaml": "excessive aliasing: 74718 of 74765 nodes come from alias expansion",
    "alias_recursive.yaml": "line 5: alias *loop refers to its own anchor (recursive)",
}


@pytest.mark.parametrize("name", sorted(REFUSED_CASES))
def test_hostile_yaml_is_refused_fast_with_bounded_memory(name: str, reg: Registry) -> None:
    import time
    import tracemalloc
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        errs = errors_of(name, reg)
        elapsed = time.perf_counter() - t0
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert errs[0].startswith(f"{DATA / name}: refused: {REFUSED_CASES[name]}"), errs
    assert elapsed < 0.5 and peak < 8 << 20, (elapsed, peak)


def test_ordinary_anchors_aliases_and_merge_keys_work(reg: Registry) -> None:
    cfg = c.load([DATA / "alias_merge.yaml"], registry=reg)
    small, big = cfg.processors["batch"].config, cfg.processors["batch/big"].config
    assert (small.timeout, small.send_batch_size) == (2.0, 50)
    assert (big.timeout, big.send_batch_size) == (2.0, 500)      # merged, then overridden
    assert cfg.pipelines["traces"].exporters == cfg.pipelines["traces/2"].exporters == ["debug", "file/out"]


def test_alias_ratio_rule_is_go_yamls() -> None:
    assert c.allowed_alias_ratio(1000) == c.allowed_alias_ratio(400_000) == 0.99
    assert c.allowed_alias_ratio(2_200_000) == pytest.approx(0.545)
    assert c.allowed_alias_ratio(4_000_000) == c.allowed_alias_ratio(10**9) == 0.10
    # many aliases of a small anchor, as configs use them, are fine (ratio under 99 %)
    doc = "a: &a {x: 1, y: 2}\n" + "".join(f"k{i}: *a\n" for i in range(2000))
    assert len(c.load_yaml(doc)) == 2001
    # a large expansion under the node limit but past the ratio is not
    with pytest.raises(c.YamlLimitError, match="excessive aliasing"):
        c.load_yaml("a: &a [" + ", ".join(["x"] * 1000) + "]\nb: [" + ", ".join(["*a"] * 500) + "]\n")


@pytest.mark.parametrize("doc, want", [
    ("[" * 1_000_000, "line 1: nested deeper than 100 levels"),               # scanner, before composing
    ("a:\n" + "".join(" " * i + "b:\n" for i in range(1, 200)), "line 100: nested deeper than 100 levels"),
    ("a: &a [[[[[[[[[[x]]]]]]]]]]\n" + "".join(f"a{i}: &a{i} [*a{i - 1 if i else ''}]\n" for i in range(95)),
     "nested deeper than 100 levels (aliases expanded)"),
])
def test_deep_nesting_is_refused(doc: str, want: str) -> None:
    import time
    t0 = time.perf_counter()
    with pytest.raises(c.YamlLimitError, match=re.escape(want)):
        c.load_yaml(doc)
    assert time.perf_counter() - t0 < 0.5


def test_file_size_is_bounded(tmp_path: Path) -> None:
    big = tmp_path / "big.yaml"
    big.write_text("receivers: {}\n#" + "x" * c.MAX_CONFIG_BYTES + "\n")
    with pytest.raises(ConfigError) as ei:
        c.load_raw([big])
    assert ei.value.errors == [f"{big}: config file is larger than {c.MAX_CONFIG_BYTES} bytes; refused"]
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"receivers: \xff\xfe\n")
    with pytest.raises(ConfigError, match=f"^{re.escape(str(binary))}: not UTF-8 text"):
        c.load_raw([binary])


def test_set_and_env_values_have_the_same_limits(monkeypatch: pytest.MonkeyPatch) -> None:
    bomb = "[" + ", ".join([f"&l0 [{', '.join(['lol'] * 9)}]"]
                           + [f"&l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, 9)]) + "]"
    with pytest.raises(ConfigError) as ei:
        c.apply_set({}, f"processors.batch.x={bomb}")
    assert ei.value.errors[0].startswith("--set 'processors.batch.x': refused: line 1: excessive aliasing")
    with pytest.raises(ConfigError, match=r"^--set 'a': refused: larger than"):
        c.apply_set({}, "a=" + "x" * (c.MAX_CONFIG_BYTES + 1))
    monkeypatch.setenv("WS_BOMB", bomb)
    assert c.expand({"a": "${env:WS_BOMB}"}) == {"a": bomb}   # not a scalar: kept as text, never expanded


# -- hostile input: anything YAML can express gives a ConfigError, never another exception --
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False),
                     st.sampled_from(["", "batch", "debug", "fake_events", "fake_finite", "traces", "x/y",
                                      "${env:HOME}", "$$", "${", "200ms", "class", "pkg.mod:Cls"]),
                     st.text(max_size=8))
_keys = st.one_of(st.sampled_from(["receivers", "processors", "exporters", "service", "pipelines", "telemetry",
                                   "extensions", "batch", "debug", "fake_finite", "fake_events", "traces",
                                   "class", "timeout", "verbosity", "metrics", "address"]),
                  st.text(max_size=6), st.integers())
_values = st.recursive(_scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                         st.dictionaries(_keys, inner, max_size=4)), max_leaves=20)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=st.dictionaries(_keys, _values, max_size=5))
def test_fuzz_validate_never_crashes(raw: dict, reg: Registry) -> None:
    try:
        c.validate(c.expand(raw), reg)
    except ConfigError as e:
        assert e.errors and all(isinstance(m, str) for m in e.errors)


@pytest.mark.parametrize("ext", [True, 1, "x", [1]])
def test_extensions_not_a_map_is_an_error_not_a_crash(ext: object) -> None:
    """Found by test_fuzz_validate_never_crashes: ``extensions: true`` raised TypeError."""
    with pytest.raises(ConfigError) as e:
        c.validate({"extensions": ext})
    assert "extensions: expected a map" in e.value.errors
