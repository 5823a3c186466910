"""Semantic checks of a run config, beyond types: one line per problem, naming the field and value."""

from __future__ import annotations

from typing import TYPE_CHECKING

from orchestrator.inputs.config import DTYPES, METHODS, PATTERNS

if TYPE_CHECKING:
    from orchestrator.inputs.config import RunConfig, StructuredConfig


def validate(cfg: RunConfig) -> list[str]:
    """Semantic checks beyond types. Returns one line per problem."""
    p: list[str] = []
    m, c, pr, e, b = cfg.model, cfg.calibration, cfg.pruning, cfg.eval, cfg.backend
    if not m.source:
        p.append("model.source: must not be empty")
    if m.dtype not in DTYPES:
        p.append(f"model.dtype: {m.dtype!r} is not one of {', '.join(DTYPES)}")
    t = m.tiny
    for name in ("layers", "hidden", "heads", "kv_heads", "intermediate", "max_positions"):
        if getattr(t, name) <= 0:
            p.append(f"model.tiny.{name}: must be > 0, got {getattr(t, name)!r}")
    if t.heads > 0 and t.kv_heads > 0 and (t.heads % t.kv_heads or t.hidden % t.heads):
        p.append(
            f"model.tiny: heads ({t.heads}) must divide hidden ({t.hidden}) "
            f"and be a multiple of kv_heads ({t.kv_heads})"
        )
    if c.num_samples <= 0:
        p.append(f"calibration.num_samples: must be > 0, got {c.num_samples!r}")
    if c.seq_len < 2:
        p.append(f"calibration.seq_len: must be >= 2, got {c.seq_len!r}")
    if c.generate.temperature <= 0:
        p.append(f"calibration.generate.temperature: must be > 0, got {c.generate.temperature!r}")
    if not 0 < c.generate.top_p <= 1:
        p.append(f"calibration.generate.top_p: must be in (0, 1], got {c.generate.top_p!r}")
    if pr.method not in METHODS:
        p.append(f"pruning.method: {pr.method!r} is not one of {', '.join(METHODS)}")
    if pr.pattern not in PATTERNS:
        p.append(_pattern_problem(pr.pattern))
    elif pr.nm is not None and pr.sparsity is not None:
        n, mm = pr.nm
        if abs(pr.sparsity - n / mm) > 1e-9:
            p.append(f"pruning.sparsity: {pr.sparsity!r} contradicts pattern {pr.pattern} (implies {n / mm})")
    if pr.sparsity is not None and not 0 < pr.sparsity < 1:
        p.append(f"pruning.sparsity: must be in (0, 1), got {pr.sparsity!r}")
    if pr.sweep:
        if pr.nm is not None:
            p.append(f"pruning.sweep: needs pattern unstructured, got {pr.pattern!r}")
        for v in pr.sweep:
            if isinstance(v, bool) or not isinstance(v, int | float) or not 0 < v < 1:
                p.append(f"pruning.sweep: every sparsity must be in (0, 1), got {v!r}")
        if len(set(pr.sweep)) != len(pr.sweep):
            p.append(f"pruning.sweep: sparsities must be distinct, got {pr.sweep!r}")
        if pr.sparsity is not None and pr.sparsity not in pr.sweep:
            p.append(f"pruning.sparsity: {pr.sparsity!r} must be one of pruning.sweep {pr.sweep!r} (the saved model)")
        if cfg.backend.kind != "local":
            p.append(f"pruning.sweep: sweeps run on backend.kind=local, got {cfg.backend.kind!r}")
        if cfg.structured.enabled:
            p.append("pruning.sweep: not available with structured.enabled=true")
    if pr.gblm.norm not in ("l1", "l2"):
        p.append(f"pruning.gblm.norm: {pr.gblm.norm!r} is not one of l1, l2")
    if pr.gblm.alpha < 0:
        p.append(f"pruning.gblm.alpha: must be >= 0, got {pr.gblm.alpha!r}")
    if pr.gblm.grad_scale <= 0:
        p.append(f"pruning.gblm.grad_scale: must be > 0, got {pr.gblm.grad_scale!r}")
    if pr.sparsegpt.blocksize <= 0:
        p.append(f"pruning.sparsegpt.blocksize: must be > 0, got {pr.sparsegpt.blocksize!r}")
    if pr.sparsegpt.percdamp <= 0:
        p.append(f"pruning.sparsegpt.percdamp: must be > 0, got {pr.sparsegpt.percdamp!r}")
    p.extend(_structured_problems(cfg.structured))
    if e.num_windows <= 0:
        p.append(f"eval.num_windows: must be > 0, got {e.num_windows!r}")
    if e.seq_len < 2:
        p.append(f"eval.seq_len: must be >= 2, got {e.seq_len!r}")
    if e.workers < 0:
        p.append(f"eval.workers: must be >= 0 (0: in the coordinator process), got {e.workers!r}")
    if e.task_limit is not None and e.task_limit <= 0:
        p.append(f"eval.task_limit: must be > 0, got {e.task_limit!r}")
    if e.speed_prompt_len < 1 or e.speed_new_tokens < 2:
        p.append(f"eval.speed_new_tokens: needs prompt >= 1 and >= 2 new tokens, got {e.speed_prompt_len!r}, "
                 f"{e.speed_new_tokens!r}")
    if e.speed_repeats < 1:
        p.append(f"eval.speed_repeats: must be >= 1, got {e.speed_repeats!r}")
    if not e.speed_batch_sizes or any(not isinstance(x, int) or x < 1 for x in e.speed_batch_sizes):
        p.append(f"eval.speed_batch_sizes: must be positive integers, got {e.speed_batch_sizes!r}")
    if b.kind not in ("local", "ray"):
        p.append(f"backend.kind: {b.kind!r} is not one of local, ray")
    if b.workers <= 0:
        p.append(f"backend.workers: must be > 0, got {b.workers!r}")
    if b.forward_dtype not in DTYPES:
        p.append(f"backend.forward_dtype: {b.forward_dtype!r} is not one of {', '.join(DTYPES)}")
    if b.placement_strategy not in ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"):
        p.append(f"backend.placement_strategy: {b.placement_strategy!r} is not one of PACK, SPREAD, "
                 "STRICT_PACK, STRICT_SPREAD")
    if isinstance(b.grad_batch_size, bool) or not isinstance(b.grad_batch_size, int) or b.grad_batch_size < 1:
        p.append(f"backend.grad_batch_size: must be an integer >= 1, got {b.grad_batch_size!r}")
    if b.max_retries < 0:
        p.append(f"backend.max_retries: must be >= 0, got {b.max_retries!r}")
    if b.checkpoint_every < 1:
        p.append(f"backend.checkpoint_every: must be >= 1 (sequences per rank), got {b.checkpoint_every!r}")
    if b.collective_timeout_s <= 0:
        p.append(f"backend.collective_timeout_s: must be > 0, got {b.collective_timeout_s!r}")
    if b.num_threads < 0:
        p.append(f"backend.num_threads: must be >= 0, got {b.num_threads!r}")
    if not cfg.output.dir:
        p.append("output.dir: must not be empty")
    return p


def _structured_problems(s: StructuredConfig) -> list[str]:
    """Semantic checks of the ``structured`` section."""
    p: list[str] = []
    if not 0 < s.target < 1:
        p.append(f"structured.target: must be in (0, 1), got {s.target!r}")
    if s.allocation not in ("uniform", "adaptive"):
        p.append(f"structured.allocation: {s.allocation!r} is not one of uniform, adaptive")
    if s.indicator not in ("stability", "importance", "hybrid"):
        p.append(f"structured.indicator: {s.indicator!r} is not one of stability, importance, hybrid")
    if not 0 <= s.spread < 1:
        p.append(f"structured.spread: must be in [0, 1), got {s.spread!r}")
    known = ("element1", "element2", "vector")
    if not isinstance(s.estimators, list) or not s.estimators or any(e not in known for e in s.estimators):
        p.append(f"structured.estimators: expected a non-empty list of {', '.join(known)}, got {s.estimators!r}")
    if s.aggregation not in ("sum", "mean", "max", "prod"):
        p.append(f"structured.aggregation: {s.aggregation!r} is not one of sum, mean, max, prod")
    for name in ("protect_first", "protect_last"):
        if getattr(s, name) is not None and getattr(s, name) < 0:
            p.append(f"structured.{name}: must be >= 0 or null, got {getattr(s, name)!r}")
    for name in ("round_to", "minibatches"):
        if getattr(s, name) <= 0:
            p.append(f"structured.{name}: must be > 0, got {getattr(s, name)!r}")
    if s.grad_scale <= 0:
        p.append(f"structured.grad_scale: must be > 0, got {s.grad_scale!r}")
    r = s.recovery
    for name in ("rank", "blocks_per_group", "steps", "batch_size", "seq_len", "num_samples", "workers"):
        if getattr(r, name) <= 0:
            p.append(f"structured.recovery.{name}: must be > 0, got {getattr(r, name)!r}")
    if r.schedule not in ("joint", "sequential"):
        p.append(f"structured.recovery.schedule: {r.schedule!r} is not one of joint, sequential")
    if not 0 <= r.warmup < 1:
        p.append(f"structured.recovery.warmup: must be in [0, 1), got {r.warmup!r}")
    if r.alpha <= 0 or r.lr <= 0:
        p.append(f"structured.recovery: alpha and lr must be > 0, got {r.alpha!r}, {r.lr!r}")
    if r.forward_dtype not in DTYPES:
        p.append(f"structured.recovery.forward_dtype: {r.forward_dtype!r} is not one of {', '.join(DTYPES)}")
    if not 0 <= r.dropout < 1:
        p.append(f"structured.recovery.dropout: must be in [0, 1), got {r.dropout!r}")
    return p


def _pattern_problem(pattern: str) -> str:
    parts = str(pattern).split(":")
    if len(parts) == 2 and all(x.isdigit() for x in parts) and int(parts[0]) >= int(parts[1]):
        return f"pruning.pattern: {pattern!r} needs N < M"
    return f"pruning.pattern: {pattern!r} is not one of {', '.join(PATTERNS)}"
