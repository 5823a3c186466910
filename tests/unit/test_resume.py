"""Which interrupted run a new run continues by itself (a scheduled ``--if-changed`` run, a service job whose
``output.dir`` kept a failed job's checkpoint): only one of the same config (issue 30, findings 7 and 8)."""

from __future__ import annotations

import json

from orchestrator.inputs.loader import config_from_dict
from orchestrator.outputs.publish import checkpoint_path
from orchestrator.resume import interrupted_run_matches


def test_only_a_checkpoint_of_the_same_config_is_continued(tmp_path):
    cfg = config_from_dict({"backend": {"kind": "ray"}, "output": {"dir": str(tmp_path / "run")}})
    ckpt = checkpoint_path(cfg.output.dir)
    assert not interrupted_run_matches(cfg)  # no checkpoint
    ckpt.mkdir()
    (ckpt / "progress.json").write_text("{truncated")
    assert not interrupted_run_matches(cfg)  # unreadable: the usual refusal decides, not a resume
    (ckpt / "progress.json").write_text(json.dumps({"fingerprint": cfg.work_fingerprint()}))
    assert interrupted_run_matches(cfg)
    other = config_from_dict({**cfg.to_dict(), "pruning": {"sparsity": 0.6}})
    assert not interrupted_run_matches(other)  # another config's checkpoint is refused as before
