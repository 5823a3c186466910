"""Least-squares reconstruction of kept weights against a plain ``torch.linalg.lstsq`` reimplementation."""

from __future__ import annotations

import pytest
import torch

from orchestrator.engine.block_step import StepContext, block_step
from orchestrator.engine.blocks import block_linears
from orchestrator.inputs.config import PruningConfig
from orchestrator.pruning.reconstruct import damped, output_error, reconstruct, reconstruct_cg, reconstruct_exact


def _layer(out: int = 6, inp: int = 12, tokens: int = 200, seed: int = 0, correlated: bool = False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, inp, generator=g)  # (tokens, in)
    if correlated:  # inputs that share a few directions: the case where reconstruction matters
        x = x @ (torch.eye(inp) + 0.9 * torch.randn(inp, inp, generator=g))
    w = torch.randn(out, inp, generator=g)  # (out, in)
    mask = torch.rand(out, inp, generator=g) < 0.5  # different kept counts per row
    return x, w, mask


def _lstsq_reference(x: torch.Tensor, w: torch.Tensor, mask: torch.Tensor, percdamp: float) -> torch.Tensor:
    """Row by row: ``min ||X_K v - X w||^2 + lam ||v - w_K||^2`` as one stacked least-squares problem (float64)."""
    x, w = x.double(), w.double()
    _, lam = damped(x.t() @ x, percdamp)
    out = torch.zeros_like(w)
    for r in range(w.shape[0]):
        keep = (~mask[r]).nonzero().squeeze(1)
        a = torch.cat([x[:, keep], lam**0.5 * torch.eye(keep.numel(), dtype=x.dtype)])  # (tokens + k, k)
        b = torch.cat([x @ w[r], lam**0.5 * w[r, keep]])  # (tokens + k,)
        out[r, keep] = torch.linalg.lstsq(a, b.unsqueeze(1)).solution.squeeze(1)
    return out


@pytest.mark.parametrize("percdamp", [0.01, 0.1])
def test_exact_matches_lstsq(percdamp):
    x, w, mask = _layer()
    got = reconstruct_exact(w, mask, x.t() @ x, percdamp)
    ref = _lstsq_reference(x, w, mask, percdamp).float()
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
    assert bool((got[mask] == 0).all())


def test_cg_converges_to_the_exact_solution():
    x, w, mask = _layer(correlated=True)
    xtx = x.t() @ x
    exact = reconstruct_exact(w, mask, xtx, 0.01)
    cg = reconstruct_cg(w, mask, xtx, 0.01, iters=200, tol=1e-8)
    torch.testing.assert_close(cg, exact, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("solver,iters", [("exact", 0), ("cg", 1), ("cg", 3), ("cg", 30)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_error_never_above_the_plain_mask(solver, iters, seed):
    x, w, mask = _layer(out=16, inp=24, seed=seed, correlated=True)
    xtx = x.t() @ x
    masked = w.masked_fill(mask, 0)
    new = reconstruct(w, mask, xtx, solver, 0.01, max(iters, 1))
    assert bool((new[mask] == 0).all())
    before, after = output_error(masked, w, xtx), output_error(new, w, xtx)
    assert after <= before * (1 + 1e-6)
    assert after < 0.9 * before  # and it helps: correlated inputs let kept weights absorb the pruned ones


def test_cg_error_falls_with_iterations():
    x, w, mask = _layer(out=8, inp=32, correlated=True, seed=3)
    xtx = x.t() @ x
    errs = [output_error(reconstruct_cg(w, mask, xtx, 0.01, iters=k), w, xtx) for k in (1, 2, 4, 8, 16)]
    assert all(b <= a * (1 + 1e-6) for a, b in zip(errs, errs[1:], strict=False)), errs


def test_unknown_solver_is_an_error():
    x, w, mask = _layer()
    with pytest.raises(ValueError, match="solver 'qr'"):
        reconstruct(w, mask, x.t() @ x, "qr")


def test_block_step_reconstructs_with_the_method_mask(tiny_block):
    """In the block step, ``reconstruct: layer`` keeps the method's mask and lowers every linear's output error."""
    block, hidden, kwargs = tiny_block
    plain_block = _copy(block)
    dense = {n: lin.weight.detach().clone() for n, lin in block_linears(block).items()}
    for method in ("magnitude", "wanda"):
        plain = block_step(_copy(plain_block), hidden, kwargs, StepContext(PruningConfig(method=method))).results[0]
        cfg = PruningConfig(method=method, reconstruct="layer")
        cfg.lstsq.solver = "exact"
        rec_block = _copy(plain_block)
        rec = block_step(rec_block, hidden, kwargs, StepContext(cfg)).results[0]
        xtx = _input_xtx(plain_block, hidden, kwargs)
        for name in dense:
            assert torch.equal(rec[name].mask, plain[name].mask), (method, name)
            assert output_error(rec[name].weight, dense[name], xtx[name]) < output_error(
                plain[name].weight, dense[name], xtx[name]), (method, name)


def _copy(block):
    import copy

    return copy.deepcopy(block)


def _input_xtx(block, hidden, kwargs):
    from orchestrator.engine.blocks import collect_inputs, forward_all
    from orchestrator.engine.device import Placement

    linears = block_linears(block)
    with collect_inputs(linears, True) as stats:
        forward_all(block, hidden, kwargs, Placement())
    return {n: st.xtx for n, st in stats.items()}


@pytest.fixture
def tiny_block(tiny_block_of):
    """Block 0 of a seeded tiny LLaMA with its inputs on 4 random sequences."""
    return tiny_block_of(4)


def _wanda_stats(x: torch.Tensor):
    from orchestrator.pruning.stats import ActivationStats

    st = ActivationStats(x.shape[1], with_xtx=True)
    st.update(x.unsqueeze(0))
    return st


@pytest.mark.parametrize("nm", [None, (2, 4), (4, 8)])
def test_gradual_rounds_match_a_plain_loop(nm):
    """``rounds: T`` grows the mask over T rounds of Wanda scores on the re-solved weights; a plain loop agrees."""
    from orchestrator.pruning.masks import nm_mask, row_mask
    from orchestrator.pruning.methods import prune_reconstructed

    x, w, _ = _layer(out=8, inp=16, correlated=True, seed=4)
    st = _wanda_stats(x)
    norm = st.input_norm()
    res = prune_reconstructed(w, "wanda", 0.5, nm, st, rounds=2, solver="exact")
    mask, cur = torch.zeros_like(w, dtype=torch.bool), w
    for t in (1, 2):
        score = (cur.abs() * norm).masked_fill(mask, float("-inf"))
        new = nm_mask(score, nm[0] * t // 2, nm[1]) if nm else row_mask(score, 0.5 * t / 2)
        assert bool(new[mask].all())  # what was pruned stays pruned
        mask, cur = new, reconstruct_exact(w, new, st.xtx)
    assert torch.equal(res.mask, mask)
    torch.testing.assert_close(res.weight, cur)
    if nm:
        assert bool((res.mask.reshape(8, -1, nm[1]).sum(2) == nm[0]).all())
    else:
        assert bool((res.mask.sum(1) == 8).all())
    one = prune_reconstructed(w, "wanda", 0.5, nm, st, rounds=1, solver="exact")
    assert not torch.equal(one.mask, res.mask)  # the rounds change the mask


def test_reconstruction_needs_xtx():
    from orchestrator.pruning.methods import prune_reconstructed
    from orchestrator.pruning.stats import ActivationStats

    st = ActivationStats(4)
    st.update(torch.ones(1, 2, 4))
    with pytest.raises(ValueError, match="needs activation statistics with xtx"):
        prune_reconstructed(torch.ones(2, 4), "wanda", 0.5, None, st)


def test_cg_tolerance_stops_each_row_on_its_own():
    """``lstsq.tol``: a row stops once its residual fell by ``tol``; its result does not depend on which other rows
    share the solve (a rank solving a slice gets the same rows), and it lies between the early and the converged
    iterate in output error."""
    x, w, mask = _layer(out=12, inp=24, correlated=True)
    xtx = x.t() @ x
    full = reconstruct_cg(w, mask, xtx, 0.01, iters=100, tol=1e-2)
    part = reconstruct_cg(w[3:7], mask[3:7], xtx, 0.01, iters=100, tol=1e-2)
    torch.testing.assert_close(part, full[3:7], rtol=1e-5, atol=1e-6)
    loose = reconstruct_cg(w, mask, xtx, 0.01, iters=100, tol=0.5)
    tight = reconstruct_cg(w, mask, xtx, 0.01, iters=100, tol=1e-6)
    errors = [output_error(r, w, xtx) for r in (w * ~mask, loose, full, tight)]
    assert errors == sorted(errors, reverse=True), errors  # a tighter stop never fits worse
    assert not torch.equal(loose, tight)  # the tolerance does stop rows early
    assert bool((full[mask] == 0).all())
