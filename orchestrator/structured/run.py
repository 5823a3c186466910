"""Structured pruning entry point: importance -> allocation -> shrink -> (recovery).

``run_structured(cfg, model, calib_ids, progress)`` is what the coordinator calls; the
two halves (:func:`compute_importance`, :func:`apply_pruning`) are public so benchmarks
can score the dense model once and prune it several ways.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from orchestrator.engine.local import gradient_pass, pruned_weight_names
from orchestrator.inputs.config import RunConfig, StructuredConfig
from orchestrator.structured.allocation import ModuleStats, allocate, indicator_weights
from orchestrator.structured.groups import KINDS, ModuleGroups, TensorSlice, decoder_params, module_groups
from orchestrator.structured.importance import aggregate, fit_sigmas, fuse, stability, tensor_group_scores
from orchestrator.structured.recovery import DistributedRecovery, recover, recovery_windows
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
    """

    mods: list[ModuleGroups]
    fused: dict[str, torch.Tensor] = field(default_factory=dict)
    sigmas: dict[str, dict[str, float]] = field(default_factory=dict)
    cv: dict[str, float] = field(default_factory=dict)
    means: dict[str, list[float]] = field(default_factory=dict)
    seconds: float = 0.0

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
             ) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, float]]]:
    """Aggregate each module's tensors (``how``), fit one sigma per estimator per module kind, fuse every module."""
    agg = {key: {est: aggregate(per_slice, how) for est, per_slice in by_est.items()} for key, by_est in scores.items()}
    fused, sigmas = {}, {}
    for kind in KINDS:
        keys = [m.key for m in mods if m.kind == kind]
        ests = list(agg[keys[0]])
        sigmas[kind] = fit_sigmas({e: [agg[k][e] for k in keys] for e in ests})
        for k in keys:
            fused[k] = fuse(agg[k], sigmas[kind])
    return fused, sigmas


def importance_from(mods: list[ModuleGroups], batches: list[SliceScores], total: SliceScores, how: str,
                    seconds: float) -> Importance:
    """Fused importance of all sequences and the stability indicator over the mini-batches' scores."""
    means: dict[str, list[float]] = {m.key: [] for m in mods}
    for scores in batches:
        fused_k, sig_k = fuse_all(mods, scores, how)
        for m in mods:  # drop the constant log-sigma term: the indicator must be shift-free
            means[m.key].append(float(fused_k[m.key].mean()) - sum(math.log(v) for v in sig_k[m.kind].values()))
    fused, sigmas = fuse_all(mods, total, how)
    cv = {key: stability(v) for key, v in means.items()}
    return Importance(mods, fused, sigmas, cv, means, seconds)


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


def apply_pruning(model: nn.Module, imp: Importance, s: StructuredConfig) -> dict:
    """Allocate, remove the least important groups of every module, and shrink the model in place.

    Args:
        model: a model with the same structure as the one ``imp`` was computed on.
        imp: from :func:`compute_importance`.
        s: structured options (target, allocation, indicator, spread, round_to).

    Returns:
        Report: allocation rows per module, parameter counts, kept sizes, sigmas.
    """
    before = decoder_params(model)
    stats = [ModuleStats(m, imp.mean_importance(m.key, m.kind), imp.cv[m.key]) for m in imp.mods]
    if s.allocation == "uniform":
        weights = [0.0 if m.protected else 1.0 for m in imp.mods]
    else:
        weights = indicator_weights(stats, s.indicator, s.spread)
    if s.modules == "mlp":  # attention kept whole: the whole target comes from MLP channels
        weights = [0.0 if m.kind == "attn" else w for m, w in zip(imp.mods, weights, strict=True)]
    target = round(s.target * before)
    counts = allocate(stats, target, weights, s.round_to)
    rows = []
    for m, c, w, st in zip(imp.mods, counts, weights, stats, strict=True):
        order = torch.argsort(imp.fused[m.key], descending=True)  # most important first
        keep_groups(model, m, order[: m.num_groups - c])
        rows.append({"module": m.key, "groups": m.num_groups, "removed": c, "ratio": c / m.num_groups,
                     "weight": w, "cv": imp.cv[m.key], "mean_importance": st.mean_importance,
                     "protected": m.protected})
    sizes = sync_config(model)
    after = decoder_params(model)
    log.info("structured: removed %d of %d decoder parameters (%.2f%%, target %.2f%%)",
             before - after, before, 100 * (before - after) / before, 100 * s.target)
    return {"target": s.target, "allocation": s.allocation, "indicator": s.indicator, "spread": s.spread,
            "estimators": list(s.estimators), "aggregation": s.aggregation, "sigmas": imp.sigmas,
            "decoder_params_before": before, "decoder_params_after": after,
            "removed_fraction": (before - after) / before, "target_params": target,
            "uniform_sizes": is_uniform(sizes), "layer_sizes": sizes, "modules": rows,
            "importance_seconds": imp.seconds}


#: the coordinator's distributed scorer: ``(mods, weight shapes, calib_ids) -> (per mini-batch, total, memory)``
DistributedImportance = Callable[[list[ModuleGroups], dict[str, tuple[int, int]], torch.Tensor],
                                 tuple[list[SliceScores], SliceScores, list[dict]]]


def distributed_importance(model: nn.Module, calib_ids: torch.Tensor, s: StructuredConfig,
                           score: DistributedImportance) -> tuple[Importance, list[dict]]:
    """:func:`compute_importance`'s result with the gradient pass and the group sums on sharded workers.

    Returns:
        The importance, and the workers' memory figures.
    """
    t0 = time.perf_counter()
    first, last = protected_blocks(s, model.config.num_hidden_layers)
    mods = module_groups(model, first, last)
    params = dict(model.named_parameters())
    shapes = {n: tuple(params[n].shape) for n in pruned_weight_names(model)}
    batches, total, memory = score(mods, shapes, calib_ids)
    return importance_from(mods, batches, total, s.aggregation, time.perf_counter() - t0), memory


def run_structured(cfg: RunConfig, model: nn.Module, calib_ids: torch.Tensor, progress: bool = False,
                   distributed_recovery: DistributedRecovery | None = None,
                   sharded_importance: DistributedImportance | None = None) -> tuple[nn.Module, dict]:
    """SAAP structured pruning of ``model`` (shrunk in place) plus optional LoRA recovery.

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
    memory: list[dict] = []
    if sharded_importance is not None:
        imp, memory = distributed_importance(model, calib_ids, s, sharded_importance)
    else:
        imp = compute_importance(model, calib_ids, s, progress)
    t0 = time.perf_counter()
    report = apply_pruning(model, imp, s)
    report["importance_workers"] = memory
    report["prune_seconds"] = time.perf_counter() - t0
    if s.recovery.enabled:
        model, report["recovery"] = recover(model, recovery_windows(cfg, calib_ids), s.recovery, progress,
                                            distributed_recovery)
    return model, report
