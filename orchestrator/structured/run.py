"""Structured pruning entry point: importance -> allocation -> shrink -> (recovery).

``run_structured(cfg, model, calib_ids, progress)`` is what the coordinator calls; the
two halves (:func:`compute_importance`, :func:`apply_pruning`) are public so benchmarks
can score the dense model once and prune it several ways.
"""

from __future__ import annotations

import logging
import math
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from orchestrator.engine.local import gradient_pass, pruned_weight_names
from orchestrator.errors import UsageError
from orchestrator.inputs.config import RunConfig, StructuredConfig
from orchestrator.structured.allocation import ModuleStats, allocate, allocate_global, indicator_weights
from orchestrator.structured.compensate import shrink_and_compensate
from orchestrator.structured.depth import block_influence, least_influential, remove_blocks
from orchestrator.structured.distill import distill_targets
from orchestrator.structured.groups import KINDS, ModuleGroups, TensorSlice, decoder_params, module_groups
from orchestrator.structured.importance import (
    aggregate,
    fit_sigmas,
    fuse,
    joint_costs,
    stability,
    tensor_group_scores,
)
from orchestrator.structured.recovery import DistributedRecovery, recover, recovery_windows, used_windows
from orchestrator.structured.shrink import is_uniform, keep_groups, sync_config

log = logging.getLogger(__name__)


@dataclass
class Importance:
    """Fused group importance of the dense model.

    Attributes:
        mods: every module's groups (protection per the config).
        fused: module key -> ``(G,)`` fused importance over all calibration sequences.
        sigmas: kind -> estimator -> fitted sigma.
        cv: module key -> stability indicator over the mini-batches.
        means: module key -> mean normalised importance per mini-batch (what ``cv`` is computed from).
        seconds: wall-clock time of the gradient passes and scoring.
        raw: module key -> estimator -> ``(G,)`` aggregated score before fusion (global allocation's costs).
    """

    mods: list[ModuleGroups]
    fused: dict[str, torch.Tensor] = field(default_factory=dict)
    sigmas: dict[str, dict[str, float]] = field(default_factory=dict)
    cv: dict[str, float] = field(default_factory=dict)
    means: dict[str, list[float]] = field(default_factory=dict)
    seconds: float = 0.0
    raw: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)

    def mean_importance(self, key: str, kind: str) -> float:
        """Mean fused importance per group of a module without the constant ``sum log sigma`` term."""
        return float(self.fused[key].mean()) - sum(math.log(v) for v in self.sigmas[kind].values())


def protected_blocks(s: StructuredConfig, depth: int) -> tuple[int, int]:
    """``(first, last)`` protected blocks; defaults scale LLM-Pruner's 3 + 2 of 30 blocks to any depth."""
    first = s.protect_first if s.protect_first is not None else round(depth / 10)
    last = s.protect_last if s.protect_last is not None else round(depth / 15)
    return first, last


#: module key -> estimator -> one ``(G,)`` score per grouped weight tensor of the module (before aggregation)
SliceScores = dict[str, dict[str, list[torch.Tensor]]]


def scored_slices(mod: ModuleGroups, names: set[str]) -> list[TensorSlice]:
    """The module's grouped tensors that gradient statistics cover (the linear weights in ``names``)."""
    return [sl for sl in mod.slices if sl.name in names]


def slice_scores(params: dict[str, torch.Tensor], mods: list[ModuleGroups],
                 grads: dict[str, dict[str, torch.Tensor]], estimators: list[str]) -> SliceScores:
    """Every estimator's group scores of every scored tensor, from whole statistics (one process)."""
    return {
        mod.key: {
            est: [tensor_group_scores(sl.part(params[sl.name]), sl.part(grads[sl.name]["sum"]),
                                      None if "sq" not in grads[sl.name] else sl.part(grads[sl.name]["sq"]),
                                      est, sl.dim, sl.width) for sl in scored_slices(mod, set(grads))]
            for est in estimators
        }
        for mod in mods
    }


def fuse_all(mods: list[ModuleGroups], scores: SliceScores, how: str
             ) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, float]], dict[str, dict[str, torch.Tensor]]]:
    """Aggregate each module's tensors (``how``), fit one sigma per estimator per module kind, fuse every module.

    Returns:
        ``(fused, sigmas, aggregated)``: module key -> ``(G,)``; kind -> estimator -> sigma; module key ->
        estimator -> ``(G,)`` before fusion.
    """
    agg = {key: {est: aggregate(per_slice, how) for est, per_slice in by_est.items()} for key, by_est in scores.items()}
    fused, sigmas = {}, {}
    for kind in KINDS:
        keys = [m.key for m in mods if m.kind == kind]
        ests = list(agg[keys[0]])
        sigmas[kind] = fit_sigmas({e: [agg[k][e] for k in keys] for e in ests})
        for k in keys:
            fused[k] = fuse(agg[k], sigmas[kind])
    return fused, sigmas, agg


def importance_from(mods: list[ModuleGroups], batches: list[SliceScores], total: SliceScores, how: str,
                    seconds: float) -> Importance:
    """Fused importance of all sequences and the stability indicator over the mini-batches' scores."""
    means: dict[str, list[float]] = {m.key: [] for m in mods}
    for scores in batches:
        fused_k, sig_k, _ = fuse_all(mods, scores, how)
        for m in mods:  # drop the constant log-sigma term: the indicator must be shift-free
            means[m.key].append(float(fused_k[m.key].mean()) - sum(math.log(v) for v in sig_k[m.kind].values()))
    fused, sigmas, raw = fuse_all(mods, total, how)
    cv = {key: stability(v) for key, v in means.items()}
    return Importance(mods, fused, sigmas, cv, means, seconds, raw)


def minibatch_bounds(n: int, s: StructuredConfig) -> list[tuple[int, int]]:
    """``[lo, hi)`` of each of the ``min(structured.minibatches, N)`` mini-batches (``torch.tensor_split``'s)."""
    return [(int(c[0]), int(c[-1]) + 1) for c in torch.tensor_split(torch.arange(n), min(s.minibatches, n))]


def statistic_kinds(s: StructuredConfig) -> tuple[str, ...]:
    """Gradient statistics the estimators need: ``grad_sum``, and ``grad_sq`` for ``element2``."""
    return ("sum", "sq") if "element2" in s.estimators else ("sum",)


def compute_importance(model: nn.Module, calib_ids: torch.Tensor, s: StructuredConfig,
                       progress: bool = False) -> Importance:
    """Group importance from per-sequence gradient sums, K mini-batches at a time (one process).

    Args:
        model: the dense model.
        calib_ids: ``(N, L)`` calibration sequences.
        s: structured options (estimators, aggregation, mini-batches, protection).
        progress: show progress bars.
    """
    t0 = time.perf_counter()
    first, last = protected_blocks(s, model.config.num_hidden_layers)
    mods = module_groups(model, first, last)
    params = {n: p.detach() for n, p in model.named_parameters()}
    device = next(model.parameters()).device
    totals: dict[str, dict[str, torch.Tensor]] | None = None
    batches: list[SliceScores] = []
    for k, (lo, hi) in enumerate(minibatch_bounds(calib_ids.shape[0], s)):
        grads = gradient_pass(model, calib_ids[lo:hi].to(device), statistic_kinds(s), s.grad_scale, progress)
        batches.append(slice_scores(params, mods, grads, s.estimators))
        if totals is None:
            totals = grads
        else:
            for name, d in grads.items():
                for kind, t in d.items():
                    totals[name][kind] += t
        log.info("structured importance: mini-batch %d done (%.0f s)", k, time.perf_counter() - t0)
    assert totals is not None
    return importance_from(mods, batches, slice_scores(params, mods, totals, s.estimators), s.aggregation,
                           time.perf_counter() - t0)


def width_target(s: StructuredConfig, before: int, dense_params: int | None) -> int:
    """Parameters the groups must give: ``target`` of the dense decoder, less what depth pruning removed.

    Raises:
        UsageError: the removed blocks already exceed the target by more than 1% of the decoder.
    """
    reference = dense_params if dense_params is not None else before
    target = round(s.target * reference) - (reference - before)
    if target < -0.01 * reference:
        raise UsageError(f"structured.depth_blocks: {s.depth_blocks} blocks remove "
                         f"{(reference - before) / reference:.1%} of the decoder, more than structured.target="
                         f"{s.target}")
    return max(target, 0)


def allocation_counts(imp: Importance, s: StructuredConfig, target: int
                      ) -> tuple[list[int], dict[str, torch.Tensor], list[float | None]]:
    """Groups to remove per module, the scores that order each module's groups, and the modules' weights."""
    mods = imp.mods
    kinds = ("mlp",) if s.modules == "mlp" else KINDS
    if target <= 0:
        return [0] * len(mods), imp.fused, [None] * len(mods)
    if s.allocation == "global":
        costs = joint_costs(imp.raw, [m.key for m in mods if not m.protected and m.kind in kinds])
        removed = allocate_global(mods, costs, target, s.round_to, kinds=kinds)
        return [removed[m.key] for m in mods], costs, [None] * len(mods)
    stats = [ModuleStats(m, imp.mean_importance(m.key, m.kind), imp.cv[m.key]) for m in mods]
    if s.allocation == "uniform":
        weights = [0.0 if m.protected else 1.0 for m in mods]
    else:
        weights = indicator_weights(stats, s.indicator, s.spread)
    weights = [0.0 if m.kind not in kinds else w for m, w in zip(mods, weights, strict=True)]
    return allocate(stats, target, weights, s.round_to), imp.fused, weights


def apply_pruning(model: nn.Module, imp: Importance, s: StructuredConfig, calib_ids: torch.Tensor | None = None,
                  dense_params: int | None = None, progress: bool = False) -> dict:
    """Allocate, remove the least important groups of every module, and shrink the model in place.

    Args:
        model: a model with the same structure as the one ``imp`` was computed on.
        imp: from :func:`compute_importance`.
        s: structured options (target, allocation, indicator, spread, round_to, compensate).
        calib_ids: ``(N, L)`` calibration sequences (``s.compensate``).
        dense_params: decoder parameters of the dense model when blocks were removed before (the target
            refers to it); None: the model's own.
        progress: show progress bars.

    Returns:
        Report: allocation rows per module, parameter counts, kept sizes, sigmas, compensation errors.
    """
    before = decoder_params(model)
    target = width_target(s, before, dense_params)
    counts, scores, weights = allocation_counts(imp, s, target)
    keeps = {m.key: torch.argsort(scores[m.key], descending=True)[: m.num_groups - c]  # most important kept
             for m, c in zip(imp.mods, counts, strict=True)}
    compensation: list[dict] = []
    if s.compensate:
        if calib_ids is None:
            raise ValueError("apply_pruning: structured.compensate needs the calibration sequences")
        compensation = shrink_and_compensate(model, keeps, imp.mods, calib_ids, s.compensate_percdamp, progress,
                                             select=s.selection == "reconstruction")
    else:
        for m in imp.mods:
            keep_groups(model, m, keeps[m.key])
    rows = [{"module": m.key, "groups": m.num_groups, "removed": c, "ratio": c / m.num_groups, "weight": w,
             "cv": imp.cv[m.key], "mean_importance": imp.mean_importance(m.key, m.kind), "protected": m.protected}
            for m, c, w in zip(imp.mods, counts, weights, strict=True)]
    sizes = sync_config(model)
    after = decoder_params(model)
    reference = dense_params if dense_params is not None else before
    log.info("structured: removed %d of %d decoder parameters (%.2f%%, target %.2f%%)",
             reference - after, reference, 100 * (reference - after) / reference, 100 * s.target)
    return {"target": s.target, "allocation": s.allocation, "indicator": s.indicator, "spread": s.spread,
            "estimators": list(s.estimators), "aggregation": s.aggregation, "sigmas": imp.sigmas,
            "decoder_params_before": reference, "decoder_params_after": after,
            "removed_fraction": (reference - after) / reference, "target_params": round(s.target * reference),
            "uniform_sizes": is_uniform(sizes), "layer_sizes": sizes, "modules": rows,
            "compensation": compensation, "importance_seconds": imp.seconds}


#: the coordinator's distributed scorer: ``(mods, weight shapes, calib_ids, model_path) -> (per mini-batch, total,
#: memory)``; ``model_path`` None: the run's model, else a checkpoint of the model as it is now (blocks removed)
DistributedImportance = Callable[[list[ModuleGroups], dict[str, tuple[int, int]], torch.Tensor, str | None],
                                 tuple[list[SliceScores], SliceScores, list[dict]]]


def distributed_importance(model: nn.Module, calib_ids: torch.Tensor, s: StructuredConfig,
                           score: DistributedImportance, model_path: str | None = None
                           ) -> tuple[Importance, list[dict]]:
    """:func:`compute_importance`'s result with the gradient pass and the group sums on sharded workers.

    Args:
        model: the model (its structure; the workers load their partitions themselves).
        calib_ids: ``(N, L)`` calibration sequences.
        s: structured options.
        score: the coordinator's scorer.
        model_path: a checkpoint of ``model`` for the workers (None: the run's model source).

    Returns:
        The importance, and the workers' memory figures.
    """
    t0 = time.perf_counter()
    first, last = protected_blocks(s, model.config.num_hidden_layers)
    mods = module_groups(model, first, last)
    params = dict(model.named_parameters())
    shapes = {n: tuple(params[n].shape) for n in pruned_weight_names(model)}
    batches, total, memory = score(mods, shapes, calib_ids, model_path)
    return importance_from(mods, batches, total, s.aggregation, time.perf_counter() - t0), memory


def prune_depth(model: nn.Module, calib_ids: torch.Tensor, count: int) -> dict:
    """Remove the ``count`` blocks of lowest block influence in place; the report of what went."""
    t0 = time.perf_counter()
    influence = block_influence(model, calib_ids)
    drop = least_influential(influence, count)
    remove_blocks(model, drop)
    return {"blocks_removed": drop, "influence": influence.tolist(), "seconds": time.perf_counter() - t0}


def run_structured(cfg: RunConfig, model: nn.Module, calib_ids: torch.Tensor, progress: bool = False,
                   distributed_recovery: DistributedRecovery | None = None,
                   sharded_importance: DistributedImportance | None = None) -> tuple[nn.Module, dict]:
    """Structured pruning of ``model`` (shrunk in place): depth, importance, allocation, shrink (with
    compensation), then optional LoRA recovery (cross-entropy or distillation).

    Args:
        cfg: the run config (``cfg.structured`` is used).
        model: dense causal LM of a supported architecture.
        calib_ids: ``(N, L)`` int64 calibration sequences.
        progress: show progress bars.
        distributed_recovery: the coordinator's recovery on actors (``structured.recovery.workers > 1`` or ``zero3``).
        sharded_importance: the coordinator's ZeRO-3 scorer (``backend.kind: ray``); None: one process.

    Returns:
        ``(model, report)``: the pruned (and possibly recovered) model and the report dict.
    """
    s = cfg.structured
    dense_params = decoder_params(model)
    windows = teacher = None
    if s.recovery.enabled:
        windows = recovery_windows(cfg, calib_ids)  # (M, S)
        if s.recovery.loss == "kd":  # the dense model's targets, before anything is removed
            used = used_windows(windows.shape[0], model.config.num_hidden_layers - s.depth_blocks, s.recovery)
            teacher = distill_targets(model, windows, used, s.recovery.kd_topk, s.recovery.kd_temperature, progress)
    depth = prune_depth(model, calib_ids, s.depth_blocks) if s.depth_blocks else None
    memory: list[dict] = []
    if sharded_importance is not None:
        # beside the output (the storage every node reads, as the rank-written checkpoints need), else /tmp
        near = Path(cfg.output.dir).resolve().parent
        with tempfile.TemporaryDirectory(prefix=".rayprune-depth-", dir=near if near.is_dir() else None) as tmp:
            path = None
            if depth is not None:  # the workers load the model with its blocks removed
                model.save_pretrained(tmp, safe_serialization=True)
                path = tmp
            imp, memory = distributed_importance(model, calib_ids, s, sharded_importance, path)
    else:
        imp = compute_importance(model, calib_ids, s, progress)
    t0 = time.perf_counter()
    report = apply_pruning(model, imp, s, calib_ids, dense_params, progress)
    report["depth"] = depth
    report["importance_workers"] = memory
    report["prune_seconds"] = time.perf_counter() - t0
    if s.recovery.enabled:
        model, report["recovery"] = recover(model, windows, s.recovery, progress, distributed_recovery, teacher)
    return model, report
