"""Credentials over plaintext: what the ``otlp`` and ``otlphttp`` exporters refuse without consent.

Contract: ``plaintext_credentials(headers, endpoint, plaintext, proxy_url)`` names every credential the
exporter would send unencrypted to a host off this machine, or returns an empty
list. A credential is

- a header (gRPC metadata) with a non-empty value whose name, case-insensitive,
  is one of ``CREDENTIAL_HEADERS`` or contains one of ``CREDENTIAL_HEADER_PARTS``
  (``authorization``, ``x-api-key``, ``x-sf-token``, ``lightstep-access-token``...),
- a user name or password in a URL (``http://user:pass@host``): the endpoint, or
  a proxy.

Loopback destinations are exempt: ``127.0.0.0/8``, ``::1`` (also as an
IPv4-mapped address), ``localhost`` and names under ``.localhost`` (RFC 6761).
Config validation refuses the rest unless ``tls::insecure_credentials: true`` is
set (gRPC's credentials API likewise refuses call credentials on an insecure
channel); with it, the exporter logs one warning at start naming its id.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from urllib.parse import urlsplit

__all__ = ["CREDENTIAL_HEADERS", "CREDENTIAL_HEADER_PARTS", "is_credential_header", "is_loopback",
           "split_host", "plaintext_credentials", "consent_error"]

#: Header names that carry a credential although no part below says so (vendors' API-key headers).
CREDENTIAL_HEADERS = frozenset({
    "authorization", "proxy-authorization", "cookie", "x-honeycomb-team", "x-goog-iam-authority-selector",
    "dd-api-key", "signalfx-access-token",
})
#: A header whose name contains one of these is a credential too (``x-api-key``, ``x-sf-token``,
#: ``lightstep-access-token``, ``x-auth-token``, ``x-client-secret``, ``x-scope-password``...).
CREDENTIAL_HEADER_PARTS = ("auth", "token", "secret", "passw", "api-key", "api_key", "apikey", "credential",
                           "session", "license-key", "access-key")


def is_credential_header(name: str) -> bool:
    n = name.strip().lower()
    return n in CREDENTIAL_HEADERS or any(p in n for p in CREDENTIAL_HEADER_PARTS)


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 (IPv4-mapped too), localhost and *.localhost; anything else is not."""
    h = host.strip().strip("[]").rstrip(".").lower()
    if h == "localhost" or h.endswith(".localhost"):
        return True
    try:
        ip = ipaddress.ip_address(h.split("%", 1)[0])  # drop an IPv6 zone
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def split_host(authority: str) -> tuple[str, str | None]:
    """``user:pw@host:port`` -> (host, userinfo or None); IPv6 in brackets."""
    userinfo, at, hostport = authority.rpartition("@")
    if hostport.startswith("["):
        host = hostport[1:].partition("]")[0]
    else:
        host = hostport.rsplit(":", 1)[0] if hostport.count(":") == 1 else hostport
    return host, (userinfo if at else None)


def _authority(where: str) -> tuple[str, str | None]:
    return split_host(urlsplit(where).netloc if "://" in where else where)


def plaintext_credentials(headers: Mapping[str, str], endpoint: str, plaintext: bool,
                          proxy_url: str | None = None) -> list[str]:
    """What would travel in plaintext off this machine, as short descriptions (empty: nothing).

    ``endpoint``: a URL or host:port, ``plaintext``: whether requests to it are unencrypted.
    A plaintext request exposes its headers and the endpoint's userinfo (sent as Basic auth)
    on every hop: the endpoint and, when given, the proxy. The proxy's own userinfo is
    exposed when the proxy URL is ``http://`` (whatever the endpoint's scheme).
    """
    found: list[str] = []
    host, userinfo = _authority(endpoint)
    phost, puser = _authority(proxy_url) if proxy_url else (None, None)
    if plaintext:
        exposed = [h for h in (host, phost) if h is not None and not is_loopback(h)]
        names = sorted({k.strip().lower() for k, v in headers.items() if v and is_credential_header(k)})
        if exposed and names:
            found.append(f"header{'s' if len(names) > 1 else ''} {', '.join(names)} to {exposed[0]}")
        if exposed and userinfo:
            found.append(f"the user name/password of the endpoint to {exposed[0]}")
    if phost is not None and puser and proxy_url and proxy_url.startswith("http://") and not is_loopback(phost):
        found.append(f"the user name/password of proxy_url to {phost}")
    return found


def consent_error(found: list[str]) -> str:
    return (f"credentials would be sent in plaintext: {'; '.join(found)}. Use TLS, or set "
            f"tls::insecure_credentials: true to accept that anyone on the path can read them")
