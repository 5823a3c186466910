"""Sparsity sweeps: several candidates from one gradient-statistics pass (local engine; the
distributed engine's sweep is ``actors.sweep``, whose weights :func:`candidates_from_weights` turns
into candidate models).

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

from orchestrator.engine.block_step import StepContext, block_step, uses_activations
from orchestrator.engine.blocks import CPU, block_prefix, capture_block_inputs, decoder_blocks
from orchestrator.engine.device import Placement
from orchestrator.engine.local import PruneOutcome, add_results, block_grads, block_sequential, method_gradients
from orchestrator.inputs.config import PruningConfig
from orchestrator.pruning.methods import gradient_kinds

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


def run_sweep(model: nn.Module, input_ids: torch.Tensor, cfg: PruningConfig, place: Placement = CPU,
              progress: bool = True, checkpoint: bool = False) -> SweepResult:
    """Prune one copy of ``model`` per sparsity in ``cfg.sweep`` (``model`` itself stays dense).

    Args:
        model: the dense model.
        input_ids: ``(N, L)`` calibration windows.
        cfg: pruning options with a non-empty ``sweep``.
        place: device and autocast dtype of block forwards (``model`` lives on that device).
        progress: show progress bars.
        checkpoint: recompute block activations in the gradient pass's backward.
    """
    res = SweepResult()
    grads = None
    kinds = gradient_kinds(cfg.method, cfg.gblm.norm)
    if kinds:
        t0 = time.perf_counter()
        grads = method_gradients(model, input_ids, cfg, place, progress, checkpoint)
        res.gradient_passes += 1
        res.phases["gradient_pass"] = time.perf_counter() - t0
    cfgs = [dataclasses.replace(cfg, sparsity=float(s), sweep=[]) for s in cfg.sweep]
    t0 = time.perf_counter()
    if cfg.sequential:
        for c in cfgs:
            m = copy.deepcopy(model)
            out = block_sequential(m, input_ids, c, grads, place, progress)
            res.activation_passes += int(uses_activations(cfg))
            res.candidates.append(Candidate(c.target_sparsity, m, out))
    else:
        models = [copy.deepcopy(model) for _ in cfgs]
        outs = _one_pass(model, models, input_ids, cfgs, grads, place, progress)
        res.activation_passes += int(uses_activations(cfg))
        res.candidates = [Candidate(c.target_sparsity, m, o) for c, m, o in zip(cfgs, models, outs, strict=True)]
    res.phases["block_pass"] = time.perf_counter() - t0
    log.info("sweep: %d candidates from %d gradient pass(es) and %d activation pass(es)", len(cfgs),
             res.gradient_passes, res.activation_passes)
    return res


def _one_pass(dense: nn.Module, models: list[nn.Module], input_ids: torch.Tensor, cfgs: list[PruningConfig],
              grads: dict | None, place: Placement, progress: bool) -> list[PruneOutcome]:
    """Statistics from the dense model, block by block, applied to every candidate (non-sequential)."""
    cfg = cfgs[0]
    kind = gradient_kinds(cfg.method, cfg.gblm.norm)
    prefix = block_prefix(dense)
    hidden, kwargs = (capture_block_inputs(dense, place.put(input_ids)) if uses_activations(cfg)
                      else (None, {}))  # (N, L, H)
    outs = [PruneOutcome() for _ in cfgs]
    cand_blocks = [decoder_blocks(m) for m in models]
    for i, block in enumerate(tqdm(decoder_blocks(dense), desc=f"{cfg.method} sweep blocks", disable=not progress)):
        ctx = StepContext(cfg, place, grads=block_grads(grads, kind, prefix, i))
        targets = [(blocks[i], c) for blocks, c in zip(cand_blocks, cfgs, strict=True)]
        step = block_step(block, hidden, kwargs, ctx, targets=targets)
        hidden = step.hidden
        for out, results in zip(outs, step.results, strict=True):
            add_results(out, prefix, i, results)
    return outs


def candidates_from_weights(dense: nn.Module, candidates: list[tuple[float, PruneOutcome, dict[str, torch.Tensor]]],
                            gradient_passes: int, activation_passes: int, phases: dict[str, float]) -> SweepResult:
    """A :class:`SweepResult` from pruned weights computed elsewhere (the distributed sweep):
    one copy of ``dense`` per candidate with its weights laid over it (``dense`` stays dense)."""
    res = SweepResult(gradient_passes=gradient_passes, activation_passes=activation_passes, phases=dict(phases))
    for sparsity, outcome, weights in candidates:
        model = copy.deepcopy(dense)
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, w in weights.items():
                params[name].copy_(w.to(params[name].device, params[name].dtype))
        res.candidates.append(Candidate(sparsity, model, outcome))
    return res
