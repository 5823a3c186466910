"""Data-parallel LoRA recovery after structured pruning, on a group of Ray actors.

Every :class:`RecoveryWorker` holds the whole pruned model and its own LoRA adapters, takes
its share of every step's windows (:func:`orchestrator.structured.recovery.train`), and
sums the adapter gradients with the others over ``torch.distributed`` (gloo, rendezvous at
rank 0's node address and a free port, as every :class:`actors.group.ActorGroup` does), so all
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
from typing import Any

import ray
import torch
from torch import nn

from actors.group import ActorGroup, GroupMember, GroupSpec
from orchestrator.inputs.config import StructuredRecoveryConfig

log = logging.getLogger(__name__)


class RecoveryWorker(GroupMember):
    """One rank of the data-parallel recovery (run by an :class:`~actors.group.ActorGroup`)."""

    def train(self, model: nn.Module, windows: torch.Tensor, r: StructuredRecoveryConfig) -> Any:
        """Train this rank's share on its device (collective); rank 0 returns ``(adapters, report)`` on the CPU."""
        import torch.distributed as dist

        from orchestrator.engine.device import to_cpu
        from orchestrator.structured.recovery import train

        def all_reduce(t: torch.Tensor) -> None:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)

        _, adapters, report = train(model.to(self.device), windows.to(self.device), r, self.rank, self.world,
                                    all_reduce)
        return to_cpu((adapters, report)) if self.rank == 0 else None


def recovery_spec(r: StructuredRecoveryConfig, address: str | None = None, num_threads: int = 0,
                  use_gpu: bool = False) -> GroupSpec:
    """The recovery group: ``r.workers`` ranks joined over NCCL (GPUs) or gloo (CPUs)."""
    return GroupSpec(r.workers, use_gpu=use_gpu, backend="nccl" if use_gpu else "gloo",
                     field="structured.recovery.workers", address=address, num_threads=num_threads)


def recover_distributed(model: nn.Module, windows: torch.Tensor, r: StructuredRecoveryConfig,
                        spec: GroupSpec) -> tuple[nn.Module, dict]:
    """Data-parallel LoRA recovery on the actors of ``spec``; adapters merged into ``model``.

    Args:
        model: the pruned model (the merged model is returned; the driver's copy is not trained).
        windows: ``(M, S)`` int64 training windows.
        r: recovery options.
        spec: the recovery group (:func:`recovery_spec`).

    Returns:
        ``(model, report)`` as :func:`orchestrator.structured.recovery.recover`.
    """
    from orchestrator.structured.recovery import apply_adapters

    with ActorGroup(RecoveryWorker, spec) as group:
        model_ref, windows_ref = ray.put(model), ray.put(windows)
        adapters, report = group.execute("train", model_ref, windows_ref, r)[0]
    return apply_adapters(model, adapters, r), report
