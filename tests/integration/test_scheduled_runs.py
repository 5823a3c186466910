"""``rayprune prune --if-changed`` end to end on a tiny local model (``backend: local``, no Ray)."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest
import torch

from orchestrator import coordinator
from orchestrator.inputs.config import TinyModelConfig
from orchestrator.inputs.models import build_tiny_llama, byte_tokenizer
from orchestrator.surfaces.cli import main
from tests.conftest import tiny_overrides

pytestmark = pytest.mark.slow


@pytest.fixture
def model_dir(tmp_path):
    """A local checkpoint of the seeded tiny LLaMA: the 'model revision' a schedule follows."""
    d = tmp_path / "model"
    build_tiny_llama(TinyModelConfig()).save_pretrained(d, safe_serialization=True)
    byte_tokenizer().save_pretrained(d)
    return d


def scheduled(capsys, caplog, out, calib, model_dir, *extra: str) -> tuple[int, dict | None, list[str], str]:
    """One scheduled run through the CLI: (exit code, JSON summary, phases started, stderr)."""
    caplog.clear()
    capsys.readouterr()
    argv = ["-q", "prune", "--if-changed",
            *tiny_overrides(out, calib, **{"model.source": str(model_dir)}), *extra]
    with caplog.at_level(logging.INFO, logger="orchestrator"):
        rc = main(argv)
    captured = capsys.readouterr()
    lines = captured.out.strip().splitlines()
    phases = [m.group(1) for r in caplog.records if (m := re.match(r"phase (\w+): start", r.getMessage()))]
    return rc, json.loads(lines[-1]) if lines else None, phases, captured.err


def test_identical_scheduled_run_reuses_the_artifact_and_force_recomputes(tmp_path, corpus_parquet, model_dir,
                                                                         capsys, caplog, monkeypatch):
    out = tmp_path / "runs" / "nightly-{key}"
    rc, first, phases, _ = scheduled(capsys, caplog, out, corpus_parquet, model_dir)
    assert rc == 0 and not first["reused"]
    assert "prune" in phases and "load" in phases
    run_dir = tmp_path / "runs" / f"nightly-{first['run_key'][:12]}"
    assert first["run_dir"] == str(run_dir)
    assert (run_dir / "run_key").read_text().strip() == first["run_key"]
    report = json.loads((run_dir / "report.json").read_text())
    assert report["run_key"] == first["run_key"]
    index = tmp_path / "runs" / ".rayprune-index" / first["run_key"]
    assert json.loads(index.read_text())["run_dir"] == run_dir.name
    stamp = (run_dir / "report.json").stat().st_mtime_ns

    def no_model_work(*args, **kwargs):
        raise AssertionError("a reused run must not load the model or compute statistics")

    with monkeypatch.context() as m:
        m.setattr(coordinator, "materialize", no_model_work)
        m.setattr(coordinator, "calibration_windows", no_model_work)
        rc, second, phases, _ = scheduled(capsys, caplog, out, corpus_parquet, model_dir)
        assert rc == 0 and phases == []
        assert second == {**first, "reused": True}
        # output-only differences (overwrite flag, progress bars) keep the key
        rc, third, phases, _ = scheduled(capsys, caplog, out, corpus_parquet, model_dir, "output.overwrite=true")
        assert rc == 0 and phases == [] and third["reused"] and third["run_dir"] == str(run_dir)
        assert main(["prune", "--if-changed", *tiny_overrides(out, corpus_parquet,
                                                             **{"model.source": str(model_dir)})]) == 0
    assert (run_dir / "report.json").stat().st_mtime_ns == stamp  # untouched

    rc, forced, phases, _ = scheduled(capsys, caplog, out, corpus_parquet, model_dir, "--force")
    assert rc == 0 and not forced["reused"] and "prune" in phases
    assert forced["run_dir"] == str(run_dir) and forced["run_key"] == first["run_key"]
    assert (run_dir / "report.json").stat().st_mtime_ns != stamp
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == [".rayprune-index", run_dir.name]


def test_new_model_revision_runs_again_and_fixed_dir_needs_overwrite(tmp_path, corpus_parquet, model_dir,
                                                                     capsys, caplog):
    out = tmp_path / "runs" / "nightly-{key}"
    rc, first, _, _ = scheduled(capsys, caplog, out, corpus_parquet, model_dir)
    assert rc == 0
    # the schedule's model gets a new revision: same files, new weights
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight.mul_(1.5)
    model.save_pretrained(model_dir, safe_serialization=True)

    rc, second, phases, _ = scheduled(capsys, caplog, out, corpus_parquet, model_dir)
    assert rc == 0 and not second["reused"] and "prune" in phases
    assert second["run_key"] != first["run_key"] and second["run_dir"] != first["run_dir"]
    index = sorted(p.name for p in (tmp_path / "runs" / ".rayprune-index").iterdir())
    assert index == sorted([first["run_key"], second["run_key"]])
    assert (tmp_path / "runs" / f"nightly-{first['run_key'][:12]}" / "report.json").is_file()  # old run kept

    # a fixed output.dir holding the old run: refused with a clear line unless overwrite is set
    fixed = first["run_dir"]
    rc, summary, phases, err = scheduled(capsys, caplog, fixed, corpus_parquet, model_dir, "pruning.sparsity=0.6")
    assert rc == 2 and summary is None and phases == []
    assert f"output.dir: {fixed!r} holds a run with another run key" in err
    rc, summary, phases, _ = scheduled(capsys, caplog, fixed, corpus_parquet, model_dir, "pruning.sparsity=0.6",
                                       "output.overwrite=true")
    assert rc == 0 and summary["run_dir"] == fixed and "prune" in phases
    assert abs(json.loads((Path(fixed) / "report.json").read_text())["sparsity"]["reached"] - 0.6) < 0.02
