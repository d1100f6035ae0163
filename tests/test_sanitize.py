"""The shared sanitizing rules (processors/protocols/sanitize.py): query strings and database errors."""

from __future__ import annotations

import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from processors.protocols.sanitize import (
    LONG_WORDS,
    REDACTED,
    SHORT_WORDS,
    redact_query,
    sanitize_error,
    sensitive_query_key,
)


@pytest.mark.parametrize("query, want", [
    ("q=1&page=2", "q=1&page=2"),
    ("x=1&token=abc&y=2", "x=1&token=REDACTED&y=2"),
    ("access_token=a;b=2", "access_token=REDACTED;b=2"),
    ("accessToken=x&apiKey=y&api_key=z&X-Api-Key=w&key=v",
     "accessToken=REDACTED&apiKey=REDACTED&api_key=REDACTED&X-Api-Key=REDACTED&key=REDACTED"),
    ("X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIA%2F20240101&X-Amz-Signature=deadbeef"
     "&X-Amz-Security-Token=t",
     "X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=REDACTED&X-Amz-Signature=REDACTED"
     "&X-Amz-Security-Token=REDACTED"),
    ("AWSAccessKeyId=AKIA&Signature=s&Expires=1", "AWSAccessKeyId=REDACTED&Signature=REDACTED&Expires=1"),
    ("X-Goog-Signature=abc&sig=1", "X-Goog-Signature=REDACTED&sig=REDACTED"),
    ("password=hunter2&passwd=a&pwd=b&pass=c&PASSWORD=d",
     "password=REDACTED&passwd=REDACTED&pwd=REDACTED&pass=REDACTED&PASSWORD=REDACTED"),
    ("client_secret=s&secret=t&refresh_token=r&id_token=i",
     "client_secret=REDACTED&secret=REDACTED&refresh_token=REDACTED&id_token=REDACTED"),
    ("auth=a&session=b&sid=c&PHPSESSID=d&jsessionid=e&credentials=f",
     "auth=REDACTED&session=REDACTED&sid=REDACTED&PHPSESSID=REDACTED&jsessionid=REDACTED&credentials=REDACTED"),
    ("user[password]=x&token[]=a&api%5Fkey=1", "user[password]=REDACTED&token[]=REDACTED&api%5Fkey=REDACTED"),
    # not sensitive: a word inside another word, or only in a value
    ("monkey=1&keyword=2&bypass=3&passage=4&q=secret+garden", "monkey=1&keyword=2&bypass=3&passage=4&q=secret+garden"),
    # empty values and bare names carry nothing
    ("token=&password&x=1", "token=&password&x=1"),
    ("", ""),
])
def test_redact_query(query: str, want: str) -> None:
    assert redact_query(query) == want


def test_extra_names_are_exact() -> None:
    a, b = ["tenant"], ["Region"]
    assert redact_query("tenant=acme&Tenant=x&region=eu", a) == "tenant=REDACTED&Tenant=x&region=eu"
    assert redact_query("tenant=acme&Region=eu&region=us", b) == "tenant=acme&Region=REDACTED&region=us"
    assert redact_query("tenant=acme&token=t", a) == "tenant=REDACTED&token=REDACTED"
    assert redact_query("tenant=acme", []) == "tenant=acme"


def test_unchanged_query_is_the_same_object() -> None:
    q = "page=2&sort=price"
    assert redact_query(q) is q
    q = "token=&x=1"
    assert redact_query(q) is q


def test_documented_words() -> None:
    for w in SHORT_WORDS:
        assert sensitive_query_key(w) and sensitive_query_key(f"x_{w}") and sensitive_query_key(f"X-{w.upper()}")
        assert not sensitive_query_key(f"a{w}z")
    for w in LONG_WORDS:
        assert sensitive_query_key(w) and sensitive_query_key(f"my{w.capitalize()}")


_names = st.one_of(st.sampled_from(SHORT_WORDS + LONG_WORDS + ("q", "page", "Token", "x_key", "a[b]")),
                   st.text("abcdefgkostnwy_-.[]%", max_size=12))
_values = st.text("abcXYZ019%+/.-_", min_size=1, max_size=12)


@settings(max_examples=400, deadline=None)
@given(st.lists(st.tuples(_names, _values), max_size=8), st.sampled_from("&;"))
def test_redact_query_keeps_structure(pairs: list[tuple[str, str]], sep: str) -> None:
    pairs = [(k, v) for k, v in pairs if "=" not in k and "&" not in k and ";" not in k]
    out = redact_query(sep.join(f"{k}={v}" for k, v in pairs))
    got = [p.partition("=") for p in out.split(sep)] if pairs else []
    assert [k for k, _, _ in got] == [k for k, _ in pairs]
    for (k, v), (_, _, ov) in zip(pairs, got, strict=True):
        assert ov == (REDACTED if sensitive_query_key(k) else v)


def test_linear_on_hostile_queries() -> None:
    for q in ("key[" * 3000 + "=1", "a" * 8000 + "token=1", "[key" * 2000 + "=1", "&".join(["key[a=1"] * 1000),
              "token=" + "x" * 8000, "&".join(["sig=1"] * 2000)):
        t0 = time.perf_counter()
        redact_query(q)
        assert time.perf_counter() - t0 < 0.2, q[:40]


@pytest.mark.parametrize("message, want", [
    # MySQL / MariaDB
    ("Duplicate entry 'apple' for key 'fruits.PRIMARY'", "Duplicate entry ? for key ?"),
    ("Duplicate entry 'O'Brien' for key 'name'", "Duplicate entry ? for key ?"),
    ("Table 'shop.orders' doesn't exist", "Table ? doesn't exist"),
    ("Access denied for user 'root'@'localhost' (using password: YES)",
     "Access denied for user ?@? (using password: YES)"),
    ("Data too long for column 'name' at row 1", "Data too long for column ? at row 1"),
    ("You have an error in your SQL syntax; check the manual that corresponds to your MariaDB server version for "
     "the right syntax to use near 'password = 'hunter2' WHERE id=1' at line 1",
     "You have an error in your SQL syntax; check the manual that corresponds to your MariaDB server version for "
     "the right syntax to use near ? at line 1"),
    ("Can't find file: 'x.frm'", "Can't find file: ?"),
    # PostgreSQL
    ('invalid input syntax for type integer: "abc"', "invalid input syntax for type integer: ?"),
    ('relation "users" does not exist', "relation ? does not exist"),
    ("value 'it''s' is bad", "value ? is bad"),
    # Redis
    ("ERR unknown command 'FOO', with args beginning with: 'secret' 'x' ",
     "ERR unknown command ?, with args beginning with: ? ? "),
    ("WRONGTYPE Operation against a key holding the wrong kind of value",
     "WRONGTYPE Operation against a key holding the wrong kind of value"),
    # MongoDB
    ('E11000 duplicate key error collection: shop.users index: email_1 dup key: { email: "a@b.c" }',
     "E11000 duplicate key error collection: shop.users index: email_1 dup key: { ? }"),
    ("E11000 duplicate key error collection: t.c index: _id_ dup key: { _id: 5 }",
     "E11000 duplicate key error collection: t.c index: _id_ dup key: { ? }"),
    # a message cut inside a literal: the rest is replaced
    ("Duplicate entry 'very long secr", "Duplicate entry ?"),
    ("", ""),
])
def test_sanitize_error(message: str, want: str) -> None:
    assert sanitize_error(message) == want


def test_sanitize_error_never_raises_and_is_linear() -> None:
    assert sanitize_error(5) == 5  # type: ignore[arg-type]  # a hostile errmsg of another BSON type
    for m in ("'" * 8000, "\"a'" * 3000, "near '" * 3000, "x'y" * 3000, "dup key: {" * 2000,
              "near '" + "' at line " * 2000):
        t0 = time.perf_counter()
        sanitize_error(m)
        assert time.perf_counter() - t0 < 0.2, m[:40]


@settings(max_examples=400, deadline=None)
@given(st.text(max_size=40), st.text("abcdef XYZ19", min_size=4, max_size=12), st.sampled_from("'\""))
def test_a_quoted_literal_never_survives(prefix: str, literal: str, q: str) -> None:
    out = sanitize_error(f"{prefix} {q}{literal}{q} tail")
    assert f"{q}{literal}{q}" not in out
