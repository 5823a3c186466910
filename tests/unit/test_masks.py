"""Mask builders against naive loops, and prune_weight's dispatch (METHODS.md section 2)."""

from __future__ import annotations

import math

import pytest
import torch

from orchestrator.pruning import ActivationStats, GradientStats, matrix_mask, nm_mask, prune_weight, row_mask
from orchestrator.pruning.masks import apply_mask, build_mask, sparsity_of


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _naive_row_mask(score: torch.Tensor, s: float) -> torch.Tensor:
    out, inp = score.shape
    k = math.floor(inp * s)
    mask = torch.zeros(out, inp, dtype=torch.bool)
    for i in range(out):
        order = sorted(range(inp), key=lambda j: (float(score[i, j]), j))  # stable
        for j in order[:k]:
            mask[i, j] = True
    return mask


def _naive_nm_mask(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    out, inp = score.shape
    mask = torch.zeros(out, inp, dtype=torch.bool)
    for i in range(out):
        for g0 in range(0, inp, m):
            cols = sorted(range(g0, g0 + m), key=lambda j: (float(score[i, j]), j))
            for j in cols[:n]:
                mask[i, j] = True
    return mask


@pytest.mark.parametrize("sparsity", [0.1, 0.5, 0.6, 0.9])
@pytest.mark.parametrize("inp", [7, 16, 33])
def test_row_mask_matches_naive(sparsity: float, inp: int) -> None:
    score = torch.rand(6, inp, generator=_gen(inp))
    mask = row_mask(score, sparsity)
    k = math.floor(inp * sparsity)
    assert mask.dtype == torch.bool
    assert (mask.sum(dim=1) == k).all()
    assert torch.equal(mask, _naive_row_mask(score, sparsity))
    # every pruned score is <= every kept score of the same row
    for i in range(score.shape[0]):
        if 0 < k < inp:
            assert score[i][mask[i]].max() <= score[i][~mask[i]].min()


def test_row_mask_ties_are_stable() -> None:
    score = torch.ones(3, 8)
    mask = row_mask(score, 0.5)
    assert mask[:, :4].all() and not mask[:, 4:].any()


def test_row_mask_zero_sparsity_prunes_nothing() -> None:
    assert not row_mask(torch.rand(3, 5, generator=_gen(0)), 0.1).any()  # floor(0.5) = 0


def test_matrix_mask_one_threshold() -> None:
    score = torch.rand(8, 10, generator=_gen(1))
    score[0] *= 0.01  # row 0 holds the smallest scores: a per-matrix threshold prunes it all
    mask = matrix_mask(score, 0.5)
    assert int(mask.sum()) == 40
    assert mask[0].all()
    assert score[mask].max() <= score[~mask].min()
    flat_sorted = sorted(range(80), key=lambda t: (float(score.reshape(-1)[t]), t))
    ref = torch.zeros(80, dtype=torch.bool)
    ref[flat_sorted[:40]] = True
    assert torch.equal(mask, ref.view(8, 10))


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4)])
def test_nm_mask_matches_naive_and_pattern(n: int, m: int) -> None:
    score = torch.rand(5, 4 * m, generator=_gen(n * 10 + m))
    mask = nm_mask(score, n, m)
    assert torch.equal(mask, _naive_nm_mask(score, n, m))
    groups = mask.reshape(5, -1, m)
    assert (groups.sum(dim=2) == n).all()
    w = torch.randn(5, 4 * m, generator=_gen(3)) + 10.0  # no zeros before masking
    apply_mask(w, mask)
    assert sparsity_of(w) == pytest.approx(n / m)


def test_nm_mask_rejects_bad_width() -> None:
    with pytest.raises(ValueError, match="multiple of 4"):
        nm_mask(torch.rand(2, 6), 2, 4)


def test_build_mask_dispatch() -> None:
    score = torch.rand(4, 8, generator=_gen(5))
    score[0] *= 0.01
    assert torch.equal(build_mask(score, 0.5, (2, 4)), nm_mask(score, 2, 4))
    assert torch.equal(build_mask(score, 0.5, None), row_mask(score, 0.5))
    assert torch.equal(build_mask(score, 0.5, None, per_row=False), matrix_mask(score, 0.5))
    assert not torch.equal(row_mask(score, 0.5), matrix_mask(score, 0.5))


def test_apply_mask_in_place_and_sparsity_of() -> None:
    w = torch.arange(1.0, 13.0).view(3, 4)
    mask = torch.zeros(3, 4, dtype=torch.bool)
    mask[0, 1] = mask[2, 3] = mask[1, 0] = True
    out = apply_mask(w, mask)
    assert out is w
    assert w[0, 1] == 0 and w[2, 3] == 0 and w[1, 0] == 0
    assert sparsity_of(w) == pytest.approx(3 / 12)


# ------------------------------------------------------------ prune_weight


def _stats(inp: int, seed: int) -> ActivationStats:
    g = _gen(seed)
    st = ActivationStats(inp)
    st.update(torch.randn(4, 6, inp, generator=g) * torch.linspace(0.1, 4.0, inp))
    return st


def test_prune_weight_magnitude_uses_per_matrix_threshold() -> None:
    w = torch.randn(6, 16, generator=_gen(6))
    w[0] *= 0.01
    res = prune_weight(w, "magnitude", 0.5, None)
    assert torch.equal(res.mask, matrix_mask(w.abs(), 0.5))
    assert torch.equal(res.weight, w.masked_fill(res.mask, 0))
    assert res.mask[0].all()
    # N:M magnitude is per row
    res24 = prune_weight(w, "magnitude", 0.5, (2, 4))
    assert torch.equal(res24.mask, _naive_nm_mask(w.abs(), 2, 4))
    assert w[0, 0] != 0  # the input weight is not modified


def test_prune_weight_wanda_matches_naive_mask() -> None:
    w = torch.randn(6, 16, generator=_gen(7))
    st = _stats(16, 8)
    res = prune_weight(w, "wanda", 0.5, None, act=st)
    score = w.abs() * st.input_norm()
    assert torch.equal(res.mask, _naive_row_mask(score, 0.5))
    assert (res.weight[res.mask] == 0).all()
    assert torch.equal(res.weight[~res.mask], w[~res.mask])
    assert res.score_mean == pytest.approx(float(score[~res.mask].mean()), rel=1e-6)


@pytest.mark.parametrize("nm", [None, (2, 4), (4, 8)])
@pytest.mark.parametrize("norm", ["l1", "l2"])
def test_gblm_alpha_zero_gives_wanda_masks(nm, norm: str) -> None:
    w = torch.randn(8, 32, generator=_gen(9))
    st = _stats(32, 10)
    grad = torch.rand(8, 32, generator=_gen(11))
    wanda = prune_weight(w, "wanda", 0.5, nm, act=st)
    gblm0 = prune_weight(w, "gblm", 0.5, nm, act=st, grad=grad, alpha=0.0, norm=norm)
    gblm = prune_weight(w, "gblm", 0.5, nm, act=st, grad=grad, alpha=100.0, norm=norm)
    assert torch.equal(gblm0.mask, wanda.mask)
    assert torch.equal(gblm0.weight, wanda.weight)
    assert not torch.equal(gblm.mask, wanda.mask)  # the gradient term does change the mask


def test_prune_weight_gblm_with_gradient_stats_matches_naive() -> None:
    w = torch.randn(6, 8, generator=_gen(12))
    st = _stats(8, 13)
    gs = GradientStats(tuple(w.shape), kinds=("abs", "sq"), scale=100.0)
    grads = [torch.randn(6, 8, generator=_gen(20 + k)) * 1e-3 for k in range(3)]
    for g in grads:
        gs.update(g)
    norm = st.input_norm()
    for kind, norm_name in (("abs", "l1"), ("sq", "l2")):
        res = prune_weight(w, "gblm", 0.5, None, act=st, grad=gs[kind], alpha=100.0, norm=norm_name)
        ref = torch.zeros(6, 8)
        for i in range(6):
            for j in range(8):
                if norm_name == "l1":
                    gterm = sum(abs(100 * float(g[i, j])) for g in grads)
                else:
                    gterm = math.sqrt(sum((100 * float(g[i, j])) ** 2 for g in grads))
                ref[i, j] = abs(float(w[i, j])) * (float(norm[j]) + 100.0 * gterm)
        assert torch.equal(res.mask, _naive_row_mask(ref, 0.5))


def test_prune_weight_errors() -> None:
    w = torch.randn(4, 8, generator=_gen(14))
    with pytest.raises(ValueError, match="wanda needs"):
        prune_weight(w, "wanda", 0.5, None)
    with pytest.raises(ValueError, match="gblm needs"):
        prune_weight(w, "gblm", 0.5, None, act=_stats(8, 0))
    with pytest.raises(ValueError, match="sparsegpt needs"):
        prune_weight(w, "sparsegpt", 0.5, None)
    with pytest.raises(ValueError, match="unknown pruning method"):
        prune_weight(w, "random", 0.5, None)
