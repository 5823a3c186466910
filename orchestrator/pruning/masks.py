"""Mask builders. A mask is a bool tensor shaped like the weight, True where pruned."""

from __future__ import annotations

import torch


def row_mask(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Prune the ``floor(in * sparsity)`` lowest scores of every row (stable sort).

    Args:
        score: ``(out, in)``.
        sparsity: fraction in [0, 1).

    Returns:
        ``(out, in)`` bool, True = pruned.
    """
    k = int(score.shape[1] * sparsity)
    mask = torch.zeros_like(score, dtype=torch.bool)
    if k == 0:
        return mask
    idx = torch.sort(score, dim=1, stable=True).indices[:, :k]  # (out, k)
    mask.scatter_(1, idx, True)
    return mask


def matrix_mask(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Prune the ``floor(numel * sparsity)`` lowest scores of the whole matrix."""
    k = int(score.numel() * sparsity)
    mask = torch.zeros(score.numel(), dtype=torch.bool, device=score.device)
    if k:
        idx = torch.sort(score.reshape(-1), stable=True).indices[:k]
        mask[idx] = True
    return mask.view_as(score)


def nm_mask(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """N:M: in every row, in every run of ``m`` consecutive columns, prune the ``n`` lowest.

    Args:
        score: ``(out, in)`` with ``in % m == 0``.
        n: pruned per group.
        m: group size.
    """
    out, cols = score.shape
    if cols % m:
        raise ValueError(f"N:M {n}:{m} needs the input size ({cols}) to be a multiple of {m}")
    groups = score.reshape(out, cols // m, m)  # (out, groups, m)
    idx = torch.sort(groups, dim=2, stable=True).indices[:, :, :n]
    mask = torch.zeros_like(groups, dtype=torch.bool)
    mask.scatter_(2, idx, True)
    return mask.reshape(out, cols)


def build_mask(
    score: torch.Tensor, sparsity: float, nm: tuple[int, int] | None, per_row: bool = True
) -> torch.Tensor:
    """Dispatch to :func:`nm_mask`, :func:`row_mask` or :func:`matrix_mask`."""
    if nm is not None:
        return nm_mask(score, *nm)
    return row_mask(score, sparsity) if per_row else matrix_mask(score, sparsity)


def apply_mask(weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Zero ``weight`` where ``mask`` is True, in place; returns ``weight``."""
    weight.data.masked_fill_(mask.to(weight.device), 0)
    return weight


def sparsity_of(weight: torch.Tensor) -> float:
    """Fraction of exact zeros in ``weight``."""
    return float((weight == 0).sum().item()) / max(weight.numel(), 1)
