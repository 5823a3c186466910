"""Sweeps on the distributed engine: several sparsities from one distributed gradient pass.

The coordinator calls :func:`run_ray_sweep` with a directory every rank shares; the ranks write each
candidate's pruned checkpoint under ``candidate-K/`` there (:mod:`orchestrator.outputs.shards`), and
only report rows and file records come back. The coordinator publishes and evaluates the candidates
from those files.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from actors.distributed import SCORER, RayResult, check_shared_storage, load_workers, prune_spec, start_workers
from actors.gradient_pass import gradient_pass, gradient_spec
from actors.group import ActorGroup, GroupSpec
from orchestrator.engine.block_step import uses_activations
from orchestrator.engine.local import PruneOutcome
from orchestrator.inputs.config import RunConfig
from orchestrator.pruning.methods import gradient_kinds


@dataclass
class RaySweep:
    """What a distributed sweep produced: per candidate ``(sparsity, its files and rows)``, pass counts, phases."""

    candidates: list[tuple[float, RayResult]] = field(default_factory=list)
    gradient_passes: int = 0
    activation_passes: int = 0
    phases: dict[str, float] = field(default_factory=dict)
    memory: list[dict] = field(default_factory=list)


def run_ray_sweep(cfg: RunConfig, model_path: str, input_ids: torch.Tensor, progress: bool = True,
                  group: ActorGroup | None = None, spec: GroupSpec | None = None,
                  root: Path | None = None) -> RaySweep:
    """A sweep (``pruning.sweep``) on the distributed engine: one gradient pass for every candidate.

    Non-sequential: one dense block pass; each block's statistics prune every candidate
    (:meth:`~actors.block_ops.BlockPassOps.sweep_block`, on one rank). Sequential: one block pass per
    candidate from the same block-0 inputs and gradient statistics, the ranks sharing each block, the
    ZeRO-3 partitions left dense between them. Candidate ``k``'s files go under ``root/candidate-k``.

    Args:
        root: where the ranks write (storage they all share, checked first; default: a new temporary
            directory, enough on one machine).
    """
    import dataclasses
    import tempfile

    root = Path(root) if root is not None else Path(tempfile.mkdtemp(prefix="rayprune-sweep-"))
    own = group is None
    t0 = time.perf_counter()
    group = group or start_workers(spec or prune_spec(cfg))
    try:
        cfg = cfg.with_compute_dtypes(group.native_bf16)
        pcfg = cfg.pruning
        cfgs = [dataclasses.replace(pcfg, sparsity=float(s), sweep=[]) for s in pcfg.sweep]
        out = RaySweep()
        check_shared_storage(group, root, cfg.output.dir)
        roots = [root / f"candidate-{k}" for k in range(len(cfgs))]
        load_workers(group, cfg, model_path, input_ids)
        out.phases["startup"] = time.perf_counter() - t0
        kinds = gradient_kinds(pcfg.method, pcfg.gblm.norm)
        if kinds:
            t1 = time.perf_counter()
            n = int(input_ids.shape[0])
            gradient_pass(group, n, gradient_spec(cfg, model_path, group, n=n), progress)
            out.gradient_passes += 1
            out.phases["gradient_pass"] = time.perf_counter() - t1
        t1 = time.perf_counter()
        results = _sweep_blocks(group, cfgs, cfg.backend.forward_dtype, kinds[0] if kinds else None, progress,
                                roots)
        out.activation_passes = (0 if not uses_activations(pcfg) else len(cfgs) if pcfg.sequential else 1)
        out.phases["block_pass"] = time.perf_counter() - t1
        out.candidates = [(c.target_sparsity, r) for c, r in zip(cfgs, results, strict=True)]
        for r in results:
            r.outcome.dtypes = cfg.compute_dtypes()
        out.memory = group.execute("memory")
        group.execute("finish")
        return out
    finally:
        if own:
            group.shutdown()


def _sweep_blocks(group: ActorGroup, cfgs: list, dtype: str, grad_kind: str | None, progress: bool,
                  roots: list[Path]) -> list[RayResult]:
    """Every candidate's rows and written files, block by block (see :func:`run_ray_sweep`)."""
    results = [RayResult(outcome=PruneOutcome(), root=r) for r in roots]
    index = {str(r): k for k, r in enumerate(roots)}

    def take(records: list[dict | None]) -> None:
        for rec in records:
            if rec is not None:
                k = index[rec["root"]]
                results[k].files.update({rel: {"path": rel, **e} for rel, e in rec["files"].items()})

    for root in roots:  # each candidate is a whole checkpoint: the unpruned parameters too
        take(group.execute("write_outside", str(root))[:1])
    first = cfgs[0]
    if uses_activations(first):
        group.execute("capture")
    blocks = group.execute_single(0, "num_blocks")
    if first.sequential and uses_activations(first):
        for k, c in enumerate(cfgs):
            group.execute("restart_hidden")
            for i in tqdm(range(blocks), desc=f"sweep {c.target_sparsity:g} (ray x{group.workers})",
                          disable=not progress):
                answers = group.execute("prune_block", i, c, dtype, grad_kind, str(roots[k]), False)
                results[k].outcome.layers.extend(sorted((r for a in answers for r in a["rows"]),
                                                        key=lambda r: answers[0]["order"][r["name"]]))
                take([a["written"] for a in answers])
    else:
        for i in tqdm(range(blocks), desc=f"sweep blocks (ray x{group.workers})", disable=not progress):
            answer = group.execute("sweep_block", i, cfgs, dtype, grad_kind, [str(r) for r in roots], SCORER)[SCORER]
            for k, rows in enumerate(answer["rows"]):
                results[k].outcome.layers.extend(rows)
            take(answer["written"])
    take(group.execute("settle_writes"))
    return results
