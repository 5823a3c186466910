"""Importance scores against naive per-element reimplementations (METHODS.md section 2)."""

from __future__ import annotations

import math

import pytest
import torch

from orchestrator.pruning import ActivationStats, gblm_score, magnitude_score, wanda_score


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _layer(seed: int = 0, out: int = 5, inp: int = 7, n: int = 3, seq: int = 4):
    g = _gen(seed)
    w = torch.randn(out, inp, generator=g)
    x = torch.randn(n, seq, inp, generator=g) * torch.linspace(0.1, 3.0, inp)
    grad = torch.randn(out, inp, generator=g).abs()
    return w, x, grad


def _naive_input_norm(x: torch.Tensor) -> list[float]:
    n, seq, inp = x.shape
    out = []
    for j in range(inp):
        s = 0.0
        for a in range(n):
            for t in range(seq):
                s += float(x[a, t, j]) ** 2
        out.append(math.sqrt(s / n))
    return out


def test_magnitude_is_abs_fp32() -> None:
    w, _, _ = _layer()
    w16 = w.to(torch.bfloat16)
    s = magnitude_score(w16)
    assert s.dtype == torch.float32
    for i in range(w.shape[0]):
        for j in range(w.shape[1]):
            assert s[i, j].item() == abs(float(w16[i, j]))


def test_input_norm_divides_by_sequences_not_tokens() -> None:
    w, x, _ = _layer(n=3, seq=4)
    st = ActivationStats(w.shape[1])
    st.update(x)
    ref = torch.tensor(_naive_input_norm(x))
    torch.testing.assert_close(st.input_norm(), ref, rtol=1e-5, atol=1e-6)
    # dividing by the token count (12) instead of the sequence count (3) would be 2x smaller
    assert not torch.allclose(st.input_norm(), ref / 2)


def test_wanda_matches_naive() -> None:
    w, x, _ = _layer(seed=1)
    st = ActivationStats(w.shape[1])
    st.update(x)
    norm = _naive_input_norm(x)
    s = wanda_score(w, st.input_norm())
    for i in range(w.shape[0]):
        for j in range(w.shape[1]):
            assert s[i, j].item() == pytest.approx(abs(float(w[i, j])) * norm[j], rel=1e-5)


@pytest.mark.parametrize("alpha", [0.0, 1.0, 100.0])
def test_gblm_l1_matches_naive(alpha: float) -> None:
    w, x, g = _layer(seed=2)
    st = ActivationStats(w.shape[1])
    st.update(x)
    norm = _naive_input_norm(x)
    s = gblm_score(w, st.input_norm(), g, alpha, "l1")
    for i in range(w.shape[0]):
        for j in range(w.shape[1]):
            ref = abs(float(w[i, j])) * (norm[j] + alpha * float(g[i, j]))
            assert s[i, j].item() == pytest.approx(ref, rel=1e-5)


@pytest.mark.parametrize("alpha", [0.5, 100.0])
def test_gblm_l2_takes_sqrt_of_grad_sq(alpha: float) -> None:
    w, x, g = _layer(seed=3)
    gsq = g**2 + 0.3  # a sum of squares, not itself a square of g
    st = ActivationStats(w.shape[1])
    st.update(x)
    norm = _naive_input_norm(x)
    s = gblm_score(w, st.input_norm(), gsq, alpha, "l2")
    for i in range(w.shape[0]):
        for j in range(w.shape[1]):
            ref = abs(float(w[i, j])) * (norm[j] + alpha * math.sqrt(float(gsq[i, j])))
            assert s[i, j].item() == pytest.approx(ref, rel=1e-5)


def test_gblm_alpha_zero_equals_wanda() -> None:
    w, x, g = _layer(seed=4)
    st = ActivationStats(w.shape[1])
    st.update(x)
    torch.testing.assert_close(gblm_score(w, st.input_norm(), g, 0.0, "l1"), wanda_score(w, st.input_norm()))


def test_gblm_rejects_unknown_norm() -> None:
    w, _, g = _layer()
    with pytest.raises(ValueError, match="norm"):
        gblm_score(w, torch.ones(w.shape[1]), g, 1.0, "l3")


@pytest.mark.parametrize("norm", ["l1", "l2"])
def test_gblm_grad_scale_cancels_the_accumulation_scale(norm: str) -> None:
    """Statistics folded from gradients x s, scored with grad_scale=s, equal raw statistics with grad_scale=1.

    With alpha = 100 and grad_scale = 100 this is the published code's ``|W| * (sqrt(act) + G_scaled)``.
    """
    from orchestrator.pruning import GradientStats

    w, x, _ = _layer(seed=5)
    st = ActivationStats(w.shape[1])
    st.update(x)
    kind = "abs" if norm == "l1" else "sq"
    raw = GradientStats(tuple(w.shape), kinds=(kind,), scale=1.0)
    scaled = GradientStats(tuple(w.shape), kinds=(kind,), scale=100.0)
    for k in range(3):
        g = torch.randn(w.shape, generator=_gen(50 + k)) * 1e-3
        raw.update(g)
        scaled.update(g)
    a = gblm_score(w, st.input_norm(), raw[kind], 100.0, norm, grad_scale=1.0)
    b = gblm_score(w, st.input_norm(), scaled[kind], 100.0, norm, grad_scale=100.0)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    published = w.abs() * st.input_norm() + w.abs() * (scaled[kind] if norm == "l1" else scaled[kind].sqrt())
    torch.testing.assert_close(b, published, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("norm", ["l1", "l2"])
def test_normalized_weighting_gives_the_same_masks_when_n_doubles(norm: str) -> None:
    """Scale-free GBLM: the same sequences twice (2N) and any grad_scale give N's masks; raw weighting does not."""
    from orchestrator.pruning import GradientStats
    from orchestrator.pruning.methods import prune_weight

    w, x, _ = _layer(seed=7, out=16, inp=32, n=4, seq=6)
    kind = "abs" if norm == "l1" else "sq"
    grads = [torch.randn(w.shape, generator=_gen(70 + k)) * 1e-2 for k in range(x.shape[0])]

    def masks(copies: int, scale: float, weighting: str, alpha: float) -> torch.Tensor:
        st = ActivationStats(w.shape[1])
        gs = GradientStats(tuple(w.shape), kinds=(kind,), scale=scale)
        for _ in range(copies):
            st.update(x)
            for g in grads:
                gs.update(g)
        return prune_weight(w, "gblm", 0.5, None, act=st, grad=gs[kind], alpha=alpha, norm=norm,
                            grad_scale=1.0, weighting=weighting).mask

    base = masks(1, 1.0, "normalized", 1.0)
    assert torch.equal(masks(2, 1.0, "normalized", 1.0), base)
    assert torch.equal(masks(1, 100.0, "normalized", 1.0), base)
    assert not torch.equal(masks(2, 1.0, "raw", 100.0), masks(1, 1.0, "raw", 100.0))  # raw alpha depends on N


def test_normalized_weighting_is_a_per_layer_alpha() -> None:
    """``normalized`` equals raw GBLM with ``alpha = relative_alpha * mean(a) / mean(G)`` up to a positive factor."""
    w, x, grad = _layer(seed=9)
    st = ActivationStats(w.shape[1])
    st.update(x)
    a = st.input_norm()
    got = gblm_score(w, a, grad, 0.5, "l1", weighting="normalized")
    ref = gblm_score(w, a, grad, 0.5 * float(a.mean() / grad.mean()), "l1") / a.mean()
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="weighting"):
        gblm_score(w, a, grad, 1.0, "l1", weighting="log")
