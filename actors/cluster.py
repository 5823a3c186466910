"""The Ray cluster a run uses: connect (or start a local Ray), fail fast on a bad address, check capacity."""

from __future__ import annotations

import logging

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
