"""SparseGPT's blocked OBS update (METHODS.md section 2)."""

from __future__ import annotations

import logging
from typing import Any

import torch

log = logging.getLogger(__name__)


def _upper_cholesky_of_inverse(h: torch.Tensor, percdamp: float, name: str) -> torch.Tensor:
    """Damp ``h`` and return the upper Cholesky factor of its inverse, raising damping on failure."""
    diag_mean = torch.mean(torch.diag(h))
    damp = percdamp
    for attempt in range(8):
        # at most two (in, in) fp32 copies beside ``h`` at once (the planner's SparseGPT transient)
        hd = h.clone()
        hd.diagonal().add_(damp * diag_mean)
        try:
            low = torch.linalg.cholesky(hd)
            del hd
            hinv = torch.cholesky_inverse(low)
            del low
            return torch.linalg.cholesky(hinv, upper=True)
        except torch.linalg.LinAlgError:
            log.warning(
                "SparseGPT %s: Cholesky failed with damping %.3g (attempt %d), raising it x10",
                name, damp, attempt + 1,
            )
            damp *= 10
    raise RuntimeError(f"SparseGPT {name}: Hessian not positive definite even with damping {damp}")


def sparsegpt_prune(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    sparsity: float,
    nm: tuple[int, int] | None = None,
    blocksize: int = 128,
    percdamp: float = 0.01,
    name: str = "layer",
    grad_term: torch.Tensor | None = None,
    grad_alpha: float = 0.0,
    own_hessian: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prune one weight matrix with SparseGPT and update the kept weights.

    With ``grad_term`` (GBLM's per-weight gradient statistic ``G``) the mask follows a
    gradient-aware saliency instead of OBS's alone: ``w^2 / d^2`` and ``|w| * G`` (``w`` the
    current, OBS-updated weight) each divided by its mean over the column block (taken when the
    block starts, so every N:M group of a block weighs the two terms alike), summed with weight
    ``grad_alpha`` on the gradient term (scale-free, like ``gblm.weighting: normalized``).

    Args:
        weight: ``(out, in)``, left untouched.
        hessian: ``(in, in)`` fp32, ``(2/N) * sum x x^T``.
        sparsity: target fraction (ignored when ``nm`` is given).
        nm: ``(n, m)`` for N:M, else unstructured (one threshold per column block).
        blocksize: columns per lazy-update block.
        percdamp: damping as a fraction of ``mean(diag H)``.
        name: used in log messages.
        grad_term: ``(out, in)`` non-negative gradient statistic, or None (plain SparseGPT).
        grad_alpha: weight of the normalised gradient term.
        own_hessian: ``hessian`` is the caller's scratch copy, overwritten here instead of cloned (one
            ``(in, in)`` fp32 copy less at the peak).

    Returns:
        ``(new_weight, mask)``: the updated ``(out, in)`` weight in ``weight``'s dtype and
        the ``(out, in)`` bool mask, True = pruned.
    """
    w = weight.detach().float().clone()  # (out, in)
    h = hessian.detach().float()  # (in, in); the caller's own tensor when it was fp32 already
    if not own_hessian and h.data_ptr() == hessian.data_ptr():
        h = h.clone()
    cols = w.shape[1]
    if nm is not None:
        if cols % nm[1]:
            raise ValueError(f"N:M {nm[0]}:{nm[1]} needs the input size ({cols}) to be a multiple of {nm[1]}")
        # an N:M group must not straddle a block; for N:M the block size does not change the result
        blocksize = max(nm[1], blocksize - blocksize % nm[1])
    dead = torch.diag(h) == 0  # (in,) inputs never seen: no host synchronisation anywhere below
    h.diagonal().masked_fill_(dead, 1)
    w.masked_fill_(dead.unsqueeze(0), 0)
    hinv = _upper_cholesky_of_inverse(h, percdamp, name)  # (in, in) upper
    mask = torch.zeros_like(w, dtype=torch.bool)
    g = None if grad_term is None or grad_alpha == 0 else grad_term.detach().float()  # (out, in)

    def saliency(wc: torch.Tensor, dc: torch.Tensor, lo: int, hi: int, means: tuple[Any, Any]) -> torch.Tensor:
        """OBS's ``w^2 / d^2`` of columns ``lo:hi`` (plus the gradient term, both over their block ``means``)."""
        obs = wc.pow(2) / dc.pow(2).unsqueeze(0)
        if g is None:
            return obs
        grad = wc.abs() * g[:, lo:hi]
        return obs / means[0] + grad_alpha * grad / means[1]

    def block_means(wc: torch.Tensor, dc: torch.Tensor, lo: int, hi: int) -> tuple[Any, Any]:
        """The means of OBS's term and of the gradient term over columns ``lo:hi`` (1 without gradients), as
        0-d tensors on the weight's device (never read back to the host)."""
        if g is None:
            return 1.0, 1.0
        obs = (wc.pow(2) / dc.pow(2).unsqueeze(0)).mean().clamp_min(1e-30)
        return obs, (wc.abs() * g[:, lo:hi]).mean().clamp_min(1e-30)

    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        count = i2 - i1
        w1 = w[:, i1:i2].clone()  # (out, count)
        q1 = torch.zeros_like(w1)
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]  # (count, count)
        d1 = torch.diag(hinv1)  # (count,)
        means = block_means(w1, d1, i1, i2)
        if nm is None:
            tmp = saliency(w1, d1, i1, i2, means)
            k = int(tmp.numel() * sparsity)
            mask1 = torch.zeros(tmp.numel(), dtype=torch.bool, device=tmp.device)
            if k:
                mask1[torch.sort(tmp.reshape(-1), stable=True).indices[:k]] = True
            mask1 = mask1.view_as(tmp)
        else:
            mask1 = torch.zeros_like(w1, dtype=torch.bool)
        for i in range(count):
            col = w1[:, i]
            d = hinv1[i, i]
            if nm is not None and i % nm[1] == 0:
                n, m = nm
                tmp = saliency(w1[:, i : i + m], d1[i : i + m], i1 + i, i1 + i + m, means)
                idx = torch.sort(tmp, dim=1, stable=True).indices[:, :n]
                mask1.scatter_(1, i + idx, True)
            q = col.masked_fill(mask1[:, i], 0)  # (out,); boolean indexing would synchronise every column
            q1[:, i] = q
            err = (col - q) / d  # (out,)
            w1[:, i:] -= err.unsqueeze(1) @ hinv1[i, i:].unsqueeze(0)
            err1[:, i] = err
        w[:, i1:i2] = q1
        mask[:, i1:i2] = mask1
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    w.masked_fill_(mask, 0)
    return w.to(weight.dtype), mask
