"""What a submitted job may do: the operator's policy file, and the check of a run config against it.

The job service runs configs sent by whoever holds the token, on the cluster's workers, which can
read the service's secrets. So a submitted config may only name sources the operator allowed and
stays within caps; everything else is refused with a 400 naming the field. With no policy file the
defaults below apply: builtin models and data only, no remote code, no pickles, no hub downloads,
no replacing runs, bounded work and a wall-time limit.

Example policy file (YAML; every key optional)::

    model_roots: [/models]            # local models allowed below these directories
    data_roots: [/data/corpora]       # local calibration / evaluation / recovery / task files
    hub_models: ["meta-llama/*"]      # hub ids (shell patterns) a job may download
    hub_datasets: []
    max_num_samples: 256
    max_wall_s: 21600
"""

from __future__ import annotations

import fnmatch
import os
import re
from pathlib import Path, PurePosixPath

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from orchestrator.errors import ConfigError, UsageError
from orchestrator.evaluation.lmeval import LmEvalTask, parse_task_spec
from orchestrator.inputs.config import RunConfig
from orchestrator.inputs.yamlconf import StrictLoader
from orchestrator.plan_fit import known_params

POLICY_ENV = "RAYPRUNE_SERVE_POLICY"
BUILTIN_MODELS = ("smollm2-135m", "tiny")
BUILTIN_DATA = ("generate",)
BUILTIN_DATA_PREFIX = "builtin:"
LM_EVAL_PREFIX = "lm_eval:"


class JobPolicy(BaseModel):
    """The operator's limits on submitted jobs (see the module docstring for an example file).

    Attributes:
        allow_trust_remote_code: let ``model.trust_remote_code: true`` through (code execution on workers).
        allow_pickle: let ``model.allow_pickle: true`` through (pickle weights can run code).
        builtin_models: allow the builtin models (``smollm2-135m``, ``tiny``).
        model_roots: absolute directories local model sources must lie in.
        data_roots: absolute directories local data sources and task files must lie in.
        hub_models: hub model ids (shell patterns) a job may download.
        hub_datasets: hub dataset names (shell patterns) a job may download.
        lm_eval_tasks: lm-eval task names (shell patterns, matched against the name without ``lm_eval:`` and
            ``@options``) a job may run (they download their data); lm-eval task YAML files are always refused.
        allow_ray_address: let a job name ``backend.address`` (another Ray cluster).
        allow_overwrite: let ``output.overwrite: true`` replace a published run.
        keep_failed_checkpoints: keep a failed or cancelled job's checkpoints instead of removing them.
        max_num_samples: cap on ``calibration.num_samples``.
        max_seq_len: cap on every sequence length (calibration, evaluation, recovery, speed runs).
        max_eval_windows: cap on ``eval.num_windows``.
        max_task_examples: cap on ``eval.task_limit`` and each lm-eval task's ``@limit=N`` (one of them is
            required when lm-eval tasks run).
        max_recovery_steps: cap on ``structured.recovery.steps``.
        max_recovery_samples: cap on ``structured.recovery.num_samples``.
        max_workers: cap on each worker count (pruning, evaluation, recovery).
        max_batch: cap on each batch size (speed runs, recovery, gradient pass).
        max_sweep: cap on the number of sparsities in ``pruning.sweep``.
        max_wall_s: seconds a job may run before it is cancelled and cleaned up.
        max_tiny_params: cap on the parameters of a ``model.source: tiny`` shape (a random model is allocated
            in the job's process).
        max_threads: cap on ``backend.num_threads``.
        max_lstsq_iters: cap on ``pruning.lstsq.iters``.
        max_lstsq_rounds: cap on ``pruning.lstsq.rounds``.
        max_tune_epochs: cap on ``pruning.block_tune.epochs``.
        max_admm_iters: cap on ``pruning.admm.max_iters``.
        max_swap_rounds: cap on ``pruning.swaps``.
        max_retries: cap on ``backend.max_retries``.
        max_job_bytes: bytes a job may write below the service root (its temp directory and checkpoints); a
            running job over it is cancelled, and one whose model alone cannot fit (2 bytes a parameter, where the
            shape is known before loading) is refused.
        require_pinned: hub sources must name a commit (``model.revision``, ``calibration.revision``,
            ``eval.revision``: 40 hexadecimal characters), so a push to the hub cannot change what a job reads.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    allow_trust_remote_code: bool = False
    allow_pickle: bool = False
    builtin_models: bool = True
    model_roots: list[str] = Field(default_factory=list)
    data_roots: list[str] = Field(default_factory=list)
    hub_models: list[str] = Field(default_factory=list)
    hub_datasets: list[str] = Field(default_factory=list)
    lm_eval_tasks: list[str] = Field(default_factory=list)
    allow_ray_address: bool = False
    allow_overwrite: bool = False
    keep_failed_checkpoints: bool = False
    max_num_samples: int = Field(256, gt=0)
    max_seq_len: int = Field(4096, gt=0)
    max_eval_windows: int = Field(256, gt=0)
    max_task_examples: int = Field(2000, gt=0)
    max_recovery_steps: int = Field(2000, gt=0)
    max_recovery_samples: int = Field(8192, gt=0)
    max_workers: int = Field(8, gt=0)
    max_batch: int = Field(64, gt=0)
    max_sweep: int = Field(8, gt=0)
    max_wall_s: float = Field(6 * 3600.0, gt=0)
    max_tiny_params: int = Field(1_000_000_000, gt=0)
    max_threads: int = Field(64, gt=0)
    max_lstsq_iters: int = Field(500, gt=0)
    max_lstsq_rounds: int = Field(8, gt=0)
    max_tune_epochs: int = Field(10, gt=0)
    max_admm_iters: int = Field(1000, gt=0)
    max_swap_rounds: int = Field(1000, gt=0)
    max_retries: int = Field(5, ge=0)
    max_job_bytes: int = Field(2**40, gt=0)
    require_pinned: bool = False

    @field_validator("model_roots", "data_roots")
    @classmethod
    def _absolute(cls, roots: list[str]) -> list[str]:
        for root in roots:
            if not PurePosixPath(root).is_absolute():
                raise ValueError(f"{root!r} is not an absolute directory")
        return [os.path.realpath(r) for r in roots]


def load_policy(path: str | None) -> JobPolicy:
    """The policy from ``path`` (else ``$RAYPRUNE_SERVE_POLICY``; neither: the safe defaults).

    Raises:
        ConfigError: unreadable file, bad YAML, unknown keys or bad values, one line each.
    """
    path = path or os.environ.get(POLICY_ENV)
    if not path:
        return JobPolicy()
    try:
        text = Path(path).expanduser().read_text()
    except OSError as exc:
        raise ConfigError([f"policy_file: cannot read {path!r}: {exc.strerror or exc}"]) from None
    try:
        data = yaml.load(text, Loader=StrictLoader)  # noqa: S506 - StrictLoader derives from SafeLoader
    except yaml.YAMLError:
        raise ConfigError([f"policy_file: {path!r} is not valid YAML"]) from None
    try:
        return JobPolicy.model_validate(data or {})
    except ValidationError as exc:
        raise ConfigError([f"policy_file: {'.'.join(map(str, e['loc'])) or 'policy'}: {e['msg']}"
                           for e in exc.errors()]) from None


def _under(path: str, roots: list[str]) -> bool:
    real = os.path.realpath(path)
    return any(real == r or real.startswith(r.rstrip("/") + "/") for r in roots)


def _matches(name: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _local_or_hub(field: str, value: str, roots: list[str], hub: list[str], what: str) -> str | None:
    """The problem with a local-path-or-hub-name source, or None when the policy allows it."""
    if PurePosixPath(value).is_absolute():
        if _under(value, roots):
            return None
        where = ", ".join(roots) if roots else "none are allowed"
        return f"{field}: {value!r} is outside the allowed {what} directories ({where})"
    if value.startswith((".", "~")) or value.count("/") > 1 or Path(value).suffix in (".gguf", ".parquet", ".jsonl",
                                                                                       ".json", ".txt"):
        return f"{field}: {value!r}: local sources must be absolute paths"
    if not _is_repo_id(value):  # `org/..` matches `org/*` but is a relative path, never a hub id
        return f"{field}: {value!r} is not a hub id (letters, digits, '-', '_', '.'; no '..' or leading '.')"
    if _matches(value, hub):
        return None
    return f"{field}: {value!r} is not an allowed hub {what} (the service policy allows: {hub or 'none'})"


_COMMIT = re.compile(r"[0-9a-f]{40}")


def _is_hub(source: str | None) -> bool:
    """Whether ``source`` (already allowed by the policy) names the hub: not builtin, not an absolute path."""
    return bool(source) and source not in BUILTIN_MODELS + BUILTIN_DATA and not source.startswith(
        (BUILTIN_DATA_PREFIX, "/")) and _is_repo_id(source)


def _is_repo_id(value: str) -> bool:
    """Whether ``value`` is a well-formed hub repository id (``name`` or ``namespace/name``)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(value)
    except HFValidationError:
        return False
    return True


def _data_problem(field: str, value: str | None, policy: JobPolicy, extra: tuple[str, ...] = ()) -> str | None:
    if value is None or value in BUILTIN_DATA + extra or value.startswith(BUILTIN_DATA_PREFIX):
        return None
    return _local_or_hub(field, value, policy.data_roots, policy.hub_datasets, "dataset")


def _cap(problems: list[str], field: str, value: int | float | None, cap: int | float, key: str) -> None:
    if value is not None and value > cap:
        problems.append(f"{field}: {value!r} exceeds the service limit of {cap} (policy {key})")


def _lm_eval_spec(problems: list[str], field: str, task: str) -> LmEvalTask | None:
    """``task``'s lm-eval spec, or None after adding the problem with its syntax."""
    try:
        return parse_task_spec(task)
    except UsageError as exc:
        problems.append(f"{field}: {str(exc).partition(': ')[2]}")
        return None


def _task_refused(i: int, task: str, policy: JobPolicy) -> str:
    return (f"eval.tasks[{i}]: {task!r} is not a builtin task, an allowed file or an allowed lm-eval task (the "
            f"service policy allows: {policy.lm_eval_tasks or 'none'})")


def policy_problems(cfg: RunConfig, policy: JobPolicy) -> list[str]:
    """Every way ``cfg`` breaks ``policy``, one line each naming the field and value (empty: allowed).

    Args:
        cfg: a validated run config.
        policy: the service's policy.
    """
    from orchestrator.evaluation.zeroshot import builtin_tasks

    problems: list[str] = []
    m, c, e, b, s = cfg.model, cfg.calibration, cfg.eval, cfg.backend, cfg.structured
    r = s.recovery
    if m.trust_remote_code and not policy.allow_trust_remote_code:
        problems.append("model.trust_remote_code: true is refused by the service policy")
    if m.allow_pickle and not policy.allow_pickle:
        problems.append("model.allow_pickle: true is refused by the service policy")
    if m.source in BUILTIN_MODELS:
        if not policy.builtin_models:
            problems.append(f"model.source: {m.source!r}: builtin models are refused by the service policy")
    else:
        problem = _local_or_hub("model.source", m.source, policy.model_roots, policy.hub_models, "model")
        if problem:
            problems.append(problem)
    for field, value, extra in (("calibration.source", c.source, ()), ("eval.source", e.source, ()),
                                ("structured.recovery.source", r.source, ("calibration",))):
        problem = _data_problem(field, value, policy, extra)
        if problem:
            problems.append(problem)
    builtin = set(builtin_tasks())
    lm_eval = False  # an allowed lm-eval task without a limit of its own
    for i, task in enumerate(e.tasks):
        if task in builtin:
            continue
        if PurePosixPath(task).is_absolute():
            if not _under(task, policy.data_roots):
                problems.append(f"eval.tasks[{i}]: {task!r} is outside the allowed data directories")
        elif task.startswith(LM_EVAL_PREFIX) and (spec := _lm_eval_spec(problems, f"eval.tasks[{i}]", task)):
            if spec.is_file:
                problems.append(f"eval.tasks[{i}]: {task!r}: lm-eval task files are refused by the service policy "
                                "(their `!function` helpers run code)")
            elif _matches(spec.name, policy.lm_eval_tasks):
                lm_eval = lm_eval or spec.limit is None
                _cap(problems, f"eval.tasks[{i}] limit", spec.limit, policy.max_task_examples, "max_task_examples")
            else:
                problems.append(_task_refused(i, task, policy))
        elif not task.startswith(LM_EVAL_PREFIX):  # (a malformed lm-eval spec was reported above)
            problems.append(_task_refused(i, task, policy))
    if lm_eval and e.task_limit is None:
        problems.append(f"eval.task_limit: null: lm-eval tasks need a limit (at most {policy.max_task_examples})")
    if b.address is not None and not policy.allow_ray_address:
        problems.append(f"backend.address: {b.address!r}: jobs run on the service's own cluster")
    if cfg.output.overwrite and not policy.allow_overwrite:
        problems.append("output.overwrite: true is refused by the service policy (runs are never replaced)")
    _cap(problems, "calibration.num_samples", c.num_samples, policy.max_num_samples, "max_num_samples")
    for field, value in (("calibration.seq_len", c.seq_len), ("eval.seq_len", e.seq_len),
                         ("structured.recovery.seq_len", r.seq_len),
                         ("eval.speed_prompt_len", e.speed_prompt_len + e.speed_new_tokens if e.speed else None)):
        _cap(problems, field, value, policy.max_seq_len, "max_seq_len")
    _cap(problems, "eval.num_windows", e.num_windows, policy.max_eval_windows, "max_eval_windows")
    _cap(problems, "eval.task_limit", e.task_limit, policy.max_task_examples, "max_task_examples")
    _cap(problems, "structured.recovery.steps", r.steps, policy.max_recovery_steps, "max_recovery_steps")
    _cap(problems, "structured.recovery.num_samples", r.num_samples, policy.max_recovery_samples,
         "max_recovery_samples")
    for field, value in (("backend.workers", b.workers), ("eval.workers", e.workers or 0),
                         ("structured.recovery.workers", r.workers)):
        _cap(problems, field, value, policy.max_workers, "max_workers")
    for field, value in (("eval.speed_batch_sizes", max(e.speed_batch_sizes, default=None)),
                         ("structured.recovery.batch_size", r.batch_size),
                         ("backend.grad_batch_size", b.grad_batch_size)):
        _cap(problems, field, value, policy.max_batch, "max_batch")
    _cap(problems, "eval.speed_repeats", e.speed_repeats, 10, "fixed")
    _cap(problems, "pruning.sweep", len(cfg.pruning.sweep) or None, policy.max_sweep, "max_sweep")
    p = cfg.pruning
    for field, value, key in (("backend.num_threads", b.num_threads, "max_threads"),
                              ("pruning.lstsq.iters", p.lstsq.iters, "max_lstsq_iters"),
                              ("pruning.lstsq.rounds", p.lstsq.rounds, "max_lstsq_rounds"),
                              ("pruning.block_tune.epochs", p.block_tune.epochs, "max_tune_epochs"),
                              ("pruning.admm.max_iters", p.admm.max_iters, "max_admm_iters"),
                              ("pruning.swaps", p.swaps or None, "max_swap_rounds"),
                              ("backend.max_retries", b.max_retries, "max_retries")):
        _cap(problems, field, value, getattr(policy, key), key)
    if policy.require_pinned:
        for field, source, revision in (("model.revision", m.source, m.revision),
                                        ("calibration.revision", c.source, c.revision),
                                        ("eval.revision", e.source, e.revision)):
            if _is_hub(source) and not (revision and _COMMIT.fullmatch(revision)):
                problems.append(f"{field}: {revision!r}: the service policy requires hub source {source!r} to be "
                                "pinned to a commit (40 hexadecimal characters)")
    if m.source == "tiny":
        from orchestrator.inputs.models import tiny_params

        n = tiny_params(m.tiny)
        if n > policy.max_tiny_params:
            problems.append(f"model.tiny: a shape of {n:,} parameters exceeds the service limit of "
                            f"{policy.max_tiny_params:,} (policy max_tiny_params)")
    least = 2 * known_params(cfg)  # the published weights alone, in 16 bits: a lower bound on what a run writes
    if least > policy.max_job_bytes:
        problems.append(f"model.source: {m.source!r}: its weights alone take {least:,} bytes, over the service "
                        f"limit of {policy.max_job_bytes:,} bytes a job may write (policy max_job_bytes)")
    return problems

