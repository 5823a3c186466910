"""Importance estimators, uncertainty fusion, allocation and the structured entry point."""

from __future__ import annotations

import math

import pytest
import torch

from orchestrator.inputs.config import TinyModelConfig
from orchestrator.inputs.loader import load_config
from orchestrator.inputs.models import build_tiny_llama
from orchestrator.structured.allocation import ModuleStats, allocate, indicator_weights
from orchestrator.structured.groups import decoder_params, module_groups
from orchestrator.structured.importance import aggregate, fit_sigmas, fuse, stability, tensor_group_scores
from orchestrator.structured.run import Importance, apply_pruning, protected_blocks, run_structured

G = torch.Generator().manual_seed(0)


def rand(*shape):
    return torch.randn(*shape, generator=G)


def test_estimators_match_their_formulas():
    w, gs, gq = rand(6, 4), rand(6, 4), rand(6, 4).abs()
    # groups of 2 rows along dim 0
    e1 = tensor_group_scores(w, gs, gq, "element1", 0, 2)
    e2 = tensor_group_scores(w, gs, gq, "element2", 0, 2)
    v = tensor_group_scores(w, gs, gq, "vector", 0, 2)
    for g in range(3):
        rows = slice(2 * g, 2 * g + 2)
        assert e1[g] == pytest.approx(float((w[rows] * gs[rows]).abs().sum()), rel=1e-5)
        ref2 = (w[rows] * gs[rows] - 0.5 * w[rows] ** 2 * gq[rows]).abs().sum()
        assert e2[g] == pytest.approx(float(ref2), rel=1e-5)
        assert v[g] == pytest.approx(float((w[rows] * gs[rows]).sum().abs()), rel=1e-5)
    # columns: groups of 1 column along dim 1
    c = tensor_group_scores(w, gs, None, "element1", 1, 1)
    assert torch.allclose(c, (w * gs).abs().sum(0))


@pytest.mark.parametrize("world,chunk", [(1, 4), (2, 12), (3, 4), (7, 1 << 22), (2, 1 << 22)])
@pytest.mark.parametrize("estimator", ["element1", "element2", "vector"])
@pytest.mark.parametrize("dim,width,offset,groups", [(0, 2, 0, 3), (1, 1, 0, 5), (0, 1, 2, 2), (1, 2, 0, 2)])
def test_partition_sums_add_up_to_the_group_scores(world, chunk, estimator, dim, width, offset, groups):
    """ZeRO-3 partitions (row-major, padded at the end, ``ceil(numel / W)`` each): every rank's share added
    gives exactly the group scores of the whole tensor's segment, whatever the world size."""
    from orchestrator.structured.importance import finish_group_scores, partition_group_sums

    w, gs, gq = rand(6, 5), rand(6, 5), rand(6, 5).abs()
    part = math.ceil(w.numel() / world)

    def pad(t):
        return torch.nn.functional.pad(t.reshape(-1), (0, part * world - t.numel()), value=7.0)  # junk padding

    total = sum(partition_group_sums(pad(w)[r * part:(r + 1) * part], pad(gs)[r * part:(r + 1) * part],
                                     pad(gq)[r * part:(r + 1) * part], estimator, r * part, (6, 5), dim, width,
                                     offset, groups, chunk=chunk)
                for r in range(world))
    seg = slice(offset, offset + groups * width)
    wp, gp, qp = ((t[seg] if dim == 0 else t[:, seg]) for t in (w, gs, gq))
    want = tensor_group_scores(wp, gp, qp, estimator, dim, width)
    torch.testing.assert_close(finish_group_scores(total, estimator), want, rtol=1e-5, atol=1e-6)


def test_aggregation_over_tensors():
    a, b = torch.tensor([1.0, 4.0]), torch.tensor([3.0, 2.0])
    assert aggregate([a, b], "sum").tolist() == [4.0, 6.0]
    assert aggregate([a, b], "max").tolist() == [3.0, 4.0]


def test_sigmas_are_the_closed_form_over_all_groups_of_a_kind():
    s1, s2 = torch.tensor([1.0, 3.0]), torch.tensor([8.0, 0.0, 4.0, 0.0])
    sig = fit_sigmas({"element1": [s1, s2]})
    assert sig["element1"] == pytest.approx(math.sqrt(16.0 / 6))  # mean over the 6 groups, not of module means


def test_fusion_is_a_sum_of_mean_normalised_estimators():
    a, b = rand(10).abs(), 100 * rand(10).abs()
    sig = fit_sigmas({"x": [a], "y": [b]})
    fused = fuse({"x": a, "y": b}, sig)
    ref = a / (2 * a.mean()) + b / (2 * b.mean()) + math.log(sig["x"]) + math.log(sig["y"])
    assert torch.allclose(fused.float(), ref, rtol=1e-5)


def test_fusion_with_one_estimator_keeps_its_ranking():
    a = rand(50).abs()
    fused = fuse({"vector": a}, fit_sigmas({"vector": [a]}))
    assert torch.equal(torch.argsort(fused), torch.argsort(a))


def test_stability_is_the_coefficient_of_variation():
    assert stability([1.0, 2.0, 3.0]) == pytest.approx(1.0 / 2.0)
    assert stability([5.0]) == 0.0


def tiny(layers=6, inter=64):
    return build_tiny_llama(TinyModelConfig(layers=layers, hidden=64, heads=4, kv_heads=2, intermediate=inter))


@pytest.mark.parametrize("round_to", [1, 8])
@pytest.mark.parametrize("target", [0.2, 0.5])
def test_allocation_meets_the_target(round_to, target):
    mods = module_groups(tiny(), protect_first=1, protect_last=0)
    stats = [ModuleStats(m, 1.0 + i, 0.1 * i) for i, m in enumerate(mods)]
    total = sum(m.params for m in mods)
    for weights in ([0.0 if m.protected else 1.0 for m in mods], indicator_weights(stats, "hybrid", 0.5)):
        counts = allocate(stats, round(target * total), weights, round_to)
        removed = sum(c * m.group_params for c, m in zip(counts, mods, strict=True))
        mlp_group = mods[1].group_params
        assert abs(removed - target * total) <= round_to * mlp_group / 2 + 1
        for c, m in zip(counts, mods, strict=True):
            if m.protected:
                assert c == 0
            elif m.kind == "attn":
                assert 0 <= c < m.num_groups
            else:
                assert (m.num_groups - c) % round_to == 0 and m.num_groups - c >= round_to


def test_uniform_prunes_every_unprotected_mlp_alike_and_adaptive_follows_the_indicator():
    mods = module_groups(tiny(layers=6, inter=256), protect_first=1, protect_last=1)
    stats = [ModuleStats(m, 1.0, float(m.layer)) for m in mods]  # later blocks less stable
    target = round(0.3 * sum(m.params for m in mods))
    uni = allocate(stats, target, [0.0 if m.protected else 1.0 for m in mods], 8)
    mlp_counts = [c for c, m in zip(uni, mods, strict=True) if m.kind == "mlp" and not m.protected]
    assert max(mlp_counts) - min(mlp_counts) <= 8
    ada = allocate(stats, target, indicator_weights(stats, "stability", 0.5), 8)
    mlp_ada = [c for c, m in zip(ada, mods, strict=True) if m.kind == "mlp" and not m.protected]
    assert mlp_ada == sorted(mlp_ada) and mlp_ada[-1] > mlp_ada[0]


def test_pruning_drops_the_least_important_groups():
    model = tiny(layers=2, inter=64)
    mods = module_groups(model)
    fused = {m.key: torch.arange(m.num_groups, dtype=torch.float64) for m in mods}  # group g has importance g
    imp = Importance(mods, fused, {"attn": {"element1": 1.0}, "mlp": {"element1": 1.0}}, {m.key: 0.0 for m in mods})
    gate = model.model.layers[0].mlp.gate_proj.weight.clone()
    cfg = load_config(None, ["structured.allocation=uniform", "structured.target=0.25", "structured.round_to=8"])
    rep = apply_pruning(model, imp, cfg.structured)
    kept = model.model.layers[0].mlp.gate_proj.weight
    assert torch.equal(kept, gate[-kept.shape[0]:])  # the highest-numbered (most important) channels stay
    assert abs(rep["removed_fraction"] - 0.25) < 0.05


@pytest.mark.parametrize("allocation", ["uniform", "adaptive"])
def test_mlp_only_keeps_attention_whole_and_meets_the_target(allocation):
    """``structured.modules: mlp`` takes the whole target from MLP channels; attention shapes stay dense."""
    model = tiny(layers=2, inter=64)
    mods = module_groups(model)
    fused = {m.key: torch.arange(m.num_groups, dtype=torch.float64) for m in mods}
    imp = Importance(mods, fused, {"attn": {"element1": 1.0}, "mlp": {"element1": 1.0}}, {m.key: 0.0 for m in mods})
    shapes = {n: p.shape for n, p in model.named_parameters() if "self_attn" in n}
    before = decoder_params(model)
    cfg = load_config(None, [f"structured.allocation={allocation}", "structured.target=0.25", "structured.round_to=8",
                             "structured.modules=mlp", "structured.protect_first=0", "structured.protect_last=0"])
    rep = apply_pruning(model, imp, cfg.structured)
    assert {n: p.shape for n, p in model.named_parameters() if "self_attn" in n} == shapes
    assert model.model.layers[0].mlp.gate_proj.out_features < 64
    assert abs((before - decoder_params(model)) / before - 0.25) < 0.05
    assert abs(rep["removed_fraction"] - 0.25) < 0.05


def test_protected_defaults_scale_with_depth():
    s = load_config(None).structured
    assert protected_blocks(s, 30) == (3, 2) and protected_blocks(s, 2) == (0, 0)


def test_run_structured_end_to_end_with_recovery():
    model = tiny(layers=4)
    before = decoder_params(model)
    ids = torch.randint(0, 257, (4, 24), generator=G)
    cfg = load_config(None, ["structured.target=0.3", "structured.round_to=4", "structured.minibatches=2",
                             "structured.estimators=[element1,element2,vector]", "structured.indicator=stability",
                             "structured.recovery.enabled=true", "structured.recovery.steps=4",
                             "structured.recovery.source=calibration", "structured.recovery.batch_size=2",
                             "structured.recovery.blocks_per_group=2", "structured.recovery.seq_len=12",
                             "structured.recovery.lr=0.01"])
    pruned, rep = run_structured(cfg, model, ids)
    after = decoder_params(pruned)
    assert abs((before - after) / before - 0.3) < 0.03
    assert set(rep["sigmas"]) == {"attn", "mlp"} and set(rep["sigmas"]["mlp"]) == {"element1", "element2", "vector"}
    assert rep["recovery"]["phases"][0]["blocks"] == [[0, 1], [2, 3]]  # joint: both groups in one phase
    assert rep["recovery"]["steps"] == 4
    assert not any("lora" in n for n, _ in pruned.named_parameters())  # adapters merged back
    with torch.no_grad():
        assert torch.isfinite(pruned(ids).logits).all()


def test_importance_indicator_prunes_low_importance_modules_more():
    mods = module_groups(tiny(layers=4, inter=64))
    stats = [ModuleStats(m, float(10 - m.layer), 0.0) for m in mods]  # importance falls with depth
    w = indicator_weights(stats, "importance", 0.5)
    mlp_w = [x for x, m in zip(w, mods, strict=True) if m.kind == "mlp"]
    assert mlp_w == sorted(mlp_w) and mlp_w[0] == pytest.approx(0.5) and mlp_w[-1] == pytest.approx(1.5)
