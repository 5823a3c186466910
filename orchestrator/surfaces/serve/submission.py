"""Turning a ``POST /v1/jobs`` body into a validated run config confined to the service root.

Everything here runs in the HTTP replica before a job exists: a bad body, a bad field or an
output path outside the root is answered with 400 and one line naming the field and value.
"""

from __future__ import annotations

import json
from pathlib import Path, PurePosixPath
from typing import Any

import yaml

from orchestrator.errors import UsageError
from orchestrator.inputs.config import RunConfig
from orchestrator.inputs.loader import config_from_dict
from orchestrator.inputs.yamlconf import yaml_load
from orchestrator.outputs.artifacts import check_output
from orchestrator.surfaces.serve.auth import ApiError

JSON_TYPES = ("application/json",)
YAML_TYPES = ("application/x-yaml", "application/yaml", "text/yaml", "text/x-yaml", "text/plain", "")


def parse_body(body: bytes, content_type: str | None) -> dict[str, Any]:
    """Decode a config sent as JSON or YAML text.

    Args:
        body: the raw request body.
        content_type: the request's ``Content-Type`` (parameters such as ``charset`` are ignored).

    Raises:
        ApiError: 415 for another media type, 400 for undecodable text or a non-mapping document.
    """
    media = (content_type or "").split(";", 1)[0].strip().lower()
    if media not in JSON_TYPES + YAML_TYPES:
        raise ApiError(415, f"content-type: {media!r} is not one of application/json, application/x-yaml, text/plain")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise ApiError(400, "config: the request body is not UTF-8 text") from None
    if media in JSON_TYPES:
        try:
            data = json.loads(text) if text.strip() else None
        except json.JSONDecodeError as exc:
            raise ApiError(400, f"config: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from None
    else:
        try:
            data = yaml_load(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark is not None else ""
            raise ApiError(400, f"config: invalid YAML{where}") from None
    if data is None:
        raise ApiError(400, "config: the request body is empty; send the run config as JSON or YAML")
    if not isinstance(data, dict):
        raise ApiError(400, f"config: expected a mapping, got {type(data).__name__}")
    return data


def confine_output(data: dict[str, Any], root: Path, job_id: str) -> Path:
    """Point ``output.dir`` of ``data`` (in place) at an absolute path inside ``root``.

    ``output.dir`` is read relative to the root; when it is missing the job gets ``<root>/<job_id>``.
    A value of the wrong type is left for :func:`~orchestrator.inputs.config.config_from_dict` to report.

    Args:
        data: the submitted config mapping (modified in place).
        root: the service root, already resolved.
        job_id: the new job's id.

    Returns:
        The resolved run directory.

    Raises:
        ApiError: 400 when the path is absolute, starts with ``~`` or leaves the root.
    """
    output = data.get("output")
    if output is None:
        output = data["output"] = {}
    if not isinstance(output, dict):
        return root / job_id
    rel = output.get("dir", job_id)
    if isinstance(rel, (int, float)) and not isinstance(rel, bool):
        rel = str(rel)
    if not isinstance(rel, str):
        return root / job_id
    if PurePosixPath(rel).is_absolute() or rel.startswith("~"):
        raise ApiError(400, f"output.dir: {rel!r} must be a path relative to the service root")
    final = (root / rel).resolve()
    if not final.is_relative_to(root) or final == root:
        raise ApiError(400, f"output.dir: {rel!r} escapes the service root")
    output["dir"] = str(final)
    return final


def validate_submission(body: bytes, content_type: str | None, root: Path, job_id: str) -> RunConfig:
    """The run config of a new job, fully validated; nothing is started or written.

    Raises:
        ApiError: 400 (415 for a media type) with one line per problem, each naming the field and value.
    """
    data = parse_body(body, content_type)
    confine_output(data, root, job_id)
    try:
        cfg = config_from_dict(data)
        check_output(cfg.output)
    except UsageError as exc:  # ConfigError lists every problem, joined by "; "
        raise ApiError(400, str(exc)) from None
    return cfg

