"""Pipeline configuration in the OpenTelemetry Collector's shape.

Contract: ``load_raw(files, sets)`` reads YAML files (merged in order: maps
merged key by key, lists and scalars replaced), expands ``${...}`` references
and applies ``--set`` overrides, giving a plain dict. ``validate(raw)`` turns
that dict into a typed ``Config``: every component's options validated by its
own pydantic model, every pipeline checked. Both raise ``ConfigError`` whose
``errors`` are path-qualified messages in the Collector's form
(``exporters::debug: unknown option 'no_such_option'``); all problems found are
reported at once, not just the first.

References (expanded in string values after YAML parsing, as the Collector does):
``${env:VAR}``, ``${env:VAR:-default}``, ``${VAR}`` (environment),
``${wirespan:config_dir}`` (directory of the file being read, so a config can
name files shipped next to it), and ``$$`` for a literal ``$``. A value that is
exactly one reference takes the referenced text's YAML type (``8192`` is an int).
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

__all__ = [
    "ConfigError",
    "Config",
    "ComponentSpec",
    "PipelineSpec",
    "TelemetryConfig",
    "Duration",
    "parse_duration",
    "parse_component_id",
    "load_raw",
    "load",
    "merge",
    "apply_set",
    "expand",
    "validate",
    "KINDS",
    "SECTIONS",
    "MAX_CONFIG_BYTES",
    "MAX_CONFIG_NODES",
    "MAX_CONFIG_DEPTH",
    "YamlLimitError",
    "load_yaml",
]

log = logging.getLogger("wirespan.config")

#: section name -> component kind (service.component constants), as a pipeline lists them.
KINDS = {"receivers": "receiver", "processors": "processor", "exporters": "exporter"}
#: Every component section: the pipeline ones and ``connectors`` (a connector is listed among a
#: pipeline's exporters and another pipeline's receivers).
SECTIONS = {**KINDS, "connectors": "connector"}
_TOP_LEVEL = ("receivers", "processors", "exporters", "connectors", "extensions", "service")
#: Pipeline types the Collector knows; wirespan carries traces and metrics.
_PIPELINE_TYPES = ("traces", "metrics", "logs")
_SUPPORTED_PIPELINES = ("traces", "metrics")

# Component id rules from the Collector (component/identifiable.go): the type
# is a letter then up to 62 letters, digits or '_'; the name is non-empty
# with no whitespace or control characters, at most 1024 characters.
_TYPE_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,62}$")
_NAME_RE = re.compile(r"^[^\s\x00-\x1f\x7f]{1,1024}$")


class ConfigError(Exception):
    """One or more configuration problems, each a path-qualified message."""

    def __init__(self, errors: list[str] | str) -> None:
        self.errors = [errors] if isinstance(errors, str) else list(errors)
        super().__init__("\n".join(self.errors))


# ---------------------------------------------------------------------------
# Durations, as Go's time.ParseDuration reads them ("200ms", "1m30s")
# ---------------------------------------------------------------------------
_DUR_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_DUR_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")


def parse_duration(value: Any) -> float:
    """A Go-style duration string (or a number of seconds) -> seconds as float."""
    if isinstance(value, bool):
        raise ValueError("a duration such as 200ms or 5s is expected")
    if isinstance(value, (int, float)):
        return float(value)
    if not isinstance(value, str):
        raise ValueError("a duration such as 200ms or 5s is expected")
    s = value.strip()
    sign = -1.0 if s.startswith("-") else 1.0
    s = s.lstrip("+-")
    if s == "0":
        return 0.0
    pos, total = 0, 0.0
    while pos < len(s):
        m = _DUR_PART.match(s, pos)
        if not m:
            raise ValueError(f"invalid duration {value!r} (use a unit: ns, us, ms, s, m, h)")
        total += float(m.group(1)) * _DUR_UNITS[m.group(2)]
        pos = m.end()
    if pos == 0:
        raise ValueError(f"invalid duration {value!r}")
    return sign * total


#: Seconds, written in config as "200ms", "5s", "1m" (or a plain number of seconds).
Duration = Annotated[float, BeforeValidator(parse_duration)]


# ---------------------------------------------------------------------------
# YAML with limits (hostile input: "billion laughs", huge or deeply nested files)
# ---------------------------------------------------------------------------
#: A config file (or a ``--set`` value) larger than this is refused before it is parsed;
#: a real pipeline is a few KiB.
MAX_CONFIG_BYTES = 4 * 1024 * 1024
#: At most this many YAML nodes (maps, lists, keys and scalars) once aliases are expanded.
MAX_CONFIG_NODES = 1_000_000
#: At most this deep, aliases expanded (a real pipeline nests under 10 levels).
MAX_CONFIG_DEPTH = 100


def allowed_alias_ratio(nodes: int) -> float:
    """The share of a document's nodes that may come from alias expansion.

    The rule of go-yaml v3, the Collector's YAML library: 99 % up to 400k nodes, down
    linearly to 10 % at 4M; it applies once more than 100 nodes come from aliases and
    the document has more than 1000 nodes.
    """
    if nodes <= 400_000:
        return 0.99
    if nodes >= 4_000_000:
        return 0.10
    return 0.99 - 0.89 * (nodes - 400_000) / 3_600_000


class YamlLimitError(yaml.YAMLError):
    """The document breaks one of the limits above (it is refused, not parsed further)."""


def _expanded(node: yaml.Node, memo: dict[int, tuple[int, int]]) -> tuple[int, int]:
    """(nodes, depth) of ``node`` with every alias expanded, without expanding anything.

    Composed nodes form a DAG (an alias is the anchored node itself), so sizes are
    memoized per node: linear in the distinct nodes, whatever the expansion. Iterative.
    """
    stack: list[tuple[yaml.Node, bool]] = [(node, False)]
    while stack:
        n, children_done = stack.pop()
        if id(n) in memo:
            continue
        if isinstance(n, yaml.ScalarNode):
            memo[id(n)] = (1, 1)
            continue
        kids = n.value if isinstance(n, yaml.SequenceNode) else [x for kv in n.value for x in kv]
        if children_done:
            sub = [memo[id(k)] for k in kids]
            memo[id(n)] = (1 + sum(k[0] for k in sub), 1 + max((k[1] for k in sub), default=0))
        else:
            stack.append((n, True))
            stack.extend((k, False) for k in kids if id(k) not in memo)
    return memo[id(node)]


class _ConfigLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses excessive aliasing, recursive aliases and deep nesting."""

    def __init__(self, stream: Any) -> None:
        super().__init__(stream)
        self._memo: dict[int, tuple[int, int]] = {}
        self._aliased = 0             # nodes reached through aliases, expanded
        self._aliases = 0             # alias occurrences
        self._depth = 0
        self._open: set[str] = set()  # anchors whose node is still being composed

    def fetch_flow_collection_start(self, TokenClass: Any) -> None:
        # The scanner's per-token work grows with the flow level ("[[[[..." is quadratic):
        # refuse here, before the composer ever sees the nodes.
        if self.flow_level >= MAX_CONFIG_DEPTH:
            raise YamlLimitError(f"line {self.line + 1}: nested deeper than {MAX_CONFIG_DEPTH} levels")
        super().fetch_flow_collection_start(TokenClass)

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        mark = event.start_mark
        where = f"line {mark.line + 1}" if mark is not None else "document"
        if isinstance(event, yaml.AliasEvent):
            if event.anchor in self._open:
                raise YamlLimitError(f"{where}: alias *{event.anchor} refers to its own anchor (recursive)")
            target = self.anchors.get(event.anchor)
            if target is not None:
                size, depth = _expanded(target, self._memo)
                self._aliases += 1
                self._aliased += size
                if self._aliased > MAX_CONFIG_NODES:
                    raise YamlLimitError(f"{where}: excessive aliasing: more than {MAX_CONFIG_NODES} nodes "
                                         f"come from alias expansion")
                if self._depth + depth > MAX_CONFIG_DEPTH:
                    raise YamlLimitError(f"{where}: nested deeper than {MAX_CONFIG_DEPTH} levels "
                                         f"(aliases expanded)")
            return super().compose_node(parent, index)
        if self._depth >= MAX_CONFIG_DEPTH:
            raise YamlLimitError(f"{where}: nested deeper than {MAX_CONFIG_DEPTH} levels")
        anchor = getattr(event, "anchor", None)
        if anchor is not None:
            self._open.add(anchor)
        self._depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1
            if anchor is not None:
                self._open.discard(anchor)

    def compose_document(self) -> Any:
        node = super().compose_document()
        if node is not None and self._aliases:
            total, _ = _expanded(node, self._memo)
            if total > MAX_CONFIG_NODES:
                raise YamlLimitError(f"document has {total} nodes with aliases expanded "
                                     f"(at most {MAX_CONFIG_NODES})")
            if (self._aliased > 100 and total > 1000
                    and self._aliased / total > allowed_alias_ratio(total)):
                raise YamlLimitError(f"excessive aliasing: {self._aliased} of {total} nodes come from "
                                     f"alias expansion")
        return node


def load_yaml(text: str) -> Any:
    """``yaml.safe_load`` within the limits above; raises ``yaml.YAMLError`` (``YamlLimitError``)."""
    if len(text) > MAX_CONFIG_BYTES:
        raise YamlLimitError(f"larger than {MAX_CONFIG_BYTES} bytes")
    return yaml.load(text, Loader=_ConfigLoader)  # a SafeLoader subclass: safe


# ---------------------------------------------------------------------------
# Reading, expanding, merging
# ---------------------------------------------------------------------------
_REF = re.compile(r"\$\$|\$\{([^}]*)\}")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _resolve_ref(body: str, path: str, config_dir: str) -> str:
    scheme, sep, rest = body.partition(":")
    if not sep:  # ${VAR}
        scheme, rest = "env", body
    if scheme == "env":
        name, dsep, default = rest.partition(":-")
        if not _ENV_NAME.match(name):
            raise ConfigError(f"{path}: invalid environment variable name {name!r} in ${{{body}}}")
        val = os.environ.get(name)
        if val is None or (dsep and val == ""):
            if dsep:
                return default
            log.warning("%s: environment variable %s is not set; using an empty string", path, name)
            return ""
        return val
    if scheme == "wirespan" and rest == "config_dir":
        return config_dir
    raise ConfigError(f"{path}: unsupported reference ${{{body}}} (use ${{env:VAR}}, ${{env:VAR:-default}}, "
                      f"${{VAR}} or ${{wirespan:config_dir}}; $$ for a literal $)")


def _expand_str(s: str, path: str, config_dir: str) -> Any:
    if "$" not in s:
        return s
    m = _REF.fullmatch(s)
    if m and m.group(0) != "$$":
        text = _resolve_ref(m.group(1), path, config_dir)
        # The Collector gives a lone reference the YAML type of its text.
        try:
            typed = load_yaml(text) if text else text
        except yaml.YAMLError:
            return text
        return typed if isinstance(typed, (str, int, float, bool)) else text
    return _REF.sub(lambda mm: "$" if mm.group(0) == "$$" else _resolve_ref(mm.group(1), path, config_dir), s)


def expand(value: Any, config_dir: str = ".", path: str = "") -> Any:
    """Expand ``${...}`` references and ``$$`` in every string value (not keys)."""
    if isinstance(value, dict):
        return {k: expand(v, config_dir, f"{path}::{k}" if path else str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [expand(v, config_dir, f"{path}::{i}") for i, v in enumerate(value)]
    if isinstance(value, str):
        return _expand_str(value, path, config_dir)
    return value


def merge(base: Any, over: Any) -> Any:
    """Maps merged key by key (recursively); anything else in ``over`` replaces ``base``."""
    if isinstance(base, dict) and isinstance(over, dict):
        out = dict(base)
        for k, v in over.items():
            out[k] = merge(base[k], v) if k in base else v
        return out
    return over


def read_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """One YAML file, expanded. An empty file is an empty config."""
    p = Path(path)
    try:
        with p.open("rb") as f:
            blob = f.read(MAX_CONFIG_BYTES + 1)  # bounded, even for a FIFO or /dev/zero
    except OSError as e:
        raise ConfigError(f"cannot read config file {str(path)!r}: {e.strerror or e}")
    if len(blob) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: config file is larger than {MAX_CONFIG_BYTES} bytes; refused")
    try:
        text = blob.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text: {e}")
    try:
        data = load_yaml(text)
    except YamlLimitError as e:
        raise ConfigError(f"{path}: refused: {e}")
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}")
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a map (receivers:, processors:, ...)")
    return expand(data, str(p.resolve().parent))


def apply_set(raw: dict[str, Any], assignment: str) -> dict[str, Any]:
    """Apply one ``--set key.path=value`` (``::`` may separate keys instead of ``.``,
    for ids whose name contains a dot). The value is read as YAML: ``8192`` is an
    int, ``[a, b]`` a list."""
    key, eq, text = assignment.partition("=")
    key = key.strip()
    if not eq or not key:
        raise ConfigError(f"--set {assignment!r}: expected key.path=value")
    parts = key.split("::") if "::" in key else key.split(".")
    if any(not p for p in parts):
        raise ConfigError(f"--set {assignment!r}: empty key in {key!r}")
    try:
        value = load_yaml(text) if text.strip() else ""
    except YamlLimitError as e:
        raise ConfigError(f"--set {key!r}: refused: {e}")
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {assignment!r}: invalid value: {e}")
    value = expand(value, os.getcwd(), "::".join(parts))
    patch: Any = value
    for p in reversed(parts):
        patch = {p: patch}
    return merge(raw, patch)


def load_raw(files: list[str | os.PathLike[str]], sets: list[str] | None = None) -> dict[str, Any]:
    """Read, expand and merge ``files`` in order, then apply ``sets``."""
    raw: dict[str, Any] = {}
    for f in files:
        raw = merge(raw, read_file(f))
    for s in sets or ():
        raw = apply_set(raw, s)
    return raw


def load(files: list[str | os.PathLike[str]], sets: list[str] | None = None, registry: Any = None) -> Config:
    return validate(load_raw(files, sets), registry)


# ---------------------------------------------------------------------------
# Typed config
# ---------------------------------------------------------------------------
class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


#: wirespan's own telemetry ports, one off the Collector's (8888 metrics, 13133 health_check):
#: the Collector is the usual neighbour, and a default that collides with it fails first.
DEFAULT_METRICS_ADDRESS = "localhost:8898"
DEFAULT_HEALTH_ADDRESS = "localhost:13134"


class PrometheusPullConfig(_Strict):
    host: str = "localhost"
    port: int = Field(8898, ge=0, le=65535)
    path: str = "/metrics"


class PullExporterConfig(_Strict):
    prometheus: PrometheusPullConfig


class PullReaderConfig(_Strict):
    #: A Prometheus endpoint serving the self-metrics (the ``address:`` shorthand's reader).
    exporter: PullExporterConfig


class OtlpPushConfig(_Strict):
    #: grpc or http/protobuf (default: OTEL_EXPORTER_OTLP_METRICS_PROTOCOL / _PROTOCOL, else http/protobuf).
    protocol: Literal["grpc", "http/protobuf"] | None = None
    #: gRPC: http(s)://host:port; HTTP: the URL (``/v1/metrics`` added to one without a path).
    #: Default: OTEL_EXPORTER_OTLP_METRICS_ENDPOINT / OTEL_EXPORTER_OTLP_ENDPOINT, else localhost.
    endpoint: str | None = None
    #: A map, or the Collector's list of {name, value} (default: OTEL_EXPORTER_OTLP_HEADERS).
    headers: dict[str, str] | list[dict[str, str]] | None = None
    compression: Literal["gzip", "none"] | None = None
    #: Milliseconds a request may take (default: OTEL_EXPORTER_OTLP_TIMEOUT, else 10000).
    timeout: int | None = Field(None, ge=1)
    #: gRPC without TLS (default: by the endpoint's scheme, or OTEL_EXPORTER_OTLP_INSECURE).
    insecure: bool | None = None

    def header_map(self) -> dict[str, str] | None:
        h = self.headers
        if isinstance(h, list):
            return {str(x.get("name")): str(x.get("value", "")) for x in h}
        return h


class PushExporterConfig(_Strict):
    otlp: OtlpPushConfig


class PeriodicReaderConfig(_Strict):
    #: Milliseconds between exports (the Collector's, the SDK's default: 60000).
    interval: int = Field(60000, ge=100)
    #: Milliseconds an export may take.
    timeout: int = Field(30000, ge=1)
    exporter: PushExporterConfig


class MetricReaderConfig(_Strict):
    """One reader, as the Collector's ``service::telemetry::metrics::readers`` entries."""

    pull: PullReaderConfig | None = None
    periodic: PeriodicReaderConfig | None = None

    @model_validator(mode="after")
    def _one(self) -> MetricReaderConfig:
        if (self.pull is None) == (self.periodic is None):
            raise ValueError("a reader is exactly one of pull or periodic")
        return self


class MetricsTelemetry(_Strict):
    #: host:port of the Prometheus endpoint; "" turns it off. Shorthand for one pull reader.
    address: str = DEFAULT_METRICS_ADDRESS
    path: str = "/metrics"
    #: "none" turns every reader off; the Collector's other levels are accepted and
    #: currently export the same set.
    level: Literal["none", "basic", "normal", "detailed"] = "normal"
    #: The Collector's form: pull (Prometheus) and periodic (OTLP) readers; instead of ``address``.
    readers: list[MetricReaderConfig] | None = None

    @model_validator(mode="after")
    def _address_or_readers(self) -> MetricsTelemetry:
        if self.readers is not None and "address" in self.model_fields_set:
            raise ValueError("give address (one Prometheus endpoint) or readers, not both")
        return self

    def pull_endpoints(self) -> list[tuple[str, str]]:
        """(host:port, path) of each Prometheus endpoint to serve."""
        if self.level == "none":
            return []
        if self.readers is None:
            return [(self.address, self.path)] if self.address else []
        out = []
        for r in self.readers:
            if r.pull is not None:
                pr = r.pull.exporter.prometheus
                host = f"[{pr.host}]" if ":" in pr.host else pr.host
                out.append((f"{host}:{pr.port}", pr.path))
        return out

    def periodic_readers(self) -> list[PeriodicReaderConfig]:
        if self.level == "none" or self.readers is None:
            return []
        return [r.periodic for r in self.readers if r.periodic is not None]


class HealthTelemetry(_Strict):
    #: host:port of the health endpoint; "" turns it off.
    address: str = DEFAULT_HEALTH_ADDRESS
    path: str = "/"


class LogsTelemetry(_Strict):
    level: Literal["debug", "info", "warn", "warning", "error"] = "info"
    encoding: Literal["console", "json"] = "console"


class TelemetryConfig(_Strict):
    metrics: MetricsTelemetry = Field(default_factory=MetricsTelemetry)
    health: HealthTelemetry = Field(default_factory=HealthTelemetry)
    logs: LogsTelemetry = Field(default_factory=LogsTelemetry)


@dataclass
class ComponentSpec:
    """A configured component: what the pipeline needs to build it."""

    kind: str            # receiver | processor | exporter | connector
    id: str              # as written in config: "type[/name]" or, with class:, any name
    cls: type
    config: Any          # an instance of cls.Config
    source: str          # "built-in", a plugin's distribution, or "class: pkg.mod:Cls"

    @property
    def path(self) -> str:
        return f"{self.kind}s::{self.id}"


@dataclass
class PipelineSpec:
    id: str
    receivers: list[str]
    processors: list[str]
    exporters: list[str]

    @property
    def signal(self) -> str:
        """The pipeline type: ``traces`` or ``metrics`` (the id's type part)."""
        return self.id.partition("/")[0]


@dataclass
class Config:
    receivers: dict[str, ComponentSpec] = field(default_factory=dict)
    processors: dict[str, ComponentSpec] = field(default_factory=dict)
    exporters: dict[str, ComponentSpec] = field(default_factory=dict)
    connectors: dict[str, ComponentSpec] = field(default_factory=dict)
    pipelines: dict[str, PipelineSpec] = field(default_factory=dict)
    telemetry: TelemetryConfig = field(default_factory=TelemetryConfig)
    raw: dict[str, Any] = field(default_factory=dict)

    def section(self, kind: str) -> dict[str, ComponentSpec]:
        return {"receiver": self.receivers, "processor": self.processors, "exporter": self.exporters,
                "connector": self.connectors}[kind]


def parse_component_id(cid: Any) -> tuple[str, str]:
    """``"type/name"`` -> (type, name); raises ValueError with the Collector's rules."""
    if not isinstance(cid, str) or not cid.strip():
        raise ValueError("id must be a non-empty string")
    typ, sep, name = cid.partition("/")
    if not _TYPE_RE.match(typ):
        raise ValueError(f"invalid type {typ!r}: a letter then letters, digits or '_' (at most 63)")
    if sep and not _NAME_RE.match(name):
        raise ValueError(f"invalid name {name!r}: non-empty, no spaces or control characters")
    return typ, name


def pydantic_errors(prefix: str, exc: ValidationError) -> list[str]:
    """Pydantic errors as Collector-style messages under ``prefix``."""
    out = []
    for e in exc.errors():
        loc = [str(x) for x in e["loc"]]
        msg = e["msg"]
        for p in ("Value error, ", "Assertion failed, "):
            if msg.startswith(p):
                msg = msg[len(p):]
        if e["type"] == "extra_forbidden" and loc:
            where = "::".join([prefix, *loc[:-1]])
            out.append(f"{where}: unknown option '{loc[-1]}'")
        else:
            out.append(f"{'::'.join([prefix, *loc])}: {msg}")
    return out


def _yaml_kind(value: Any) -> str:
    """What a YAML value is, in YAML's words (not Python's class names)."""
    if isinstance(value, bool):
        return f"a boolean ({str(value).lower()})"
    if isinstance(value, (int, float)):
        return f"a number ({value})"
    if isinstance(value, str):
        return f"a string ({value!r})"
    if isinstance(value, list):
        return "a list"
    return "a scalar"


def _component(kind: str, section: str, cid: Any, body: Any, registry: Any, errors: list[str]) -> ComponentSpec | None:
    path = f"{section}::{cid}"
    if body is None:
        body = {}
    if not isinstance(body, dict):
        errors.append(f"{path}: expected a map of options, got {_yaml_kind(body)}")
        return None
    body = dict(body)
    target = body.pop("class", None)
    from service.registry import ComponentNotFound, ComponentUnavailable
    try:
        if target is not None:
            # With class:, the id is only a name (any non-empty name without spaces).
            if not isinstance(cid, str) or not _NAME_RE.match(cid):
                errors.append(f"{path}: invalid component name")
                return None
            if not isinstance(target, str):
                errors.append(f"{path}::class: expected 'package.module:ClassName'")
                return None
            cls, source = registry.load_class(kind, target), f"class: {target}"
        else:
            try:
                typ, _ = parse_component_id(cid)
            except ValueError as e:
                errors.append(f"{path}: {e}")
                return None
            cls, source = registry.get(kind, typ), registry.source(kind, typ)
    except (ComponentNotFound, ComponentUnavailable) as e:
        errors.append(f"{path}: {e}")
        return None
    try:
        cfg = cls.Config.model_validate(body)
    except ValidationError as e:
        errors.extend(pydantic_errors(path, e))
        return None
    return ComponentSpec(kind=kind, id=cid, cls=cls, config=cfg, source=source)


def _id_list(path: str, value: Any, errors: list[str]) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(x, str) for x in value):
        errors.append(f"{path}: expected a list of component ids")
        return []
    return value


def validate(raw: dict[str, Any], registry: Any = None) -> Config:
    """Check a merged raw config and build the typed ``Config``.

    Raises:
        ConfigError: with every problem found, each naming its path.
    """
    if registry is None:
        from service.registry import default_registry
        registry = default_registry()
    errors: list[str] = []
    cfg = Config(raw=raw)
    if not isinstance(raw, dict):
        raise ConfigError("the top level must be a map (receivers:, processors:, ...)")
    for key in raw:
        if key not in _TOP_LEVEL:
            errors.append(f"{key}: unknown section (expected one of: {', '.join(_TOP_LEVEL)})")

    for section, kind in SECTIONS.items():
        comps = raw.get(section) or {}
        if not isinstance(comps, dict):
            errors.append(f"{section}: expected a map of component id -> options")
            continue
        for cid, body in comps.items():
            spec = _component(kind, section, cid, body, registry, errors)
            if spec is not None:
                cfg.section(kind)[cid] = spec
    ext = raw.get("extensions") or {}
    if not isinstance(ext, dict):
        errors.append("extensions: expected a map")
        ext = {}
    for eid in ext:
        errors.append(f"extensions::{eid}: unknown extension type (wirespan has no extensions yet)")

    svc = raw.get("service")
    if svc is None:
        svc = {}
    if not isinstance(svc, dict):
        errors.append("service: expected a map (pipelines:, telemetry:)")
        svc = {}
    for key in svc:
        if key not in ("pipelines", "telemetry", "extensions"):
            errors.append(f"service: unknown option '{key}'")
    if svc.get("extensions"):
        errors.append("service::extensions: wirespan has no extensions yet")
    try:
        cfg.telemetry = TelemetryConfig.model_validate(svc.get("telemetry") or {})
    except ValidationError as e:
        errors.extend(pydantic_errors("service::telemetry", e))

    pipes = svc.get("pipelines")
    if not pipes:
        errors.append("service::pipelines: at least one pipeline is required")
        pipes = {}
    if not isinstance(pipes, dict):
        errors.append("service::pipelines: expected a map of pipeline id -> pipeline")
        pipes = {}
    configured = {kind: (raw.get(section) or {}) if isinstance(raw.get(section) or {}, dict) else {}
                  for section, kind in SECTIONS.items()}
    for cid in configured["connector"]:
        for kind in ("receiver", "exporter"):
            if cid in configured[kind]:
                errors.append(f"connectors::{cid}: ambiguous id: {cid} is also configured as {kind}")
    used_as: dict[str, set[str]] = {cid: set() for cid in configured["connector"]}
    for pid, body in pipes.items():
        path = f"service::pipelines::{pid}"
        try:
            ptype, _ = parse_component_id(pid)
        except ValueError as e:
            errors.append(f"{path}: {e}")
            continue
        if ptype not in _PIPELINE_TYPES:
            errors.append(f"{path}: unknown pipeline type {ptype!r} (expected traces or metrics)")
            continue
        if ptype not in _SUPPORTED_PIPELINES:
            errors.append(f"{path}: {ptype} pipelines are not supported; wirespan produces traces and metrics")
            continue
        if not isinstance(body, dict):
            errors.append(f"{path}: expected a map (receivers:, processors:, exporters:)")
            continue
        for key in body:
            if key not in ("receivers", "processors", "exporters"):
                errors.append(f"{path}: unknown option '{key}'")
        lists = {s: _id_list(f"{path}::{s}", body.get(s), errors) for s in KINDS}
        before = len(errors)
        for section, kind in KINDS.items():
            seen: set[str] = set()
            for cid in lists[section]:
                if kind != "processor" and cid in configured["connector"]:
                    _check_connector_use(path, ptype, kind, cid, cfg.connectors.get(cid), errors)
                    used_as[cid].add(f"{kind}:{ptype}")
                elif cid not in configured[kind]:
                    errors.append(f'{path}: references {kind} "{cid}" which is not configured')
                else:
                    _check_signal(path, ptype, kind, cid, cfg.section(kind).get(cid), errors)
                if cid in seen:
                    errors.append(f'{path}: references {kind} "{cid}" multiple times')
                seen.add(cid)
        if not lists["receivers"]:
            errors.append(f"{path}: must have at least one receiver")
        if not lists["exporters"]:
            errors.append(f"{path}: must have at least one exporter")
        if len(errors) == before and ptype == "traces":
            _check_chain(path, [cfg.processors.get(p) for p in lists["processors"]], lists["processors"], errors)
        cfg.pipelines[pid] = PipelineSpec(pid, lists["receivers"], lists["processors"], lists["exporters"])
    for cid, uses in used_as.items():
        spec = cfg.connectors.get(cid)
        if spec is None:
            continue
        src, dst = getattr(spec.cls, "connects", ("traces", "metrics"))
        if f"exporter:{src}" not in uses or f"receiver:{dst}" not in uses:
            errors.append(f"connectors::{cid}: must be used as an exporter of a {src} pipeline and as a receiver "
                          f"of a {dst} pipeline")

    if errors:
        raise ConfigError(errors)
    return cfg


def _check_connector_use(path: str, ptype: str, kind: str, cid: str, spec: ComponentSpec | None,
                         errors: list[str]) -> None:
    """A connector listed by a pipeline: among its exporters it must take the pipeline's type,
    among its receivers it must produce it."""
    if spec is None:
        return  # its own error is reported already
    src, dst = getattr(spec.cls, "connects", ("traces", "metrics"))
    if kind == "exporter" and ptype != src:
        errors.append(f'{path}: connector "{cid}" takes {src}; it cannot export from a {ptype} pipeline')
    if kind == "receiver" and ptype != dst:
        errors.append(f'{path}: connector "{cid}" produces {dst}; it cannot be a receiver of a {ptype} pipeline')


def _check_signal(path: str, ptype: str, kind: str, cid: str, spec: ComponentSpec | None,
                  errors: list[str]) -> None:
    """A receiver, processor or exporter must handle the pipeline's type."""
    if spec is None:
        return
    if kind == "receiver":
        if ptype != "traces":
            errors.append(f'{path}: receiver "{cid}" produces TCP events for traces pipelines; a {ptype} '
                          f"pipeline's receivers are connectors (e.g. spanmetrics)")
        return
    if kind == "processor":
        consumes = getattr(spec.cls, "consumes", None)
        signals = ("metrics",) if consumes == "metrics" else getattr(spec.cls, "signals", ("traces",))
    else:
        signals = getattr(spec.cls, "signals", ("traces",))
    if ptype not in signals:
        errors.append(f'{path}: {kind} "{cid}" does not support {ptype} (it takes: {", ".join(signals)})')


def _check_chain(path: str, specs: list[ComponentSpec | None], ids: list[str], errors: list[str]) -> None:
    """Events must become spans exactly once, before every span processor."""
    if any(s is None for s in specs):
        return  # the component's own error is reported already
    kinds = [getattr(s.cls, "consumes", None) for s in specs]  # type: ignore[union-attr]
    events = [i for i, k in enumerate(kinds) if k == "events"]
    if not events:
        errors.append(f"{path}: no processor turns events into spans; the processors must start with "
                      f'exactly one such processor (e.g. "protocols")')
        return
    if len(events) > 1:
        errors.append(f'{path}: processors "{ids[events[0]]}" and "{ids[events[1]]}" both turn events into '
                      f"spans; exactly one is allowed, first in the chain")
        return
    if events[0] != 0:
        errors.append(f'{path}: processor "{ids[0]}" comes before "{ids[events[0]]}", which turns events into '
                      f"spans; it must be first in the chain")
        return
    for i, k in enumerate(kinds[1:], 1):
        if k != "spans":
            errors.append(f'{path}: processor "{ids[i]}" does not consume spans (consumes={k!r})')
