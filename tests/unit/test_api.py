"""The Python API: ``from orchestrator import prune`` runs what ``rayprune prune`` runs and returns the result;
configs build from a YAML path, a RunConfig or a dict, with section dicts and overrides on top."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from orchestrator.errors import UsageError
from tests.conftest import TINY

REPO = Path(__file__).resolve().parents[2]


def test_config_from_yaml_sections_model_dataset_and_overrides_in_that_order():
    from orchestrator import build_config

    cfg = build_config(REPO / "configs" / "tiny.yaml", model="smollm2-135m", dataset="builtin:python-docs",
                       pruning={"method": "wanda", "sparsity": 0.6}, overrides={"pruning.sparsity": 0.7})
    assert (cfg.model.source, cfg.calibration.source) == ("smollm2-135m", "builtin:python-docs")
    assert (cfg.pruning.method, cfg.pruning.sparsity) == ("wanda", 0.7)
    assert cfg.calibration.num_samples == 4  # the rest of the YAML is kept
    again = build_config(cfg, overrides=["pruning.pattern=2:4", "pruning.sparsity=0.5"])  # a RunConfig base; YAML text
    assert again.pruning.nm == (2, 4) and again.pruning.method == "wanda"
    assert build_config({"pruning": {"method": "magnitude"}}).pruning.method == "magnitude"


def test_bad_keys_and_values_are_one_clear_error():
    from orchestrator import build_config

    with pytest.raises(UsageError, match="pruning.sparsity"):
        build_config(pruning={"sparsity": 1.5})
    with pytest.raises(UsageError, match="pruning.nope"):
        build_config(overrides={"pruning.nope": 1})
    with pytest.raises(UsageError, match="^pruning: expected a dict"):
        build_config(pruning=0.5)


def test_prune_returns_the_run_and_the_cli_prints_its_summary(tmp_path, corpus_parquet, capsys):
    from orchestrator import prune
    from orchestrator.surfaces.cli import main

    result = prune(model="tiny", dataset=str(corpus_parquet), progress=False,
                   overrides={**{f"model.tiny.{k}": v for k, v in TINY.items()},
                                               "calibration.num_samples": 4, "calibration.seq_len": 32,
                                               "eval.enabled": False, "backend.kind": "local",
                                               "pruning.method": "wanda", "output.dir": str(tmp_path / "api")})
    assert result.run_dir == tmp_path / "api" and (result.model_dir / "config.json").is_file()
    assert abs(result.sparsity - 0.5) < 0.01 and result.report["config"]["pruning"]["method"] == "wanda"
    code = main(["prune", *[f"{k}={v}" for k, v in {
        "model.source": "tiny", **{f"model.tiny.{k}": v for k, v in TINY.items()},
        "calibration.source": str(corpus_parquet), "calibration.num_samples": 4, "calibration.seq_len": 32,
        "eval.enabled": False, "backend.kind": "local", "pruning.method": "wanda",
        "output.dir": str(tmp_path / "cli")}.items()], "--json-out", str(tmp_path / "r.json")])
    out = capsys.readouterr().out.strip().splitlines()  # one line in a real process: test_cli_stdout.py
    assert code == 0
    line = json.loads(out[-1])
    assert line == json.loads((tmp_path / "r.json").read_text())
    assert line["run_dir"] == str(tmp_path / "cli") and line["reached_sparsity"] == round(result.sparsity, 6)


def test_every_pruned_checkpoint_carries_a_model_card(tmp_path, corpus_parquet):
    """``model/README.md``: Hub metadata that ``ModelCard.load`` reads, the method, the sparsity, the metrics and
    the command that reproduces the run."""
    from huggingface_hub import ModelCard

    from orchestrator import prune

    result = prune(model="tiny", dataset=str(corpus_parquet), progress=False,
                   overrides={**{f"model.tiny.{k}": v for k, v in TINY.items()}, "calibration.num_samples": 4,
                              "calibration.seq_len": 32, "eval.source": str(corpus_parquet), "eval.num_windows": 2,
                              "eval.seq_len": 32, "eval.dense_baseline": False, "backend.kind": "local",
                              "pruning.method": "magnitude", "output.dir": str(tmp_path / "run")})
    card = ModelCard.load(result.model_dir / "README.md")
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "text-generation"
    assert "rayprune" in card.data.tags and "method-magnitude" in card.data.tags
    assert card.data.base_model is None  # a seeded local model, not a hub id
    assert f"{result.sparsity:.2%}" in card.text and "pruned_ppl" in card.text
    assert "rayprune prune config.yaml" in card.text and (result.run_dir / "config.yaml").is_file()


@pytest.mark.parametrize("source,expected", [("HuggingFaceTB/SmolLM2-135M", "HuggingFaceTB/SmolLM2-135M"),
                                             ("smollm2-135m", None), ("/models/llama", None), ("./a/b", None)])
def test_the_cards_base_model_is_a_hub_id_or_nothing(source, expected):
    from orchestrator.outputs.model_card import base_model

    assert base_model(source) == expected


def test_a_second_run_reuses_the_dense_evaluation(tmp_path, corpus_parquet, monkeypatch):
    """The dense baseline is cached by what decides it: the same model, windows and tasks reuse it (the same
    numbers, no evaluation); other windows, or ``eval.cache_dense: false``, measure it again."""
    from orchestrator import prune
    from orchestrator.evaluation import evaluator as ev_module

    monkeypatch.setenv("RAYPRUNE_DENSE_CACHE", "1")
    monkeypatch.setenv("RAYPRUNE_CACHE", str(tmp_path / "cache"))
    calls = []
    real = ev_module.Evaluator.evaluate

    def counting(self, model, ref=None, label="model"):
        calls.append(label)
        return real(self, model, ref, label)

    monkeypatch.setattr(ev_module.Evaluator, "evaluate", counting)
    base = {**{f"model.tiny.{k}": v for k, v in TINY.items()}, "calibration.num_samples": 4,
            "calibration.seq_len": 32, "eval.source": str(corpus_parquet), "eval.num_windows": 2,
            "eval.seq_len": 32, "backend.kind": "local", "pruning.method": "magnitude"}

    def run(name, **extra):
        return prune(model="tiny", dataset=str(corpus_parquet), progress=False,
                     overrides={**base, **extra, "output.dir": str(tmp_path / name)})

    first, second = run("a"), run("b", **{"pruning.sparsity": 0.6})
    assert calls == ["dense", "pruned", "pruned"]
    assert second.metrics["dense_ppl"] == first.metrics["dense_ppl"] and second.report["eval"]["dense_cached"]
    assert not first.report["eval"]["dense_cached"]
    run("c", **{"eval.num_windows": 3})  # other windows: measured
    run("d", **{"eval.cache_dense": False})
    assert calls[3:] == ["dense", "pruned", "dense", "pruned"]


def test_the_ray_job_example_builds_a_valid_config():
    """deploy/ray_job_example.py's call, as a config: the cluster's address, the sparsity, the output."""
    import ast

    from orchestrator import build_config

    tree = ast.parse((REPO / "deploy" / "ray_job_example.py").read_text())
    call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "prune")
    assert {k.arg for k in call.keywords} >= {"pruning", "backend", "output"}
    cfg = build_config(REPO / "configs" / "llama2-13b.yaml", pruning={"sparsity": 0.6}, backend={"address": "auto"},
                       output={"dir": "/data/runs/x"})
    assert (cfg.pruning.sparsity, cfg.backend.address, cfg.output.dir) == (0.6, "auto", "/data/runs/x")
