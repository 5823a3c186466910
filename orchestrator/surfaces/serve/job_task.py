"""The Ray task that runs one service job: ``run_prune`` with its phase events sent to the job registry."""

from __future__ import annotations

import logging
import os
from typing import Any

import ray

from orchestrator.surfaces.serve.journal import describe_error
from orchestrator.surfaces.serve.teardown import placement_prefix
from orchestrator.testhooks import hold_at_phase

log = logging.getLogger(__name__)


@ray.remote(max_retries=0)
def run_job(job_id: str, cfg_data: dict[str, Any], registry) -> dict[str, Any]:
    """Run one job: ``run_prune`` with phase events forwarded to ``registry``.

    The run writes into ``.NAME.tmp-<job_id>`` (see :mod:`~orchestrator.surfaces.serve.ownership`) and
    names its placement groups :func:`placement_prefix`, so the registry can remove exactly what it owns.

    Returns:
        ``{"run_dir", "phases"}`` on success or ``{"error"}`` for a failed run; a cancelled task raises.
    """
    from orchestrator.coordinator import run_prune
    from orchestrator.groups import named_placement
    from orchestrator.inputs.loader import config_from_dict
    from orchestrator.resume import interrupted_run_matches

    registry.event.remote(job_id, "started", {"node_id": ray.get_runtime_context().get_node_id(),
                                               "pid": os.getpid()})
    phases: dict[str, float] = {}

    def hook(event: str, fields: dict) -> None:
        if event == "phase_end":
            phases[fields["phase"]] = fields["seconds"]
        recorded = registry.event.remote(job_id, event, dict(fields))
        if event == "phase_start":
            hold_at_phase(str(cfg_data.get("output", {}).get("dir", "")), fields["phase"],
                          before=lambda: ray.get(recorded))

    try:
        cfg = config_from_dict(cfg_data)
        # a checkpoint of this same config (kept by a failed job, or left by a job whose registry was lost): continue
        resume = interrupted_run_matches(cfg)
        if resume:
            registry.event.remote(job_id, "resuming", {})
        with named_placement(placement_prefix(job_id)):
            run_dir = run_prune(cfg, progress=False, on_event=hook, run_tag=job_id, resume=resume)
    except Exception as exc:  # noqa: BLE001 - every failure becomes the job's error line
        log.exception("job %s failed", job_id)
        return {"error": describe_error(exc)}
    return {"run_dir": str(run_dir), "phases": phases}
