"""App-builder arguments: typed option dataclasses filled from ``serve run``/serve-config ``args``.

``serve run module:build_app key=value`` passes every value as a string; serve config files
pass YAML values. Both are checked against the dataclass with rayprune's YAML rules and
every problem is reported at once.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any, TypeVar

import yaml

from orchestrator.errors import ConfigError
from orchestrator.inputs.yamlconf import build_dataclass, yaml_load

ROOT_ENV = "RAYPRUNE_SERVE_ROOT"
T = TypeVar("T")


@dataclass
class JobServiceOptions:
    """Arguments of :func:`orchestrator.surfaces.serve.app.build_app`.

    Attributes:
        root: directory every job's output goes under (default ``$RAYPRUNE_SERVE_ROOT``).
        token_file: file holding the bearer token (default ``$RAYPRUNE_SERVE_TOKEN_FILE``,
            then ``$RAYPRUNE_SERVE_TOKEN``).
        job_num_cpus: CPUs each job task reserves; Ray queues jobs beyond the cluster's CPUs.
        max_active_jobs: pending plus running jobs before submissions are answered 429.
        max_finished_jobs: finished jobs whose status is remembered.
        cancel_grace_s: seconds a cancelled job may take to stop (its worker group's 30 s graceful
            shutdown included) before its worker is killed.
        max_body_bytes: largest accepted config body.
        num_replicas: HTTP replicas (job state is shared through the registry actor).
        policy_file: the operator's job policy, YAML (default ``$RAYPRUNE_SERVE_POLICY``; neither: the
            safe defaults of :class:`~orchestrator.surfaces.serve.policy.JobPolicy`).
        retention_s: finished jobs older than this are forgotten and their runs deleted (null: kept until
            ``DELETE`` or ``max_finished_jobs``, which only forgets the status).
        max_requeues: times a job lost with its registry is submitted again to continue its checkpoint (0: such
            jobs fail).
    """

    root: str | None = None
    token_file: str | None = None
    job_num_cpus: float = 1.0
    max_active_jobs: int = 64
    max_finished_jobs: int = 1000
    cancel_grace_s: float = 45.0
    max_body_bytes: int = 1 << 20
    num_replicas: int = 1
    policy_file: str | None = None
    retention_s: float | None = None
    max_requeues: int = 1


@dataclass
class GenerateOptions:
    """Arguments of :func:`orchestrator.surfaces.serve.generate.build_app`.

    Attributes:
        model_dir: a Hugging Face checkpoint directory, or a run directory (its ``model/`` is used).
        token_file: as for the job service.
        dtype: weights dtype (float32, bfloat16, float16).
        max_new_tokens_limit: the largest ``max_new_tokens`` a request may ask for.
        max_body_bytes: largest accepted request body.
        num_cpus: CPUs each replica reserves.
        num_replicas: replicas, each holding one copy of the model.
    """

    model_dir: str | None = None
    token_file: str | None = None
    dtype: str = "float32"
    max_new_tokens_limit: int = 256
    max_body_bytes: int = 64 << 10
    num_cpus: float = 1.0
    num_replicas: int = 1


def parse_options(cls: type[T], args: dict[str, Any] | None) -> T:
    """Build ``cls`` from builder ``args``; string values of non-string fields are parsed as YAML scalars.

    Raises:
        ConfigError: unknown keys or values of the wrong type, one line each.
    """
    hints = {f.name: f.type for f in dataclasses.fields(cls)}
    data: dict[str, Any] = {}
    for key, value in (args or {}).items():
        if isinstance(value, str) and key in hints and not str(hints[key]).startswith("str"):
            try:
                value = yaml_load(value)
            except yaml.YAMLError:
                pass  # left as a string: the type check names it
        data[key] = value
    problems: list[str] = []
    opts = build_dataclass(cls, data, "", problems)
    for f in dataclasses.fields(cls):
        value = getattr(opts, f.name)
        if f.name in ("job_num_cpus", "max_active_jobs", "max_finished_jobs", "max_body_bytes", "num_replicas",
                      "max_new_tokens_limit") and value <= 0:
            problems.append(f"{f.name}: must be > 0, got {value!r}")
        if f.name in ("cancel_grace_s", "num_cpus", "max_requeues") and value < 0:
            problems.append(f"{f.name}: must be >= 0, got {value!r}")
    if problems:
        raise ConfigError(problems)
    return opts


def service_root(opts: JobServiceOptions) -> str:
    """The configured root (argument, else ``$RAYPRUNE_SERVE_ROOT``).

    Raises:
        ConfigError: neither is set.
    """
    root = opts.root or os.environ.get(ROOT_ENV)
    if not root:
        raise ConfigError([f"root: no service root configured; pass root=DIR or set ${ROOT_ENV}"])
    return root
