"""End to end through the CLI with ``backend: local`` on the tiny model."""

from __future__ import annotations

import hashlib
import json
import math

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from orchestrator.evaluation.perplexity import perplexity
from orchestrator.inputs.data import first_windows, load_texts, tokenize_corpus
from orchestrator.outputs import artifacts
from orchestrator.surfaces.cli import main
from tests.conftest import tiny_overrides


def _prune(out, calib, eval_src, *extra):
    argv = ["-q", "prune", *tiny_overrides(out, calib, **{"eval.enabled": True, "eval.source": str(eval_src),
                                                          "eval.num_windows": 3, "eval.seq_len": 32}), *extra]
    return main(argv)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, corpus_parquet, eval_parquet):
    out = tmp_path_factory.mktemp("runs") / "gblm"
    assert _prune(out, corpus_parquet, eval_parquet, "pruning.method=gblm") == 0
    return out


def test_run_dir_is_complete_and_hashed(run_dir):
    for rel in ("model/config.json", "model/model.safetensors", "model/tokenizer.json", "masks.safetensors",
                "config.yaml", "report.json", "report.md", "manifest.json"):
        assert (run_dir / rel).is_file(), rel
    manifest = json.loads((run_dir / "manifest.json").read_text())["files"]
    for rel, meta in manifest.items():
        assert hashlib.sha256((run_dir / rel).read_bytes()).hexdigest() == meta["sha256"], rel
    assert not list(run_dir.parent.glob(".gblm.tmp-*"))


def test_checkpoint_reloads_with_masks_applied_and_reported_ppl(run_dir, eval_parquet):
    model = AutoModelForCausalLM.from_pretrained(run_dir / "model").eval()
    tok = AutoTokenizer.from_pretrained(run_dir / "model")
    masks = load_file(str(run_dir / "masks.safetensors"))
    params = dict(model.named_parameters())
    assert len(masks) == 2 * 7
    for name, mask in masks.items():
        assert mask.dtype == torch.bool
        assert bool((params[name][mask] == 0).all()), name
        assert abs(mask.float().mean().item() - 0.5) < 1e-9, name
    report = json.loads((run_dir / "report.json").read_text())
    assert report["schema_version"] == artifacts.REPORT_SCHEMA_VERSION
    assert abs(report["sparsity"]["reached"] - 0.5) < 1e-3
    windows = first_windows(tokenize_corpus(load_texts(str(eval_parquet)), tok), 32, 3, "eval")
    ppl = perplexity(model, windows)
    assert math.isclose(ppl, report["metrics"]["pruned_ppl"], rel_tol=1e-5)
    assert report["metrics"]["pruned_ppl"] != report["metrics"]["dense_ppl"]
    assert 0 < report["phases"]["eval_pruned.perplexity"] <= report["phases"]["eval_pruned"]  # in-process too
    assert "perplexity (context 32" in (run_dir / "report.md").read_text()


def test_failure_mid_run_leaves_nothing(tmp_path, corpus_parquet, eval_parquet, monkeypatch, capsys):
    def boom(self, masks):
        raise RuntimeError("disk full")

    monkeypatch.setattr(artifacts.RunWriter, "write_masks", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        _prune(tmp_path / "run", corpus_parquet, eval_parquet)
    assert list(tmp_path.iterdir()) == []


def test_overwrite_replaces_a_run_only_when_asked(tmp_path, corpus_parquet, eval_parquet):
    out = tmp_path / "run"
    assert _prune(out, corpus_parquet, eval_parquet, "pruning.method=magnitude") == 0
    first = json.loads((out / "report.json").read_text())
    assert _prune(out, corpus_parquet, eval_parquet, "pruning.method=wanda") == 2
    assert json.loads((out / "report.json").read_text()) == first
    assert _prune(out, corpus_parquet, eval_parquet, "pruning.method=wanda", "output.overwrite=true") == 0
    assert json.loads((out / "report.json").read_text())["config"]["pruning"]["method"] == "wanda"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_eval_command_matches_report(run_dir, eval_parquet, tmp_path, capsys):
    out = tmp_path / "eval.json"
    code = main(["-q", "eval", str(run_dir), f"eval.source={eval_parquet}", "eval.num_windows=3", "eval.seq_len=32",
                 "--json", str(out)])
    assert code == 0
    got = json.loads(out.read_text())["ppl"]
    want = json.loads((run_dir / "report.json").read_text())["metrics"]["pruned_ppl"]
    assert math.isclose(got, want, rel_tol=1e-5)


def test_structured_run_shrinks_saves_and_reloads(tmp_path, corpus_parquet, eval_parquet):
    out = tmp_path / "saap"
    assert _prune(out, corpus_parquet, eval_parquet, "structured.enabled=true", "structured.target=0.3",
                  "structured.protect_first=0", "structured.protect_last=0", "structured.round_to=1",
                  "structured.minibatches=2") == 0
    report = json.loads((out / "report.json").read_text())
    st = report["structured"]
    removed = 1 - st["parameters_after"] / st["parameters_before"]
    assert removed > 0.05
    assert not (out / "masks.safetensors").exists()
    from orchestrator.errors import UsageError
    from orchestrator.inputs.config import ModelConfig
    from orchestrator.inputs.models import load_model
    from orchestrator.structured.shrink import load_checkpoint

    with pytest.raises(UsageError, match="structured checkpoint with per-layer sizes"):
        load_model(str(out / "model"), ModelConfig())  # the plain loader says what to use instead
    model = load_checkpoint(str(out / "model"), ModelConfig())
    assert sum(p.numel() for p in model.parameters()) == st["parameters_after"]
    tok = AutoTokenizer.from_pretrained(out / "model")
    windows = first_windows(tokenize_corpus(load_texts(str(eval_parquet)), tok), 32, 3, "eval")
    assert math.isclose(perplexity(model, windows), report["metrics"]["pruned_ppl"], rel_tol=1e-5)
    assert "parameters removed" in (out / "report.md").read_text()


def test_report_plots_are_real_images_and_json_validates(run_dir):
    """The PNGs are decodable, non-trivial images; report.json validates against the schema; re-rendering is stable."""
    import matplotlib.image as mpimg

    from orchestrator.outputs.report import rerender, validate_report

    pngs = sorted(p.name for p in run_dir.glob("*.png"))
    assert {"sparsity_per_layer.png", "importance_per_layer.png"} <= set(pngs)
    for name in pngs:
        raw = (run_dir / name).read_bytes()
        assert raw[:8] == b"\x89PNG\r\n\x1a\n", name
        img = mpimg.imread(run_dir / name)  # (H, W, C)
        assert img.shape[0] >= 300 and img.shape[1] >= 600, (name, img.shape)
        assert float(img[..., :3].std()) > 0.02, name  # not a blank canvas
    report = json.loads((run_dir / "report.json").read_text())
    validate_report(report)
    before = (run_dir / "report.md").read_text()
    rerender(run_dir)
    assert (run_dir / "report.md").read_text() == before
    assert "| pruned |" in before and "context 32" in before
