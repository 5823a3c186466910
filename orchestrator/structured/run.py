"""Structured pruning entry point: importance -> allocation -> shrink -> (recovery).

``run_structured(cfg, model, calib_ids, progress)`` is what the coordinator calls; the
two halves (:func:`compute_importance`, :func:`apply_pruning`) are public so benchmarks
can score the dense model once and prune it several ways.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from orchestrator.engine.local import gradient_pass
from orchestrator.inputs.config import RunConfig, StructuredConfig
from orchestrator.structured.allocation import ModuleStats, allocate, indicator_weights
from orchestrator.structured.groups import KINDS, ModuleGroups, decoder_params, module_groups
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


def module_scores(params: dict[str, torch.Tensor], mods: list[ModuleGroups],
                  grads: dict[str, dict[str, torch.Tensor]], estimators: list[str], how: str
                  ) -> dict[str, dict[str, torch.Tensor]]:
    """module key -> estimator -> ``(G,)`` score, aggregated over the group's weight tensors."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for mod in mods:
        slices = [sl for sl in mod.slices if sl.name in grads]  # gradients cover linear weights
        out[mod.key] = {
            est: aggregate([
                tensor_group_scores(sl.part(params[sl.name]), sl.part(grads[sl.name]["sum"]),
                                    None if "sq" not in grads[sl.name] else sl.part(grads[sl.name]["sq"]),
                                    est, sl.dim, sl.width) for sl in slices
            ], how)
            for est in estimators
        }
    return out


def fuse_all(mods: list[ModuleGroups], scores: dict[str, dict[str, torch.Tensor]]
             ) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, float]]]:
    """Fit one sigma per estimator per module kind and fuse every module's scores."""
    fused, sigmas = {}, {}
    for kind in KINDS:
        keys = [m.key for m in mods if m.kind == kind]
        ests = list(scores[keys[0]])
        sigmas[kind] = fit_sigmas({e: [scores[k][e] for k in keys] for e in ests})
        for k in keys:
            fused[k] = fuse(scores[k], sigmas[kind])
    return fused, sigmas


def compute_importance(model: nn.Module, calib_ids: torch.Tensor, s: StructuredConfig,
                       progress: bool = False) -> Importance:
    """Group importance from per-sequence gradient sums, K mini-batches at a time.

    Args:
        model: the dense model.
        calib_ids: ``(N, L)`` calibration sequences.
        s: structured options (estimators, aggregation, mini-batches, protection).
        progress: show progress bars.
    """
    t0 = time.perf_counter()
    first, last = protected_blocks(s, model.config.num_hidden_layers)
    mods = module_groups(model, first, last)
    kinds = ("sum", "sq") if "element2" in s.estimators else ("sum",)
    params = {n: p.detach() for n, p in model.named_parameters()}
    device = next(model.parameters()).device
    totals: dict[str, dict[str, torch.Tensor]] | None = None
    means: dict[str, list[float]] = {m.key: [] for m in mods}
    for k, chunk in enumerate(torch.tensor_split(calib_ids, min(s.minibatches, calib_ids.shape[0]))):
        grads = gradient_pass(model, chunk.to(device), kinds, s.grad_scale, progress)
        fused_k, sig_k = fuse_all(mods, module_scores(params, mods, grads, s.estimators, s.aggregation))
        for m in mods:  # drop the constant log-sigma term: the indicator must be shift-free
            means[m.key].append(float(fused_k[m.key].mean()) - sum(math.log(v) for v in sig_k[m.kind].values()))
        if totals is None:
            totals = grads
        else:
            for name, d in grads.items():
                for kind, t in d.items():
                    totals[name][kind] += t
        log.info("structured importance: mini-batch %d done (%.0f s)", k, time.perf_counter() - t0)
    assert totals is not None
    fused, sigmas = fuse_all(mods, module_scores(params, mods, totals, s.estimators, s.aggregation))
    cv = {key: stability(v) for key, v in means.items()}
    return Importance(mods, fused, sigmas, cv, means, time.perf_counter() - t0)


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


def run_structured(cfg: RunConfig, model: nn.Module, calib_ids: torch.Tensor, progress: bool = False,
                   distributed_recovery: DistributedRecovery | None = None) -> tuple[nn.Module, dict]:
    """SAAP structured pruning of ``model`` (shrunk in place) plus optional LoRA recovery.

    Args:
        cfg: the run config (``cfg.structured`` is used).
        model: dense causal LM of a supported architecture.
        calib_ids: ``(N, L)`` int64 calibration sequences.
        progress: show progress bars.
        distributed_recovery: the coordinator's data-parallel recovery (``structured.recovery.workers > 1``).

    Returns:
        ``(model, report)``: the pruned (and possibly recovered) model and the report dict.
    """
    s = cfg.structured
    imp = compute_importance(model, calib_ids, s, progress)
    t0 = time.perf_counter()
    report = apply_pruning(model, imp, s)
    report["prune_seconds"] = time.perf_counter() - t0
    if s.recovery.enabled:
        model, report["recovery"] = recover(model, recovery_windows(cfg, calib_ids), s.recovery, progress,
                                            distributed_recovery)
    return model, report
