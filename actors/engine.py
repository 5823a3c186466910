"""Distributed engine (``backend: ray``): the coordinator's entry point.

The coordinator calls :func:`run_ray`; it shards the calibration windows into one Arrow
file per worker, starts (or reuses) a :class:`~actors.group.WorkerGroup`, runs the
gradient pass under ZeRO-3 (GBLM) and the block-sequential pass, and returns the masks,
the pruned weights and per-worker memory figures.
"""

from __future__ import annotations

import logging
import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from actors.group import WorkerGroup
from orchestrator.config import RunConfig
from orchestrator.engine import PruneOutcome
from orchestrator.pruning.methods import gradient_kinds

log = logging.getLogger(__name__)


@dataclass
class RayResult:
    """What a distributed run produced.

    Attributes:
        outcome: masks (full weight names), report rows and phase seconds.
        weights: full weight name -> pruned ``(out, in)`` weight of every pruned linear.
        memory: per worker ``peak_rss_bytes``, ``model_state_bytes``, ``grad_stat_bytes``.
    """

    outcome: PruneOutcome
    weights: dict[str, torch.Tensor] = field(default_factory=dict)
    memory: list[dict] = field(default_factory=list)


def shard_bounds(n: int, workers: int) -> list[tuple[int, int]]:
    """Contiguous split: worker r gets global positions ``[r * ceil(n/W), min(n, (r+1) * ceil(n/W)))``."""
    per = math.ceil(n / workers) if n else 0
    return [(min(n, r * per), min(n, (r + 1) * per)) for r in range(workers)]


def write_shards(input_ids: torch.Tensor, workers: int, out_dir: Path) -> list[str]:
    """Write one Arrow IPC file per worker (columns ``position``, ``input_ids``); returns the paths."""
    import pyarrow as pa

    paths = []
    for r, (lo, hi) in enumerate(shard_bounds(int(input_ids.shape[0]), workers)):
        table = pa.table({
            "position": pa.array(list(range(lo, hi)), type=pa.int64()),
            "input_ids": pa.array(input_ids[lo:hi].tolist(), type=pa.list_(pa.int64())),
        })
        path = out_dir / f"calib-{r:05d}.arrow"
        with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
            writer.write_table(table)
        paths.append(str(path))
    return paths


def run_ray(cfg: RunConfig, model_path: str, input_ids: torch.Tensor, progress: bool = True,
            group: WorkerGroup | None = None, keep_grad_partitions: bool = False) -> RayResult:
    """Prune with ``cfg.backend.workers`` Ray actors under DeepSpeed ZeRO-3.

    Args:
        cfg: the run config (``pruning``, ``model``, ``backend``).
        model_path: materialised model directory (readable by every worker).
        input_ids: ``(N, L)`` int64 calibration windows in global order.
        progress: show progress bars on the driver.
        group: an existing worker group to reuse (not shut down); default: start one.
        keep_grad_partitions: also return each rank's statistic partitions in
            ``memory[r]["grad_partitions"]`` (tests).

    Returns:
        The :class:`RayResult`.
    """
    pcfg = cfg.pruning
    t0 = time.perf_counter()
    own = group is None
    if own:
        group = WorkerGroup(cfg.backend.workers, cfg.backend.address, strategy=cfg.backend.placement_strategy,
                            num_threads=cfg.backend.num_threads)
    try:
        with tempfile.TemporaryDirectory(prefix="rayprune-shards-") as tmp:
            paths = write_shards(input_ids, group.workers, Path(tmp))
            seq_len = int(input_ids.shape[1])
            ray_get(group, [a.load.remote(model_path, cfg.model, p, seq_len) for a, p in zip(group.actors, paths,
                                                                                           strict=True)])
        phases = {"startup": time.perf_counter() - t0}
        kinds = gradient_kinds(pcfg.method, pcfg.gblm.norm)
        if kinds:
            t0 = time.perf_counter()
            _gradient_pass(group, input_ids.shape[0], kinds, pcfg.gblm.grad_scale, progress,
                           cfg.backend.grad_batch_size)
            phases["gradient_pass"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        outcome, weights = _block_pass(group, cfg, progress)
        phases["block_pass"] = time.perf_counter() - t0
        outcome.phases = phases
        memory = group.call("memory")
        if keep_grad_partitions:
            for m, parts in zip(memory, group.call("grad_partitions"), strict=True):
                m["grad_partitions"] = parts
        group.call("finish")
        return RayResult(outcome=outcome, weights=weights, memory=memory)
    finally:
        if own:
            group.shutdown()


def ray_get(group: WorkerGroup, refs: list):
    """``ray.get`` that fails fast: a worker's error cancels the whole collective step."""
    import ray

    pending = list(refs)
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        try:
            ray.get(done[0])
        except Exception:
            for a in group.actors:  # the others are stuck in a collective: no graceful way out
                ray.kill(a)
            group.actors = []
            raise
    return ray.get(refs)


def _gradient_pass(group: WorkerGroup, n: int, kinds: tuple[str, ...], scale: float, progress: bool,
                   batch: int = 1) -> None:
    """Per-sequence gradient statistics on every worker; each rank runs ``ceil(N/W)`` sequences,
    ``batch`` per forward/backward (per-sample gradients, so the sums do not depend on ``batch``)."""
    steps = math.ceil(n / group.workers)
    group.call("start_gradients", kinds, scale)
    bar = tqdm(total=n, desc="gradient pass (ray)", disable=not progress, unit="seq")
    done = 0
    chunk = max(batch, (max(1, steps // 8) // batch) * batch)  # whole micro-batches per call
    for start in range(0, steps, chunk):
        count = min(chunk, steps - start)
        ray_get(group, group.call_async("gradient_steps", start, count, batch))
        new = min(n, sum(min(max(0, hi - lo - start), count) for lo, hi in shard_bounds(n, group.workers)))
        done += new
        bar.update(new)
    bar.close()
    sizes = group.call("end_gradients")
    log.info("gradient statistics: %s bytes per worker", sizes)


def _block_pass(group: WorkerGroup, cfg: RunConfig, progress: bool) -> tuple[PruneOutcome, dict]:
    """Prune all blocks in order; rank 0's answers give masks, weights and rows."""
    pcfg = cfg.pruning
    out = PruneOutcome()
    weights: dict[str, torch.Tensor] = {}
    if pcfg.method != "magnitude":
        ray_get(group, group.call_async("capture"))
    blocks = group.call("num_blocks")[0]
    for i in tqdm(range(blocks), desc=f"{pcfg.method} blocks (ray x{group.workers})", disable=not progress):
        res = ray_get(group, group.call_async("prune_block", i, pcfg, cfg.backend.forward_dtype))[0]
        out.masks.update(res["masks"])
        weights.update(res["weights"])
        out.layers.extend(res["rows"])
    return out, weights
