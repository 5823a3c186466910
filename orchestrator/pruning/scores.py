"""Importance scores of unstructured / N:M pruning (METHODS.md section 2)."""

from __future__ import annotations

import torch


def magnitude_score(weight: torch.Tensor) -> torch.Tensor:
    """``|W|`` as fp32, shape ``(out, in)``."""
    return weight.detach().float().abs()


def wanda_score(weight: torch.Tensor, input_norm: torch.Tensor) -> torch.Tensor:
    """Wanda: ``|W_ij| * sqrt(act_sq_j / N)``.

    Args:
        weight: ``(out, in)``.
        input_norm: ``(in,)`` the per-column ``sqrt(act_sq / N)``.

    Returns:
        ``(out, in)`` fp32 scores.
    """
    return weight.detach().float().abs() * input_norm.float().unsqueeze(0)


def gradient_term(grad_stat: torch.Tensor, norm: str) -> torch.Tensor:
    """GBLM's ``(out, in)`` per-weight gradient term: ``grad_abs`` (l1) or ``sqrt(grad_sq)`` (l2), fp32."""
    if norm == "l1":
        return grad_stat.float()
    if norm == "l2":
        return grad_stat.float().sqrt()
    raise ValueError(f"norm must be 'l1' or 'l2', got {norm!r}")


def gblm_score(
    weight: torch.Tensor,
    input_norm: torch.Tensor,
    grad_stat: torch.Tensor,
    alpha: float,
    norm: str = "l1",
    grad_scale: float = 1.0,
    weighting: str = "raw",
) -> torch.Tensor:
    """GBLM-Pruner: ``|W_ij| * (sqrt(act_sq_j / N) + alpha * G_ij / grad_scale)``.

    With ``weighting="normalized"`` both terms are first divided by their mean over the layer,
    ``|W_ij| * (a_j / mean(a) + alpha * G_ij / mean(G))``: ``alpha`` is then the weight of the
    gradient term relative to the activation term, the same for any sample count ``N``, any
    ``grad_scale`` and any model (``G`` grows with ``N``; ``a`` does not).

    ``alpha`` weighs raw per-sequence gradients, as in the paper. The statistics may
    have been accumulated from gradients multiplied by ``grad_scale`` (the published code
    uses 100 to keep fp16 sums away from underflow); dividing by it here makes the
    published code's score (``|W| * sqrt(act) + |W| * G_scaled``) the ``alpha = 100,
    grad_scale = 100`` case.

    Args:
        weight: ``(out, in)``.
        input_norm: ``(in,)`` ``sqrt(act_sq / N)``.
        grad_stat: ``(out, in)``: ``grad_abs`` for ``norm="l1"``; ``grad_sq`` for ``"l2"``
            (its square root is taken here). Not divided by N, as in the published code.
        alpha: weight of the gradient term (100 in the paper).
        norm: ``"l1"`` (p = 1) or ``"l2"`` (p = 2).
        grad_scale: factor the gradients were multiplied by before folding.
        weighting: ``raw`` (the paper's) or ``normalized`` (scale-free, see above).

    Returns:
        ``(out, in)`` fp32 scores.
    """
    if weighting not in ("raw", "normalized"):
        raise ValueError(f"weighting must be 'raw' or 'normalized', got {weighting!r}")
    g = gradient_term(grad_stat, norm)
    a = input_norm.float()  # (in,)
    if weighting == "normalized":
        a = a / a.mean().clamp_min(1e-30)
        g = g / g.mean().clamp_min(1e-30)
        return weight.detach().float().abs() * (a.unsqueeze(0) + alpha * g)
    return weight.detach().float().abs() * (a.unsqueeze(0) + (alpha / grad_scale) * g)
