"""The one block step of the block-sequential pass, used by every backend.

For decoder block ``i`` with inputs ``hidden`` (this process's sequences):

1. run the (unpruned) block over ``hidden``, folding each linear's inputs into
   :class:`~orchestrator.pruning.stats.ActivationStats` (fp32, on the placement's device);
2. ``reduce`` every statistic (identity in one process, a SUM all-reduce across ranks), so each
   rank holds the statistics of all calibration sequences;
3. score and prune every linear with the configured method, then (``reconstruct: layer``)
   re-solve its kept weights by least squares (each process only the linears it ``owns``: on Ray
   the linears of a block are spread over the ranks; ``share`` then makes every owner's weights
   everyone's);
4. (``reconstruct: block``) tune the block's kept weights on every rank together, gradients
   SUM-reduced, so the pruned block reproduces the dense block's outputs
   (:mod:`~orchestrator.engine.block_tune`);
5. produce the next block's inputs: the pruned block's outputs (``sequential``) or the dense
   block's (otherwise).

With ``allocation: owl`` a probe pass (:func:`probe_step`) first counts every dense block's
outliers, and :func:`block_configs` gives each block its own sparsity.

A resumed run *replays* a finished block instead (its checkpointed weights are written and the
hidden states advanced exactly as the original step advanced them). Sweeps prune several
candidate copies of the block from one set of statistics (``targets``).

Torch only (no Ray, no DeepSpeed): the caller owns the block (gathered under ZeRO-3 or not),
the collectives behind ``reduce``/``share`` and the write-back.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from orchestrator.engine.block_tune import Reduce, tune_block
from orchestrator.engine.blocks import block_linears, collect_inputs, forward_all
from orchestrator.engine.device import Placement
from orchestrator.inputs.config import PruningConfig
from orchestrator.pruning.admm import AdmmSettings
from orchestrator.pruning.methods import LayerPruneResult, needs_xtx, prune_reconstructed, prune_weight
from orchestrator.pruning.owl import outlier_counts, owl_sparsities
from orchestrator.pruning.scores import wanda_score
from orchestrator.pruning.stats import ActivationStats

log = logging.getLogger(__name__)

#: makes each owner's weights of these linears every rank's (identity in one process)
Share = Callable[[dict[str, nn.Linear]], None]
#: local linear name -> whether this process scores and prunes it
Owns = Callable[[str], bool]
#: local linear name -> the gradient statistic the method scores with (or None)
GradLookup = Callable[[str], torch.Tensor | None]


def no_reduce(_t: torch.Tensor) -> None:
    """The reduce of a single process: its statistics already cover every sequence."""


def no_share(_linears: dict[str, nn.Linear]) -> None:
    """The share of a single process: its weights are the only ones."""


def no_grads(_name: str) -> None:
    """Gradient lookup of gradient-free methods."""
    return None


def owns_all(_name: str) -> bool:
    """The ownership of a single process: it prunes every linear."""
    return True


def linear_owners(sizes: dict[str, int], world: int) -> dict[str, int]:
    """Which rank scores and prunes each linear of a block: largest first, each to the least loaded rank.

    Rows of a linear are independent once the statistics are reduced, so any split gives the same
    masks as one process scoring everything; this one balances the weights each rank scores
    (ties: the lower rank, in the block's order), the same on every rank.

    Args:
        sizes: local linear name -> elements of its weight, in the block's order.
        world: ranks.

    Returns:
        local linear name -> rank.
    """
    order = sorted(range(len(sizes)), key=lambda i: -list(sizes.values())[i])
    names = list(sizes)
    load = [0] * world
    owners: dict[str, int] = {}
    for i in order:
        r = min(range(world), key=lambda k: (load[k], k))
        owners[names[i]] = r
        load[r] += sizes[names[i]]
    return {n: owners[n] for n in names}


@dataclass
class StepContext:
    """What a block step needs besides the block and its inputs.

    Attributes:
        cfg: pruning options (method, sparsity, pattern, ``sequential``).
        place: device and autocast dtype of the forwards; statistics stay fp32 on that device.
        grads: gradient statistic of each local linear (GBLM).
        reduce: SUM of a statistic over all ranks.
        share: broadcast of each owner's pruned weights.
        owns: which linears this process scores and prunes (on Ray each rank its share of the block,
            :func:`linear_owners`; every linear in one process).
        positions: global calibration index of each local sequence (None: ``range(n)``, one process).
    """

    cfg: PruningConfig
    place: Placement = field(default_factory=Placement)
    grads: GradLookup = no_grads
    reduce: Reduce = no_reduce
    share: Share = no_share
    owns: Owns = owns_all
    positions: list[int] | None = None


@dataclass
class StepResult:
    """What a block step produced.

    Attributes:
        results: per target (one unless a sweep), local linear name -> its pruning result, for the
            linears this process owns (none on a replay).
        hidden: ``(n, L, H)`` the next block's inputs on the placement's device.
    """

    results: list[dict[str, LayerPruneResult]]
    hidden: torch.Tensor


def uses_activations(cfg: PruningConfig) -> bool:
    """Whether the pass runs forwards at all (plain magnitude pruning needs no data)."""
    return cfg.method != "magnitude" or cfg.reconstruct != "none" or cfg.allocation != "uniform"


@dataclass
class Probe:
    """What the OWL probe of one dense block found.

    Attributes:
        outliers: Wanda scores above ``threshold`` times the block's mean score.
        total: scores of the block (its prunable parameters).
        hidden: ``(n, L, H)`` the dense block's outputs (the next block's probe inputs).
    """

    outliers: int
    total: int
    hidden: torch.Tensor


def probe_step(block: nn.Module, hidden: torch.Tensor, kwargs: dict, place: Placement, threshold: float,
               reduce: Reduce = no_reduce) -> Probe:
    """Count one dense block's outliers (OWL) from all ranks' input norms and advance the hidden states.

    Args:
        block: a plain, unpruned block on ``place.device`` (left unchanged).
        hidden: ``(n, L, H)`` this process's inputs of the block.
        kwargs: the block's keyword arguments.
        place: device and autocast dtype of the forward.
        threshold: OWL's ``M``.
        reduce: SUM of a statistic over all ranks.
    """
    linears = block_linears(block)
    with collect_inputs(linears, False) as stats:
        out = forward_all(block, hidden, kwargs, place)  # (n, L, H)
    reduce_stats(stats, reduce)
    scores = [wanda_score(lin.weight.data, stats[n].input_norm()) for n, lin in linears.items()]
    outliers, total = outlier_counts(scores, threshold)
    return Probe(outliers, total, out)


def block_configs(cfg: PruningConfig, probes: list[tuple[int, int]] | None, blocks: int) -> list[PruningConfig]:
    """The pruning config of every block: ``cfg`` itself, or (OWL) ``cfg`` at the block's sparsity.

    Args:
        cfg: the run's pruning options.
        probes: ``(outliers, total)`` per block from :func:`probe_step` (OWL only).
        blocks: number of decoder blocks.
    """
    if cfg.allocation == "uniform":
        return [cfg] * blocks
    if probes is None or len(probes) != blocks:
        raise ValueError(f"OWL allocation needs one probe per block ({blocks}), got {probes!r}")
    ratios = [o / max(t, 1) for o, t in probes]
    sparsities = owl_sparsities(ratios, cfg.target_sparsity, cfg.owl.lam, [t for _, t in probes])
    log.info("OWL sparsity per block: %s", ", ".join(f"{s:.3f}" for s in sparsities))
    return [dataclasses.replace(cfg, sparsity=s) for s in sparsities]


def reduce_stats(stats: dict[str, ActivationStats], reduce: Reduce) -> None:
    """SUM every statistic (and its sample and token counts) over all ranks, in place."""
    for st in stats.values():
        reduce(st.act_sq)
        if st.xtx is not None:
            reduce(st.xtx)
        counts = torch.tensor([st.samples, st.tokens], dtype=torch.int64, device=st.act_sq.device)
        reduce(counts)
        st.samples, st.tokens = int(counts[0]), int(counts[1])


def search_settings(cfg: PruningConfig) -> AdmmSettings | None:
    """The ADMM support search's settings (``pruning.search: admm``), or None."""
    if cfg.search != "admm":
        return None
    a = cfg.admm
    return AdmmSettings(rho=a.rho, max_iters=a.max_iters, min_iters=a.min_iters, stop_tol=a.stop_tol,
                        percdamp=a.percdamp, grad_alpha=cfg.gblm.relative_alpha)


def prune_linears(linears: dict[str, nn.Linear], stats: dict[str, ActivationStats] | None, grads: GradLookup,
                  cfg: PruningConfig) -> dict[str, LayerPruneResult]:
    """Prune every linear of one block in place with the configured method (then reconstruct).

    With ``cfg.reconstruct`` other than ``none`` the kept weights of each linear are re-solved from the
    dense weight, the method's mask and the statistics' ``sum x x^T``
    (:func:`~orchestrator.pruning.methods.prune_reconstructed`).

    Args:
        linears: local name -> linear layer (weights are overwritten).
        stats: local name -> input statistics (None for magnitude without reconstruction).
        grads: local name -> GBLM gradient statistic (or None).
        cfg: pruning options.
    """
    results = {}
    for name, lin in linears.items():
        grad = grads(name)
        kw = dict(grad=None if grad is None else grad.to(lin.weight.device), alpha=cfg.gblm.alpha_for(cfg.method),
                  norm=cfg.gblm.norm, grad_scale=cfg.gblm.grad_scale, weighting=cfg.gblm.weighting,
                  blocksize=cfg.sparsegpt.blocksize, percdamp=cfg.sparsegpt.percdamp, name=name)
        act = None if stats is None else stats[name]
        if cfg.reconstruct != "none":
            ls = cfg.lstsq
            res = prune_reconstructed(lin.weight.data, cfg.method, cfg.target_sparsity, cfg.nm, act, ls.rounds,
                                      ls.solver, ls.percdamp, ls.iters, ls.tol, search_settings(cfg), cfg.swaps,
                                      **kw)
        else:
            res = prune_weight(lin.weight.data, cfg.method, cfg.target_sparsity, cfg.nm, act=act, **kw)
        lin.weight.data.copy_(res.weight)
        results[name] = res
    return results


def tune(block: nn.Module, linears: dict[str, nn.Linear], hidden: torch.Tensor, dense_out: torch.Tensor,
         kwargs: dict, ctx: StepContext, cfg: PruningConfig, results: dict[str, LayerPruneResult] | None) -> None:
    """``reconstruct: block`` on every rank together: tune the kept weights, then share the owners'.

    The masks are the zeros of the shared weights (every rank holds them); the tuned weights are
    copied into the owned ``results``.
    """
    masks = {name: lin.weight.data == 0 for name, lin in linears.items()}  # (out, in) True = pruned
    bt = cfg.block_tune
    out = tune_block(block, linears, masks, hidden, dense_out, kwargs, ctx.place, bt.epochs, bt.batch, bt.lr,
                     ctx.positions, ctx.reduce)
    log.debug("block tuning: loss %.4g -> %.4g over %d steps", out.loss_first, out.loss_last, out.steps)
    ctx.share(linears)  # the owners' bits everywhere (the all-reduced steps agree up to rounding)
    for name, res in (results or {}).items():
        res.weight = linears[name].weight.data.detach().clone()


def block_step(block: nn.Module, hidden: torch.Tensor | None, kwargs: dict, ctx: StepContext,
               targets: list[tuple[nn.Module, PruningConfig]] | None = None,
               replay: dict[str, torch.Tensor] | None = None) -> StepResult:
    """Prune (or replay) one decoder block and advance the hidden states.

    Args:
        block: a plain block on ``ctx.place.device``; the statistics come from it, and it is
            pruned in place unless ``targets`` are given.
        hidden: ``(n, L, H)`` this process's inputs of the block, on the device (None for magnitude).
        kwargs: the block's keyword arguments (rotary embeddings, mask, positions), on the device.
        ctx: method options, placement and the collectives.
        targets: sweep candidates ``(block copy, cfg)`` to prune from ``block``'s statistics
            instead of ``block`` itself (non-sequential: the next inputs are the dense outputs).
        replay: local linear name -> the block's checkpointed pruned weight: written instead of
            pruning, with the hidden states advanced as the original step did.

    Returns:
        The per-target results and the next block's inputs.
    """
    cfg = ctx.cfg
    active = uses_activations(cfg) and hidden is not None
    linears = block_linears(block)
    stats = dense_out = None
    if active and replay is None:
        with collect_inputs(linears, needs_xtx(cfg.method, cfg.reconstruct)) as stats:
            dense_out = forward_all(block, hidden, kwargs, ctx.place)  # (n, L, H)
        reduce_stats(stats, ctx.reduce)
    elif active and not cfg.sequential:
        dense_out = forward_all(block, hidden, kwargs, ctx.place)  # the dense block's outputs feed block i+1
    results = []
    for tblock, tcfg in targets or [(block, cfg)]:
        tlinears = block_linears(tblock)
        if replay is not None:
            with torch.no_grad():
                for name, lin in tlinears.items():
                    lin.weight.data.copy_(replay[name].to(lin.weight.device, lin.weight.dtype))
        else:
            owned = {n: lin for n, lin in tlinears.items() if ctx.owns(n)}
            results.append(prune_linears(owned, stats, ctx.grads, tcfg))
        ctx.share(tlinears)
        if replay is None and tcfg.reconstruct == "block" and dense_out is not None:
            tune(tblock, tlinears, hidden, dense_out, kwargs, ctx, tcfg, results[-1])
    if not active:
        return StepResult(results, hidden)
    if cfg.sequential and not targets:
        return StepResult(results, forward_all(block, hidden, kwargs, ctx.place))  # the pruned block's outputs
    return StepResult(results, dense_out)
