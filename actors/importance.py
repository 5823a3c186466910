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
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from actors.distributed import SCORER, gradient_spec, load_workers, prune_spec, shard_bounds, start_workers
from actors.group import ActorGroup, GroupSpec
from orchestrator.inputs.config import RunConfig
from orchestrator.structured.groups import ModuleGroups
from orchestrator.structured.run import SliceScores, minibatch_bounds, scored_slices, statistic_kinds

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ScoredTensor:
    """One grouped weight tensor as the ranks score it.

    Attributes:
        name: full parameter name.
        shape: ``(rows, cols)`` of the whole weight.
        dim: group axis.
        width: entries per group along ``dim``.
        offset: start of the module's segment along ``dim``.
        groups: ``G``, the module's groups.
    """

    name: str
    shape: tuple[int, int]
    dim: int
    width: int
    offset: int
    groups: int


def scored_tensors(mods: list[ModuleGroups], shapes: dict[str, tuple[int, int]]) -> list[ScoredTensor]:
    """Every module's scored tensors in module order (the layout of the ranks' answers)."""
    return [ScoredTensor(sl.name, shapes[sl.name], sl.dim, sl.width, sl.offset, m.num_groups)
            for m in mods for sl in scored_slices(m, set(shapes))]


def rank_group_sums(params: dict[str, torch.nn.Parameter], stats: dict[str, dict[str, torch.Tensor]],
                    table: list[ScoredTensor], estimators: list[str], device: torch.device) -> list[torch.Tensor]:
    """Group scores of every tensor of ``table`` for each estimator, added over the ranks (collective).

    Args:
        params: the ZeRO-3 parameters by full name (their ``ds_tensor`` is this rank's partition).
        stats: name -> kind -> this rank's statistic partition (``sum``, maybe ``sq``).
        table: what to score, the same on every rank.
        estimators: SAAP's estimators.
        device: the rank's device (the all-reduce's tensor lives there).

    Returns:
        Per estimator (in order), the concatenation of every tensor's ``(G,)`` scores (fp32, on the CPU).
    """
    import torch.distributed as dist

    from orchestrator.structured.importance import finish_group_scores, partition_group_sums

    rank = dist.get_rank()
    parts = []
    for est in estimators:
        for t in table:
            part = params[t.name].ds_tensor  # (ceil(numel / W),)
            by_kind = stats[t.name]
            sq = by_kind.get("sq")
            parts.append(partition_group_sums(
                part.to(device), by_kind["sum"].to(device), None if sq is None else sq.to(device), est,
                rank * part.numel(), t.shape, t.dim, t.width, t.offset, t.groups))
    flat = torch.cat(parts)  # float64, one collective for everything
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    out, i = [], 0
    per_est = sum(t.groups for t in table)
    for est in estimators:
        out.append(finish_group_scores(flat[i : i + per_est], est).cpu())
        i += per_est
    return out


def _to_slice_scores(mods: list[ModuleGroups], table: list[ScoredTensor], estimators: list[str],
                     answer: list[torch.Tensor]) -> SliceScores:
    """The ranks' concatenated answer as module key -> estimator -> per-tensor ``(G,)`` scores."""
    out: SliceScores = {m.key: {e: [] for e in estimators} for m in mods}
    owners = [m for m in mods for _ in scored_slices(m, {t.name for t in table})]
    for est, flat in zip(estimators, answer, strict=True):
        i = 0
        for mod, t in zip(owners, table, strict=True):
            out[mod.key][est].append(flat[i : i + t.groups])
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
        gspec = gradient_spec(cfg, model_path, group, kinds=statistic_kinds(s), scale=s.grad_scale)
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
