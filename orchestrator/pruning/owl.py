"""Outlier-weighted layer-wise sparsity (OWL; METHODS.md section 2, "allocation").

Blocks whose Wanda scores ``|W_ij| * ||X_j||`` hold more outliers (scores above ``M`` times the
block's mean score) are pruned less, the others more, keeping the parameter-weighted mean
sparsity at the target:

1. ``D_i``: the outlier fraction of block ``i`` (all its linears' scores together);
2. ``D`` min-max scaled to ``[0, 2 * lam]``;
3. ``s_i = target - (D_i - mean_w(D))`` with ``mean_w`` weighted by parameters, then a common
   shift (found by bisection) so the clipped ``s_i`` still average to the target.

Torch only.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

#: no block is pruned beyond this (nor below 0)
MAX_SPARSITY = 0.99


def outlier_counts(scores: Iterable[torch.Tensor], threshold: float) -> tuple[int, int]:
    """Outliers of one block: scores above ``threshold`` times the block's mean score.

    Args:
        scores: the block's ``(out, in)`` Wanda scores, one per linear.
        threshold: OWL's ``M`` (5 in the paper).

    Returns:
        ``(outliers, total)`` counts over all the block's scores.
    """
    flat = torch.cat([s.detach().float().reshape(-1) for s in scores])
    return int((flat > threshold * flat.mean()).sum()), int(flat.numel())


def owl_sparsities(outlier_ratios: Sequence[float], target: float, lam: float,
                   params: Sequence[int] | None = None) -> list[float]:
    """Per-block sparsities whose parameter-weighted mean is ``target``; more outliers, less pruned.

    Args:
        outlier_ratios: ``D_i`` per block, in block order.
        target: the global sparsity.
        lam: OWL's lambda: how far blocks move from ``target`` (at most ``2 * lam`` apart).
        params: prunable parameters per block (equal when None).

    Returns:
        Sparsity per block in ``[0, MAX_SPARSITY]``.
    """
    if not outlier_ratios:
        return []
    d = torch.tensor(outlier_ratios, dtype=torch.float64)
    w = torch.tensor(params if params is not None else [1] * len(d), dtype=torch.float64)
    if len(w) != len(d) or bool((w <= 0).any()):
        raise ValueError("params must give one positive count per block")
    w = w / w.sum()
    spread = d.max() - d.min()
    d = (d - d.min()) / spread * (2 * lam) if spread > 0 else torch.zeros_like(d)
    base = target - (d - (w * d).sum())

    def mean_at(shift: float) -> float:
        return float((w * (base + shift).clamp(0, MAX_SPARSITY)).sum())

    lo, hi = -1.0, 1.0
    for _ in range(100):  # the clipped mean rises monotonically with the shift
        mid = (lo + hi) / 2
        if mean_at(mid) < target:
            lo = mid
        else:
            hi = mid
    return [float(s) for s in (base + (lo + hi) / 2).clamp(0, MAX_SPARSITY)]
