"""Group importance estimators and their uncertainty-weighted fusion (pure tensor math).

Inputs are gradient sums over per-sequence gradients: ``grad_sum = sum_n g_n`` and
``grad_sq = sum_n g_n ** 2`` (the Fisher diagonal), shaped like the weight.

Estimators (METHODS.md section 5), each reduced to one score per group and per tensor,
then aggregated over the group's tensors:

- ``element1``: first-order Taylor, element-wise: ``sum |W * grad_sum|``;
- ``element2``: second-order, element-wise: ``sum |W * grad_sum - 0.5 * W^2 * grad_sq|``;
- ``vector``: first-order Taylor of the whole group vector: ``|sum (W * grad_sum)|``.

Fusion by homoscedastic uncertainty, one sigma per estimator per module kind with the
closed-form maximum likelihood ``sigma_m^2 = mean over groups of I_m``:
``I = sum_m I_m / (2 sigma_m^2) + log sigma_m``.
"""

from __future__ import annotations

import math

import torch

ESTIMATORS = ("element1", "element2", "vector")
AGGREGATIONS = ("sum", "mean", "max", "prod")


def tensor_group_scores(weight: torch.Tensor, grad_sum: torch.Tensor, grad_sq: torch.Tensor | None,
                        estimator: str, dim: int, width: int) -> torch.Tensor:
    """One estimator's score of every group of one tensor.

    Args:
        weight: the parameter (any shape; groups along ``dim``).
        grad_sum: ``sum_n g_n``, shaped like ``weight``.
        grad_sq: ``sum_n g_n ** 2`` (needed by ``element2`` only).
        estimator: one of :data:`ESTIMATORS`.
        dim: group axis.
        width: entries per group along ``dim``.

    Returns:
        ``(G,)`` fp32, ``G = weight.shape[dim] / width``.
    """
    elem = element_scores(weight, grad_sum, grad_sq, estimator).movedim(dim, 0)  # (G * width, ...)
    per_group = elem.reshape(elem.shape[0] // width, -1).sum(dim=1)  # (G,)
    return per_group.abs() if estimator == "vector" else per_group


def element_scores(weight: torch.Tensor, grad_sum: torch.Tensor, grad_sq: torch.Tensor | None,
                   estimator: str) -> torch.Tensor:
    """One estimator's per-element term (fp32, shaped like ``weight``), summed per group afterwards.

    ``vector``'s term is signed (its group score is the absolute value of the group's sum).
    """
    w = weight.float()
    wg = w * grad_sum.float()
    if estimator == "element1":
        return wg.abs()
    if estimator == "element2":
        if grad_sq is None:
            raise ValueError("element2 needs grad_sq")
        return (wg - 0.5 * w.pow(2) * grad_sq.float()).abs()
    if estimator == "vector":
        return wg
    raise ValueError(f"unknown estimator {estimator!r}")


def partition_group_sums(weight: torch.Tensor, grad_sum: torch.Tensor, grad_sq: torch.Tensor | None,
                         estimator: str, start: int, shape: tuple[int, int], dim: int, width: int,
                         offset: int, groups: int, chunk: int = 1 << 22) -> torch.Tensor:
    """A partition's share of every group's sum of :func:`element_scores` (before ``vector``'s absolute value).

    A ZeRO-3 rank holds elements ``[start, start + P)`` of a 2-D parameter flattened row-major (padded at the
    end); a group's elements are spread over several ranks' partitions, so each rank sums the elements it
    holds and the ranks add their ``(G,)`` vectors (:func:`finish_group_scores` then gives the group scores).
    The partition is laid out as whole rows (zeros before its first element and after its last), summed per
    row (row groups) or per column (column groups), and the row or column sums are added per group.

    Args:
        weight: ``(P,)`` the rank's partition of the parameter.
        grad_sum: ``(P,)`` its partition of ``sum_n g_n``.
        grad_sq: ``(P,)`` its partition of ``sum_n g_n ** 2`` (``element2`` only).
        estimator: one of :data:`ESTIMATORS`.
        start: flat index of the partition's first element.
        shape: ``(rows, cols)`` of the full parameter.
        dim: group axis (0: rows, 1: columns).
        width: entries per group along ``dim``.
        offset: where the slice's segment starts along ``dim``.
        groups: ``G``.
        chunk: elements laid out at once (bounds the temporaries).

    Returns:
        ``(G,)`` float64 partial sums.
    """
    rows, cols = shape
    out = torch.zeros(groups, dtype=torch.float64, device=weight.device)
    valid = max(0, min(weight.numel(), rows * cols - start))  # the padding past the parameter holds nothing
    if not valid:
        return out
    step = max(cols, chunk // cols * cols)  # whole rows per piece
    lo = 0
    while lo < valid:
        first_row = (start + lo) // cols
        lead = (start + lo) - first_row * cols  # elements of the piece's first row held by the previous piece
        hi = min(valid, lo + step - lead)
        sq = None if grad_sq is None else grad_sq[lo:hi]
        elem = element_scores(weight[lo:hi], grad_sum[lo:hi], sq, estimator)  # (c,)
        tail = -(lead + hi - lo) % cols
        grid = torch.nn.functional.pad(elem, (lead, tail)).view(-1, cols)  # (r, cols) whole rows
        if dim == 0:
            sums, index = grid.sum(1), torch.arange(first_row, first_row + grid.shape[0], device=elem.device)
        else:
            sums, index = grid.sum(0), torch.arange(cols, device=elem.device)
        rel = index - offset  # position in the module's segment
        inside = (rel >= 0) & (rel < groups * width)
        out.scatter_add_(0, rel[inside] // width, sums[inside].double())
        lo = hi
    return out


def finish_group_scores(sums: torch.Tensor, estimator: str) -> torch.Tensor:
    """``(G,)`` group scores (fp32) from the ranks' added :func:`partition_group_sums`."""
    sums = sums.float()
    return sums.abs() if estimator == "vector" else sums


def aggregate(scores: list[torch.Tensor], how: str = "sum") -> torch.Tensor:
    """Combine per-tensor group scores ``[(G,), ...]`` into one ``(G,)`` score."""
    stacked = torch.stack(scores)  # (T, G)
    if how == "sum":
        return stacked.sum(0)
    if how == "mean":
        return stacked.mean(0)
    if how == "max":
        return stacked.max(0).values
    if how == "prod":
        return stacked.prod(0)
    raise ValueError(f"unknown aggregation {how!r}")


def fit_sigmas(scores: dict[str, list[torch.Tensor]]) -> dict[str, float]:
    """Closed-form homoscedastic sigmas: ``sigma_m = sqrt(mean over all groups of I_m)``.

    Args:
        scores: estimator -> the ``(G_i,)`` scores of every module of one kind.

    Returns:
        estimator -> sigma (a tiny floor keeps an all-zero estimator finite).
    """
    out = {}
    for est, per_module in scores.items():
        mean = float(torch.cat([s.double().reshape(-1) for s in per_module]).mean())
        out[est] = math.sqrt(max(mean, 1e-30))
    return out


def fuse(scores: dict[str, torch.Tensor], sigmas: dict[str, float]) -> torch.Tensor:
    """``I = sum_m I_m / (2 sigma_m^2) + log sigma_m`` for one module's ``(G,)`` scores."""
    total = None
    for est, s in scores.items():
        term = s.double() / (2.0 * sigmas[est] ** 2) + math.log(sigmas[est])
        total = term if total is None else total + term
    assert total is not None, "no estimator"
    return total


def joint_costs(raw: dict[str, dict[str, torch.Tensor]], keys: list[str]) -> dict[str, torch.Tensor]:
    """Group costs comparable across module kinds: ``sum_m I_m / (2 sigma_m^2)`` with one sigma per estimator
    fitted over the modules ``keys`` of every kind (the per-kind sigmas of :func:`fuse` make attention and MLP
    scores incomparable; the constant ``log sigma`` term is left out).

    Args:
        raw: module key -> estimator -> ``(G,)`` aggregated scores.
        keys: the modules whose groups compete (e.g. the unprotected ones).

    Returns:
        module key -> ``(G,)`` float64 cost, for every module of ``raw``.
    """
    ests = list(raw[keys[0]])
    sigmas = fit_sigmas({e: [raw[k][e] for k in keys] for e in ests})
    return {key: sum(by_est[e].double() / (2.0 * sigmas[e] ** 2) for e in ests) for key, by_est in raw.items()}


def stability(means: list[float]) -> float:
    """Coefficient of variation ``std_k / mean_k`` of a module's mean importance over K mini-batches."""
    t = torch.tensor(means, dtype=torch.float64)
    if t.numel() < 2:
        return 0.0
    return float(t.std(unbiased=True) / t.mean().abs().clamp_min(1e-30))
