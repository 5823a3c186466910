"""Compression jobs: one Ray task per run, tracked by a registry actor whose state is journaled.

The :class:`JobRegistry` actor submits each job as a :func:`run_job` task (so it owns the
task and can cancel it), the task reports phase events back into the registry, and the
HTTP replicas only ever ask the registry. Every change of a job is written to the journal in
the service root (:mod:`~orchestrator.surfaces.serve.journal`): a registry that replaces a lost
one (its node lost, out of memory, a redeploy) knows every job again, and settles the ones whose
task died with the old registry: stopped and their placement groups freed, then continued from their
checkpoint when they had one (submitted again under the same id), else cleaned up and recorded as failed.

Job tasks reserve ``job_num_cpus`` CPUs each, so Ray queues submissions beyond what the
cluster can run at once; a job's state is ``pending`` until its task starts.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from pathlib import Path
from typing import Any

import ray
from ray.exceptions import RayError, TaskCancelledError

from orchestrator.surfaces.serve.job_task import run_job
from orchestrator.surfaces.serve.journal import LOST, TERMINAL, Job, Journal, describe_error, with_queue_position
from orchestrator.surfaces.serve.ownership import claim, job_bytes, overlap, release, remove_run
from orchestrator.surfaces.serve.teardown import free_placement_groups, kill_process, placement_prefix
from orchestrator.testhooks import HOLD_DIR_ENV  # noqa: F401 - the tests' name

log = logging.getLogger(__name__)

#: seconds between repeated forced cancels of a job whose task has not stopped
CANCEL_RETRY_S = 2.0



@ray.remote(num_cpus=0, max_restarts=0)
class JobRegistry:
    """Async actor: submits job tasks, records their events, cancels them and cleans up after them.

    Every method returns ``(http_status, payload)`` so that the HTTP replica can answer as is. The
    actor runs one call at a time between awaits, and path claims and releases never await, so two
    jobs never race on the directories they share.

    Args:
        job_num_cpus: CPUs reserved by each job task (limits how many run at once).
        max_active_jobs: pending plus running jobs accepted before submissions get 429.
        max_finished_jobs: finished jobs remembered; the oldest are forgotten first.
        cancel_grace_s: seconds a cancelled job gets to stop on its own (its worker group's graceful
            shutdown included) before its worker is killed.
        root: the service root; every job's output lies below it.
        max_wall_s: seconds a job may run before it is cancelled (the policy's ``max_wall_s``).
        keep_failed_checkpoints: keep the checkpoints of failed and cancelled jobs.
        retention_s: finished jobs older than this are forgotten and their runs deleted (None: never).
        max_requeues: times a job lost with its registry is submitted again to continue its checkpoint.
        max_job_bytes: bytes a job may write below the root (temp directory and checkpoints; None: no limit).
        disk_check_s: seconds between two measurements of a running job's bytes.
    """

    def __init__(self, job_num_cpus: float = 1.0, max_active_jobs: int = 64, max_finished_jobs: int = 1000,
                 cancel_grace_s: float = 45.0, root: str | None = None, max_wall_s: float | None = None,
                 keep_failed_checkpoints: bool = False, retention_s: float | None = None, max_requeues: int = 1,
                 max_job_bytes: int | None = None, disk_check_s: float = 10.0):
        self.root = Path(root).expanduser().resolve() if root else None
        self.job_num_cpus = job_num_cpus
        self.max_active_jobs = max_active_jobs
        self.max_finished_jobs = max_finished_jobs
        self.cancel_grace_s = cancel_grace_s
        self.max_wall_s = max_wall_s
        self.keep_failed_checkpoints = keep_failed_checkpoints
        self.retention_s = retention_s
        self.max_requeues = max_requeues
        self.max_job_bytes = max_job_bytes
        self.disk_check_s = disk_check_s
        self.jobs: dict[str, Job] = {}
        self._tasks: set[asyncio.Task] = set()
        self.incarnation = uuid.uuid4().hex  # a recreated registry starts its change counter again
        self.version = 0
        self._changed = asyncio.Event()
        self._forgotten: dict[str, int] = {}  # job id -> version at which it was forgotten (bounded)
        self._horizon = 0  # tombstones older than this were dropped: a follower behind it gets everything
        self.journal = Journal(self.root) if self.root else None
        self._orphans: list[Job] = []  # journaled jobs whose task died with the previous registry
        for record in self.journal.load() if self.journal else ():
            job = Job.restore(record)
            self.jobs[job.job_id] = job
            if job.state not in TERMINAL:
                self._orphans.append(job)
        self._settled_orphans: asyncio.Task | None = None

    async def _settle_orphans(self) -> None:
        """Once, before the first call is answered: stop, clean up and fail the jobs a lost registry ran."""
        if self._settled_orphans is None:
            self._settled_orphans = asyncio.get_running_loop().create_task(self._settle())
        await asyncio.shield(self._settled_orphans)

    async def _settle(self) -> None:
        for job in self._orphans:
            state = job.state
            if job.worker is not None:  # Ray ends a dead owner's tasks; a straggler must not write on
                await kill_process(*job.worker)
            freed = await free_placement_groups(placement_prefix(job.job_id))  # first: its ranks stop writing
            others = [j.paths.final for j in self.jobs.values() if j not in self._orphans]
            if self._resumable(job):
                removed = release(job.paths, True, others)  # its temp directory; the checkpoint stays
                job.restarts += 1
                job.state, job.phase, job.worker, job.started_at = "pending", None, None, None
                self._start(job)
                log.warning("job %s was %s when its registry was lost: submitted again (restart %d) to continue "
                            "its checkpoint; removed %s; freed %s", job.job_id, state, job.restarts,
                            removed or "nothing", freed or "no placement groups")
                continue
            removed = release(job.paths, self.keep_failed_checkpoints, others)
            job.state, job.phase, job.error = "failed", None, LOST.format(state=state)
            job.finished_at = time.time()
            for event in (job.running, job.settled, job.done):
                event.set()
            self._touch(job)
            log.warning("job %s was %s when its registry was lost: failed; removed %s; freed %s", job.job_id,
                        state, removed or "nothing", freed or "no placement groups")
        self._orphans = []

    def _resumable(self, job: Job) -> bool:
        """Whether a lost job can continue: its config is journaled, it has restarts left, and ``output.dir`` has a
        checkpoint of that config."""
        if job.cfg is None or job.restarts >= self.max_requeues:
            return False
        from orchestrator.inputs.loader import config_from_dict
        from orchestrator.resume import interrupted_run_matches

        try:
            return interrupted_run_matches(config_from_dict(job.cfg))
        except Exception:  # noqa: BLE001 - a record this version cannot read: the job fails as without one
            log.warning("job %s: its journaled config is not readable", job.job_id, exc_info=True)
            return False

    def _touch(self, job: Job | None) -> None:
        """Record a change (of ``job``'s view, or the forgetting of jobs) and wake the feed's followers."""
        self.version += 1
        if job is not None:
            job.version = self.version
            if self.journal is not None:
                self.journal.write(job.record())
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    def _active(self) -> list[Job]:
        return [j for j in self.jobs.values() if not j.done.is_set()]

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def submit(self, job_id: str, cfg_data: dict[str, Any], output_dir: str,
                     memory_bytes: int = 0) -> tuple[int, dict]:
        """Claim the job's paths and start its task (Ray queues it until its CPUs and ``memory_bytes`` of host
        memory for the coordinator are free)."""
        await self._settle_orphans()
        active = self._active()
        if len(active) >= self.max_active_jobs:
            return 429, {"error": f"jobs: {len(active)} jobs are pending or running (limit {self.max_active_jobs})"}
        final = Path(output_dir)
        clash = overlap(final, [(j.job_id, j.paths.final) for j in active])
        if clash:
            return 409, {"error": clash}
        try:
            paths = claim(final, job_id, self.root or final.parent)
        except OSError as exc:
            return 400, {"error": f"output.dir: cannot create the parents of {output_dir!r}: "
                                  f"{exc.strerror or type(exc).__name__}"}
        job = Job(job_id, output_dir, paths, cfg=cfg_data, memory_bytes=memory_bytes)
        self.jobs[job_id] = job
        self._start(job)
        log.info("job %s submitted (output %s)", job_id, output_dir)
        return 202, job.view()

    def _start(self, job: Job) -> None:
        """Submit ``job``'s task and watch it (its time and disk limits included)."""
        me = ray.get_runtime_context().current_actor
        job.ref = run_job.options(num_cpus=self.job_num_cpus, memory=job.memory_bytes or None,
                                  name=f"rayprune-job-{job.job_id}").remote(job.job_id, job.cfg, me)
        self._touch(job)
        self._spawn(self._watch(job))
        if self.max_wall_s:
            self._spawn(self._time_limit(job, self.max_wall_s))
        if self.max_job_bytes is not None:
            self._spawn(self._disk_limit(job, self.max_job_bytes))

    async def event(self, job_id: str, event: str, fields: dict) -> None:
        """Record a progress event sent by a job task."""
        job = self.jobs.get(job_id)
        if job is None or job.state in TERMINAL:
            return
        if event == "started":
            job.state, job.started_at = "running", time.time()
            if fields.get("node_id") and fields.get("pid"):
                job.worker = (str(fields["node_id"]), int(fields["pid"]))
            job.running.set()
        elif event == "phase_start":
            job.state, job.phase = "running", fields.get("phase")
        elif event == "phase_end":
            job.phases[fields.get("phase")] = fields.get("seconds")
            if job.phase == fields.get("phase"):  # an async actor may run a phase's end after the next start
                job.phase = None
        elif event == "done":
            job.run_dir = fields.get("run_dir")
        elif event == "resuming":
            job.resumed = True
        else:
            return
        self._touch(job)

    async def get(self, job_id: str) -> tuple[int, dict]:
        """The status of one job."""
        await self._settle_orphans()
        job = self.jobs.get(job_id)
        if job is None:
            return 404, {"error": f"job_id: no job {job_id!r}"}
        return 200, with_queue_position(job.view(), [j.view() for j in self._active()])

    async def changes(self, incarnation: str | None, since: int, timeout_s: float = 30.0) -> tuple[int, dict]:
        """The change feed the HTTP replicas mirror: views changed after version ``since``.

        Waits up to ``timeout_s`` for a change when there is none yet (a long poll). A caller that
        followed another incarnation of the registry gets every job again.

        Returns:
            ``{"incarnation", "version", "full", "views": {job_id: view}, "forgotten": [job_id, ...]}``;
            with ``full`` the views are every remembered job (the follower replaces its copy).
        """
        await self._settle_orphans()
        full = incarnation != self.incarnation or since < self._horizon
        if not full and self.version <= since:
            await self._wait(self._changed, timeout_s)
        since = 0 if full else since
        return 200, {"incarnation": self.incarnation, "version": self.version, "full": full,
                     "views": {j.job_id: j.view() for j in self.jobs.values() if j.version > since},
                     "forgotten": [] if full else [job_id for job_id, v in self._forgotten.items() if v > since]}

    async def wait(self, job_id: str, timeout_s: float | None = None) -> tuple[int, dict]:
        """The status of a job once it is finished and cleaned up (or after ``timeout_s``: as it is then)."""
        await self._settle_orphans()
        job = self.jobs.get(job_id)
        if job is None:
            return 404, {"error": f"job_id: no job {job_id!r}"}
        await self._wait(job.done, timeout_s)
        return 200, job.view()

    async def list_jobs(self) -> tuple[int, dict]:
        """The status of every remembered job, oldest first."""
        await self._settle_orphans()
        views = [j.view() for j in self.jobs.values()]
        return 200, {"jobs": [with_queue_position(v, views) for v in views]}

    async def cancel(self, job_id: str, reason: str | None = None) -> tuple[int, dict]:
        """Cancel a pending or running job.

        Returns once its task has stopped, the paths it owned are gone and its placement groups are
        freed; a job that had already published its run is reported as such (409).
        """
        await self._settle_orphans()
        job = self.jobs.get(job_id)
        if job is None:
            return 404, {"error": f"job_id: no job {job_id!r}"}
        if not (job.state in TERMINAL or job.cancelling):
            job.cancelling, job.cancel_reason = True, reason
            graceful = self.cancel_grace_s > 0  # no grace: no graceful attempt (it would only delay the force)
            self._cancel_task(job, force=not graceful)
            if graceful and not await self._wait(job.settled, self.cancel_grace_s):
                log.warning("job %s did not stop within %.1f s: killing its worker", job_id, self.cancel_grace_s)
                self._cancel_task(job, force=True)
            # Ray can drop a forced cancel that follows a graceful one (the task is already "being
            # cancelled"; a task blocked in a sleep or a wait never sees the interrupt): then the
            # process that runs the task is killed, which fails the task like a forced cancel
            while not await self._wait(job.settled, CANCEL_RETRY_S):
                log.warning("job %s still running after a forced cancel: killing its process %s", job_id,
                            job.worker)
                self._cancel_task(job, force=True)
                if job.worker is not None:
                    await kill_process(*job.worker)
        await job.done.wait()
        if job.state == "cancelled":
            return 200, job.view()
        return 409, {**job.view(), "error": f"job {job_id} already {job.state}"}

    async def delete(self, job_id: str) -> tuple[int, dict]:
        """``DELETE /v1/jobs/{id}``: cancel an active job; delete a finished job's run and forget the job."""
        await self._settle_orphans()
        job = self.jobs.get(job_id)
        if job is None:
            return 404, {"error": f"job_id: no job {job_id!r}"}
        if not job.done.is_set():
            return await self.cancel(job_id)
        removed = await asyncio.to_thread(remove_run, job.run_dir, self.root)
        if job.state != "succeeded":  # a checkpoint the operator kept would block its output.dir for good
            removed += release(job.paths, False, [j.paths.final for j in self._active()])
        self._forget(job)
        log.info("job %s deleted (%s)", job_id, ", ".join(removed) or "no run")
        return 200, {**job.view(), "deleted": True, "removed": removed}

    # ------------------------------------------------------------ internals

    def _forget(self, job: Job) -> None:
        """Drop a finished job from memory and the journal (its id gets a tombstone in the change feed)."""
        del self.jobs[job.job_id]
        if self.journal is not None:
            self.journal.remove(job.job_id)
        self._touch(None)
        self._forgotten[job.job_id] = self.version

    @staticmethod
    def _cancel_task(job: Job, force: bool) -> None:
        try:
            ray.cancel(job.ref, force=force)
        except Exception:  # noqa: BLE001 - already finished: nothing to cancel
            log.debug("cancel of job %s was a no-op", job.job_id, exc_info=True)

    @staticmethod
    async def _wait(event: asyncio.Event, timeout: float | None) -> bool:
        try:
            await asyncio.wait_for(asyncio.shield(event.wait()), timeout)
        except asyncio.TimeoutError:
            return False
        return True

    async def _time_limit(self, job: Job, limit_s: float) -> None:
        """Cancel ``job`` once it has run for ``limit_s`` seconds (time queued in Ray does not count)."""
        started = asyncio.ensure_future(job.running.wait())
        finished = asyncio.ensure_future(job.done.wait())
        await asyncio.wait([started, finished], return_when=asyncio.FIRST_COMPLETED)
        started.cancel()
        finished.cancel()
        if job.done.is_set() or await self._wait(job.done, limit_s):
            return
        log.warning("job %s exceeded the time limit of %.0f s: cancelling it", job.job_id, limit_s)
        await self.cancel(job.job_id, reason=f"max_wall_s: the job ran longer than the service limit of "
                                             f"{limit_s:g} s and was cancelled")

    async def _disk_limit(self, job: Job, limit: int) -> None:
        """Cancel ``job`` once its temp directory and checkpoints hold more than ``limit`` bytes."""
        while not await self._wait(job.done, self.disk_check_s):
            used = await asyncio.to_thread(job_bytes, job.paths)
            if used > limit and not job.done.is_set():
                log.warning("job %s wrote %d bytes, over the limit of %d: cancelling it", job.job_id, used, limit)
                await self.cancel(job.job_id, reason=f"max_job_bytes: the job wrote {used:,} bytes below the service "
                                                     f"root, over the service limit of {limit:,}, and was cancelled")
                return

    async def _watch(self, job: Job) -> None:
        """Wait for the job's task, record its outcome, remove what a failed job owned, free its groups."""
        try:
            job.result = await job.ref
        except TaskCancelledError:
            job.result = {"cancelled": True}
        except RayError as exc:  # worker crashed, killed by a forced cancel, out of memory...
            job.result = {"error": describe_error(exc)}
        except Exception as exc:  # noqa: BLE001
            job.result = {"error": describe_error(exc)}
        job.settled.set()
        if job.run_dir and "run_dir" not in job.result:  # published, then stopped before returning
            job.result = {"run_dir": job.run_dir, "phases": {}}
        # the groups first: removing a placement group kills its actors, so none of a killed task's ranks is
        # still writing into the checkpoint or temp directory while they are removed
        freed = await free_placement_groups(placement_prefix(job.job_id))
        if freed:
            log.info("job %s: freed placement groups %s", job.job_id, ", ".join(freed))
        if "run_dir" not in job.result:
            removed = release(job.paths, self.keep_failed_checkpoints,
                              [j.paths.final for j in self._active() if j is not job])
            if removed:
                log.info("job %s: removed %s", job.job_id, ", ".join(removed))
        self._finish(job)
        self._touch(job)
        job.done.set()
        self._forget_old()

    def _finish(self, job: Job) -> None:
        result = job.result or {}
        if "run_dir" in result:
            job.state, job.run_dir = "succeeded", result["run_dir"]
            job.phases.update(result.get("phases", {}))
        elif job.cancelling or result.get("cancelled"):
            job.state, job.error = "cancelled", job.cancel_reason
        else:
            job.state, job.error = "failed", result.get("error", "unknown error")
        job.phase = None
        job.finished_at = time.time()
        log.info("job %s %s", job.job_id, job.state)

    def _forget_old(self) -> None:
        finished = sorted((j for j in self.jobs.values() if j.done.is_set()), key=lambda j: j.finished_at or 0)
        if self.retention_s is not None:  # the retention rule: runs older than it are deleted with their jobs
            expired = [j for j in finished if time.time() - (j.finished_at or 0) > self.retention_s]
            for job in expired:
                removed = remove_run(job.run_dir, self.root)
                log.info("job %s expired after %.0f s: removed %s", job.job_id, self.retention_s, removed or "no run")
                self._forget(job)
            finished = finished[len(expired):]
        for job in finished[: max(0, len(finished) - self.max_finished_jobs)]:
            self._forget(job)
        while len(self._forgotten) > self.max_finished_jobs:
            self._horizon = self._forgotten.pop(next(iter(self._forgotten)))
