"""Sparsity sweeps: several candidates from one gradient-statistics pass (local engine).

The per-sequence gradient pass (the expensive part of GBLM) runs once on the dense model and
every candidate reuses it. Activation statistics:

* ``pruning.sequential: false``: one forward over the dense model collects every block's
  statistics; all candidates' masks come from that single pass.
* ``pruning.sequential: true``: each candidate re-forwards its own pruned blocks (that is what
  sequential means: block ``i``'s inputs depend on how blocks ``< i`` were pruned); the
  gradient statistics are still computed once.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import time
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from orchestrator.blocks import (
    block_linears,
    block_prefix,
    capture_block_inputs,
    collect_inputs,
    decoder_blocks,
    forward_all,
)
from orchestrator.config import PruningConfig
from orchestrator.engine import PruneOutcome, block_grads, block_sequential, gradient_pass, layer_row, prune_linears
from orchestrator.modeling import TORCH_DTYPES
from orchestrator.pruning.methods import gradient_kinds, needs_xtx

log = logging.getLogger(__name__)


@dataclass
class Candidate:
    """One pruned model of a sweep.

    Attributes:
        sparsity: its target sparsity.
        model: the pruned model (a copy of the dense one).
        outcome: its masks and per-layer rows.
    """

    sparsity: float
    model: nn.Module
    outcome: PruneOutcome


@dataclass
class SweepResult:
    """Candidates and pass counts of a sweep."""

    candidates: list[Candidate] = field(default_factory=list)
    gradient_passes: int = 0
    activation_passes: int = 0
    phases: dict[str, float] = field(default_factory=dict)


def main_sparsity(cfg: PruningConfig) -> float:
    """The sweep candidate saved as the run's model: ``pruning.sparsity``, else 0.5 if swept, else the first."""
    if cfg.sparsity is not None:
        return float(cfg.sparsity)
    return 0.5 if 0.5 in cfg.sweep else float(cfg.sweep[0])


def run_sweep(model: nn.Module, input_ids: torch.Tensor, cfg: PruningConfig, forward_dtype: str = "float32",
              progress: bool = True) -> SweepResult:
    """Prune one copy of ``model`` per sparsity in ``cfg.sweep`` (``model`` itself stays dense).

    Args:
        model: the dense model.
        input_ids: ``(N, L)`` calibration windows.
        cfg: pruning options with a non-empty ``sweep``.
        forward_dtype: autocast dtype of block forwards.
        progress: show progress bars.
    """
    res = SweepResult()
    grads = None
    kinds = gradient_kinds(cfg.method, cfg.gblm.norm)
    if kinds:
        t0 = time.perf_counter()
        grads = gradient_pass(model, input_ids, kinds, cfg.gblm.grad_scale, progress)
        res.gradient_passes += 1
        res.phases["gradient_pass"] = time.perf_counter() - t0
    cfgs = [dataclasses.replace(cfg, sparsity=float(s), sweep=[]) for s in cfg.sweep]
    t0 = time.perf_counter()
    if cfg.sequential:
        for c in cfgs:
            m = copy.deepcopy(model)
            out = block_sequential(m, input_ids, c, grads, forward_dtype, progress)
            res.activation_passes += int(cfg.method != "magnitude")
            res.candidates.append(Candidate(c.target_sparsity, m, out))
    else:
        models = [copy.deepcopy(model) for _ in cfgs]
        outs = _one_pass(model, models, input_ids, cfgs, grads, forward_dtype, progress)
        res.activation_passes += int(cfg.method != "magnitude")
        res.candidates = [Candidate(c.target_sparsity, m, o) for c, m, o in zip(cfgs, models, outs, strict=True)]
    res.phases["block_pass"] = time.perf_counter() - t0
    log.info("sweep: %d candidates from %d gradient pass(es) and %d activation pass(es)", len(cfgs),
             res.gradient_passes, res.activation_passes)
    return res


def _one_pass(dense: nn.Module, models: list[nn.Module], input_ids: torch.Tensor, cfgs: list[PruningConfig],
              grads: dict | None, forward_dtype: str, progress: bool) -> list[PruneOutcome]:
    """Statistics from the dense model, block by block, applied to every candidate (non-sequential)."""
    amp = None if forward_dtype == "float32" else TORCH_DTYPES[forward_dtype]
    method = cfgs[0].method
    kind = gradient_kinds(method, cfgs[0].gblm.norm)
    prefix = block_prefix(dense)
    with_stats = method != "magnitude"
    hidden, kwargs = capture_block_inputs(dense, input_ids) if with_stats else (None, {})  # (N, L, H)
    outs = [PruneOutcome() for _ in cfgs]
    cand_blocks = [decoder_blocks(m) for m in models]
    for i, block in enumerate(tqdm(decoder_blocks(dense), desc=f"{method} sweep blocks", disable=not progress)):
        stats = None
        if with_stats:
            with collect_inputs(block_linears(block), needs_xtx(method)) as stats:
                hidden = forward_all(block, hidden, kwargs, autocast_dtype=amp)
        grad_of = block_grads(grads, kind, prefix, i)
        for c, blocks, out in zip(cfgs, cand_blocks, outs, strict=True):
            for name, r in prune_linears(block_linears(blocks[i]), stats, grad_of, c).items():
                full = f"{prefix}.{i}.{name}.weight"
                out.masks[full] = r.mask
                out.layers.append(layer_row(full, r))
    return outs
