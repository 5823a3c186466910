"""OWL layer-wise sparsity: the allocation math against its definition, and the engine's use of it."""

from __future__ import annotations

import copy

import pytest
import torch

from orchestrator.engine.blocks import decoder_blocks
from orchestrator.engine.local import run_local
from orchestrator.inputs.loader import config_from_dict
from orchestrator.pruning.owl import MAX_SPARSITY, outlier_counts, owl_sparsities


def test_outlier_counts_follow_the_definition():
    scores = [torch.tensor([[1.0, 1.0, 1.0, 20.0]]), torch.tensor([[1.0, 1.0, 1.0, 1.0]])]
    # mean = 27 / 8 = 3.375; only 20 > 5 * 3.375
    assert outlier_counts(scores, 5.0) == (1, 8)
    assert outlier_counts(scores, 1.0) == (1, 8)
    assert outlier_counts(scores, 0.1) == (8, 8)


@pytest.mark.parametrize("target", [0.5, 0.7])
@pytest.mark.parametrize("params", [None, [100, 300, 100, 500, 50]])
def test_sparsities_average_to_the_target_and_follow_outliers(target, params):
    ratios = [0.01, 0.05, 0.02, 0.04, 0.03]
    s = owl_sparsities(ratios, target, 0.08, params)
    w = params or [1] * len(ratios)
    assert sum(si * wi for si, wi in zip(s, w, strict=True)) / sum(w) == pytest.approx(target, abs=1e-9)
    order = sorted(range(len(ratios)), key=ratios.__getitem__)
    assert [s[i] for i in order] == sorted(s, reverse=True)  # more outliers, lower sparsity
    assert max(s) - min(s) == pytest.approx(0.16, abs=1e-9)  # min-max spread: 2 * lam


def test_sparsities_stay_in_range_and_keep_the_mean_when_clipped():
    s = owl_sparsities([0.0, 0.0, 0.0, 1.0], 0.95, 0.3)
    assert all(0 <= x <= MAX_SPARSITY for x in s)
    assert sum(s) / 4 == pytest.approx(0.95, abs=1e-9)
    assert s[3] < s[0]


def test_equal_outliers_give_uniform_sparsity():
    assert owl_sparsities([0.02] * 3, 0.6, 0.08) == pytest.approx([0.6] * 3)
    with pytest.raises(ValueError, match="params"):
        owl_sparsities([0.1, 0.2], 0.5, 0.08, [1])


def test_owl_run_keeps_the_global_sparsity_and_varies_blocks(tiny_model, calib_ids):
    """The engine probes the dense blocks, prunes each at its OWL sparsity; the whole reaches the target."""
    cfg = config_from_dict({"model": {"source": "tiny", "tiny": {"layers": 4}}},
                           ["pruning.method=wanda", "pruning.sparsity=0.6", "pruning.allocation=owl",
                            "pruning.owl.threshold=3"]).pruning
    model = copy.deepcopy(tiny_model)
    out = run_local(model, calib_ids, cfg, progress=False)
    per_block: dict[int, list[torch.Tensor]] = {}
    for name, m in out.masks.items():
        per_block.setdefault(int(name.split(".")[2]), []).append(m)
    fracs = [float(sum(m.sum() for m in ms) / sum(m.numel() for m in ms)) for _, ms in sorted(per_block.items())]
    total = sum(float(m.sum()) for m in out.masks.values()) / sum(m.numel() for m in out.masks.values())
    assert total == pytest.approx(0.6, abs=0.01)
    assert max(fracs) - min(fracs) > 0.05, fracs  # blocks really got different sparsities
    uniform = run_local(copy.deepcopy(tiny_model), calib_ids, config_from_dict(
        {}, ["pruning.method=wanda", "pruning.sparsity=0.6"]).pruning, progress=False)
    assert any(not torch.equal(out.masks[k], uniform.masks[k]) for k in out.masks)


def test_owl_refuses_nm_and_sweeps():
    from orchestrator.errors import ConfigError

    with pytest.raises(ConfigError, match="pruning.allocation: owl needs pattern unstructured"):
        config_from_dict({}, ["pruning.allocation=owl", "pruning.pattern=2:4"])
    with pytest.raises(ConfigError, match="pruning.allocation: owl is not available with pruning.sweep"):
        config_from_dict({}, ["pruning.allocation=owl", "pruning.sweep=[0.4,0.5]", "pruning.sparsity=0.5"])


@pytest.fixture(scope="module")
def tiny_model():
    from orchestrator.inputs.config import ModelConfig
    from orchestrator.inputs.models import load_model, materialize

    cfg = ModelConfig(source="tiny")
    cfg.tiny.layers = 4
    model = load_model(materialize(cfg), cfg)
    assert len(decoder_blocks(model)) == 4
    return model


@pytest.fixture(scope="module")
def calib_ids(tiny_model):
    return torch.randint(0, tiny_model.config.vocab_size, (6, 24), generator=torch.Generator().manual_seed(1))
