"""Run keys of scheduled runs: what changes them, what does not, and the index of finished runs.

The input fingerprints the keys hash are tested in test_fingerprints.py."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from orchestrator.errors import UsageError
from orchestrator.inputs import fingerprints
from orchestrator.surfaces import runkeys
from tests.unit.keyed_inputs import cfg_for, heavy_modules_after_import, no_hub


def key(cfg, resolve=no_hub) -> str:
    return runkeys.run_key(cfg, resolve_hub=resolve)


def test_key_is_a_stable_sha256(calib):
    k = key(cfg_for(calib))
    assert len(k) == 64 and int(k, 16) >= 0
    assert key(cfg_for(calib)) == k


@pytest.mark.parametrize("override", [
    {"output.overwrite": True}, {"output.dir": "runs/elsewhere"}, {"backend.address": "auto"},
    {"backend.num_threads": 3}, {"backend.placement_strategy": "SPREAD"},
])
def test_output_and_placement_fields_do_not_change_the_key(calib, override):
    assert key(cfg_for(calib, **override)) == key(cfg_for(calib))


@pytest.mark.parametrize("override", [
    {"pruning.sparsity": 0.6}, {"pruning.method": "wanda"}, {"pruning.pattern": "2:4"},
    {"pruning.gblm.alpha": 10.0}, {"calibration.num_samples": 8}, {"calibration.seed": 1},
    {"model.dtype": "bfloat16"}, {"model.tiny.seed": 1}, {"backend.forward_dtype": "bfloat16"},
    {"output.save_model": False}, {"structured.enabled": True},
])
def test_result_fields_change_the_key(calib, override):
    assert key(cfg_for(calib, **override)) != key(cfg_for(calib))


def test_generate_settings_change_the_key():
    base = key(cfg_for())
    assert key(cfg_for(**{"calibration.generate.temperature": 0.7})) != base
    assert key(cfg_for(**{"calibration.generate.prompt": "def "})) != base
    assert runkeys.key_document(cfg_for(), no_hub)["calibration"]["kind"] == "generate"


def test_calibration_content_change_is_seen_even_with_same_size_and_mtime(calib):
    before = key(cfg_for(calib))
    st = calib.stat()
    data = calib.read_bytes()
    calib.write_bytes(data.replace(b"loops", b"LOOPS"))  # same size
    os.utime(calib, ns=(st.st_atime_ns, st.st_mtime_ns))  # same mtime
    assert calib.stat().st_size == st.st_size
    assert key(cfg_for(calib)) != before


def test_big_calibration_file_growth_changes_the_key(calib, monkeypatch):
    monkeypatch.setattr(fingerprints, "DATA_HASH_LIMIT", 10)  # identified by size and mtime
    before = key(cfg_for(calib))
    with calib.open("a") as f:
        f.write(json.dumps({"text": "one more"}) + "\n")
    assert key(cfg_for(calib)) != before


def test_new_data_file_in_a_calibration_directory_changes_the_key(tmp_path, calib):
    d = tmp_path / "corpus"
    d.mkdir()
    (d / "a.jsonl").write_bytes(calib.read_bytes())
    (d / "notes.md").write_text("ignored")
    before = key(cfg_for(d))
    (d / "b.jsonl").write_bytes(calib.read_bytes())
    assert key(cfg_for(d)) != before


def test_eval_source_counts_only_when_evaluating(calib, tmp_path):
    ev = tmp_path / "eval.txt"
    ev.write_text("held out text " * 50)
    off = cfg_for(calib, **{"eval.source": str(ev)})
    on = cfg_for(calib, **{"eval.source": str(ev), "eval.enabled": True})
    assert runkeys.key_document(off, no_hub)["eval"] is None
    k_on = key(on)
    ev.write_text("other held out text " * 50)
    assert key(cfg_for(calib, **{"eval.source": str(ev), "eval.enabled": True})) != k_on


def test_local_model_revision_changes_the_key(calib, model_dir):
    base = key(cfg_for(calib, model=str(model_dir)))
    doc = runkeys.key_document(cfg_for(calib, model=str(model_dir)), no_hub)["model"]
    assert doc["kind"] == "dir" and set(doc["files"]) == {"config.json", "model.safetensors", "tokenizer.json"}
    (model_dir / "model.safetensors").write_bytes(b"\x02" * 4096)  # new weights, same size
    assert key(cfg_for(calib, model=str(model_dir))) != base
    (model_dir / "model.safetensors").write_bytes(b"\x01" * 4096)
    assert key(cfg_for(calib, model=str(model_dir))) == base  # content-addressed: back to the old key
    (model_dir / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 65}))
    assert key(cfg_for(calib, model=str(model_dir))) != base


def test_touched_big_weight_shard_changes_the_key(calib, model_dir, monkeypatch):
    monkeypatch.setattr(fingerprints, "MODEL_HASH_LIMIT", 1024)  # the shard is stat'ed only
    base = key(cfg_for(calib, model=str(model_dir)))
    w = model_dir / "model.safetensors"
    os.utime(w, ns=(w.stat().st_atime_ns, w.stat().st_mtime_ns + 10**9))  # re-written (touched)
    assert key(cfg_for(calib, model=str(model_dir))) != base


def test_hub_model_revision_is_resolved_and_changes_the_key(calib):
    calls = []
    commits = {"main": "a" * 40}

    def resolver(repo, revision, kind):
        calls.append((repo, revision, kind))
        return commits[revision or "main"]

    base = key(cfg_for(calib, model="org/llm"), resolver)
    assert calls == [("org/llm", None, "model")]
    commits["main"] = "b" * 40  # upstream pushed a new commit
    assert key(cfg_for(calib, model="org/llm"), resolver) != base
    pinned = cfg_for(calib, model="org/llm", **{"model.revision": "c" * 40})
    assert fingerprints.hub_commit("org/llm", "c" * 40) == "c" * 40  # a commit needs no lookup
    assert key(pinned, lambda r, v, k: v) != base


def test_expand_output_dir():
    k = "0123456789abcdef" * 4
    assert runkeys.expand_output_dir("runs/nightly-{key}", k) == "runs/nightly-0123456789ab"
    assert runkeys.expand_output_dir("runs/fixed", k) == "runs/fixed"


def fake_run(run_dir: Path, k: str) -> Path:
    """A published run as RunWriter leaves it (report, run_key, manifest with sizes)."""
    run_dir.mkdir(parents=True)
    (run_dir / "report.json").write_text(json.dumps({"metrics": {}, "sparsity": {"reached": 0.5}}))
    (run_dir / "run_key").write_text(k + "\n")
    files = {name: {"bytes": (run_dir / name).stat().st_size, "sha256": "-"} for name in ("report.json", "run_key")}
    (run_dir / "manifest.json").write_text(json.dumps({"files": files}))
    return run_dir


def test_index_finds_a_finished_run_under_another_name(tmp_path):
    k = "ab" * 32
    run = fake_run(tmp_path / "nightly-1", k)
    entry = runkeys.record_run(run, k)
    assert entry == tmp_path / ".rayprune-index" / k
    assert json.loads(entry.read_text())["run_dir"] == "nightly-1"
    assert not list(entry.parent.glob(".*"))  # no temp file left behind
    assert runkeys.find_finished(tmp_path / "nightly-2", k) == run
    assert runkeys.find_finished(tmp_path / "nightly-2", "cd" * 32) is None


def test_incomplete_or_foreign_runs_are_not_reused(tmp_path):
    k = "ab" * 32
    run = fake_run(tmp_path / "run", k)
    assert runkeys.is_finished(run, k)
    assert not runkeys.is_finished(run, "cd" * 32)
    (run / "report.json").write_text("{}")  # size differs from the manifest: tampered or partial
    assert not runkeys.is_finished(run, k)
    stale = fake_run(tmp_path / "other", "cd" * 32)
    runkeys.record_run(stale, k)  # index entry whose run now has another key
    assert runkeys.find_finished(tmp_path / "x", k) is None


def test_prepare_run_reuses_forces_and_refuses(tmp_path, calib):
    cfg = cfg_for(calib, **{"output.dir": str(tmp_path / "nightly-{key}")})
    k, found = runkeys.prepare_run(cfg, reuse=True, resolve_hub=no_hub)
    assert found is None and cfg.output.dir == str(tmp_path / f"nightly-{k[:12]}")
    fake_run(Path(cfg.output.dir), k)
    cfg2 = cfg_for(calib, **{"output.dir": str(tmp_path / "nightly-{key}")})
    assert runkeys.prepare_run(cfg2, reuse=True, resolve_hub=no_hub) == (k, Path(cfg.output.dir))
    cfg3 = cfg_for(calib, **{"output.dir": str(tmp_path / "nightly-{key}")})
    assert runkeys.prepare_run(cfg3, reuse=True, force=True, resolve_hub=no_hub) == (k, None)
    assert cfg3.output.overwrite  # --force replaces the run with the same key in place
    changed = cfg_for(calib, **{"output.dir": cfg.output.dir, "pruning.sparsity": 0.7})
    with pytest.raises(UsageError, match=r"output\.dir: .* holds a run with another run key"):
        runkeys.prepare_run(changed, reuse=True, resolve_hub=no_hub)


def test_runkeys_import_neither_ray_nor_torch():
    assert heavy_modules_after_import("orchestrator.surfaces.runkeys") == []


def test_local_zero_shot_task_files_count_and_eval_workers_do_not(calib, tmp_path):
    from dataclasses import fields

    from orchestrator.inputs.config import EvalConfig

    names = {f.name for f in fields(EvalConfig)}
    if not {"tasks", "workers"} <= names:
        pytest.skip("eval.tasks / eval.workers are not in this checkout's config")
    task = tmp_path / "cloze.jsonl"
    task.write_text(json.dumps({"context": "a", "choices": ["b", "c"], "answer": 0}) + "\n")
    with_task = {"eval.enabled": True, "eval.tasks": f"[{task}]"}
    base = key(cfg_for(calib, **with_task))
    assert key(cfg_for(calib, **with_task, **{"eval.workers": 2})) == base
    task.write_text(json.dumps({"context": "a", "choices": ["b", "d"], "answer": 0}) + "\n")
    assert key(cfg_for(calib, **with_task)) != base
    assert runkeys.key_document(cfg_for(calib, **{"eval.tasks": f"[{task}]"}), no_hub)["eval_tasks"] == {}


def test_recovery_source_content_changes_the_key(calib, tmp_path):
    rec = tmp_path / "recovery.jsonl"
    rec.write_text("".join(json.dumps({"text": f"training text {i} about classes"}) + "\n" for i in range(20)))
    with_rec = {"structured.enabled": True, "structured.recovery.enabled": True,
                "structured.recovery.source": str(rec)}
    base = key(cfg_for(calib, **with_rec))
    st = rec.stat()
    rec.write_bytes(rec.read_bytes().replace(b"classes", b"CLASSES"))  # same path, size and mtime
    os.utime(rec, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert key(cfg_for(calib, **with_rec)) != base
    assert runkeys.key_document(cfg_for(calib, **with_rec), no_hub)["recovery"]["kind"] == "file"
    # recovery off, or training on the calibration windows: no recovery data of its own, keys as before
    off = cfg_for(calib, **{**with_rec, "structured.recovery.enabled": False})
    assert "recovery" not in runkeys.key_document(off, no_hub)
    assert "recovery" not in runkeys.key_document(cfg_for(calib), no_hub)
