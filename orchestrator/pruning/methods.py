"""One entry point that prunes a single weight with the configured method."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from orchestrator.pruning.admm import AdmmSettings, admm_mask
from orchestrator.pruning.masks import build_mask, nm_mask
from orchestrator.pruning.reconstruct import output_error, reconstruct
from orchestrator.pruning.scores import gblm_score, gradient_term, magnitude_score, wanda_score
from orchestrator.pruning.sparsegpt import sparsegpt_prune
from orchestrator.pruning.stats import ActivationStats
from orchestrator.pruning.swaps import refine_swaps

#: methods that choose their mask inside SparseGPT's OBS update (they need ``sum x x^T``)
OBS_METHODS = ("sparsegpt", "gblm-sparsegpt")
#: methods that score with GBLM's per-sequence gradient statistics
GRADIENT_METHODS = ("gblm", "gblm-sparsegpt")


@dataclass
class LayerPruneResult:
    """Outcome of pruning one weight.

    Attributes:
        weight: ``(out, in)`` the pruned (SparseGPT: also updated) weight.
        mask: ``(out, in)`` bool, True = pruned.
        score_mean: mean importance score of the kept weights (for the report), NaN for SparseGPT.
    """

    weight: torch.Tensor
    mask: torch.Tensor
    score_mean: float


def needs_xtx(method: str, reconstruct: str = "none") -> bool:
    """Whether ``method`` (or the reconstruction after its mask) needs ``sum x x^T``."""
    return method in OBS_METHODS or reconstruct != "none"


def gradient_kinds(method: str, norm: str = "l1") -> tuple[str, ...]:
    """Gradient sums that ``method`` needs (empty for gradient-free methods)."""
    if method in GRADIENT_METHODS:
        return ("abs",) if norm == "l1" else ("sq",)
    return ()


def gradient_rows(n: int, k: int | None) -> tuple[int, ...] | None:
    """The calibration windows the gradient pass uses: ``k`` of ``n``, evenly spaced (``floor(i * n / k)``;
    the same on every backend, and spread over contiguous worker shards); None: all of them."""
    if k is None or k >= n:
        return None
    return tuple(i * n // k for i in range(k))


def gradient_sum_scale(norm: str, n: int, rows: tuple[int, ...] | None) -> float:
    """Factor on each per-sample gradient that makes sums over ``rows`` estimate the sums over all ``n``
    windows: ``n / k`` for ``l1`` (``sum |g|``), ``sqrt(n / k)`` for ``l2`` (``sum g^2``); 1 for all rows."""
    if rows is None:
        return 1.0
    ratio = n / len(rows)
    return ratio if norm == "l1" else math.sqrt(ratio)


def gradient_sampling(n: int, k: int | None, norm: str, grad_scale: float) -> tuple[tuple[int, ...] | None, float]:
    """The gradient pass of a method's statistics over ``n`` windows with ``gblm.grad_samples = k``: the rows
    it runs (:func:`gradient_rows`) and the factor on each per-sample gradient (``grad_scale`` times
    :func:`gradient_sum_scale`). One answer for every backend."""
    rows = gradient_rows(n, k)
    return rows, grad_scale * gradient_sum_scale(norm, n, rows)


def layer_score(weight: torch.Tensor, method: str, act: ActivationStats | None = None,
                grad: torch.Tensor | None = None, alpha: float = 100.0, norm: str = "l1", grad_scale: float = 1.0,
                weighting: str = "raw", name: str = "layer") -> torch.Tensor:
    """The ``(out, in)`` importance score of ``weight`` under a score-based method (not SparseGPT)."""
    if method == "magnitude":
        return magnitude_score(weight)
    if method == "wanda":
        if act is None:
            raise ValueError(f"{name}: wanda needs activation statistics")
        return wanda_score(weight, act.input_norm())
    if method == "gblm":
        if act is None or grad is None:
            raise ValueError(f"{name}: gblm needs activation and gradient statistics")
        return gblm_score(weight, act.input_norm(), grad, alpha, norm, grad_scale, weighting)
    raise ValueError(f"unknown pruning method {method!r}")


def prune_weight(
    weight: torch.Tensor,
    method: str,
    sparsity: float,
    nm: tuple[int, int] | None,
    act: ActivationStats | None = None,
    grad: torch.Tensor | None = None,
    alpha: float = 100.0,
    norm: str = "l1",
    grad_scale: float = 1.0,
    weighting: str = "raw",
    blocksize: int = 128,
    percdamp: float = 0.01,
    name: str = "layer",
) -> LayerPruneResult:
    """Score and prune one ``(out, in)`` weight.

    Args:
        weight: the dense weight (not modified).
        method: ``magnitude``, ``wanda``, ``gblm``, ``sparsegpt`` or ``gblm-sparsegpt`` (SparseGPT with
            the normalised GBLM gradient term, weight ``alpha``, in its mask saliency).
        sparsity: target fraction for unstructured patterns.
        nm: ``(n, m)`` or None.
        act: activation statistics of this layer's input (all but magnitude).
        grad: GBLM's gradient statistic (``grad_abs`` for l1, ``grad_sq`` for l2).
        alpha: GBLM's alpha.
        norm: GBLM's gradient norm.
        grad_scale: factor the gradient statistics were accumulated with.
        weighting: GBLM's ``raw`` or scale-free ``normalized`` terms (alpha is then relative).
        blocksize: SparseGPT column block.
        percdamp: SparseGPT damping.
        name: layer name for messages.

    Returns:
        The pruned weight, its mask and a score summary.
    """
    if method in OBS_METHODS:
        if act is None:
            raise ValueError(f"{name}: {method} needs activation statistics")
        g = None
        if method == "gblm-sparsegpt":
            if grad is None:
                raise ValueError(f"{name}: gblm-sparsegpt needs gradient statistics")
            g = gradient_term(grad, norm)
        new_w, mask = sparsegpt_prune(weight, act.hessian(), sparsity, nm, blocksize, percdamp, name, g, alpha,
                                      own_hessian=True)  # hessian() is a fresh tensor
        return LayerPruneResult(new_w, mask, float("nan"))
    score = layer_score(weight, method, act, grad, alpha, norm, grad_scale, weighting, name)
    mask = build_mask(score, sparsity, nm, per_row=method != "magnitude")
    new_w = weight.detach().clone()
    new_w.masked_fill_(mask, 0)
    kept = score[~mask]
    return LayerPruneResult(new_w, mask, float(kept.mean()) if kept.numel() else 0.0)


def prune_reconstructed(
    weight: torch.Tensor,
    method: str,
    sparsity: float,
    nm: tuple[int, int] | None,
    act: ActivationStats,
    rounds: int = 1,
    solver: str = "cg",
    lstsq_damp: float = 0.01,
    iters: int = 10,
    tol: float = 0.0,
    search: AdmmSettings | None = None,
    swaps: int = 0,
    **method_kw: Any,
) -> LayerPruneResult:
    """Prune one weight, then re-solve its kept weights by least squares (``reconstruct: layer``).

    With ``rounds > 1`` (score-based methods) the mask grows gradually: round ``t`` of ``T`` prunes
    to ``t/T`` of the target (N:M: ``ceil(n t / T)`` of every ``m``), scoring the weights the last
    round reconstructed, with every weight pruned so far staying pruned; each round re-solves the
    kept weights from the dense ones. SparseGPT picks its own mask in one round.

    Args:
        weight: the dense ``(out, in)`` weight (not modified).
        method, sparsity, nm: as for :func:`prune_weight`.
        act: the layer's input statistics, with ``xtx``.
        rounds: mask-selection rounds ``T``.
        solver, lstsq_damp, iters, tol: the least-squares solver
            (:func:`~orchestrator.pruning.reconstruct.reconstruct`).
        search: ADMM settings: search the support from the method's mask (one round; see
            :func:`_search_support`), or None.
        swaps: rounds of swap refinement after the mask (and the search); 0: none.
        **method_kw: the rest of :func:`prune_weight`'s options (GBLM's gradient, alpha, ...).

    Returns:
        The reconstructed weight, its mask and the final round's score summary.
    """
    if act is None or act.xtx is None:
        raise ValueError(f"{method_kw.get('name', 'layer')}: reconstruction needs activation statistics with xtx")
    if method in OBS_METHODS or rounds <= 1 or search is not None or swaps:
        res = prune_weight(weight, method, sparsity, nm, act=act, **method_kw)
        res.weight = reconstruct(weight, res.mask, act.xtx, solver, lstsq_damp, iters, tol)
        if search is not None or swaps:
            res = _search_support(weight, res, sparsity, nm, act.xtx, search, swaps, (solver, lstsq_damp, iters, tol),
                                  method, method_kw)
        return res
    score_kw = {k: v for k, v in method_kw.items() if k in ("grad", "alpha", "norm", "grad_scale", "weighting", "name")}
    current = weight
    mask = torch.zeros_like(weight, dtype=torch.bool)
    steps = range(1, (min(rounds, nm[0]) if nm is not None else rounds) + 1)
    for t in steps:
        score = layer_score(current, method, act, **score_kw).masked_fill(mask, float("-inf"))  # (out, in)
        if nm is not None:
            mask = nm_mask(score, math.ceil(nm[0] * t / len(steps)), nm[1])
        else:
            mask = build_mask(score, sparsity * t / len(steps), None, per_row=method != "magnitude")
        current = reconstruct(weight, mask, act.xtx, solver, lstsq_damp, iters, tol)
    kept = score[~mask]
    return LayerPruneResult(current, mask, float(kept.mean()) if kept.numel() else 0.0)


def _search_support(weight: torch.Tensor, start: LayerPruneResult, sparsity: float, nm: tuple[int, int] | None,
                    xtx: torch.Tensor, settings: AdmmSettings | None, swaps: int, lstsq: tuple, method: str,
                    method_kw: dict[str, Any]) -> LayerPruneResult:
    """Improve ``start`` (the method's mask, kept weights re-solved): the ADMM support searched from its mask
    (``settings``), then ``swaps`` rounds of swap moves, the kept weights re-solved after each. A step whose
    result reconstructs the layer worse is dropped, so the output error never rises above ``start``'s."""
    h = xtx.float()  # (in, in): the objective in fp32 (a comparison of two errors, not a result)
    best, best_err = start, output_error(start.weight, weight, h)

    def consider(w: torch.Tensor, mask: torch.Tensor) -> None:
        nonlocal best, best_err
        err = output_error(w, weight, h)
        if err < best_err:
            best, best_err = LayerPruneResult(w.to(weight.dtype), mask, start.score_mean), err

    if settings is not None:
        g = None
        if method in GRADIENT_METHODS and method_kw.get("grad") is not None:
            g = gradient_term(method_kw["grad"], method_kw.get("norm", "l1"))
        found = admm_mask(weight, xtx, sparsity, nm, init_mask=start.mask, grad_term=g, settings=settings)
        consider(reconstruct(weight, found.mask, xtx, *lstsq), found.mask)
    if swaps:
        moved = refine_swaps(best.weight, weight, best.mask, xtx, nm, swaps, percdamp=lstsq[1])
        consider(moved.weight, moved.mask)
        consider(reconstruct(weight, moved.mask, xtx, *lstsq), moved.mask)
    return best
