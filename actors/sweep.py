"""Sweeps on the distributed engine: several sparsities from one distributed gradient pass.

The coordinator calls :func:`run_ray_sweep`; the candidates' weights come back to it, which builds
one model per candidate (:func:`orchestrator.engine.sweep.candidates_from_weights`) and evaluates
them with the evaluation actors.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from actors.distributed import SCORER, load_workers, prune_spec, start_workers
from actors.gradient_pass import gradient_pass, gradient_spec
from actors.group import ActorGroup, GroupSpec
from orchestrator.engine.block_step import uses_activations
from orchestrator.engine.local import PruneOutcome
from orchestrator.inputs.config import RunConfig
from orchestrator.pruning.methods import gradient_kinds


@dataclass
class RaySweep:
    """What a distributed sweep produced: per candidate ``(sparsity, outcome, weights)``, pass counts, phases."""

    candidates: list[tuple[float, PruneOutcome, dict[str, torch.Tensor]]] = field(default_factory=list)
    gradient_passes: int = 0
    activation_passes: int = 0
    phases: dict[str, float] = field(default_factory=dict)
    memory: list[dict] = field(default_factory=list)


def run_ray_sweep(cfg: RunConfig, model_path: str, input_ids: torch.Tensor, progress: bool = True,
                  group: ActorGroup | None = None, spec: GroupSpec | None = None) -> RaySweep:
    """A sweep (``pruning.sweep``) on the distributed engine: one gradient pass for every candidate.

    Non-sequential: one dense block pass; each block's statistics prune every candidate
    (:meth:`~actors.worker.PruneWorker.sweep_block`). Sequential: one block pass per candidate from
    the same block-0 inputs and gradient statistics, the ZeRO-3 partitions left dense between them.
    The coordinator evaluates the candidates with the evaluation actors.
    """
    import dataclasses

    own = group is None
    t0 = time.perf_counter()
    group = group or start_workers(spec or prune_spec(cfg))
    try:
        cfg = cfg.with_compute_dtypes(group.native_bf16)
        pcfg = cfg.pruning
        cfgs = [dataclasses.replace(pcfg, sparsity=float(s), sweep=[]) for s in pcfg.sweep]
        out = RaySweep()
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
        results = _sweep_blocks(group, cfgs, cfg.backend.forward_dtype, kinds[0] if kinds else None, progress)
        out.activation_passes = (0 if not uses_activations(pcfg) else len(cfgs) if pcfg.sequential else 1)
        out.phases["block_pass"] = time.perf_counter() - t1
        out.candidates = [(c.target_sparsity, o, w) for c, (o, w) in zip(cfgs, results, strict=True)]
        for o, _ in results:
            o.dtypes = cfg.compute_dtypes()
        out.memory = group.execute("memory")
        group.execute("finish")
        return out
    finally:
        if own:
            group.shutdown()


def _sweep_blocks(group: ActorGroup, cfgs: list, dtype: str, grad_kind: str | None, progress: bool
                  ) -> list[tuple[PruneOutcome, dict]]:
    """Every candidate's masks, weights and rows, block by block (see :func:`run_ray_sweep`)."""
    results = [(PruneOutcome(), {}) for _ in cfgs]

    def fold(k: int, res: dict) -> None:
        results[k][0].masks.update(res["masks"])
        results[k][0].layers.extend(res["rows"])
        results[k][1].update(res["weights"])

    first = cfgs[0]
    if uses_activations(first):
        group.execute("capture")
    blocks = group.execute_single(0, "num_blocks")
    if first.sequential and uses_activations(first):
        for k, c in enumerate(cfgs):
            group.execute("restart_hidden")
            for i in tqdm(range(blocks), desc=f"sweep {c.target_sparsity:g} (ray x{group.workers})",
                          disable=not progress):
                fold(k, group.execute("prune_block", i, c, dtype, grad_kind, None, False, SCORER)[SCORER])
        return results
    for i in tqdm(range(blocks), desc=f"sweep blocks (ray x{group.workers})", disable=not progress):
        for k, res in enumerate(group.execute("sweep_block", i, cfgs, dtype, grad_kind, SCORER)[SCORER]):
            fold(k, res)
    return results
