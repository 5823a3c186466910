"""Data-parallel LoRA recovery after structured pruning, on a group of Ray actors.

Two ways to spread it (``structured.recovery.zero3``):

* replicated (the default): every rank holds the whole pruned model, as below;
* ZeRO-3: the pruned model's parameters and the adapters are partitioned across the ranks by a
  DeepSpeed ZeRO-3 engine (:meth:`RecoveryWorker.train_zero3`), for a shrunk model that does not fit
  one accelerator; each rank holds ``1/N`` of the weights, gathered block by block for the forward
  and backward. The windows, dropout seeds, loss scaling, clipping and learning-rate schedule are
  those of :func:`orchestrator.structured.recovery.train`, so the merged weights are the
  single-process ones (to the order of the gradient sums).

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
import time
from typing import Any

import ray
import torch
from torch import nn
from tqdm.auto import tqdm

from actors.group import ActorGroup, GroupMember, GroupSpec
from orchestrator.inputs.config import StructuredRecoveryConfig
from orchestrator.structured.distill import DistillTargets

log = logging.getLogger(__name__)


class RecoveryWorker(GroupMember):
    """One rank of the data-parallel recovery (run by an :class:`~actors.group.ActorGroup`)."""

    def train(self, model: nn.Module, windows: torch.Tensor, r: StructuredRecoveryConfig,
              teacher: DistillTargets | None = None) -> Any:
        """Train this rank's share on its device (collective); rank 0 returns ``(adapters, report)`` on the CPU."""
        import torch.distributed as dist

        from orchestrator.engine.device import to_cpu
        from orchestrator.structured.recovery import train

        def all_reduce(t: torch.Tensor) -> None:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)

        _, adapters, report = train(model.to(self.device), windows.to(self.device), r, self.rank, self.world,
                                    all_reduce, teacher=teacher)
        return to_cpu((adapters, report)) if self.rank == 0 else None

    def train_zero3(self, model: nn.Module, windows: torch.Tensor, r: StructuredRecoveryConfig,
                    teacher: DistillTargets | None = None) -> Any:
        """Train the adapters with the model partitioned by ZeRO-3 (collective).

        Returns:
            Rank 0: ``(adapters, report)`` as :meth:`train` (the adapters gathered whole, on the CPU; the
            report's ``memory`` holds this rank's partition bytes); the other ranks: ``{"memory": ...}``.
        """
        from orchestrator.engine.device import to_cpu

        adapters, report = _zero3_train(model, windows.to(self.device), r, self.rank, self.world, self.device,
                                        teacher)
        return to_cpu((adapters, report)) if self.rank == 0 else {"memory": report["memory"]}


def zero3_recovery_config(world: int, micro_steps: int) -> dict[str, Any]:
    """DeepSpeed config of the ZeRO-3 recovery engine: one window per micro-step, clipping at 1.

    ``micro_steps`` windows per rank make one optimiser step (DeepSpeed steps at the boundary).
    """
    from actors.loading import ds_config

    cfg = ds_config(world)
    cfg.update({"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": micro_steps,
                "train_batch_size": micro_steps * world, "gradient_clipping": 1.0})
    return cfg


def _zero3_train(model: nn.Module, windows: torch.Tensor, r: StructuredRecoveryConfig, rank: int, world: int,
                 device: torch.device, teacher: DistillTargets | None = None) -> tuple[list, dict]:
    """:func:`orchestrator.structured.recovery.train`'s joint schedule on a ZeRO-3 engine (collective).

    Each optimiser step takes ``batch_size`` windows; rank ``k`` runs the windows at batch positions
    ``k, k + N, ...`` and, where it has fewer than the others, a window whose loss is multiplied by 0, so
    every rank runs ``ceil(B / N)`` micro-steps. DeepSpeed divides by the micro-steps and averages over
    the ranks; each loss is scaled by ``N * micro_steps / B`` first, so the step's gradient is the batch
    mean, as in one process.
    """
    import deepspeed
    import torch.distributed as dist
    from peft import get_peft_model, get_peft_model_state_dict

    from actors.zero3 import partition_bytes
    from orchestrator.engine.blocks import decoder_blocks
    from orchestrator.engine.device import Placement
    from orchestrator.structured.recovery import (
        dropout_seed,
        init_adapters,
        lora_config,
        lr_factor,
        phases,
        step_batches,
        window_loss,
    )

    if (r.loss == "kd") != (teacher is not None):
        raise ValueError(f"train_zero3: structured.recovery.loss={r.loss!r} "
                         f"{'needs' if teacher is None else 'takes no'} distillation targets")
    (groups, steps), = phases(len(decoder_blocks(model)), r)  # joint: one phase (the config refuses sequential)
    blocks = [b for g in groups for b in g]
    batches = step_batches(windows.shape[0], steps, r.batch_size, r.seed)  # (T, B)
    micro = -(-r.batch_size // world)
    scale = world * micro / r.batch_size
    place = Placement.of(device, r.forward_dtype)
    t0 = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        peft_model = get_peft_model(model, lora_config(model, blocks, r))
        init_adapters(peft_model, r.seed)  # the same initial adapters on every rank, before partitioning
        params = [p for p in peft_model.parameters() if p.requires_grad]
        engine, *_ = deepspeed.initialize(model=peft_model, optimizer=torch.optim.AdamW(params, lr=r.lr),
                                          config=zero3_recovery_config(world, micro))
        engine.train()
        state_bytes = partition_bytes(engine.module)
        losses = []
        for step in tqdm(range(steps), desc=f"LoRA ZeRO-3 rank {rank}", disable=rank != 0):
            batch = batches[step]  # (B,)
            for g in engine.optimizer.param_groups:
                g["lr"] = r.lr * lr_factor(step, steps, r.warmup)
            loss_sum = torch.zeros((), device=device)
            for j in range(micro):
                pos = rank + j * world
                real = pos < batch.numel()
                torch.manual_seed(dropout_seed(r.seed, step, pos if real else 0))
                with place.autocast():
                    loss = window_loss(engine, windows, int(batch[pos if real else 0]), teacher)
                engine.backward(loss * (scale if real else 0.0))
                engine.step()  # applies the update at the last micro-step only
                if real:
                    loss_sum += loss.detach().float()
            dist.all_reduce(loss_sum, op=dist.ReduceOp.SUM)
            losses.append(float(loss_sum) / batch.numel())
        lora = [p for p in engine.module.parameters() if p.requires_grad]
        with deepspeed.zero.GatheredParameters(lora):
            state = {k: v.detach().cpu().clone() for k, v in get_peft_model_state_dict(engine.module).items()
                     if v.numel()} if rank == 0 else {}
    seconds = time.perf_counter() - t0
    memory = {"rank": rank, "model_state_bytes": state_bytes}
    report = {"schedule": r.schedule, "phases": [{"blocks": [[g[0], g[-1]] for g in groups], "steps": steps,
                                                  "loss_first": losses[0], "loss_last": losses[-1],
                                                  "losses": losses}],
              "steps": steps, "batch_size": r.batch_size, "seq_len": int(windows.shape[1]),
              "windows": int(windows.shape[0]), "lr": r.lr, "loss": r.loss,
              "tokens": steps * r.batch_size * int(windows.shape[1]),
              "workers": world, "zero3": True, "seconds": seconds, "memory": memory}
    engine.destroy()
    return [(blocks, state)], report


def recovery_spec(r: StructuredRecoveryConfig, address: str | None = None, num_threads: int = 0,
                  use_gpu: bool = False) -> GroupSpec:
    """The recovery group: ``r.workers`` ranks joined over NCCL (GPUs) or gloo (CPUs)."""
    return GroupSpec(r.workers, use_gpu=use_gpu, backend="nccl" if use_gpu else "gloo",
                     field="structured.recovery.workers", address=address, num_threads=num_threads,
                     deepspeed=r.zero3)


def recover_distributed(model: nn.Module, windows: torch.Tensor, r: StructuredRecoveryConfig,
                        spec: GroupSpec, teacher: DistillTargets | None = None) -> tuple[nn.Module, dict]:
    """Data-parallel LoRA recovery on the actors of ``spec``; adapters merged into ``model``.

    Args:
        model: the pruned model (the merged model is returned; the driver's copy is not trained).
        windows: ``(M, S)`` int64 training windows.
        r: recovery options.
        spec: the recovery group (:func:`recovery_spec`).
        teacher: distillation targets (``r.loss: kd``), shipped to every rank.

    Returns:
        ``(model, report)`` as :func:`orchestrator.structured.recovery.recover`.
    """
    from orchestrator.structured.recovery import apply_adapters

    with ActorGroup(RecoveryWorker, spec) as group:
        model_ref, windows_ref = ray.put(model), ray.put(windows)
        answers = group.execute("train_zero3" if r.zero3 else "train", model_ref, windows_ref, r,
                                None if teacher is None else ray.put(teacher))
    adapters, report = answers[0]
    if r.zero3:
        report["memory"] = [report["memory"], *(a["memory"] for a in answers[1:])]
    return apply_adapters(model, adapters, r), report
