"""Secrets out of span attributes by default: one rule for query strings, one for error messages.

Contract, shared by every protocol that exports such text (each calls these
only when it has the text at all, so the common path costs nothing):

- ``redact_query(query, names=())``: the value of every sensitive parameter of a
  URL query string (and of the exact ``names``) becomes ``REDACTED`` (the
  OpenTelemetry semantic conventions' word for ``url.query`` and ``url.full``);
  names, order, separators and every other value are kept. A parameter is
  sensitive when its name, case-insensitive (without an array index ``[]``/``[0]``;
  ``user[password]`` counts by its last part), is one of ``SHORT_WORDS`` on its own
  or after a separator (``_``, ``-``, ``.``, ``[`` or their percent-encodings:
  ``key``, ``api_key``, ``x-api-key``, ``pass``, ``sig``, ``auth``, ``session``...)
  or ends with one of ``LONG_WORDS`` (``token``, ``access_token``, ``accessToken``,
  ``password``, ``client_secret``, ``X-Amz-Signature``, ``X-Amz-Credential``,
  ``AWSAccessKeyId``...). Empty values stay empty. ``&`` and ``;`` separate
  parameters. A query none of whose names ends like a sensitive one is returned
  after a few C-level string calls per parameter (``_PREFILTER``), no regex.
- ``sanitize_error(message)``: a database's error text with every quoted literal
  replaced by ``?``, as the SQL sanitizer does for query text (``sql.py``):
  ``'...'`` and ``"..."`` (a quote opens only where a word does not go on, so
  "doesn't" stays prose; a quote inside the literal followed by a letter is part
  of it; an unterminated one runs to the end, for messages cut short); MySQL's
  ``near '<statement excerpt>' at line N`` as a whole (the excerpt's own quotes
  are not escaped); MongoDB's ``dup key: { ... }`` as a whole (values there are
  not always quoted). Identifiers quoted in messages are replaced too: the
  literal and the name cannot be told apart (``Duplicate entry 'x' for key 'y'``);
  the span's ``db.query.text`` still names the tables. Unquoted numbers (row and
  line numbers, codes) are kept.

Both never raise, and return the input object itself when nothing changes.
"""

from __future__ import annotations

import re

__all__ = ["REDACTED", "SHORT_WORDS", "LONG_WORDS", "redact_query", "sensitive_query_key", "sanitize_error"]

REDACTED = "REDACTED"
#: Sensitive as the whole name or its last part after a separator (``api_key``, ``x-sig``).
SHORT_WORDS = ("key", "pwd", "pass", "auth", "sig", "sid", "session", "jwt", "otp")
#: Sensitive as any suffix of the name (``accessToken``, ``client_secret``, ``x-amz-signature``).
LONG_WORDS = ("token", "secret", "password", "passwd", "passphrase", "signature", "credential", "credentials",
              "authorization", "apikey", "accesskey", "secretkey", "privatekey", "accesskeyid", "sessionid", "sessid")

_PARAM_SEP = re.compile(r"([&;])")
_SHORT = tuple(SHORT_WORDS)
_LONG = tuple(LONG_WORDS)
_SEPS = ("_", "-", ".", "[", "%5f", "%2d", "%2e", "%5b")


def sensitive_query_key(name: str) -> bool:
    """Whether a query parameter of this name has its value redacted (suffix tests: no regex)."""
    n = name.lower()
    while n.endswith("]"):  # token[], token[0], user[password], a[b][token]
        lb = n.rfind("[")
        inner = n[lb + 1:-1]
        if lb > 0 and (not inner or inner.isdigit()):
            n = n[:lb]  # an array index: the name is before it
        else:
            n = n[:-1]  # the last bracketed part is the name ("[" is a separator)
            break
    if n.endswith(_LONG):
        return True
    if not n.endswith(_SHORT):
        return False
    for w in _SHORT:
        if n.endswith(w):
            head = n[:-len(w)]
            if not head or head.endswith(_SEPS):
                return True
    return False


# Every sensitive name, lowercased, ends with one of these (or with "]": an array or bracketed
# name): the superset that lets a query without any skip the exact check, in C-level string calls.
_PREFILTER = tuple(w for w in (*_SHORT, *_LONG) if not any(w != v and w.endswith(v) for v in (*_SHORT, *_LONG)))
_PREFILTER += ("]",)
_NAMES: dict[int, tuple[object, tuple[str, ...]]] = {}  # id(names list) -> (the list, prefilter with its names)


def redact_query(query: str, names: list[str] | tuple[str, ...] = ()) -> str:
    """``query`` with the values of sensitive parameters (and of ``names``, exact) replaced by ``REDACTED``."""
    if "=" not in query:
        return query
    ends = _PREFILTER
    if names:
        cached = _NAMES.get(id(names))
        if cached is None or cached[0] is not names:
            if len(_NAMES) > 64:  # one entry per settings object: reloads make new ones
                _NAMES.clear()
            cached = _NAMES[id(names)] = (names, _PREFILTER + tuple(n.lower() for n in names))
        ends = cached[1]
    low = query.lower()
    if ";" in low:
        low = low.replace(";", "&")
    for p in low.split("&"):
        if p.partition("=")[0].endswith(ends):
            return _redact(query, names)
    return query


def _redact(query: str, names: list[str] | tuple[str, ...]) -> str:
    parts = query.split("&") if ";" not in query else _PARAM_SEP.split(query)
    step = 1 if ";" not in query else 2
    changed = False
    for i in range(0, len(parts), step):
        name, eq, value = parts[i].partition("=")
        if eq and value and value != REDACTED and (name in names or sensitive_query_key(name)):
            parts[i] = name + "=" + REDACTED
            changed = True
    if not changed:
        return query
    return "&".join(parts) if step == 1 else "".join(parts)


# Any quoted literal. Opens where no word goes on; a quote followed by a word character
# continues it (O'Brien); closes where no word follows; unterminated: to the end.
_QUOTED = re.compile(
    r"""(?<!\w)(?:'(?:[^'\\]|\\.|''|'(?=\w))*(?:'(?!\w)|\Z)"""
    r"""|"(?:[^"\\]|\\.|""|"(?=\w))*(?:"(?!\w)|\Z))""", re.DOTALL)


def _span_of(message: str, opener: str, closer: str) -> tuple[int, int] | None:
    """From the first ``opener`` to the end of the last ``closer`` after it (find/rfind: linear)."""
    i = message.find(opener)
    if i < 0:
        return None
    j = message.rfind(closer)
    if j < i + len(opener) - 1:
        return None
    return i, j + len(closer)


#: Error messages already sanitised (bounded; started over when full): a server repeats the same
#: few ("Table 'shop.x' doesn't exist", WRONGTYPE, a client library's probe of a newer command on
#: every connection), and the regex pass cost a few microseconds each, a fiftieth of a real
#: session's stage (issue 21). Only texts up to MEMO_TEXT characters are kept: at most
#: ~1 MiB of them, whatever a hostile server sends.
_MEMO: dict[str, str] = {}
MEMO_MAX = 1024
MEMO_TEXT = 512


def sanitize_error(message: str) -> str:
    """A database error message with its quoted literals replaced by ``?`` (remembered)."""
    if not isinstance(message, str):  # a hostile reply's errmsg may be any BSON value
        return message
    out = _MEMO.get(message)
    if out is None:
        out = _sanitize_error(message)
        if len(message) <= MEMO_TEXT:
            if len(_MEMO) >= MEMO_MAX:
                _MEMO.clear()
            _MEMO[message] = out
    return out


def _sanitize_error(message: str) -> str:
    """sanitize_error's work, not remembered (the reference the memo is held to)."""
    if "'" not in message and '"' not in message and "dup key" not in message:
        return message
    out = message
    # MySQL ER_PARSE_ERROR: "... near '<up to 80 chars of the statement>' at line 1": the excerpt's
    # quotes are raw, so it goes whole, up to the last "' at line".
    se = _span_of(out, "near '", "' at line")
    if se is not None:
        out = out[:se[0]] + "near ? at line" + out[se[1]:]
    # MongoDB E11000: 'dup key: { email: "a@b.c" }' (numbers and ObjectIds are not quoted).
    se = _span_of(out, "dup key: {", "}")
    if se is not None:
        out = out[:se[0]] + "dup key: { ? }" + out[se[1]:]
    out = _QUOTED.sub("?", out)
    return out if out != message else message
