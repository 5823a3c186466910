"""The Ray cluster a run uses: connect (or start a local Ray), fail fast on a bad address, check capacity."""

from __future__ import annotations

import logging
import os
import time

import ray

from orchestrator.errors import UsageError

log = logging.getLogger(__name__)


def ensure_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Connect to a cluster (``address``: ``auto`` or ``host:port``) or start a local Ray.

    An already initialised Ray (e.g. by a test fixture or the caller) is used as is.
    """
    if ray.is_initialized():
        return
    if address:
        _probe(address)
        try:
            ray.init(address=address, log_to_driver=True)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise UsageError(f"backend.address: cannot connect to Ray at {address!r} ({exc})") from None
    else:
        ray.init(num_cpus=num_cpus, log_to_driver=True)


def check_capacity(workers: int, field: str = "backend.workers") -> bool:
    """Check that the connected cluster can place ``workers`` ranks; returns whether they get GPUs.

    Raises:
        UsageError: fewer GPUs (or CPUs on a CPU-only cluster) than workers; checked before any
            placement group exists, since one that cannot be satisfied waits forever.
    """
    if workers < 1:
        raise UsageError(f"{field}: must be >= 1, got {workers}")
    res = ray.cluster_resources()
    gpus = int(res.get("GPU", 0))
    cpus = int(res.get("CPU", 0))
    have = gpus if gpus else cpus
    if workers > have:
        kind = "GPUs" if gpus else "CPUs"
        raise UsageError(f"{field}: {workers} workers asked but the Ray cluster has {have} {kind}")
    if workers > cpus:
        raise UsageError(f"{field}: {workers} workers need {workers} CPUs but the Ray cluster has {cpus}")
    return gpus > 0


def _probe(address: str, timeout: float = 5.0) -> None:
    """Fail fast on an unreachable ``host:port`` (``ray.init`` would otherwise retry for minutes)."""
    import socket

    if address in ("auto", "local") or address.startswith(("ray://", "http://", "https://")):
        return
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise UsageError(f"backend.address: expected 'auto' or HOST:PORT, got {address!r}")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            pass
    except OSError as exc:
        raise UsageError(f"backend.address: no Ray head answers at {address!r} ({exc.strerror or exc})") from None


def has_gpus() -> bool:
    """Whether the connected cluster declares any GPU (actors then take one each)."""
    return int(ray.cluster_resources().get("GPU", 0)) > 0


def wait_for_gpus(workers: int, wait_s: float, field: str = "backend.gpu_wait_s") -> bool:
    """Whether the run's actors get GPUs, waiting up to ``wait_s`` for ``workers`` of them to join.

    With ``wait_s`` 0 the cluster is taken as it is (GPUs where it declares any). Otherwise the autoscaler is
    asked for ``workers`` one-GPU bundles and the cluster's GPU count is polled until it reaches ``workers``:
    a run configured for GPUs never falls back to CPU actors because the GPU nodes were still starting.

    Raises:
        UsageError: the wait ended with fewer GPUs than ``workers``.
    """
    if wait_s <= 0:
        return has_gpus()
    deadline = time.monotonic() + wait_s
    gpus = int(ray.cluster_resources().get("GPU", 0))
    if gpus < workers:
        try:
            from ray.autoscaler.sdk import request_resources

            request_resources(bundles=[{"GPU": 1}] * workers)
        except Exception:  # noqa: BLE001 - no autoscaler (a fixed cluster): waiting is all there is
            log.debug("no autoscaler to ask for GPUs", exc_info=True)
        log.info("waiting up to %.0f s for %d GPUs (the cluster has %d)", wait_s, workers, gpus)
    while gpus < workers and time.monotonic() < deadline:
        time.sleep(min(5.0, max(0.0, deadline - time.monotonic())))
        gpus = int(ray.cluster_resources().get("GPU", 0))
    if gpus < workers:
        raise UsageError(f"{field}: waited {wait_s:g} s for {workers} GPUs but the Ray cluster has {gpus}")
    return True


def node_cpus(node_id: str) -> int:
    """CPUs the Ray node ``node_id`` declares (its share of a machine or pod, not the host's core count)."""
    for node in ray.nodes():
        if node.get("NodeID") == node_id and node.get("Alive", True):
            return max(1, int(node.get("Resources", {}).get("CPU", 1)))
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))


def worker_device(use_gpu: bool, workers: int, address: str | None) -> tuple[int, bool]:
    """``(bytes, native bf16)`` of one worker's device, before any worker exists.

    A GPU's total memory, read by a one-GPU probe task; a CPU worker's share of its node's memory (the node's
    physical memory over the workers it packs, at most one per CPU), read in this process for a local Ray and
    by a probe task on a cluster.
    """
    from orchestrator.engine.device import device_memory_bytes, native_bf16

    if not use_gpu and not address:
        return device_memory_bytes("cpu", sharers=min(workers, node_cpus(ray.get_runtime_context().get_node_id()))), \
            native_bf16("cpu")

    @ray.remote(num_gpus=1 if use_gpu else 0, num_cpus=0 if use_gpu else 1, max_retries=0)
    def probe() -> tuple[int, bool, str]:
        device = "cuda" if use_gpu else "cpu"
        return device_memory_bytes(device), native_bf16(device), ray.get_runtime_context().get_node_id()

    total, native, node = ray.get(probe.remote())
    return (total if use_gpu else total // min(workers, node_cpus(node))), native
