"""The one exception family of the protocol parsers.

Parsers raise these for bad input; the protocols processor catches them at a
single boundary, counts a drop with ``reason`` and resynchronises or abandons
the connection. Any other exception escaping a parser is a bug: it is caught
too (the service never dies of input), counted as ``internal_error`` and
logged with a traceback.
"""

from __future__ import annotations


class ProtocolError(Exception):
    """Input the parser cannot accept. ``reason`` is a short metric label."""

    reason = "malformed"

    def __init__(self, protocol: str, reason: str | None = None, offset: int = -1, detail: str = "") -> None:
        self.protocol = protocol
        if reason is not None:
            self.reason = reason
        self.offset = offset
        self.detail = detail
        super().__init__(f"{protocol}: {self.reason}" + (f" at {offset}" if offset >= 0 else "")
                         + (f": {detail}" if detail else ""))


class Malformed(ProtocolError):
    """Bytes that violate the protocol's grammar."""

    reason = "malformed"


class LimitExceeded(ProtocolError):
    """Well-formed so far, but past a configured or hard limit (size, count, depth)."""

    reason = "limit_exceeded"


class Unsupported(ProtocolError):
    """Valid traffic the parser chooses not to follow (TLS after STARTTLS, an upgrade)."""

    reason = "unsupported"
