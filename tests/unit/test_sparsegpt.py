"""SparseGPT against a naive column-by-column OBS reimplementation (METHODS.md section 2)."""

from __future__ import annotations

import logging

import pytest
import torch

from orchestrator.pruning import ActivationStats, prune_weight, sparsegpt_prune, sparsity_of


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _correlated_inputs(seed: int, tokens: int, inp: int) -> torch.Tensor:
    """``X = Z @ A``: strongly correlated input features, ``(tokens, inp)``."""
    g = _gen(seed)
    z = torch.randn(tokens, inp, generator=g)
    a = torch.randn(inp, inp, generator=g) + 2.0 * torch.eye(inp)
    return z @ a


def _naive_sparsegpt(w, h, sparsity, nm, blocksize, percdamp=0.01):
    """Eager, column-by-column OBS in float64: every error is spread at once onto all later columns."""
    w = w.double().clone()
    h = h.double().clone()
    out, cols = w.shape
    for j in range(cols):
        if h[j, j] == 0:
            h[j, j] = 1.0
            w[:, j] = 0.0
    damp = percdamp * sum(float(h[j, j]) for j in range(cols)) / cols
    for j in range(cols):
        h[j, j] += damp
    u = torch.linalg.cholesky(torch.linalg.inv(h), upper=True)  # H^-1 = U^T U
    mask = torch.zeros(out, cols, dtype=torch.bool)
    for b in range(0, cols, blocksize):
        e = min(b + blocksize, cols)
        if nm is None:
            cand = []
            for r in range(out):
                for c in range(b, e):
                    cand.append((float(w[r, c]) ** 2 / float(u[c, c]) ** 2, (c - b) + r * (e - b), r, c))
            cand.sort()
            for _, _, r, c in cand[: int(len(cand) * sparsity)]:
                mask[r, c] = True
        for i in range(b, e):
            if nm is not None and (i - b) % nm[1] == 0:
                n, m = nm
                for r in range(out):
                    grp = sorted(range(i, i + m), key=lambda c, r=r: (float(w[r, c]) ** 2 / float(u[c, c]) ** 2, c))
                    for c in grp[:n]:
                        mask[r, c] = True
            for r in range(out):
                if mask[r, i]:
                    err = float(w[r, i]) / float(u[i, i])
                    for c in range(i, cols):
                        w[r, c] -= err * float(u[i, c])
                    w[r, i] = 0.0
    return w, mask


def _hessian(x: torch.Tensor, samples: int) -> torch.Tensor:
    st = ActivationStats(x.shape[-1], with_xtx=True)
    st.update(x.reshape(samples, -1, x.shape[-1]))
    return st.hessian()


@pytest.mark.parametrize(
    "nm,sparsity,blocksize",
    [(None, 0.5, 4), (None, 0.3, 8), (None, 0.5, 16), ((2, 4), 0.5, 8), ((2, 4), 0.5, 4), ((4, 8), 0.5, 8)],
)
def test_matches_naive_obs(nm, sparsity: float, blocksize: int) -> None:
    out, inp = 6, 16
    w = torch.randn(out, inp, generator=_gen(1))
    h = _hessian(_correlated_inputs(2, 64, inp), samples=8)
    new_w, mask = sparsegpt_prune(w, h, sparsity, nm, blocksize=blocksize)
    ref_w, ref_mask = _naive_sparsegpt(w, h, sparsity, nm, blocksize)
    assert torch.equal(mask, ref_mask)
    torch.testing.assert_close(new_w.double(), ref_w, rtol=1e-3, atol=1e-4)
    assert (new_w[mask] == 0).all()
    assert (new_w[~mask] != w[~mask]).any()  # kept weights were updated, not just masked
    assert new_w.dtype == w.dtype
    if nm is not None:
        n, m = nm
        assert (mask.reshape(out, -1, m).sum(dim=2) == n).all()
    else:
        per_block = mask.reshape(out, inp // blocksize, blocksize).sum(dim=(0, 2))
        assert (per_block == int(out * blocksize * sparsity)).all()


def test_weight_not_modified_and_dtype_kept() -> None:
    w = torch.randn(4, 8, generator=_gen(3)).to(torch.bfloat16)
    w0 = w.clone()
    h = _hessian(_correlated_inputs(4, 32, 8), samples=4)
    new_w, _ = sparsegpt_prune(w, h, 0.5, None, blocksize=4)
    assert torch.equal(w, w0)
    assert new_w.dtype == torch.bfloat16


def test_hessian_kept_unless_owned_and_the_result_is_the_same() -> None:
    w = torch.randn(6, 16, generator=_gen(5))
    h = _hessian(_correlated_inputs(6, 64, 16), samples=4)
    h0 = h.clone()
    ref_w, ref_m = sparsegpt_prune(w, h, 0.5, (2, 4), blocksize=8)
    assert torch.equal(h, h0)  # a borrowed Hessian is left as it was
    own_w, own_m = sparsegpt_prune(w, h, 0.5, (2, 4), blocksize=8, own_hessian=True)
    assert torch.equal(ref_w, own_w) and torch.equal(ref_m, own_m)


def _recon_error(w: torch.Tensor, w2: torch.Tensor, x: torch.Tensor) -> float:
    return float(torch.linalg.norm(x @ w.T - x @ w2.T))


@pytest.mark.parametrize("nm", [None, (2, 4)])
def test_reconstruction_beats_magnitude_and_wanda(nm) -> None:
    out, inp, samples, seq = 32, 64, 16, 32
    w = torch.randn(out, inp, generator=_gen(5))
    x = _correlated_inputs(6, samples * seq, inp)
    st = ActivationStats(inp, with_xtx=True)
    st.update(x.reshape(samples, seq, inp))
    errs = {}
    for method in ("magnitude", "wanda", "sparsegpt"):
        res = prune_weight(w, method, 0.5, nm, act=st, blocksize=16)
        assert sparsity_of(res.weight) == pytest.approx(0.5)
        errs[method] = _recon_error(w, res.weight, x)
    assert errs["sparsegpt"] < 0.9 * errs["wanda"], errs
    assert errs["sparsegpt"] < 0.9 * errs["magnitude"], errs


def test_dead_columns_are_zeroed() -> None:
    out, inp = 5, 12
    x = _correlated_inputs(7, 48, inp)
    x[:, [3, 8]] = 0.0  # these inputs never fire: zero Hessian diagonal
    h = _hessian(x, samples=4)
    assert h[3, 3] == 0 and h[8, 8] == 0
    w = torch.randn(out, inp, generator=_gen(8)) + 5.0  # large, so magnitude alone would keep them
    # 10%: 2 pruned per block of 4 columns x 5 rows, fewer than a dead column's 5 entries
    new_w, mask = sparsegpt_prune(w, h, 0.1, None, blocksize=4)
    assert torch.isfinite(new_w).all()
    assert (new_w[:, 3] == 0).all() and (new_w[:, 8] == 0).all()
    ref_w, ref_mask = _naive_sparsegpt(w, h, 0.1, None, 4)
    assert torch.equal(mask, ref_mask)
    torch.testing.assert_close(new_w.double(), ref_w, rtol=1e-3, atol=1e-4)


def test_cholesky_failure_raises_damping_with_warning(caplog: pytest.LogCaptureFixture) -> None:
    # indefinite: 1% and 10% and 100% of mean(diag) = 0.25 do not make it PD; 1000% does
    h = torch.tensor([[1.0, 0.0], [0.0, -0.5]])
    w = torch.tensor([[1.0, 2.0], [3.0, -0.1]])
    with caplog.at_level(logging.WARNING, logger="orchestrator.pruning.sparsegpt"):
        new_w, mask = sparsegpt_prune(w, h, 0.5, None, blocksize=2, name="blk0.q_proj")
    warns = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warns) == 3
    assert all("blk0.q_proj" in r.getMessage() and "Cholesky" in r.getMessage() for r in warns)
    assert torch.isfinite(new_w).all()
    assert int(mask.sum()) == 2  # the layer was pruned, not skipped
    assert (new_w[mask] == 0).all()


def test_cholesky_never_succeeds_raises() -> None:
    h = torch.tensor([[1.0, 0.0], [0.0, -1.0]])  # mean(diag) = 0: damping cannot help
    with pytest.raises(RuntimeError, match="not positive definite"):
        sparsegpt_prune(torch.ones(2, 2), h, 0.5, None, blocksize=2)


@pytest.mark.parametrize("blocksize", [6, 10, 3])
def test_nm_pattern_holds_when_blocksize_not_multiple_of_m(blocksize: int) -> None:
    """An N:M group must never straddle a lazy-update block."""
    out, inp = 4, 16
    w = torch.randn(out, inp, generator=_gen(9))
    h = _hessian(_correlated_inputs(10, 64, inp), samples=8)
    new_w, mask = sparsegpt_prune(w, h, 0.5, (2, 4), blocksize=blocksize)
    assert (mask.reshape(out, -1, 4).sum(dim=2) == 2).all()
    assert sparsity_of(new_w) == pytest.approx(0.5)
    # for N:M, the block size is only a lazy-batching detail: the result must not depend on it
    ref_w, ref_mask = sparsegpt_prune(w, h, 0.5, (2, 4), blocksize=8)
    assert torch.equal(mask, ref_mask)
    torch.testing.assert_close(new_w, ref_w, rtol=1e-4, atol=1e-5)


def test_nm_rejects_width_not_multiple_of_m() -> None:
    h = torch.eye(6)
    with pytest.raises(ValueError, match="multiple of 4"):
        sparsegpt_prune(torch.ones(2, 6), h, 0.5, (2, 4), blocksize=4)


@pytest.mark.parametrize("nm", [None, (2, 4)])
def test_gblm_sparsegpt_follows_the_gradient_term(nm) -> None:
    """``gblm-sparsegpt``: alpha 0 is SparseGPT bit for bit; a large gradient on some weights keeps them."""
    out, inp = 16, 32
    w = torch.randn(out, inp, generator=_gen(11))
    x = _correlated_inputs(12, 256, inp)
    st = ActivationStats(inp, with_xtx=True)
    st.update(x.reshape(8, 32, inp))
    grad = torch.rand(out, inp, generator=_gen(13))
    plain = prune_weight(w, "sparsegpt", 0.5, nm, act=st, blocksize=16)
    zero = prune_weight(w, "gblm-sparsegpt", 0.5, nm, act=st, grad=grad, alpha=0.0, blocksize=16)
    assert torch.equal(zero.mask, plain.mask) and torch.equal(zero.weight, plain.weight)
    hot = torch.zeros(out, inp, dtype=torch.bool)
    hot[:, ::4] = True  # one column of every group of 4: N:M can keep all of them
    spiked = torch.where(hot, grad + 1000.0, grad)
    res = prune_weight(w, "gblm-sparsegpt", 0.5, nm, act=st, grad=spiked, alpha=100.0, blocksize=16)
    assert not bool(res.mask[hot].any())  # the gradient term decided: every hot weight kept
    assert plain.mask[hot].any()  # which plain SparseGPT would have pruned
    assert sparsity_of(res.weight) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="gblm-sparsegpt needs gradient statistics"):
        prune_weight(w, "gblm-sparsegpt", 0.5, nm, act=st)


def test_gblm_sparsegpt_nm_weighs_the_gradient_term_by_its_block() -> None:
    """N:M: both saliency terms are normalised over the column block, not over each group of M columns.

    The first group of the first block carries gradients a million times smaller than the rest of the
    block: against the block's mean they are nothing, so OBS's saliency alone decides that group, as in
    plain SparseGPT (normalised per group, the same tiny gradients would be mean-1 and decide it).
    """
    out, inp = 16, 32
    w = torch.randn(out, inp, generator=_gen(21))
    st = ActivationStats(inp, with_xtx=True)
    st.update(_correlated_inputs(22, 256, inp).reshape(8, 32, inp))
    grad = torch.rand(out, inp, generator=_gen(23)) + 0.5
    grad[:, :4] *= 1e-6
    plain = prune_weight(w, "sparsegpt", 0.5, (2, 4), act=st, blocksize=16)
    res = prune_weight(w, "gblm-sparsegpt", 0.5, (2, 4), act=st, grad=grad, alpha=100.0, blocksize=16)
    assert torch.equal(res.mask[:, :4], plain.mask[:, :4])
    assert not torch.equal(res.mask[:, 4:16], plain.mask[:, 4:16])  # where the gradients count, they decide
