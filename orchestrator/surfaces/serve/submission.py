"""Turning a ``POST /v1/jobs`` body into a validated run config confined to the service root.

Everything here runs in the HTTP replica before a job exists: a bad body, a bad field or an
output path outside the root is answered with 400 and one line naming the field and value.
"""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath
from typing import Any

from orchestrator.errors import UsageError
from orchestrator.inputs.config import RunConfig
from orchestrator.inputs.loader import config_from_dict
from orchestrator.outputs.artifacts import check_output
from orchestrator.surfaces.serve.auth import ApiError
from orchestrator.surfaces.serve.bodies import parse_config_body
from orchestrator.surfaces.serve.policy import JobPolicy, policy_problems

#: a published run holds this file; a checkpoint directory holds ``progress.json`` or is named ``.NAME.ckpt``
RUN_MARKER = "manifest.json"
CKPT_MARKER = "progress.json"
MAX_PATH_CHARS = 1024
MAX_NAME_BYTES = 255
#: directories below ``output.dir`` looked at for runs or checkpoints it would contain
MAX_SCAN_ENTRIES = 10_000


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
    if len(rel) > MAX_PATH_CHARS or "\x00" in rel:
        raise ApiError(400, f"output.dir: {rel[:60]!r}... must be a path of at most {MAX_PATH_CHARS} characters "
                            "without NUL")
    for part in PurePosixPath(rel).parts:
        if len(part.encode()) > MAX_NAME_BYTES:
            raise ApiError(400, f"output.dir: the name {part[:40]!r}... is longer than {MAX_NAME_BYTES} bytes")
        if part.startswith(".") and part not in (".", ".."):
            raise ApiError(400, f"output.dir: {rel!r}: names starting with '.' are reserved for temp, checkpoint "
                                "and lock files")
    final = (root / rel).resolve()
    if not final.is_relative_to(root) or final == root:
        raise ApiError(400, f"output.dir: {rel!r} escapes the service root")
    output["dir"] = str(final)
    return final


def check_no_overlap(final: Path, root: Path) -> None:
    """Refuse an output directory inside, or around, a published run or a checkpoint.

    ``final`` may be an existing run (``output.overwrite`` and the policy decide about that), but not
    a directory inside one or inside a checkpoint, nor one that holds runs or checkpoints below it.

    Raises:
        ApiError: 409 naming the run or checkpoint in the way.
    """
    for parent in final.parents:
        if parent == root or not parent.is_relative_to(root):
            break
        if (parent / RUN_MARKER).is_file() or (parent / CKPT_MARKER).is_file():
            raise ApiError(409, f"output.dir: {str(final.relative_to(root))!r} lies inside the run or checkpoint "
                                f"{str(parent.relative_to(root))!r}")
    if not final.is_dir():
        return
    if (final / CKPT_MARKER).is_file():
        raise ApiError(409, f"output.dir: {str(final.relative_to(root))!r} is a checkpoint directory")
    seen = 0
    for here, dirs, files in os.walk(final):
        if Path(here) != final and (RUN_MARKER in files or CKPT_MARKER in files):
            raise ApiError(409, f"output.dir: {str(final.relative_to(root))!r} contains the run or checkpoint "
                                f"{str(Path(here).relative_to(root))!r}")
        if any(d.endswith(".ckpt") for d in dirs):
            ckpt = next(d for d in dirs if d.endswith(".ckpt"))
            raise ApiError(409, f"output.dir: {str(final.relative_to(root))!r} contains the checkpoint "
                                f"{str((Path(here) / ckpt).relative_to(root))!r}")
        seen += len(dirs) + len(files)
        if seen > MAX_SCAN_ENTRIES:
            raise ApiError(409, f"output.dir: {str(final.relative_to(root))!r} holds more than "
                                f"{MAX_SCAN_ENTRIES} entries; choose a new directory")


def validate_submission(body: bytes, content_type: str | None, root: Path, job_id: str,
                        policy: JobPolicy | None = None) -> RunConfig:
    """The run config of a new job, fully validated against the policy; nothing is started or written.

    Args:
        body: the raw request body (size already checked).
        content_type: the request's ``Content-Type``.
        root: the service root, resolved.
        job_id: the new job's id.
        policy: the operator's policy (default: :class:`~orchestrator.surfaces.serve.policy.JobPolicy`'s
            safe defaults).

    Raises:
        ApiError: 400 (415 for a media type, 409 for a path in another run's way) with one line listing
            every problem, each naming the field and value.
    """
    data = parse_config_body(body, content_type)
    final = confine_output(data, root, job_id)
    try:
        cfg = config_from_dict(data)
    except UsageError as exc:  # ConfigError lists every problem, joined by "; "
        raise ApiError(400, str(exc)) from None
    problems = policy_problems(cfg, policy or JobPolicy())
    if problems:
        raise ApiError(400, "; ".join(problems))
    check_no_overlap(final, root)
    try:
        check_output(cfg.output)
    except UsageError as exc:
        raise ApiError(400, str(exc)) from None
    return cfg

