"""Mask refinement by swap moves on the layer reconstruction objective (`pruning.swaps`, after the mask).

Each output row ``r`` of a pruned layer is its own problem: with ``e = w - w0`` (the row's change from its
dense weights) and ``H = X^T X`` (damped), its output error is ``f = e H e^T`` and ``u = H e`` its half
gradient. A swap prunes one kept weight ``j`` (``w_j -> 0``) and revives one pruned weight ``i`` (``0 -> t``)
with every other weight held, which changes the error by exactly::

    df = -2 w_j u_j + w_j^2 H_jj + 2 t u_i + t^2 H_ii - 2 w_j t H_ij

smallest at ``t = (w_j H_ij - u_i) / H_ii``, where ``df = -2 w_j u_j + w_j^2 H_jj - (u_i - w_j H_ij)^2 / H_ii``.
Every round each row applies its best swap when ``df < 0``, so no row's error ever rises and the pattern is
kept: N:M swaps stay within one group of ``m`` inputs (every pair of the row's groups is scored), unstructured
swaps pair the ``candidates`` cheapest removals with the ``candidates`` best revivals of the row (so each row
keeps its count). Cheap next to a solve (a few ``(out, in)`` passes per round); the kept weights are then
re-solved (:mod:`~orchestrator.pruning.reconstruct`). Torch only; a pure function of its arguments.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from orchestrator.pruning.reconstruct import damped


@dataclass
class SwapOutcome:
    """The refined layer.

    Attributes:
        weight: ``(out, in)`` fp32, the swapped weights (others as given), zero where ``mask``.
        mask: ``(out, in)`` bool, True = pruned.
        swaps: swaps applied over all rows and rounds.
    """

    weight: torch.Tensor
    mask: torch.Tensor
    swaps: int


def _best_nm(w: torch.Tensor, u: torch.Tensor, mask: torch.Tensor, h: torch.Tensor, m: int
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row, the best swap inside one group of ``m``: ``(df, i, j)``, each ``(out,)``."""
    out, cols = w.shape
    groups = cols // m
    idx = torch.arange(cols, device=w.device).view(groups, m)  # (G, m)
    hb = h[idx.unsqueeze(2), idx.unsqueeze(1)]  # (G, m, m): the groups' diagonal blocks of H
    hd = torch.diagonal(hb, dim1=1, dim2=2)  # (G, m)
    wg, ug, mg = (t.view(out, groups, m) for t in (w, u, mask))
    remove = -2 * wg * ug + wg.square() * hd  # (out, G, m): cost of pruning j (kept ones only count)
    # (out, G, i, j): revive i, prune j
    df = remove.unsqueeze(2) - (ug.unsqueeze(3) - wg.unsqueeze(2) * hb.unsqueeze(0)).square() / hd.view(1, groups, m, 1)
    valid = mg.unsqueeze(3) & ~mg.unsqueeze(2)  # i pruned, j kept
    df = df.masked_fill(~valid, float("inf")).view(out, -1)
    best, flat = df.min(dim=1)  # (out,)
    g, rest = flat // (m * m), flat % (m * m)
    return best, g * m + rest // m, g * m + rest % m


def _best_unstructured(w: torch.Tensor, u: torch.Tensor, mask: torch.Tensor, h: torch.Tensor, hd: torch.Tensor,
                       candidates: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row, the best swap among the ``candidates`` cheapest removals x best revivals: ``(df, i, j)``."""
    remove = (-2 * w * u + w.square() * hd).masked_fill(mask, float("inf"))  # (out, in): kept only
    revive = (u.square() / hd).masked_fill(~mask, float("-inf"))  # (out, in): pruned only
    c = min(candidates, w.shape[1])
    j = torch.topk(remove, c, dim=1, largest=False).indices  # (out, c)
    i = torch.topk(revive, c, dim=1).indices  # (out, c)
    valid = mask.gather(1, i).unsqueeze(2) & ~mask.gather(1, j).unsqueeze(1)  # (out, c_i, c_j): rows short of either
    wj, uj, ui = w.gather(1, j), u.gather(1, j), u.gather(1, i)  # (out, c)
    hij = h[i.unsqueeze(2), j.unsqueeze(1)]  # (out, c_i, c_j)
    df = (-2 * wj * uj + wj.square() * hd[j]).unsqueeze(1) - (ui.unsqueeze(2) - wj.unsqueeze(1) * hij).square() / \
        hd[i].unsqueeze(2)  # (out, c_i, c_j)
    df = df.masked_fill(~(valid & torch.isfinite(df)), float("inf")).view(w.shape[0], -1)
    best, flat = df.min(dim=1)
    return best, i.gather(1, (flat // c).unsqueeze(1)).squeeze(1), j.gather(1, (flat % c).unsqueeze(1)).squeeze(1)


def refine_swaps(weight: torch.Tensor, dense: torch.Tensor, mask: torch.Tensor, xtx: torch.Tensor,
                 nm: tuple[int, int] | None = None, rounds: int = 50, candidates: int = 8,
                 percdamp: float = 0.01) -> SwapOutcome:
    """Lower a pruned layer's output error by swap moves (see the module docstring).

    Args:
        weight: ``(out, in)`` the pruned layer's current weights (zero where ``mask``).
        dense: ``(out, in)`` its dense weights.
        mask: ``(out, in)`` bool, True = pruned.
        xtx: ``(in, in)`` ``sum x x^T`` of the layer's inputs.
        nm: ``(n, m)`` (swaps stay inside a group) or None.
        rounds: most rounds (each applies at most one swap per row).
        candidates: unstructured: removals and revivals paired per row and round.
        percdamp: the damping of ``H``, as in the reconstruction.

    Returns:
        The swapped weights and mask and the number of swaps applied.
    """
    h = damped(xtx, percdamp)[0].double()  # (in, in)
    hd = torch.diag(h)  # (in,)
    mask = mask.clone()
    w = weight.detach().double().masked_fill(mask, 0)  # (out, in)
    u = (w - dense.detach().double()) @ h  # (out, in): H e per row
    rows = torch.arange(w.shape[0], device=w.device)
    swaps = 0
    for _ in range(rounds):
        if nm is not None:
            df, i, j = _best_nm(w, u, mask, h, nm[1])
        else:
            df, i, j = _best_unstructured(w, u, mask, h, hd, candidates)
        better = df < 0  # (out,)
        if not bool(better.any()):
            break
        r, i, j = rows[better], i[better], j[better]
        wj = w[r, j]
        t = (wj * h[i, j] - u[r, i]) / hd[i]  # the revived weight's value
        u[r] += -wj.unsqueeze(1) * h[j] + t.unsqueeze(1) * h[i]
        w[r, j], w[r, i] = 0.0, t
        mask[r, j], mask[r, i] = True, False
        swaps += int(r.numel())
    return SwapOutcome(w.float(), mask, swaps)
