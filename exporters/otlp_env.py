"""The OpenTelemetry specification's ``OTEL_EXPORTER_OTLP_*`` environment variables, as defaults.

Contract: ``apply_env(values, transport)`` fills the options of an ``otlp`` (``grpc``) or
``otlphttp`` (``http``) exporter config that the config does not give, from the environment
(OTLP Exporter Configuration in the specification). An option in the config always wins; an
unset or empty variable changes nothing. The self-telemetry's periodic OTLP reader uses the
same rules (``service.selftelemetry``).

============================================  =================================================
variable                                      option
============================================  =================================================
``OTEL_EXPORTER_OTLP_ENDPOINT``               ``endpoint`` (otlphttp: the base URL, signal paths
                                              appended; otlp: ``http(s)://host:port``)
``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``        otlphttp ``traces_endpoint`` (used as is); otlp
                                              ``endpoint`` (it wins over the generic one)
``OTEL_EXPORTER_OTLP_METRICS_ENDPOINT``       otlphttp ``metrics_endpoint``
``OTEL_EXPORTER_OTLP_HEADERS`` (+ ``_TRACES``)  ``headers`` (``k=v,k2=v2``, values percent-decoded)
``OTEL_EXPORTER_OTLP_TIMEOUT`` (+ ``_TRACES``)  ``timeout`` (milliseconds)
``OTEL_EXPORTER_OTLP_COMPRESSION`` (+ ``_TRACES``)  ``compression`` (``gzip`` or ``none``)
``OTEL_EXPORTER_OTLP_INSECURE`` (+ ``_TRACES``)  otlp ``tls::insecure`` (``true``/``false``)
``OTEL_EXPORTER_OTLP_CERTIFICATE``            ``tls::ca_file``
``OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE``     ``tls::cert_file``
``OTEL_EXPORTER_OTLP_CLIENT_KEY``             ``tls::key_file``
``OTEL_EXPORTER_OTLP_PROTOCOL``               otlphttp ``encoding`` (``http/json`` -> json)
============================================  =================================================
"""

from __future__ import annotations

import os
import urllib.parse
from collections.abc import Mapping
from typing import Any, Literal

__all__ = ["apply_env", "parse_headers", "env"]

_P = "OTEL_EXPORTER_OTLP_"


def env(name: str, signal: str = "TRACES", environ: Mapping[str, str] | None = None) -> str | None:
    """``OTEL_EXPORTER_OTLP_<SIGNAL>_<name>`` if set, else ``OTEL_EXPORTER_OTLP_<name>``, else None."""
    e = os.environ if environ is None else environ
    for key in (f"{_P}{signal}_{name}", f"{_P}{name}"):
        v = e.get(key, "").strip()
        if v:
            return v
    return None


def parse_headers(text: str) -> dict[str, str]:
    """``k1=v1,k2=v2`` (the W3C baggage form the specification uses; values percent-encoded)."""
    out: dict[str, str] = {}
    for item in text.split(","):
        k, eq, v = item.partition("=")
        if eq and k.strip():
            out[urllib.parse.unquote(k.strip())] = urllib.parse.unquote(v.strip())
    return out


def _bool(v: str) -> bool:
    return v.strip().lower() == "true"


def apply_env(values: Any, transport: Literal["grpc", "http"], signal: str = "TRACES",
              environ: Mapping[str, str] | None = None) -> Any:
    """``values`` (a raw config map) with the options it lacks taken from the environment."""
    if not isinstance(values, dict):
        return values
    e = os.environ if environ is None else environ
    if not any(k.startswith(_P) for k in e):
        return values
    out = dict(values)
    if transport == "http":
        base = e.get(f"{_P}ENDPOINT", "").strip()
        if base and "endpoint" not in out:
            out["endpoint"] = base
        for sig, key in (("TRACES", "traces_endpoint"), ("METRICS", "metrics_endpoint")):
            v = e.get(f"{_P}{sig}_ENDPOINT", "").strip()
            if v and key not in out:
                out[key] = v
        proto = env("PROTOCOL", signal, e)
        if proto and "encoding" not in out:
            out["encoding"] = "json" if proto == "http/json" else "proto"
    else:
        ep = env("ENDPOINT", signal, e)
        if ep and "endpoint" not in out:
            out["endpoint"] = ep
    h = env("HEADERS", signal, e)
    if h and "headers" not in out:
        out["headers"] = parse_headers(h)
    t = env("TIMEOUT", signal, e)
    if t and "timeout" not in out:
        try:
            out["timeout"] = float(t) / 1000.0
        except ValueError:
            out["timeout"] = t   # the option's own validation names it
    comp = env("COMPRESSION", signal, e)
    if comp and "compression" not in out:
        out["compression"] = comp
    tls = dict(out.get("tls") or {}) if isinstance(out.get("tls") or {}, dict) else out.get("tls")
    if isinstance(tls, dict):
        for name, key in (("CERTIFICATE", "ca_file"), ("CLIENT_CERTIFICATE", "cert_file"),
                          ("CLIENT_KEY", "key_file")):
            v = env(name, signal, e)
            if v and key not in tls:
                tls[key] = v
        ins = env("INSECURE", signal, e)
        if transport == "grpc" and ins and "insecure" not in tls:
            tls["insecure"] = _bool(ins)
        if tls:
            out["tls"] = tls
    return out
