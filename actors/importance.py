"""SAAP's group importance on the distributed engine.

The pruning workers run the ZeRO-3 gradient pass with ``grad_sum`` (and ``grad_sq`` for ``element2``)
one mini-batch of calibration sequences at a time; after each mini-batch every rank sums, for every
group of every scored tensor, the estimators' element terms over the elements its partitions hold
(:func:`orchestrator.structured.importance.partition_group_sums`: a group's elements span several
ranks' partitions), and one all-reduce adds the ranks' sums. The coordinator gets the per-tensor group
scores of every mini-batch and of all sequences, and fuses, allocates and shrinks
(:func:`orchestrator.structured.run.importance_from`) exactly as the single-process path does. No rank
ever holds a whole statistic or a whole weight.
"""

from __future__ import annotations

import logging

import torch
from tqdm.auto import tqdm

from actors.distributed import SCORER, load_workers, prune_spec, start_workers
from actors.gradient_pass import gradient_spec
from actors.group import ActorGroup, GroupSpec
from actors.sharding import shard_bounds
from actors.zero3 import ScoredTensor
from orchestrator.inputs.config import RunConfig
from orchestrator.structured.groups import ModuleGroups
from orchestrator.structured.run import SliceScores, minibatch_bounds, scored_slices, statistic_kinds

log = logging.getLogger(__name__)


def scored_tensors(mods: list[ModuleGroups], shapes: dict[str, tuple[int, int]]) -> list[ScoredTensor]:
    """Every module's scored tensors in module order (the layout of the ranks' answers)."""
    return [ScoredTensor(m.key, sl.name, shapes[sl.name], sl.dim, sl.width, sl.offset, m.num_groups)
            for m in mods for sl in scored_slices(m, set(shapes))]


def _to_slice_scores(mods: list[ModuleGroups], table: list[ScoredTensor], estimators: list[str],
                     answer: list[torch.Tensor]) -> SliceScores:
    """The ranks' concatenated answer as module key -> estimator -> per-tensor ``(G,)`` scores."""
    out: SliceScores = {m.key: {e: [] for e in estimators} for m in mods}
    for est, flat in zip(estimators, answer, strict=True):
        i = 0
        for t in table:
            out[t.module][est].append(flat[i : i + t.groups])
            i += t.groups
    return out


def run_ray_importance(cfg: RunConfig, model_path: str, calib_ids: torch.Tensor, mods: list[ModuleGroups],
                       shapes: dict[str, tuple[int, int]], spec: GroupSpec | None = None, progress: bool = False,
                       group: ActorGroup | None = None) -> tuple[list[SliceScores], SliceScores, list[dict]]:
    """SAAP's per-tensor group scores of every mini-batch and of all sequences, from ZeRO-3 workers.

    Args:
        cfg: the run config (``structured``, ``model``, ``backend``).
        model_path: the materialised model directory.
        calib_ids: ``(N, L)`` calibration windows in global order.
        mods: the model's modules (from the coordinator's copy of the model).
        shapes: full name -> ``(out, in)`` of every pruned linear weight.
        spec: the pruning workers' group to start (default :func:`~actors.distributed.prune_spec` on CPUs).
        progress: show a progress bar.
        group: a live group to use instead (kept running).

    Returns:
        ``(per mini-batch scores, scores of all sequences, memory per worker)``.
    """
    s = cfg.structured
    n = int(calib_ids.shape[0])
    table = scored_tensors(mods, shapes)
    own = group is None
    group = group or start_workers(spec or prune_spec(cfg))
    try:
        load_workers(group, cfg, model_path, calib_ids)
        # fp32 forwards, as the single-process importance pass
        gspec = gradient_spec(cfg, model_path, group, kinds=statistic_kinds(s), scale=s.grad_scale, dtype="float32")
        group.get([a.start_gradients.remote(gspec) for a in group.actors])
        shards = shard_bounds(n, group.workers)
        batches = []
        for lo, hi in tqdm(minibatch_bounds(n, s), desc=f"structured importance (ray x{group.workers})",
                           disable=not progress):
            steps = max(max(0, min(hi, b) - max(lo, a)) for a, b in shards)  # every rank runs as many backwards
            group.execute("gradient_range", lo, hi, steps, gspec.batch)
            answer = group.execute("group_scores", table, list(s.estimators), True)[SCORER]
            batches.append(_to_slice_scores(mods, table, list(s.estimators), answer))
        total = _to_slice_scores(mods, table, list(s.estimators),
                                 group.execute("group_scores", table, list(s.estimators), False)[SCORER])
        group.execute("end_gradients")
        memory = group.execute("memory")
        group.execute("finish")
    finally:
        if own:
            group.shutdown()
    return batches, total, memory
