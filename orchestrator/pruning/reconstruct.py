"""Least-squares reconstruction of a pruned layer's kept weights (METHODS.md section 2, "after the mask").

With the mask fixed, each output row ``r`` of ``W`` is re-solved so the pruned layer reproduces the
dense layer's output on the calibration inputs ``X`` (``(tokens, in)``, ``H = X^T X``)::

    min_{w'}  ||X (w' - w)||^2 + lam * ||w' - w||^2     subject to  w'_j = 0  for pruned j

Writing ``K`` for the kept and ``P`` for the pruned inputs of the row, the minimiser is
``w'_K = w_K + (H_KK + lam I)^-1 H_KP w_P``: the kept weights absorb what the pruned ones
contributed, through the input correlations. ``lam = percdamp * mean(diag H)`` keeps the system
well posed when inputs are dead or collinear.

Two solvers:

* ``exact``: one Cholesky solve per row (``in^3`` per row; for small layers and references);
* ``cg``: preconditioned conjugate gradient on all rows at once, started from the plain masked
  weights (one ``(out, in) @ (in, in)`` product per iteration). CG lowers the damped objective
  monotonically, so the output error never rises above the unreconstructed mask's.

Torch only; pure functions of the weight, the mask and ``sum x x^T``.
"""

from __future__ import annotations

import torch

SOLVERS = ("cg", "exact")


def damped(xtx: torch.Tensor, percdamp: float) -> tuple[torch.Tensor, float]:
    """``H + lam I`` with ``lam = percdamp * mean(diag H)`` (and a floor for an all-zero ``H``).

    Args:
        xtx: ``(in, in)`` ``sum x x^T`` (any positive multiple of it: the solution is scale-free).
        percdamp: damping as a fraction of the mean diagonal.

    Returns:
        The damped ``(in, in)`` fp32 matrix and ``lam``.
    """
    h = xtx.detach().float()
    lam = float(percdamp * torch.diag(h).mean())
    if lam <= 0:
        lam = 1e-8
    return h + lam * torch.eye(h.shape[0], dtype=h.dtype, device=h.device), lam


def output_error(weight: torch.Tensor, dense: torch.Tensor, xtx: torch.Tensor) -> float:
    """``||X (W' - W)^T||_F^2 = trace(E H E^T)`` with ``E = W' - W``: the layer's output error."""
    e = weight.float() - dense.float()  # (out, in)
    return float(((e @ xtx.float()) * e).sum())


def reconstruct_exact(weight: torch.Tensor, mask: torch.Tensor, xtx: torch.Tensor,
                      percdamp: float = 0.01, chunk: int = 64) -> torch.Tensor:
    """Exact per-row least squares of the kept weights.

    Each row solves ``(H_KK + lam I) d_K = H_KP w_P`` with Cholesky, written in full
    dimension (pruned coordinates get an identity row and a zero right-hand side) so
    rows with different kept counts batch together.

    Args:
        weight: ``(out, in)`` the dense weight.
        mask: ``(out, in)`` bool, True = pruned.
        xtx: ``(in, in)`` ``sum x x^T`` of the layer's inputs.
        percdamp: damping as a fraction of ``mean(diag H)``.
        chunk: rows per batched solve (memory ``chunk * in^2`` floats).

    Returns:
        ``(out, in)`` fp32 weight, zero where ``mask``.
    """
    w = weight.detach().float()  # (out, in)
    hd, _ = damped(xtx, percdamp)  # (in, in)
    keep = (~mask).float()  # (out, in)
    out = torch.empty_like(w)
    eye = torch.eye(w.shape[1], dtype=w.dtype, device=w.device)
    for r0 in range(0, w.shape[0], chunk):
        k = keep[r0:r0 + chunk]  # (c, in)
        rhs = k * ((w[r0:r0 + chunk] * (1 - k)) @ hd)  # (c, in): H_KP w_P on the kept coordinates
        a = k.unsqueeze(2) * hd.unsqueeze(0) * k.unsqueeze(1) + torch.diag_embed(1 - k) * eye  # (c, in, in)
        d = torch.cholesky_solve(rhs.unsqueeze(2), torch.linalg.cholesky(a)).squeeze(2)  # (c, in)
        out[r0:r0 + chunk] = (w[r0:r0 + chunk] + d) * k
    return out


def reconstruct_cg(weight: torch.Tensor, mask: torch.Tensor, xtx: torch.Tensor, percdamp: float = 0.01,
                   iters: int = 10, tol: float = 0.0) -> torch.Tensor:
    """Kept-weight least squares by Jacobi-preconditioned conjugate gradient, every row at once.

    Solves ``A d = b`` per row with ``A = K (H + lam I) K`` restricted to the kept coordinates and
    ``b = K (H + lam I) (P w)``, starting from ``d = 0`` (the plain masked weight).

    Each row stops on its own once its preconditioned residual ``sqrt(r^T M^-1 r)`` is at most ``tol``
    times its initial one; stopped rows leave the batch, so later iterations multiply only the rows
    still running. A row's result therefore depends only on that row, ``H`` and the settings (not on
    which other rows share the batch: a rank solving a slice of the rows gets the same rows). With
    ``tol = 0`` every row runs ``iters`` iterations.

    Args:
        weight: ``(out, in)`` the dense weight.
        mask: ``(out, in)`` bool, True = pruned.
        xtx: ``(in, in)`` ``sum x x^T``.
        percdamp: damping as a fraction of ``mean(diag H)``.
        iters: most CG iterations per row.
        tol: relative preconditioned-residual stop per row (0: run ``iters``).

    Returns:
        ``(out, in)`` fp32 weight, zero where ``mask``.
    """
    w = weight.detach().float()  # (out, in)
    hd, _ = damped(xtx, percdamp)  # (in, in)
    keep_all = (~mask).float()  # (out, in)
    d_all = torch.zeros_like(w)  # (out, in): the kept weights' change, written as rows stop
    rows = torch.arange(w.shape[0], device=w.device)  # (live,) the rows still iterating
    keep = keep_all
    r = keep * ((w * (1 - keep)) @ hd)  # (live, in): residual b - A 0
    inv_diag = keep / torch.diag(hd).unsqueeze(0)  # (live, in): Jacobi preconditioner on the kept coordinates
    d = torch.zeros_like(w)
    z = r * inv_diag
    p = z.clone()
    rz = (r * z).sum(1, keepdim=True)  # (live, 1)
    stop = (tol * tol) * rz  # (live, 1): a row stops once rz <= tol^2 rz_0 (and at once when rz_0 = 0)
    for _ in range(iters):
        live = (rz > stop).squeeze(1)  # (live,)
        if not bool(live.all()):  # one host sync per iteration: drop the rows that have converged
            d_all[rows[~live]] = d[~live]
            rows, keep, inv_diag, d, r, p, rz, stop = (t[live] for t in (rows, keep, inv_diag, d, r, p, rz, stop))
            if rows.numel() == 0:
                break
        ap = keep * (p @ hd)  # (live, in)
        pap = (p * ap).sum(1, keepdim=True)
        step = torch.where(pap > 0, rz / pap.clamp_min(1e-30), torch.zeros_like(pap))  # (live, 1)
        d += step * p
        r -= step * ap
        z = r * inv_diag
        rz_new = (r * z).sum(1, keepdim=True)
        beta = torch.where(rz > 0, rz_new / rz.clamp_min(1e-30), torch.zeros_like(rz))
        p = z + beta * p
        rz = rz_new
    d_all[rows] = d
    return (w + d_all) * keep_all


def reconstruct(weight: torch.Tensor, mask: torch.Tensor, xtx: torch.Tensor, solver: str = "cg",
                percdamp: float = 0.01, iters: int = 10, tol: float = 0.0) -> torch.Tensor:
    """Re-solve the kept weights of one pruned layer (see the module docstring).

    Args:
        weight: ``(out, in)`` the dense weight (before masking).
        mask: ``(out, in)`` bool, True = pruned.
        xtx: ``(in, in)`` ``sum x x^T`` of the layer's calibration inputs.
        solver: ``cg`` or ``exact``.
        percdamp: damping as a fraction of ``mean(diag H)``.
        iters: most CG iterations per row (``cg`` only).
        tol: relative residual at which a row stops (``cg`` only; 0: run ``iters``).

    Returns:
        ``(out, in)`` weight in ``weight``'s dtype, zero where ``mask``.
    """
    if solver == "exact":
        new = reconstruct_exact(weight, mask, xtx, percdamp)
    elif solver == "cg":
        new = reconstruct_cg(weight, mask, xtx, percdamp, iters, tol)
    else:
        raise ValueError(f"unknown reconstruction solver {solver!r}; allowed {SOLVERS}")
    return new.to(weight.dtype)
