"""Compression jobs: one Ray task per run, tracked by an in-memory registry actor.

The :class:`JobRegistry` actor submits each job as a :func:`run_job` task (so it owns the
task and can cancel it), the task reports phase events back into the registry, and the
HTTP replicas only ever ask the registry. State lives as long as the registry actor: it is
a deployment-scoped actor of the job service, so it outlives replica restarts but not a
redeploy or ``serve shutdown``.

Job tasks reserve ``job_num_cpus`` CPUs each, so Ray queues submissions beyond what the
cluster can run at once; a job's state is ``pending`` until its task starts.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
from ray.exceptions import RayError, TaskCancelledError

log = logging.getLogger(__name__)

STATES = ("pending", "running", "succeeded", "failed", "cancelled")
TERMINAL = ("succeeded", "failed", "cancelled")


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


HOLD_DIR_ENV = "RAYPRUNE_JOB_HOLD_DIR"


def hold_at_phase(output_dir: str, phase: str) -> None:
    """Test hook: hold a job at the start of ``phase`` while ``$RAYPRUNE_JOB_HOLD_DIR/NAME.PHASE.hold`` exists.

    ``NAME`` is the last part of the job's ``output.dir``. On arrival the job writes
    ``NAME.PHASE.reached``, so a test synchronises on that event (and on removing the hold file),
    never on how long a phase takes. Without the variable (every deployment) this does nothing.
    """
    root = os.environ.get(HOLD_DIR_ENV)
    if not root or not output_dir:
        return
    hold = Path(root) / f"{Path(output_dir).name}.{phase}.hold"
    if not hold.exists():
        return
    hold.with_suffix(".reached").write_text(phase + "\n")
    while hold.exists():
        time.sleep(0.02)


@ray.remote(max_retries=0)
def run_job(job_id: str, cfg_data: dict[str, Any], registry) -> dict[str, Any]:
    """Run one job: ``run_prune`` with phase events forwarded to ``registry``.

    Returns:
        ``{"run_dir", "phases"}`` on success or ``{"error"}`` for a failed run; a cancelled task raises.
    """
    from orchestrator.coordinator import run_prune
    from orchestrator.inputs.loader import config_from_dict

    registry.event.remote(job_id, "started", {})
    phases: dict[str, float] = {}

    def hook(event: str, fields: dict) -> None:
        if event == "phase_end":
            phases[fields["phase"]] = fields["seconds"]
        registry.event.remote(job_id, event, dict(fields))
        if event == "phase_start":
            hold_at_phase(str(cfg_data.get("output", {}).get("dir", "")), fields["phase"])

    try:
        run_dir = run_prune(config_from_dict(cfg_data), progress=False, on_event=hook)
    except Exception as exc:  # noqa: BLE001 - every failure becomes the job's error line
        log.exception("job %s failed", job_id)
        return {"error": describe_error(exc)}
    return {"run_dir": str(run_dir), "phases": phases}


def remove_partial_output(output_dir: str, root: str | None = None) -> list[str]:
    """Delete what a killed :class:`~orchestrator.outputs.artifacts.RunWriter` left: its temp siblings
    (``.<name>.tmp-*``), then the parents of ``output_dir`` that are now empty, up to ``root``.

    Returns:
        The removed paths.
    """
    import glob

    final = Path(output_dir)
    removed = []
    # the name is matched literally: a job whose output.dir is "*" must not match every job's temp dir
    for tmp in final.parent.glob(f".{glob.escape(final.name)}.tmp-*"):
        shutil.rmtree(tmp, ignore_errors=True)
        removed.append(str(tmp))
    if root is not None:
        for parent in final.parents:
            if parent == Path(root) or not parent.is_relative_to(root):
                break
            try:
                parent.rmdir()  # only succeeds when empty
            except OSError:
                break
            removed.append(str(parent))
    return removed


@dataclass
class _Job:
    job_id: str
    output_dir: str
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
    settled: asyncio.Event = field(default_factory=asyncio.Event)
    cancelling: bool = False

    def view(self) -> dict[str, Any]:
        return {
            "job_id": self.job_id,
            "state": self.state,
            "phase": self.phase,
            "progress": {"done": len(self.phases), "phases": dict(self.phases)},  # finished phases: seconds
            "error": self.error,
            "run_dir": self.run_dir,
            "output_dir": self.output_dir,
            "submitted_at": self.submitted_at,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
        }


@ray.remote(num_cpus=0, max_restarts=0)
class JobRegistry:
    """Async actor: submits job tasks, records their events and cancels them.

    Every method returns ``(http_status, payload)`` so that the HTTP replica can answer as is.

    Args:
        job_num_cpus: CPUs reserved by each job task (limits how many run at once).
        max_active_jobs: pending plus running jobs accepted before submissions get 429.
        max_finished_jobs: finished jobs remembered; the oldest are forgotten first.
        cancel_grace_s: seconds a cancelled job gets to stop on its own before its worker is killed.
        root: the service root; empty directories a cancelled job created below it are removed.
    """

    def __init__(self, job_num_cpus: float = 1.0, max_active_jobs: int = 64, max_finished_jobs: int = 1000,
                 cancel_grace_s: float = 5.0, root: str | None = None):
        self.root = str(Path(root).expanduser().resolve()) if root else None
        self.job_num_cpus = job_num_cpus
        self.max_active_jobs = max_active_jobs
        self.max_finished_jobs = max_finished_jobs
        self.cancel_grace_s = cancel_grace_s
        self.jobs: dict[str, _Job] = {}
        self._watchers: set[asyncio.Task] = set()

    async def submit(self, job_id: str, cfg_data: dict[str, Any], output_dir: str) -> tuple[int, dict]:
        """Start a job task (Ray queues it until a CPU is free)."""
        active = [j for j in self.jobs.values() if j.state not in TERMINAL]
        if len(active) >= self.max_active_jobs:
            return 429, {"error": f"jobs: {len(active)} jobs are pending or running (limit {self.max_active_jobs})"}
        for other in active:
            if other.output_dir == output_dir:
                return 409, {"error": f"output.dir: {output_dir!r} is the output of active job {other.job_id}"}
        job = _Job(job_id, output_dir)
        me = ray.get_runtime_context().current_actor
        job.ref = run_job.options(num_cpus=self.job_num_cpus, name=f"rayprune-job-{job_id}").remote(
            job_id, cfg_data, me)
        self.jobs[job_id] = job
        watcher = asyncio.get_running_loop().create_task(self._watch(job))
        self._watchers.add(watcher)
        watcher.add_done_callback(self._watchers.discard)
        log.info("job %s submitted (output %s)", job_id, output_dir)
        return 202, job.view()

    async def event(self, job_id: str, event: str, fields: dict) -> None:
        """Record a progress event sent by a job task."""
        job = self.jobs.get(job_id)
        if job is None or job.state in TERMINAL:
            return
        if event == "started":
            job.state, job.started_at = "running", time.time()
        elif event == "phase_start":
            job.state, job.phase = "running", fields.get("phase")
        elif event == "phase_end":
            job.phases[fields.get("phase")] = fields.get("seconds")
            job.phase = None
        elif event == "done":
            job.run_dir = fields.get("run_dir")

    async def get(self, job_id: str) -> tuple[int, dict]:
        """The status of one job."""
        job = self.jobs.get(job_id)
        if job is None:
            return 404, {"error": f"job_id: no job {job_id!r}"}
        return 200, job.view()

    async def list_jobs(self) -> tuple[int, dict]:
        """The status of every remembered job, oldest first."""
        return 200, {"jobs": [j.view() for j in self.jobs.values()]}

    async def cancel(self, job_id: str) -> tuple[int, dict]:
        """Cancel a pending or running job; returns once its task has stopped and partial output is gone."""
        job = self.jobs.get(job_id)
        if job is None:
            return 404, {"error": f"job_id: no job {job_id!r}"}
        if job.state in TERMINAL or job.cancelling:
            await job.settled.wait()
            if job.state == "cancelled":
                return 200, job.view()
            return 409, {"error": f"job {job_id} already {job.state}", **job.view()}
        job.cancelling = True
        self._cancel_task(job, force=False)
        if not await self._wait_settled(job, self.cancel_grace_s):
            log.warning("job %s did not stop within %.1f s: killing its worker", job_id, self.cancel_grace_s)
            self._cancel_task(job, force=True)
            await self._wait_settled(job, None)
        if job.run_dir and "run_dir" not in (job.result or {}):  # published, then killed before returning
            job.result = {"run_dir": job.run_dir}
        if "run_dir" in (job.result or {}):  # it finished before the cancel landed
            self._finish(job)
            return 409, {"error": f"job {job_id} already {job.state}", **job.view()}
        removed = remove_partial_output(job.output_dir, self.root)
        if removed:
            log.info("job %s: removed partial output %s", job_id, ", ".join(removed))
        job.state, job.phase, job.error = "cancelled", None, None
        job.finished_at = time.time()
        log.info("job %s cancelled", job_id)
        return 200, job.view()

    # ------------------------------------------------------------ internals

    @staticmethod
    def _cancel_task(job: _Job, force: bool) -> None:
        try:
            ray.cancel(job.ref, force=force)
        except Exception:  # noqa: BLE001 - already finished: nothing to cancel
            log.debug("cancel of job %s was a no-op", job.job_id, exc_info=True)

    @staticmethod
    async def _wait_settled(job: _Job, timeout: float | None) -> bool:
        try:
            await asyncio.wait_for(asyncio.shield(job.settled.wait()), timeout)
        except asyncio.TimeoutError:
            return False
        return True

    async def _watch(self, job: _Job) -> None:
        """Wait for the job's task and record its outcome."""
        try:
            job.result = await job.ref
        except TaskCancelledError:
            job.result = {"cancelled": True}
        except RayError as exc:  # worker crashed, killed by a forced cancel, out of memory...
            job.result = {"error": describe_error(exc)}
        except Exception as exc:  # noqa: BLE001
            job.result = {"error": describe_error(exc)}
        if not job.cancelling:
            self._finish(job)
        job.settled.set()

    def _finish(self, job: _Job) -> None:
        result = job.result or {}
        if "run_dir" in result:
            job.state, job.run_dir = "succeeded", result["run_dir"]
            job.phases.update(result.get("phases", {}))
        elif result.get("cancelled"):
            job.state = "cancelled"
            remove_partial_output(job.output_dir, self.root)
        else:
            job.state, job.error = "failed", result.get("error", "unknown error")
        job.phase = None
        job.finished_at = time.time()
        log.info("job %s %s", job.job_id, job.state)
        self._forget_old()

    def _forget_old(self) -> None:
        finished = [j for j in self.jobs.values() if j.state in TERMINAL]
        for job in sorted(finished, key=lambda j: j.finished_at or 0)[: max(0, len(finished) - self.max_finished_jobs)]:
            del self.jobs[job.job_id]
