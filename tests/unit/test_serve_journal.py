"""The job registry's journal and retention, on the plain registry class (no Ray needed): what a new registry
reads back, and which finished runs the retention rule deletes (issue 30, findings 1 and 4)."""

from __future__ import annotations

import json
import time
from pathlib import Path

from orchestrator.surfaces.serve.jobs import JobRegistry
from orchestrator.surfaces.serve.journal import JOURNAL_DIR, Job, Journal
from orchestrator.surfaces.serve.ownership import JobPaths

Registry = JobRegistry.__ray_actor_class__  # the class itself: its journal and retention logic run without Ray


def _finished(root: Path, job_id: str, age_s: float, state: str = "succeeded") -> Job:
    run = root / job_id
    run.mkdir()
    (run / "report.json").write_text("{}")
    job = Job(job_id, str(run), JobPaths(run, job_id))
    job.state, job.run_dir, job.finished_at = state, str(run) if state == "succeeded" else None, time.time() - age_s
    for event in (job.running, job.settled, job.done):
        event.set()
    return job


def test_every_change_is_journaled_and_read_back_by_a_new_registry(tmp_path):
    first = Registry(root=str(tmp_path))
    job = _finished(tmp_path, "a1", age_s=5)
    job.phases = {"load": 1.5}
    first.jobs["a1"] = job
    first._touch(job)
    record = json.loads((tmp_path / JOURNAL_DIR / "a1.json").read_text())
    assert record["state"] == "succeeded" and record["paths"]["final"] == str(tmp_path / "a1")
    second = Registry(root=str(tmp_path))
    restored = second.jobs["a1"]
    assert restored.view() | {"version": 0} == job.view() | {"version": 0}
    assert restored.done.is_set() and second._orphans == []
    (tmp_path / JOURNAL_DIR / "junk.json").write_text("{not json")  # an unreadable record is skipped
    assert [r["job_id"] for r in Journal(tmp_path).load()] == ["a1"]


def test_a_journaled_running_job_is_an_orphan_of_the_next_registry(tmp_path):
    first = Registry(root=str(tmp_path))
    job = Job("r1", str(tmp_path / "r1"), JobPaths(tmp_path / "r1", "r1"))
    job.state, job.worker = "running", ("node-x", 4242)
    first.jobs["r1"] = job
    first._touch(job)
    second = Registry(root=str(tmp_path))
    assert [j.job_id for j in second._orphans] == ["r1"] and second.jobs["r1"].worker == ("node-x", 4242)
    assert not second.jobs["r1"].done.is_set()  # settled (stopped, cleaned, failed) before the first answer


def test_retention_deletes_old_finished_runs_and_forgets_their_jobs(tmp_path):
    registry = Registry(root=str(tmp_path), retention_s=3600)
    old, young, failed = (_finished(tmp_path, "old", 7200), _finished(tmp_path, "young", 60),
                          _finished(tmp_path, "failed-old", 7200, state="failed"))
    for job in (old, young, failed):
        registry.jobs[job.job_id] = job
        registry._touch(job)
    registry._forget_old()
    assert sorted(registry.jobs) == ["young"]
    assert not (tmp_path / "old").exists() and (tmp_path / "young" / "report.json").is_file()
    assert sorted(p.stem for p in (tmp_path / JOURNAL_DIR).glob("*.json")) == ["young"]
    assert (tmp_path / "failed-old").is_dir()  # a failed job published no run: nothing of it is deleted


def test_pending_jobs_get_their_queue_position_in_submission_order():
    from orchestrator.surfaces.serve.journal import with_queue_position

    views = [{"job_id": "r", "state": "running", "submitted_at": 1.0},
             {"job_id": "p2", "state": "pending", "submitted_at": 3.0},
             {"job_id": "p1", "state": "pending", "submitted_at": 2.0}]
    assert [with_queue_position(v, views)["queue_position"] for v in views] == [None, 2, 1]


def test_the_coordinator_memory_a_job_reserves():
    """Finding 3: service jobs reserved CPUs only. A distributed run's coordinator holds no model (the planner's
    base plus the windows); a one-process run holds its model, known for tiny and builtin models."""
    from orchestrator.inputs.loader import config_from_dict
    from orchestrator.inputs.models import tiny_params
    from orchestrator.plan_fit import coordinator_need
    from orchestrator.planner import COORDINATOR_BASE_BYTES

    ray = config_from_dict({"backend": {"kind": "ray"}, "calibration": {"num_samples": 8, "seq_len": 64}})
    assert coordinator_need(ray) == COORDINATOR_BASE_BYTES + 3 * 8 * 64 * 8
    local = config_from_dict({"model": {"source": "tiny"}, "backend": {"kind": "local"},
                              "calibration": {"num_samples": 8, "seq_len": 64}})
    assert coordinator_need(local) == coordinator_need(ray) + 3 * tiny_params(local.model.tiny) * 4
    assert coordinator_need(config_from_dict({"model": {"source": "/models/x"}, "backend": {"kind": "local"}})) == 0
