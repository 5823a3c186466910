"""A group of :class:`~actors.worker.PruneWorker` actors in one placement group, joined
into one ``torch.distributed`` process group through ``deepspeed.init_distributed``.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from actors.worker import PruneWorker
from orchestrator.errors import UsageError

log = logging.getLogger(__name__)

STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")


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


class WorkerGroup:
    """``workers`` actors, one per placement-group bundle, forming one distributed group.

    Args:
        workers: number of ranks.
        address: Ray address to connect to (None: local Ray unless already initialised).
        strategy: placement strategy (``PACK`` default, ``STRICT_SPREAD`` for one per node).
        num_threads: torch threads per actor (0: CPUs of the node // workers, at least 1).
        shutdown_timeout: seconds to wait for a graceful shutdown before ``ray.kill``.
        collective_timeout: seconds after which a collective whose peer stopped participating fails.
    """

    def __init__(self, workers: int, address: str | None = None, strategy: str = "PACK",
                 num_threads: int = 0, shutdown_timeout: float = 30.0, collective_timeout: float = 1800.0) -> None:
        if strategy not in STRATEGIES:
            raise UsageError(f"placement strategy {strategy!r}: expected one of {', '.join(STRATEGIES)}")
        ensure_ray(address)
        self.workers = workers
        self.shutdown_timeout = shutdown_timeout
        self.collective_timeout = collective_timeout
        self.use_gpu = check_capacity(workers)
        bundle = {"GPU": 1, "CPU": 1} if self.use_gpu else {"CPU": 1}
        self.pg = placement_group([dict(bundle) for _ in range(workers)], strategy=strategy)
        try:
            ray.get(self.pg.ready(), timeout=120)
        except Exception:
            remove_placement_group(self.pg)
            raise UsageError(f"backend.workers: {workers} workers cannot be placed with strategy {strategy}") from None
        threads = num_threads or max(1, (os.cpu_count() or 1) // workers)
        env = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
        if not self.use_gpu:
            env["DS_ACCELERATOR"] = "cpu"
        actor_cls = ray.remote(PruneWorker)
        self.actors = [
            actor_cls.options(
                num_cpus=1, num_gpus=1 if self.use_gpu else 0,
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    placement_group=self.pg, placement_group_bundle_index=i),
                runtime_env={"env_vars": env},
            ).remote(threads)
            for i in range(workers)
        ]
        try:
            self._join()
        except BaseException:
            self.shutdown()
            raise

    def _join(self) -> None:
        ips = ray.get([a.node_ip.remote() for a in self.actors])
        master, port = ray.get(self.actors[0].address.remote())
        local = [ips[:r].count(ips[r]) for r in range(self.workers)]
        backend = "nccl" if self.use_gpu else "gloo"
        ray.get([a.join.remote(r, self.workers, local[r], master, port, backend, self.collective_timeout)
                 for r, a in enumerate(self.actors)])
        log.info("worker group: %d ranks joined %s at %s:%d", self.workers, backend, master, port)

    def call(self, method: str, *args: Any, **kwargs: Any) -> list:
        """Call ``method`` on every actor at once (collective) and wait for all results."""
        return ray.get(self.call_async(method, *args, **kwargs))

    def call_async(self, method: str, *args: Any, **kwargs: Any) -> list:
        """Start ``method`` on every actor; returns the object refs in rank order."""
        return [getattr(a, method).remote(*args, **kwargs) for a in self.actors]

    def shutdown(self) -> None:
        """Leave the process group gracefully, kill the actors after a timeout, free the placement group."""
        stop_actors(getattr(self, "actors", []), getattr(self, "pg", None), self.shutdown_timeout, "worker group")
        self.actors, self.pg = [], None

    def __enter__(self) -> WorkerGroup:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()


def stop_actors(actors: list, pg: Any, timeout: float, what: str) -> None:
    """Ask ``actors`` to ``leave()`` their process group, wait up to ``timeout`` s, kill them all, free ``pg``."""
    refs = [a.leave.remote() for a in actors]
    if refs:
        _, pending = ray.wait(refs, num_returns=len(refs), timeout=timeout)
        if pending:
            log.warning("%s: %d actors did not shut down in %.0fs", what, len(pending), timeout)
    for a in actors:
        ray.kill(a)
    if pg is not None:
        remove_placement_group(pg)
