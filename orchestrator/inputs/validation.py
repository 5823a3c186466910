"""Cross-field rules of a run config (one line per problem, naming the field and value).

Types, choices and the range of each single field are declared on the fields themselves
(:func:`orchestrator.inputs.config.opt`) and checked while the config is built; what is left here
needs more than one field, or every element of a list.
"""

from __future__ import annotations

from typing import Any


def validate(cfg: Any) -> list[str]:
    """Rules that span fields of a built :class:`~orchestrator.inputs.config.RunConfig`."""
    p: list[str] = []
    t, pr, e = cfg.model.tiny, cfg.pruning, cfg.eval
    if t.heads > 0 and t.kv_heads > 0 and (t.heads % t.kv_heads or t.hidden % t.heads):
        p.append(f"model.tiny: heads ({t.heads}) must divide hidden ({t.hidden}) "
                 f"and be a multiple of kv_heads ({t.kv_heads})")
    if pr.nm is not None and pr.sparsity is not None:
        n, m = pr.nm
        if abs(pr.sparsity - n / m) > 1e-9:
            p.append(f"pruning.sparsity: {pr.sparsity!r} contradicts pattern {pr.pattern} (implies {n / m})")
    p.extend(_sweep_problems(cfg))
    if pr.search != "none" and pr.reconstruct == "none":
        p.append(f"pruning.search: {pr.search} needs the layers' X^T X: set pruning.reconstruct to layer or block")
    if pr.swaps and pr.reconstruct == "none":
        p.append(f"pruning.swaps: {pr.swaps} needs the layers' X^T X: set pruning.reconstruct to layer or block")
    if pr.allocation == "owl" and pr.nm is not None:
        p.append(f"pruning.allocation: owl needs pattern unstructured (N:M fixes every block's sparsity), "
                 f"got {pr.pattern!r}")
    if pr.allocation == "owl" and pr.sweep:
        p.append("pruning.allocation: owl is not available with pruning.sweep yet")
    if e.shard and cfg.eval_workers() < 1:
        p.append(f"eval.shard: needs evaluation actors to shard over (eval.workers >= 1), got "
                 f"eval.workers={cfg.eval_workers()}")
    if cfg.structured.selection == "reconstruction" and not cfg.structured.compensate:
        p.append("structured.selection: reconstruction needs structured.compensate=true (it chooses groups on the "
                 "inputs the compensation gathers)")
    rec = cfg.structured.recovery
    if rec.zero3 and rec.schedule != "joint":
        p.append(f"structured.recovery.zero3: needs schedule joint (one adapter phase on the partitioned model), "
                 f"got structured.recovery.schedule={rec.schedule!r}")
    if not e.speed_batch_sizes or any(x < 1 for x in e.speed_batch_sizes):
        p.append(f"eval.speed_batch_sizes: must be positive integers, got {e.speed_batch_sizes!r}")
    return p


def _sweep_problems(cfg: Any) -> list[str]:
    pr, p = cfg.pruning, []
    if not pr.sweep:
        return p
    if pr.nm is not None:
        p.append(f"pruning.sweep: needs pattern unstructured, got {pr.pattern!r}")
    for v in pr.sweep:
        if not 0 < v < 1:
            p.append(f"pruning.sweep: every sparsity must be in (0, 1), got {v!r}")
    if len(set(pr.sweep)) != len(pr.sweep):
        p.append(f"pruning.sweep: sparsities must be distinct, got {pr.sweep!r}")
    if pr.sparsity is not None and pr.sparsity not in pr.sweep:
        p.append(f"pruning.sparsity: {pr.sparsity!r} must be one of pruning.sweep {pr.sweep!r} (the saved model)")
    if cfg.structured.enabled:
        p.append("pruning.sweep: not available with structured.enabled=true")
    if pr.reconstruct == "block":
        p.append("pruning.reconstruct: block is not available with pruning.sweep yet (use layer)")
    return p
