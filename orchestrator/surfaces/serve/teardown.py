"""What a stopped job can leave behind on the cluster, and how the registry removes it.

A job's placement groups belong to the Serve job, not to its task, so a killed task's groups outlive
it: the registry frees them by name (:func:`placement_prefix`, :func:`free_placement_groups`). A
forced cancel that Ray drops (one that follows a graceful cancel of the same task) leaves the task
running: the registry then kills its process on its node (:func:`kill_process`).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time

import ray
from ray.exceptions import RayError

log = logging.getLogger(__name__)


def placement_prefix(job_id: str) -> str:
    """The name prefix of the placement groups of job ``job_id`` (a killed task's placement groups
    outlive it: they belong to the Serve job, so the registry frees them by name)."""
    return f"rayprune-job-{job_id}-"


@ray.remote(num_cpus=0, max_retries=0)
def _signal_process(pid: int) -> bool:
    """SIGKILL ``pid`` on this node; False when it had already gone."""
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return False
    return True


async def kill_process(node_id: str, pid: int) -> None:
    """Kill process ``pid`` on Ray node ``node_id`` (a zero-CPU task pinned to that node)."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    try:
        await _signal_process.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False)).remote(pid)
    except RayError:  # the node is gone, and the job's task with it
        log.debug("could not signal %d on %s", pid, node_id, exc_info=True)


async def free_placement_groups(prefix: str, timeout_s: float = 60.0) -> list[str]:
    """Remove the placement groups whose name starts with ``prefix`` and wait until they are gone.

    Returns:
        The names of the groups removed.
    """
    from ray.util import placement_group_table
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    def alive() -> dict[str, str]:
        return {pg_id: info.get("name", "") for pg_id, info in placement_group_table().items()
                if info.get("name", "").startswith(prefix) and info.get("state") != "REMOVED"}

    groups = await asyncio.to_thread(alive)
    for pg_id in groups:
        try:
            remove_placement_group(PlacementGroup(ray.PlacementGroupID(bytes.fromhex(pg_id))))
        except Exception:  # noqa: BLE001 - removed meanwhile
            log.debug("placement group %s already gone", pg_id, exc_info=True)
    deadline = time.monotonic() + timeout_s
    while groups and await asyncio.to_thread(alive):
        if time.monotonic() > deadline:
            log.warning("placement groups %s were not removed within %.0f s", sorted(groups.values()), timeout_s)
            break
        await asyncio.sleep(0.1)  # GCS state, not a test: polled until it reports the removal
    return sorted(groups.values())
