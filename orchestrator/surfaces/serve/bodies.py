"""Request bodies read with bounds and decoded strictly, before anything else looks at them.

A body is refused with a 4xx and one line, never a 500, whatever its bytes:

- its size is checked from ``Content-Length`` before a byte is read, and again while it
  streams in (a chunked body cannot exceed the limit either): 413;
- JSON or YAML text decodes to plain data only: mappings with string keys, lists, strings,
  numbers, booleans and null. YAML anchors and aliases (which expand a few hundred bytes into
  gigabytes), tags, dates and binary values are refused; so are documents nested deeper than
  :data:`MAX_DEPTH`, with more than :data:`MAX_NODES` values, strings longer than
  :data:`MAX_STRING_CHARS` or holding a NUL character: 400 naming the place.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

import yaml
from fastapi import Request

from orchestrator.inputs.yamlconf import OutOfRange, StrictLoader, bounded_int
from orchestrator.surfaces.serve.auth import ApiError

JSON_TYPES = ("application/json",)
YAML_TYPES = ("application/x-yaml", "application/yaml", "text/yaml", "text/x-yaml", "text/plain", "")
MAX_DEPTH = 16
MAX_NODES = 10_000
MAX_STRING_CHARS = 4096
_KEY_RX = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")


async def read_body(request: Request, limit: int, field: str = "body") -> bytes:
    """The request body, refused with 413 as soon as it is known to exceed ``limit`` bytes.

    Args:
        request: the incoming request.
        limit: the largest accepted body in bytes.
        field: what the error line names.

    Raises:
        ApiError: 413 for a declared or streamed size over ``limit``, 400 for a malformed ``Content-Length``.
    """
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.strip().isdigit():
            raise ApiError(400, f"content-length: {declared[:40]!r} is not a byte count")
        if int(declared) > limit:
            raise ApiError(413, f"{field}: body of {int(declared)} bytes exceeds the limit of {limit}")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"{field}: body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _yaml_events_plain(text: str) -> None:
    """Refuse YAML features a config never needs: anchors, aliases and explicit tags."""
    for event in yaml.parse(text, Loader=StrictLoader):
        if isinstance(event, yaml.AliasEvent):
            raise ApiError(400, f"config: YAML alias *{event.anchor} at line {event.start_mark.line + 1} "
                                "is not accepted (anchors and aliases are refused)")
        anchor = getattr(event, "anchor", None)
        if anchor is not None:
            raise ApiError(400, f"config: YAML anchor &{anchor} at line {event.start_mark.line + 1} "
                                "is not accepted (anchors and aliases are refused)")
        tag = getattr(event, "tag", None)  # None unless the text names one (``!!binary``, ``!!python/...``)
        if tag is not None and tag != "!":
            raise ApiError(400, f"config: YAML tag {tag[:40]!r} at line {event.start_mark.line + 1} "
                                "is not accepted")


def check_plain(data: Any, where: str = "config") -> None:
    """Check that ``data`` is plain, bounded JSON-like data (see the module docstring).

    Raises:
        ApiError: 400 naming the dotted place of the first offending value.
    """
    count = 0
    stack: list[tuple[Any, str, int]] = [(data, where, 0)]
    while stack:
        node, path, depth = stack.pop()
        count += 1
        if count > MAX_NODES:
            raise ApiError(400, f"{where}: more than {MAX_NODES} values")
        if depth > MAX_DEPTH:
            raise ApiError(400, f"{path}: nested deeper than {MAX_DEPTH} levels")
        if isinstance(node, dict):
            for key, value in node.items():
                if not isinstance(key, str):
                    raise ApiError(400, f"{path}: key {str(key)[:40]!r} is not a string")
                if not _KEY_RX.match(key):
                    raise ApiError(400, f"{path}: key {key[:40]!r} is not a config key (letters, digits, _ . -)")
                stack.append((value, f"{path}.{key}" if path != where else key, depth + 1))
        elif isinstance(node, list):
            stack.extend((v, f"{path}[{i}]", depth + 1) for i, v in enumerate(node))
        elif isinstance(node, OutOfRange):
            raise ApiError(400, f"{path}: {node!r} is out of range")
        elif isinstance(node, str):
            if len(node) > MAX_STRING_CHARS:
                raise ApiError(400, f"{path}: string of {len(node)} characters exceeds {MAX_STRING_CHARS}")
            if "\x00" in node:
                raise ApiError(400, f"{path}: contains a NUL character")
        elif isinstance(node, float):
            if not math.isfinite(node):
                raise ApiError(400, f"{path}: {node!r} is not a finite number")
        elif node is not None and not isinstance(node, (bool, int)):
            raise ApiError(400, f"{path}: a {type(node).__name__} value is not accepted (use a string or number)")


def decode_json(text: str, where: str) -> Any:
    """Parse JSON text; malformed or too deeply nested text is a 400."""
    try:
        return json.loads(text, parse_int=bounded_int) if text.strip() else None
    except json.JSONDecodeError as exc:
        raise ApiError(400, f"{where}: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from None
    except RecursionError:
        raise ApiError(400, f"{where}: nested deeper than {MAX_DEPTH} levels") from None


def parse_config_body(body: bytes, content_type: str | None) -> dict[str, Any]:
    """Decode a run config sent as JSON or YAML text into checked plain data.

    Args:
        body: the raw request body (already size-checked by :func:`read_body`).
        content_type: the request's ``Content-Type`` (parameters such as ``charset`` are ignored).

    Raises:
        ApiError: 415 for another media type, 400 for undecodable or unaccepted text or a non-mapping document.
    """
    media = (content_type or "").split(";", 1)[0].strip().lower()
    if media not in JSON_TYPES + YAML_TYPES:
        raise ApiError(415, f"content-type: {media[:60]!r} is not one of application/json, application/x-yaml, "
                            "text/plain")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise ApiError(400, "config: the request body is not UTF-8 text") from None
    if "\x00" in text:
        raise ApiError(400, "config: the request body contains a NUL character")
    if media in JSON_TYPES:
        data = decode_json(text, "config")
    else:
        try:
            _yaml_events_plain(text)
            data = yaml.load(text, Loader=StrictLoader)  # noqa: S506 - StrictLoader derives from SafeLoader
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark is not None else ""
            raise ApiError(400, f"config: invalid YAML{where}") from None
        except RecursionError:
            raise ApiError(400, f"config: nested deeper than {MAX_DEPTH} levels") from None
    if data is None:
        raise ApiError(400, "config: the request body is empty; send the run config as JSON or YAML")
    if not isinstance(data, dict):
        raise ApiError(400, f"config: expected a mapping, got {type(data).__name__}")
    check_plain(data)
    return data
