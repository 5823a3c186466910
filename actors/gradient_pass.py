"""The distributed gradient pass: per-sequence gradient statistics on every ZeRO-3 rank, checkpointed.

The driver decides the pass (:class:`GradientPassSpec`: statistics, scale, dtype, activation
checkpointing, the windows it uses) and sequences it in chunks; every rank runs the same number of
forward/backward steps and keeps its partition of each statistic (:class:`actors.zero3.ShardedGradStats`).
With a :class:`~actors.checkpoint.CheckpointStore`, every rank writes its partitions and the driver commits
them together.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from tqdm.auto import tqdm

from actors.checkpoint import CheckpointStore
from actors.faults import Faults
from actors.group import ActorGroup
from actors.sharding import shard_bounds
from orchestrator.inputs.config import RunConfig
from orchestrator.pruning.methods import gradient_kinds, gradient_sampling

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GradientPassSpec:
    """How every worker runs the gradient pass (decided here, on the driver).

    Attributes:
        kinds: statistics kept (``abs``, ``sq``, ``sum``).
        scale: factor on each per-sequence gradient (GBLM: 100).
        batch: sequences per forward/backward (per-sample gradients: the sums do not depend on it).
        dtype: autocast dtype of the forwards and backwards (statistics stay fp32).
        checkpoint: recompute each block's activations in the backward.
        offload: keep the statistic partitions in host memory.
        rows: global positions of the windows the pass uses (``gblm.grad_samples``; None: all).
    """

    kinds: tuple[str, ...]
    scale: float
    batch: int = 1
    dtype: str = "float32"
    checkpoint: bool = False
    offload: bool = False
    rows: tuple[int, ...] | None = None


def gradient_spec(cfg: RunConfig, model_path: str, group: ActorGroup, kinds: tuple[str, ...] | None = None,
                  scale: float | None = None, dtype: str | None = None, n: int = 0) -> GradientPassSpec:
    """The run's gradient pass; activation checkpointing is ``backend.activation_checkpointing``, or where it is
    null, the planner's answer for the group's smallest device memory. ``kinds``, ``scale`` and ``dtype``
    default to the pruning method's (GBLM's, over the ``n`` calibration windows ``gblm.grad_samples`` selects);
    structured pruning names its own."""
    from orchestrator.inputs.models import load_model_config
    from orchestrator.planner import choose_checkpointing

    pcfg, b = cfg.pruning, cfg.backend
    budget = min(d["memory_bytes"] for d in group.devices)
    on = choose_checkpointing(cfg, load_model_config(model_path, cfg.model), group.workers, budget)
    log.info("gradient pass: activation checkpointing %s (%s; %.1f GiB per worker)", "on" if on else "off",
             "planned" if b.activation_checkpointing is None else "backend.activation_checkpointing",
             budget / 2**30)
    rows = None
    if kinds is None:  # the pruning method's statistics, over the windows gblm.grad_samples selects
        kinds = gradient_kinds(pcfg.method, pcfg.gblm.norm)
        rows, method_scale = gradient_sampling(n, pcfg.gblm.grad_samples, pcfg.gblm.norm, pcfg.gblm.grad_scale)
        scale = method_scale if scale is None else scale
    if scale is None:
        scale = pcfg.gblm.grad_scale
    return GradientPassSpec(kinds, scale, b.grad_batch_size, dtype or pcfg.gblm.grad_dtype, on, b.offload_stats,
                            rows)


def gradient_pass(group: ActorGroup, n: int, spec: GradientPassSpec, progress: bool,
                  store: CheckpointStore | None = None, every: int = 8, faults: Faults | None = None,
                  interval_s: float = 0.0) -> None:
    """Per-sequence gradient statistics on every worker as ``spec`` says; each rank runs ``ceil(N/W)``
    sequences, ``spec.batch`` per forward/backward.

    With a ``store``, the partitions are saved every ``every`` sequences per rank and at the end, but only
    ``interval_s`` seconds after the pass started or last saved (a shorter pass is recomputed rather than
    saved: at most ``interval_s`` of its work is lost); a resumed pass starts after the last saved step.
    """
    import ray

    per_rank = rank_gradient_counts(n, group.workers, spec.rows)  # real sequences each rank runs
    steps, batch = max(per_rank), spec.batch
    resume = None
    first = 0
    if store is not None and store.grad_steps:
        files = store.grad_files(group.workers)
        resume = [files[r] for r in range(group.workers)]
        first = store.grad_steps
        log.info("gradient pass: resuming after %d of %d sequences per rank", first, steps)
    group.get([a.start_gradients.remote(spec, None if resume is None else resume[r])
               for r, a in enumerate(group.actors)])
    bar = tqdm(total=sum(per_rank), desc="gradient pass (ray)", disable=not progress, unit="seq")
    chunk = max(batch, (max(1, steps // 8) // batch) * batch)  # whole micro-batches per call
    if store is not None:
        chunk = min(chunk, max(batch, (every // batch) * batch))
    bar.update(_seqs_done(per_rank, first))
    since, saved_at = 0, time.perf_counter()
    for call, start in enumerate(range(first, steps, chunk)):
        if store is not None and store.grad_done:
            break
        if faults is not None and faults.take("kill_after_grad_chunks", call):
            ray.kill(group.actors[-1])
        if faults is not None and faults.lose_node is not None and faults.take("lose_node_after_grad_chunks", call):
            faults.lose_node(group)
        count = min(chunk, steps - start)
        group.execute("gradient_steps", start, count, batch)
        bar.update(_seqs_done(per_rank, start + count) - _seqs_done(per_rank, start))
        since += count
        end = start + count >= steps
        if store is not None and (since >= every or end) and time.perf_counter() - saved_at >= interval_s:
            _save_grads(group, store, start + count, end, faults)
            since, saved_at = 0, time.perf_counter()
    bar.close()
    sizes = group.execute("end_gradients")
    log.info("gradient statistics: %s bytes per worker", sizes)


def rank_gradient_counts(n: int, workers: int, rows: tuple[int, ...] | None) -> list[int]:
    """Sequences of the gradient pass on each rank: those of its contiguous shard that are among ``rows``
    (global positions; None: all of them)."""
    if rows is None:
        return [hi - lo for lo, hi in shard_bounds(n, workers)]
    return [sum(lo <= r < hi for r in rows) for lo, hi in shard_bounds(n, workers)]


def _seqs_done(per_rank: list[int], steps: int) -> int:
    """Real sequences covered after each rank ran ``steps`` local steps."""
    return sum(min(c, steps) for c in per_rank)


def _save_grads(group: ActorGroup, store: CheckpointStore, steps: int, done: bool,
                faults: Faults | None = None) -> None:
    """Every rank writes a new version of its partitions, then the driver commits them all at once."""
    world = group.workers
    die = faults is not None and faults.take("exit_after_grad_save", steps)
    hashes = group.get([a.save_gradients.remote(str(store.grad_path(r, world, steps)), die and r == world - 1)
                        for r, a in enumerate(group.actors)])
    store.commit_grad(world, steps, hashes, done)
