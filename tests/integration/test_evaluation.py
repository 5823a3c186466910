"""Evaluation actors equal single-process evaluation; sweeps come from one statistics pass."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

ray = pytest.importorskip("ray")

from actors.evaluator import EvalGroup, ModelRef, split  # noqa: E402
from actors.group import GroupSpec  # noqa: E402
from orchestrator.evaluation.perplexity import perplexity  # noqa: E402
from orchestrator.evaluation.zeroshot import aggregate, score_examples  # noqa: E402
from orchestrator.inputs.config import ModelConfig  # noqa: E402
from orchestrator.inputs.data import first_windows, load_texts, tokenize_corpus  # noqa: E402
from orchestrator.inputs.models import load_model, load_tokenizer, materialize  # noqa: E402
from orchestrator.surfaces.cli import main  # noqa: E402
from tests.conftest import TINY, tiny_overrides  # noqa: E402

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def cluster(ray_cluster):
    return ray_cluster


@pytest.fixture(scope="module")
def tiny(eval_parquet):
    cfg = ModelConfig(source="tiny")
    for k, v in TINY.items():
        setattr(cfg.tiny, k, v)
    path = materialize(cfg)
    tok = load_tokenizer(path, cfg)
    model = load_model(path, cfg)
    windows = first_windows(tokenize_corpus(load_texts(str(eval_parquet), "text", "eval"), tok), 32, 5, "eval")
    return cfg, path, tok, model, windows


@pytest.fixture(scope="module")
def task_file(tmp_path_factory):
    """A small multiple-choice task in the local JSONL format."""
    rows = [
        {"context": "the quick brown fox jumps over the", "choices": [" lazy dog", " cat", " python modules"],
         "label": 0},
        {"context": "python documentation and debian", "choices": [" handbooks", " kernels x", " z"], "label": 0},
        {"context": "a small model learns to predict", "choices": [" tokens", " the lazy dog jumps"], "label": 0},
        {"context": "loops functions classes", "choices": [" packages", " numbers and strings", " q"], "label": 1},
        {"context": "errors values lists", "choices": [" dictionaries", " fox"], "label": 0},
    ]
    path = tmp_path_factory.mktemp("tasks") / "mini.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_split_covers_range_in_order():
    assert split(5, 2) == [(0, 3), (3, 5)]
    assert split(1, 3) == [(0, 1)]
    assert [i for lo, hi in split(17, 4) for i in range(lo, hi)] == list(range(17))


def test_sharded_evaluation_on_two_actors_equals_one_process(cluster, tiny, task_file):
    """ZeRO-3 inference partitioning across 2 actors: perplexity (5 windows: 3 + 2, so the ranks even out their
    forwards) and every per-example log-likelihood equal one process (rtol 1e-4), with a pruned overlay too;
    each actor holds half of the model."""
    from actors.sharded_eval import ShardedEvalGroup
    from orchestrator.evaluation.zeroshot import load_task

    cfg, path, tok, model, windows = tiny
    examples = load_task(task_file)
    params = dict(model.named_parameters())
    name = "model.layers.1.self_attn.o_proj.weight"
    pruned = params[name].detach().clone()
    pruned[::3] = 0
    group = ShardedEvalGroup(GroupSpec(2, backend="gloo", deepspeed=True, field="eval.workers"), cfg)
    try:
        dense = group.ref("dense", path)
        ppl = group.perplexity(dense, windows)
        mc = group.multiple_choice(dense, examples)
        state = group.memory()
        ppl2 = group.perplexity(group.ref("pruned", path, {name: pruned}), windows)
    finally:
        group.shutdown()
    assert math.isclose(ppl, perplexity(model, windows), rel_tol=1e-4)
    for a, b in zip(mc, score_examples(model, tok, examples), strict=True):
        assert a["loglik"] == pytest.approx(b["loglik"], rel=1e-4)
        assert (a["acc"], a["acc_norm"]) == (b["acc"], b["acc_norm"])
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    assert len(state) == 2 and all(m["model_state_bytes"] <= math.ceil(total / 2) + 4096 for m in state)
    with torch.no_grad():
        saved = params[name].detach().clone()
        params[name].copy_(pruned)
        want2 = perplexity(model, windows)
        params[name].copy_(saved)
    assert math.isclose(ppl2, want2, rel_tol=1e-4) and not math.isclose(ppl2, ppl, rel_tol=1e-4)


def test_two_actors_equal_single_process(cluster, tiny, task_file):
    from orchestrator.evaluation.zeroshot import load_task

    cfg, path, tok, model, windows = tiny
    examples = load_task(task_file)
    group = EvalGroup(GroupSpec(2, backend=None, field="eval.workers"), cfg)
    try:
        ref = ModelRef(path=path, key="dense")
        ppl = group.perplexity(ref, windows)
        mc = group.multiple_choice(ref, examples)
        # a pruned overlay travels through the object store
        params = dict(model.named_parameters())
        name = "model.layers.0.mlp.up_proj.weight"
        pruned = params[name].detach().clone()
        pruned[:, ::2] = 0
        ref2 = ModelRef(path=path, weights=ray.put({name: pruned}), key="pruned")
        ppl2 = group.perplexity(ref2, windows)
        many = group.candidates([ref, ref2], windows, {"mini": examples})
    finally:
        group.shutdown()
    ref_ppl = perplexity(model, windows)
    assert math.isclose(ppl, ref_ppl, rel_tol=1e-4)
    local = score_examples(model, tok, examples)
    assert [r["acc"] for r in mc] == [r["acc"] for r in local]
    assert [r["acc_norm"] for r in mc] == [r["acc_norm"] for r in local]
    for a, b in zip(mc, local, strict=True):
        assert a["loglik"] == pytest.approx(b["loglik"], rel=1e-4)
    with torch.no_grad():
        saved = params[name].detach().clone()
        params[name].copy_(pruned)
        ref_ppl2 = perplexity(model, windows)
        params[name].copy_(saved)
    assert math.isclose(ppl2, ref_ppl2, rel_tol=1e-4)
    assert not math.isclose(ppl2, ppl, rel_tol=1e-4)  # the overlay was really applied
    assert math.isclose(many[0]["ppl"], ref_ppl, rel_tol=1e-4)
    assert math.isclose(many[1]["ppl"], ref_ppl2, rel_tol=1e-4)
    assert many[0]["zeroshot"]["mini"]["acc"] == aggregate(local)["acc"]


def test_sweep_three_candidates_from_one_statistics_pass(cluster, tmp_path, corpus_parquet, eval_parquet, task_file,
                                                         monkeypatch):
    import orchestrator.engine.local as local_mod

    calls = {"gradient": 0}
    real = local_mod.gradient_pass

    def counting(*a, **k):
        calls["gradient"] += 1
        return real(*a, **k)

    monkeypatch.setattr(local_mod, "gradient_pass", counting)  # what the sweep's method_gradients runs
    out = tmp_path / "sweep"
    argv = ["-q", "prune", *tiny_overrides(out, corpus_parquet, **{
        "eval.enabled": True, "eval.source": str(eval_parquet), "eval.num_windows": 4, "eval.seq_len": 32,
        "eval.workers": 2, "eval.tasks": f"[{task_file}]", "pruning.method": "gblm", "pruning.sequential": False,
        "pruning.sweep": "[0.3, 0.5, 0.7]"})]
    assert main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    assert calls["gradient"] == 1
    assert report["sweep_passes"] == {"gradient": 1, "activation": 1}
    rows = report["sweep"]
    assert [r["sparsity"] for r in rows] == [0.3, 0.5, 0.7]
    for r in rows:
        assert r["reached"] == pytest.approx(r["sparsity"], abs=0.02)  # row-wise rounding on 64 inputs
        assert r["ppl"] > 0 and "mini" in r["zeroshot"]
        masks = load_file(str(out / "sweep" / f"masks-{r['sparsity']:.4f}.safetensors"))
        frac = sum(int(m.sum()) for m in masks.values()) / sum(m.numel() for m in masks.values())
        assert frac == pytest.approx(r["reached"], abs=1e-6)
    main_row = rows[1]  # sparsity 0.5 is the saved model
    assert report["metrics"]["pruned_ppl"] == pytest.approx(main_row["ppl"])
    assert report["sparsity"]["reached"] == pytest.approx(0.5, abs=0.01)
    # the saved model re-evaluated in this process gives the reported number
    cfg = ModelConfig(source=str(out / "model"))
    model = load_model(materialize(cfg), cfg)
    tok = load_tokenizer(str(out / "model"), cfg)
    windows = first_windows(tokenize_corpus(load_texts(str(eval_parquet), "text", "eval"), tok), 32, 4, "eval")
    assert math.isclose(perplexity(model, windows), main_row["ppl"], rel_tol=1e-4)
    assert (out / "sweep_ppl.png").stat().st_size > 5000


@pytest.mark.parametrize("shard", [False, True])
def test_ray_run_with_eval_actors_shares_the_cluster(cluster, tmp_path, corpus_parquet, eval_parquet, task_file,
                                                     shard):
    """Evaluation actors (each with a whole model, or ``eval.shard``: one model under ZeRO-3 across them) and
    pruning workers take turns on a 2-CPU cluster; numbers match in-process ones."""
    out = tmp_path / "ray"
    argv = ["-q", "prune", *tiny_overrides(out, corpus_parquet, **{
        "eval.enabled": True, "eval.source": str(eval_parquet), "eval.num_windows": 4, "eval.seq_len": 32,
        "eval.workers": 2, "eval.shard": shard, "eval.tasks": f"[{task_file}]", "backend.kind": "ray",
        "backend.workers": 2})]
    assert main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    cfg = ModelConfig(source=str(out / "model"))
    model = load_model(materialize(cfg), cfg)
    tok = load_tokenizer(str(out / "model"), cfg)
    windows = first_windows(tokenize_corpus(load_texts(str(eval_parquet), "text", "eval"), tok), 32, 4, "eval")
    assert math.isclose(perplexity(model, windows), report["metrics"]["pruned_ppl"], rel_tol=1e-4)
    ph = report["phases"]  # each evaluation's parts, within its phase
    for label in ("dense", "pruned"):
        parts = [ph[f"eval_{label}.{part}"] for part in ("load", "perplexity", "zeroshot")]
        assert all(x > 0 for x in parts) and sum(parts) <= ph[f"eval_{label}"]
    from orchestrator.evaluation.zeroshot import load_task

    local = aggregate(score_examples(model, tok, load_task(task_file)))
    assert report["zeroshot"]["pruned"]["mini"]["acc"] == local["acc"]
    assert set(report["zeroshot"]) == {"dense", "pruned"}
