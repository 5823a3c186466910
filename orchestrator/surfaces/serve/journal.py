"""The job registry's state on disk, in the service root, so that it outlives the registry actor.

The registry (:class:`~orchestrator.surfaces.serve.jobs.JobRegistry`) writes one JSON record per job,
``<root>/.rayprune-jobs/<job_id>.json``, each time the job's view changes (atomic rename, so a reader
sees the old record or the new one). A registry that starts on a root with records (its actor was
lost with its node, ran out of memory, or a RayService upgrade replaced it) loads them: finished jobs
are known again as they were, and jobs that were pending or running lost their task with the old
registry (Ray ends the tasks a dead owner submitted). The new registry stops whatever is left of
them and frees their placement groups; a job with a checkpoint of its own config (a distributed run
past its first checkpoint) is submitted again under the same id and continues from that checkpoint
(at most ``max_requeues`` times), every other one has what it owned removed and is recorded as failed
with the reason, so a client polling such a job gets an answer instead of a 404.

One registry per service root: the journal is its memory, not a shared database.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestrator.fileio import atomic_write_bytes
from orchestrator.surfaces.serve.ownership import JobPaths

log = logging.getLogger(__name__)

STATES = ("pending", "running", "succeeded", "failed", "cancelled")
TERMINAL = ("succeeded", "failed", "cancelled")
#: the journal's folder below the service root (a dot name: a job's output.dir can never be it)
JOURNAL_DIR = ".rayprune-jobs"
#: the error a job gets when the registry that ran it was lost
LOST = ("the job service restarted while this job was {state} (its registry was lost); what the job had "
        "started was stopped and removed: submit it again")


def describe_error(exc: BaseException) -> str:
    """One line for a failed job: the rayprune message, or the exception type and its first line."""
    from orchestrator.errors import RayPruneError

    cause = getattr(exc, "cause", None) or exc  # RayTaskError wraps the original
    if isinstance(cause, RayPruneError):
        text = str(cause)
    else:
        lines = [ln for ln in str(cause).strip().splitlines() if ln.strip()]
        text = f"{type(cause).__name__}: {lines[0] if lines else ''}".rstrip(": ")
    return text[:2000]


def paths_record(paths: JobPaths) -> dict[str, Any]:
    """``paths`` as JSON data."""
    return {"final": str(paths.final), "job_id": paths.job_id, "created": [str(p) for p in paths.created],
            "owns_checkpoint": paths.owns_checkpoint, "owns_lock": paths.owns_lock}


def paths_from(record: dict[str, Any]) -> JobPaths:
    """The :class:`JobPaths` a record holds."""
    return JobPaths(Path(record["final"]), str(record["job_id"]), [Path(p) for p in record.get("created", [])],
                    bool(record.get("owns_checkpoint", True)), bool(record.get("owns_lock", True)))


class Journal:
    """One JSON record per job in ``<root>/.rayprune-jobs``.

    Args:
        root: the service root (resolved).
    """

    def __init__(self, root: Path) -> None:
        self.dir = root / JOURNAL_DIR
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)

    def _path(self, job_id: str) -> Path:
        return self.dir / f"{job_id}.json"

    def write(self, record: dict[str, Any]) -> None:
        """Replace the record of ``record["job_id"]`` (atomically)."""
        atomic_write_bytes(self._path(record["job_id"]), json.dumps(record, allow_nan=False).encode())

    def remove(self, job_id: str) -> None:
        """Drop a forgotten job's record."""
        self._path(job_id).unlink(missing_ok=True)

    def load(self) -> list[dict[str, Any]]:
        """Every readable record, oldest submission first (an unreadable one is logged and skipped)."""
        records = []
        for path in sorted(self.dir.glob("*.json")):
            try:
                record = json.loads(path.read_text())
                if not isinstance(record, dict) or record.get("job_id") != path.stem:
                    raise ValueError("not a job record")
                paths_from(record["paths"])
            except (OSError, ValueError, KeyError, TypeError) as exc:
                log.warning("job journal: skipping %s (%s)", path, exc)
                continue
            records.append(record)
        return sorted(records, key=lambda r: r.get("submitted_at") or 0)


@dataclass
class Job:
    job_id: str
    output_dir: str
    paths: JobPaths
    state: str = "pending"
    phase: str | None = None
    phases: dict[str, float] = field(default_factory=dict)
    error: str | None = None
    run_dir: str | None = None
    submitted_at: float = field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None
    ref: Any = None
    result: dict | None = None
    running: asyncio.Event = field(default_factory=asyncio.Event)  # the task has started
    settled: asyncio.Event = field(default_factory=asyncio.Event)  # the task has stopped
    done: asyncio.Event = field(default_factory=asyncio.Event)  # terminal, cleaned up, placement freed
    cancelling: bool = False
    cancel_reason: str | None = None
    worker: tuple[str, int] | None = None  # (node id, pid) of the process running the job's task
    version: int = 0  # the registry's change counter at this job's last change
    cfg: dict[str, Any] | None = None  # the validated run config (what a requeue submits again)
    memory_bytes: int = 0  # host memory reserved for its coordinator
    restarts: int = 0  # times it was submitted again after the loss of its registry
    resumed: bool = False  # its run continued a checkpoint (kept by a failed run, or left by a lost registry)

    def record(self) -> dict[str, Any]:
        """What the journal keeps of this job: its view, the paths it owns and the process running it."""
        return {**self.view(), "paths": paths_record(self.paths), "worker": list(self.worker) if self.worker else None,
                "cancel_reason": self.cancel_reason, "cfg": self.cfg, "memory_bytes": self.memory_bytes}

    @classmethod
    def restore(cls, record: dict[str, Any]) -> Job:
        """A job as a journal record left it (a finished one is done; see the module docstring)."""
        job = cls(record["job_id"], record["output_dir"], paths_from(record["paths"]))
        for key in ("state", "phase", "error", "run_dir", "submitted_at", "started_at", "finished_at",
                    "cancel_reason", "cfg", "memory_bytes", "restarts", "resumed"):
            if key in record:
                setattr(job, key, record[key])
        job.phases = dict(record.get("progress", {}).get("phases", {}))
        worker = record.get("worker")
        job.worker = (str(worker[0]), int(worker[1])) if worker else None
        if job.state in TERMINAL:
            for event in (job.running, job.settled, job.done):
                event.set()
        return job

    def view(self) -> dict[str, Any]:
        return {
            "job_id": self.job_id,
            "version": self.version,
            "state": self.state,
            "phase": self.phase,
            "progress": {"done": len(self.phases), "phases": dict(self.phases)},  # finished phases: seconds
            "error": self.error,
            "run_dir": self.run_dir,
            "output_dir": self.output_dir,
            "submitted_at": self.submitted_at,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "restarts": self.restarts,
            "resumed": self.resumed,
        }


def with_queue_position(view: dict[str, Any], views: Any) -> dict[str, Any]:
    """``view`` with ``queue_position``: for a pending job, 1 + the pending jobs submitted before it (they start
    first as CPUs free up); None otherwise. Computed when read, from the views at hand."""
    if view.get("state") != "pending":
        return {**view, "queue_position": None}
    ahead = sum(1 for v in views if v.get("state") == "pending" and (v.get("submitted_at") or 0) <
                (view.get("submitted_at") or 0))
    return {**view, "queue_position": ahead + 1}

