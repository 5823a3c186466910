"""Support search by ADMM on the layer reconstruction objective (`pruning.search: admm`, after the method's mask).

With ``H = X^T X`` of the layer's calibration inputs and the dense weight ``W0`` (``(out, in)``), the
mask is chosen by approximately solving::

    min_W  ||X (W - W0)^T||^2   subject to  W in S   (S: at most k nonzeros, or N:M per group)

by the alternating direction method of multipliers, splitting ``W = D`` with ``D in S``:

* ``W``-step: ``W = (W0 H - V + rho D) (H + rho I)^-1`` (one ``(out, in) @ (in, in)`` product, the
  inverse taken from one eigendecomposition of ``H`` for every ``rho``);
* ``D``-step: ``D = P_S(W + V / rho)``, the projection onto the pattern: keep the largest entries
  (layer-wide for unstructured, per group of ``m`` inputs for N:M);
* dual step: ``V += rho (W - D)``.

``rho`` grows while the support still moves (by 1.3, 1.2 or 1.1 per check, by how much moved), so the
iterates are pulled onto the pattern; the search stops once less than ``stop_tol`` of the kept set
changed between two checks. The problem is solved in input-normalised coordinates (``H`` scaled to a
unit diagonal, ``W`` by the input norms), as in ALPS (Meng et al. 2024), so the projection compares
weights by what they contribute to the output.

Gradient-aware projection: with GBLM's gradient term ``G`` the projection keeps the largest
``z^2 / mean(z^2) + alpha |w| G / mean(|w| G)`` (``z`` the normalised iterate, ``w`` it in weight units):
the same saliency :func:`~orchestrator.pruning.sparsegpt.sparsegpt_prune` uses with gradients.

The search returns only the support; the kept weights are then re-solved from the dense ones
(:mod:`~orchestrator.pruning.reconstruct`). Torch only; a pure function of its arguments.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class AdmmSettings:
    """Settings of the search.

    Attributes:
        rho: initial penalty, relative to the unit diagonal of the normalised ``H``.
        max_iters: most iterations.
        check_every: iterations between two support checks (and ``rho`` updates).
        min_iters: iterations before the search may stop.
        stop_tol: stop once the fraction of kept weights that changed between checks is below this.
        percdamp: ridge on ``H`` as a fraction of ``mean(diag H)``.
        grad_alpha: weight of the normalised gradient term in the projection (used where a gradient term is given).
    """

    rho: float = 0.1
    max_iters: int = 300
    check_every: int = 3
    min_iters: int = 30
    stop_tol: float = 3e-4
    percdamp: float = 0.01
    grad_alpha: float = 0.0


@dataclass
class AdmmOutcome:
    """What the search found.

    Attributes:
        mask: ``(out, in)`` bool, True = pruned.
        weight: ``(out, in)`` fp32, the last iterate projected onto the pattern, in weight units.
        iters: iterations run.
        rho: the final penalty.
    """

    mask: torch.Tensor
    weight: torch.Tensor
    iters: int
    rho: float


def prune_mask(saliency: torch.Tensor, sparsity: float, nm: tuple[int, int] | None) -> torch.Tensor:
    """The pattern's projection: prune the lowest ``saliency`` layer-wide (unstructured) or per N:M group.

    Selection by ``topk`` (a tenth of a full sort's time; which of equal saliencies goes is the kernel's
    choice, the same for the same input on the same device).
    """
    out, cols = saliency.shape
    mask = torch.zeros_like(saliency, dtype=torch.bool)
    if nm is not None:
        n, m = nm
        if cols % m:
            raise ValueError(f"N:M {n}:{m} needs the input size ({cols}) to be a multiple of {m}")
        groups = saliency.reshape(out, cols // m, m)  # (out, groups, m)
        idx = torch.topk(groups, n, dim=2, largest=False, sorted=False).indices
        return mask.view(out, cols // m, m).scatter_(2, idx, True).view(out, cols)
    k = int(saliency.numel() * sparsity)
    if k:
        idx = torch.topk(saliency.reshape(-1), k, largest=False, sorted=False).indices
        mask.view(-1)[idx] = True
    return mask


def _saliency(z: torch.Tensor, grad_w: torch.Tensor | None, alpha: float) -> torch.Tensor:
    """``z^2`` (normalised iterate), plus ``alpha`` x the gradient term when given, each over its mean."""
    obs = z.square()  # (out, in)
    if grad_w is None or alpha == 0:
        return obs
    grad = z.abs() * grad_w  # (out, in): |w| G with w = z / norm, folded into grad_w
    return obs / obs.mean().clamp_min(1e-30) + alpha * grad / grad.mean().clamp_min(1e-30)


def admm_mask(weight: torch.Tensor, xtx: torch.Tensor, sparsity: float, nm: tuple[int, int] | None = None,
              init_mask: torch.Tensor | None = None, grad_term: torch.Tensor | None = None,
              settings: AdmmSettings | None = None) -> AdmmOutcome:
    """Search the support of one layer by ADMM (see the module docstring).

    Args:
        weight: ``(out, in)`` the dense weight.
        xtx: ``(in, in)`` ``sum x x^T`` of the layer's calibration inputs (any dtype; fp64 for the eigensolve).
        sparsity: fraction pruned (unstructured; ignored for N:M).
        nm: ``(n, m)`` or None.
        init_mask: ``(out, in)`` bool, the starting support (True = pruned); None: the projection of ``W0``.
        grad_term: ``(out, in)`` GBLM's gradient term, or None (the search without gradients); weighted by
            ``settings.grad_alpha``.
        settings: the search's settings (defaults: :class:`AdmmSettings`).

    Returns:
        The support found, the iterations run and the final ``rho``.
    """
    s = settings or AdmmSettings()
    grad_alpha = s.grad_alpha
    w0 = weight.detach().float()  # (out, in)
    h = xtx.detach().double()  # (in, in)
    damp = s.percdamp * float(torch.diag(h).mean())
    h = h + max(damp, 1e-8) * torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    norm = torch.diag(h).sqrt()  # (in,)
    hn = h / norm.unsqueeze(0) / norm.unsqueeze(1)  # (in, in): unit diagonal
    evals, evecs = torch.linalg.eigh(hn)  # (in,), (in, in) fp64
    norm32 = norm.float()
    b0 = w0 * norm32.unsqueeze(0)  # (out, in): the dense weight in normalised units
    target = b0 @ hn.float()  # (out, in): W0 H, the W-step's fixed term
    del h, hn
    evals, q = evals.float(), evecs.float()  # (in,), (in, in)
    del evecs
    grad_w = None
    if grad_term is not None and grad_alpha != 0:
        grad_w = grad_term.detach().float() / norm32.unsqueeze(0)  # (out, in): |w| G = |z| G / norm

    keep = ~(init_mask if init_mask is not None else prune_mask(_saliency(b0, grad_w, grad_alpha), sparsity, nm))
    d = b0 * keep  # (out, in)
    v = torch.zeros_like(b0)
    rho = s.rho
    kept = max(int(keep.sum()), 1)

    # the W-step, x (H + rho I)^-1: through the eigenbasis (two (out, in) @ (in, in) products) for a layer with
    # fewer outputs than inputs, else through the inverse formed anew for each rho (one product, one (in, in)^2)
    through_basis = w0.shape[0] < w0.shape[1]

    def inverse(r: float) -> torch.Tensor:
        scale = 1.0 / (evals + r)  # (in,)
        return scale if through_basis else (q * scale.unsqueeze(0)) @ q.t()

    def w_step(x: torch.Tensor, inv: torch.Tensor) -> torch.Tensor:
        return ((x @ q) * inv.unsqueeze(0)) @ q.t() if through_basis else x @ inv

    hinv = inverse(rho)
    last = keep
    it = 0
    for it in range(1, s.max_iters + 1):
        b = w_step(target - v + rho * d, hinv)  # (out, in)
        z = b + v / rho
        keep = ~prune_mask(_saliency(z, grad_w, grad_alpha), sparsity, nm)
        d = z * keep
        v += rho * (b - d)
        if it % s.check_every:
            continue
        moved = int((keep != last).sum()) / (2 * kept)  # each swap moves one in and one out
        last = keep
        if it >= s.min_iters and moved < s.stop_tol:
            break
        rho = min(rho * (1.3 if moved > 0.1 else 1.2 if moved > 0.005 else 1.1), 1e6)
        hinv = inverse(rho)
    return AdmmOutcome(~keep, d / norm32.unsqueeze(0), it, rho)

