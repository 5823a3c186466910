"""Input fingerprints: what identifies a model revision and a data source (hashed by run keys),
and what a distributed run's checkpoints record and a resume compares."""

from __future__ import annotations

import json

from orchestrator.inputs import fingerprints
from tests.unit.keyed_inputs import cfg_for, heavy_modules_after_import, no_hub


def test_big_calibration_files_are_identified_by_size_and_mtime(calib, monkeypatch):
    monkeypatch.setattr(fingerprints, "DATA_HASH_LIMIT", 10)
    fp = fingerprints.data_fingerprint(str(calib), resolve_hub=no_hub)
    assert "sha256" not in fp and fp["mtime_ns"] == calib.stat().st_mtime_ns


def test_calibration_directory_lists_data_files_only(tmp_path, calib):
    d = tmp_path / "corpus"
    d.mkdir()
    (d / "a.jsonl").write_bytes(calib.read_bytes())
    (d / "notes.md").write_text("ignored")
    fp = fingerprints.data_fingerprint(str(d), resolve_hub=no_hub)
    assert list(fp["files"]) == ["a.jsonl"]


def test_big_weight_shards_are_stat_only(calib, model_dir, monkeypatch):
    monkeypatch.setattr(fingerprints, "MODEL_HASH_LIMIT", 1024)
    files = fingerprints.model_identity(cfg_for(calib, model=str(model_dir)).model, no_hub)["files"]
    assert "sha256" in files["config.json"] and "sha256" not in files["model.safetensors"]


def test_offline_hub_falls_back_to_the_literal_revision(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert fingerprints.hub_commit("org/llm", "v1.0") is None


def test_builtin_model_is_identified_by_its_package():
    from orchestrator.inputs.models import BUILTIN

    ident = fingerprints.model_identity(cfg_for(model="smollm2-135m").model, no_hub)
    assert ident == {"kind": "builtin", "name": "smollm2-135m", **BUILTIN["smollm2-135m"]}


def test_data_suffixes_match_the_loader():
    from orchestrator.inputs.data import LOCAL_SUFFIXES

    assert set(fingerprints.DATA_SUFFIXES) == set(LOCAL_SUFFIXES)


def _windows(*rows: list[int]):
    import numpy as np

    return np.array(rows, dtype=np.int64)


def test_checkpoint_inputs_hash_windows_model_and_libraries(model_dir):
    versions = {"torch": "2.0", "transformers": "4.0", "deepspeed": "0.1", "ray": "2.0", "rayprune": "0.1.0"}
    model = cfg_for(model=str(model_dir)).model
    base = fingerprints.checkpoint_inputs(model, _windows([1, 2], [3, 4]), no_hub, versions)
    again = fingerprints.checkpoint_inputs(model, _windows([1, 2], [3, 4]), no_hub, versions)
    assert fingerprints.inputs_mismatch(base, again) is None
    same_bytes = fingerprints.checkpoint_inputs(model, _windows([1, 2, 3, 4]), no_hub, versions)  # other shape
    assert fingerprints.inputs_mismatch(base, same_bytes) == "the calibration windows"
    assert set(fingerprints.library_versions()) == {"torch", "transformers", "deepspeed", "ray", "rayprune"}
    newer = fingerprints.checkpoint_inputs(model, _windows([1, 2], [3, 4]), no_hub, {**versions, "torch": "2.1"})
    assert fingerprints.inputs_mismatch(base, newer) == "the libraries (torch 2.0 -> 2.1)"
    (model_dir / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 128}))
    changed = fingerprints.checkpoint_inputs(model, _windows([1, 2], [3, 4]), no_hub, versions)
    assert fingerprints.inputs_mismatch(base, changed) == "the model (files or hub commit)"
    early = fingerprints.checkpoint_inputs(model, None, no_hub, versions)  # before the windows exist: not compared
    assert early["windows"] is None and fingerprints.inputs_mismatch(base, early) == "the model (files or hub commit)"
    assert "no inputs fingerprint" in fingerprints.inputs_mismatch(None, base)


def test_checkpoint_inputs_use_the_hub_commit():
    versions = {"torch": "2.0"}
    model = cfg_for(model="org/model").model
    a = fingerprints.checkpoint_inputs(model, _windows([1]), lambda r, rev, k: "a" * 40, versions)
    b = fingerprints.checkpoint_inputs(model, _windows([1]), lambda r, rev, k: "b" * 40, versions)
    assert fingerprints.inputs_mismatch(a, b) == "the model (files or hub commit)"


def test_inputs_refusal_is_one_line_naming_the_checkpoint_and_what_differs(tmp_path):
    ckpt = tmp_path / ".run.ckpt"
    line = fingerprints.inputs_refusal(ckpt, "the calibration windows")
    assert line == (f"--resume: checkpoint {str(ckpt)!r} was made from other inputs: the calibration windows "
                    "differ; delete it to start over")
    assert fingerprints.inputs_refusal(str(ckpt), "x") == fingerprints.inputs_refusal(ckpt, "x")


def test_fingerprints_import_neither_ray_nor_torch():
    assert heavy_modules_after_import("orchestrator.inputs.fingerprints") == []
