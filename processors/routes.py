"""Route templating: a URL path -> a bounded ``http.route`` (``/users/{id}/orders``).

Contract: ``Routes(config).route(path)`` gives the route of a path, or None (``unmatched:
unset``). The user's ``patterns`` are tried first, in order; a path none of them matches
follows ``unmatched``:

- ``heuristic`` (the default, as OBI's route heuristics): every segment that looks like an
  identifier becomes a placeholder: digits ``{id}``, a UUID ``{uuid}``, a hex string of 8 or
  more with a digit ``{hex}``, a long token (16 or more characters mixing digits and letters,
  base64/url-safe alphabets) ``{token}``, a segment with 4 or more digits among letters
  (``ord12345``) ``{id}``, a file named by one of these ``{id}.png``; words, ``v1``, ``api2``
  and other file names stay. Paths with more
  segments than ``max_segments`` keep the first ones and end in ``/*``.
- ``path``: the path itself (unbounded: the metrics' cardinality limit then applies);
- ``wildcard``: ``/**`` for every unmatched path;
- ``unset``: no route.

Patterns: ``/users/{id}/orders``; a segment ``{name}``, ``:name`` or ``*`` matches one
segment, a final ``**`` or ``{name...}`` the rest of the path (possibly nothing). Matching
is by segments (a trailing slash is ignored), literal segments exactly.

The one place the protocols stage (span ``http.route`` and names) and the ``spanmetrics``
connector take routes from, so a span's route and its metrics' route are the same.
Results are cached per path (bounded); a path of unbounded ids misses the cache, so the
heuristic itself is a few string tests a segment.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import Field, field_validator

from service.component import ComponentConfig

__all__ = ["RoutesConfig", "Routes", "heuristic_route", "apply_route", "HTTP_PROTOCOLS", "MAX_SEGMENTS", "CACHE_SIZE"]

#: Segments kept by the heuristic; deeper paths end in ``/*`` (a bound on the routes one service gives).
MAX_SEGMENTS = 10
#: Paths whose route is remembered (the cache is emptied when full).
CACHE_SIZE = 16384
#: A token segment: at least this long, letters and digits (base64 / url-safe alphabets).
TOKEN_MIN = 16

_UUID = re.compile(r"[0-9a-fA-F]{8}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{12}\Z")
_HEX = re.compile(r"[0-9a-fA-F]{8,}\Z")
_TOKEN = re.compile(r"[A-Za-z0-9_\-+=]{" + str(TOKEN_MIN) + r",}\Z")
_DIGITS4 = re.compile(r"(?:\D*\d){4}")
_ALNUM = re.compile(r"[A-Za-z0-9_\-]+\Z")
_PLACEHOLDER = re.compile(r"\{[^{}/]+\}\Z|:[A-Za-z_][A-Za-z0-9_]*\Z|\*\Z")


def _segment(seg: str) -> str:
    """One path segment: itself, or the placeholder of the identifier it looks like."""
    if seg.isdigit():
        return "{id}"
    if "." in seg:
        stem, _, ext = seg.rpartition(".")
        if stem and ext and "." not in stem:   # 1234.png, <uuid>.json: the name is an id
            p = _segment(stem)
            if p[0] == "{":
                return f"{p}.{ext}"
    n = len(seg)
    if n >= 8:
        if n >= 32 and _UUID.match(seg):
            return "{uuid}"
        has_digit = any(c.isdigit() for c in seg)
        if has_digit and _HEX.match(seg):
            return "{hex}"
        if n >= TOKEN_MIN and has_digit and _TOKEN.match(seg) and any(c.isalpha() for c in seg):
            return "{token}"
    if n >= 4 and _DIGITS4.match(seg) and _ALNUM.match(seg):
        return "{id}"
    return seg


def heuristic_route(path: str, max_segments: int = MAX_SEGMENTS) -> str:
    """OBI-style heuristic route of ``path`` (see the module docstring)."""
    if not path or path == "/":
        return "/"
    segs = path.split("/")
    if segs[0] == "":
        segs = segs[1:]
    if segs and segs[-1] == "":
        segs = segs[:-1]
    deep = len(segs) > max_segments
    out = [_segment(s) if s else s for s in segs[:max_segments]]
    return "/" + "/".join(out) + ("/*" if deep else "")


class RoutesConfig(ComponentConfig):
    #: Route templates tried first, in order: ``/users/{id}/orders``, ``/files/**``.
    patterns: list[str] = Field(default_factory=list)
    #: What an unmatched path becomes: heuristic, path, wildcard (``/**``) or unset (no route).
    unmatched: Literal["heuristic", "path", "wildcard", "unset"] = "heuristic"
    #: Segments the heuristic keeps (deeper paths end in ``/*``).
    max_segments: int = Field(MAX_SEGMENTS, ge=1, le=100)

    @field_validator("patterns")
    @classmethod
    def _patterns(cls, v: list[str]) -> list[str]:
        for p in v:
            if not p.startswith("/"):
                raise ValueError(f"pattern {p!r} must start with /")
            segs = [s for s in p.split("/")[1:] if s]
            for i, s in enumerate(segs):
                rest = s == "**" or (s.startswith("{") and s.endswith("...}"))
                if rest and i != len(segs) - 1:
                    raise ValueError(f"pattern {p!r}: {s} must be the last segment")
        return v


class _Pattern:
    __slots__ = ("rest", "route", "segs")

    def __init__(self, pattern: str) -> None:
        segs = [s for s in pattern.split("/")[1:] if s]
        self.rest = bool(segs) and (segs[-1] == "**" or (segs[-1].startswith("{") and segs[-1].endswith("...}")))
        if self.rest:
            segs = segs[:-1]
        # None: any one segment; a str: that literal
        self.segs: list[str | None] = [None if _PLACEHOLDER.match(s) else s for s in segs]
        self.route = pattern if pattern == "/" else pattern.rstrip("/")

    def match(self, segs: list[str]) -> bool:
        want = self.segs
        if len(segs) < len(want) or (not self.rest and len(segs) != len(want)):
            return False
        for w, s in zip(want, segs, strict=False):
            if w is not None and w != s:
                return False
        return True


class Routes:
    """Compiled routes of one ``RoutesConfig``; ``route()`` is thread-safe (a dict cache)."""

    def __init__(self, config: RoutesConfig | None = None) -> None:
        self.config = config or RoutesConfig()
        self._patterns = [_Pattern(p) for p in self.config.patterns]
        self._cache: dict[str, str | None] = {}
        self._mode = self.config.unmatched
        self._max = self.config.max_segments

    def route(self, path: str) -> str | None:
        """The route of a URL path (without its query), or None."""
        r = self._cache.get(path)
        if r is not None or path in self._cache:
            return r
        r = self._compute(path)
        cache = self._cache
        if len(cache) >= CACHE_SIZE:
            cache.clear()
        cache[path] = r
        return r

    def _compute(self, path: str) -> str | None:
        if self._patterns:
            segs = [s for s in path.split("/") if s]
            for p in self._patterns:
                if p.match(segs):
                    return p.route
        mode = self._mode
        if mode == "heuristic":
            return heuristic_route(path, self._max)
        if mode == "path":
            return path or "/"
        if mode == "wildcard":
            return "/**"
        return None


#: The protocols stage's modules whose spans are HTTP requests (templated there).
HTTP_PROTOCOLS = frozenset(("http", "http2", "fastcgi"))
_NAMES_OK = frozenset(("HTTP",))


def apply_route(routes: Routes, span: Any) -> None:
    """Give an HTTP span its ``http.route`` from ``url.path`` (unless it has one or is an RPC)
    and, when its name is only the method (or ``HTTP``), the semconv name ``{method} {route}``."""
    a = span.attributes
    if "http.route" in a or "rpc.system.name" in a:
        return
    path = a.get("url.path")
    if not isinstance(path, str):
        return
    r = routes.route(path)
    if r is None:
        return
    a["http.route"] = r
    name = span.name
    if name == a.get("http.request.method") or name in _NAMES_OK:
        span.name = f"{name} {r}"
