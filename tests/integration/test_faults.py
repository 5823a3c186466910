"""Fault injection: a killed or hung worker is survived by resuming from checkpoints, with identical masks."""

from __future__ import annotations

import json
import time

import pytest
import torch

ray = pytest.importorskip("ray")
pytest.importorskip("deepspeed")

from actors.distributed import Faults, run_ray  # noqa: E402
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


def test_worker_killed_during_gradient_pass(setup, tmp_path):
    cfg, path, calib, reference = setup
    faults = Faults(kill_after_grad_chunks=2)
    res = run_ray(cfg, path, calib, progress=False, checkpoint_dir=tmp_path / "ckpt", faults=faults)
    assert faults.fired == {"kill_after_grad_chunks"}
    _same_masks(res.outcome.masks, reference.outcome.masks)
    for name, w in reference.weights.items():
        assert torch.equal(res.weights[name], w), name


def test_worker_killed_during_block_pass(setup, tmp_path):
    cfg, path, calib, reference = setup
    faults = Faults(kill_at_block=1)
    ckpt = tmp_path / "ckpt"
    res = run_ray(cfg, path, calib, progress=False, checkpoint_dir=ckpt, faults=faults)
    assert faults.fired == {"kill_at_block"}
    _same_masks(res.outcome.masks, reference.outcome.masks)
    progress = json.loads((ckpt / "progress.json").read_text())
    assert progress["grad_done"] and progress["blocks_done"] == 2
    assert (ckpt / "config.yaml").is_file()


def test_hung_collective_fails_within_timeout_then_resumes(setup, tmp_path):
    cfg, path, calib, reference = setup
    cfg = make_cfg()
    cfg.backend.max_retries = 0
    ckpt = tmp_path / "ckpt"
    t0 = time.perf_counter()
    with pytest.raises(RayPruneError, match="checkpoints kept in"):
        run_ray(cfg, path, calib, progress=False, checkpoint_dir=ckpt,
                faults=Faults(hang_at_block=1, hang_seconds=300))
    assert time.perf_counter() - t0 < 90  # startup + gradient pass + one block + the 6 s collective timeout
    assert json.loads((ckpt / "progress.json").read_text())["blocks_done"] == 1
    res = run_ray(cfg, path, calib, progress=False, checkpoint_dir=ckpt)  # the resume
    _same_masks(res.outcome.masks, reference.outcome.masks)


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
