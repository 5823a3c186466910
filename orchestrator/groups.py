"""Which actor groups a run starts, on which resources, joined how: the coordinator's choice.

The pruning workers (ZeRO-3 through DeepSpeed), the evaluation actors (no process group) and the
structured-recovery actors are one :class:`actors.group.ActorGroup` each; this module builds
their :class:`actors.group.GroupSpec` from the run config and the cluster: one GPU per actor and
NCCL where the cluster has GPUs, one CPU per actor and gloo otherwise. Ray and the actors load
only when a group is asked for.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import os
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from orchestrator.inputs.config import RunConfig, StructuredRecoveryConfig


@contextlib.contextmanager
def named_placement(prefix: str) -> Iterator[None]:
    """Name every placement group this process creates meanwhile ``<prefix><random>``.

    A supervisor that runs jobs as Ray tasks (the job service) uses it to find and free the
    placement groups of a job it had to kill: they belong to the Ray job, not to the killed task.
    """
    from actors.group import PLACEMENT_PREFIX_ENV

    previous = os.environ.get(PLACEMENT_PREFIX_ENV)
    os.environ[PLACEMENT_PREFIX_ENV] = prefix
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(PLACEMENT_PREFIX_ENV, None)
        else:
            os.environ[PLACEMENT_PREFIX_ENV] = previous


def cluster_uses_gpus(cfg: RunConfig) -> bool:
    """Connect to the run's cluster (or start a local Ray); whether its actors get GPUs (waiting
    ``backend.gpu_wait_s`` for the pruning workers' GPUs to join an autoscaling cluster)."""
    from actors.cluster import ensure_ray, wait_for_gpus

    ensure_ray(cfg.backend.address)
    return wait_for_gpus(cfg.backend.workers, cfg.backend.gpu_wait_s)


def check_prune_capacity(cfg: RunConfig) -> bool:
    """Fail now (one ``backend.*`` line) when the cluster cannot hold the pruning workers; whether they get GPUs."""
    from actors.cluster import check_capacity

    cluster_uses_gpus(cfg)
    return check_capacity(cfg.backend.workers)


def check_prune_plan(cfg: RunConfig, use_gpu: bool) -> None:
    """Refuse a run whose plan does not fit its workers' devices, before anything is loaded (``backend.plan_check``).

    The model's config only is read (a hub id downloads its JSON files, ``tiny`` is not built); one worker's
    device memory comes from the cluster (:func:`actors.cluster.worker_device`).

    Raises:
        UsageError: the plan's device need per worker exceeds the device (one line with the plan's numbers).
    """
    import logging

    from actors.cluster import worker_device
    from orchestrator.errors import UsageError
    from orchestrator.inputs.models import config_only
    from orchestrator.plan_fit import verdict
    from orchestrator.planner import choose_checkpointing, plan, run_plan_kwargs

    if not cfg.backend.plan_check:
        return
    budget, native = worker_device(use_gpu, cfg.backend.workers, cfg.backend.address)
    kw = run_plan_kwargs(cfg, native_bf16=native)
    model_config = config_only(cfg.model)
    try:
        p = plan(model_config, checkpoint=choose_checkpointing(cfg, model_config, kw["workers"], budget),
                 host_collectives=not use_gpu, **kw)
    except ValueError as exc:  # not a LLaMA-like config: nothing to check against
        logging.getLogger(__name__).info("no memory plan for this model (%s): not checked", exc)
        return
    refusal = verdict(p, budget, use_gpu, "GPU" if use_gpu else "share of host memory")
    if refusal:
        raise UsageError(f"backend.workers: {cfg.backend.workers} workers: {refusal}; backend.plan_check=false "
                         "runs it anyway")


def prune_spec(cfg: RunConfig) -> Any:
    """The pruning workers' group: ``backend.workers`` ZeRO-3 ranks, NCCL on GPUs, gloo on CPUs."""
    from actors.distributed import prune_spec as spec

    return spec(cfg, use_gpu=cluster_uses_gpus(cfg))


def eval_actors(cfg: RunConfig, progress: bool) -> Callable[[], Any] | None:
    """A factory of the ``eval.workers`` evaluation actors (None: evaluate in-process)."""
    if not cfg.eval_workers():
        return None

    def start() -> Any:
        from actors.evaluator import EvalGroup
        from actors.group import GroupSpec

        gpus = cluster_uses_gpus(cfg)
        if cfg.eval.shard:  # one model over all the actors: a process group, packed for its collectives
            from actors.sharded_eval import ShardedEvalGroup

            spec = GroupSpec(cfg.eval_workers(), use_gpu=gpus, backend="nccl" if gpus else "gloo", deepspeed=True,
                             field="eval.workers", address=cfg.backend.address, strategy="PACK",
                             collective_timeout_s=cfg.backend.collective_timeout_s,
                             placement_wait_s=cfg.backend.capacity_wait_s)
            return ShardedEvalGroup(spec, cfg.model, progress)
        return EvalGroup(eval_spec(cfg), cfg.model, progress)

    return start


def eval_spec(cfg: RunConfig, workers: int | None = None) -> Any:
    """The group of plain (unsharded) evaluation actors: ``eval.workers`` of them unless ``workers`` says."""
    from actors.group import GroupSpec

    return GroupSpec(workers or cfg.eval_workers(), use_gpu=cluster_uses_gpus(cfg), backend=None, field="eval.workers",
                     address=cfg.backend.address, strategy="SPREAD", placement_wait_s=cfg.backend.capacity_wait_s)


def speed_on_actor(cfg: RunConfig, paths: dict[str, str], options: dict) -> dict:
    """Prefill/decode speed of checkpoints side by side on one evaluation actor (its GPU where there are GPUs)."""
    from actors.evaluator import remote_speed

    return remote_speed(eval_spec(cfg, workers=1), cfg.model, paths, options)


def distributed_recovery(cfg: RunConfig) -> Callable[[nn.Module, torch.Tensor, StructuredRecoveryConfig], Any]:
    """Data-parallel LoRA recovery on ``structured.recovery.workers`` actors (NCCL on GPUs, gloo on CPUs)."""

    def recover(model: nn.Module, windows: torch.Tensor, r: StructuredRecoveryConfig, teacher: Any = None) -> Any:
        from actors.cluster import ensure_ray, has_gpus
        from actors.recovery import recover_distributed, recovery_spec

        address = cfg.backend.address if cfg.backend.kind == "ray" else None
        ensure_ray(address)
        gpus = cluster_uses_gpus(cfg) if cfg.backend.kind == "ray" else has_gpus()
        return recover_distributed(model, windows, r, recovery_spec(r, address, use_gpu=gpus), teacher)

    return recover


def sharded_importance(cfg: RunConfig, model_path: str, progress: bool, group: Any = None
                       ) -> Callable[..., Any] | None:
    """SAAP's importance on the ``backend.workers`` ZeRO-3 workers (``backend.kind: ray``; None: in-process).

    ``group``: a live pruning group to score on (kept running) instead of one started per call.
    """
    if cfg.backend.kind != "ray":
        return None

    def score(mods: list, shapes: dict, calib_ids: torch.Tensor, path: str | None = None) -> Any:
        from actors.importance import run_ray_importance

        if path is None:
            return run_ray_importance(cfg, model_path, calib_ids, mods, shapes, prune_spec(cfg), progress, group)
        here = copy.deepcopy(cfg)  # a checkpoint of the model as the coordinator holds it now
        here.model = dataclasses.replace(cfg.model, source=path, gguf_file=None, revision=None)
        return run_ray_importance(here, path, calib_ids, mods, shapes, prune_spec(here), progress, group)

    return score
