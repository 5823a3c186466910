"""Statistics stay fp32 inside a bf16 autocast region (the block forward's hooks fire there)."""

from __future__ import annotations

import torch

from orchestrator.pruning.stats import ActivationStats, exact_fp32, per_sample_weight_grad_stats


def _rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a.double() - ref).abs().max() / ref.abs().max())


def _inputs(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(4, 96, 192, generator=g).bfloat16()  # (batch, seq, in): what a bf16 forward hands a hook


def test_xtx_under_bf16_autocast_matches_an_fp64_reference():
    x = _inputs()
    flat = x.reshape(-1, x.shape[-1]).double()
    ref_xtx, ref_sq = flat.t() @ flat, flat.pow(2).sum(0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        naive = x.reshape(-1, x.shape[-1]).float()
        naive = naive.t() @ naive  # what the fold computed before: autocast runs it in bf16
        st = ActivationStats(x.shape[-1], with_xtx=True)
        st.update(x[:2])
        st.update(x[2:])
    assert _rel(naive, ref_xtx) > 1e-3  # the check below can fail: bf16 is far off
    assert st.xtx.dtype == torch.float64 and st.samples == 4 and st.tokens == 4 * 96
    assert _rel(st.xtx, ref_xtx) <= 1e-5
    assert _rel(st.act_sq, ref_sq) <= 1e-5


def test_per_sample_gradient_statistics_keep_their_compute_dtype_under_autocast():
    g = torch.Generator().manual_seed(1)
    x, go = torch.randn(3, 40, 24, generator=g), torch.randn(3, 40, 16, generator=g)
    w = torch.tensor([1.0, 2.0, 0.0])
    per = torch.einsum("bto,bti->boi", go.double(), x.double()) * w.double().view(-1, 1, 1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = per_sample_weight_grad_stats(x, go, ("abs", "sq", "sum"), w)
    assert _rel(out["sum"], per.sum(0)) <= 1e-5
    assert _rel(out["sq"], (per * per).sum(0)) <= 1e-5
    assert _rel(out["abs"], per.abs().sum(0)) <= 1e-5


def test_exact_region_restores_autocast_and_matmul_precision():
    torch.set_float32_matmul_precision("high")
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            with exact_fp32("cpu"):
                assert not torch.is_autocast_enabled("cpu")
                assert torch.get_float32_matmul_precision() == "highest"
            assert torch.is_autocast_enabled("cpu")
        assert torch.get_float32_matmul_precision() == "high"
    finally:
        torch.set_float32_matmul_precision("highest")


def test_xtx_does_not_depend_on_how_sequences_are_batched_or_split_over_ranks():
    """The sum ``x^T x`` over sequences rounds to the same fp32 matrix (what every solver uses) whether the
    sequences come as one batch, one at a time in reverse, or split over two ranks and added: an fp32 running
    sum differs in its last bits between those, and 10 CG iterations amplify that about 10^4-fold (the
    ray-vs-local disagreement that kept `lstsq.iters` at 30)."""
    x = torch.randn(7, 64, 96, generator=torch.Generator().manual_seed(3)) * torch.logspace(-2, 2, 96)

    def stats(batches: list[torch.Tensor]) -> ActivationStats:
        st = ActivationStats(x.shape[-1], with_xtx=True)
        for b in batches:
            st.update(b)
        return st

    one = stats([x]).xtx.float()
    reverse = stats([x[i : i + 1] for i in reversed(range(7))]).xtx.float()
    rank0, rank1 = stats([x[:4]]), stats([x[4:6], x[6:]])
    split = rank0.merge(rank1).xtx.float()  # what the all-reduce adds (two ranks)
    assert torch.equal(one, reverse) and torch.equal(one, split)
    fp32 = torch.zeros(96, 96)
    for b in (x[:4], x[4:]):
        flat = b.reshape(-1, 96)
        fp32.addmm_(flat.t(), flat)
    assert not torch.equal(fp32, one)  # the plain fp32 running sum differs in its last bits: the check can fail
