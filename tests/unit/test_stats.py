"""Calibration statistics: naive sums, hessian, and merge-by-addition (METHODS.md section 1)."""

from __future__ import annotations

import itertools

import pytest
import torch

from orchestrator.pruning import ActivationStats, GradientStats
from orchestrator.pruning.stats import add_gradient


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _data(seed: int = 0, n: int = 6, seq: int = 5, inp: int = 4) -> torch.Tensor:
    return torch.randn(n, seq, inp, generator=_gen(seed)) * torch.linspace(0.5, 2.0, inp)


def test_act_sq_and_counts_match_naive() -> None:
    x = _data()
    st = ActivationStats(4, with_xtx=True)
    st.update(x[:2])
    st.update(x[2])  # a 2-D (seq, in) input counts as one sequence
    st.update(x[3:])
    assert st.samples == 6 and st.tokens == 30
    ref = [sum(float(x[a, t, j]) ** 2 for a in range(6) for t in range(5)) for j in range(4)]
    torch.testing.assert_close(st.act_sq, torch.tensor(ref), rtol=1e-5, atol=1e-5)


def test_hessian_is_two_over_n_sum_xxT() -> None:
    x = _data(1)
    st = ActivationStats(4, with_xtx=True)
    st.update(x)
    ref = torch.zeros(4, 4, dtype=torch.float64)
    for a in range(x.shape[0]):
        for t in range(x.shape[1]):
            v = x[a, t].double()
            ref += torch.outer(v, v)
    ref *= 2.0 / x.shape[0]
    torch.testing.assert_close(st.hessian().double(), ref, rtol=1e-5, atol=1e-5)
    assert st.hessian().dtype == torch.float32
    torch.testing.assert_close(st.hessian(), st.hessian().T)


def test_hessian_requires_xtx() -> None:
    st = ActivationStats(4)
    st.update(_data())
    assert st.xtx is None
    with pytest.raises(ValueError, match="xtx"):
        st.hessian()


def test_low_precision_inputs_accumulate_in_fp32() -> None:
    x = _data(2).to(torch.bfloat16)
    st = ActivationStats(4, with_xtx=True)
    st.update(x)
    assert st.act_sq.dtype == torch.float32 and st.xtx.dtype == torch.float64  # sequences summed in fp64
    torch.testing.assert_close(st.act_sq, x.float().pow(2).sum(dim=(0, 1)))


def test_activation_merge_any_order_equals_all_data() -> None:
    x = _data(3, n=9)
    full = ActivationStats(4, with_xtx=True)
    full.update(x)
    parts = [x[0:2], x[2:3], x[3:7], x[7:9]]
    for order in itertools.permutations(range(4)):
        shards = []
        for k in order:
            s = ActivationStats(4, with_xtx=True)
            s.update(parts[k])
            shards.append(s)
        merged = shards[0]
        for s in shards[1:]:
            assert merged.merge(s) is merged
        assert merged.samples == full.samples and merged.tokens == full.tokens
        torch.testing.assert_close(merged.act_sq, full.act_sq, rtol=1e-6, atol=1e-5)
        torch.testing.assert_close(merged.xtx, full.xtx, rtol=1e-6, atol=1e-5)
        torch.testing.assert_close(merged.input_norm(), full.input_norm())
        torch.testing.assert_close(merged.hessian(), full.hessian(), rtol=1e-6, atol=1e-5)


def test_merge_into_xtx_needs_xtx() -> None:
    a = ActivationStats(4, with_xtx=True)
    b = ActivationStats(4)
    with pytest.raises(ValueError, match="xtx"):
        a.merge(b)


def test_gradient_stats_match_naive_per_sequence_sums() -> None:
    grads = [torch.randn(3, 4, generator=_gen(10 + k)) for k in range(5)]
    gs = GradientStats((3, 4), kinds=("abs", "sq", "sum"), scale=100.0)
    for g in grads:
        gs.update(g)
    assert gs.samples == 5
    for i in range(3):
        for j in range(4):
            vals = [100.0 * float(g[i, j]) for g in grads]
            assert gs["abs"][i, j].item() == pytest.approx(sum(abs(v) for v in vals), rel=1e-5)
            assert gs["sq"][i, j].item() == pytest.approx(sum(v * v for v in vals), rel=1e-5)
            assert gs["sum"][i, j].item() == pytest.approx(sum(vals), rel=1e-4, abs=1e-3)


def test_gradient_stats_keep_only_requested_kinds() -> None:
    gs = GradientStats((2, 2), kinds=("sq",))
    assert set(gs.sums) == {"sq"}
    with pytest.raises(KeyError):
        gs["abs"]
    with pytest.raises(ValueError, match="unknown gradient"):
        GradientStats((2, 2), kinds=("abs", "cube"))


def test_gradient_merge_any_order_equals_all_data() -> None:
    grads = [torch.randn(3, 4, generator=_gen(30 + k)) for k in range(6)]
    full = GradientStats((3, 4), kinds=("abs", "sq", "sum"), scale=2.0)
    for g in grads:
        full.update(g)
    splits = [grads[:1], grads[1:4], grads[4:]]
    for order in itertools.permutations(range(3)):
        parts = []
        for k in order:
            p = GradientStats((3, 4), kinds=("abs", "sq", "sum"), scale=2.0)
            for g in splits[k]:
                p.update(g)
            parts.append(p)
        merged = parts[0].merge(parts[1]).merge(parts[2])
        assert merged.samples == 6
        for kind in ("abs", "sq", "sum"):
            torch.testing.assert_close(merged[kind], full[kind], rtol=1e-6, atol=1e-5)


def test_add_gradient_unscaled_and_bf16() -> None:
    g = torch.randn(3, 3, generator=_gen(40)).to(torch.bfloat16)
    sums = {"abs": torch.zeros(3, 3), "sq": torch.zeros(3, 3)}
    add_gradient(sums, g, 1.0)
    add_gradient(sums, g, 1.0)
    torch.testing.assert_close(sums["abs"], 2 * g.float().abs())
    torch.testing.assert_close(sums["sq"], 2 * g.float() ** 2)


def test_per_sample_weight_grad_stats_equal_batch1_autograd():
    """Per-sample stats from (input, output grad) equal batch-1 autograd weight gradients folded one by one."""
    from orchestrator.pruning.stats import add_gradient, per_sample_weight_grad_stats

    torch.manual_seed(0)
    lin = torch.nn.Linear(6, 5, bias=False)
    x = torch.randn(3, 4, 6)  # (B, T, in)
    target = torch.randn(3, 4, 5)
    weights = torch.tensor([100.0, 0.0, 100.0])  # the middle sample is padding
    ref = {k: torch.zeros(5, 6) for k in ("abs", "sq", "sum")}
    for b in range(3):
        lin.zero_grad()
        ((lin(x[b : b + 1]) - target[b : b + 1]) ** 2).mean().backward()
        if weights[b]:
            add_gradient(ref, lin.weight.grad, float(weights[b]))
    xr = x.clone().requires_grad_(False)
    y = xr @ lin.weight.detach().T  # (B, T, out)
    y.requires_grad_(True)
    per_seq = ((y - target) ** 2).mean(dim=(1, 2)).sum()  # each sample's own mean loss
    (gy,) = torch.autograd.grad(per_seq, y)
    got = per_sample_weight_grad_stats(xr, gy, ("abs", "sq", "sum"), weights)
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-5, atol=1e-6)
    # the batch-summed gradient is not what "abs" holds: signs cancel across samples
    assert not torch.allclose(got["abs"], got["sum"].abs())
