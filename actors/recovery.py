"""Data-parallel LoRA recovery after structured pruning, on a group of Ray actors.

Every :class:`RecoveryWorker` holds the whole pruned model and its own LoRA adapters, takes
its share of every step's windows (:func:`orchestrator.structured.recovery.train`), and
sums the adapter gradients with the others over ``torch.distributed`` (gloo, rendezvous at
rank 0's node address and a free port, as :class:`actors.group.WorkerGroup` does), so all
ranks take identical optimiser steps. Rank 0 hands back only the adapter weights; the driver
merges them into its own copy of the model (:func:`~orchestrator.structured.recovery.apply_adapters`).

The result equals the single-process recovery: bitwise when the process and the actors use the
same number of torch threads (SmolLM2-135M, bf16 forwards, 2 actors x 1 thread vs 1 process x 1
thread: identical merged weights), otherwise up to the rounding of the CPU bf16 kernels, whose
blocking depends on the thread count (Adam's first steps amplify that to a few percent of the
update on near-zero gradients; fp32 forwards agree to ~1e-6).
"""

from __future__ import annotations

import logging
import os
from datetime import timedelta
from typing import Any

import ray
import torch
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
from torch import nn

from actors.group import ensure_ray, stop_actors
from actors.worker import _free_port
from orchestrator.config import StructuredRecoveryConfig
from orchestrator.errors import UsageError

log = logging.getLogger(__name__)


class RecoveryWorker:
    """One rank of the data-parallel recovery (wrapped with ``ray.remote`` by the group)."""

    def __init__(self, num_threads: int = 1) -> None:
        torch.set_num_threads(max(1, num_threads))
        self.rank, self.world = -1, 0

    def address(self) -> tuple[str, int]:
        """This node's IP and a free port on it (rank 0's rendezvous)."""
        return ray.util.get_node_ip_address(), _free_port()

    def join(self, rank: int, world: int, master: str, port: int, timeout_s: float = 1800.0) -> int:
        """Join the gloo process group; returns the rank."""
        import torch.distributed as dist

        dist.init_process_group("gloo", init_method=f"tcp://{master}:{port}", rank=rank, world_size=world,
                                timeout=timedelta(seconds=timeout_s))
        self.rank, self.world = rank, world
        return rank

    def train(self, model: nn.Module, windows: torch.Tensor, r: StructuredRecoveryConfig) -> Any:
        """Train this rank's share (collective); rank 0 returns ``(adapters, report)``, the others None."""
        import torch.distributed as dist

        from orchestrator.structured.recovery import train

        def all_reduce(t: torch.Tensor) -> None:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)

        _, adapters, report = train(model, windows, r, self.rank, self.world, all_reduce)
        return (adapters, report) if self.rank == 0 else None

    def leave(self) -> None:
        """Destroy the process group."""
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


class RecoveryGroup:
    """``workers`` recovery actors, one per placement-group bundle (one CPU each), joined over gloo.

    Args:
        workers: number of ranks (at least 2).
        address: Ray address (None: local Ray unless already initialised).
        num_threads: torch threads per actor (0: CPUs of this machine // workers, at least 1).
        strategy: placement strategy.
    """

    def __init__(self, workers: int, address: str | None = None, num_threads: int = 0,
                 strategy: str = "PACK") -> None:
        ensure_ray(address)
        cpus = int(ray.cluster_resources().get("CPU", 0))
        if workers > cpus:
            raise UsageError(f"structured.recovery.workers: {workers} workers need {workers} CPUs but the Ray "
                             f"cluster has {cpus} ({workers})")
        self.actors: list = []
        self.pg = placement_group([{"CPU": 1} for _ in range(workers)], strategy=strategy)
        try:
            ray.get(self.pg.ready(), timeout=120)
        except Exception:
            remove_placement_group(self.pg)
            raise UsageError(f"structured.recovery.workers: {workers} workers cannot be placed ({workers})") from None
        threads = num_threads or max(1, (os.cpu_count() or 1) // workers)
        env = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
        cls = ray.remote(RecoveryWorker)
        self.actors = [
            cls.options(num_cpus=1, runtime_env={"env_vars": env},
                        scheduling_strategy=PlacementGroupSchedulingStrategy(
                            placement_group=self.pg, placement_group_bundle_index=i)).remote(threads)
            for i in range(workers)
        ]
        try:
            master, port = ray.get(self.actors[0].address.remote())
            ray.get([a.join.remote(i, workers, master, port) for i, a in enumerate(self.actors)])
        except BaseException:
            self.shutdown()
            raise
        log.info("recovery group: %d ranks joined gloo at %s:%d", workers, master, port)

    def shutdown(self) -> None:
        """Leave the process group, kill the actors, free the placement group."""
        stop_actors(self.actors, self.pg, 30.0, "recovery group")
        self.actors, self.pg = [], None

    def __enter__(self) -> RecoveryGroup:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()


def recover_distributed(model: nn.Module, windows: torch.Tensor, r: StructuredRecoveryConfig,
                        address: str | None = None, num_threads: int = 0) -> tuple[nn.Module, dict]:
    """Data-parallel LoRA recovery on ``r.workers`` Ray actors; adapters merged into ``model``.

    Args:
        model: the pruned model (the merged model is returned; the driver's copy is not trained).
        windows: ``(M, S)`` int64 training windows.
        r: recovery options.
        address: Ray address (None: local Ray unless already initialised).
        num_threads: torch threads per actor (0: automatic).

    Returns:
        ``(model, report)`` as :func:`orchestrator.structured.recovery.recover`.
    """
    from orchestrator.structured.recovery import apply_adapters

    with RecoveryGroup(r.workers, address, num_threads) as group:
        model_ref, windows_ref = ray.put(model), ray.put(windows)
        results = ray.get([a.train.remote(model_ref, windows_ref, r) for a in group.actors])
    adapters, report = results[0]
    return apply_adapters(model, adapters, r), report
