"""Bounded, strict request bodies: every malformed body is a 4xx with one line, never a 500.

Finding 5 of the hardening review: YAML aliases expanded without limit, a date, a recursive alias,
a NUL byte, a 5,000-character name or deeply nested JSON gave 500s, and bodies were read in full
before their size was checked.
"""

from __future__ import annotations

import asyncio
import json

import pytest
from starlette.requests import Request

from orchestrator.surfaces.serve.auth import ApiError
from orchestrator.surfaces.serve.bodies import MAX_DEPTH, parse_config_body, read_body
from orchestrator.surfaces.serve.submission import validate_submission

BILLION_LAUGHS = "\n".join(["a: &a [x, x, x, x, x, x, x, x, x, x]"]
                           + [f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]"
                              for p, c in zip("abcdefgh", "bcdefghi", strict=True)]
                           + ["pruning: {sweep: *i}"])


@pytest.mark.parametrize("body, ctype, start", [
    (BILLION_LAUGHS, "text/plain", "config: YAML anchor &a at line 1 is not accepted"),
    ("pruning: &p {sweep: [0.5]}\neval: *p\n", "text/plain", "config: YAML anchor &p"),
    ("a: &a [*a]\n", "text/plain", "config: YAML anchor &a"),  # recursive alias
    ("output: {dir: !!binary aGVsbG8=}\n", "text/plain", "config: YAML tag 'tag:yaml.org,2002:binary'"),
    ("output: {dir: !!python/object:os.system x}\n", "text/plain", "config: YAML tag"),
    ("output: {dir: \"a\\0b\"}\n", "text/plain", "output.dir: contains a NUL character"),
    ('{"output": {"dir": "a\\u0000b"}}', "application/json", "output.dir: contains a NUL character"),
    ("[" * 100_000 + "]" * 100_000, "application/json", "config: nested deeper than"),
    ('{"a":' * 40 + "1" + "}" * 40, "application/json", f"a.a.a.a.a.a.a.a.a.a.a.a.a.a.a.a.a: nested deeper "
                                                        f"than {MAX_DEPTH}"),
    ("output: {dir: " + "x" * 5000 + "}\n", "text/plain", "output.dir: string of 5000 characters exceeds"),
    ("1: x\n", "text/plain", "config: key '1' is not a string"),
    ('{"pruning": {"sparsity": NaN}}', "application/json", "pruning.sparsity: nan is not a finite number"),
])
def test_malformed_bodies_are_400_with_one_line(body, ctype, start):
    with pytest.raises(ApiError) as err:
        parse_config_body(body.encode(), ctype)
    assert err.value.status == 400 and "\n" not in err.value.message
    assert err.value.message.startswith(start), err.value.message


def test_dates_stay_strings_and_ordinary_configs_parse():
    assert parse_config_body(b"output: {dir: 2024-01-01}\npruning: {pattern: 2:4}", "text/plain") == {
        "output": {"dir": "2024-01-01"}, "pruning": {"pattern": "2:4"}}


def test_long_or_reserved_output_names_are_400_not_500(tmp_path):
    root = tmp_path.resolve()
    for rel, text in [("a" * 300, "is longer than 255 bytes"), ("x/" * 600, "at most 1024 characters")]:
        with pytest.raises(ApiError) as err:
            validate_submission(json.dumps({"output": {"dir": rel}}).encode(), "application/json", root, "j")
        assert err.value.status == 400 and text in err.value.message, err.value.message
        assert str(root) not in err.value.message  # the root path does not leak


def _request(chunks: list[bytes], length: str | None) -> Request:
    headers = [(b"content-length", length.encode())] if length is not None else []
    messages = [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1} for i, c in enumerate(chunks)]
    pulled: list[int] = []

    async def receive():
        pulled.append(1)
        return messages[len(pulled) - 1]

    request = Request({"type": "http", "method": "POST", "headers": headers}, receive)
    request.pulled = pulled  # how many body chunks were read
    return request


def test_body_size_is_checked_from_content_length_before_reading():
    request = _request([b"x" * 10], "2000000")
    with pytest.raises(ApiError) as err:
        asyncio.run(read_body(request, 1000))
    assert err.value.status == 413 and "2000000 bytes exceeds the limit of 1000" in err.value.message
    assert request.pulled == []  # not a byte was read


def test_a_streamed_body_stops_at_the_limit():
    request = _request([b"x" * 600] * 10, None)  # chunked: no length declared
    with pytest.raises(ApiError) as err:
        asyncio.run(read_body(request, 1000))
    assert err.value.status == 413 and len(request.pulled) == 2  # stopped at the chunk that crossed it
    assert asyncio.run(read_body(_request([b"ab", b"cd"], None), 1000)) == b"abcd"
    with pytest.raises(ApiError) as err:
        asyncio.run(read_body(_request([b""], "12abc"), 1000))
    assert err.value.status == 400 and err.value.message.startswith("content-length:")
