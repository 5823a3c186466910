"""One entry point that prunes a single weight with the configured method."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from orchestrator.pruning.masks import build_mask
from orchestrator.pruning.scores import gblm_score, magnitude_score, wanda_score
from orchestrator.pruning.sparsegpt import sparsegpt_prune
from orchestrator.pruning.stats import ActivationStats


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


def needs_activations(method: str) -> bool:
    """Whether ``method`` needs activation statistics."""
    return method in ("wanda", "gblm", "sparsegpt")


def needs_xtx(method: str, reconstruct: str = "none") -> bool:
    """Whether ``method`` (or the reconstruction after its mask) needs ``sum x x^T``."""
    return method == "sparsegpt" or reconstruct != "none"


def gradient_kinds(method: str, norm: str = "l1") -> tuple[str, ...]:
    """Gradient sums that ``method`` needs (empty for gradient-free methods)."""
    if method == "gblm":
        return ("abs",) if norm == "l1" else ("sq",)
    return ()


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
        method: ``magnitude``, ``wanda``, ``gblm`` or ``sparsegpt``.
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
    if method == "sparsegpt":
        if act is None:
            raise ValueError(f"{name}: sparsegpt needs activation statistics")
        new_w, mask = sparsegpt_prune(weight, act.hessian(), sparsity, nm, blocksize, percdamp, name)
        return LayerPruneResult(new_w, mask, float("nan"))
    if method == "magnitude":
        score = magnitude_score(weight)
        mask = build_mask(score, sparsity, nm, per_row=False)
    elif method == "wanda":
        if act is None:
            raise ValueError(f"{name}: wanda needs activation statistics")
        score = wanda_score(weight, act.input_norm())
        mask = build_mask(score, sparsity, nm)
    elif method == "gblm":
        if act is None or grad is None:
            raise ValueError(f"{name}: gblm needs activation and gradient statistics")
        score = gblm_score(weight, act.input_norm(), grad, alpha, norm, grad_scale, weighting)
        mask = build_mask(score, sparsity, nm)
    else:
        raise ValueError(f"unknown pruning method {method!r}")
    new_w = weight.detach().clone()
    new_w.masked_fill_(mask, 0)
    kept = score[~mask]
    return LayerPruneResult(new_w, mask, float(kept.mean()) if kept.numel() else 0.0)
