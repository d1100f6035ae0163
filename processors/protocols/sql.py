"""SQL text handling shared by the PostgreSQL and MySQL parsers.

Contract: ``analyze(text, dialect)`` takes a statement (or several separated by
``;``) as the client sent it and returns a ``QueryInfo``: the text with every
literal replaced by ``?`` (strings, escape strings, dollar-quoted strings,
numbers, hex/bit literals; ``IN (?, ?, ...)`` collapsed to ``IN (?)``;
comments dropped because they may carry data), the statement's verb
(``db.operation.name``), its main table (``db.collection.name``) and a short
``db.query.summary`` (``SELECT orders``). It never raises on any input: an
unterminated literal (a query cut at ``MAX_QUERY_CHARS``) is still replaced.

Speed: one compiled regex does the sanitising pass (``re.sub`` visits only
literals, comments and quoted names), a second one tokenises just enough words
to find the verb and tables. Results are memoised in a small bounded LRU
because applications repeat statements (prepared ones always).
"""

from __future__ import annotations

import functools
import re
from collections import OrderedDict
from typing import NamedTuple

__all__ = [
    "MAX_QUERY_BYTES",
    "MAX_QUERY_CHARS",
    "MAX_SUMMARY_CHARS",
    "QueryInfo",
    "analyze",
    "decode_query",
    "query_attributes",
    "sanitize",
]

#: Query text kept per statement. OTel's Java/.NET instrumentations and OBI cap
#: captured SQL at a few KiB; beyond this the text is cut (and still sanitised).
MAX_QUERY_BYTES = 8192
MAX_QUERY_CHARS = MAX_QUERY_BYTES
#: Semantic conventions: db.query.summary SHOULD be at most 255 characters.
MAX_SUMMARY_CHARS = 255
#: Statements a ``;``-separated batch is summarised over (the rest is "...").
MAX_STATEMENTS = 16
#: Distinct statements memoised (strings up to MAX_QUERY_CHARS: <= 4 MiB).
CACHE_SIZE = 512


class QueryInfo(NamedTuple):
    text: str            #: sanitised text (or the original if sanitising is off)
    operation: str       #: verb, upper case ("SELECT", "CREATE TABLE"), "" if none
    collection: str      #: main table, "" if none or ambiguous
    summary: str         #: "SELECT orders", "BEGIN; INSERT t; COMMIT"
    statements: int      #: number of statements seen


# -- sanitiser ---------------------------------------------------------------
# Each match is a run of ordinary text (``pre``, kept) followed by one token that
# matters. The run is possessive and made of names (atomic, so a name never ends
# just before a quote: ``E'..'`` and ``_utf8'..'`` stay whole) and characters that
# cannot start a token, so the regex engine skips ordinary SQL in C and the
# Python callback runs once per literal, not once per character. Strings accept
# end-of-input as a terminator: a cut query never leaks half a literal. Numbers
# cannot start inside a name (t1, x_2) because names are consumed whole.
_NAME = r"(?>[A-Za-z_\u0080-\uffff][\w$\u0080-\uffff]*)(?!'|&')"
_PRE = (r"(?P<pre>(?:" + _NAME + r"|[^A-Za-z_\u0080-\uffff'\"`$\d.\-/#]|\.(?!\d)|-(?!-)|/(?!\*)"
        r"|\$(?![\w$\u0080-\uffff])|\#%s)*+)")
_TAIL = r"""
|(?P<hex>0[xX][0-9a-fA-F]+|0[bB][01]+)
|(?P<num>(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?)
|(?P<other>[\s\S])
|\Z
)"""
_PG_SRC = (
    _PRE % "" + r"""(?:
 (?P<lc>--[^\n]*)
|(?P<bc>/\*[\s\S]*?(?:\*/|\Z))
|(?P<ph>\$\d+)
|(?P<dq>\$(?P<tag>(?:[A-Za-z_\u0080-\uffff][\w\u0080-\uffff]*)?)\$[\s\S]*?(?:\$(?P=tag)\$|\Z))
|(?P<es>[eE]'(?:[^'\\]|\\[\s\S]|'')*(?:'|\Z))
|(?P<str>(?:[xXbBnN]|[uU]&)?'(?:[^']|'')*(?:'|\Z))
|(?P<qi>"(?:[^"]|"")*(?:"|\Z))
""" + _TAIL)
# MySQL: backslash escapes in strings, "..." is a string unless ANSI_QUOTES (we
# sanitise it either way: the safe side), `name` quotes identifiers, # comments.
_MY_SRC = (
    _PRE % "(?!)" + r"""(?:
 (?P<lc>--[^\n]*)
|(?P<bc>/\*[\s\S]*?(?:\*/|\Z))
|(?P<hc>\#[^\n]*)
|(?P<str>(?:[xXbBnN]|_[A-Za-z0-9]+)?'(?:[^'\\]|\\[\s\S]|'')*(?:'|\Z))
|(?P<dstr>"(?:[^"\\]|\\[\s\S]|"")*(?:"|\Z))
|(?P<qi>`(?:[^`]|``)*(?:`|\Z))
""" + _TAIL)
_KEEP = frozenset(("qi", "ph", "other", "pre", None))
_DROP = frozenset(("lc", "bc", "hc"))


def _repl(m: re.Match[str]) -> str:
    g = m.lastgroup
    if g in _KEEP:
        return m.group(0)
    if g in _DROP:
        return m.group("pre") + " "
    return m.group("pre") + "?"


# IN (?, ?, ?) -> IN (?): list length is data too, and it splits summaries.
_IN_LIST = re.compile(r"\b[Ii][Nn]\s*\(\s*\?(?:\s*,\s*\?)*\s*\)")
# VALUES (?, ?), (?, ?) -> VALUES (?, ?): the row count of a bulk insert is data too.
_ROWS = re.compile(r"(\(\s*\?(?:\s*,\s*\?)*\s*\))(?:\s*,\s*\(\s*\?(?:\s*,\s*\?)*\s*\))+")
_SPACES = re.compile(r"\s{2,}")


@functools.cache
def _tokenizer(dialect: str) -> re.Pattern[str]:
    """Compiled on first use: the Unicode classes take ~20 ms to compile, paid at every
    start-up (``wirespan replay`` of an HTTP capture included) if done at import."""
    return re.compile(_MY_SRC if dialect == "mysql" else _PG_SRC, re.VERBOSE)


def sanitize(text: str, dialect: str = "postgresql") -> str:
    """Replace literals by ``?`` and drop comments."""
    out = _tokenizer("mysql" if dialect == "mysql" else "postgresql").sub(_repl, text)
    if "?," in out or "? ," in out:  # only lists need the two list passes
        out = _IN_LIST.sub("IN (?)", out)
        out = _ROWS.sub(r"\1", out)
    return out


# -- verb and table ------------------------------------------------------------
# A token is a run of quoted parts and characters other than space and ( ) ; ,
# (so ``schema."My Table"`` is one token), or one of those four. Kinds are
# decided by the first character: cheaper than a named alternation per token.
_TOK = re.compile(r'(?:"[^"]*(?:"|\Z)|`[^`]*(?:`|\Z)|[^\s();,"`])+|[();,]')
_NAME_START = frozenset("_\"`abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")


# Words after which the next name is a table.
_TABLE_AFTER = frozenset(("FROM", "JOIN", "INTO", "UPDATE", "TABLE"))
# Words that may sit between such a keyword and the table.
_TABLE_SKIP = frozenset(("ONLY", "LATERAL", "IGNORE", "LOW_PRIORITY", "DELAYED", "HIGH_PRIORITY",
                         "QUICK", "IF", "NOT", "EXISTS", "TEMPORARY", "TEMP", "UNLOGGED"))
# Statements whose verb is two words (DDL names its object kind).
_DDL = frozenset(("CREATE", "DROP", "ALTER", "TRUNCATE"))
_DDL_OBJECTS = frozenset(("TABLE", "INDEX", "VIEW", "SEQUENCE", "SCHEMA", "DATABASE", "FUNCTION",
                          "PROCEDURE", "TRIGGER", "TYPE", "EXTENSION", "ROLE", "USER", "MATERIALIZED"))
_DDL_MODIFIERS = frozenset(("OR", "REPLACE", "TEMP", "TEMPORARY", "UNIQUE", "UNLOGGED", "GLOBAL",
                            "LOCAL", "CONCURRENTLY", "DEFINER", "ALGORITHM", "SQL", "SECURITY"))
_MAIN_VERBS = frozenset(("SELECT", "INSERT", "UPDATE", "DELETE", "MERGE", "REPLACE", "VALUES", "TABLE"))
# How many tokens of a statement are looked at for its verb and tables.
_MAX_TOKENS = 256


def _unquote(name: str) -> str:
    if '"' in name or "`" in name:
        return re.sub(r'\s*\.\s*', ".", name).replace('"', "").replace("`", "")
    if " " in name or "\t" in name or "\n" in name:
        return re.sub(r"\s+", "", name)
    return name


def _statement(tokens: list[tuple[str | None, str]]) -> tuple[str, list[str]]:
    """Verb and tables (in order of appearance, first is the main one) of one statement."""
    verb = ""
    tables: list[str] = []
    n = len(tokens)
    i = 0
    # Skip leading parentheses: (SELECT ...) UNION (...)
    while i < n and tokens[i][1] == "(":
        i += 1
    if i >= n or tokens[i][0] != "name":
        return verb, tables
    first = tokens[i][1].upper()
    ctes: set[str] = set()
    scan_from = -1
    if first == "WITH":
        # The verb is the first main verb outside the CTE bodies; CTE names
        # (the name before AS at depth 0) are not tables, their bodies' are.
        depth = 0
        j = i + 1
        scan_from = j
        while j < n:
            kind, val = tokens[j]
            if val == "(":
                depth += 1
            elif val == ")":
                depth -= 1
            elif depth == 0 and kind == "name":
                up = val.upper()
                if up in _MAIN_VERBS:
                    break
                if up == "AS" and j > 0 and tokens[j - 1][0] == "name":
                    ctes.add(tokens[j - 1][1])
                elif up == "AS" and j > 0 and tokens[j - 1][1] == ")":
                    # WITH x(a, b) AS (...): the name is before the column list.
                    k = j - 1
                    while k > 0 and tokens[k][1] != "(":
                        k -= 1
                    if k > 0:
                        ctes.add(tokens[k - 1][1])
            j += 1
        if j < n:
            i = j
            first = tokens[i][1].upper()
        else:
            return "WITH", tables
    verb = first if first.isalpha() or "_" in first else first.split(".")[0]
    j = i + 1
    if first in _DDL:
        while j < n and tokens[j][1].upper() in _DDL_MODIFIERS:
            j += 1
        if j < n and tokens[j][1].upper() in _DDL_OBJECTS:
            obj = tokens[j][1].upper()
            if obj == "MATERIALIZED" and j + 1 < n:
                j += 1
                obj = "MATERIALIZED " + tokens[j][1].upper()
            verb = f"{first} {obj}"
            j += 1
            while j < n and tokens[j][1].upper() in _TABLE_SKIP:
                j += 1
            if j < n and tokens[j][0] == "name" and obj in ("TABLE", "VIEW", "MATERIALIZED VIEW", "SEQUENCE"):
                tables.append(_unquote(tokens[j][1]))
                j += 1
            elif obj == "INDEX":
                # CREATE INDEX name ON table: the table is the collection.
                while j < n and tokens[j][1].upper() != "ON":
                    j += 1
                if j + 1 < n and tokens[j + 1][0] == "name":
                    nxt = j + 1
                    if tokens[nxt][1].upper() == "ONLY" and nxt + 1 < n:
                        nxt += 1
                    tables.append(_unquote(tokens[nxt][1]))
            return verb, tables
        if first == "TRUNCATE" and j < n and tokens[j][0] == "name":
            tables.append(_unquote(tokens[j][1]))
        return verb, tables
    if first in ("COPY", "LOCK"):
        while j < n and tokens[j][1].upper() in ("TABLE", "TABLES", "ONLY"):
            j += 1
        if j < n and tokens[j][0] == "name":
            tables.append(_unquote(tokens[j][1]))
            return verb, tables  # COPY t FROM STDIN: STDIN is no table
    elif first in ("UPDATE",):
        while j < n and tokens[j][1].upper() in _TABLE_SKIP:
            j += 1
        if j < n and tokens[j][0] == "name":
            tables.append(_unquote(tokens[j][1]))
            j += 1
    elif first not in _MAIN_VERBS and first not in ("EXPLAIN", "DESCRIBE", "DESC", "SHOW"):
        return verb, tables
    # Scan the rest: the name after FROM/JOIN/INTO/UPDATE/TABLE is a table;
    # comma-separated FROM lists too (FROM a, b).
    if scan_from >= 0:
        j = scan_from
    in_from = False
    depth = 0
    from_depth = -1
    while j < n:
        kind, val = tokens[j]
        if kind == "p":
            if val == "(":
                depth += 1
            elif val == ")":
                depth -= 1
                if depth < from_depth:
                    in_from = False
            elif val == "," and in_from and depth == from_depth:
                k = j + 1
                if k < n and tokens[k][0] == "name":
                    tables.append(_unquote(tokens[k][1]))
                    j = k
            j += 1
            continue
        up = val.upper()
        if up in _TABLE_AFTER:
            k = j + 1
            while k < n and tokens[k][1].upper() in _TABLE_SKIP:
                k += 1
            if k < n and tokens[k][0] == "name":
                tables.append(_unquote(tokens[k][1]))
                in_from = up == "FROM"
                from_depth = depth
                j = k + 1
                continue
        elif up in ("WHERE", "GROUP", "ORDER", "LIMIT", "HAVING", "SET", "VALUES", "ON", "USING",
                    "UNION", "RETURNING", "WINDOW", "FOR"):
            in_from = False
        j += 1
    if ctes:
        tables = [t for t in tables if t not in ctes] or tables
    if first in ("INSERT", "REPLACE") and not tables and i + 1 < n and tokens[i + 1][0] == "name":
        tables.append(_unquote(tokens[i + 1][1]))
    return verb, tables


def _split(sanitised: str) -> list[list[tuple[str | None, str]]]:
    """Token lists per statement (split at ``;`` outside quotes), bounded."""
    stmts: list[list[tuple[str | None, str]]] = []
    cur: list[tuple[str | None, str]] = []
    starts = _NAME_START
    for val in _TOK.findall(sanitised):
        if val == ";":
            if cur:
                stmts.append(cur)
                if len(stmts) > MAX_STATEMENTS:
                    return stmts
                cur = []
            continue
        if len(cur) < _MAX_TOKENS:
            c = val[0]
            if c in "(),":
                cur.append(("p", val))
            elif c in starts or c >= "\u0080":
                cur.append(("name", val))
            else:
                cur.append((None, val))
    if cur:
        stmts.append(cur)
    return stmts


def _summarise(sanitised: str) -> tuple[str, str, str, int]:
    stmts = _split(sanitised)
    parts: list[str] = []
    verbs: list[str] = []
    colls: list[str] = []
    for toks in stmts[:MAX_STATEMENTS]:
        verb, tables = _statement(toks)
        if not verb:
            continue
        verbs.append(verb)
        colls.append(tables[0] if tables else "")
        seen: list[str] = []
        for t in tables:
            if t not in seen:
                seen.append(t)
        parts.append(" ".join([verb, *seen[:4]]))
    count = len(stmts)
    if not parts:
        return "", "", "", count
    summary = "; ".join(parts)
    if count > MAX_STATEMENTS:
        summary += "; ..."
    if len(summary) > MAX_SUMMARY_CHARS:
        summary = summary[:MAX_SUMMARY_CHARS - 3] + "..."
    if len(verbs) == 1:
        return verbs[0], colls[0], summary, count
    # Several statements: semconv names a batch "BATCH" (+ the verb if all agree).
    op = "BATCH " + verbs[0] if all(v == verbs[0] for v in verbs) else "BATCH"
    coll = colls[0] if colls[0] and all(c == colls[0] for c in colls) else ""
    return op, coll, summary, count


_cache: OrderedDict[tuple[str, str, bool], QueryInfo] = OrderedDict()


def analyze(text: str, dialect: str = "postgresql", sanitize_text: bool = True) -> QueryInfo:
    """Sanitised text, verb, main table and summary of ``text`` (never raises)."""
    key = (text, dialect, sanitize_text)
    hit = _cache.get(key)
    if hit is not None:
        _cache.move_to_end(key)
        return hit
    if len(text) > MAX_QUERY_CHARS:
        text = text[:MAX_QUERY_CHARS]
    clean = sanitize(text, dialect)
    op, coll, summary, count = _summarise(clean)
    out = _SPACES.sub(" ", clean).strip() if sanitize_text else text
    info = QueryInfo(out, op, coll, summary, count)
    _cache[key] = info
    if len(_cache) > CACHE_SIZE:
        _cache.popitem(last=False)
    return info


def query_attributes(attrs: dict, info: QueryInfo, name: str) -> str:
    """A statement's attributes into ``attrs`` (operation, collection, summary, text: the order
    PostgreSQL's and MySQL's spans have them in) and its span name: the summary, else the
    operation, else ``name``."""
    if info.operation:
        attrs["db.operation.name"] = info.operation
    if info.collection:
        attrs["db.collection.name"] = info.collection
    if info.summary:
        attrs["db.query.summary"] = info.summary
        name = info.summary
    elif info.operation:
        name = info.operation
    attrs["db.query.text"] = info.text
    return name


def decode_query(view: memoryview) -> str:
    """Text of a query held in a buffer view, cut at ``MAX_QUERY_BYTES``.

    This is the one deliberate copy of query bytes: a bounded prefix becomes the
    ``str`` that ends up in the span. Invalid UTF-8 is replaced, never raised.
    """
    if view.nbytes > MAX_QUERY_BYTES:
        view = view[:MAX_QUERY_BYTES]
    return str(view, "utf-8", "replace")
