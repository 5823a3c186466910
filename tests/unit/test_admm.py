"""The ADMM support search (issue 32) against its optimum where it is known and a plain reimplementation."""

from __future__ import annotations

import pytest
import torch

from orchestrator.pruning.admm import AdmmSettings, admm_mask, prune_mask
from orchestrator.pruning.methods import prune_reconstructed
from orchestrator.pruning.reconstruct import reconstruct
from orchestrator.pruning.stats import ActivationStats
from orchestrator.pruning.swaps import refine_swaps


def layer_objective(weight: torch.Tensor, dense: torch.Tensor, xtx: torch.Tensor) -> float:
    """The reference objective, in fp64: ``trace((W - W0) H (W - W0)^T)``."""
    e = weight.double() - dense.double()  # (out, in)
    return float(((e @ xtx.double()) * e).sum())


def _plain_admm(w0: torch.Tensor, h: torch.Tensor, sparsity: float, nm, init_mask: torch.Tensor,
                s: AdmmSettings) -> torch.Tensor:
    """The search written out step by step (fp64, an explicit solve every iteration, sort-based projection)."""
    h = h + s.percdamp * torch.diag(h).mean() * torch.eye(h.shape[0], dtype=h.dtype)
    norm = torch.diag(h).sqrt()
    hn = h / torch.outer(norm, norm)
    b0 = w0 * norm
    d, v, rho = b0 * ~init_mask, torch.zeros_like(b0), s.rho
    keep = last = ~init_mask
    kept = int(keep.sum())
    for it in range(1, s.max_iters + 1):
        b = torch.linalg.solve(hn + rho * torch.eye(hn.shape[0], dtype=hn.dtype), (b0 @ hn - v + rho * d).T).T
        z = b + v / rho
        sal = z.square()
        if nm is None:
            order = torch.sort(sal.reshape(-1)).indices
            keep = torch.ones(sal.numel(), dtype=torch.bool)
            keep[order[: int(sal.numel() * sparsity)]] = False
            keep = keep.view_as(sal)
        else:
            n, m = nm
            groups = sal.reshape(sal.shape[0], -1, m)
            order = torch.sort(groups, dim=2).indices[:, :, :n]
            keep = ~torch.zeros_like(groups, dtype=torch.bool).scatter(2, order, True).reshape(sal.shape)
        d = z * keep
        v = v + rho * (b - d)
        if it % s.check_every == 0:
            moved = int((keep != last).sum()) / (2 * kept)
            last = keep
            if it >= s.min_iters and moved < s.stop_tol:
                break
            rho = min(rho * (1.3 if moved > 0.1 else 1.2 if moved > 0.005 else 1.1), 1e6)
    return ~keep


def _separable(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Generator]:
    """A layer with uncorrelated inputs (diagonal ``H``): pruning ``w_ij`` costs ``H_jj w_ij^2`` whatever else is
    pruned, so the optimum of a pattern prunes the smallest costs its constraint allows."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(16, 32, generator=g, dtype=torch.float64)
    h = torch.diag(torch.rand(32, generator=g, dtype=torch.float64) * 10 + 0.1)
    return w, h, g


@pytest.mark.parametrize("seed", range(4))
def test_search_then_swaps_find_the_known_nm_optimum(seed):
    """From a random 2:4 support, ADMM then swap moves reach the optimum (each group's two cheapest pruned)."""
    w, h, g = _separable(seed)
    start = prune_mask(torch.rand(16, 32, generator=g), 0.5, (2, 4))
    found = admm_mask(w, h, 0.5, (2, 4), init_mask=start, settings=AdmmSettings(percdamp=1e-9)).mask
    refined = refine_swaps(w * ~found, w, found, h, (2, 4), rounds=50, percdamp=1e-9).mask
    assert torch.equal(refined, prune_mask(torch.diag(h) * w.square(), 0.5, (2, 4)))
    assert layer_objective(w * ~found, w, h) < layer_objective(w * ~start, w, h)


def test_swaps_find_each_rows_optimum_for_its_count():
    """Unstructured swaps keep every row's count and reach the best support of that count (the cheapest pruned)."""
    w, h, g = _separable(5)
    start = torch.rand(16, 32, generator=g) < torch.linspace(0.2, 0.8, 16).unsqueeze(1)  # uneven rows
    out = refine_swaps(w * ~start, w, start, h, None, rounds=200, candidates=4, percdamp=1e-9)
    assert torch.equal(out.mask.sum(1), start.sum(1))
    cost = torch.diag(h) * w.square()
    for r in range(16):
        k = int(start[r].sum())
        assert set(out.mask[r].nonzero().flatten().tolist()) == set(torch.sort(cost[r]).indices[:k].tolist())


@pytest.mark.parametrize("nm", [None, (2, 4), (4, 8)])
def test_swaps_never_raise_the_objective_and_keep_the_pattern(nm):
    g = torch.Generator().manual_seed(6)
    x = torch.randn(128, 32, generator=g, dtype=torch.float64) @ torch.randn(32, 32, generator=g, dtype=torch.float64)
    h = x.T @ x
    w = torch.randn(24, 32, generator=g, dtype=torch.float64)
    start = prune_mask(w.abs() + torch.rand(24, 32, generator=g, dtype=torch.float64), 0.5, nm)
    fit = reconstruct(w, start, h, "exact")
    before = layer_objective(fit, w, h)
    for rounds in (1, 3, 30):
        out = refine_swaps(fit, w, start, h, nm, rounds)
        hd = h + 0.01 * torch.diag(h).mean() * torch.eye(32, dtype=h.dtype)  # the damped objective it lowers
        assert layer_objective(out.weight, w, hd) <= layer_objective(fit, w, hd)
        assert out.swaps > 0 and bool((out.weight[out.mask] == 0).all())
        if nm is None:
            assert torch.equal(out.mask.sum(1), start.sum(1))
        else:
            assert bool((out.mask.reshape(24, -1, nm[1]).sum(2) == nm[0]).all())
    assert layer_objective(reconstruct(w, out.mask, h, "exact"), w, h) < before


@pytest.mark.parametrize("nm", [None, (2, 4)])
def test_matches_a_plain_reimplementation_on_correlated_inputs(nm):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(256, 24, generator=g, dtype=torch.float64) @ torch.randn(24, 24, generator=g, dtype=torch.float64)
    h = x.T @ x  # (in, in): correlated inputs
    w = torch.randn(12, 24, generator=g, dtype=torch.float64)
    start = prune_mask(w.abs(), 0.5, nm)
    settings = AdmmSettings()
    got = admm_mask(w, h, 0.5, nm, init_mask=start, settings=settings)
    want = _plain_admm(w, h, 0.5, nm, start, settings)
    assert torch.equal(got.mask, want)
    assert got.iters >= settings.min_iters
    fit = reconstruct(w, got.mask, h, "exact")
    assert layer_objective(fit, w, h) < layer_objective(reconstruct(w, start, h, "exact"), w, h)


@pytest.mark.parametrize("method,nm", [("sparsegpt", None), ("sparsegpt", (2, 4)), ("wanda", None),
                                       ("gblm-sparsegpt", (4, 8))])
def test_the_searched_layer_never_reconstructs_worse_than_its_start(method, nm):
    """``pruning.search: admm`` and ``pruning.swaps`` keep the method's own result when what they find fits the layer
    worse."""
    g = torch.Generator().manual_seed(2)
    stats = ActivationStats(48, with_xtx=True)
    stats.update(torch.randn(4, 64, 48, generator=g) @ torch.randn(48, 48, generator=g))
    w = torch.randn(40, 48, generator=g)
    grad = torch.rand(40, 48, generator=g)
    kw = {"grad": grad, "alpha": 0.5} if method == "gblm-sparsegpt" else {}
    aware = AdmmSettings(grad_alpha=0.5)
    plain = prune_reconstructed(w, method, 0.5, nm, stats, **kw)
    for settings, swaps in ((aware, 0), (AdmmSettings(max_iters=1, min_iters=0), 0), (None, 5),
                            (aware, 5)):  # a search stopped at once too
        searched = prune_reconstructed(w, method, 0.5, nm, stats, search=settings, swaps=swaps, **kw)
        xtx = stats.xtx.float()
        assert layer_objective(searched.weight, w, xtx) <= layer_objective(plain.weight, w, xtx)
        assert int(searched.mask.sum()) == int(plain.mask.sum())  # the same number pruned
        assert torch.equal(searched.weight == 0, searched.mask) or bool((searched.weight[searched.mask] == 0).all())
        if nm is not None:  # the pattern holds
            n, m = nm
            assert bool((searched.mask.reshape(40, -1, m).sum(2) == n).all())


def test_the_gradient_term_moves_the_support():
    """The gradient-aware projection: a large gradient on a weight keeps it where the plain search prunes it."""
    g = torch.Generator().manual_seed(3)
    w = torch.randn(8, 16, generator=g, dtype=torch.float64)
    h = torch.eye(16, dtype=torch.float64)
    plain = admm_mask(w, h, 0.5, (2, 4)).mask
    i, j = map(int, plain.nonzero()[0])
    grad = torch.full_like(w, 1e-3)
    grad[i, j] = 1e3
    aware = admm_mask(w, h, 0.5, (2, 4), grad_term=grad, settings=AdmmSettings(grad_alpha=1.0)).mask
    assert plain[i, j] and not aware[i, j]
