"""The compression service: a Ray Serve app that runs pruning jobs as Ray tasks.

Endpoints (every one needs ``Authorization: Bearer <token>``; errors are ``{"error": "..."}``):

- ``POST /v1/jobs``: the run config as JSON (``application/json``) or YAML (``application/x-yaml``,
  ``text/plain``) -> 202 ``{"job_id", "state", ...}``; 400 naming the field and value when the
  config is invalid, the operator's policy (:mod:`~orchestrator.surfaces.serve.policy`) refuses it
  or ``output.dir`` leaves the service root; 409 when ``output.dir`` equals, contains or lies inside
  another job's directory, a published run or a checkpoint; 413 for a body over the limit; 429 when
  too many jobs are queued.
- ``GET /v1/jobs``: every remembered job.
- ``GET /v1/jobs/{id}``: ``state`` (pending, running, succeeded, failed, cancelled), current
  ``phase``, ``progress`` (``done``: how many phases finished, ``phases``: their seconds), ``error``,
  ``run_dir`` once it has succeeded, ``version`` (grows with every change). Answered from the
  replica's copy, current within one round trip of the registry's change feed;
  ``Cache-Control: no-cache`` reads the registry itself.
- ``GET /v1/jobs/{id}/report``: the run's ``report.json``; 409 until the job has succeeded.
- ``DELETE /v1/jobs/{id}``: cancel; answers once the task has stopped, the paths it owned are gone
  and its placement groups are freed. A job over the policy's ``max_wall_s`` is cancelled the same way.

``output.dir`` is read relative to the service root (default ``<root>/<job_id>``).

Import path for ``serve run`` or a RayService serve config: ``orchestrator.surfaces.serve.app:build_app``
with the args of :class:`~orchestrator.surfaces.serve.options.JobServiceOptions`, e.g.::

    RAYPRUNE_SERVE_TOKEN=... serve run orchestrator.surfaces.serve.app:build_app root=/data/runs
"""


import asyncio
import json
import logging
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.config import DeploymentActorConfig

from orchestrator.fileio import finite_json
from orchestrator.plan_fit import coordinator_need
from orchestrator.surfaces.serve.auth import ApiError, BearerAuth, install_error_handlers, load_token
from orchestrator.surfaces.serve.bodies import read_body
from orchestrator.surfaces.serve.jobs import JobRegistry
from orchestrator.surfaces.serve.journal import with_queue_position
from orchestrator.surfaces.serve.options import JobServiceOptions, parse_options, service_root
from orchestrator.surfaces.serve.policy import JobPolicy, load_policy
from orchestrator.surfaces.serve.submission import validate_submission

log = logging.getLogger(__name__)

REGISTRY = "registry"
api = FastAPI(title="rayprune compression service", docs_url=None, redoc_url=None, openapi_url=None)
install_error_handlers(api)


class JobMirror:
    """A replica's copy of every job's status, kept current by the registry's change feed.

    Status reads are answered from here, without a call to the registry actor (on a busy head that
    call is most of a read's latency). A job this replica has not seen yet is read from the registry.
    Writes made through this replica (submit, cancel) update the copy with the registry's answer, so
    a client reads its own writes; changes made elsewhere (a job's progress, another replica's
    cancel) arrive within one round trip of the feed.

    Args:
        call: ``await call(method, *args)`` on the registry -> ``(status, payload)``.
    """

    def __init__(self, call: Callable[..., Awaitable[tuple[int, dict]]]):
        self._call = call
        self._views: dict[str, dict] = {}
        self._follower: asyncio.Task | None = None
        self._applied = asyncio.Event()  # replaced after every change the feed delivered

    def forget(self, job_id: str) -> None:
        """Drop a deleted job from the copy (the change feed's tombstone would too, a round trip later)."""
        self._views.pop(job_id, None)

    def offer(self, view: dict) -> None:
        """Keep ``view`` unless a newer one of its job is already here."""
        current = self._views.get(view["job_id"])
        if current is None or view["version"] >= current["version"]:
            self._views[view["job_id"]] = view

    async def get(self, job_id: str, fresh: bool = False) -> tuple[int, dict]:
        """``(status, payload)`` of one job; ``fresh`` reads the registry itself."""
        if self._follower is None:
            self._follower = asyncio.get_running_loop().create_task(self._follow())
        view = None if fresh else self._views.get(job_id)
        if view is not None:
            return 200, with_queue_position(view, self._views.values())
        status, payload = await self._call("get", job_id)
        if status == 200:
            self.offer(payload)
        return status, payload

    async def _follow(self) -> None:
        incarnation, since = None, 0
        while True:
            try:
                _, feed = await self._call("changes", incarnation, since, 30.0)
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - the registry is restarting: follow it again shortly
                log.warning("job registry change feed failed; retrying", exc_info=True)
                self._views.clear()
                incarnation, since = None, 0
                await asyncio.sleep(1.0)
                continue
            if feed["full"]:
                self._views.clear()
            for view in feed["views"].values():
                self.offer(view)
            for job_id in feed["forgotten"]:
                self._views.pop(job_id, None)
            incarnation, since = feed["incarnation"], feed["version"]
            applied, self._applied = self._applied, asyncio.Event()
            applied.set()

    async def next_update(self) -> None:
        """Return once the change feed has delivered its next batch of changes here."""
        await self._applied.wait()


def report_payload(text: str, path: Path) -> dict:
    """A ``report.json``'s text as strict JSON data: NaN or infinite numbers (reports written before they
    became null) are null and listed under ``non_finite``.

    Raises:
        ApiError: 409 when the file is not a JSON object.
    """
    try:
        report, places = finite_json(json.loads(text))
    except ValueError:  # JSONDecodeError, or an integer too long to convert
        raise ApiError(409, f"report: {str(path)!r} is not valid JSON") from None
    if not isinstance(report, dict):
        raise ApiError(409, f"report: {str(path)!r} is not a JSON object")
    if places:
        report["non_finite"] = sorted(set(report.get("non_finite") or []) | set(places))
    return report


def _answer(result: tuple[int, dict], **headers: str) -> JSONResponse:
    status, payload = result
    return JSONResponse(payload, status_code=status, headers=headers or None)


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=256,
                  logging_config={"enable_access_log": False})  # a log line per status read costs latency
@serve.ingress(api)
class JobService:
    """HTTP front of the job registry (see the module docstring for the endpoints).

    Args:
        root: directory all job output goes under (created when missing).
        token_file: file holding the bearer token, else the environment variables.
        max_body_bytes: largest accepted config body.
        policy: the operator's :class:`~orchestrator.surfaces.serve.policy.JobPolicy` as a dict.
    """

    def __init__(self, root: str, token_file: str | None = None, max_body_bytes: int = 1 << 20,
                 policy: dict | None = None):
        self._auth = BearerAuth(load_token(token_file))
        self._root = Path(root).expanduser().resolve()
        self._root.mkdir(parents=True, exist_ok=True)
        self._max_body = max_body_bytes
        self._policy = JobPolicy.model_validate(policy or {})
        self._registry = None
        self._jobs = JobMirror(self._call)
        log.info("job service ready, root %s", self._root)

    async def _handle(self):
        """The registry actor's handle, looked up again after the controller recreated it."""
        for _ in range(50):
            if self._registry is not None:
                return self._registry
            try:
                self._registry = serve.get_deployment_actor(REGISTRY)
            except ValueError:
                await asyncio.sleep(0.2)
        raise ApiError(503, "registry: the job registry is not available; retry later")

    async def _call(self, method: str, *args) -> tuple[int, dict]:
        """Call a registry method; a stale handle (registry recreated) is refreshed once."""
        try:
            return await getattr(await self._handle(), method).remote(*args)
        except RayActorError:
            self._registry = None
        try:
            return await getattr(await self._handle(), method).remote(*args)
        except RayActorError:
            self._registry = None
            raise ApiError(503, "registry: the job registry is restarting; retry later") from None

    @api.post("/v1/jobs")
    async def submit(self, request: Request) -> JSONResponse:
        """Validate a run config and queue it as a job."""
        self._auth.check(request)
        body = await read_body(request, self._max_body, "config")
        job_id = uuid.uuid4().hex
        cfg = await asyncio.to_thread(validate_submission, body, request.headers.get("content-type"), self._root,
                                      job_id, self._policy)
        result = await self._call("submit", job_id, cfg.to_dict(), cfg.output.dir, coordinator_need(cfg))
        if result[0] == 202:
            self._jobs.offer(result[1])
        return _answer(result, Location=f"/v1/jobs/{job_id}")

    @api.get("/v1/jobs")
    async def list_jobs(self, request: Request) -> JSONResponse:
        """Every remembered job."""
        self._auth.check(request)
        return _answer(await self._call("list_jobs"))

    @api.get("/v1/jobs/{job_id}")
    async def status(self, job_id: str, request: Request) -> JSONResponse:
        """State, phase, progress, error and run directory of one job.

        Answered from this replica's copy; ``Cache-Control: no-cache`` asks the registry itself.
        """
        self._auth.check(request)
        fresh = "no-cache" in request.headers.get("cache-control", "").lower()
        return _answer(await self._jobs.get(job_id, fresh=fresh))

    @api.get("/v1/jobs/{job_id}/report")
    async def report(self, job_id: str, request: Request) -> JSONResponse:
        """The ``report.json`` of a succeeded job."""
        self._auth.check(request)
        status, job = await self._jobs.get(job_id)
        if status != 200:
            return _answer((status, job))
        if job["state"] != "succeeded":
            raise ApiError(409, f"job {job_id} is {job['state']}; its report exists once it has succeeded")
        path = Path(job["run_dir"]) / "report.json"
        try:
            text = await asyncio.to_thread(path.read_text)
        except OSError:
            raise ApiError(404, f"report: {str(path)!r} is not readable from this replica") from None
        return JSONResponse(report_payload(text, path))

    @api.delete("/v1/jobs/{job_id}")
    async def cancel(self, job_id: str, request: Request) -> JSONResponse:
        """Cancel a pending or running job; delete a finished job's run (and forget the job)."""
        self._auth.check(request)
        result = await self._call("delete", job_id)
        if result[0] == 200:
            if result[1].get("deleted"):
                self._jobs.forget(job_id)
            else:
                self._jobs.offer(result[1])
        return _answer(result)


def build_app(args: dict | None = None) -> serve.Application:
    """The job service app, for ``serve run orchestrator.surfaces.serve.app:build_app`` or a serve config.

    Args:
        args: :class:`~orchestrator.surfaces.serve.options.JobServiceOptions` fields (strings are parsed).

    Raises:
        ConfigError: bad arguments or no root configured.
        UsageError: no bearer token configured (the service refuses to start without one).
    """
    opts = parse_options(JobServiceOptions, args)
    root = service_root(opts)
    load_token(opts.token_file)  # fail here, before deploying, when no token is configured
    policy = load_policy(opts.policy_file)  # and when the policy file is bad
    registry = DeploymentActorConfig(
        name=REGISTRY,
        actor_class=JobRegistry,
        init_kwargs={"job_num_cpus": opts.job_num_cpus, "max_active_jobs": opts.max_active_jobs,
                     "max_finished_jobs": opts.max_finished_jobs, "cancel_grace_s": opts.cancel_grace_s,
                     "root": root, "max_wall_s": policy.max_wall_s,
                     "keep_failed_checkpoints": policy.keep_failed_checkpoints, "retention_s": opts.retention_s,
                     "max_job_bytes": policy.max_job_bytes, "max_requeues": opts.max_requeues},
        actor_options={"num_cpus": 0},
    )
    deployment = JobService.options(num_replicas=opts.num_replicas, deployment_actors=[registry])
    return deployment.bind(root=root, token_file=opts.token_file, max_body_bytes=opts.max_body_bytes,
                           policy=policy.model_dump())

