"""Cost-aware global allocation: one threshold over every candidate of the model."""

from __future__ import annotations

import copy

import pytest
import torch

from orchestrator.inputs.config import TinyModelConfig
from orchestrator.inputs.loader import load_config
from orchestrator.inputs.models import build_tiny_llama
from orchestrator.structured.allocation import allocate_global
from orchestrator.structured.groups import decoder_params, module_groups
from orchestrator.structured.importance import fit_sigmas, joint_costs
from orchestrator.structured.run import apply_pruning, compute_importance


def _tiny():
    return build_tiny_llama(TinyModelConfig(layers=4, hidden=64, heads=4, kv_heads=4, intermediate=96, seed=3))


def _costs(mods, seed: int = 0, cheap_layer: int | None = None) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for m in mods:
        c = torch.rand(m.num_groups, generator=gen, dtype=torch.float64) * m.group_params
        out[m.key] = c * (0.05 if m.layer == cheap_layer else 1.0)
    return out


@pytest.mark.parametrize("target", [0.1, 0.3, 0.55])
def test_removed_parameters_meet_the_target_within_one_group(target):
    mods = module_groups(_tiny())
    want = round(target * sum(m.params for m in mods))
    removed = allocate_global(mods, _costs(mods), want, round_to=4)
    got = sum(removed[m.key] * m.group_params for m in mods)
    assert abs(got - want) <= max(m.group_params for m in mods)
    for m in mods:
        kept = m.num_groups - removed[m.key]
        assert kept >= 1 and (m.kind == "attn" or kept % 4 == 0)


def test_the_block_with_cheaper_candidates_loses_more():
    mods = module_groups(_tiny())
    want = round(0.25 * sum(m.params for m in mods))
    removed = allocate_global(mods, _costs(mods, cheap_layer=2), want, round_to=4)
    by_layer = [sum(removed[m.key] * m.group_params for m in mods if m.layer == i) for i in range(4)]
    assert by_layer[2] == max(by_layer) and by_layer[2] > 2 * sorted(by_layer)[-2]
    baseline = allocate_global(mods, _costs(mods), want, round_to=4)
    assert by_layer[2] > sum(baseline[m.key] * m.group_params for m in mods if m.layer == 2)


def test_each_module_loses_its_cheapest_units_and_protected_ones_nothing():
    mods = module_groups(_tiny(), protect_first=1)
    removed = allocate_global(mods, _costs(mods), round(0.2 * sum(m.params for m in mods)), round_to=4,
                              kinds=("mlp",))
    assert all(removed[m.key] == 0 for m in mods if m.protected or m.kind == "attn")
    assert sum(removed.values()) > 0
    with pytest.raises(ValueError, match="cannot remove"):
        allocate_global(mods, _costs(mods), sum(m.params for m in mods), round_to=4)


def test_joint_costs_use_one_sigma_per_estimator_over_both_kinds():
    raw = {"0.attn": {"a": torch.tensor([4.0, 8.0]), "b": torch.tensor([1.0, 3.0])},
           "0.mlp": {"a": torch.tensor([0.5, 1.5, 2.0]), "b": torch.tensor([0.2, 0.1, 0.7])}}
    got = joint_costs(raw, ["0.attn", "0.mlp"])
    sig = fit_sigmas({e: [raw["0.attn"][e], raw["0.mlp"][e]] for e in ("a", "b")})
    for key in raw:
        want = raw[key]["a"].double() / (2 * sig["a"] ** 2) + raw[key]["b"].double() / (2 * sig["b"] ** 2)
        torch.testing.assert_close(got[key], want)


def test_global_allocation_prunes_a_model_to_its_target():
    model = _tiny()
    ids = torch.randint(0, 257, (4, 16), generator=torch.Generator().manual_seed(0))
    cfg = load_config(None, ["structured.allocation=global", "structured.target=0.3", "structured.round_to=4",
                             "structured.minibatches=2", "structured.protect_first=0", "structured.protect_last=0"])
    imp = compute_importance(model, ids, cfg.structured)
    before = decoder_params(model)
    pruned = copy.deepcopy(model)
    report = apply_pruning(pruned, imp, cfg.structured)
    unit = max(m.group_params for m in imp.mods)
    assert abs((before - decoder_params(pruned)) - 0.3 * before) <= unit
    assert report["allocation"] == "global" and pruned(ids).logits.isfinite().all()
