"""Fault injection: a killed or hung worker is survived by resuming from checkpoints, with identical masks."""

from __future__ import annotations

import dataclasses
import json
import shutil
import time

import pytest
import torch

ray = pytest.importorskip("ray")
pytest.importorskip("deepspeed")

from actors.distributed import run_ray  # noqa: E402
from actors.faults import FAULT_EXIT_ENV, Faults  # noqa: E402
from orchestrator.errors import RayPruneError  # noqa: E402
from orchestrator.inputs.config import RunConfig  # noqa: E402
from orchestrator.inputs.models import load_tokenizer, materialize  # noqa: E402
from orchestrator.surfaces.cli import main  # noqa: E402

pytestmark = pytest.mark.integration

TEXT = ("Pruning removes weights that matter least; gradients and activations tell which ones. "
        "A lost worker must not throw the run away: checkpoints keep partitions and finished blocks. ")


def make_cfg() -> RunConfig:
    cfg = RunConfig()
    cfg.model.source = "tiny"
    cfg.pruning.method = "gblm"
    cfg.backend.kind = "ray"
    cfg.backend.workers = 2
    cfg.backend.num_threads = 1
    cfg.backend.grad_batch_size = 1
    cfg.backend.checkpoint_every = 1
    cfg.backend.checkpoint_interval_s = 0.0  # a commit after every sequence, however fast
    cfg.backend.collective_timeout_s = 6.0
    return cfg


@pytest.fixture(scope="module")
def setup(ray_cluster):
    cfg = make_cfg()
    path = materialize(cfg.model)
    tok = load_tokenizer(path, cfg.model)
    ids = torch.tensor(tok(TEXT * 4)["input_ids"], dtype=torch.int64)
    calib = ids[: 7 * 32].reshape(7, 32)  # (7, 32): 4 + 3 sequences on two workers
    reference = run_ray(cfg, path, calib, progress=False)
    return cfg, path, calib, reference


def _same_masks(a, b) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# A rank lost in the gradient pass (its node removed, then replaced) is tests/integration/test_node_loss.py: the
# resumed run's masks and weights equal an uninterrupted run's.


@pytest.mark.parametrize("interval", [0.0, 3600.0])
def test_gradient_saves_wait_for_the_interval(setup, tmp_path, monkeypatch, interval):
    """Every sequence is due a save (``checkpoint_every: 1``); ``checkpoint_interval_s`` spaces them from the
    pass's start: with an hour a seconds-long pass saves nothing (a failure recomputes it) and still prunes
    exactly as without checkpoints."""
    from actors.checkpoint import CheckpointStore

    cfg, path, calib, reference = setup
    cfg = dataclasses.replace(cfg, backend=dataclasses.replace(cfg.backend, checkpoint_interval_s=interval))
    commits = []
    real = CheckpointStore.commit_grad
    monkeypatch.setattr(CheckpointStore, "commit_grad",
                        lambda self, world, steps, hashes, done: (commits.append((steps, done)),
                                                                   real(self, world, steps, hashes, done)))
    res = run_ray(cfg, path, calib, progress=False, checkpoint_dir=tmp_path / "ckpt")
    assert commits == ([(1, False), (2, False), (3, False), (4, True)] if interval == 0 else [])
    _same_masks(res.masks, reference.masks)


def test_worker_killed_during_block_pass(setup, tmp_path):
    cfg, path, calib, reference = setup
    faults = Faults(kill_at_block=1)
    ckpt = tmp_path / "ckpt"
    res = run_ray(cfg, path, calib, progress=False, checkpoint_dir=ckpt, faults=faults)
    assert faults.fired == {"kill_at_block"}
    _same_masks(res.masks, reference.masks)
    progress = json.loads((ckpt / "progress.json").read_text())
    assert progress["grad_done"] and progress["blocks_done"] == 2
    assert (ckpt / "config.yaml").is_file()


def test_hung_collective_fails_within_timeout_then_resumes(setup, tmp_path):
    cfg, path, calib, reference = setup
    cfg = make_cfg()
    cfg.backend.max_retries = 0
    ckpt = tmp_path / "ckpt"
    hang_s = 900.0
    t0 = time.perf_counter()
    with pytest.raises(RayPruneError, match="checkpoints kept in"):
        run_ray(cfg, path, calib, progress=False, checkpoint_dir=ckpt,
                faults=Faults(hang_at_block=1, hang_seconds=hang_s))
    # the run ended while the worker still slept: the collective timeout ended it, not the end of the
    # hang (no bound tighter than the hang itself: on a loaded machine start-up alone can take minutes)
    assert time.perf_counter() - t0 < hang_s
    assert json.loads((ckpt / "progress.json").read_text())["blocks_done"] == 1
    res = run_ray(cfg, path, calib, progress=False, checkpoint_dir=ckpt)  # the resume
    _same_masks(res.masks, reference.masks)


def test_resume_refuses_checkpoint_of_another_config(setup, tmp_path, corpus_parquet):
    from tests.conftest import tiny_overrides

    out = tmp_path / "run"
    ckpt = tmp_path / ".run.ckpt"
    ckpt.mkdir()
    (ckpt / "progress.json").write_text(json.dumps({"fingerprint": "0" * 64}))
    argv = ["-q", "prune", "--resume", str(out),
            *tiny_overrides(out, corpus_parquet, **{"backend.kind": "ray"})]
    before = sorted(p.name for p in tmp_path.iterdir())
    assert main(argv) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    # and without --resume, the leftover checkpoint is not silently ignored
    assert main(["-q", "prune", *tiny_overrides(out, corpus_parquet, **{"backend.kind": "ray"})]) == 2


# ------------------------------------------------ a save interrupted between the rank files and the commit

CLI_RAY = {"backend.kind": "ray", "pruning.method": "gblm", "backend.workers": 2, "backend.num_threads": 1,
           "backend.grad_batch_size": 1, "backend.checkpoint_every": 1, "backend.checkpoint_interval_s": 0,
           "backend.max_retries": 0, "output.save_model": False}  # 4 windows: 2 sequences per rank, a commit after each


def _prune(out, calib) -> int:
    from tests.conftest import tiny_overrides

    return main(["-q", "prune", *tiny_overrides(out, calib, **CLI_RAY)])


def _masks(run_dir) -> dict:
    from orchestrator.outputs.shards import load_masks

    return load_masks(run_dir)


@pytest.fixture(scope="module")
def interrupted(ray_cluster, tmp_path_factory, corpus_parquet):
    """An uninterrupted run's masks and the checkpoint of a run whose last worker exited right after
    writing its step-2 partitions, before the driver could commit them (step 1 is committed)."""
    root = tmp_path_factory.mktemp("interrupted")
    calib = root / "calib.parquet"
    shutil.copy(corpus_parquet, calib)
    assert _prune(root / "reference", calib) == 0
    mp = pytest.MonkeyPatch()
    mp.setenv(FAULT_EXIT_ENV, "2")
    try:
        assert _prune(root / "run", calib) == 1  # RayPruneError: the retries (none) ran out
    finally:
        mp.undo()
    ckpt = root / ".run.ckpt"
    progress = json.loads((ckpt / "progress.json").read_text())
    assert progress["grad_steps"] == 1 and progress["blocks_done"] == 0
    assert (ckpt / "grad" / "rank-00001-of-00002.step-000002.safetensors").is_file()  # written, never committed
    return {"reference": _masks(root / "reference"), "ckpt": ckpt, "calib": calib}


def _copy_checkpoint(interrupted, tmp_path):
    shutil.copytree(interrupted["ckpt"], tmp_path / ".run.ckpt")
    return tmp_path / ".run.ckpt", tmp_path / "run"


def _error_line(capsys) -> str:
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("rayprune: error:")]
    assert len(lines) == 1, lines
    return lines[0]


def test_worker_exit_between_rank_files_and_commit_then_resume(interrupted, tmp_path):
    ckpt, out = _copy_checkpoint(interrupted, tmp_path)
    assert main(["-q", "prune", "--resume", str(out)]) == 0
    _same_masks(_masks(out), interrupted["reference"])
    assert not ckpt.exists()  # a finished run removes its checkpoints


def test_resume_refused_when_calibration_windows_differ(interrupted, tmp_path, capsys):
    from tests.conftest import make_corpus

    ckpt, out = _copy_checkpoint(interrupted, tmp_path)
    calib = interrupted["calib"]
    original = calib.read_bytes()
    before = (ckpt / "progress.json").read_bytes()
    try:  # the same path in the same config text, other content: other windows
        import pyarrow as pa
        import pyarrow.parquet as pq

        docs = make_corpus(seed=7)
        pq.write_table(pa.table({"source": [f"d{i}" for i in range(len(docs))], "text": docs}), calib)
        assert main(["-q", "prune", "--resume", str(out)]) == 2
    finally:
        calib.write_bytes(original)
    line = _error_line(capsys)
    assert "made from other inputs: the calibration windows differ" in line, line
    assert (ckpt / "progress.json").read_bytes() == before and not out.exists()


def test_resume_refused_when_library_versions_differ(interrupted, tmp_path, capsys):
    ckpt, out = _copy_checkpoint(interrupted, tmp_path)
    progress = json.loads((ckpt / "progress.json").read_text())
    installed = progress["inputs"]["libraries"]["torch"]
    progress["inputs"]["libraries"]["torch"] = "0.0.1"
    (ckpt / "progress.json").write_text(json.dumps(progress))
    assert main(["-q", "prune", "--resume", str(out)]) == 2
    line = _error_line(capsys)
    assert f"the libraries (torch 0.0.1 -> {installed}) differ" in line, line
    assert not out.exists()
